//! Model weights: matrices stay in their file format (memory-mapped), small vectors are
//! converted to f32 at load. One set of types for GGUF and safetensors sources.

use crate::config::{Arch, ModelConfig};
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use brise_kernels::GgmlType;
use brise_kernels::kpacked::{KPacked, packable as kpackable};
use brise_kernels::matmul::WeightRef;
use brise_kernels::packed::{Packed, packable};
use brise_kernels::quant::dequantize_row;
use memmap2::Mmap;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes of a tensor: a range of a shared memory map, or owned.
#[derive(Clone)]
pub enum Bytes {
    Mapped(Arc<Mmap>, Range<usize>),
    Owned(Arc<Vec<u8>>),
}

impl Bytes {
    /// Tells the OS the mapped pages are no longer needed (they are re-read from the
    /// file if touched again), so a repacked copy does not double the resident memory.
    fn release(&self) {
        if let Bytes::Mapped(m, r) = self {
            let page = 4096;
            let base = m.as_ptr() as usize;
            let start = (base + r.start).div_ceil(page) * page;
            let end = (base + r.end) / page * page;
            if end > start {
                // SAFETY: the range lies inside a private read-only file mapping that stays
                // mapped; MADV_DONTNEED only drops its resident pages, which the kernel
                // re-reads from the file on a later access, so no data is lost.
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
                }
            }
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m, r) => &m[r.clone()],
            Bytes::Owned(v) => v,
        }
    }
}

/// A tensor as a source provides it: type, GGUF-order dims (dims[0] = row length), bytes.
#[derive(Clone)]
pub struct RawTensor {
    pub name: String,
    pub ty: GgmlType,
    pub dims: Vec<usize>,
    pub bytes: Bytes,
}

/// A weight matrix of `n` rows of `k` elements.
#[derive(Clone)]
pub struct Weight {
    pub name: String,
    pub ty: GgmlType,
    pub n: usize,
    pub k: usize,
    pub bytes: Bytes,
    /// The matrix repacked for the AVX-512 kernels; when set, `bytes` may no longer be
    /// resident (its pages were returned to the OS) and is not read.
    pub packed: Option<Arc<Packed>>,
    /// The matrix repacked for the AVX-512 K-quant kernels (Q4_K, Q6_K), likewise.
    pub kpacked: Option<Arc<KPacked>>,
}

impl Weight {
    pub fn as_ref(&self) -> WeightRef<'_> {
        WeightRef {
            ty: self.ty,
            n: self.n,
            k: self.k,
            data: self.bytes.as_slice(),
            packed: self.packed.as_deref(),
            kpacked: self.kpacked.as_deref(),
        }
    }

    /// Row `r` dequantized into `out` (embedding lookup).
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        self.as_ref().dequantize_row(r, &mut Vec::new(), out);
    }

    /// Repacks the matrix for the AVX-512 kernels (if its format has a packed layout)
    /// and gives the original pages back to the OS, so memory stays one copy.
    fn repack(&mut self) {
        if self.packed.is_some() || self.kpacked.is_some() {
            return;
        }
        let src = self.bytes.as_slice();
        if packable(self.ty) {
            self.packed = Some(Arc::new(Packed::pack(self.ty, self.n, self.k, src)));
        } else if kpackable(self.ty) && (self.ty != GgmlType::Q4K || self.n.is_multiple_of(8)) {
            // Q4_K takes llama.cpp's repacked kernels only with a multiple of 8 rows.
            self.kpacked = Some(Arc::new(KPacked::pack(self.ty, self.n, self.k, src)));
        } else {
            return;
        }
        self.bytes.release();
    }
}

pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub wq: Weight,
    pub wk: Weight,
    pub wv: Weight,
    pub wo: Weight,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Weight,
    pub w_up: Weight,
    pub w_down: Weight,
}

pub struct ModelWeights {
    pub tok_embd: Weight,
    pub output_norm: Vec<f32>,
    /// The output projection; the token embedding when the model ties them.
    pub output: Weight,
    pub tied_embeddings: bool,
    /// Per-dimension RoPE frequency divisors (Llama 3.1's `rope_freqs`), if any.
    pub rope_freqs: Option<Vec<f32>>,
    pub layers: Vec<LayerWeights>,
}

/// Where tensors come from, by GGUF tensor name.
pub trait TensorSource {
    fn describe(&self) -> &Path;
    fn tensor(&self, gguf_name: &str) -> Result<Option<RawTensor>>;
}

impl TensorSource for GgufFile {
    fn describe(&self) -> &Path {
        self.path()
    }

    fn tensor(&self, name: &str) -> Result<Option<RawTensor>> {
        Ok(self.tensor_info(name).map(|t| RawTensor {
            name: name.to_string(),
            ty: t.ty,
            dims: t.dims.clone(),
            bytes: Bytes::Mapped(self.map().clone(), t.offset..t.offset + t.n_bytes),
        }))
    }
}

/// A directory of `*.safetensors` files with Hugging Face tensor names.
pub struct SafetensorsDir {
    dir: PathBuf,
    maps: Vec<Arc<Mmap>>,
    /// HF name → (file index, dtype, shape, byte range).
    index: HashMap<String, (usize, GgmlType, Vec<usize>, Range<usize>)>,
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<SafetensorsDir> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| ModelError::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ModelError::Safetensors {
                path: dir.to_path_buf(),
                msg: "no *.safetensors files".into(),
            });
        }
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for (fi, p) in files.iter().enumerate() {
            let bad = |msg: String| ModelError::Safetensors {
                path: p.clone(),
                msg,
            };
            let f = std::fs::File::open(p).map_err(|source| ModelError::Io {
                path: p.clone(),
                source,
            })?;
            // SAFETY: read-only map of a model file brise never writes (see GgufFile::open).
            let map = Arc::new(unsafe { Mmap::map(&f) }.map_err(|source| ModelError::Io {
                path: p.clone(),
                source,
            })?);
            let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| bad(e.to_string()))?;
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let ty = match view.dtype() {
                    safetensors::Dtype::F32 => GgmlType::F32,
                    safetensors::Dtype::F16 => GgmlType::F16,
                    safetensors::Dtype::BF16 => GgmlType::BF16,
                    d => {
                        return Err(bad(format!(
                            "tensor {name:?} has dtype {d:?}; brise reads F32, F16 and BF16"
                        )));
                    }
                };
                let start = view.data().as_ptr() as usize - base;
                let range = start..start + view.data().len();
                if index
                    .insert(name.clone(), (fi, ty, view.shape().to_vec(), range))
                    .is_some()
                {
                    return Err(bad(format!(
                        "tensor {name:?} appears in more than one file"
                    )));
                }
            }
            maps.push(map);
        }
        Ok(SafetensorsDir {
            dir: dir.to_path_buf(),
            maps,
            index,
        })
    }

    fn hf_name(gguf: &str) -> Option<String> {
        let fixed = match gguf {
            "token_embd.weight" => Some("model.embed_tokens.weight"),
            "output_norm.weight" => Some("model.norm.weight"),
            "output.weight" => Some("lm_head.weight"),
            _ => None,
        };
        if let Some(f) = fixed {
            return Some(f.to_string());
        }
        let rest = gguf.strip_prefix("blk.")?;
        let (layer, rest) = rest.split_once('.')?;
        let (base, suffix) = rest.rsplit_once('.')?;
        let hf = match base {
            "attn_norm" => "input_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            _ => return None,
        };
        Some(format!("model.layers.{layer}.{hf}.{suffix}"))
    }
}

impl TensorSource for SafetensorsDir {
    fn describe(&self) -> &Path {
        &self.dir
    }

    fn tensor(&self, gguf_name: &str) -> Result<Option<RawTensor>> {
        let Some(hf) = Self::hf_name(gguf_name) else {
            return Ok(None);
        };
        Ok(self.index.get(&hf).map(|(fi, ty, shape, range)| RawTensor {
            name: hf.clone(),
            ty: *ty,
            // safetensors shapes are row-major [out, in]; GGUF lists the row length first.
            dims: shape.iter().rev().copied().collect(),
            bytes: Bytes::Mapped(self.maps[*fi].clone(), range.clone()),
        }))
    }
}

fn shape_err(src: &dyn TensorSource, name: &str, msg: String) -> ModelError {
    ModelError::Config {
        path: src.describe().to_path_buf(),
        msg: format!("tensor {name}: {msg}"),
    }
}

fn required(src: &dyn TensorSource, name: &str) -> Result<RawTensor> {
    src.tensor(name)?
        .ok_or_else(|| shape_err(src, name, "missing from the model".into()))
}

fn matrix(src: &dyn TensorSource, name: &str, k: usize, n: usize) -> Result<Weight> {
    matrix_from(src, required(src, name)?, k, n)
}

fn matrix_from(src: &dyn TensorSource, t: RawTensor, k: usize, n: usize) -> Result<Weight> {
    if t.dims != [k, n] {
        return Err(shape_err(
            src,
            &t.name,
            format!("shape {:?}, expected [{k}, {n}]", t.dims),
        ));
    }
    if t.ty.row_bytes(k).is_none() {
        return Err(shape_err(
            src,
            &t.name,
            format!("{} rows of {k} are not whole blocks", t.ty),
        ));
    }
    Ok(Weight {
        name: t.name,
        ty: t.ty,
        n,
        k,
        bytes: t.bytes,
        packed: None,
        kpacked: None,
    })
}

fn vector(src: &dyn TensorSource, t: RawTensor, len: usize) -> Result<Vec<f32>> {
    if t.dims != [len] {
        return Err(shape_err(
            src,
            &t.name,
            format!("shape {:?}, expected [{len}]", t.dims),
        ));
    }
    if !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        return Err(shape_err(src, &t.name, format!("vector of type {}", t.ty)));
    }
    let mut v = vec![0f32; len];
    dequantize_row(t.ty, t.bytes.as_slice(), &mut v);
    Ok(v)
}

fn opt_vector(src: &dyn TensorSource, name: &str, len: usize) -> Result<Option<Vec<f32>>> {
    src.tensor(name)?.map(|t| vector(src, t, len)).transpose()
}

impl ModelWeights {
    /// Repacks every matrix the matmuls read for the AVX-512 kernels. The token
    /// embedding is packed only when it doubles as the output matrix.
    pub fn repack(&mut self) {
        for l in &mut self.layers {
            for w in [
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.w_gate,
                &mut l.w_up,
                &mut l.w_down,
            ] {
                w.repack();
            }
        }
        self.output.repack();
        if self.tied_embeddings {
            self.tok_embd.packed = self.output.packed.clone();
            self.tok_embd.kpacked = self.output.kpacked.clone();
        }
    }

    pub fn load(src: &dyn TensorSource, cfg: &ModelConfig) -> Result<ModelWeights> {
        let (e, hd) = (cfg.n_embd, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.n_head * hd, cfg.n_head_kv * hd);
        let tok_embd = matrix(src, "token_embd.weight", e, cfg.n_vocab)?;
        let (output, tied_embeddings) = match src.tensor("output.weight")? {
            Some(t) => (matrix_from(src, t, e, cfg.n_vocab)?, false),
            None => (tok_embd.clone(), true),
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            let bias = |s: &str, len| opt_vector(src, &n(s), len);
            let l = LayerWeights {
                attn_norm: vector(src, required(src, &n("attn_norm.weight"))?, e)?,
                wq: matrix(src, &n("attn_q.weight"), e, q_dim)?,
                wk: matrix(src, &n("attn_k.weight"), e, kv_dim)?,
                wv: matrix(src, &n("attn_v.weight"), e, kv_dim)?,
                wo: matrix(src, &n("attn_output.weight"), q_dim, e)?,
                bq: bias("attn_q.bias", q_dim)?,
                bk: bias("attn_k.bias", kv_dim)?,
                bv: bias("attn_v.bias", kv_dim)?,
                ffn_norm: vector(src, required(src, &n("ffn_norm.weight"))?, e)?,
                w_gate: matrix(src, &n("ffn_gate.weight"), e, cfg.n_ff)?,
                w_up: matrix(src, &n("ffn_up.weight"), e, cfg.n_ff)?,
                w_down: matrix(src, &n("ffn_down.weight"), cfg.n_ff, e)?,
            };
            if cfg.arch == Arch::Qwen2 && (l.bq.is_none() || l.bk.is_none() || l.bv.is_none()) {
                return Err(shape_err(
                    src,
                    &n("attn_q.bias"),
                    "qwen2 needs Q, K and V biases".into(),
                ));
            }
            layers.push(l);
        }
        Ok(ModelWeights {
            tok_embd,
            output_norm: vector(src, required(src, "output_norm.weight")?, e)?,
            output,
            tied_embeddings,
            rope_freqs: opt_vector(src, "rope_freqs.weight", cfg.n_rot / 2)?,
            layers,
        })
    }
}
