#!/usr/bin/env bash
# Builds and starts Hermod on its defaults: http://127.0.0.1:7400/ (web chat), data in ./data.
# Extra arguments go to `hermod serve` (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
exec cargo run --release --bin hermod -- serve "$@"
