#!/usr/bin/env bash
# Runs every test: engine unit tests and simulation, integration tests against the real server
# binary over real sockets, and the web client in Chromium. The same command CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
source scripts/browser-deps.sh
source scripts/nats-deps.sh
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
else
  echo "hermod: rustfmt is not installed; skipping the format check" >&2
fi
exec cargo test --release --workspace "$@"
