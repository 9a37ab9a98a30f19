#!/usr/bin/env python3
"""Loss and gradient references for brise's LoRA trainer, from TRL's trainers -> tests/fixtures/train/.

Run with the training venv (scripts/setup-train-reference.sh), from the repo root:

    .venv-train/bin/python scripts/ref/gen_train.py

Model: tiny-mistral/hf in float32, eager attention, with the PEFT adapter lora/tiny-mistral-r4 loaded
trainable (PeftModel.from_pretrained(..., is_trainable=True)). For each case a real TRL trainer
(SFTTrainer, DPOTrainer, KTOTrainer) prepares a dataset of fixed token ids, its own collator and sampler
build the one batch, and Trainer.training_step runs the trainer's compute_loss and the backward pass.
Recorded: the loss, TRL's per-sequence log-probabilities (captured from the trainer's own forward calls),
the gradient of every lora_A / lora_B, and the per-token log-probabilities of every sequence, run alone,
under the adapter and under the base. Independent checks (a plain forward + log_softmax, the loss formula
written out here, autograd) must agree with the trainer, or the script fails.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIXTURES, REPO, f32_list, sha256_file, write_json  # noqa: E402

# Everything is local: no hub look-ups, no telemetry.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

OUT = FIXTURES / "train"
HF_DIR = FIXTURES / "tiny-mistral" / "hf"
ADAPTER_DIR = FIXTURES / "lora" / "tiny-mistral-r4"
N_THREADS = 1
# The first seed from 7 whose KTO KL estimate is positive (7 gives -0.05): the clamp at 0 would hide the KL term.
SEED = 8
BOS, EOS = 1, 2
# Ids start at 1000, clear of Mistral v3's control tokens (1..750), so no id has a special meaning.
ID_LO, N_VOCAB = 1000, 32768
DPO_BETA = 0.1
KTO_BETA, KTO_DESIRABLE_WEIGHT, KTO_UNDESIRABLE_WEIGHT = 0.1, 1.0, 1.0
KTO_LABELS = [True, False, True, False]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors", "numpy"]:
        out[p] = importlib.metadata.version(p)
    return out


# ---------------------------------------------------------------------------
# Token ids. TRL's DPO and KTO trainers only take text, and random ids do not survive a decode/encode round
# trip, so the text is the ids themselves ("<id:N>"); the tokenizer parses them back. "</s>" is the EOS that
# TRL appends to every completion. TRL's own dataset preparation (EOS, prompt/completion split, KTO's KL
# pairing) then runs unchanged.

_TOKEN = re.compile(r"<id:(\d+)>|</s>")


def make_tokenizer():
    from transformers import BatchEncoding
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    class IdTokenizer(SentencePieceBackend):
        def __call__(self, text=None, **kwargs):
            assert isinstance(text, str) and not kwargs, (text, kwargs)  # TRL calls processing_class(text=...)
            ids, pos = [], 0
            for m in _TOKEN.finditer(text):
                assert m.start() == pos, text
                ids.append(int(m.group(1)) if m.group(1) else self.eos_token_id)
                pos = m.end()
            assert pos == len(text), text
            return BatchEncoding({"input_ids": ids, "attention_mask": [1] * len(ids)})

    # The model's SentencePiece file gives the special tokens (<s> 1, </s> 2, no pad: TRL pads with EOS).
    tok = IdTokenizer(vocab_file=str(HF_DIR / "tokenizer.model"), bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token) == (BOS, EOS, None)
    return tok


def as_text(ids: list[int]) -> str:
    return "".join(f"<id:{i}>" for i in ids)


def draw_inputs() -> dict:
    rng = np.random.default_rng(SEED)

    def prompt() -> list[int]:  # 5..9 tokens with BOS
        return [BOS] + [int(x) for x in rng.integers(ID_LO, N_VOCAB, int(rng.integers(5, 10)) - 1)]

    def completion() -> list[int]:  # 3..6 tokens; TRL appends EOS: 4..7
        return [int(x) for x in rng.integers(ID_LO, N_VOCAB, int(rng.integers(3, 7)))]

    sft = [(prompt(), completion()) for _ in range(3)]
    dpo = [(prompt(), completion(), completion()) for _ in range(2)]
    kto = [(prompt(), completion()) for _ in KTO_LABELS]
    return {"sft": sft, "dpo": dpo, "kto": kto}


# ---------------------------------------------------------------------------
# Models


def load_policy():
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32, attn_implementation="eager")
    pm = PeftModel.from_pretrained(base, ADAPTER_DIR, is_trainable=True)
    assert pm.peft_config["default"].lora_dropout == 0.0  # determinism: the committed adapter already has 0
    lora = [(n, p) for n, p in pm.named_parameters() if "lora_" in n]
    assert len(lora) == 28 and all(p.requires_grad and p.dtype == torch.float32 for _, p in lora)
    assert all(p.abs().max() > 0 for n, p in lora if "lora_B" in n)  # B = 0 would zero every grad of A
    return pm


def adapters_active(pm) -> bool:
    from peft.tuners.lora import LoraLayer

    off = {m.disable_adapters for m in pm.modules() if isinstance(m, LoraLayer)}
    assert len(off) == 1
    return not off.pop()


def spy_on_fused_forward(pm) -> list[dict]:
    """Record every forward TRL makes through its fused LM head (add_fused_lm_head), with its log-probs."""
    inner = pm.get_base_model()
    fused = inner.forward
    calls: list[dict] = []

    def forward(*args, **kwargs):
        out = fused(*args, **kwargs)
        if kwargs.get("fused_lm_head"):
            calls.append(
                {
                    "grad": torch.is_grad_enabled(),
                    "adapter": adapters_active(pm),
                    "input_ids": kwargs["input_ids"].clone(),
                    "log_probs": out.log_probs.detach().clone(),
                }
            )
        return out

    inner.forward = forward
    return calls


def lora_grads(pm) -> dict[str, torch.Tensor]:
    """Gradients under PEFT's saved key names (the adapter-name segment dropped)."""
    out = {}
    for name, p in pm.named_parameters():
        if ".lora_A.default." in name or ".lora_B.default." in name:
            assert p.grad is not None, name
            out[name.replace(".default.", ".")] = p.grad.detach().to(torch.float32).contiguous().clone()
    return out


def adapter_keys() -> list[str]:
    from safetensors import safe_open

    with safe_open(ADAPTER_DIR / "adapter_model.safetensors", "pt") as f:
        return sorted(f.keys())


# ---------------------------------------------------------------------------
# TRL runs


def train_args(cls, tmp: str, n: int, **kw):
    return cls(
        output_dir=tmp,
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        train_sampling_strategy="sequential",  # the stored order; KTO's KL pairing requires it
        bf16=False,  # TRL's default is bf16=True (autocast): the references are float32
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,  # TRL defaults to True; only recomputation, the values are the same
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
        **kw,
    )


def run_trainer(trainer, calls: list[dict]) -> tuple[float, dict, dict]:
    loader = trainer.get_train_dataloader()
    assert len(loader) == 1  # the whole dataset is one batch
    batch = next(iter(loader))
    # What Trainer's training loop passes for this batch (None unless the batch has "labels").
    n_items = trainer._get_num_items_in_batch([batch], trainer.args.device)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop: one micro-batch per step
    calls.clear()
    loss = trainer.training_step(trainer.model, batch, n_items)
    info = {"num_items_in_batch": None if n_items is None else int(n_items)}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    return float(loss), lora_grads(trainer.model), {"batch": batch, "info": info, "metrics": metrics}


def drop_ref_copy(trainer) -> None:
    # TRL 1.16 (DPOTrainer/KTOTrainer __init__): a PeftModel passed with ref_model=None and no peft_config gets a
    # frozen copy of its adapter, "ref", as the reference. The reference here is the base model: without "ref",
    # TRL's own path, use_adapter(model, None), runs the reference forward under disable_adapter().
    assert "ref" in trainer.model.peft_config
    trainer.model.delete_adapter("ref")
    assert list(trainer.model.peft_config) == ["default"] and trainer.model.active_adapter == "default"


def trl_sft(inputs, tmp: str):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    pm = load_policy()
    ds = Dataset.from_dict({"prompt": [as_text(p) for p, _ in inputs], "completion": [as_text(c) for _, c in inputs]})
    args = train_args(SFTConfig, tmp, len(inputs), completion_only_loss=True)
    trainer = SFTTrainer(model=pm, args=args, train_dataset=ds, processing_class=make_tokenizer())
    prepared = [(r["input_ids"], r["labels"]) for r in trainer.train_dataset]
    calls = spy_on_fused_forward(trainer.model)
    loss, grads, extra = run_trainer(trainer, calls)
    assert [(c["grad"], c["adapter"]) for c in calls] == [(True, True)]
    extra["prepared"] = prepared
    extra["calls"] = calls
    return loss, grads, extra


def trl_dpo(inputs, tmp: str):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pm = load_policy()
    ds = Dataset.from_dict(
        {
            "prompt": [as_text(p) for p, _, _ in inputs],
            "chosen": [as_text(c) for _, c, _ in inputs],
            "rejected": [as_text(r) for _, _, r in inputs],
        }
    )
    args = train_args(DPOConfig, tmp, len(inputs), beta=DPO_BETA, loss_type=["sigmoid"])
    trainer = DPOTrainer(model=pm, ref_model=None, args=args, train_dataset=ds, processing_class=make_tokenizer())
    drop_ref_copy(trainer)
    prepared = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
    calls = spy_on_fused_forward(trainer.model)
    loss, grads, extra = run_trainer(trainer, calls)
    assert [(c["grad"], c["adapter"]) for c in calls] == [(True, True), (False, False)]
    extra["prepared"] = prepared
    extra["calls"] = calls
    return loss, grads, extra


def trl_kto(inputs, tmp: str):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    pm = load_policy()
    ds = Dataset.from_dict(
        {"prompt": [as_text(p) for p, _ in inputs], "completion": [as_text(c) for _, c in inputs], "label": KTO_LABELS}
    )
    args = train_args(
        KTOConfig,
        tmp,
        len(inputs),
        beta=KTO_BETA,
        desirable_weight=KTO_DESIRABLE_WEIGHT,
        undesirable_weight=KTO_UNDESIRABLE_WEIGHT,
        loss_type="kto",
    )
    trainer = KTOTrainer(model=pm, ref_model=None, args=args, train_dataset=ds, processing_class=make_tokenizer())
    drop_ref_copy(trainer)
    prepared = [(r["prompt_ids"], r["completion_ids"], r["KL_completion_ids"], r["label"]) for r in trainer.train_dataset]
    calls = spy_on_fused_forward(trainer.model)
    loss, grads, extra = run_trainer(trainer, calls)
    # _compute_kl_logps(policy), policy, then under disable_adapter: _compute_kl_logps(ref), ref.
    assert [(c["grad"], c["adapter"]) for c in calls] == [(False, True), (True, True), (False, False), (False, False)]
    b = extra["batch"]
    for c, key in zip(calls, ["KL_input_ids", "input_ids", "KL_input_ids", "input_ids"]):
        assert torch.equal(c["input_ids"], b[key]), key
    extra["prepared"] = prepared
    extra["calls"] = calls
    return loss, grads, extra


def run_twice(fn, inputs):
    """Run a case twice on fresh models; the loss and every gradient must be bit-identical."""
    results = []
    for _ in range(2):
        tmp = tempfile.mkdtemp(prefix="brise-gen-train-")
        try:
            results.append(fn(inputs, tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    (l1, g1, e1), (l2, g2, _) = results
    assert l1 == l2 and g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1), fn.__name__
    return l1, g1, e1


# ---------------------------------------------------------------------------
# Independent checks: a plain forward (full logits, log_softmax), each sequence alone, and the loss formulas
# written out. Also used with K and V rounded to f16 to measure how much an f16 KV cache moves the values.


class F16KV:
    """Round the k_proj/v_proj outputs (LoRA included) to f16 in the forward; gradients pass unchanged."""

    def __init__(self, pm, enabled: bool):
        self.handles = []
        if enabled:
            for layer in pm.get_base_model().model.layers:
                for m in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                    self.handles.append(m.register_forward_hook(lambda _m, _i, y: y + (y.half().float() - y).detach()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def seq_token_logps(pm, prompt: list[int], completion: list[int], adapter: bool) -> torch.Tensor:
    """log p(completion[j] | prefix), j = 0..len-1: the log_softmax row of the token before it."""
    ids = prompt + completion
    ctx = contextlib.nullcontext() if adapter else pm.disable_adapter()
    with ctx, (contextlib.nullcontext() if adapter else torch.no_grad()):
        logits = pm(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    lp = torch.log_softmax(logits.float(), dim=-1)
    pos = torch.arange(len(prompt) - 1, len(ids) - 1)
    return lp[pos, torch.tensor(completion)]


def plain_sft(pm, ex):
    toks = [seq_token_logps(pm, p, c, True) for p, c in ex]
    return -torch.cat(toks).sum() / sum(len(c) for _, c in ex)


def plain_dpo(pm, ex):
    pol = torch.stack([torch.stack([seq_token_logps(pm, p, x, True).sum() for x in (c, r)]) for p, c, r in ex])
    ref = torch.stack([torch.stack([seq_token_logps(pm, p, x, False).sum() for x in (c, r)]) for p, c, r in ex])
    delta = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    return (-F.logsigmoid(DPO_BETA * delta)).mean()


def plain_kto(pm, ex):
    """ex: (prompt, completion, KL completion, label)."""
    pol = torch.stack([seq_token_logps(pm, p, c, True).sum() for p, c, _, _ in ex])
    ref = torch.stack([seq_token_logps(pm, p, c, False).sum() for p, c, _, _ in ex])
    with torch.no_grad():
        kl_pol = torch.stack([seq_token_logps(pm, p, k, True).sum() for p, _, k, _ in ex])
        kl_ref = torch.stack([seq_token_logps(pm, p, k, False).sum() for p, _, k, _ in ex])
        kl = (kl_pol - kl_ref).mean().clamp(min=0)
    lab = torch.tensor([x[3] for x in ex])
    ratio = pol - ref
    chosen = KTO_DESIRABLE_WEIGHT * (1 - torch.sigmoid(KTO_BETA * (ratio[lab] - kl)))
    rejected = KTO_UNDESIRABLE_WEIGHT * (1 - torch.sigmoid(KTO_BETA * (kl - ratio[~lab])))
    return torch.cat([chosen, rejected]).mean()


def plain_loss_and_grads(loss_fn, ex, f16_kv: bool = False):
    pm = load_policy()
    pm.eval()
    with F16KV(pm, f16_kv):
        loss = loss_fn(pm, ex)
        loss.backward()
    return float(loss.detach()), lora_grads(pm)


def grad_diff(a: dict, b: dict) -> dict:
    """Over all tensors: max |a-b|, that over max |a|, and the relative L2 error ||a-b|| / ||a||."""
    d = max(float((a[k] - b[k]).abs().max()) for k in a)
    m = max(float(a[k].abs().max()) for k in a)
    l2 = sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in a) ** 0.5
    n2 = sum(float((a[k].double() ** 2).sum()) for k in a) ** 0.5
    return {"max_abs": d, "max_rel_to_max": d / m, "rel_l2": l2 / n2}


# ---------------------------------------------------------------------------


def sequences_record(pm_plain, seqs: list[tuple[str, list[int], list[int]]]):
    """Per-token completion log-probs of each sequence alone, adapter on and off, and how far rounding K and V
    to f16 moves them (per token and per sequence sum)."""
    out, plain, tok_dev, sum_dev = [], {}, 0.0, 0.0
    for role, prompt, completion in seqs:
        with torch.no_grad():
            for adapter in (True, False):
                lp = seq_token_logps(pm_plain, prompt, completion, adapter)
                with F16KV(pm_plain, True):
                    lp16 = seq_token_logps(pm_plain, prompt, completion, adapter)
                tok_dev = max(tok_dev, float((lp16 - lp).abs().max()))
                sum_dev = max(sum_dev, abs(float(lp16.sum()) - float(lp.sum())))
                plain[(tuple(prompt), tuple(completion), adapter)] = lp
        out.append(
            {
                "role": role,
                "ids": prompt + completion,
                "n_prompt": len(prompt),
                "policy_logps": f32_list(plain[(tuple(prompt), tuple(completion), True)].numpy()),
                "base_logps": f32_list(plain[(tuple(prompt), tuple(completion), False)].numpy()),
            }
        )
    return out, plain, {"token_logp_max_abs": tok_dev, "seq_logp_sum_max_abs": sum_dev}


def trl_vs_plain(call: dict, rows: list[tuple[list[int], list[int]]], plain: dict) -> float:
    """Max |TRL's per-token log-prob (padded batch) - the plain one (sequence alone)| over a captured call.
    Row b holds log p(token t) at t-1, zero where the label is ignored."""
    lp = call["log_probs"]
    assert lp.shape[0] == len(rows)
    d = 0.0
    for b, (prompt, completion) in enumerate(rows):
        at = slice(len(prompt) - 1, len(prompt) - 1 + len(completion))
        d = max(d, float((lp[b, at] - plain[(tuple(prompt), tuple(completion), call["adapter"])]).abs().max()))
        rest = lp[b].clone()
        rest[at] = 0
        assert not rest.any()
    return d


def check_close(name: str, a: float, b: float, tol: float) -> float:
    d = abs(a - b)
    assert d <= tol * max(1.0, abs(a)), f"{name}: {a} vs {b}"
    return d


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(N_THREADS)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    OUT.mkdir(parents=True, exist_ok=True)
    inputs = draw_inputs()
    keys = adapter_keys()
    plain = load_policy()
    plain.eval()
    cases = {}

    # ---- SFT
    loss, grads, ex = run_twice(trl_sft, inputs["sft"])
    examples = [(p, c + [EOS]) for p, c in inputs["sft"]]
    assert ex["prepared"] == [(p + c, [-100] * len(p) + c) for p, c in examples]
    n_tok = sum(len(c) for _, c in examples)
    assert ex["info"]["num_items_in_batch"] == n_tok
    (call,) = ex["calls"]
    trl_sum = float(call["log_probs"].sum())
    check_close("sft loss = -sum/n", loss, float(torch.tensor(-trl_sum, dtype=torch.float32) / n_tok), 1e-6)
    ploss, pgrads = plain_loss_and_grads(plain_sft, examples)
    l16, g16 = plain_loss_and_grads(plain_sft, examples, f16_kv=True)
    seqs, pl, f16 = sequences_record(plain, [("example", p, c) for p, c in examples])
    trl_diff = trl_vs_plain(call, examples, pl)
    assert trl_diff < 1e-4, trl_diff
    cases["sft"] = {
        "trainer": "trl.SFTTrainer",
        "config": {"completion_only_loss": True, "loss_type": "nll"},
        "examples": [{"prompt_ids": p, "completion_ids": c} for p, c in examples],
        "n_completion_tokens": n_tok,
        "num_items_in_batch": ex["info"]["num_items_in_batch"],
        "loss": loss,
        "sequences": seqs,
        "grads_file": "grads.sft.safetensors",
        "checks": {
            "trl_vs_plain_token_logp_max_abs": trl_diff,
            "f16_kv_logps": f16,
            "plain_loss_abs_diff": check_close("sft plain", loss, ploss, 1e-5),
            "plain_grads": grad_diff(grads, pgrads),
            "f16_kv_loss_abs_diff": abs(l16 - ploss),
            "f16_kv_grads": grad_diff(pgrads, g16),
        },
    }
    sft_grads = grads

    # ---- DPO
    loss, grads, ex = run_twice(trl_dpo, inputs["dpo"])
    examples = [(p, c + [EOS], r + [EOS]) for p, c, r in inputs["dpo"]]
    assert ex["prepared"] == examples
    pol_call, ref_call = ex["calls"]
    n = len(examples)
    pol = pol_call["log_probs"].sum(dim=1)  # TRL: per_token_logps.sum(dim=1), batch = [chosen..., rejected...]
    ref = ref_call["log_probs"].sum(dim=1)
    delta = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
    per_pair = -F.logsigmoid(DPO_BETA * delta)
    check_close("dpo loss", loss, float(per_pair.mean()), 1e-6)
    m = ex["metrics"]
    check_close("dpo logps/chosen", m["logps/chosen"], float(pol[:n].mean()), 1e-6)
    check_close("dpo rewards/chosen", m["rewards/chosen"], float((DPO_BETA * (pol[:n] - ref[:n])).mean()), 1e-6)
    ploss, pgrads = plain_loss_and_grads(plain_dpo, examples)
    l16, g16 = plain_loss_and_grads(plain_dpo, examples, f16_kv=True)
    seqs, pl, f16 = sequences_record(
        plain, [(role, p, x) for p, c, r in examples for role, x in (("chosen", c), ("rejected", r))]
    )
    rows = [(p, c) for p, c, _ in examples] + [(p, r) for p, _, r in examples]
    trl_diff = max(trl_vs_plain(pol_call, rows, pl), trl_vs_plain(ref_call, rows, pl))
    assert trl_diff < 1e-4, trl_diff
    cases["dpo"] = {
        "trainer": "trl.DPOTrainer",
        "config": {"beta": DPO_BETA, "loss_type": ["sigmoid"], "f_divergence_type": "reverse_kl", "ld_alpha": None,
                   "use_weighting": False, "label_smoothing": 0.0, "precompute_ref_log_probs": False},
        "reference": "the same PeftModel under disable_adapter() (TRL's copy of the adapter, 'ref', deleted)",
        "pairs": [
            {
                "prompt_ids": p,
                "chosen_ids": c,
                "rejected_ids": r,
                "policy_chosen_logps": float(pol[i]),
                "policy_rejected_logps": float(pol[n + i]),
                "ref_chosen_logps": float(ref[i]),
                "ref_rejected_logps": float(ref[n + i]),
                "pair_loss": float(per_pair[i]),
            }
            for i, (p, c, r) in enumerate(examples)
        ],
        "loss": loss,
        "sequences": seqs,
        "grads_file": "grads.dpo.safetensors",
        "checks": {
            "trl_metrics": {k: m[k] for k in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected")},
            "trl_vs_plain_token_logp_max_abs": trl_diff,
            "f16_kv_logps": f16,
            "plain_loss_abs_diff": check_close("dpo plain", loss, ploss, 1e-5),
            "plain_grads": grad_diff(grads, pgrads),
            "f16_kv_loss_abs_diff": abs(l16 - ploss),
            "f16_kv_grads": grad_diff(pgrads, g16),
        },
    }
    dpo_grads = grads

    # ---- KTO
    loss, grads, ex = run_twice(trl_kto, inputs["kto"])
    comps = [c + [EOS] for _, c in inputs["kto"]]
    k = len(comps)
    # TRL's add_kl_completion_ids: KL completion of item i = completion of item i-1 (mod batch).
    kl_from = [(i - 1) % k for i in range(k)]
    examples = [(p, comps[i], comps[kl_from[i]], KTO_LABELS[i]) for i, (p, _) in enumerate(inputs["kto"])]
    assert ex["prepared"] == examples
    kl_pol_call, pol_call, kl_ref_call, ref_call = ex["calls"]
    pol, ref = pol_call["log_probs"].sum(-1), ref_call["log_probs"].sum(-1)
    kl_pol, kl_ref = kl_pol_call["log_probs"].sum(-1), kl_ref_call["log_probs"].sum(-1)
    kl_raw = (kl_pol - kl_ref).mean()
    kl = kl_raw.clamp(min=0)
    lab = torch.tensor(KTO_LABELS)
    ratio = pol - ref
    item_loss = torch.where(
        lab,
        KTO_DESIRABLE_WEIGHT * (1 - torch.sigmoid(KTO_BETA * (ratio - kl))),
        KTO_UNDESIRABLE_WEIGHT * (1 - torch.sigmoid(KTO_BETA * (kl - ratio))),
    )
    # TRL concatenates [desirable..., undesirable...] before the mean: same value up to summation order.
    check_close("kto loss", loss, float(torch.cat([item_loss[lab], item_loss[~lab]]).mean()), 1e-6)
    m = ex["metrics"]
    check_close("kto kl metric", m["kl"], float(kl), 1e-6)
    ploss, pgrads = plain_loss_and_grads(plain_kto, examples)
    l16, g16 = plain_loss_and_grads(plain_kto, examples, f16_kv=True)
    seqs, pl, f16 = sequences_record(
        plain, [(role, p, x) for p, c, kc, _ in examples for role, x in (("completion", c), ("kl", kc))]
    )
    rows, kl_rows = [(p, c) for p, c, _, _ in examples], [(p, kc) for p, _, kc, _ in examples]
    trl_diff = max(
        max(trl_vs_plain(pol_call, rows, pl), trl_vs_plain(ref_call, rows, pl)),
        max(trl_vs_plain(kl_pol_call, kl_rows, pl), trl_vs_plain(kl_ref_call, kl_rows, pl)),
    )
    assert trl_diff < 1e-4, trl_diff
    cases["kto"] = {
        "trainer": "trl.KTOTrainer",
        "config": {"beta": KTO_BETA, "desirable_weight": KTO_DESIRABLE_WEIGHT,
                   "undesirable_weight": KTO_UNDESIRABLE_WEIGHT, "loss_type": "kto", "precompute_ref_log_probs": False},
        "reference": "the same PeftModel under disable_adapter() (TRL's copy of the adapter, 'ref', deleted)",
        "kl_pairing": "item i is scored on (prompt_i, completion_{(i-1) mod 4}): TRL rotates the completions by one "
        "within each batch of per_device_train_batch_size (4), the last completion going to the first prompt",
        "items": [
            {
                "prompt_ids": p,
                "completion_ids": c,
                "label": lbl,
                "kl_completion_from": kl_from[i],
                "kl_completion_ids": kc,
                "policy_logps": float(pol[i]),
                "ref_logps": float(ref[i]),
                "policy_kl_logps": float(kl_pol[i]),
                "ref_kl_logps": float(kl_ref[i]),
                "item_loss": float(item_loss[i]),
            }
            for i, (p, c, kc, lbl) in enumerate(examples)
        ],
        "kl_raw": float(kl_raw),
        "kl": float(kl),
        "loss": loss,
        "sequences": seqs,
        "grads_file": "grads.kto.safetensors",
        "checks": {
            "trl_vs_plain_token_logp_max_abs": trl_diff,
            "f16_kv_logps": f16,
            "plain_loss_abs_diff": check_close("kto plain", loss, ploss, 1e-5),
            "plain_grads": grad_diff(grads, pgrads),
            "f16_kv_loss_abs_diff": abs(l16 - ploss),
            "f16_kv_grads": grad_diff(pgrads, g16),
        },
    }

    from safetensors.torch import save_file

    for name, g in (("sft", sft_grads), ("dpo", dpo_grads), ("kto", grads)):
        assert sorted(g) == keys, name
        for kk, v in g.items():
            assert torch.isfinite(v).all() and v.abs().max() > 0, (name, kk)
        p = OUT / f"grads.{name}.safetensors"
        save_file({kk: g[kk] for kk in keys}, str(p), metadata={"format": "pt"})
        print(f"wrote {p.relative_to(REPO)} ({p.stat().st_size} bytes)")
        assert cases[name]["checks"]["plain_grads"]["max_rel_to_max"] < 1e-4, name

    cfg = plain.peft_config["default"]
    write_json(
        OUT / "losses.json",
        {
            "generator": {
                "script": "scripts/ref/gen_train.py",
                "versions": versions(),
                "torch_threads": N_THREADS,
                "procedure": "transformers AutoModelForCausalLM(tiny-mistral/hf, dtype float32, attn_implementation "
                "eager) + PeftModel.from_pretrained(lora/tiny-mistral-r4, is_trainable=True), a fresh model per "
                "case. A real TRL trainer per case (SFTTrainer, DPOTrainer, KTOTrainer; ref_model=None, "
                "per_device_train_batch_size = the case's size, gradient_accumulation_steps 1, "
                "train_sampling_strategy sequential, bf16 False, fp16 False, use_cpu, gradient_checkpointing False) "
                "on a text dataset whose text is the ids themselves ('<id:N>', parsed back by the tokenizer; TRL "
                "appends '</s>' = id 2 to every completion). The trainer's dataloader (its collator: right padding "
                "with id 2, attention mask) gives the one batch; Trainer.training_step(model, batch, "
                "num_items_in_batch as the training loop computes it) runs the trainer's compute_loss and "
                "backward. DPO/KTO: TRL copies a loaded adapter into a frozen 'ref' adapter and uses it as the "
                "reference; the script deletes it after construction, so TRL's own reference path runs under "
                "disable_adapter() (the base model). Per-sequence log-probs are the sums TRL computed, captured "
                "from its fused-LM-head forward calls. Gradients: .grad of every lora_A/lora_B after the backward. "
                "Each case is run twice on fresh models and must give bit-identical losses and gradients.",
                "sft_loss": "sum over the batch's completion tokens of -log p(token | prefix) / number of "
                "completion tokens in the batch (trl/trainer/sft_trainer.py SFTTrainer.compute_loss: "
                "per_token_loss.sum() / num_items_in_batch; the count is over labels[:, 1:] != -100)",
                "dpo_loss": "mean over pairs of -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), pi/ref = sum "
                "over completion tokens of log p (trl/trainer/dpo_trainer.py DPOTrainer._compute_loss, loss_type "
                "sigmoid, f_divergence_type reverse_kl)",
                "kto_loss": "z = clamp(mean over items of (pi_KL - ref_KL), min 0), no gradient; desirable: "
                "w_d * (1 - sigmoid(beta * ((pi - ref) - z))), undesirable: w_u * (1 - sigmoid(beta * (z - (pi - "
                "ref)))); loss = plain mean over all items (trl/trainer/kto_trainer.py KTOTrainer._compute_loss, "
                "losses.nanmean())",
            },
            "model": {
                "dir": "tiny-mistral/hf",
                "model_file_sha256": sha256_file(HF_DIR / "model.safetensors"),
                "dtype": "float32",
                "attn_implementation": "eager",
                "sliding_window": 16,
            },
            "adapter": {
                "dir": "lora/tiny-mistral-r4",
                "adapter_model_sha256": sha256_file(ADAPTER_DIR / "adapter_model.safetensors"),
                "r": cfg.r,
                "lora_alpha": cfg.lora_alpha,
                "scale": cfg.lora_alpha / cfg.r,
                "lora_dropout": cfg.lora_dropout,
                "lora_dropout_note": "0.0 in the committed adapter_config.json; no override needed",
                "lora_B_max_abs": max(float(p.detach().abs().max()) for n, p in plain.named_parameters() if "lora_B" in n),
            },
            "token_ids": {
                "rng": f"numpy default_rng({SEED}); draws in this order: sft 3 x (prompt, completion), dpo 2 x "
                "(prompt, chosen, rejected), kto 4 x (prompt, completion). A prompt: length L = integers(5, 10), "
                f"then [1] + integers({ID_LO}, {N_VOCAB}, L-1). A completion: integers(3, 7) ids in the same "
                "range, then TRL appends EOS 2",
                "bos": BOS,
                "eos": EOS,
                "pad": EOS,
                "note": "every completion_ids below includes the trailing EOS TRL appended; every sequence "
                "(prompt + completion, KL pairs included) has at most 16 tokens, so the sliding window never masks",
            },
            "grad_keys": keys,
            **cases,
        },
    )


if __name__ == "__main__":
    main()
