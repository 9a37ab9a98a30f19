#!/usr/bin/env python3
"""Tiny synthetic Mistral model (random weights) + llama.cpp reference outputs.

Outputs (tests/fixtures/tiny-mistral/):
  hf/config.json, hf/model.safetensors, hf/tokenizer.model, hf/tokenizer_config.json
  tiny-mistral-f16.gguf          same weights converted like convert_hf_to_gguf.py
  reference.json                 llama.cpp greedy runs with emulated sliding-window attention
  reference.logits.<i>.first.f32 / reference.logits.<i>.last.f32

Sliding window emulation (llama.cpp's llama arch ignores sliding_window): tokens
are decoded ONE AT A TIME; before decoding the token at position p >= W the
KV-cache cell of position p-W is removed with
    llama_memory_seq_rm(llama_get_memory(ctx), seq_id=0, p0=p-W, p1=p-W+1)
so the query at position p attends to positions p-W+1 .. p (distance < W),
i.e. standard SWA (HF Mistral, LLAMA_SWA_TYPE_STANDARD).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

import gguf
import mistral_common
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from safetensors.numpy import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_to_gguf  # noqa: E402
from common import (  # noqa: E402
    FIXTURES,
    N_THREADS,
    Decoder,
    generator_info,
    load_llama,
    read_json,
    sha256_file,
    tokenize,
    top2_margin,
    write_json,
)

OUT = FIXTURES / "tiny-mistral"
HF = OUT / "hf"
GGUF_PATH = OUT / "tiny-mistral-f16.gguf"
V3_MODEL = Path(mistral_common.__file__).resolve().parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
SEED = 1234
N_GEN = 40
N_CTX = 512

CONFIG = {
    "architectures": ["MistralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 8,
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
    "model_type": "mistral",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": 16,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_cache": True,
    "vocab_size": 32768,
}

PROMPTS = [
    "The old lighthouse keeper climbed the stairs every night",
    "def merge_sort(items):\n    if len(items) <= 1:\n        return items\n    mid = len(items) // 2",
    "Paris, Berlin, Madrid, Rome, Lisbon, Vienna, Prague, Warsaw, Budapest, Athens, Dublin, Oslo",
    "Bonjour à tous ! Aujourd'hui nous allons parler de la cuisine française et de ses nombreuses traditions régionales.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
    "Once upon a time there was a small robot who wanted to learn how to paint the sea at sunset, "
    "so every evening it rolled down to the harbour with a brush",
]


# --------------------------------------------------------------------------- weights


def make_weights(rng) -> dict[str, np.ndarray]:
    c = CONFIG
    H, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]

    def w(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float16)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float16)

    t = {"model.embed_tokens.weight": w((V, H), 1.0)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(H)
        t[p + "self_attn.q_proj.weight"] = w((nh * hd, H), 0.3)
        t[p + "self_attn.k_proj.weight"] = w((nkv * hd, H), 0.3)
        t[p + "self_attn.v_proj.weight"] = w((nkv * hd, H), 0.5)
        t[p + "self_attn.o_proj.weight"] = w((H, nh * hd), 0.3)
        t[p + "post_attention_layernorm.weight"] = norm(H)
        t[p + "mlp.gate_proj.weight"] = w((I, H), 0.3)
        t[p + "mlp.up_proj.weight"] = w((I, H), 0.3)
        t[p + "mlp.down_proj.weight"] = w((H, I), 0.2)
    t["model.norm.weight"] = norm(H)
    t["lm_head.weight"] = w((V, H), 0.5)
    return t


# --------------------------------------------------------------------------- numpy cross-check (HF layout)


def np_forward(W: dict[str, np.ndarray], ids: list[int], window: int | None) -> np.ndarray:
    """Plain float32 numpy forward of HF MistralForCausalLM (rotate_half RoPE); returns logits [T, V].

    Only used to cross-check the GGUF conversion and the SWA emulation; fixtures
    always hold llama.cpp values.
    """
    c = CONFIG
    nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    eps = c["rms_norm_eps"]
    f = {k: v.astype(np.float32) for k, v in W.items()}
    T = len(ids)
    x = f["model.embed_tokens.weight"][ids]

    def rms(v, g):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * g

    inv = 1.0 / (c["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = np.arange(T)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, -1).astype(np.float32)
    sin = np.concatenate([np.sin(ang)] * 2, -1).astype(np.float32)

    def rope(q):  # q [T, n, hd]
        h = hd // 2
        rot = np.concatenate([-q[..., h:], q[..., :h]], -1)
        return q * cos[:, None, :] + rot * sin[:, None, :]

    pos = np.arange(T)
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= (pos[:, None] - pos[None, :]) < window
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, f[p + "input_layernorm.weight"])
        q = rope((h @ f[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd))
        k = rope((h @ f[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd))
        v = (h @ f[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd)
        rep = nh // nkv
        k = np.repeat(k, rep, axis=1)
        v = np.repeat(v, rep, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        s = np.where(mask[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = np.einsum("hqk,khd->qhd", s, v).reshape(T, nh * hd)
        x = x + a @ f[p + "self_attn.o_proj.weight"].T
        h = rms(x, f[p + "post_attention_layernorm.weight"])
        g = h @ f[p + "mlp.gate_proj.weight"].T
        u = h @ f[p + "mlp.up_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ f[p + "mlp.down_proj.weight"].T
    x = rms(x, f["model.norm.weight"])
    return x @ f["lm_head.weight"].T


# --------------------------------------------------------------------------- writers


def write_hf(weights, template: str) -> None:
    HF.mkdir(parents=True, exist_ok=True)
    (HF / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    save_file(weights, str(HF / "model.safetensors"), metadata={"format": "pt"})
    (HF / "model.safetensors").chmod(0o644)
    shutil.copy(V3_MODEL, HF / "tokenizer.model")
    tc = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": CONFIG["max_position_embeddings"],
        "tokenizer_class": "LlamaTokenizer",
        "chat_template": template,
    }
    (HF / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")


def write_gguf() -> dict:
    hp = json.loads((HF / "config.json").read_text())
    tensors = load_file(str(HF / "model.safetensors"))
    # HF checkpoints list tensors in name order in safetensors; the converter keeps file order
    gw = gguf.GGUFWriter(str(GGUF_PATH), arch="llama")
    gw.add_type(gguf.GGUFType.MODEL)
    gw.add_name("tiny-mistral")
    hf_to_gguf.set_gguf_parameters(gw, hp, gguf.LlamaFileType.MOSTLY_F16)
    # not written by convert_hf_to_gguf for arch llama; llama.cpp ignores it, brise reads it
    gw.add_sliding_window(hp["sliding_window"])
    vocab_info = hf_to_gguf.set_vocab(gw, HF, hp["vocab_size"])
    if "unk" not in vocab_info["special_token_ids"]:
        # the converter only finds unk via tokenizer.json / config.json unk_token_id; written explicitly here
        gw.add_unk_token_id(0)
    log = hf_to_gguf.convert_tensors(gw, tensors, hp)
    gw.add_quantization_version(gguf.GGML_QUANT_VERSION)
    gw.write_header_to_file()
    gw.write_kv_data_to_file()
    gw.write_tensors_to_file()
    gw.close()
    return {"vocab": vocab_info, "tensors": log}


# --------------------------------------------------------------------------- llama.cpp runs


def greedy(dec: Decoder, ids: list[int], window: int | None):
    """Token-by-token greedy run; window=None -> plain causal attention."""
    dec.clear()
    gen, margins, first, last = [], [], None, None
    seq = list(ids)
    logits = None
    for p, tok in enumerate(seq):
        if window is not None and p >= window:
            assert dec.seq_rm(p - window, p - window + 1)
        logits = dec.decode([tok], p)
    first = logits.copy()
    for step in range(N_GEN):
        nxt, m = top2_margin(logits)
        gen.append(nxt)
        margins.append(m)
        last = logits.copy()
        if step == N_GEN - 1:
            break
        p = len(seq)
        seq.append(nxt)
        if window is not None and p >= window:
            assert dec.seq_rm(p - window, p - window + 1)
        logits = dec.decode([nxt], p)
        if window is not None:
            lo, hi = dec.pos_range()
            assert hi == p and lo == max(0, p - window + 1), (lo, hi, p)
    return gen, margins, first, last


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    chat_v3 = read_json(FIXTURES / "mistral" / "chat_v3.json")
    template = chat_v3["template"]
    rng = np.random.default_rng(SEED)
    weights = make_weights(rng)
    write_hf(weights, template)
    conv = write_gguf()

    mt = MistralTokenizer.from_file(str(V3_MODEL))
    raw = mt.instruct_tokenizer.tokenizer

    # ---- tokenizer equivalence: llama.cpp (vocab_only) vs mistral-common v3
    corpus = read_json(FIXTURES / "tokenize" / "corpus.json")["texts"]
    vocab_llm = load_llama(GGUF_PATH, vocab_only=True)
    tok_diffs = []
    for text in corpus:
        a = tokenize(vocab_llm, text, add_special=False, parse_special=False)
        b = raw.encode(text, bos=False, eos=False)
        if a != b:
            tok_diffs.append({"text": text, "llama_cpp": a, "mistral_common": b})
    del vocab_llm
    print(f"tokenizer differences llama.cpp vs mistral-common v3: {len(tok_diffs)}")

    # ---- model runs
    import llama_cpp

    llm = load_llama(GGUF_PATH, n_ctx=N_CTX, n_batch=512, n_threads=N_THREADS, n_threads_batch=N_THREADS,
                     flash_attn=False, seed=0)
    n_swa_llama = llama_cpp.llama_model_n_swa(llm._model.model)
    dec = Decoder(llm)
    W = CONFIG["sliding_window"]
    results = []
    checks = []
    for i, prompt in enumerate(PROMPTS):
        ids = tokenize(llm, prompt, add_special=True, parse_special=False)
        assert ids == raw.encode(prompt, bos=True, eos=False), "llama.cpp and mistral-common disagree on prompt ids"
        assert 10 <= len(ids) <= 40, (len(ids), prompt)
        gen, margins, first, last = greedy(dec, ids, W)
        gen2, margins2, *_ = greedy(dec, ids, W)
        assert gen == gen2 and margins == margins2, "non-deterministic"
        gen_full, margins_full, first_full, _ = greedy(dec, ids, None)
        f_first = f"reference.logits.{i}.first.f32"
        f_last = f"reference.logits.{i}.last.f32"
        (OUT / f_first).write_bytes(first.astype("<f4").tobytes())
        (OUT / f_last).write_bytes(last.astype("<f4").tobytes())
        results.append(
            {
                "prompt": prompt,
                "prompt_ids": ids,
                "generated": gen,
                "margins": margins,
                "logits_first_file": f_first,
                "logits_last_file": f_last,
                "generated_without_swa": gen_full,
                "margins_without_swa": margins_full,
                "swa_changes_output": gen != gen_full,
                "first_divergence_step": next((k for k, (a, b) in enumerate(zip(gen, gen_full)) if a != b), None),
            }
        )
        # numpy cross-check of conversion + SWA emulation (not stored as expected values)
        seq = ids + gen[:-1]
        ref_swa = np_forward(weights, seq, W)
        ref_full = np_forward(weights, ids, None)
        chk = {
            "prompt": i,
            "max_abs_diff_first": float(np.abs(ref_swa[len(ids) - 1] - first).max()),
            "max_abs_diff_last": float(np.abs(ref_swa[-1] - last).max()),
            "max_abs_diff_first_noswa": float(np.abs(ref_full[-1] - first_full).max()),
            "logit_scale": float(np.abs(first).max()),
            "argmax_agree_swa": int(sum(int(np.argmax(ref_swa[len(ids) - 1 + k])) == gen[k] for k in range(N_GEN))),
        }
        checks.append(chk)
        print(i, len(ids), "distinct", len(set(gen)), "swa changes", gen != gen_full,
              "div@", results[-1]["first_divergence_step"], chk)
    dec.close()
    assert any(r["swa_changes_output"] for r in results), "SWA does not change any output: make prompts longer"
    for r in results:
        assert len(set(r["generated"])) > 3, "degenerate greedy output"

    tensor_files = {
        "hf/model.safetensors": sha256_file(HF / "model.safetensors"),
        "hf/tokenizer.model": sha256_file(HF / "tokenizer.model"),
        "tiny-mistral-f16.gguf": sha256_file(GGUF_PATH),
    }
    write_json(
        OUT / "reference.json",
        {
            "generator": generator_info(
                __file__,
                seed=SEED,
                llama_params=dict(n_ctx=N_CTX, n_batch=512, n_threads=N_THREADS, flash_attn=False, seed=0,
                                  kv_cache_type="f16 (default)"),
                swa_emulation="all tokens (prompt and generated) decoded one per llama_batch at explicit positions; before "
                "decoding position p >= W: llama_memory_seq_rm(llama_get_memory(ctx), 0, p-W, p-W+1). "
                "Query at p sees keys p-W+1..p (distance < W).",
                without_swa="same token-by-token loop, nothing removed (plain causal attention over all positions)",
            ),
            "files_sha256": tensor_files,
            "config": CONFIG,
            "sliding_window": W,
            "llama_cpp_model_n_swa": n_swa_llama,
            "n_vocab": CONFIG["vocab_size"],
            "n_gen": N_GEN,
            "add_bos": True,
            "logits_format": "raw little-endian float32 x n_vocab. first = logits after the last prompt token "
            "(distribution of generated[0]); last = logits that produced generated[n_gen-1] (after feeding generated[n_gen-2])",
            "conversion": conv["tensors"],
            "gguf_special_tokens": conv["vocab"],
            "tokenizer_check": {
                "corpus": "tests/fixtures/tokenize/corpus.json",
                "llama_cpp_vs_mistral_common_v3_differences": tok_diffs,
            },
            "numpy_crosscheck": {
                "note": "float32 numpy forward of the HF-layout weights (rotate_half RoPE, window mask); llama.cpp uses f16 "
                "weights/KV so small differences are expected. Sanity check only, not expected values.",
                "per_prompt": checks,
            },
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
