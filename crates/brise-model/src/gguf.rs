//! GGUF reader: versions 2 and 3, memory-mapped, every metadata value type.
//!
//! Every count, length, dimension and offset read from the file is checked against the
//! file's size before anything is allocated, so a malformed file is an error naming the
//! problem, never a panic or an absurd allocation.

use crate::error::{ModelError, Result};
use brise_kernels::GgmlType;
use memmap2::Mmap;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;

/// The type tags of GGUF metadata values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_id(id: u32) -> Option<ValueType> {
        Some(match id {
            0 => ValueType::U8,
            1 => ValueType::I8,
            2 => ValueType::U16,
            3 => ValueType::I16,
            4 => ValueType::U32,
            5 => ValueType::I32,
            6 => ValueType::F32,
            7 => ValueType::Bool,
            8 => ValueType::String,
            9 => ValueType::Array,
            10 => ValueType::U64,
            11 => ValueType::I64,
            12 => ValueType::F64,
            _ => return None,
        })
    }

    /// The fewest bytes a value of this type takes in the file.
    fn min_size(self) -> u64 {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
            ValueType::Array => 12,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ValueType::U8 => "uint8",
            ValueType::I8 => "int8",
            ValueType::U16 => "uint16",
            ValueType::I16 => "int16",
            ValueType::U32 => "uint32",
            ValueType::I32 => "int32",
            ValueType::F32 => "float32",
            ValueType::Bool => "bool",
            ValueType::String => "string",
            ValueType::Array => "array",
            ValueType::U64 => "uint64",
            ValueType::I64 => "int64",
            ValueType::F64 => "float64",
        }
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, v) => Some(v),
            _ => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::U8(v) => write!(f, "{v}"),
            Value::I8(v) => write!(f, "{v}"),
            Value::U16(v) => write!(f, "{v}"),
            Value::I16(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I32(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::String(v) => write!(f, "{v:?}"),
            Value::Array(t, v) => write!(f, "[{} × {}]", v.len(), t.name()),
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
        }
    }
}

/// A tensor's entry in the file: name, type, shape and where its bytes are.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub ty: GgmlType,
    /// Dimensions in GGUF order: `dims[0]` is the row length (ggml's ne0).
    pub dims: Vec<usize>,
    /// Offset from the start of the file.
    pub offset: usize,
    pub n_bytes: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// An open GGUF file. Tensor data stays in the memory map.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    version: u32,
    alignment: u64,
    data_offset: usize,
    metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> std::result::Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "file truncated: {} needs {n} bytes at offset {} but only {} remain",
                what(),
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(
        &mut self,
        what: &dyn Fn() -> String,
    ) -> std::result::Result<[u8; N], String> {
        let s = self.take(N as u64, what)?;
        Ok(s.try_into().expect("length checked"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> std::result::Result<String, String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, &|| format!("{} ({len}-byte string)", what()))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{} is not valid UTF-8", what()))
    }

    fn value(
        &mut self,
        ty: ValueType,
        depth: u32,
        what: &dyn Fn() -> String,
    ) -> std::result::Result<Value, String> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{}: bool value {b} is neither 0 nor 1", what())),
            },
            ValueType::String => Value::String(self.string(what)?),
            ValueType::Array => {
                if depth >= 8 {
                    return Err(format!("{}: arrays nested more than 8 deep", what()));
                }
                let et_id = self.u32(what)?;
                let et = ValueType::from_id(et_id)
                    .ok_or_else(|| format!("{}: unknown array element type {et_id}", what()))?;
                let n = self.u64(what)?;
                // Refuse counts the rest of the file cannot hold before allocating.
                if n.checked_mul(et.min_size())
                    .is_none_or(|b| b > self.remaining())
                {
                    return Err(format!(
                        "{}: array of {n} {} elements does not fit in the {} bytes left",
                        what(),
                        et.name(),
                        self.remaining()
                    ));
                }
                let mut v = Vec::with_capacity(n as usize);
                for i in 0..n {
                    v.push(self.value(et, depth + 1, &|| format!("{}[{i}]", what()))?);
                }
                Value::Array(et, v)
            }
        })
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the map is read-only; brise never writes model files, and a model file
        // changed by another process while open is outside what any engine can guard.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        Self::parse(path, Arc::new(map))
    }

    fn parse(path: PathBuf, map: Arc<Mmap>) -> Result<GgufFile> {
        let err = |msg: String| ModelError::Gguf {
            path: path.clone(),
            msg,
        };
        let mut c = Cursor {
            buf: &map[..],
            pos: 0,
        };
        let magic = c.array::<4>(&|| "the magic number".into()).map_err(err)?;
        if &magic != MAGIC {
            return Err(err(format!(
                "bad magic {:?} (expected \"GGUF\"); is this a model file?",
                String::from_utf8_lossy(&magic)
            )));
        }
        let version = c.u32(&|| "the version".into()).map_err(err)?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(err(
                    "GGUF version 1 is obsolete; convert the model again".into()
                ));
            }
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(err("big-endian GGUF files are not supported".into()));
            }
            v => {
                return Err(err(format!(
                    "unsupported GGUF version {v} (brise reads 2 and 3)"
                )));
            }
        }
        let n_tensors = c.u64(&|| "the tensor count".into()).map_err(err)?;
        let n_kv = c.u64(&|| "the metadata count".into()).map_err(err)?;
        // Each metadata entry takes at least 8 (key length) + 4 (type) + 1 bytes, each
        // tensor entry at least 8 + 4 + 4 + 8 bytes.
        if n_kv.checked_mul(13).is_none_or(|b| b > c.remaining()) {
            return Err(err(format!(
                "metadata count {n_kv} cannot fit in a {}-byte file",
                map.len()
            )));
        }
        if n_tensors.checked_mul(24).is_none_or(|b| b > c.remaining()) {
            return Err(err(format!(
                "tensor count {n_tensors} cannot fit in a {}-byte file",
                map.len()
            )));
        }
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut index = HashMap::new();
        for i in 0..n_kv {
            let key = c
                .string(&|| format!("the key of metadata entry {i}"))
                .map_err(err)?;
            let tid = c
                .u32(&|| format!("the type of metadata {key:?}"))
                .map_err(err)?;
            let ty = ValueType::from_id(tid)
                .ok_or_else(|| err(format!("metadata {key:?} has unknown value type {tid}")))?;
            let v = c
                .value(ty, 0, &|| format!("metadata {key:?}"))
                .map_err(err)?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                return Err(err(format!("metadata key {key:?} appears twice")));
            }
            metadata.push((key, v));
        }
        let alignment = match index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 20 => a,
                _ => return Err(err(format!("general.alignment {v} is not a power of two"))),
            },
        };
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c
                .string(&|| format!("the name of tensor {i}"))
                .map_err(err)?;
            let n_dims = c
                .u32(&|| format!("the rank of tensor {name:?}"))
                .map_err(err)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(err(format!(
                    "tensor {name:?} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(
                    c.u64(&|| format!("dimension {d} of tensor {name:?}"))
                        .map_err(err)?,
                );
            }
            let tid = c
                .u32(&|| format!("the type of tensor {name:?}"))
                .map_err(err)?;
            let offset = c
                .u64(&|| format!("the offset of tensor {name:?}"))
                .map_err(err)?;
            infos.push((name, dims, tid, offset));
        }
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        if data_offset > map.len() as u64 && !infos.is_empty() {
            return Err(err(format!(
                "tensor data would start at byte {data_offset}, past the end of the {}-byte file",
                map.len()
            )));
        }
        let mut tensors = Vec::with_capacity(infos.len());
        let mut tensor_index = HashMap::new();
        for (name, dims, tid, offset) in infos {
            let ty = GgmlType::from_id(tid)
                .filter(|t| t.is_weight_type())
                .ok_or_else(|| err(format!("tensor {name:?} has unsupported type id {tid}")))?;
            let mut n_el: u64 = 1;
            for &d in &dims {
                if d == 0 {
                    return Err(err(format!(
                        "tensor {name:?} has a zero dimension: {dims:?}"
                    )));
                }
                n_el = n_el
                    .checked_mul(d)
                    .filter(|&n| n <= map.len() as u64 * 256)
                    .ok_or_else(|| err(format!("tensor {name:?} dimensions {dims:?} overflow")))?;
            }
            if dims[0] % ty.block_size() as u64 != 0 {
                return Err(err(format!(
                    "tensor {name:?}: row length {} is not a multiple of the {ty} block size {}",
                    dims[0],
                    ty.block_size()
                )));
            }
            let n_bytes = n_el / ty.block_size() as u64 * ty.type_size() as u64;
            if offset % alignment != 0 {
                return Err(err(format!(
                    "tensor {name:?}: offset {offset} is not aligned to {alignment}"
                )));
            }
            let end = data_offset
                .checked_add(offset)
                .and_then(|s| s.checked_add(n_bytes))
                .filter(|&e| e <= map.len() as u64)
                .ok_or_else(|| {
                    err(format!(
                        "tensor {name:?} ({ty}, {dims:?}, {n_bytes} bytes at data offset {offset}) extends past the end of the {}-byte file",
                        map.len()
                    ))
                })?;
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(err(format!("tensor {name:?} appears twice")));
            }
            tensors.push(TensorInfo {
                name,
                ty,
                dims: dims.iter().map(|&d| d as usize).collect(),
                offset: (end - n_bytes) as usize,
                n_bytes: n_bytes as usize,
            });
        }
        Ok(GgufFile {
            path,
            map,
            version,
            alignment,
            data_offset: data_offset as usize,
            metadata,
            index,
            tensors,
            tensor_index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor, straight from the memory map.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.offset..info.offset + info.n_bytes]
    }

    /// The shared memory map, for weights that stay mapped after the file object is gone.
    pub fn map(&self) -> &Arc<Mmap> {
        &self.map
    }

    pub(crate) fn err(&self, msg: impl Into<String>) -> ModelError {
        ModelError::Gguf {
            path: self.path.clone(),
            msg: msg.into(),
        }
    }

    /// A required string value.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)
            .ok_or_else(|| self.err(format!("missing metadata {key:?}")))?
            .as_str()
            .ok_or_else(|| self.err(format!("metadata {key:?} is not a string")))
    }

    /// A required non-negative integer value of any width.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self
            .get(key)
            .ok_or_else(|| self.err(format!("missing metadata {key:?}")))?;
        v.as_u64().ok_or_else(|| {
            self.err(format!(
                "metadata {key:?} = {v} is not a non-negative integer"
            ))
        })
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self
            .get(key)
            .ok_or_else(|| self.err(format!("missing metadata {key:?}")))?;
        v.as_f64()
            .ok_or_else(|| self.err(format!("metadata {key:?} = {v} is not a number")))
    }
}

/// Parses GGUF bytes already in memory (tests and tools).
pub fn parse_bytes(name: &str, bytes: &[u8]) -> Result<GgufFile> {
    if bytes.is_empty() {
        return Err(ModelError::Gguf {
            path: name.into(),
            msg: "file is empty".into(),
        });
    }
    let io = |source| ModelError::Io {
        path: name.into(),
        source,
    };
    let mut anon = memmap2::MmapMut::map_anon(bytes.len()).map_err(io)?;
    anon.copy_from_slice(bytes);
    GgufFile::parse(name.into(), Arc::new(anon.make_read_only().map_err(io)?))
}
