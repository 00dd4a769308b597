#!/usr/bin/env bash
# Removes earlier builds' executables from the shared target directory, keeping the newest of
# each name. Every build with changed code links new test binaries (~450 MB each, RocksDB
# inside) beside the old ones; left alone they filled this machine's disk and a CI link failed
# with "No space left on device". Cargo relinks anything removed here that it still wants.
set -euo pipefail
deps="${CARGO_TARGET_DIR:-$HOME/.cache/hermod-target}/release/deps"
[ -d "$deps" ] || exit 0
cd "$deps"
# Newest first; a name (the file name without its -<16 hex> hash) seen before is stale.
find . -maxdepth 1 -type f -perm -u+x -regextype posix-extended -regex '.*-[0-9a-f]{16}' \
  -printf '%T@ %f\n' |
  sort -rn |
  awk '{ base = $2; sub(/-[0-9a-f]+$/, "", base); if (seen[base]++) print $2 }' |
  while read -r file; do
    rm -f -- "$file" "$file.d"
  done
