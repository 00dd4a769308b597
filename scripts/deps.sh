#!/usr/bin/env bash
# Installs what building Hermod needs beyond the Rust toolchain: libclang (rust-rocksdb's
# bindgen) and a C++ compiler. Idempotent; sourced by the other scripts.
set -euo pipefail
have_libclang() {
  local f
  # libclang itself, not libclang-cpp (installed with LLVM alone, useless to bindgen).
  for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* \
    /usr/lib/*-linux-gnu/libclang.so* /usr/lib/*-linux-gnu/libclang-[0-9]*.so*; do
    [ -e "$f" ] && return 0
  done
  return 1
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
