#!/usr/bin/env python3
"""Dequantization + GGUF-format fixtures.

Outputs (tests/fixtures/dequant/):
  <key>.json               every tensor of each real model, dequantized with
                           gguf.quants.dequantize (cross-checked bit-exactly
                           against ggml's own to_float via ctypes)
  all_types.gguf           synthetic GGUF v3, default alignment (32), one small
                           tensor per ggml type + every metadata value type
  all_types_align64.gguf   same content, general.alignment = 64
  all_types_v2.gguf        same content as all_types.gguf, header version 2
  metadata_nested.gguf     metadata-only file with nested arrays (ggml rejects it)
  all_types.json           expected tensor values (float32 bit patterns) and
                           metadata for all of the above
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ggml_ref  # noqa: E402
from common import (  # noqa: E402
    FIXTURES,
    MODELS,
    f32_list,
    generator_info,
    model_path,
    sha256_bytes,
    sha256_file,
    write_json,
)

OUT = FIXTURES / "dequant"
SEED = 20240601


def f32_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def dequant(t) -> np.ndarray:
    """Reference dequantization (gguf package), float32 C-contiguous, flat (ne0 fastest)."""
    a = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)
    assert a.size == t.n_elements
    b = ggml_ref.to_float(t.tensor_type, t.data, int(t.n_elements))
    if not np.array_equal(a.view(np.uint32), b.view(np.uint32)):
        raise AssertionError(f"{t.name}: gguf.quants and ggml to_float disagree")
    return a


# --------------------------------------------------------------------------- real models


def real_models() -> None:
    for key in MODELS:
        path, sha = model_path(key)
        r = gguf.GGUFReader(str(path))
        rows = []
        for t in r.tensors:
            a = dequant(t)
            rows.append(
                {
                    "name": t.name,
                    "type": t.tensor_type.name,
                    "ne": [int(x) for x in t.shape],
                    "n_elements": int(t.n_elements),
                    "n_bytes": int(t.n_bytes),
                    "file_offset": int(t.data_offset),
                    "sha256": sha256_bytes(f32_bytes(a)),
                    "sum": float(np.sum(a, dtype=np.float64)),
                    "first8": f32_list(a[:8]),
                }
            )
            del a
        write_json(
            OUT / f"{key}.json",
            {
                "generator": generator_info(
                    __file__,
                    call="gguf.GGUFReader(path).tensors[i] -> gguf.quants.dequantize(t.data, t.tensor_type) as float32",
                    cross_check="bit-identical to ggml_get_type_traits(type)->to_float (libggml-base from llama-cpp-python) for every tensor",
                ),
                "model_file": path.name,
                "sha256": sha,
                "ne_order": "ne[0] first (GGUF/ggml order: ne[0] = contiguous row length); numpy shape is ne reversed",
                "file_offset": "absolute byte offset of the tensor data in the GGUF file",
                "value_hash": "sha256 of the dequantized values as little-endian float32, element order = memory order (ne0 fastest)",
                "sum": "float64 sum of the float32 values (numpy pairwise summation; compare with a tolerance)",
                "tensors": rows,
            },
        )


# --------------------------------------------------------------------------- synthetic file

NON_K = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]
K_TYPES = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
# byte offsets of the f16 scale fields inside one 256-element K block: (d, dmin)
K_SCALE_FIELDS = {
    QT.Q2_K: (80, 82),   # scales[16] qs[64] d dmin            (84 bytes)
    QT.Q3_K: (108, None),  # hmask[32] qs[64] scales[12] d      (110 bytes)
    QT.Q4_K: (0, 2),     # d dmin scales[12] qs[128]           (144 bytes)
    QT.Q5_K: (0, 2),     # d dmin scales[12] qh[32] qs[128]    (176 bytes)
    QT.Q6_K: (208, None),  # ql[128] qh[64] scales[16] d        (210 bytes)
}
ROWS, COLS = 2, 512  # numpy shape (ne1=2, ne0=512)


def random_scale(rng, n, signed):
    mag = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), n))
    if signed:
        mag *= rng.choice([-1.0, 1.0], n)
    return mag.astype(np.float16)


def build_tensors(rng) -> list[tuple[str, np.ndarray, QT, tuple]]:
    """Return (name, raw numpy data, ggml type, numpy shape of the logical tensor)."""
    out = []
    base = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    for q in NON_K:
        x = base.copy()
        if q == QT.F32:
            x[0, :8] = [0.0, -0.0, 1e-45, 1.1754942e-38, 3.4028235e38, -3.4028235e38, 1.0 / 3.0, -2.5]
            data = x
        elif q == QT.F16:
            x[0, :8] = [0.0, -0.0, 5.9604645e-08, 6.097555e-05, 65504.0, -65504.0, 1.0 / 3.0, -2.5]
            data = gguf.quants.quantize(x, q)
        elif q == QT.BF16:
            x[0, :8] = [0.0, -0.0, 1e-40, 1.1754942e-38, 3.3895314e38, -1.0, 1.0 / 3.0, -2.5]
            data = gguf.quants.quantize(x, q)
        else:
            data = gguf.quants.quantize(x, q)
        out.append((q.name.lower(), data, q, (ROWS, COLS)))
    bs, ts = gguf.GGML_QUANT_SIZES[QT.Q4_K]
    for q in K_TYPES:
        bs, ts = gguf.GGML_QUANT_SIZES[q]
        n_blocks = ROWS * COLS // bs
        blocks = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
        d_off, dmin_off = K_SCALE_FIELDS[q]
        d = random_scale(rng, n_blocks, signed=True)
        blocks[:, d_off:d_off + 2] = d.view(np.uint8).reshape(n_blocks, 2)
        if dmin_off is not None:
            dmin = random_scale(rng, n_blocks, signed=False)
            blocks[:, dmin_off:dmin_off + 2] = dmin.view(np.uint8).reshape(n_blocks, 2)
        out.append((q.name.lower(), blocks.reshape(ROWS, COLS // bs * ts), q, (ROWS, COLS)))
    for q in K_TYPES:
        # real K-quant data from llama.cpp's own quantizer (ggml_quantize_chunk)
        data = ggml_ref.quantize(q, base)
        out.append((q.name.lower() + ".ggml", data, q, (ROWS, COLS)))
    # odd shapes: 1-D of 7 elements (exercises data padding), 3-D (ne = [4, 3, 2])
    out.append(("f32_1d", rng.standard_normal(7).astype(np.float32), QT.F32, (7,)))
    out.append(("f16_3d", rng.standard_normal((2, 3, 4)).astype(np.float16), QT.F16, (2, 3, 4)))
    return out


# metadata: (key, value, type, elem_type); elem_type only for arrays
def metadata_items() -> list[tuple[str, object, VT, VT | None]]:
    return [
        ("test.u8", 255, VT.UINT8, None),
        ("test.i8", -128, VT.INT8, None),
        ("test.u16", 65535, VT.UINT16, None),
        ("test.i16", -32768, VT.INT16, None),
        ("test.u32", 4294967295, VT.UINT32, None),
        ("test.i32", -2147483648, VT.INT32, None),
        ("test.u64", 18446744073709551615, VT.UINT64, None),
        ("test.i64", -9223372036854775808, VT.INT64, None),
        ("test.f32", 0.1, VT.FLOAT32, None),
        ("test.f32_neg", -1.5e-7, VT.FLOAT32, None),
        ("test.f64", 0.1, VT.FLOAT64, None),
        ("test.f64_big", -1.7976931348623157e308, VT.FLOAT64, None),
        ("test.bool_true", True, VT.BOOL, None),
        ("test.bool_false", False, VT.BOOL, None),
        ("test.str", "hello", VT.STRING, None),
        ("test.str_utf8", "héllo wörld — 😀 日本語 \t\n", VT.STRING, None),
        ("test.str_empty", "", VT.STRING, None),
        ("test.arr_i32", [1, -2, 3, 2147483647], VT.ARRAY, VT.INT32),
        ("test.arr_u8", [0, 1, 255], VT.ARRAY, VT.UINT8),
        ("test.arr_i16", [-32768, 0, 32767], VT.ARRAY, VT.INT16),
        ("test.arr_u64", [0, 18446744073709551615], VT.ARRAY, VT.UINT64),
        ("test.arr_i64", [-9223372036854775808, 1], VT.ARRAY, VT.INT64),
        ("test.arr_f32", [0.5, -1.25, 0.1, 1e-3], VT.ARRAY, VT.FLOAT32),
        ("test.arr_f64", [0.1, -1e300], VT.ARRAY, VT.FLOAT64),
        ("test.arr_bool", [True, False, True], VT.ARRAY, VT.BOOL),
        ("test.arr_str", ["a", "héllo 😀", "", "日本語"], VT.ARRAY, VT.STRING),
        ("test.arr_empty_i32", [], VT.ARRAY, VT.INT32),
        ("test.arr_empty_str", [], VT.ARRAY, VT.STRING),
        ("general.name", "brise all-types test file", VT.STRING, None),
    ]


NESTED_ITEMS = [
    ("test.arr_nested_i32", [[1, 2], [3], [4, 5, 6]], VT.ARRAY, VT.ARRAY),
    ("test.arr_nested_str", [["a"], ["b", "c"]], VT.ARRAY, VT.ARRAY),
    ("test.after_nested", 7, VT.UINT32, None),
]


class Writer(gguf.GGUFWriter):
    """GGUFWriter that can also emit empty arrays (gguf 0.19 refuses them).

    An empty array is encoded exactly like any other array:
    u32 GGUF_TYPE_ARRAY, u32 element type, u64 count (=0), no elements.
    """

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == VT.ARRAY and isinstance(val, (list, tuple)) and len(val) == 0:
            assert sub_type is not None
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)


def write_file(path: Path, tensors, items, alignment: int | None = None) -> None:
    w = Writer(str(path), arch="brise-test")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, val, vt, st in items:
        if vt == VT.ARRAY:
            w.add_key_value(key, val, vt, sub_type=st if st != VT.ARRAY else None)
        else:
            w.add_key_value(key, val, vt)
    for name, data, q, _shape in tensors:
        w.add_tensor(name, data, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def f32_exact(v: float) -> float:
    return float(np.float32(v))


def meta_json(key, val, vt, st):
    e = {"key": key, "type": vt.name}
    if vt == VT.ARRAY:
        e["elem_type"] = st.name
        if st == VT.FLOAT32:
            val = [f32_exact(x) for x in val]
            e["f32_bits"] = [struct.unpack("<I", struct.pack("<f", x))[0] for x in val]
        elif st == VT.ARRAY:
            inner = VT.get_type(val[0][0])
            e["inner_elem_type"] = inner.name
    elif vt == VT.FLOAT32:
        val = f32_exact(val)
        e["f32_bits"] = struct.unpack("<I", struct.pack("<f", val))[0]
    elif vt == VT.FLOAT64:
        e["f64_bits"] = struct.unpack("<Q", struct.pack("<d", val))[0]
    e["value"] = val
    return e


def check_with_readers(path: Path, tensors, items, expect_version: int, expect_align: int):
    """Re-read with gguf.GGUFReader and with ggml's C parser; everything must match."""
    r = gguf.GGUFReader(str(path))
    assert int(r.fields["GGUF.version"].contents()) == expect_version
    for key, val, vt, st in items:
        f = r.fields[key]
        got = f.contents()
        if vt == VT.FLOAT32:
            assert got == f32_exact(val), (key, got)
        elif vt == VT.ARRAY and st == VT.FLOAT32:
            assert got == [f32_exact(x) for x in val], (key, got)
        elif vt == VT.ARRAY and len(val) == 0:
            assert got == [] or got is None or len(got) == 0, (key, got)
        else:
            assert got == val, (key, got, val)
    for (name, data, q, shape), t in zip(tensors, r.tensors):
        assert t.name == name and t.tensor_type == q
        assert [int(x) for x in t.shape] == list(reversed(shape))
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), np.asarray(data).view(np.uint8).reshape(-1))
    g = ggml_ref.read_gguf(path)
    assert g is not None, f"ggml rejected {path}"
    assert g["version"] == expect_version and g["alignment"] == expect_align
    for key, val, vt, st in items:
        gt, gst, gval = g["kv"][key]
        assert gt == vt.name, (key, gt)
        if vt == VT.ARRAY:
            assert gst == st.name, (key, gst)
            want = [f32_exact(x) for x in val] if st == VT.FLOAT32 else val
        else:
            want = f32_exact(val) if vt == VT.FLOAT32 else val
        assert gval == want, (key, gval, want)
    for (name, data, q, shape), gt, t in zip(tensors, g["tensors"], r.tensors):
        assert gt["name"] == name and gt["type"] == int(q)
        assert g["data_offset"] + gt["offset"] == t.data_offset
        assert gt["offset"] % expect_align == 0
    return g


def synthetic() -> None:
    rng = np.random.default_rng(SEED)
    tensors = build_tensors(rng)
    items = metadata_items()

    p_main = OUT / "all_types.gguf"
    p_a64 = OUT / "all_types_align64.gguf"
    p_v2 = OUT / "all_types_v2.gguf"
    p_nested = OUT / "metadata_nested.gguf"

    write_file(p_main, tensors, items)
    write_file(p_a64, tensors, items, alignment=64)
    # gguf 0.19 has no API for older versions; its header writer uses the module
    # constant GGUF_VERSION, so a v2 file is produced by patching that constant.
    # (GGUF v2 and v3 are byte-identical in little-endian files.)
    import gguf.gguf_writer as gw_mod

    saved = gw_mod.GGUF_VERSION
    gw_mod.GGUF_VERSION = 2
    try:
        write_file(p_v2, tensors, items)
    finally:
        gw_mod.GGUF_VERSION = saved
    write_file(p_nested, [], NESTED_ITEMS)

    g_main = check_with_readers(p_main, tensors, items, 3, 32)
    g_a64 = check_with_readers(p_a64, tensors, items, 3, 64)
    g_v2 = check_with_readers(p_v2, tensors, items, 2, 32)
    assert p_v2.read_bytes()[8:] == p_main.read_bytes()[8:], "v2 copy should differ only in the version field"

    # nested arrays: gguf.GGUFReader parses the framing (the key after them reads
    # back correctly) but its .contents() flattens them; ggml's C reader rejects the file
    rn = gguf.GGUFReader(str(p_nested))
    for key, val, vt, st in NESTED_ITEMS:
        got = rn.fields[key].contents()
        if st == VT.ARRAY:
            assert got == [x for inner in val for x in inner], (key, got)
        else:
            assert got == val, (key, got)
    nested_ggml_ok = ggml_ref.read_gguf(p_nested) is not None

    # expected dequantized values
    r = gguf.GGUFReader(str(p_main))
    tj = []
    for (name, data, q, shape), t, gt in zip(tensors, r.tensors, g_main["tensors"]):
        a = dequant(t)
        tj.append(
            {
                "name": name,
                "type": q.name,
                "ne": [int(x) for x in t.shape],
                "n_elements": int(t.n_elements),
                "n_bytes": int(t.n_bytes),
                "offset": gt["offset"],
                "sha256": sha256_bytes(f32_bytes(a)),
                "f32_bits": [int(x) for x in a.view(np.uint32)],
                "first8": f32_list(a[:8]),
                "source": (
                    "gguf.quants.quantize(normal data)" if q in NON_K and q not in (QT.F32, QT.F16)
                    else "ggml_quantize_chunk(normal data)" if name.endswith(".ggml")
                    else "seeded random block bytes; f16 d/dmin fields overwritten with finite values, |d| in [1e-3, 1e-1]"
                    if q in K_TYPES else "plain values"
                ),
            }
        )

    def file_info(p, g):
        return {
            "sha256": sha256_file(p),
            "size": p.stat().st_size,
            "version": g["version"],
            "alignment": g["alignment"],
            "data_offset": g["data_offset"],
            "tensor_offsets": [t["offset"] for t in g["tensors"]],
            "n_kv": len(g["kv"]),
        }

    auto_kv = [
        {"key": "general.architecture", "type": "STRING", "value": "brise-test"},
    ]
    write_json(
        OUT / "all_types.json",
        {
            "generator": generator_info(
                __file__,
                writer="gguf.GGUFWriter (subclass adding empty-array support), seed %d" % SEED,
                dequant="gguf.quants.dequantize; identical bit-for-bit to ggml to_float",
                verified="each file re-read with gguf.GGUFReader and ggml's C gguf_init_from_file (via ctypes)",
            ),
            "files": {
                "all_types.gguf": file_info(p_main, g_main),
                "all_types_align64.gguf": dict(
                    file_info(p_a64, g_a64),
                    note="same tensors/metadata plus general.alignment (UINT32) = 64, written right after general.architecture",
                ),
                "all_types_v2.gguf": dict(
                    file_info(p_v2, g_v2),
                    note="byte-identical to all_types.gguf except the u32 version field (2); written by patching gguf.gguf_writer.GGUF_VERSION",
                ),
                "metadata_nested.gguf": {
                    "sha256": sha256_file(p_nested),
                    "size": p_nested.stat().st_size,
                    "version": 3,
                    "n_tensors": 0,
                    "metadata": [{"key": "general.architecture", "type": "STRING", "value": "brise-test"}]
                    + [meta_json(*it) for it in NESTED_ITEMS],
                    "gguf_py_reads_it": "yes, but GGUFReader.contents() returns nested arrays flattened",
                    "ggml_c_reader_accepts": nested_ggml_ok,
                    "note": "arrays of arrays: outer elem type ARRAY, each element = u32 inner elem type, u64 count, items. "
                    "ggml's C reader (llama.cpp) rejects nested arrays ('invalid GGUF type 9').",
                },
            },
            "metadata": auto_kv + [meta_json(*it) for it in items],
            "metadata_order": "file order; general.architecture is first (added by GGUFWriter); align64 file inserts general.alignment second",
            "tensors_note": "ne: GGUF order (ne[0] = contiguous row length). offset: relative to the data section start "
            "(data_offset in files{}). f32_bits: dequantized values as IEEE-754 float32 bit patterns (u32), memory order.",
            "tensors": tj,
        },
    )


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    synthetic()
    if "--synthetic-only" not in sys.argv:
        real_models()


if __name__ == "__main__":
    main()
