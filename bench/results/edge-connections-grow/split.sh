#!/bin/bash
# $1 = natter binary, $2 = tag; runs the split services (1 replica each) and natter-bench typing through the edge
N=$1; T=$2
export NATTER_DATABASE_URL=postgres://postgres@127.0.0.1:5432/natter
export NATTER_NATS_URL=nats://127.0.0.1:4222
[ -f /tmp/service-credential ] || (head -c 32 /dev/urandom | base64 > /tmp/service-credential && chmod 600 /tmp/service-credential)
export NATTER_SERVICE_CREDENTIAL_FILE=/tmp/service-credential
export NATTER_DATABASE_SCHEMA_PREFIX=natter_${T}_
L=/tmp/split-$T; mkdir -p $L
R=1000000000/1s
$N sessions --create-session-rate $R --create-user-rate $R --listen 127.0.0.1:7171 --internal-listen 127.0.0.1:7271 > $L/sessions.log 2>&1 &
P1=$!
$N chats --create-chat-rate $R --listen 127.0.0.1:7172 --internal-listen 127.0.0.1:7272 --sessions-url http://127.0.0.1:7271 --messages-url http://127.0.0.1:7273 > $L/chats.log 2>&1 &
P2=$!
$N messages --send-message-rate $R --edit-message-rate $R --stream-open-rate $R --typing-rate $R --reaction-rate $R --search-rate $R --max-streams-per-user 1000000 --listen 127.0.0.1:7173 --internal-listen 127.0.0.1:7273 --sessions-url http://127.0.0.1:7271 --chats-url http://127.0.0.1:7272 > $L/messages.log 2>&1 &
P3=$!
$N edge --listen 127.0.0.1:7070 --sessions-url http://127.0.0.1:7171 --chats-url http://127.0.0.1:7172 --messages-url http://127.0.0.1:7173 > $L/edge.log 2>&1 &
P4=$!
for i in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/7070) 2>/dev/null && (echo > /dev/tcp/127.0.0.1/7173) 2>/dev/null && break; sleep 0.2; done
sleep 1
( while kill -0 $P3 2>/dev/null; do echo "$(date +%s) $(awk '{print $14+$15}' /proc/$P3/stat) $(grep syscw /proc/$P3/io | awk '{print $2}') $(awk '{print $14+$15}' /proc/$P4/stat)"; sleep 1; done ) > $L/proc.log 2>/dev/null &
[ "$PIDSEL" = edge ] && PIDSEL=$P4
/tmp/base/natter-bench --postgres --target http://127.0.0.1:7070 --server-pid ${PIDSEL:-$P3} ${SCEN:---scenarios ceiling,typing --event-streams-per-connection 1} $EXTRA > /tmp/split-$T.json 2> /tmp/split-$T.err
kill $P4 $P3 $P2 $P1; wait $P1 $P2 $P3 $P4 2>/dev/null
grep -E "^typing|^ceiling" /tmp/split-$T.err | cut -c1-230
awk 'NR>1{print $1, $2-pt, $3-pw, $4-pe} {pt=$2; pw=$3; pe=$4}' $L/proc.log | tr '\n' ';'; echo
