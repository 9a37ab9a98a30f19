#!/usr/bin/env python3
"""LoRA reference fixtures from PyTorch + PEFT -> tests/fixtures/lora/.

Run with the training venv (scripts/setup-train-reference.sh), from the repo root:

    cargo run --release -p brise-model --example save_lora   # writes lora/brise-saved/*
    .venv-train/bin/python scripts/ref/gen_lora.py

1. For the tiny Mistral (HF dir) and SmolLM2 (its GGUF, which transformers dequantizes to
   float32 and un-permutes to HF layout), build PEFT LoRA adapters on all seven
   projections with seeded random A and B (PEFT initializes B = 0, which would make the
   adapter a no-op), and `save_pretrained` them into lora/<name>/.
2. Load each saved adapter back with `PeftModel.from_pretrained` onto a fresh float32
   base (so the logits belong to the committed files) and record float32 logits, eval
   mode, eager attention, for fixed token sequences; the same for the bare base.
3. Load brise's own saved adapters (lora/brise-saved/*, written by the Rust example
   above) the same way and record their logits: adapters brise writes load into PEFT.
"""

from __future__ import annotations

import copy
import importlib.metadata
import math
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIXTURES, MODELS, MODELS_DIR, REPO, model_path, read_json, sha256_file, write_json  # noqa: E402

# Never reach for a model hub: everything is local.
os.environ["HF_HUB_OFFLINE"] = "1"
# PEFT writes target_modules from a Python set: a fixed hash seed fixes its order, so
# a rerun writes byte-identical configs.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import numpy as np  # noqa: E402
import torch  # noqa: E402

OUT = FIXTURES / "lora"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_THREADS = 2


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in ["torch", "transformers", "peft", "safetensors", "numpy", "gguf"]:
        out[p] = importlib.metadata.version(p)
    return out


def load_tiny():
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        FIXTURES / "tiny-mistral" / "hf", dtype=torch.float32, attn_implementation="eager"
    )


def load_smollm2():
    import transformers

    path, _ = model_path("smollm2")
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )


def tiny_seqs() -> list[list[int]]:
    ref = read_json(FIXTURES / "tiny-mistral" / "reference.json")
    # 13, 34 and 29 tokens with BOS: the longer two cross the 16-token sliding window.
    return [ref["results"][i]["prompt_ids"] for i in (0, 1, 2)]


def smollm2_seqs() -> list[list[int]]:
    ref = read_json(FIXTURES / "greedy" / "smollm2.json")
    # llama.cpp's tokenization of greedy prompts 0, 1 and 9 (19, 5 and 25 tokens).
    return [ref["results"][i]["prompt_ids"] for i in (0, 1, 9)]


def base_info(key: str) -> dict:
    if key == "tiny-mistral":
        f = FIXTURES / "tiny-mistral" / "hf" / "model.safetensors"
        return {"model": "tiny-mistral/hf", "model_file_sha256": sha256_file(f)}
    path, sha = model_path("smollm2")
    return {"model_file": MODELS["smollm2"][0], "sha256": sha}


BASES = {
    "tiny-mistral": (load_tiny, tiny_seqs),
    "smollm2": (load_smollm2, smollm2_seqs),
}

# name, base, LoraConfig options, stored dtype, std of B, seed.
ADAPTERS = [
    ("tiny-mistral-r4", "tiny-mistral", dict(r=4, lora_alpha=6, use_rslora=False), "float32", 0.02, 1),
    ("tiny-mistral-rslora-r4", "tiny-mistral", dict(r=4, lora_alpha=6, use_rslora=True), "float32", 0.01, 2),
    # bfloat16 on disk keeps the 30-layer rank-8 file at ~5 MB and covers BF16 loading.
    ("smollm2-r8", "smollm2", dict(r=8, lora_alpha=12, use_rslora=False), "bfloat16", 0.1, 3),
]
BRISE_SAVED = [("brise-saved/tiny-mistral", "tiny-mistral"), ("brise-saved/smollm2", "smollm2")]


def positions(n: int) -> list[int]:
    """Rows whose logits are stored: the middle and the last token."""
    return [n // 2, n - 1]


@torch.no_grad()
def logits_of(model, seqs) -> np.ndarray:
    """[n_seq, 2, n_vocab] float32: each sequence run alone, from position 0."""
    model.eval()
    out = []
    for ids in seqs:
        lg = model(torch.tensor([ids])).logits[0].float().numpy()
        out.append(lg[positions(len(ids))])
    return np.stack(out).astype(np.float32)


def write_f32(rel: str, a: np.ndarray) -> str:
    p = OUT / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    a.astype("<f4").tofile(p)
    print(f"wrote {p.relative_to(REPO)} ({p.stat().st_size} bytes)")
    return rel


def make_adapter(base, name: str, base_name: str, opts: dict, dtype: str, b_std: float, seed: int) -> None:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(target_modules=TARGETS, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **opts)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed)
    n = 0
    for pname, p in pm.named_parameters():
        if "lora_A" in pname:
            p.data = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
        elif "lora_B" in pname:
            p.data = torch.randn(p.shape, generator=g) * b_std
        else:
            continue
        p.data = p.data.to(getattr(torch, dtype))
        n += 1
    assert n == 2 * len(TARGETS) * base.config.num_hidden_layers, n
    pm.peft_config["default"].base_model_name_or_path = base_name
    # save_embedding_layers=False: "auto" looks the base model up (by name) to see
    # whether its vocabulary changed; no embeddings are trained here.
    pm.save_pretrained(OUT / name, save_embedding_layers=False)
    (OUT / name / "README.md").unlink()  # PEFT's model-card template: nothing brise reads
    print(f"wrote {(OUT / name).relative_to(REPO)}")


def load_adapter(base, rel: str):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(base), OUT / rel)
    lora = [(n, p) for n, p in pm.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for _, p in lora), "adapter not upcast to float32"
    return pm


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(N_THREADS)
    bases = {}
    for key, (load, seqs) in BASES.items():
        m = load()
        m.eval()
        s = seqs()
        base_logits = logits_of(m, s)
        bases[key] = (m, s)
        info = base_info(key)
        info.update(
            {
                "n_vocab": int(base_logits.shape[-1]),
                "sequences": [{"ids": ids, "positions": positions(len(ids))} for ids in s],
                "logits_file": write_f32(f"{key}.base.f32", base_logits),
            }
        )
        bases[key] = (m, s, info, base_logits)

    adapters = []
    for name, key, opts, dtype, b_std, seed in ADAPTERS:
        m, s, info, base_logits = bases[key]
        base_name = info.get("model") or info["model_file"]
        make_adapter(m, name, base_name, opts, dtype, b_std, seed)
        lg = logits_of(load_adapter(m, name), s)
        eff = lg - base_logits
        adapters.append(
            {
                "name": name,
                "dir": name,
                "base": key,
                "config": opts | {"target_modules": TARGETS},
                "scale": opts["lora_alpha"] / (math.sqrt(opts["r"]) if opts["use_rslora"] else opts["r"]),
                "dtype": dtype,
                "init": f"A ~ N(0,1)/sqrt(in), B ~ N(0,1)*{b_std}, torch.Generator seed {seed}, "
                "drawn in named_parameters order (A then B per module), cast to dtype",
                "logits_file": write_f32(f"{name}.f32", lg),
                "max_abs_effect": float(np.abs(eff).max()),
                "mean_abs_effect": float(np.abs(eff).mean()),
                "argmax_changed": int((lg.argmax(-1) != base_logits.argmax(-1)).sum()),
            }
        )

    saved = []
    for rel, key in BRISE_SAVED:
        if not (OUT / rel / "adapter_config.json").is_file():
            sys.exit(f"missing {OUT / rel}: run `cargo run --release -p brise-model --example save_lora` first")
        m, s, info, base_logits = bases[key]
        lg = logits_of(load_adapter(m, rel), s)
        eff = lg - base_logits
        saved.append(
            {
                "dir": rel,
                "base": key,
                "adapter_model_sha256": sha256_file(OUT / rel / "adapter_model.safetensors"),
                "adapter_config_sha256": sha256_file(OUT / rel / "adapter_config.json"),
                "logits_file": write_f32(f"{rel.replace('/', '.')}.f32", lg),
                "max_abs_effect": float(np.abs(eff).max()),
                "mean_abs_effect": float(np.abs(eff).mean()),
            }
        )

    write_json(
        OUT / "reference.json",
        {
            "generator": {
                "script": "scripts/ref/gen_lora.py",
                "versions": versions(),
                "torch_threads": N_THREADS,
                "procedure": "transformers AutoModelForCausalLM, dtype float32, attn_implementation eager, "
                "eval, no_grad; each sequence alone from position 0; logits at the stored positions. "
                "Adapters: get_peft_model(LoraConfig) -> seeded A, B -> save_pretrained; logits from "
                "PeftModel.from_pretrained(fresh float32 base, saved dir) (autocast to float32). "
                "SmolLM2: from_pretrained(gguf_file=...) dequantizes the Q4_1 GGUF to float32.",
            },
            "logits_layout": "little-endian float32 [n_seq][2 positions][n_vocab], sequence order as in bases",
            "bases": {k: v[2] for k, v in bases.items()},
            "adapters": adapters,
            "brise_saved": saved,
        },
    )


if __name__ == "__main__":
    main()
