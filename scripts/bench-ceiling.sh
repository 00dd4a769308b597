#!/usr/bin/env bash
# The host's ceilings and Hermod beside them, back to back on one boot (docs/benchmarks.md,
# "Ceilings"): the server side on core 0 (the ceiling's pinned thread, or Hermod with one shard,
# fresh per run), hermod-bench on core 1. Writes one JSON report per run into $OUT and prints
# each run's figures.
#
# Usage: scripts/bench-ceiling.sh        (OUT=/tmp/hermod-ceiling by default)
# Needs: a release build (target dir from $CARGO_TARGET_DIR or ./target).
set -euo pipefail

cd "$(dirname "$0")/.."
BIN=${CARGO_TARGET_DIR:-target}/release
OUT=${OUT:-/tmp/hermod-ceiling}
DATA=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$DATA"' EXIT
rm -rf "$OUT"
mkdir -p "$OUT"

run() { # name, hermod-bench arguments…
  local name=$1
  shift
  taskset -c 1 "$BIN/hermod-bench" "$@" --report "$OUT/$name.json" >/dev/null
  echo "== $name"
  python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["figures"]))' "$OUT/$name.json"
}

serve() {
  rm -rf "$DATA/hermod"
  taskset -c 0 "$BIN/hermod" serve --listen 127.0.0.1:7450 --data "$DATA/hermod" --shards 1 \
    --argon2-memory-kib 64 --argon2-passes 1 --rate-limit 1000000 >/dev/null 2>&1 &
  SERVER=$!
  sleep 1.5
}

stop() {
  kill "$SERVER"
  wait "$SERVER" || true
}

run ceiling-fanout-5000 ceiling --mode fanout --conns 5000 --duration 5 --warmup 1
run ceiling-fanout-9000 ceiling --mode fanout --conns 9000 --duration 5 --warmup 1
run ceiling-fanout-5000-batch4 ceiling --mode fanout --conns 5000 --batch 4 --duration 5 --warmup 1
for rounds in 2 10 20; do
  run "ceiling-fanout-5000-rounds$rounds" ceiling --mode fanout --conns 5000 --rounds-per-s "$rounds" \
    --duration 5 --warmup 1
done
run ceiling-echo-50 ceiling --mode echo --conns 50 --duration 5 --warmup 1
for rate in 80000 120000; do
  serve
  run "echo-$rate" echo --url ws://127.0.0.1:7450/ws --conns 50 --rate "$rate" --duration 5 --warmup 1
  stop
done
for rate in 20000 30000; do
  serve
  run "direct-$rate" direct --url ws://127.0.0.1:7450/ws --users 200 --peers 4 --rate "$rate" --duration 5 --warmup 1
  stop
done
for rate in 2 10 20; do
  serve
  run "group-5000-$rate" group --url ws://127.0.0.1:7450/ws --users 5000 --groups 1 --members 5000 \
    --senders 10 --rate "$rate" --duration 5 --warmup 1 --drain 20
  stop
done
# Acks held 500 ms, as docs/protocol.md recommends to clients.
for rate in 20 40; do
  serve
  run "group-5000-$rate-ack500" group --url ws://127.0.0.1:7450/ws --users 5000 --groups 1 \
    --members 5000 --senders 10 --rate "$rate" --duration 5 --warmup 1 --drain 20 --ack-delay-ms 500
  stop
done
# A storm of resumed connections on provisioned accounts, spread over 16 source addresses
# (one source's ephemeral-port search grows with the ports it holds: docs/benchmarks.md).
"$BIN/hermod-tools" provision --data "$DATA/provisioned" --shards 1 --users 15000 \
  --out "$DATA/tokens.tsv" >/dev/null
for rate in 10000 20000 30000; do
  rm -rf "$DATA/hermod"
  cp -r "$DATA/provisioned" "$DATA/hermod"
  taskset -c 0 "$BIN/hermod" serve --listen 127.0.0.1:7450 --data "$DATA/hermod" --shards 1 \
    >/dev/null 2>&1 &
  SERVER=$!
  sleep 1.5
  run "connect-15000-$rate" connect --url ws://127.0.0.1:7450/ws --conns 15000 --rate "$rate" \
    --tokens "$DATA/tokens.tsv" --sources 127.0.0.1-127.0.0.16
  stop
done
