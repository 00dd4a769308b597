//! What a user installs: `scripts/install.sh` splits the debug info off the release binary, so
//! the installed one is tens of MB (not ~450), still runs, keeps its symbols for `perf`, and
//! points at its debug file.

use std::path::Path;
use std::process::Command;

#[test]
fn the_installed_binary_is_small_and_keeps_its_symbols() {
    let built = Path::new(env!("CARGO_BIN_EXE_hermod"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("prefix");
    let debug = dir.path().join("debug");
    let status = Command::new("bash")
        .arg(root.join("scripts/install.sh"))
        .env("PREFIX", &prefix)
        .env("DEBUG_DIR", &debug)
        .env("HERMOD_BIN_DIR", built.parent().unwrap())
        .env("BINS", "hermod")
        .status()
        .unwrap();
    assert!(status.success(), "install.sh failed");
    let installed = prefix.join("bin/hermod");
    let size = std::fs::metadata(&installed).unwrap().len();
    let full = std::fs::metadata(built).unwrap().len();
    assert!(
        size < 64 << 20,
        "the installed binary is {size} bytes (built: {full})"
    );
    let version = Command::new(&installed).arg("--version").output().unwrap();
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("hermod "));
    let sections = Command::new("readelf")
        .args(["-S", "-W"])
        .arg(&installed)
        .output()
        .unwrap();
    let sections = String::from_utf8_lossy(&sections.stdout);
    assert!(sections.contains(".symtab"), "symbols kept for perf");
    assert!(
        sections.contains(".gnu_debuglink"),
        "points at its debug file"
    );
    assert!(!sections.contains(".debug_info"), "no debug info inside");
    assert!(std::fs::metadata(debug.join("hermod.debug")).unwrap().len() > size);
}
