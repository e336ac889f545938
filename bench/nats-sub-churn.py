#!/usr/bin/env python3
"""What per-topic NATS subscriptions cost the server (bench/README.md, SCALING.md).

Speaks the NATS text protocol over one raw socket (no client library in the
way): SUBs `natter.events.chat.<uuid>` for SUBS topics (a replica holding
10,000 streams of 20 chats each: 200,000), confirms with PING/PONG, then
UNSUBs them all, in rounds; reports SUB and UNSUB per second and the
nats-server's CPU per operation (from /proc/<pid>/stat, the server at
NATS_PID). Then the hashed-partition alternative for comparison: the same
chats fall into PARTITIONS subjects (natter.events.chat.<p>.*), so at most
PARTITIONS SUBs whatever the churn, at the price of receiving every event of
a partition.

  NATS=127.0.0.1:4222 NATS_PID=$(pgrep -o nats-server) SUBS=200000 ROUNDS=3 \\
    python3 bench/nats-sub-churn.py > bench/results/<name>/nats-sub-churn.json
"""
import json
import os
import socket
import sys
import time
import uuid

HOST, PORT = os.environ.get("NATS", "127.0.0.1:4222").rsplit(":", 1)
PID = int(os.environ["NATS_PID"])
SUBS = int(os.environ.get("SUBS", "200000"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def connect():
    s = socket.create_connection((HOST, int(PORT)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    assert f.readline().startswith(b"INFO")
    s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"name":"sub-churn"}\r\n')
    return s, f


def round_trip(s, f):
    s.sendall(b"PING\r\n")
    while True:
        line = f.readline()
        if line.startswith(b"PONG"):
            return
        assert not line.startswith(b"-ERR"), line


def timed(s, f, payload):
    c0, t0 = cpu_s(PID), time.perf_counter()
    for i in range(0, len(payload), 1 << 20):
        s.sendall(payload[i:i + (1 << 20)])
    round_trip(s, f)
    return time.perf_counter() - t0, cpu_s(PID) - c0


def main():
    s, f = connect()
    round_trip(s, f)
    subjects = [f"natter.events.chat.{uuid.uuid4()}" for _ in range(SUBS)]
    sub = "".join(f"SUB {subj} {i + 1}\r\n" for i, subj in enumerate(subjects)).encode()
    unsub = "".join(f"UNSUB {i + 1}\r\n" for i in range(SUBS)).encode()
    rounds = []
    for _ in range(ROUNDS):
        rss_before = rss_kib(PID)
        sub_wall, sub_cpu = timed(s, f, sub)
        rss_held = rss_kib(PID)
        unsub_wall, unsub_cpu = timed(s, f, unsub)
        rounds.append({
            "subs": SUBS,
            "sub_per_s": round(SUBS / sub_wall),
            "server_cpu_us_per_sub": round(sub_cpu * 1e6 / SUBS, 2),
            "unsub_per_s": round(SUBS / unsub_wall),
            "server_cpu_us_per_unsub": round(unsub_cpu * 1e6 / SUBS, 2),
            "server_rss_growth_bytes_per_sub": round((rss_held - rss_before) * 1024 / SUBS),
        })
    # Matching cost: a publish (to a subject nobody follows) with no
    # subscriptions held, then with SUBS of them in the server's sublist.
    pubs = 50_000
    pub = b"".join(b"PUB natter.events.chat.%s 0\r\n\r\n" % str(uuid.uuid4()).encode() for _ in range(pubs))
    publish = {}
    for held in (0, SUBS):
        if held:
            timed(s, f, sub)
        wall, cpu = timed(s, f, pub)
        publish[f"subs_held_{held}"] = {"publishes": pubs, "per_s": round(pubs / wall),
                                        "server_cpu_us_per_publish": round(cpu * 1e6 / pubs, 2)}
    timed(s, f, unsub)
    print(json.dumps({"scenario": "nats-sub-churn", "rounds": rounds, "publish": publish}))


if __name__ == "__main__":
    sys.exit(main())
