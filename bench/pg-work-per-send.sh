#!/usr/bin/env bash
# What PostgreSQL does per message sent, in split mode (one replica of each
# service, on the database `test` at 127.0.0.1:5432 and NATS at :4222):
# natter-bench's `send` runs twice per concurrency (1 s and 5 s windows) and
# the differences of pg_stat_wal, pg_stat_database.xact_commit (read-only
# transactions included) and the messages table's row count between the two
# runs give the work per message, with the runs' own setup cancelled out.
# Counts, not times: a debug build gives the same figures.
#   N=target/release/natter B=target/release/natter-bench bench/pg-work-per-send.sh
set -euo pipefail
N=${N:-target/release/natter}
B=${B:-target/release/natter-bench}
dir=$(mktemp -d)
head -c 32 /dev/urandom | base64 > $dir/cred
export NATTER_SERVICE_CREDENTIAL_FILE=$dir/cred
export NATTER_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test
export NATTER_NATS_URL=nats://127.0.0.1:4222
export NATTER_DATABASE_SCHEMA_PREFIX=pw${RANDOM}_
export RUST_LOG=warn
$N sessions --listen 127.0.0.1:7171 --internal-listen 127.0.0.1:7271 --create-user-rate off --create-session-rate off > $dir/s.log 2>&1 &
$N chats --listen 127.0.0.1:7172 --internal-listen 127.0.0.1:7272 --create-chat-rate off --sessions-url http://127.0.0.1:7271 --messages-url http://127.0.0.1:7273 > $dir/c.log 2>&1 &
$N messages --listen 127.0.0.1:7173 --internal-listen 127.0.0.1:7273 --send-message-rate off --sessions-url http://127.0.0.1:7271 --chats-url http://127.0.0.1:7272 > $dir/m.log 2>&1 &
$N edge --listen 127.0.0.1:7070 --sessions-url http://127.0.0.1:7171 --chats-url http://127.0.0.1:7172 --messages-url http://127.0.0.1:7173 > $dir/e.log 2>&1 &
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  for s in sessions chats messages; do
    psql -h 127.0.0.1 -U postgres -d test -qAtc "DROP SCHEMA IF EXISTS ${NATTER_DATABASE_SCHEMA_PREFIX}$s CASCADE" >/dev/null 2>&1 || true
  done
}
trap cleanup EXIT
for _ in $(seq 1 100); do $N health --addr 127.0.0.1:7070 2>/dev/null && break; sleep 0.2; done
sleep 1
q() { psql -h 127.0.0.1 -U postgres -d test -Atc "$1"; }
P=${NATTER_DATABASE_SCHEMA_PREFIX}
snap() {
  local w x m
  w=$(q "select wal_records, wal_bytes, wal_fpi from pg_stat_wal" | tr '|' ' ')
  x=$(q "select xact_commit from pg_stat_database where datname='test'")
  m=$(q "select count(*) from ${P}messages.messages")
  echo "$w $x $m"
}
run() {  # duration concurrency -> deltas: wal_records wal_bytes fpi xacts messages
  local a b
  a=$(snap)
  $B --target http://127.0.0.1:7070 --scenarios send --send-concurrency $2 --duration $1 --warmup 100ms > $dir/bench.out 2> $dir/bench.err || { tail -20 $dir/bench.err; exit 1; }
  b=$(snap)
  python3 -c "a='$a'.split(); b='$b'.split(); print(' '.join(str(int(float(y))-int(float(x))) for x,y in zip(a,b)))"
}
for conc in 1 64; do
  short=$(run 1s $conc)
  long=$(run 5s $conc)
  python3 - "$short" "$long" "$conc" <<'PY'
import sys
s=list(map(int,sys.argv[1].split())); l=list(map(int,sys.argv[2].split()))
d=[b-a for a,b in zip(s,l)]
n=d[4]
print(f"c={sys.argv[3]}: {n} messages more in the long run; per message: WAL records {d[0]/n:.2f}, WAL bytes {d[1]/n:.0f}, full-page images {d[2]/n:.3f}, transactions {d[3]/n:.2f}")
PY
done
