#!/usr/bin/env python3
"""Which model should `scripts/chat.sh` and `brise run` start with? Answer quality on
everyday questions against speed on this machine, for each model `brise pull` knows.

For each model it starts the real server (`brise serve MODEL -t THREADS --ledger off`,
one slot) and sends every question of bench/everyday_questions.json to the
OpenAI-compatible /v1/chat/completions, streamed, with the model's chat template and its
default sampling except temperature 0 (greedy: reproducible). An answer passes when one
of the question's `accept` regexes matches it and no `reject` regex does (plus list and
line counts where a question asks for them). Speed, all measured on the client:

  TTFT      median time to the first streamed token over the questions
  gen t/s   generated tokens after the first ÷ time from the first token to the last,
            summed over all questions (usage.completion_tokens from the server)
  pp t/s    prompt tokens ÷ time to the first token, for one ~500-token prompt
            (best of 2 runs)
  peak RSS  the server's VmHWM after the run
  CPU share the server's CPU time during the questions ÷ (wall time × THREADS): on a
            shared machine, how much of its cores it got (speeds scale with it)
  load avg  the 1-minute load average, mean of before and after the model's run

With --train MODEL[,MODEL] it also times what the learning loop behind chat.sh does:
`brise train` (SFT, LoRA rank 16, batch 2) for a few steps on a tiny dataset at
`-t 1` (chat.sh's --learn-threads 1), in a scratch BRISE_HOME, nothing promoted.

    nice -n 10 python3 bench/default_model.py                    # every known model, -t 2
    nice -n 10 python3 bench/default_model.py --models smollm2:135m --threads 1
    nice -n 10 python3 bench/default_model.py --train qwen2.5-coder:0.5b

Prints a Markdown table; the answers and timings go to bench/out/default-model-<stamp>.json.
Models not pulled yet are skipped (`brise pull NAME` first) so that this never starts a
download by itself.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ROOT / "bench" / "everyday_questions.json"

# ~500 tokens of plain text for the prompt-speed measurement.
LONG_PROMPT = (
    "Summarize the following notes in one sentence.\n\n"
    + " ".join(
        f"Note {i}: the weekly team meeting moved from Monday to Tuesday at ten, the"
        " budget review is due at the end of the month, and the new printer on the"
        " second floor needs a driver update before anyone can use it."
        for i in range(1, 14)
    )
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def known_models(brise: str) -> tuple[list[str], list[str]]:
    """(pulled, not pulled) known model names, from `brise list`."""
    r = subprocess.run([brise, "list"], capture_output=True, text=True, check=True)
    pulled = []
    for line in r.stdout.splitlines()[1:]:
        name = line.split()[0] if line.strip() else ""
        if ":" in name:  # known models show their name; other files their file name
            pulled.append(name)
    missing = []
    after = False
    for line in r.stderr.splitlines():
        if "brise pull" in line:
            after = True
        elif after and line.strip():
            missing.append(line.split()[0])
    return pulled, missing


def score(q: dict, answer: str) -> bool:
    a = answer.strip()
    flags = re.IGNORECASE
    if not any(re.search(p, a, flags) for p in q["accept"]):
        return False
    if any(re.search(p, a, flags | re.MULTILINE) for p in q.get("reject", [])):
        return False
    if q.get("list3"):
        items = re.findall(r"^\s*(?:\d+[.)]|[-*•])\s+\S", a, re.MULTILINE)
        if len(items) < 3:
            return False
    if "min_distinct" in q:
        md = q["min_distinct"]
        found = {m.lower() for m in re.findall(md["pattern"], a, flags)}
        if len(found) < md["count"]:
            return False
    if "min_lines" in q:
        if len([x for x in a.splitlines() if x.strip()]) < q["min_lines"]:
            return False
    return True


class Server:
    def __init__(self, brise: str, model: str, threads: int, ctx: int, log: Path):
        self.port = free_port()
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [brise, "serve", model, "--port", str(self.port), "-t", str(threads),
             "-p", "1", "-c", str(ctx), "--ledger", "off"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"brise serve {model} exited; see {log}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"brise serve {model} not healthy in 300 s; see {log}")

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server has used so far."""
        f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def chat(self, model: str, content: str, max_tokens: int) -> dict:
        body = json.dumps({
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        })
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=900)
        t0 = time.perf_counter()
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
        text, first, last, usage, finish = [], None, None, None, None
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices", []):
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text.append(piece)
                if ch.get("finish_reason"):
                    finish = ch["finish_reason"]
        t_end = time.perf_counter()
        return {
            "answer": "".join(text),
            "ttft": (first or t_end) - t0,
            "decode_s": (last or t_end) - (first or t_end),
            "prompt_tokens": (usage or {}).get("prompt_tokens"),
            "completion_tokens": (usage or {}).get("completion_tokens"),
            "finish_reason": finish,
            "total_s": t_end - t0,
        }


def bench_model(brise, model, qs, args, outdir) -> dict:
    print(f"## {model}: starting brise serve -t {args.threads}", file=sys.stderr)
    load0 = os.getloadavg()[0]
    srv = Server(brise, model, args.threads, args.ctx, outdir / f"serve-{model.replace(':', '_')}.log")
    try:
        srv.chat(model, "Hi", 4)  # warm-up: first-touch of the weights
        pp = []
        for _ in range(2):
            r = srv.chat(model, LONG_PROMPT, 1)
            pp.append(r["prompt_tokens"] / r["ttft"])
        rows = []
        cpu0, wall0 = srv.cpu_s(), time.perf_counter()
        for q in qs:
            mt = q.get("max_tokens", args.max_tokens_list if q.get("list3") else args.max_tokens)
            r = srv.chat(model, q["q"], mt)
            r["id"] = q["id"]
            r["pass"] = score(q, r["answer"])
            rows.append(r)
            mark = "PASS" if r["pass"] else "fail"
            short = r["answer"].strip().replace("\n", " ")[:90]
            print(f"  {mark} {q['id']:<20} {r['completion_tokens']:>4} tok  {short}", file=sys.stderr)
        share = (srv.cpu_s() - cpu0) / (time.perf_counter() - wall0) / args.threads
        rss = srv.peak_rss_mb()
    finally:
        srv.stop()
    gen_tok = sum(max(0, (r["completion_tokens"] or 0) - 1) for r in rows)
    gen_s = sum(r["decode_s"] for r in rows)
    return {
        "model": model,
        "passed": sum(r["pass"] for r in rows),
        "total": len(rows),
        "ttft_median_s": statistics.median(r["ttft"] for r in rows),
        "gen_tps": gen_tok / gen_s if gen_s > 0 else float("nan"),
        "pp_tps": max(pp),
        "peak_rss_mb": rss,
        "cpu_share": share,
        "load": (load0 + os.getloadavg()[0]) / 2,
        "answers": rows,
    }


def bench_train(brise: str, model: str, args, outdir: Path) -> dict:
    """A short `brise train` at -t 1, timed: steps/s of the learning loop's work."""
    path = subprocess.run([brise, "list"], capture_output=True, text=True, check=True).stdout
    file = next((ln.split()[-1] for ln in path.splitlines() if ln.split() and ln.split()[0] == model), None)
    if file is None:
        raise RuntimeError(f"{model} is not pulled")
    pairs = [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("What is 12 times 12?", "12 times 12 is 144."),
        ("Which planet is the largest?", "Jupiter is the largest planet in the solar system."),
        ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
        ("How many legs does a spider have?", "A spider has eight legs."),
        ("What is the opposite of hot?", "The opposite of hot is cold."),
        ("How do you say thank you in Spanish?", "Thank you in Spanish is gracias."),
        ("What gas do plants absorb?", "Plants absorb carbon dioxide for photosynthesis."),
        ("How many days are in a week?", "A week has seven days."),
        ("What is water made of?", "Water is H2O: two hydrogen atoms and one oxygen atom."),
    ]
    with tempfile.TemporaryDirectory() as home:
        data = Path(home) / "sft.jsonl"
        with open(data, "w") as f:
            for p, c in pairs:
                f.write(json.dumps({"prompt": [{"role": "user", "content": p}],
                                    "completion": [{"role": "assistant", "content": c}]}) + "\n")
        env = dict(os.environ, BRISE_HOME=home)
        cmd = [brise, "train", "--model", file, "--data", str(data), "--format", "trl-sft",
               "--method", "sft", "--batch-size", "2", "--max-steps", str(args.train_steps),
               "-t", "1", "--no-promote", "--ledger", str(Path(home) / "ledger.sqlite")]
        print(f"## {model}: {' '.join(cmd[1:])}", file=sys.stderr)
        t0 = time.perf_counter()
        r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        (outdir / f"train-{model.replace(':', '_')}.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            raise RuntimeError(f"brise train failed ({r.returncode}); see bench/out")
        rss = next((int(ln.split()[-1]) / 1024 for ln in r.stderr.splitlines()
                    if "Maximum resident set size" in ln), float("nan"))
    return {"model": model, "steps": args.train_steps, "wall_s": wall, "peak_rss_mb": rss}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brise", default=str(ROOT / "target" / "release" / "brise"))
    ap.add_argument("--models", help="comma-separated (default: every known model that is pulled)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=96, help="per answer [96]")
    ap.add_argument("--max-tokens-list", type=int, default=192, help="per 'three tips' answer [192]")
    ap.add_argument("--limit", type=int, help="only the first N questions")
    ap.add_argument("--train", default="", help="models to time `brise train` on (comma-separated)")
    ap.add_argument("--train-steps", type=int, default=3)
    args = ap.parse_args()

    qs = json.loads(QUESTIONS.read_text())["questions"][: args.limit]
    pulled, missing = known_models(args.brise)
    models = args.models.split(",") if args.models else pulled
    for m in missing:
        if not args.models:
            print(f"skipping {m}: not pulled (`brise pull {m}`)", file=sys.stderr)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    outdir = ROOT / "bench" / "out"
    outdir.mkdir(parents=True, exist_ok=True)

    results = [bench_model(args.brise, m, qs, args, outdir) for m in models]
    trains = [bench_train(args.brise, m, args, outdir) for m in args.train.split(",") if m]

    print(f"| model | everyday questions passed | TTFT median (s) | gen t/s | pp t/s | peak RSS (MB) | CPU share | load avg |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['passed']}/{r['total']} | {r['ttft_median_s']:.2f} | "
              f"{r['gen_tps']:.1f} | {r['pp_tps']:.0f} | {r['peak_rss_mb']:.0f} | {r['cpu_share']:.0%} | {r['load']:.1f} |")
    if trains:
        print()
        print("| model | `brise train` -t 1, SFT, batch 2 | wall (s) | s per step (incl. load + gate) | peak RSS (MB) |")
        print("|---|---:|---:|---:|---:|")
        for t in trains:
            print(f"| {t['model']} | {t['steps']} steps | {t['wall_s']:.0f} | "
                  f"{t['wall_s'] / t['steps']:.0f} | {t['peak_rss_mb']:.0f} |")
    out = outdir / f"default-model-{stamp}.json"
    out.write_text(json.dumps({"threads": args.threads, "results": results, "train": trains}, indent=1))
    print(f"\n(answers and timings: {out.relative_to(ROOT)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
