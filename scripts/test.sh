#!/usr/bin/env bash
# Runs every test: engine unit tests and simulation, then integration tests against the real
# server binary over real sockets. The same command CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo fmt --all -- --check
exec cargo test --release --workspace "$@"
