#!/usr/bin/env bash
# Installs what building Hermod needs beyond the Rust toolchain: libclang (rust-rocksdb's
# bindgen) and a C++ compiler. Idempotent; sourced by the other scripts.
set -euo pipefail
have_libclang() {
  ls /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/x86_64-linux-gnu/libclang*.so* /usr/lib/aarch64-linux-gnu/libclang*.so* >/dev/null 2>&1
}
if ! have_libclang || ! command -v c++ >/dev/null 2>&1; then
  echo "hermod: installing build dependencies (libclang-dev, g++)" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libclang-dev g++ >/dev/null
fi
# One build directory for every checkout: RocksDB's C++ takes ~15 minutes to build once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/hermod-target}"
