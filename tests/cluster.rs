//! A cluster's placement map (`[cluster]`, docs/cluster.md) on the real binary: a node records
//! its id and the map's hash in its data dir and refuses to start on another map; a map of
//! several nodes without NATS settings is refused. Nodes linked through NATS: `tests/nodes.rs`.

mod common;

use std::path::Path;
use std::process::Command;

use common::{open, send, Server};

fn config(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn one_node(version: u64) -> String {
    format!(
        "[cluster]\nnode = \"a\"\nversion = {version}\n\n[[cluster.nodes]]\nid = \"a\"\nurl = \"ws://127.0.0.1:7400/ws\"\nshards = 2\n"
    )
}

/// Runs `hermod serve` expecting it to refuse; its stderr.
fn refused(data: &Path, config: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hermod"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            config,
            "--data",
        ])
        .arg(data)
        .env("HERMOD_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success(), "it started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_node_keeps_its_map_and_refuses_another() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let v1 = config(dir.path(), "v1.toml", &one_node(1));
    let mut server = Server::start_on(&data, &["--config", &v1]);
    let (mut alice, _) = server.user("alice", "pc");
    server.user("bob", "pc");
    let conv = open(&mut alice, "bob");
    send(&mut alice, &conv, "on a one-node cluster");
    assert!(server.stop().success());
    let identity = std::fs::read_to_string(data.join("node")).unwrap();
    assert!(identity.starts_with("node=a\nmap="), "{identity}");

    // The same map starts again; another version of it does not, and says why.
    let mut again = Server::start_on(&data, &["--config", &v1]);
    assert!(again.stop().success());
    let v2 = config(dir.path(), "v2.toml", &one_node(2));
    let err = refused(&data, &v2);
    assert!(
        err.contains("belongs to node \"a\" of cluster map"),
        "{err}"
    );

    // Several nodes need to know where NATS is.
    let two = one_node(1)
        + "\n[[cluster.nodes]]\nid = \"b\"\nurl = \"ws://127.0.0.1:7410/ws\"\nshards = 2\n";
    let two = config(dir.path(), "two.toml", &two);
    let err = refused(&dir.path().join("fresh"), &two);
    assert!(
        err.contains("a [cluster.nats] section must say where NATS is"),
        "{err}"
    );

    // A shard count that contradicts the map is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_hermod"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "3",
            "--config",
            &v1,
            "--data",
        ])
        .arg(dir.path().join("fresh2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cluster map gives node \"a\" 2 shards"),
        "{err}"
    );
}
