#!/usr/bin/env bash
# Installs `hermod` and `hermod-tools` for a production host, without their debug info.
#
# The build keeps debug info (line tables for Rust, full DWARF for RocksDB's C++): ~450 MB per
# binary, which `perf` and gdb use while benchmarking. What gets installed is the same binary
# with the debug info split off: ~17 MB, symbols kept (so `perf top` still names functions).
# The debug info goes to $DEBUG_DIR (gdb and perf find it there through the binary's
# .gnu_debuglink), so a profile of the installed binary can still show source lines.
#
#   sudo bash scripts/install.sh                   # /usr/local/bin, /usr/lib/debug/usr/local/bin
#   PREFIX=$HOME/.local bash scripts/install.sh    # no root needed
#   HERMOD_BIN_DIR=dir bash scripts/install.sh     # install binaries built elsewhere (no build)
#   BINS=hermod bash scripts/install.sh            # only some of them
#
# `cargo install --path . --profile dist` is the other way: it strips at link time (no side file).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX="${PREFIX:-/usr/local}"
DEBUG_DIR="${DEBUG_DIR:-/usr/lib/debug$PREFIX/bin}"
if [ -z "${HERMOD_BIN_DIR:-}" ]; then
  source scripts/deps.sh
  cargo build --release --bin hermod --bin hermod-tools
  HERMOD_BIN_DIR="$CARGO_TARGET_DIR/release"
fi
command -v objcopy >/dev/null || { echo "hermod: objcopy (binutils) is needed" >&2; exit 1; }
mkdir -p "$PREFIX/bin" "$DEBUG_DIR"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for bin in ${BINS:-hermod hermod-tools}; do
  objcopy --only-keep-debug "$HERMOD_BIN_DIR/$bin" "$work/$bin.debug"
  # The debuglink names the file by basename and checksum; gdb and perf look for it in
  # /usr/lib/debug/<the binary's directory>/, which is $DEBUG_DIR's default.
  (cd "$work" && objcopy --strip-debug --add-gnu-debuglink="$bin.debug" "$HERMOD_BIN_DIR/$bin" "$bin")
  install -m 0644 "$work/$bin.debug" "$DEBUG_DIR/$bin.debug"
  install -m 0755 "$work/$bin" "$PREFIX/bin/$bin"
  echo "hermod: installed $PREFIX/bin/$bin ($(du -h "$PREFIX/bin/$bin" | cut -f1); debug info in $DEBUG_DIR/$bin.debug)"
done
