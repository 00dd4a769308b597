#!/usr/bin/env bash
# One-to-one throughput across nodes beside the same load within one node, on one machine
# (docs/benchmarks.md, "Across nodes"). Two runs at each rate, same users, same pairing, same
# placement over 2 shards, server side pinned to core 0 and hermod-bench to core 1:
#   local: one node with 2 shards          — cross-shard mail over in-process channels
#   nodes: two nodes with 1 shard each + a nats-server — every cross-shard mail over NATS
# `--split-shards 2` pairs only users homed on different shards, so every conversation crosses
# shards (and nodes, in the second run). Prints per run: offered and delivered msg/s, ack and
# end-to-end p50/p99, server CPU seconds (hermod processes + nats-server) per message, and the
# mail that crossed nodes.
#
# Usage: scripts/bench-cluster.sh [RATE...]   (default 5000 10000 15000)
# Needs: a release build (target dir from $CARGO_TARGET_DIR or ./target), nats-server, python3.
set -euo pipefail

cd "$(dirname "$0")/.."
BIN=${CARGO_TARGET_DIR:-target}/release
RATES=("$@")
[ ${#RATES[@]} -gt 0 ] || RATES=(5000 10000 15000)
DURATION=${DURATION:-10}
WORK=$(mktemp -d /tmp/hermod-bench-cluster.XXXXXX)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; sleep 0.3; rm -rf "$WORK"' EXIT
NATS_PORT=14422
A_PORT=17500
B_PORT=17510
SERVER_CORE=0
BENCH_CORE=1

cat > "$WORK/nats.conf" <<EOF
listen: 127.0.0.1:$NATS_PORT
authorization { user: hermod, password: "bench-password" }
EOF
for n in a b; do
  cat > "$WORK/$n.toml" <<EOF
[cluster]
node = "$n"
version = 1
[cluster.nats]
urls = ["nats://127.0.0.1:$NATS_PORT"]
user = "hermod"
password = "bench-password"
[[cluster.nodes]]
id = "a"
url = "ws://127.0.0.1:$A_PORT/ws"
shards = 1
[[cluster.nodes]]
id = "b"
url = "ws://127.0.0.1:$B_PORT/ws"
shards = 1
EOF
done

cpu_seconds() { # total user+system CPU of the given pids, in seconds
  local t=0
  for pid in "$@"; do
    t=$(( t + $(awk '{print $14 + $15}' "/proc/$pid/stat") ))
  done
  echo "scale=3; $t / $(getconf CLK_TCK)" | bc
}

wait_ready() { # url, expected readyz text
  for _ in $(seq 100); do
    curl -s "$1/readyz" | grep -q "$2" && return 0
    sleep 0.1
  done
  echo "not ready: $1" >&2; return 1
}

serve() { # name, port, extra args... — sets SERVED (the pid)
  local name=$1 port=$2; shift 2
  taskset -c $SERVER_CORE "$BIN/hermod" serve --listen "127.0.0.1:$port" --data "$WORK/data-$name" \
    --durability wal --argon2-memory-kib 64 --argon2-passes 1 --rate-limit 100000 "$@" \
    > "$WORK/$name.log" 2>&1 &
  SERVED=$!
  PIDS+=("$SERVED")
}

summary() { # label, rate, report, cpu seconds, crossed mails
  python3 - "$@" <<'EOF'
import json, sys
label, rate, path, cpu, crossed = sys.argv[1:6]
r = json.load(open(path))
f = r["figures"]
sent = f["correctness"]["sent"]
bad = {k: f["correctness"][k] for k in ("lost", "duplicated", "reordered", "unacked")}
print(f"{label:6} offered {float(rate):>7.0f}/s delivered {f['arrived_per_s']:>8.0f}/s"
      f"  ack p50/p99 {f['ack_latency']['p50_us']/1000:.1f}/{f['ack_latency']['p99_us']/1000:.1f} ms"
      f"  e2e p50/p99 {f['e2e_latency']['p50_us']/1000:.1f}/{f['e2e_latency']['p99_us']/1000:.1f} ms"
      f"  cpu {float(cpu)/sent*1e6:.1f} us/msg  crossed nodes {int(crossed)/sent:.2f} mail/msg  {bad}")
EOF
}

for rate in "${RATES[@]}"; do
  # Within one node: 2 shards on one core.
  rm -rf "$WORK"/data-*
  serve local $A_PORT --shards 2
  local_pid=$SERVED
  wait_ready "http://127.0.0.1:$A_PORT" ready
  before=$(cpu_seconds "$local_pid")
  taskset -c $BENCH_CORE "$BIN/hermod-bench" direct --url "ws://127.0.0.1:$A_PORT/ws" --users 200 \
    --peers 4 --split-shards 2 --rate "$rate" --duration "$DURATION" --warmup 2 \
    --prefix "l$rate" --report "$WORK/local-$rate.json" > /dev/null
  after=$(cpu_seconds "$local_pid")
  kill "$local_pid"; wait "$local_pid" 2>/dev/null || true
  summary local "$rate" "$WORK/local-$rate.json" "$(echo "$after - $before" | bc)" 0

  # Two nodes of one shard each, linked through NATS, everything on the same core.
  rm -rf "$WORK"/data-*
  taskset -c $SERVER_CORE nats-server -c "$WORK/nats.conf" > "$WORK/nats.log" 2>&1 &
  nats_pid=$!
  PIDS+=("$nats_pid")
  sleep 0.3
  serve a $A_PORT --config "$WORK/a.toml"
  a_pid=$SERVED
  serve b $B_PORT --config "$WORK/b.toml"
  b_pid=$SERVED
  wait_ready "http://127.0.0.1:$A_PORT" "links up 1/1"
  wait_ready "http://127.0.0.1:$B_PORT" "links up 1/1"
  before=$(cpu_seconds "$a_pid" "$b_pid" "$nats_pid")
  taskset -c $BENCH_CORE "$BIN/hermod-bench" direct --url "ws://127.0.0.1:$A_PORT/ws" --users 200 \
    --peers 4 --split-shards 2 --rate "$rate" --duration "$DURATION" --warmup 2 \
    --prefix "n$rate" --report "$WORK/nodes-$rate.json" > /dev/null
  after=$(cpu_seconds "$a_pid" "$b_pid" "$nats_pid")
  crossed=0
  for port in $A_PORT $B_PORT; do
    n=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^hermod_link_mails_sent_total/ {s += $2} END {print s + 0}')
    crossed=$((crossed + n))
  done
  kill "$a_pid" "$b_pid" "$nats_pid"
  wait "$a_pid" "$b_pid" "$nats_pid" 2>/dev/null || true
  summary nodes "$rate" "$WORK/nodes-$rate.json" "$(echo "$after - $before" | bc)" "$crossed"
done
