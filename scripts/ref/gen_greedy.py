#!/usr/bin/env python3
"""Greedy-generation + logits fixtures for the real GGUF models (llama.cpp).

Input : tests/fixtures/greedy/prompts.json
Output: tests/fixtures/greedy/<key>.json
        tests/fixtures/greedy/<key>.logits.<i>.f32   (i = 0, 1)

Per prompt: ids = tokenize(prompt, add_special=<GGUF add_bos_token>,
parse_special=False); clear the KV cache; decode the whole prompt as ONE
llama_batch (positions 0..n-1, logits requested for the last token only);
then 64 greedy steps: next = numpy argmax (first max) of the last logits,
decode it as a 1-token batch at the next position. EOS does not stop.
The whole run is done twice and must match exactly (determinism check).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    FIXTURES,
    MODELS,
    N_THREADS,
    Decoder,
    generator_info,
    load_llama,
    model_path,
    read_json,
    tokenize,
    top2_margin,
    topk,
    write_json,
)

N_GEN = 64
N_CTX = 1024
N_BATCH = 512
LOGIT_PROMPTS = (0, 1)


def add_bos_meta(path: Path) -> bool:
    import gguf

    r = gguf.GGUFReader(str(path))
    f = r.fields.get("tokenizer.ggml.add_bos_token")
    return bool(f.contents()) if f is not None else False


def run(llm, dec: Decoder, prompts: list[str], add_bos: bool):
    results, first_logits = [], {}
    for pi, prompt in enumerate(prompts):
        ids = tokenize(llm, prompt, add_special=add_bos, parse_special=False)
        assert 0 < len(ids) <= N_BATCH
        dec.clear()
        logits = dec.decode(ids, 0)  # whole prompt in a single batch
        assert dec.pos_range() == (0, len(ids) - 1)
        first_logits[pi] = logits.copy()
        top5_ids, top5_vals = topk(logits, 5)
        gen, margins = [], []
        pos = len(ids)
        for _ in range(N_GEN):
            nxt, m = top2_margin(logits)
            gen.append(nxt)
            margins.append(m)
            logits = dec.decode([nxt], pos)
            pos += 1
        results.append(
            {
                "prompt": prompt,
                "prompt_ids": ids,
                "prompt_eval": True,  # whole prompt decoded as one llama_batch (n_tokens <= n_batch)
                "generated": gen,
                "margins": margins,
                "top5": {"ids": top5_ids, "logits": top5_vals},
            }
        )
    return results, first_logits


def main() -> None:
    prompts = read_json(FIXTURES / "greedy" / "prompts.json")["prompts"]
    for key in MODELS:
        path, sha = model_path(key)
        add_bos = add_bos_meta(path)
        llm = load_llama(
            path, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=N_THREADS, n_threads_batch=N_THREADS,
            flash_attn=False, seed=0,
        )
        dec = Decoder(llm)
        res1, logits1 = run(llm, dec, prompts, add_bos)
        res2, logits2 = run(llm, dec, prompts, add_bos)
        assert res1 == res2, f"{key}: non-deterministic greedy run"
        for i in logits1:
            assert np.array_equal(logits1[i], logits2[i]), f"{key}: non-deterministic logits"
        n_vocab = dec.n_vocab
        dec.close()
        del llm

        logit_files = {}
        for i in LOGIT_PROMPTS:
            fn = f"{key}.logits.{i}.f32"
            (FIXTURES / "greedy" / fn).write_bytes(logits1[i].astype("<f4").tobytes())
            logit_files[str(i)] = fn
        n_near = sum(1 for r in res1 for m in r["margins"] if m < 0.01)
        print(f"{key}: {len(res1)} prompts, {n_near} steps with margin < 0.01")
        out = {
            "generator": generator_info(
                __file__,
                llama_params=dict(n_ctx=N_CTX, n_batch=N_BATCH, n_ubatch=512, n_threads=N_THREADS,
                                  flash_attn=False, seed=0, kv_cache_type="f16 (default)", logits_all=False),
                procedure="tokenize(prompt, add_special=add_bos, parse_special=False); llama_memory_clear; "
                "llama_decode(prompt as one batch, logits only for last token); then n_gen x "
                "[next = numpy.argmax(logits) (first max); llama_decode([next]) at next position]; no EOS stop. "
                "Run twice, identical.",
            ),
            "model_file": path.name,
            "sha256": sha,
            "add_bos": add_bos,
            "n_vocab": n_vocab,
            "n_gen": N_GEN,
            "logits_files": logit_files,
            "logits_format": "raw little-endian float32, n_vocab values: logits after evaluating the full prompt "
            "(i.e. the distribution for generated[0])",
            "results": res1,
        }
        write_json(FIXTURES / "greedy" / f"{key}.json", out)


if __name__ == "__main__":
    main()
