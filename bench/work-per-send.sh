#!/usr/bin/env bash
# What one message sent costs each part of a deployment on PostgreSQL and
# NATS: CPU microseconds of every process (edge, sessions, chats, messages,
# all PostgreSQL backends, nats-server; natter-bench reports its own), PostgreSQL
# statements, transactions and WAL, and events published on the bus.
#
# natter-bench's `send` (many chats and one hot chat, closed loop and the
# half-rate open loop) runs for a 1 s and a 5 s window at each concurrency;
# the differences between the two runs are the work of the extra messages,
# the runs' own set-up cancelled out. `send`'s ceiling at each concurrency
# (health Checks answered by the edge or the all-in-one, as long as the
# loop) is skipped: before 2026-12-04's correction it was counted as send
# work, and it doubled the edge's and the all-in-one's figures. Statements
# are counted from PostgreSQL's log with log_statement = all set on the
# run's own database (natter_work, created if missing) only, so nothing
# else on the server is logged.
#
#   MODE=split (default): one replica of each service behind the edge.
#   MODE=serve: one all-in-one `natter serve` on PostgreSQL + NATS.
#   CACHE_TTL=5s (default) or 0s (the replicas' token and membership caches
#   off: every send asks sessions and chats).
#   CONCURRENCY="1 64" (default).
#   SCENARIOS=ceiling,send,history: instead of the counts, one natter-bench
#   run of these scenarios against the same deployment (JSON lines to
#   $OUT, default /dev/stdout; its table on stderr), with history seeded
#   through PostgreSQL; BENCH_ARGS adds natter-bench flags.
#
#   N=target/release/natter B=target/release/natter-bench bench/work-per-send.sh
set -euo pipefail
N=${N:-target/release/natter}
B=${B:-target/release/natter-bench}
MODE=${MODE:-split}
CACHE_TTL=${CACHE_TTL:-5s}
CONCURRENCY=${CONCURRENCY:-1 64}
DB=natter_work
PGLOG=${PGLOG:-/var/log/postgresql/postgresql-15-main.log}
dir=$(mktemp -d)
head -c 32 /dev/urandom | base64 > $dir/cred
q() { psql -h 127.0.0.1 -U postgres -d "${2:-$DB}" -Atc "$1"; }
q "select 1 from pg_database where datname='$DB'" postgres | grep -q 1 || q "create database $DB" postgres
# Statements are counted from the log; a benchmark run (SCENARIOS) logs
# nothing, since logging every statement and its parameters costs
# PostgreSQL CPU of its own. Parameters are never logged.
if [ -z "${SCENARIOS:-}" ]; then
  q "alter database $DB set log_statement = 'all'" postgres
  q "alter database $DB set log_parameter_max_length = 0" postgres
fi
export NATTER_SERVICE_CREDENTIAL_FILE=$dir/cred
export NATTER_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB
export NATTER_NATS_URL=nats://127.0.0.1:4222
export NATTER_DATABASE_SCHEMA_PREFIX=w${RANDOM}_
export NATTER_CACHE_TTL=$CACHE_TTL
export RUST_LOG=warn
P=${NATTER_DATABASE_SCHEMA_PREFIX}
declare -A pid
if [ "$MODE" = split ]; then
  $N sessions --listen 127.0.0.1:7171 --internal-listen 127.0.0.1:7271 --create-user-rate off --create-session-rate off > $dir/s.log 2>&1 &
  pid[sessions]=$!
  $N chats --listen 127.0.0.1:7172 --internal-listen 127.0.0.1:7272 --create-chat-rate off --sessions-url http://127.0.0.1:7271 --messages-url http://127.0.0.1:7273 > $dir/c.log 2>&1 &
  pid[chats]=$!
  $N messages --listen 127.0.0.1:7173 --internal-listen 127.0.0.1:7273 --send-message-rate off --sessions-url http://127.0.0.1:7271 --chats-url http://127.0.0.1:7272 --metrics-listen 127.0.0.1:7373 > $dir/m.log 2>&1 &
  pid[messages]=$!
  $N edge --listen 127.0.0.1:7070 --sessions-url http://127.0.0.1:7171 --chats-url http://127.0.0.1:7172 --messages-url http://127.0.0.1:7173 > $dir/e.log 2>&1 &
  pid[edge]=$!
else
  $N serve --listen 127.0.0.1:7070 --create-user-rate off --create-session-rate off --create-chat-rate off --send-message-rate off --metrics-listen 127.0.0.1:7373 > $dir/n.log 2>&1 &
  pid[serve]=$!
fi
cleanup() {
  kill "${pid[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  for s in sessions chats messages; do q "DROP SCHEMA IF EXISTS ${P}$s CASCADE" >/dev/null 2>&1 || true; done
  q "alter database $DB reset log_statement" postgres >/dev/null || true
  q "alter database $DB reset log_parameter_max_length" postgres >/dev/null || true
  rm -rf $dir
}
trap cleanup EXIT
for _ in $(seq 1 100); do $N health --addr 127.0.0.1:7070 2>/dev/null && break; sleep 0.2; done
sleep 1
if [ -n "${SCENARIOS:-}" ]; then
  server_pid=${pid[messages]:-${pid[serve]:-}}
  # shellcheck disable=SC2086
  $B --target http://127.0.0.1:7070 --postgres --seed-postgres "$NATTER_DATABASE_URL" --schema ${P}messages \
    --server-pid $server_pid --scenarios "$SCENARIOS" ${BENCH_ARGS:-} > "${OUT:-/dev/stdout}"
  exit 0
fi
ticks() { awk '{print $14+$15}' /proc/$1/stat 2>/dev/null || echo 0; }
group_ticks() { local t=0; for p in $(pgrep -x "$1" || true); do t=$((t + $(ticks $p))); done; echo $t; }
bus_published() { curl -s 127.0.0.1:7373/metrics | awk '/^natter_bus_published_total /{print $2}'; }
statements() { grep -c "@$DB LOG:  \(statement\|execute\)" "$PGLOG" || true; }
# One line of counters: messages, WAL records, WAL bytes, transactions,
# statements, bus events published, then CPU ticks of each process.
snap() {
  local m w x
  m=$(q "select count(*) from ${P}messages.messages")
  w=$(q "select wal_records, wal_bytes from pg_stat_wal" | tr '|' ' ')
  x=$(q "select xact_commit from pg_stat_database where datname='$DB'")
  echo "$m $w $x $(statements) $(bus_published) $(for k in "${!pid[@]}"; do echo -n "$(ticks ${pid[$k]}) "; done)$(group_ticks postgres) $(group_ticks nats-server)"
}
run() {  # duration concurrency -> deltas of snap
  local a b
  a=$(snap)
  $B --target http://127.0.0.1:7070 --scenarios send --send-skip-ceiling-at-concurrency --send-concurrency $2 --duration $1 --warmup 100ms > $dir/bench.out 2> $dir/bench.err || { tail -20 $dir/bench.err; exit 1; }
  b=$(snap)
  python3 -c "a='$a'.split(); b='$b'.split(); print(' '.join(str(int(float(y))-int(float(x))) for x,y in zip(a,b)))"
}
names="${!pid[*]} postgres nats-server"
hz=$(getconf CLK_TCK)
echo "mode $MODE, cache ttl $CACHE_TTL"
for conc in $CONCURRENCY; do
  short=$(run 1s $conc)
  long=$(run 5s $conc)
  python3 - "$short" "$long" "$conc" "$names" "$hz" <<'PY'
import sys
s=list(map(int,sys.argv[1].split())); l=list(map(int,sys.argv[2].split()))
d=[b-a for a,b in zip(s,l)]
names=sys.argv[4].split(); hz=int(sys.argv[5])
n=d[0]
cpu=" ".join(f"{name} {d[6+i]*1e6/hz/n:.0f}" for i,name in enumerate(names))
total=sum(d[6+i] for i in range(len(names)))*1e6/hz/n
print(f"c={sys.argv[3]}: {n} messages more in the long run; per message: WAL records {d[1]/n:.2f}, WAL bytes {d[2]/n:.0f}, "
      f"transactions {d[3]/n:.2f}, statements {d[4]/n:.2f}, bus events published {d[5]/n:.2f}; "
      f"CPU µs: {cpu} (all natter + PostgreSQL + NATS: {total:.0f})")
PY
done
