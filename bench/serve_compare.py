#!/usr/bin/env python3
"""Serving throughput: `brise serve` vs llama.cpp's `llama-server`, side by side.

For each round, each engine in turn (the order alternates between rounds) is started
on the same GGUF file with the same threads, slots and context, and driven with
streaming /v1/completions requests at each concurrency level: every client sends its
requests one after another. Reported per engine and level, as vLLM's serving benchmark
reports them: aggregate generated tokens/s (all tokens ÷ wall time), time to first
token and inter-token latency percentiles. Tokens are counted from each response's
`usage` (`stream_options.include_usage`), not from SSE chunks: an engine may put several
tokens in one chunk, or send chunks without a token. Then the ratios the server issue asks for:
brise at 8 streams ÷ brise at 1 stream, and brise ÷ llama-server at 8 streams.

Greedy decoding: both engines compute the same tokens (brise reproduces llama.cpp's
arithmetic), so they do the same work; the texts of both engines' answers to each
prompt are compared and the number that differ is reported (llama-server's batched
kernels may legitimately change a token at several streams; a difference at one stream
means the engines did not do the same work). llama-server runs with `-fa off` (brise has
no flash attention; llama-server's CPU default is on).

    python3 bench/serve_compare.py                       # smollm2, 1 and 8 streams, 3 rounds
    python3 bench/serve_compare.py --model qwen2.5-coder --rounds 2
    python3 bench/serve_compare.py --llama-server PATH --no-build

Builds brise (cargo) and llama-server (bench/llamacpp.sh with LLAMA_TARGET=llama-server)
unless told where they are. Results also go to bench/out/serve-<stamp>.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KNOWN = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2.5-coder": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
}
PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The history of the Roman Empire begins",
    "def quicksort(arr):\n",
    "Here is a recipe for a chocolate cake:\n",
    "The three laws of thermodynamics are",
    "In a distant galaxy, a young pilot",
    "The best way to learn a new language is",
    "Dear diary, today I",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_path(name: str) -> Path:
    p = Path(name)
    if p.exists():
        return p
    home = Path(os.environ.get("BRISE_HOME", Path.home() / ".brise"))
    return home / "models" / KNOWN.get(name, name)


def wait_health(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not healthy in time")


def one_request(port: int, model: str, prompt: str, max_tokens: int) -> dict:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    times = []
    text = []
    usage = None
    buf = b""
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            for line in ev.split(b"\n"):
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    continue
                d = json.loads(data)
                if d.get("usage"):
                    usage = d["usage"]
                if d.get("choices") and d["choices"][0].get("text"):
                    times.append(time.perf_counter())
                    text.append(d["choices"][0]["text"])
    end = time.perf_counter()
    if not usage or "completion_tokens" not in usage:
        raise RuntimeError("the stream ended without usage.completion_tokens "
                           "(stream_options.include_usage)")
    return {"ttft": times[0] - t0 if times else None,
            "itl": [b - a for a, b in zip(times, times[1:])],
            "chunks": len(times), "tokens": usage["completion_tokens"],
            "prompt": prompt, "text": "".join(text), "latency": end - t0}


def drive(port: int, model: str, conc: int, per_client: int, max_tokens: int) -> dict:
    def client(i: int):
        return [one_request(port, model, PROMPTS[(i + k) % len(PROMPTS)], max_tokens) for k in range(per_client)]

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(conc) as ex:
        results = [x for xs in ex.map(client, range(conc)) for x in xs]
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    itl = sorted(x for r in results for x in r["itl"])

    def pct(v, q):
        return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")

    return {"conc": conc, "requests": len(results), "tokens": tokens, "wall": wall,
            "chunks": sum(r["chunks"] for r in results),
            "texts": {r["prompt"]: r["text"] for r in results},
            "tps": tokens / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p90": pct(ttft, 0.9),
            "itl_p50": pct(itl, 0.5), "itl_p90": pct(itl, 0.9), "itl_p99": pct(itl, 0.99)}


def start(engine: str, args, gguf: Path, port: int, log: Path) -> subprocess.Popen:
    ctx = str(args.parallel * args.slot_ctx)
    if engine == "brise":
        cmd = [args.brise, "serve", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-t", str(args.threads), "--parallel", str(args.parallel), "-c", ctx]
    else:
        cmd = [args.llama_server, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-t", str(args.threads), "-np", str(args.parallel), "-c", ctx, "-fa", "off",
               "--no-webui"]
    f = open(log, "ab")
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--slot-ctx", type=int, default=1024)
    ap.add_argument("--conc", default="1,8", help="concurrency levels")
    ap.add_argument("--per-client", type=int, default=3, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--brise", default=str(ROOT / "target/release/brise"))
    ap.add_argument("--llama-server")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()

    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "brise-cli"], cwd=ROOT, check=True)
    if not args.llama_server:
        env = {**os.environ, "LLAMA_TARGET": "llama-server"}
        args.llama_server = subprocess.run([str(ROOT / "bench/llamacpp.sh")], env=env, check=True,
                                           capture_output=True, text=True).stdout.strip().splitlines()[-1]
    gguf = model_path(args.model)
    if not gguf.exists():
        print(f"{gguf} not found (brise pull {args.model})", file=sys.stderr)
        return 1
    out_dir = ROOT / "bench/out"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    log = out_dir / f"serve-{stamp}.log"
    levels = [int(c) for c in args.conc.split(",")]
    samples = []
    for rnd in range(args.rounds):
        engines = ["brise", "llama-server"] if rnd % 2 == 0 else ["llama-server", "brise"]
        for eng in engines:
            port = free_port()
            proc = start(eng, args, gguf, port, log)
            try:
                wait_health(port, proc)
                drive(port, gguf.stem, 1, 1, 16)  # warm-up
                for c in levels:
                    r = drive(port, gguf.stem, c, args.per_client, args.max_tokens)
                    r.update(engine=eng, round=rnd)
                    samples.append(r)
                    print(f"round {rnd} {eng:12s} conc {c}: {r['tps']:7.1f} t/s  "
                          f"TTFT p50 {r['ttft_p50'] * 1e3:6.0f} ms  ITL p50 {r['itl_p50'] * 1e3:5.1f} ms",
                          file=sys.stderr)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def med(eng, c, key):
        return statistics.median(s[key] for s in samples if s["engine"] == eng and s["conc"] == c)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [f"model {gguf.name}, {args.threads} threads, {args.parallel} slots of {args.slot_ctx}, "
             f"{args.max_tokens} tokens/request, {args.per_client} requests/client, {args.rounds} rounds, "
             f"brise {commit}, {stamp}", "",
             "| engine | streams | tokens/s | TTFT p50 | TTFT p90 | ITL p50 | ITL p90 | ITL p99 |",
             "|---|---|---|---|---|---|---|---|"]
    for eng in ("brise", "llama-server"):
        for c in levels:
            lines.append(f"| {eng} | {c} | {med(eng, c, 'tps'):.1f} | {med(eng, c, 'ttft_p50') * 1e3:.0f} ms | "
                         f"{med(eng, c, 'ttft_p90') * 1e3:.0f} ms | {med(eng, c, 'itl_p50') * 1e3:.1f} ms | "
                         f"{med(eng, c, 'itl_p90') * 1e3:.1f} ms | {med(eng, c, 'itl_p99') * 1e3:.1f} ms |")
    # The same prompt, the same greedy answer? Per round and level, brise against
    # llama-server.
    same = differ = 0
    first_diff = None
    for s in samples:
        if s["engine"] != "brise":
            continue
        other = next(o for o in samples if o["engine"] == "llama-server"
                     and o["round"] == s["round"] and o["conc"] == s["conc"])
        for prompt, text in s["texts"].items():
            if other["texts"].get(prompt) == text:
                same += 1
            else:
                differ += 1
                if first_diff is None:
                    first_diff = (s["conc"], prompt, text, other["texts"].get(prompt))
    hi, lo = max(levels), min(levels)
    lines += ["",
              f"texts: {same} of {same + differ} answers identical between the engines"
              + (f"; first difference at {first_diff[0]} streams, prompt {first_diff[1]!r}: "
                 f"brise {first_diff[2][:80]!r} vs llama-server {(first_diff[3] or '')[:80]!r}"
                 if first_diff else ""),
              f"brise {hi} streams ÷ brise {lo} stream: {med('brise', hi, 'tps') / med('brise', lo, 'tps'):.2f}× (target ≥ 2)",
              f"brise ÷ llama-server at {hi} streams: {med('brise', hi, 'tps') / med('llama-server', hi, 'tps'):.2f}× (target ≥ 1.5)",
              f"brise ÷ llama-server at {lo} stream: {med('brise', lo, 'tps') / med('llama-server', lo, 'tps'):.2f}×"]
    print("\n".join(lines))
    (out_dir / f"serve-{stamp}.json").write_text(json.dumps({"args": vars(args), "samples": samples,
                                                             "summary": lines}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
