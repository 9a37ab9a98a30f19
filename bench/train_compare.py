#!/usr/bin/env python3
"""LoRA training throughput: brise against PyTorch + Hugging Face PEFT, side by side.

What is run
    The same job on both: SFT steps of a LoRA adapter (rank 16, alpha 32, on q, k, v,
    o, gate, up and down of every layer) on SmolLM2-135M, one sequence of 256 random
    token ids per step, the loss on every token after the first, AdamW (lr 2e-4),
    2 threads. A step is forward + backward + optimizer. Each engine runs in its own
    process per round, rounds interleaved (brise first in even rounds, PyTorch first in
    odd ones), so drift of this shared machine hits both. Each process reports its
    tokens/s over the measured steps (after one warm-up step) and its peak resident
    memory; the report gives medians, the ratio brise / PyTorch of the medians, and each
    round's own ratio (its two runs adjacent in time) with their median.

    brise: `cargo run --release -p brise-train --example train_bench` (the frozen base
    stays Q4_1, LoRA in f32, the engine's forward and the backward of
    brise-model/src/backward.rs).
    PyTorch: transformers loads the same GGUF with `gguf_file=` (dequantized to float32,
    as PEFT users run it on a CPU), eager attention, PEFT `get_peft_model`,
    `torch.optim.AdamW`, `torch.set_num_threads(threads)`.

Usage
    scripts/setup-train-reference.sh          # the PyTorch venv (.venv-train)
    python3 bench/train_compare.py [--rounds 3] [--steps 8] [--seq 256] [--threads 2] [--model GGUF]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("BRISE_HOME", Path.home() / ".brise")) / "models"
MODEL = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"

TORCH_JOB = r"""
import json, resource, sys, time
import torch, transformers
from peft import LoraConfig, get_peft_model
path, seq, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
from pathlib import Path
p = Path(path)
model = transformers.AutoModelForCausalLM.from_pretrained(
    p.parent, gguf_file=p.name, dtype=torch.float32, attn_implementation="eager")
cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
model = get_peft_model(model, cfg)
model.train()
opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=2e-4)
g = torch.Generator().manual_seed(12345)
vocab = model.config.vocab_size
def step():
    ids = torch.randint(0, vocab, (1, seq), generator=g)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
step()  # warm-up
t0 = time.perf_counter()
for _ in range(steps):
    step()
dt = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"tokens_per_s": steps * seq / dt, "peak_rss_mb": rss}))
"""


def run_brise(model, seq, steps, threads):
    exe = ROOT / "target" / "release" / "examples" / "train_bench"
    # One more step than measured: the example's first step is the warm-up here.
    out = subprocess.run([str(exe), str(model), str(seq), str(steps + 1), "16", str(threads), "--warmup"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_torch(py, model, seq, steps, threads):
    out = subprocess.run([py, "-c", TORCH_JOB, str(model), str(seq), str(steps), str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    # 8 steps a sample: on this host single steps vary by ±15%, so 4 were too few.
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=str(MODEL),
                    help="a GGUF both engines can load (default: SmolLM2-135M; "
                         "e.g. ~/.brise/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf)")
    ap.add_argument("--venv", default=os.environ.get("BRISE_TRAIN_VENV", str(ROOT / ".venv-train")))
    a = ap.parse_args()
    py = str(Path(a.venv) / "bin" / "python")
    if not Path(py).exists():
        sys.exit(f"error: no PyTorch venv at {a.venv}: run scripts/setup-train-reference.sh")
    model = Path(a.model).expanduser()
    if not model.exists():
        sys.exit(f"error: {model} missing: run `brise pull` for it (e.g. `brise pull smollm2:135m`)")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "brise-train", "--example", "train_bench"],
                   check=True, cwd=ROOT)
    res = {"brise": [], "pytorch": []}
    for r in range(a.rounds):
        order = ["brise", "pytorch"] if r % 2 == 0 else ["pytorch", "brise"]
        for eng in order:
            x = run_brise(model, a.seq, a.steps, a.threads) if eng == "brise" else run_torch(py, model, a.seq, a.steps, a.threads)
            res[eng].append(x)
            print(f"round {r} {eng:8s} {x['tokens_per_s']:8.1f} tokens/s  peak RSS {x['peak_rss_mb']:6.0f} MB", flush=True)
    med = {e: statistics.median(x["tokens_per_s"] for x in v) for e, v in res.items()}
    rss = {e: max(x["peak_rss_mb"] for x in v) for e, v in res.items()}
    print(f"\n{model.name}: LoRA r16 all 7 projections, seq {a.seq}, {a.threads} threads, {a.rounds} rounds x {a.steps} steps")
    for e in ("brise", "pytorch"):
        print(f"  {e:8s} median {med[e]:8.1f} tokens/s, peak RSS {rss[e]:6.0f} MB")
    print(f"  brise / PyTorch+PEFT: {med['brise'] / med['pytorch']:.2f}x")
    # Each round's two runs are adjacent in time, so their ratio sees the same drift of
    # this shared machine: the spread of these says how far one run can be trusted.
    pairs = sorted(b["tokens_per_s"] / t["tokens_per_s"] for b, t in zip(res["brise"], res["pytorch"]))
    print(f"  per-round ratios: {', '.join(f'{x:.2f}' for x in pairs)}"
          f" (median {statistics.median(pairs):.2f}x)")


if __name__ == "__main__":
    main()
