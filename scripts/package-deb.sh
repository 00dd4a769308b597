#!/usr/bin/env bash
# Builds Hermod's Debian package with cargo-deb from the release build, then checks what it
# installs: the file list, the control data, the maintainer scripts, and that the packaged
# binaries run. Prints the package's path last. CI runs it (.ci/run).
#
#   bash scripts/package-deb.sh              # → $CARGO_TARGET_DIR/debian/hermod_<ver>-1_<arch>.deb
#   sudo dpkg -i <that file>                 # then: /etc/hermod/hermod.toml, systemctl enable --now hermod
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
# Pinned, so a new cargo-deb cannot change the package under us; installed once per machine.
CARGO_DEB_VERSION=3.6.2
if ! cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
  echo "hermod: installing cargo-deb $CARGO_DEB_VERSION" >&2
  cargo install --locked --quiet cargo-deb --version "$CARGO_DEB_VERSION"
fi
# dpkg-shlibdeps computes the shared-library dependencies (`$auto`); strip (binutils) drops
# the debug info the release profile keeps for perf.
if ! command -v dpkg-shlibdeps >/dev/null || ! command -v strip >/dev/null; then
  echo "hermod: installing dpkg-dev and binutils for packaging" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dpkg-dev binutils >/dev/null
fi

cargo build --release -p hermod --bin hermod -p hermod-tools --bin hermod-tools
# --strip: the package carries symbols for perf but not the ~430 MB of line tables per binary
# (scripts/install.sh keeps them in a side file for hosts that profile).
deb=$(cargo deb -p hermod --no-build --strip --quiet 2>&1 | tail -1)
[ -f "$deb" ] || { echo "hermod: cargo deb printed no package path: $deb" >&2; exit 1; }

fail() { echo "hermod: package check failed: $*" >&2; exit 1; }
files=$(dpkg-deb --contents "$deb" | awk '{print $6}')
for want in ./usr/bin/hermod ./usr/bin/hermod-tools ./etc/hermod/hermod.toml \
  ./usr/lib/systemd/system/hermod.service ./usr/share/doc/hermod/README.md \
  ./usr/share/doc/hermod/docs/protocol.md ./usr/share/doc/hermod/hermod.example.toml; do
  grep -qxF "$want" <<<"$files" || fail "$want is not in the package"
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb --control "$deb" "$work/control"
grep -qxF /etc/hermod/hermod.toml "$work/control/conffiles" || fail "hermod.toml is not a conffile"
grep -q '^Depends:.*libc6' "$work/control/control" || fail "no shared-library dependencies"
grep -q '^Depends:.*adduser' "$work/control/control" || fail "adduser is not a dependency"
grep -q 'adduser --system' "$work/control/postinst" || fail "postinst creates no system user"
if grep -qE 'deb-systemd-invoke (start|restart)|systemctl (--system )?start' "$work/control/postinst"; then
  fail "postinst starts the service (the shard count must be chosen first)"
fi
dpkg-deb --extract "$deb" "$work/root"
"$work/root/usr/bin/hermod" --version >/dev/null || fail "the packaged hermod does not run"
"$work/root/usr/bin/hermod-tools" --help >/dev/null || fail "the packaged hermod-tools does not run"
size=$(stat -c %s "$work/root/usr/bin/hermod")
[ "$size" -lt $((100 * 1024 * 1024)) ] || fail "hermod is $size bytes: debug info not stripped"
grep -q '^ExecStart=hermod serve --config /etc/hermod/hermod.toml' \
  "$work/root/usr/lib/systemd/system/hermod.service" || fail "the unit's ExecStart changed"

# --install: install it on this machine for real (root only), run the installed server the way
# the unit does (user hermod, the packaged config, /var/lib/hermod) on a loopback port until
# /healthz answers, then purge it and remove what a purge deliberately keeps.
if [ "${1:-}" = --install ]; then
  [ "$(id -u)" = 0 ] || fail "--install needs root"
  if dpkg -s hermod >/dev/null 2>&1 || getent passwd hermod >/dev/null || [ -e /var/lib/hermod ]; then
    fail "--install would touch an existing hermod install, user or /var/lib/hermod"
  fi
  cleanup() {
    [ -n "${served:-}" ] && kill "$served" 2>/dev/null
    dpkg --purge hermod >/dev/null 2>&1 || true
    rm -rf /var/lib/hermod /etc/hermod
    getent passwd hermod >/dev/null && deluser --system hermod >/dev/null 2>&1 || true
    getent group hermod >/dev/null && delgroup --system hermod >/dev/null 2>&1 || true
    rm -rf "$work"
  }
  trap cleanup EXIT
  DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" >/dev/null
  [ "$(stat -c %U:%a /var/lib/hermod)" = hermod:750 ] || fail "/var/lib/hermod is not hermod's, mode 750"
  [ "$(command -v hermod)" = /usr/bin/hermod ] || fail "hermod is not on PATH from /usr/bin"
  port=7399
  runuser -u hermod -- hermod serve --config /etc/hermod/hermod.toml --listen "127.0.0.1:$port" \
    --shards 1 --durability wal >"$work/serve.log" 2>&1 &
  served=$!
  for _ in $(seq 1 100); do
    if { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
      printf 'GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3
      if head -1 <&3 | grep -q ' 200 '; then ok=1; exec 3<&-; break; fi
      exec 3<&-
    fi
    sleep 0.1
  done
  [ -n "${ok:-}" ] || { cat "$work/serve.log" >&2; fail "the installed server did not answer /healthz"; }
  [ -f /var/lib/hermod/secret.key ] || fail "the installed server wrote no data in /var/lib/hermod"
  echo "hermod: installed, served /healthz as user hermod from /var/lib/hermod, purged"
fi
echo "hermod: package checked ($(du -h "$deb" | cut -f1)): $deb"
echo "$deb"
