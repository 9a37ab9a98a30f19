"""Shared helpers for the reference-fixture generators in scripts/ref/.

Every generator writes JSON whose top level carries a "generator" block
(script path, package versions) so a fixture can always be traced back to the
exact reference implementation that produced it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"

BRISE_HOME = Path(os.environ.get("BRISE_HOME", str(Path.home() / ".brise")))
MODELS_DIR = BRISE_HOME / "models"

# fixture key -> (GGUF file name under $BRISE_HOME/models, expected sha256)
MODELS = {
    "smollm2": (
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-coder": (
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}

N_THREADS = 2

_PACKAGES = [
    "llama_cpp_python",
    "gguf",
    "mistral_common",
    "numpy",
    "sentencepiece",
    "safetensors",
    "Jinja2",
]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def generator_info(script: str, **extra) -> dict:
    """Provenance block stored under "generator" in every fixture JSON."""
    info = {
        "script": os.path.relpath(Path(script).resolve(), REPO),
        "versions": versions(),
    }
    info.update(extra)
    return info


_sha_cache: dict[Path, str] = {}


def sha256_file(path: Path) -> str:
    path = Path(path).resolve()
    if path not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _sha_cache[path] = h.hexdigest()
    return _sha_cache[path]


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def model_path(key: str, check_sha: bool = True) -> tuple[Path, str]:
    """Return (path, sha256) of a real model; fail loudly if missing or changed."""
    fname, expected = MODELS[key]
    p = MODELS_DIR / fname
    if not p.is_file():
        sys.exit(f"missing model {p} (set BRISE_HOME?)")
    sha = sha256_file(p) if check_sha else expected
    if sha != expected:
        sys.exit(f"sha256 mismatch for {p}: {sha} != {expected}")
    return p, sha


def load_llama(path: Path, **kw):
    import llama_cpp

    args = dict(verbose=False)
    args.update(kw)
    return llama_cpp.Llama(model_path=str(path), **args)


def tokenize(llm, text: str, add_special: bool, parse_special: bool) -> list[int]:
    """llama.cpp llama_tokenize() called directly (same as Llama.tokenize)."""
    import llama_cpp

    vocab = llm._model.vocab
    b = text.encode("utf-8")
    cap = len(b) + 16
    buf = (llama_cpp.llama_token * cap)()
    n = llama_cpp.llama_tokenize(vocab, b, len(b), buf, cap, add_special, parse_special)
    if n < 0:
        cap = -n
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(vocab, b, len(b), buf, cap, add_special, parse_special)
        assert n >= 0
    ids = list(buf[:n])
    # must agree with the high-level wrapper
    assert ids == llm.tokenize(b, add_bos=add_special, special=parse_special)
    return ids


def detokenize(llm, ids: list[int], remove_special: bool = False, unparse_special: bool = False) -> bytes:
    """llama.cpp llama_detokenize() called directly.

    NOT Llama.detokenize(): llama-cpp-python 0.3.36 pieces tokens through a
    32-byte buffer and silently drops longer pieces (e.g. a 64-dash token),
    and strips a leading space after BOS on its own.
    """
    import ctypes

    import llama_cpp

    vocab = llm._model.vocab
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    cap = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(cap)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, cap, remove_special, unparse_special)
    if n < 0:
        cap = -n + 1
        buf = ctypes.create_string_buffer(cap)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, cap, remove_special, unparse_special)
        assert n >= 0
    return buf.raw[:n]


# ---------------------------------------------------------------------------
# JSON output: pretty for objects, but lists of scalars stay on one line so
# that id / float arrays do not explode into one-number-per-line files.


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _dump(v, indent: int, level: int) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError("non-finite float in fixture")
        return repr(v)
    if _is_scalar(v):
        return json.dumps(v, ensure_ascii=False)
    pad = " " * (indent * (level + 1))
    end = " " * (indent * level)
    if isinstance(v, dict):
        if not v:
            return "{}"
        items = [f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {_dump(x, indent, level + 1)}" for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    if isinstance(v, (list, tuple)):
        if not v:
            return "[]"
        if all(_is_scalar(x) for x in v):
            return "[" + ", ".join(_dump(x, indent, level + 1) for x in v) + "]"
        return "[\n" + ",\n".join(pad + _dump(x, indent, level + 1) for x in v) + "\n" + end + "]"
    raise TypeError(f"cannot serialise {type(v)}")


def write_json(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _dump(obj, 1, 0) + "\n"
    json.loads(text)  # sanity: must be valid JSON
    path.write_text(text, encoding="utf-8")
    print(f"wrote {os.path.relpath(path, REPO)} ({path.stat().st_size} bytes)")


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def f32_list(a) -> list[float]:
    """float32 array -> list of Python floats (exact: every f32 is an f64)."""
    import numpy as np

    return [float(x) for x in np.asarray(a, dtype=np.float32).ravel()]


class Decoder:
    """Thin wrapper over llama.cpp's low-level decode API for one sequence (seq 0).

    decode(tokens, pos0) submits one llama_batch with explicit positions
    pos0..pos0+n-1, requests logits only for the last token and returns a
    float32 copy of exactly that row (llama_get_logits_ith(ctx, -1)).
    """

    def __init__(self, llm, n_batch_max: int | None = None):
        import llama_cpp

        self.L = llama_cpp
        self.llm = llm
        self.ctx = llm._ctx.ctx
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        assert self.mem is not None
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llm._model.vocab)
        self.cap = n_batch_max or llm.n_batch
        self.batch = llama_cpp.llama_batch_init(self.cap, 0, 1)

    def close(self):
        if self.batch is not None:
            self.L.llama_batch_free(self.batch)
            self.batch = None

    def clear(self):
        self.L.llama_memory_clear(self.mem, True)

    def seq_rm(self, p0: int, p1: int) -> bool:
        """llama_memory_seq_rm(mem, seq 0, [p0, p1)); p1 < 0 means to the end."""
        return bool(self.L.llama_memory_seq_rm(self.mem, 0, p0, p1))

    def pos_range(self) -> tuple[int, int]:
        return (
            self.L.llama_memory_seq_pos_min(self.mem, 0),
            self.L.llama_memory_seq_pos_max(self.mem, 0),
        )

    def decode(self, tokens: list[int], pos0: int):
        import numpy as np

        n = len(tokens)
        assert 0 < n <= self.cap
        b = self.batch
        b.n_tokens = n
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if i == n - 1 else 0
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        ptr = self.L.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32, copy=True)


def top2_margin(logits) -> tuple[int, float]:
    """(argmax, top1 - top2); argmax is numpy's (first index among equal maxima)."""
    import numpy as np

    i = int(np.argmax(logits))
    top2 = np.partition(logits, -2)[-2:]
    return i, float(np.float32(top2[1]) - np.float32(top2[0]))


def topk(logits, k: int) -> tuple[list[int], list[float]]:
    import numpy as np

    # stable sort on -logits: ties keep ascending id order
    order = np.argsort(-logits, kind="stable")[:k]
    return [int(i) for i in order], [float(logits[i]) for i in order]
