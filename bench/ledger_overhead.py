#!/usr/bin/env python3
"""What recording costs: median request latency of `brise serve` with the ledger on
and off, interleaved, for small chat requests (1 generated token, so recording is a
large share), sequential and with concurrent clients (group commit).

    python3 bench/ledger_overhead.py [--requests 200] [--rounds 3] [--conc 1,8] [--postgres URL]

With --postgres (a server URL without a database, e.g. what scripts/postgres.sh start
prints), "on" records to a fresh PostgreSQL database there instead of a SQLite file.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import http.client
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(ledger: str, args) -> dict[int, float]:
    port = free_port()
    proc = subprocess.Popen([str(ROOT / "target/release/brise"), "serve", args.model, "--port", str(port),
                             "-t", "2", "--parallel", "8", "--ledger", ledger],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        body = json.dumps({"model": args.model, "messages": [{"role": "user", "content": "Hi"}],
                           "max_tokens": 1, "temperature": 0}).encode()

        def one(_):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            t0 = time.perf_counter()
            c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            assert r.status == 200
            return time.perf_counter() - t0

        for _ in range(20):
            one(0)
        out = {}
        for conc in args.conc:
            with cf.ThreadPoolExecutor(conc) as ex:
                lat = list(ex.map(one, range(args.requests)))
            out[conc] = statistics.median(lat)
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conc", default="1,8")
    ap.add_argument("--postgres", help="record to a fresh database on this PostgreSQL server")
    args = ap.parse_args()
    args.conc = [int(c) for c in args.conc.split(",")]
    res = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            for mode in (["off", "on"] if r % 2 == 0 else ["on", "off"]):
                if mode == "off":
                    ledger = "off"
                elif args.postgres:
                    ledger = f"{args.postgres.rstrip('/')}/brise_overhead_{int(time.time())}_{r}"
                else:
                    ledger = str(Path(d) / "ledger.sqlite")
                res[mode].append(run(ledger, args))
                print(f"round {r} ledger {mode}: " + ", ".join(
                    f"{c} clients {res[mode][-1][c] * 1e3:.2f} ms" for c in args.conc), file=sys.stderr)
    backend = "PostgreSQL" if args.postgres else "SQLite"
    print(f"median request latency, {args.requests} requests of 1 token, {args.rounds} rounds (median of rounds), ledger on {backend}\n")
    print("| clients | ledger off | ledger on | recording adds |")
    print("|---|---|---|---|")
    for c in args.conc:
        off = statistics.median(x[c] for x in res["off"]) * 1e3
        on = statistics.median(x[c] for x in res["on"]) * 1e3
        print(f"| {c} | {off:.2f} ms | {on:.2f} ms | {on - off:+.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
