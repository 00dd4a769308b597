#!/usr/bin/env bash
# Installs what the cluster transport's tests (tests/nats.rs) need beyond Rust: Debian's
# nats-server (2.9, JetStream included). Idempotent; sourced by test.sh.
set -euo pipefail
if ! command -v nats-server >/dev/null 2>&1; then
  echo "hermod: installing Debian's nats-server for the cluster transport tests" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nats-server >/dev/null
fi
