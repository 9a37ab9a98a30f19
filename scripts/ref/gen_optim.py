#!/usr/bin/env python3
"""Reference steps of the optimizer pieces, from PyTorch and transformers:
torch.optim.AdamW (single-tensor, foreach=False), torch.nn.utils.clip_grad_norm_, and
transformers.get_cosine_schedule_with_warmup.

Output: tests/fixtures/train/optim.json. Run with the training reference venv
(scripts/setup-train-reference.sh):  .venv-train/bin/python scripts/ref/gen_optim.py
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
import transformers
from transformers import get_cosine_schedule_with_warmup

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "train" / "optim.json"


def f32_list(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.detach().to(torch.float32).flatten().tolist()]


def main() -> None:
    g = torch.Generator().manual_seed(1234)
    n = 64
    p0 = torch.randn(n, generator=g, dtype=torch.float32)
    grads = [torch.randn(n, generator=g, dtype=torch.float32) * (0.1 + i) for i in range(5)]
    lrs = [1e-3, 2e-3, 5e-4, 1e-2, 3e-3]
    cfg = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=lrs[0], foreach=False, fused=False, **cfg)
    steps = []
    for gr, lr in zip(grads, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        p.grad = gr.clone()
        opt.step()
        steps.append({"lr": lr, "grad": f32_list(gr), "param_after": f32_list(p)})

    # Clipping over two tensors: once above the limit, once below.
    a = torch.randn(30, generator=g) * 3.0
    b = torch.randn(20, generator=g) * 3.0
    clips = []
    for max_norm in (1.0, 1000.0):
        ta, tb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
        ta.grad, tb.grad = a.clone(), b.clone()
        norm = torch.nn.utils.clip_grad_norm_([ta, tb], max_norm)
        clips.append({"max_norm": max_norm, "a": f32_list(a), "b": f32_list(b), "norm": float(norm),
                      "a_after": f32_list(ta.grad), "b_after": f32_list(tb.grad)})

    sched = []
    for warmup, total in ((10, 100), (0, 7), (3, 3)):
        q = torch.nn.Parameter(torch.zeros(1))
        o = torch.optim.SGD([q], lr=1.0)
        s = get_cosine_schedule_with_warmup(o, num_warmup_steps=warmup, num_training_steps=total)
        mult = []
        for _ in range(total + 2):
            mult.append(o.param_groups[0]["lr"])
            o.step()
            s.step()
        sched.append({"warmup": warmup, "total": total, "multipliers": mult})

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "generator": {
            "script": "scripts/ref/gen_optim.py",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "call": "torch.optim.AdamW(lr per step, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, "
                    "foreach=False, fused=False); clip_grad_norm_; get_cosine_schedule_with_warmup",
        },
        "adamw": {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
                  "param0": f32_list(p0), "steps": steps},
        "clip": clips,
        "schedule": sched,
    }, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
