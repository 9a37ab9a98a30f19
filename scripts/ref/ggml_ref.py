"""ctypes bindings to the ggml library bundled with llama-cpp-python.

Used as a *second* reference next to the pure-Python `gguf` package:
  - to_float(type, raw)       : ggml's own dequantizer (ggml_get_type_traits()->to_float)
  - quantize(type, f32 rows)  : ggml_quantize_chunk (llama.cpp's real quantizer)
  - read_gguf(path)           : ggml's C GGUF parser (gguf_init_from_file), dumped to Python
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

import llama_cpp

_LIB_DIR = Path(llama_cpp.__file__).resolve().parent / "lib"
lib = ctypes.CDLL(str(_LIB_DIR / "libggml-base.so"))

_to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
lib.ggml_quantize_chunk.restype = ctypes.c_size_t
lib.ggml_quantize_chunk.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
]
lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]


def traits(qtype: int) -> _TypeTraits:
    return lib.ggml_get_type_traits(int(qtype)).contents


def to_float(qtype: int, raw: np.ndarray, n_elements: int) -> np.ndarray:
    """Dequantize raw tensor bytes with ggml's to_float (F32: plain copy)."""
    raw = np.ascontiguousarray(raw)
    if int(qtype) == 0:  # F32 has no to_float
        return raw.view(np.float32).reshape(-1).copy()
    t = traits(qtype)
    if not t.to_float:
        raise NotImplementedError(f"ggml has no to_float for type {qtype}")
    out = np.empty(n_elements, dtype=np.float32)
    fn = _to_float_t(t.to_float)
    fn(raw.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n_elements)
    return out


def quantize(qtype: int, rows: np.ndarray) -> np.ndarray:
    """ggml_quantize_chunk over a 2-D float32 array (n_rows, n_per_row) -> uint8 (n_rows, row_bytes)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    assert rows.ndim == 2
    n_rows, n_per_row = rows.shape
    t = traits(qtype)
    assert n_per_row % t.blck_size == 0
    row_bytes = n_per_row // t.blck_size * t.type_size
    out = np.zeros((n_rows, row_bytes), dtype=np.uint8)
    n = lib.ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, None)
    assert n == out.nbytes, (n, out.nbytes)
    return out


# --------------------------------------------------------------------------- GGUF (C parser)


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


_sigs = {
    "gguf_init_from_file": (ctypes.c_void_p, [ctypes.c_char_p, _InitParams]),
    "gguf_free": (None, [ctypes.c_void_p]),
    "gguf_get_version": (ctypes.c_uint32, [ctypes.c_void_p]),
    "gguf_get_alignment": (ctypes.c_size_t, [ctypes.c_void_p]),
    "gguf_get_data_offset": (ctypes.c_size_t, [ctypes.c_void_p]),
    "gguf_get_n_kv": (ctypes.c_int64, [ctypes.c_void_p]),
    "gguf_get_key": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
    "gguf_get_kv_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
    "gguf_get_arr_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
    "gguf_get_arr_n": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
    "gguf_get_arr_data": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int64]),
    "gguf_get_arr_str": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t]),
    "gguf_get_val_data": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int64]),
    "gguf_get_val_str": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
    "gguf_get_n_tensors": (ctypes.c_int64, [ctypes.c_void_p]),
    "gguf_get_tensor_name": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
    "gguf_get_tensor_offset": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
    "gguf_get_tensor_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
    "gguf_get_tensor_size": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
}
for _name, (_res, _args) in _sigs.items():
    _f = getattr(lib, _name)
    _f.restype = _res
    _f.argtypes = _args

# gguf_type enum (gguf.h)
GGUF_TYPES = {
    0: ("UINT8", "B"), 1: ("INT8", "b"), 2: ("UINT16", "<u2"), 3: ("INT16", "<i2"), 4: ("UINT32", "<u4"),
    5: ("INT32", "<i4"), 6: ("FLOAT32", "<f4"), 7: ("BOOL", "?"), 8: ("STRING", None), 9: ("ARRAY", None),
    10: ("UINT64", "<u8"), 11: ("INT64", "<i8"), 12: ("FLOAT64", "<f8"),
}


def _scalar(ptr: int, dt: str):
    dtype = np.dtype(dt)
    buf = (ctypes.c_char * dtype.itemsize).from_address(ptr)
    return np.frombuffer(bytes(buf), dtype=dtype)[0].item()


def read_gguf(path) -> dict | None:
    """Parse a GGUF file with ggml's C reader. Returns None if ggml rejects it."""
    ctx = lib.gguf_init_from_file(os.fsencode(str(path)), _InitParams(True, None))
    if not ctx:
        return None
    try:
        out = {
            "version": lib.gguf_get_version(ctx),
            "alignment": lib.gguf_get_alignment(ctx),
            "data_offset": lib.gguf_get_data_offset(ctx),
            "kv": {},
            "tensors": [],
        }
        for i in range(lib.gguf_get_n_kv(ctx)):
            key = lib.gguf_get_key(ctx, i).decode("utf-8")
            t = lib.gguf_get_kv_type(ctx, i)
            if t == 9:
                at = lib.gguf_get_arr_type(ctx, i)
                n = lib.gguf_get_arr_n(ctx, i)
                if at == 8:
                    val = [lib.gguf_get_arr_str(ctx, i, j).decode("utf-8") for j in range(n)]
                elif n == 0:
                    val = []
                else:
                    dt = np.dtype(GGUF_TYPES[at][1])
                    p = lib.gguf_get_arr_data(ctx, i)
                    raw = bytes((ctypes.c_char * (dt.itemsize * n)).from_address(p))
                    val = np.frombuffer(raw, dtype=dt).tolist()
                out["kv"][key] = ("ARRAY", GGUF_TYPES[at][0], val)
            elif t == 8:
                out["kv"][key] = ("STRING", None, lib.gguf_get_val_str(ctx, i).decode("utf-8"))
            else:
                out["kv"][key] = (GGUF_TYPES[t][0], None, _scalar(lib.gguf_get_val_data(ctx, i), GGUF_TYPES[t][1]))
        for i in range(lib.gguf_get_n_tensors(ctx)):
            out["tensors"].append(
                {
                    "name": lib.gguf_get_tensor_name(ctx, i).decode("utf-8"),
                    "type": lib.gguf_get_tensor_type(ctx, i),
                    "offset": lib.gguf_get_tensor_offset(ctx, i),
                    "size": lib.gguf_get_tensor_size(ctx, i),
                }
            )
        return out
    finally:
        lib.gguf_free(ctx)
