#!/usr/bin/env python3
"""Matrix-product fixtures from ggml's own CPU kernels.

Every expected value is an output of a real ggml MUL_MAT computed by the bundled
libggml-cpu (llama-cpp-python 0.3.36): a two-node ggml graph (weight, f32 activations)
run on the CPU backend through ctypes. Weights are quantized by ggml itself
(ggml_quantize_chunk); with `repack` the weight tensor lives in a CPU_REPACK buffer
(ggml_backend_cpu_repack_buffer_type, the buffer llama.cpp's model loader uses for every
repackable matrix), so ggml runs the repacked GEMV/GEMM kernels exactly as in a model.

Outputs (tests/fixtures/matmul/):
  index.json   cases, offsets into matmul.bin, provenance, and for every case and
               activation row whether ggml's result equals the one-row (n = 1) run
  cases.txt    the same index as whitespace-separated text (read by the Rust test)
  matmul.bin   little-endian blobs: the shared activation pool (f32), the weight
               matrices (GGUF block layout) and every case's f32 output

Checks done while generating (the script fails otherwise):
  - every case gives bit-identical outputs with 1, 2 and 3 threads;
  - running the same graph twice gives identical outputs.

The fixtures also hold a few MUL_MATs captured inside a real llama.cpp forward pass of
Qwen2.5-Coder (cb_eval callback): the first 8 rows of the weight, the layer input and
llama.cpp's output (see MODEL_CASES). The script asserts that the harness reproduces
each captured output bit for bit.

`--check-model` only runs the real Qwen2.5-Coder model through llama.cpp with a
cb_eval callback, captures the input and output of a few MUL_MATs (Q5_0, Q6_K, Q4_K
weights) for several ubatch sizes, recomputes them with the harness above (same weight
bytes, same buffer type) and asserts bit equality. It writes nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ggml_ref  # noqa: E402
from common import FIXTURES, generator_info, model_path, write_json  # noqa: E402

OUT = FIXTURES / "matmul"
SEED = 20250611
POOL_ROWS = 24
POOL_K = 1024

# ggml_type ids
T = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}

# --------------------------------------------------------------------------- ggml graph harness

base = ggml_ref.lib
cpu = ctypes.CDLL(str(ggml_ref._LIB_DIR / "libggml-cpu.so"))
P = ctypes.c_void_p


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _sig(lib, name, res, args):
    f = getattr(lib, name)
    f.restype = res
    f.argtypes = args
    return f


ggml_init = _sig(base, "ggml_init", P, [_InitParams])
ggml_free = _sig(base, "ggml_free", None, [P])
ggml_new_tensor_2d = _sig(base, "ggml_new_tensor_2d", P, [P, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])
ggml_mul_mat = _sig(base, "ggml_mul_mat", P, [P, P, P])
ggml_new_graph = _sig(base, "ggml_new_graph", P, [P])
ggml_build_forward_expand = _sig(base, "ggml_build_forward_expand", None, [P, P])
alloc_from_buft = _sig(base, "ggml_backend_alloc_ctx_tensors_from_buft", P, [P, P])
buffer_free = _sig(base, "ggml_backend_buffer_free", None, [P])
tensor_set = _sig(base, "ggml_backend_tensor_set", None, [P, P, ctypes.c_size_t, ctypes.c_size_t])
tensor_get = _sig(base, "ggml_backend_tensor_get", None, [P, P, ctypes.c_size_t, ctypes.c_size_t])
graph_compute = _sig(base, "ggml_backend_graph_compute", ctypes.c_int, [P, P])
cpu_buffer_type = _sig(base, "ggml_backend_cpu_buffer_type", P, [])
backend_cpu_init = _sig(cpu, "ggml_backend_cpu_init", P, [])
backend_cpu_set_n_threads = _sig(cpu, "ggml_backend_cpu_set_n_threads", None, [P, ctypes.c_int])
# C++ symbol (not extern "C") in ggml-cpu/repack.cpp
repack_buffer_type = _sig(cpu, "_Z35ggml_backend_cpu_repack_buffer_typev", P, [])

_backends: dict[int, int] = {}


def _backend(n_threads: int):
    if n_threads not in _backends:
        b = backend_cpu_init()
        backend_cpu_set_n_threads(b, n_threads)
        _backends[n_threads] = b
    return _backends[n_threads]


def ggml_matmul(wtype: int, wbytes: np.ndarray, k: int, x: np.ndarray, n_threads: int, repack: bool) -> np.ndarray:
    """out[j, r] = ggml MUL_MAT(W, x): W = wbytes (rows, row_bytes) of type wtype (k per row), x (n, k) f32."""
    wbytes = np.ascontiguousarray(wbytes, dtype=np.uint8)
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = wbytes.shape[0], x.shape[0]
    assert x.shape[1] == k
    cw = ggml_init(_InitParams(1 << 16, None, True))
    w = ggml_new_tensor_2d(cw, wtype, k, rows)
    bw = alloc_from_buft(cw, repack_buffer_type() if repack else cpu_buffer_type())
    assert bw
    tensor_set(w, wbytes.ctypes.data, 0, wbytes.nbytes)  # the repack buffer repacks here
    c = ggml_init(_InitParams(1 << 20, None, True))
    xt = ggml_new_tensor_2d(c, 0, k, n)
    y = ggml_mul_mat(c, w, xt)
    g = ggml_new_graph(c)
    ggml_build_forward_expand(g, y)
    bx = alloc_from_buft(c, cpu_buffer_type())
    assert bx
    tensor_set(xt, x.ctypes.data, 0, x.nbytes)
    assert graph_compute(_backend(n_threads), g) == 0
    out = np.empty((n, rows), dtype=np.float32)
    tensor_get(y, out.ctypes.data, 0, out.nbytes)
    buffer_free(bx)
    buffer_free(bw)
    ggml_free(c)
    ggml_free(cw)
    return out


def checked_matmul(wtype, wbytes, k, x, repack) -> np.ndarray:
    """ggml_matmul with 1, 2 and 3 threads (and twice with 2); all must agree bit for bit."""
    outs = [ggml_matmul(wtype, wbytes, k, x, t, repack) for t in (2, 1, 3, 2)]
    for o in outs[1:]:
        if not np.array_equal(o.view(np.uint32), outs[0].view(np.uint32)):
            raise AssertionError("ggml output depends on the thread count or is not deterministic")
    return outs[0]


# --------------------------------------------------------------------------- inputs


def make_pool(rng) -> np.ndarray:
    """Activation rows with varied magnitudes; row 2 has +amax and -amax in every 256-block."""
    x = rng.standard_normal((POOL_ROWS, POOL_K)).astype(np.float32)
    scales = np.array([1.0, 0.01, 1.0, 30.0, 1.0, 0.5, 3.0, 1.0] * 3, dtype=np.float32)
    x *= scales[:, None]
    # heavy-tailed rows
    x[5] = (rng.standard_t(3, POOL_K) * 0.2).astype(np.float32)
    x[11] = np.where(rng.random(POOL_K) < 0.05, 8.0, 0.1).astype(np.float32) * rng.standard_normal(POOL_K).astype(np.float32)
    # a row whose every Q8_K block holds both +amax and -amax (sign choice of quantize_mat_q8_K_4x8)
    for b in range(POOL_K // 256):
        blk = x[2, 256 * b: 256 * (b + 1)]
        m = np.float32(np.abs(blk).max() * 1.25)
        blk[7] = m
        blk[100] = -m
    return x


def make_weight(rng, wtype: int, rows: int, k: int) -> np.ndarray:
    w = rng.standard_normal((rows, k)).astype(np.float32)
    w *= np.float32(0.05) * (1.0 + 4.0 * rng.random((rows, 1)).astype(np.float32))
    # a few outlier columns, as in real checkpoints
    cols = rng.choice(k, size=k // 64, replace=False)
    w[:, cols] *= np.float32(6.0)
    if wtype == T["F16"]:
        return w.astype("<f2").view(np.uint8).reshape(rows, -1)
    return ggml_ref.quantize(wtype, w)


# (type, weight rows, k, repack buffer, activation row counts)
CASES = [
    # decode path of Qwen (n = 1) and tinyBLAS_Q0 (n >= 2)
    ("Q5_0", 24, 1024, False, [1, 2, 3, 4, 5, 8, 19]),
    ("Q8_0", 24, 1024, False, [1, 2, 3, 5, 9, 19]),
    ("Q4_0", 20, 1024, False, [1, 3, 6]),
    # Q4_0 with rows % 8 == 0 in the repack buffer: 8x8 GEMV / GEMM
    ("Q4_0", 24, 1024, True, [1, 3, 4, 7, 19]),
    # Q4_1 / Q5_1: vec_dot for every n
    ("Q4_1", 24, 1024, False, [1, 3, 9]),
    ("Q5_1", 24, 1024, False, [1, 3, 9]),
    # K-quants without repack: vec_dot for n < 8, tiled for n >= 8 (narrow <= 16 < standard)
    ("Q6_K", 24, 1024, False, [1, 5, 7, 8, 9, 16, 19, 23]),
    ("Q5_K", 24, 1024, False, [1, 7, 9, 19]),
    ("Q3_K", 24, 1024, False, [1, 7, 9, 19]),
    ("Q4_K", 20, 1024, False, [1, 7, 9, 19]),
    ("Q2_K", 20, 1024, False, [1, 7, 9, 19]),
    # repacked Q4_K / Q2_K (rows % 8 == 0): GEMM for rows < n - n % 4, GEMV for the rest.
    # 24 rows = one 16-column AVX-512 group + an 8-column AVX2 tail; n = 19 / 23 reach
    # the 16-row GEMM loop, n = 23 also its 4-row loop.
    ("Q4_K", 24, 1024, True, [1, 3, 4, 5, 8, 19, 23]),
    ("Q2_K", 24, 1024, True, [1, 3, 4, 5, 19, 23]),
    # F16: vec_dot for n = 1, tinyBLAS for n >= 2 if k % 16 == 0 and rows % 4 == 0
    ("F16", 24, 1024, False, [1, 2, 5, 19]),
    ("F16", 24, 1000, False, [1, 3]),
    ("F16", 22, 1024, False, [3]),
]


class Blob:
    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, b: bytes) -> dict:
        pad = (-self.size) % 16
        if pad:
            self.parts.append(b"\0" * pad)
            self.size += pad
        off = self.size
        self.parts.append(b)
        self.size += len(b)
        return {"offset": off, "bytes": len(b)}


def generate() -> None:
    rng = np.random.default_rng(SEED)
    pool = make_pool(rng)
    blob = Blob()
    index = {
        "generator": generator_info(
            __file__,
            seed=SEED,
            procedure=(
                "out = ggml MUL_MAT(W, x) on the CPU backend of the bundled libggml-cpu, graph built with "
                "ggml_new_tensor_2d/ggml_mul_mat and run by ggml_backend_graph_compute; W quantized by "
                "ggml_quantize_chunk (F16: numpy astype); repack=true puts W in the CPU_REPACK buffer type. "
                "Each case was computed with 1, 2 and 3 threads, all bit-identical."
            ),
        ),
        "pool": {"rows": POOL_ROWS, "k": POOL_K, **blob.add(pool.astype("<f4").tobytes())},
        "weights": [],
        "cases": [],
    }
    weights: dict[tuple, tuple[int, np.ndarray]] = {}
    for name, rows, k, repack, ns in CASES:
        wt = T[name]
        key = (name, rows, k)
        if key not in weights:
            wb = make_weight(rng, wt, rows, k)
            weights[key] = (len(index["weights"]), wb)
            index["weights"].append({"type": name, "rows": rows, "k": k, "row_bytes": wb.shape[1], **blob.add(wb.tobytes())})
        wi, wb = weights[key]
        for n in ns:
            x = pool[:n, :k]
            out = checked_matmul(wt, wb, k, x, repack)
            same_as_single = []
            for j in range(n):
                one = ggml_matmul(wt, wb, k, x[j: j + 1], 1, repack)[0]
                same_as_single.append(bool(np.array_equal(one.view(np.uint32), out[j].view(np.uint32))))
            index["cases"].append(
                {
                    "type": name,
                    "weight": wi,
                    "w_rows": rows,
                    "k": k,
                    "n": n,
                    "repack": repack,
                    "rows_equal_single_row_run": same_as_single,
                    "out": blob.add(out.astype("<f4").tobytes()),
                }
            )
            print(f"{name:5} rows={rows} k={k} repack={int(repack)} n={n:2}: equal to n=1 run: {same_as_single}")
    # real-model cases: llama.cpp's own outputs inside a forward pass of Qwen2.5-Coder
    mpath, msha = model_path("qwen2.5-coder")
    caps, tensors = capture_model(sorted({n for _, ns in MODEL_CASES for n in ns}), {nm for nm, _ in MODEL_CASES})
    index["model"] = {
        "file": mpath.name,
        "sha256": msha,
        "procedure": (
            "llama.cpp forward pass (llama_decode, one ubatch of n tokens 100 + 37 i, 2 threads) with a cb_eval "
            "callback capturing src1 and the result of the MUL_MAT of each listed weight; only the first "
            f"{MODEL_ROWS} weight rows and output columns are stored. The harness above reproduces every full "
            "captured output bit for bit (checked while generating)."
        ),
        "cases": [],
    }
    for name, ns in MODEL_CASES:
        t = tensors[name]
        wb, rows, k = weight_rows(t)
        repack = is_repacked(t.tensor_type.name, rows)
        wrec = blob.add(np.ascontiguousarray(wb[:MODEL_ROWS]).tobytes())
        for n in ns:
            x, y = caps[(n, name)]
            mine = ggml_matmul(int(t.tensor_type), wb, k, x, 2, repack)
            assert np.array_equal(mine.view(np.uint32), y.view(np.uint32)), f"harness != llama.cpp for {name} n={n}"
            index["model"]["cases"].append(
                {
                    "tensor": name,
                    "type": t.tensor_type.name,
                    "w_rows": rows,
                    "stored_rows": MODEL_ROWS,
                    "k": k,
                    "n": n,
                    "repack": repack,
                    "row_bytes": wb.shape[1],
                    "weight": wrec,
                    "x": blob.add(x.astype("<f4").tobytes()),
                    "out": blob.add(np.ascontiguousarray(y[:, :MODEL_ROWS]).astype("<f4").tobytes()),
                }
            )
            print(f"model {name} ({t.tensor_type.name} {rows}x{k}) n={n}: captured")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "matmul.bin").write_bytes(b"".join(blob.parts))
    index["bin"] = {"file": "matmul.bin", "bytes": blob.size}
    write_json(OUT / "index.json", index)
    # the same index as plain text, for the Rust test (brise-kernels has no JSON parser)
    lines = [
        "# Generated by scripts/ref/gen_matmul_exact.py from ggml; see index.json for provenance.",
        "# pool <rows> <k> <offset>",
        "# weight <id> <type> <rows> <k> <row_bytes> <offset>",
        "# case <type> <weight id> <w_rows> <k> <n> <repack 0|1> <out offset> <rows equal to the n=1 run: T/F per row>",
        f"pool {POOL_ROWS} {POOL_K} {index['pool']['offset']}",
    ]
    for i, w in enumerate(index["weights"]):
        lines.append(f"weight {i} {w['type']} {w['rows']} {w['k']} {w['row_bytes']} {w['offset']}")
    for c in index["cases"]:
        eq = "".join("T" if v else "F" for v in c["rows_equal_single_row_run"])
        lines.append(f"case {c['type']} {c['weight']} {c['w_rows']} {c['k']} {c['n']} {int(c['repack'])} {c['out']['offset']} {eq}")
    lines.append(
        "# mcase <type> <tensor> <w_rows of the full matrix> <stored rows> <k> <n> <repack 0|1> <row_bytes> "
        "<weight offset> <x offset> <out offset>   (out: n x stored rows)"
    )
    for c in index["model"]["cases"]:
        lines.append(
            f"mcase {c['type']} {c['tensor']} {c['w_rows']} {c['stored_rows']} {c['k']} {c['n']} {int(c['repack'])} "
            f"{c['row_bytes']} {c['weight']['offset']} {c['x']['offset']} {c['out']['offset']}"
        )
    (OUT / "cases.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT / 'matmul.bin'} ({blob.size} bytes) and index.json ({len(index['cases'])} cases)")


# --------------------------------------------------------------------------- real-model check


class _Tensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8),
    ]


def capture_model(n_tokens: list[int], wanted: set[str]) -> tuple[dict, dict]:
    """Run the real Qwen model in llama.cpp (2 threads, one ubatch of n tokens) and capture the
    f32 input (src1) and output of the MUL_MATs whose weight is in `wanted`.
    Returns ({(n, name): (x (n, k), y (n, rows))}, {name: gguf tensor})."""
    import gguf
    import llama_cpp

    path, _ = model_path("qwen2.5-coder")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors if t.name in wanted}
    captured: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def as_array(tp) -> np.ndarray:
        t = _Tensor.from_address(tp)
        ne = list(t.ne)
        assert t.type == 0 and t.nb[1] == 4 * ne[0] and ne[2] == 1 and ne[3] == 1, "not a contiguous 2-D f32"
        n = ne[0] * ne[1]
        a = np.ctypeslib.as_array(ctypes.cast(t.data, ctypes.POINTER(ctypes.c_float)), shape=(n,))
        return a.copy().reshape(ne[1], ne[0])

    CB = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)

    def cb(tp, ask, _ud):
        t = _Tensor.from_address(tp)
        if t.op != 29:  # GGML_OP_MUL_MAT
            return False if ask else True
        wname = _Tensor.from_address(t.src[0]).name.decode()
        if ask:
            return wname in wanted
        captured[wname] = (as_array(t.src[1]), as_array(tp))
        return True

    cbf = CB(cb)
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    out = {}
    for n_tok in n_tokens:
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = 256
        cp.n_batch = 64
        cp.n_ubatch = 64
        cp.n_threads = 2
        cp.n_threads_batch = 2
        cp.cb_eval = cbf
        ctx = llama_cpp.llama_init_from_model(model, cp)
        batch = llama_cpp.llama_batch_init(64, 0, 1)
        batch.n_tokens = n_tok
        for i in range(n_tok):
            batch.token[i] = 100 + 37 * i
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if i == n_tok - 1 else 0
        captured.clear()
        assert llama_cpp.llama_decode(ctx, batch) == 0
        for wname in wanted:
            assert wname in captured, f"n={n_tok}: {wname} not captured"
            out[(n_tok, wname)] = captured[wname]
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return out, tensors


def weight_rows(t) -> tuple[np.ndarray, int, int]:
    rows, k = int(t.shape[1]), int(t.shape[0])
    return np.asarray(t.data, dtype=np.uint8).reshape(rows, -1), rows, k


def is_repacked(type_name: str, rows: int) -> bool:
    return type_name in ("Q4_K", "Q4_0", "Q2_K") and rows % 8 == 0


def check_model() -> None:
    """Recompute captured llama.cpp MUL_MATs with the harness (same weight bytes and buffer type)."""
    wanted = {"blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.2.ffn_down.weight", "blk.0.ffn_gate.weight"}
    caps, tensors = capture_model([1, 2, 3, 5, 8, 9, 19], wanted)
    ok = True
    for (n_tok, wname), (x, y) in sorted(caps.items()):
        t = tensors[wname]
        wb, rows, k = weight_rows(t)
        repack = is_repacked(t.tensor_type.name, rows)
        mine = ggml_matmul(int(t.tensor_type), wb, k, x, 2, repack)
        same = np.array_equal(mine.view(np.uint32), y.view(np.uint32))
        ok &= same
        note = ""
        if repack:
            # evidence that llama.cpp really runs the repacked kernels for this matrix
            plain = ggml_matmul(int(t.tensor_type), wb, k, x, 2, False)
            also = np.array_equal(plain.view(np.uint32), y.view(np.uint32))
            note = f" (without CPU_REPACK the harness would {'also match' if also else 'differ'})"
        print(f"  n={n_tok:2} {wname:24} {t.tensor_type.name} {rows}x{k}: harness == llama.cpp: {same}{note}")
    print("model check:", "OK" if ok else "MISMATCH")
    if not ok:
        sys.exit(1)


# (tensor, ubatch sizes) captured from the real model for the fixtures; only the first
# MODEL_ROWS weight rows (and output columns) are stored
MODEL_CASES = [
    ("blk.0.attn_q.weight", [1, 3]),  # Q5_0 896x896: vec_dot, tinyBLAS_Q0
    ("blk.0.ffn_down.weight", [1, 8]),  # Q6_K 4864->896: vec_dot, tiled (narrow, num_k = 1)
    ("blk.2.ffn_down.weight", [5]),  # Q4_K 4864->896, repacked: GEMM rows 0..4, GEMV row 4
]
MODEL_ROWS = 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-model", action="store_true", help="only compare the harness with llama.cpp on the real Qwen model")
    args = ap.parse_args()
    if args.check_model:
        check_model()
    else:
        generate()


if __name__ == "__main__":
    main()
