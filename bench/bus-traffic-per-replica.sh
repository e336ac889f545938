#!/usr/bin/env bash
# Bus traffic per replica (SCALING.md): REPLICAS (8) all-in-ones
# (`natter serve`) on PostgreSQL (database `test` at 127.0.0.1:5432, a fresh
# schema prefix) and a nats-server of the run's own (no other deployment's
# events, presence included, are counted). Replica i holds STREAMS live streams of a
# group chat of its own (natter-bench `fanout` against it) and that chat's
# messages, RATE per second, are sent through replica i+1
# (--fanout-send-target), so every delivery crosses the bus, as behind a
# load balancer. Run with --nats-routing broadcast, then interest; per
# replica: the events it received from NATS (natter_bus_received_total)
# against all the events the replicas published (natter_bus_published_total,
# presence beats included), and its NATS subscriptions mid-run
# (natter_bus_subscriptions). Counts, not times: a debug build gives the
# same figures. One JSON line per routing on stdout. The benches start
# STAGGER (2) s apart and send for DURATION (30 s) each, so most of their
# windows overlap.
#   N=target/release/natter B=target/release/natter-bench bench/bus-traffic-per-replica.sh
set -euo pipefail
N=${N:-target/release/natter}
B=${B:-target/release/natter-bench}
R=${REPLICAS:-8}
STREAMS=${STREAMS:-10}
RATE=${RATE:-20}
DURATION=${DURATION:-30s}
DB=postgres://postgres@127.0.0.1:5432/test
dir=$(mktemp -d)
base=$((20000 + RANDOM % 7000))
limits=(--create-session-rate 1000000000/1s --create-user-rate 1000000000/1s --create-chat-rate 1000000000/1s
  --send-message-rate 1000000000/1s --stream-open-rate 1000000000/1s)
prefix=""
pids=()
nats_pid=""
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "$prefix" ]; then
    for s in sessions chats messages assistant; do
      psql -h 127.0.0.1 -U postgres -d test -qAtc "DROP SCHEMA IF EXISTS ${prefix}$s CASCADE" >/dev/null 2>&1 || true
    done
  fi
}
trap 'cleanup; [ -z "$nats_pid" ] || kill $nats_pid 2>/dev/null || true' EXIT
nats_port=$((base + 300))
${NATS_SERVER:-nats-server} -a 127.0.0.1 -p $nats_port > "$dir/nats.log" 2>&1 &
nats_pid=$!
sleep 0.5
metric() {  # replica metric-name -> value (0 when absent)
  curl -s "127.0.0.1:$((base + 100 + $1))/metrics" | awk -v m="$2" '$1 == m { v = $2 } END { print v + 0 }'
}
start() {  # replica routing
  local port=$((base + $1))
  RUST_LOG=warn $N serve --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:$((base + 100 + $1)) \
    --database-url $DB --database-schema-prefix "$prefix" --database-max-connections ${POOL:-2} --nats-url nats://127.0.0.1:$nats_port \
    --nats-routing "$2" "${limits[@]}" > "$dir/serve-$2-$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 150); do $N health --addr 127.0.0.1:$port >/dev/null 2>&1 && return; sleep 0.2; done
  echo "replica $1 did not start:" >&2; tail -20 "$dir/serve-$2-$1.log" >&2; exit 1
}
for routing in broadcast interest; do
  prefix=bt${RANDOM}_
  pids=()
  # The first replica migrates the fresh schemas; the others start after it.
  start 0 $routing
  for i in $(seq 1 $((R - 1))); do start $i $routing; done
  declare -a rx0 pub0
  for i in $(seq 0 $((R - 1))); do
    rx0[$i]=$(metric $i natter_bus_received_total); pub0[$i]=$(metric $i natter_bus_published_total)
  done
  benches=()
  for i in $(seq 0 $((R - 1))); do
    $B --target http://127.0.0.1:$((base + i)) --fanout-send-target http://127.0.0.1:$((base + (i + 1) % R)) \
      --scenarios fanout --users ${USERS:-4} --fanout-streams $STREAMS --fanout-rate $RATE --duration $DURATION --warmup 1s \
      > "$dir/bench-$routing-$i.json" 2> "$dir/bench-$routing-$i.err" &
    benches+=($!)
    # Set-ups one after another, so the small pools (--database-max-connections
    # POOL (2) per service: 8 replicas x 3 services x 2 stay well under
    # PostgreSQL's max_connections, which other users share) keep up.
    sleep ${STAGGER:-2}
  done
  # Mid-run (every bench's streams open): each replica's NATS subscriptions.
  sleep $(( ${DURATION%s} / 2 ))
  subs=()
  for i in $(seq 0 $((R - 1))); do subs+=("$(metric $i natter_bus_subscriptions)"); done
  for b in "${benches[@]}"; do wait "$b" || { cat "$dir"/bench-$routing-*.err >&2; exit 1; }; done
  received=(); published=0
  for i in $(seq 0 $((R - 1))); do
    received+=($(( $(metric $i natter_bus_received_total) - ${rx0[$i]} )))
    published=$(( published + $(metric $i natter_bus_published_total) - ${pub0[$i]} ))
  done
  python3 - "$routing" "$R" "$STREAMS" "$RATE" "$DURATION" "$published" "${received[*]}" "${subs[*]}" "$dir" <<'PY'
import json, sys
routing, r, streams, rate, duration, published = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
received = [int(x) for x in sys.argv[7].split()]
subs = [int(float(x)) for x in sys.argv[8].split()]
benches = []
for i in range(r):
    line = [json.loads(l) for l in open(f"{sys.argv[9]}/bench-{routing}-{i}.json") if l.strip()]
    fan = next(l for l in line if l.get("scenario") == "fanout")
    res = fan.get("results", fan)
    benches.append({k: res.get(k) for k in ("messages_sent", "deliveries_expected", "deliveries", "streams_opened_per_s")})
print(json.dumps({
    "scenario": "bus-traffic-per-replica", "routing": routing, "replicas": r, "streams_per_replica": int(streams),
    "rate_per_replica_chat": float(rate), "duration": duration,
    "events_published_total": published,
    "received_per_replica": received,
    "received_per_replica_mean": round(sum(received) / r),
    "received_share_of_published": round(sum(received) / r / max(published, 1), 4),
    "nats_subscriptions_per_replica_mid_run": subs,
    "fanout_per_replica": benches,
}))
PY
  cleanup
  prefix=""
done
