#!/usr/bin/env python3
"""The sweep behind brise's training defaults (issue 18): for each learning scenario of
tests/sdk/scenarios.py, serve a model by path, ask the train questions and correct every
answer through the public API, then train with each configuration (`brise train
--from-ledger --model PATH --no-promote` plus the configuration's flags; "default" is no
flags at all) and measure, on held-out questions never trained on, the share of
temperature-0 answers that follow the scenario's rule, before and after. Also reports
what the gate said (passed or not, chrF to the held-out corrections, perplexity).

  python3 bench/learn_sweep.py --model ~/.brise/models/SmolLM2-135M-Instruct.Q4_1.gguf
  python3 bench/learn_sweep.py --model M --scenarios json,french \\
      --config default --config "--lr 2e-4 --epochs 3 --batch-size 8"

Prints one row per (scenario, configuration) and a Markdown table at the end
(docs/PERFORMANCE.md, "Learning defaults"). Takes about 2 minutes per row at 135M on
2 cores, so it is a benchmark, not a CI test.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "sdk"))
import scenarios as S  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a .gguf file or model directory (served by path)")
    ap.add_argument("--scenarios", default=",".join(S.SCENARIOS), help="comma-separated: " + ", ".join(S.SCENARIOS) + ", noise")
    ap.add_argument("--config", action="append", help='flags for brise train, or "default" (repeatable)')
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", help="keep the homes under this directory")
    a = ap.parse_args()
    configs = a.config or ["default"]
    rows = []
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="brise-sweep-"))
    for name in a.scenarios.split(","):
        noise = name == "noise"
        sc = S.SCENARIOS["signature" if noise else name]
        home = root / f"{name}-{int(time.time())}"
        srv = S.Server(home, a.model, threads=a.threads)
        try:
            with httpx.Client(timeout=600, trust_env=False) as c:
                before, _ = S.share(c, srv, srv.id, sc.held_out, sc.rule)
                if noise:
                    base = [S.ask(c, srv.url, srv.id, q, 60)["choices"][0]["message"]["content"] for q in sc.train]
                    S.give_feedback(c, srv, sc, S.noise(base))
                else:
                    S.give_feedback(c, srv, sc)
                for cfg in configs:
                    flags = [] if cfg == "default" else shlex.split(cfg)
                    t = S.train(srv, a.model, ["--no-promote", "-t", str(a.threads), *flags])
                    rep = S.report(home, t["version"])
                    after, answers = S.share(c, srv, f"{srv.id}:{t['version']}", sc.held_out, sc.rule)
                    beh = rep.get("behaviour") or {}
                    ppl = (rep["current"]["metrics"]["ppl"], rep["candidate"]["metrics"]["ppl"])
                    steps = next((l for l in t["stderr"].splitlines() if l.startswith("trained ")), "")
                    row = {
                        "scenario": name, "config": cfg, "before": before, "after": after,
                        "gate": "pass" if rep["passed"] else "fail",
                        "chrf": (beh.get("current_chrf"), beh.get("candidate_chrf")),
                        "ppl": ppl, "train": steps, "seconds": t["seconds"],
                        "example": answers[0][:100],
                    }
                    rows.append(row)
                    print(f"{name:10} {cfg:40} {before:4.0%} -> {after:4.0%}  gate {row['gate']}  "
                          f"chrF {fmt(row['chrf'][0])} -> {fmt(row['chrf'][1])}  ppl {ppl[0]:.3f} -> {ppl[1]:.3f}  "
                          f"{t['seconds']:.0f} s  {steps}", flush=True)
                    print(f"           e.g. {answers[0][:120]!r}", flush=True)
        finally:
            srv.stop()
    print("\n| scenario | configuration | held-out rule before | after | gate | chrF current → candidate | perplexity | seconds |")
    print("|---|---|---:|---:|---|---|---|---:|")
    for r in rows:
        print(f"| {r['scenario']} | `{r['config']}` | {r['before']:.0%} | {r['after']:.0%} | {r['gate']} | "
              f"{fmt(r['chrf'][0])} → {fmt(r['chrf'][1])} | {r['ppl'][0]:.3f} → {r['ppl'][1]:.3f} | {r['seconds']:.0f} |")
    return 0


def fmt(x) -> str:
    return "–" if x is None else f"{x:.1f}"


if __name__ == "__main__":
    sys.exit(main())
