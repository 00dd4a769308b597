#!/usr/bin/env bash
# Installs what the browser test (tests/browser.rs) needs beyond Rust (tests/client.rs needs
# Node.js only): Debian's Chromium and
# playwright-core from npm (pinned by tests/browser/package-lock.json). Never downloads a
# browser from Playwright's CDN: it uses /usr/bin/chromium. Idempotent; sourced by test.sh.
set -euo pipefail
_hermod_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "hermod: the browser test needs Node.js 20+ and npm; install them (apt-get install nodejs npm)" >&2
  exit 1
fi
if [ ! -x /usr/bin/chromium ]; then
  echo "hermod: installing Debian's chromium for the browser test" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
if [ ! -d "$_hermod_root/tests/browser/node_modules/playwright-core" ]; then
  echo "hermod: installing playwright-core (npm ci in tests/browser)" >&2
  (cd "$_hermod_root/tests/browser" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
fi
