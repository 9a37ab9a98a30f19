//! The GGUF reader on real files (against the gguf Python package) and on broken ones.

mod common;
use brise_kernels::GgmlType;
use brise_kernels::quant::dequantize_row;
use brise_model::gguf::{GgufFile, Value, ValueType, parse_bytes};
use common::*;
use serde_json::Value as J;
use sha2::{Digest, Sha256};

fn type_name(t: ValueType) -> &'static str {
    match t {
        ValueType::U8 => "UINT8",
        ValueType::I8 => "INT8",
        ValueType::U16 => "UINT16",
        ValueType::I16 => "INT16",
        ValueType::U32 => "UINT32",
        ValueType::I32 => "INT32",
        ValueType::F32 => "FLOAT32",
        ValueType::Bool => "BOOL",
        ValueType::String => "STRING",
        ValueType::Array => "ARRAY",
        ValueType::U64 => "UINT64",
        ValueType::I64 => "INT64",
        ValueType::F64 => "FLOAT64",
    }
}

/// Compares one metadata value with the fixture's JSON (floats by their bits).
fn check_value(key: &str, v: &Value, want: &J, bits: Option<&J>) {
    match v {
        Value::F32(f) => assert_eq!(f.to_bits() as u64, bits.unwrap().as_u64().unwrap(), "{key}"),
        // f64 values without recorded bits are printed with Python's round-trip repr.
        Value::F64(f) => match bits {
            Some(b) => assert_eq!(f.to_bits(), b.as_u64().unwrap(), "{key}"),
            None => assert_eq!(*f, want.as_f64().unwrap(), "{key}"),
        },
        Value::Bool(b) => assert_eq!(Some(*b), want.as_bool(), "{key}"),
        Value::String(s) => assert_eq!(Some(s.as_str()), want.as_str(), "{key}"),
        Value::Array(_, items) => {
            let w = want.as_array().unwrap();
            assert_eq!(items.len(), w.len(), "{key} length");
            for (i, (it, wi)) in items.iter().zip(w).enumerate() {
                let b = bits.and_then(|b| b.as_array()).map(|b| &b[i]);
                check_value(&format!("{key}[{i}]"), it, wi, b);
            }
        }
        Value::U64(x) => assert_eq!(Some(*x), want.as_u64(), "{key}"),
        Value::I64(x) => assert_eq!(Some(*x), want.as_i64(), "{key}"),
        other => assert_eq!(other.as_i64(), want.as_i64(), "{key}"),
    }
}

fn check_all_types(file: &str) {
    let fx = read_json("dequant/all_types.json");
    let f = GgufFile::open(fixture(&format!("dequant/{file}"))).unwrap();
    let meta = &fx["files"][file];
    assert_eq!(f.version() as u64, meta["version"].as_u64().unwrap());
    assert_eq!(f.alignment(), meta["alignment"].as_u64().unwrap());
    assert_eq!(
        f.data_offset() as u64,
        meta["data_offset"].as_u64().unwrap()
    );
    assert_eq!(f.metadata().len() as u64, meta["n_kv"].as_u64().unwrap());
    for m in fx["metadata"].as_array().unwrap() {
        let key = m["key"].as_str().unwrap();
        let v = f
            .get(key)
            .unwrap_or_else(|| panic!("{file}: missing {key}"));
        assert_eq!(
            type_name(v.value_type()),
            m["type"].as_str().unwrap(),
            "{key}"
        );
        if let Value::Array(et, _) = v {
            assert_eq!(type_name(*et), m["elem_type"].as_str().unwrap(), "{key}");
        }
        let bits = m.get("f32_bits").or_else(|| m.get("f64_bits"));
        check_value(key, v, &m["value"], bits);
    }
    let offsets = meta["tensor_offsets"].as_array().unwrap();
    let tensors = fx["tensors"].as_array().unwrap();
    assert_eq!(f.tensors().len(), tensors.len());
    for ((t, want), off) in f.tensors().iter().zip(tensors).zip(offsets) {
        assert_eq!(t.name, want["name"].as_str().unwrap());
        assert_eq!(t.ty.name(), want["type"].as_str().unwrap());
        let ne: Vec<usize> = want["ne"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.dims, ne, "{}", t.name);
        assert_eq!(
            (t.offset - f.data_offset()) as u64,
            off.as_u64().unwrap(),
            "{}",
            t.name
        );
        let mut out = vec![0f32; t.n_elements()];
        dequantize_row(t.ty, f.tensor_data(t), &mut out);
        let want_bits: Vec<u32> = want["f32_bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got_bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
        assert!(
            got_bits == want_bits,
            "{file}: tensor {} dequantizes differently from gguf",
            t.name
        );
    }
}

#[test]
fn all_types_v3() {
    check_all_types("all_types.gguf");
}

#[test]
fn all_types_align64() {
    check_all_types("all_types_align64.gguf");
}

#[test]
fn all_types_v2() {
    check_all_types("all_types_v2.gguf");
}

#[test]
fn nested_arrays_are_read() {
    let fx = read_json("dequant/all_types.json");
    let f = GgufFile::open(fixture("dequant/metadata_nested.gguf")).unwrap();
    for m in fx["files"]["metadata_nested.gguf"]["metadata"]
        .as_array()
        .unwrap()
    {
        let v = f.get(m["key"].as_str().unwrap()).unwrap();
        check_value(m["key"].as_str().unwrap(), v, &m["value"], None);
    }
}

fn check_real_model(key: &str, file: &str) {
    let fx = read_json(&format!("dequant/{key}.json"));
    let f = GgufFile::open(model(file)).unwrap();
    let tensors = fx["tensors"].as_array().unwrap();
    assert_eq!(f.tensors().len(), tensors.len());
    let mut row = Vec::new();
    for (t, want) in f.tensors().iter().zip(tensors) {
        assert_eq!(t.name, want["name"].as_str().unwrap());
        assert_eq!(t.ty.name(), want["type"].as_str().unwrap());
        assert_eq!(
            t.offset as u64,
            want["file_offset"].as_u64().unwrap(),
            "{}",
            t.name
        );
        let data = f.tensor_data(t);
        let n0 = t.dims[0];
        let rb = t.ty.row_bytes(n0).unwrap();
        row.resize(n0, 0f32);
        let mut h = Sha256::new();
        for r in data.chunks_exact(rb) {
            dequantize_row(t.ty, r, &mut row);
            for v in &row {
                h.update(v.to_le_bytes());
            }
        }
        let got: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            got,
            want["sha256"].as_str().unwrap(),
            "{key}: tensor {} ({})",
            t.name,
            t.ty
        );
    }
}

#[test]
fn smollm2_every_tensor_dequantizes_like_gguf() {
    check_real_model("smollm2", SMOLLM2);
}

#[test]
fn qwen_every_tensor_dequantizes_like_gguf() {
    check_real_model("qwen2.5-coder", QWEN);
}

/// A small GGUF writer for building broken files with known field positions.
struct W {
    b: Vec<u8>,
}
impl W {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.b.extend(v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.b.extend(v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.b.extend(s.as_bytes());
        self
    }
}

struct Spec {
    version: u32,
    n_tensors: u64,
    n_kv: u64,
    str_len: Option<u64>,
    dims: Vec<u64>,
    n_dims: Option<u32>,
    ty: u32,
    offset: u64,
    duplicate_key: bool,
    data_len: usize,
}

impl Default for Spec {
    fn default() -> Spec {
        Spec {
            version: 3,
            n_tensors: 1,
            n_kv: 2,
            str_len: None,
            dims: vec![32, 2],
            n_dims: None,
            ty: 0,
            offset: 0,
            duplicate_key: false,
            data_len: 256,
        }
    }
}

fn build(s: &Spec) -> Vec<u8> {
    let mut w = W {
        b: b"GGUF".to_vec(),
    };
    w.u32(s.version).u64(s.n_tensors).u64(s.n_kv);
    w.str("general.architecture").u32(8);
    match s.str_len {
        Some(n) => {
            w.u64(n);
            w.b.extend(b"llama");
        }
        None => {
            w.str("llama");
        }
    }
    w.str(if s.duplicate_key {
        "general.architecture"
    } else {
        "general.name"
    })
    .u32(8)
    .str("t");
    w.str("w").u32(s.n_dims.unwrap_or(s.dims.len() as u32));
    for d in &s.dims {
        w.u64(*d);
    }
    w.u32(s.ty).u64(s.offset);
    while !w.b.len().is_multiple_of(32) {
        w.b.push(0);
    }
    w.b.extend(vec![0u8; s.data_len]);
    w.b
}

fn err_of(bytes: &[u8]) -> String {
    match parse_bytes("broken.gguf", bytes) {
        Ok(_) => panic!("accepted a broken file"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn builder_makes_a_valid_file() {
    let f = parse_bytes("ok.gguf", &build(&Spec::default())).unwrap();
    assert_eq!(f.tensors()[0].ty, GgmlType::F32);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
}

#[test]
fn broken_files_give_clear_errors() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "wrong magic",
            {
                let mut b = build(&Spec::default());
                b[0] = b'X';
                b
            },
            "bad magic",
        ),
        (
            "version 1",
            build(&Spec {
                version: 1,
                ..Default::default()
            }),
            "version 1",
        ),
        (
            "version 99",
            build(&Spec {
                version: 99,
                ..Default::default()
            }),
            "unsupported GGUF version 99",
        ),
        (
            "big endian",
            build(&Spec {
                version: 3u32.swap_bytes(),
                ..Default::default()
            }),
            "big-endian",
        ),
        (
            "absurd tensor count",
            build(&Spec {
                n_tensors: u64::MAX / 2,
                ..Default::default()
            }),
            "tensor count",
        ),
        (
            "absurd kv count",
            build(&Spec {
                n_kv: 1 << 60,
                ..Default::default()
            }),
            "metadata count",
        ),
        (
            "string longer than file",
            build(&Spec {
                str_len: Some(1 << 40),
                ..Default::default()
            }),
            "truncated",
        ),
        (
            "dimensions overflow",
            build(&Spec {
                dims: vec![1 << 40, 1 << 40],
                ..Default::default()
            }),
            "overflow",
        ),
        (
            "zero dimension",
            build(&Spec {
                dims: vec![32, 0],
                ..Default::default()
            }),
            "zero dimension",
        ),
        (
            "rank 0",
            build(&Spec {
                n_dims: Some(0),
                dims: vec![],
                ..Default::default()
            }),
            "dimensions",
        ),
        (
            "rank 5",
            build(&Spec {
                dims: vec![2, 2, 2, 2, 2],
                ..Default::default()
            }),
            "5 dimensions",
        ),
        (
            "unknown type",
            build(&Spec {
                ty: 99,
                ..Default::default()
            }),
            "unsupported type id 99",
        ),
        (
            "activation-only type",
            build(&Spec {
                ty: 15,
                ..Default::default()
            }),
            "unsupported type id 15",
        ),
        (
            "row not whole blocks",
            build(&Spec {
                ty: 8,
                dims: vec![31, 2],
                ..Default::default()
            }),
            "block size",
        ),
        (
            "offset past end",
            build(&Spec {
                offset: 1 << 20,
                ..Default::default()
            }),
            "past the end",
        ),
        (
            "offset overflows",
            build(&Spec {
                offset: u64::MAX - 31,
                ..Default::default()
            }),
            "past the end",
        ),
        (
            "misaligned offset",
            build(&Spec {
                offset: 4,
                ..Default::default()
            }),
            "not aligned",
        ),
        (
            "data too short",
            build(&Spec {
                data_len: 100,
                ..Default::default()
            }),
            "past the end",
        ),
        (
            "duplicate key",
            build(&Spec {
                duplicate_key: true,
                ..Default::default()
            }),
            "appears twice",
        ),
        ("empty file", vec![], "empty"),
    ];
    for (what, bytes, needle) in cases {
        let e = err_of(&bytes);
        assert!(
            e.contains(needle),
            "{what}: error {e:?} does not mention {needle:?}"
        );
        assert!(
            e.contains("broken.gguf"),
            "{what}: error {e:?} does not name the file"
        );
    }
}

#[test]
fn every_truncation_of_a_real_file_is_an_error() {
    let bytes = std::fs::read(fixture("dequant/all_types.gguf")).unwrap();
    let f = parse_bytes("x", &bytes).unwrap();
    let end_of_header = f.data_offset();
    // Bytes after the last tensor are padding: cutting them leaves a valid file.
    let end_of_data = f
        .tensors()
        .iter()
        .map(|t| t.offset + t.n_bytes)
        .max()
        .unwrap();
    // Every cut inside the header, then a stride through the data section.
    for cut in (0..end_of_header).chain((end_of_header..end_of_data).step_by(97)) {
        let e = err_of(&bytes[..cut]);
        assert!(!e.is_empty());
    }
}

#[test]
fn random_corruption_never_panics() {
    let bytes = std::fs::read(fixture("dequant/all_types.gguf")).unwrap();
    let header = parse_bytes("x", &bytes).unwrap().data_offset();
    let mut s = 0x2545F4914F6CDD1Du64;
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..4 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let i = (s as usize) % header;
            b[i] = (s >> 32) as u8;
        }
        // Any outcome but a panic (or an absurd allocation) is fine.
        let _ = parse_bytes("fuzz.gguf", &b);
    }
}
