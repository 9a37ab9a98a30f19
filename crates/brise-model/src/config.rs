//! Architecture hyper-parameters, read from GGUF metadata or a Hugging Face config.json.

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use brise_kernels::ops::RopeStyle;
use serde_json::Value as Json;
use std::path::Path;

/// The architectures brise runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3, SmolLM2, Mistral 7B (GGUF stores Mistral as `llama`).
    Llama,
    /// Qwen2 / Qwen2.5: Llama plus biases on Q, K and V.
    Qwen2,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Dimensions of each head that RoPE rotates.
    pub n_rot: usize,
    pub n_ff: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    /// 1 / linear RoPE scaling factor.
    pub rope_freq_scale: f32,
    pub rope_style: RopeStyle,
    /// Context length the model was trained with.
    pub n_ctx_train: usize,
    /// Mistral's sliding window: a query at position p sees keys p−w+1 … p.
    pub sliding_window: Option<usize>,
}

impl ModelConfig {
    pub fn validate(&self, src: &Path) -> Result<()> {
        let bad = |msg: String| {
            Err(ModelError::Config {
                path: src.to_path_buf(),
                msg,
            })
        };
        if self.n_head == 0 || self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad(format!(
                "{} heads cannot share {} KV heads",
                self.n_head, self.n_head_kv
            ));
        }
        if self.n_embd == 0 || self.n_layer == 0 || self.n_ff == 0 || self.n_vocab == 0 {
            return bad("a model dimension is zero".into());
        }
        if self.head_dim == 0
            || !self.head_dim.is_multiple_of(2)
            || self.n_rot > self.head_dim
            || !self.n_rot.is_multiple_of(2)
        {
            return bad(format!(
                "head size {} / rotary dims {} are invalid",
                self.head_dim, self.n_rot
            ));
        }
        if self.sliding_window == Some(0) {
            return bad("sliding window of 0".into());
        }
        if !(self.rms_eps > 0.0 && self.rope_base > 0.0 && self.rope_freq_scale > 0.0) {
            return bad("rms epsilon, rope base and rope scale must be positive".into());
        }
        Ok(())
    }

    pub fn from_gguf(f: &GgufFile) -> Result<ModelConfig> {
        let arch_name = f.get_str("general.architecture")?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "{}: architecture {other:?} (brise runs llama, mistral and qwen2 models)",
                    f.path().display()
                )));
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let opt_u = |k: &str| f.get(&key(k)).map(|_| f.get_u64(&key(k))).transpose();
        let n_embd = f.get_u64(&key("embedding_length"))? as usize;
        let n_head = f.get_u64(&key("attention.head_count"))? as usize;
        let n_head_kv = opt_u("attention.head_count_kv")?.map_or(n_head, |v| v as usize);
        let head_dim = match opt_u("attention.key_length")? {
            Some(v) => v as usize,
            None if n_head > 0 => n_embd / n_head,
            None => 0,
        };
        if let Some(vl) = opt_u("attention.value_length")?
            && vl as usize != head_dim
        {
            return Err(ModelError::Unsupported(format!(
                "key length {head_dim} ≠ value length {vl}"
            )));
        }
        let n_vocab = match f.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            Some(t) => t.len(),
            None => f.get_u64(&key("vocab_size"))? as usize,
        };
        let mut rope_freq_scale = 1.0f32;
        if let Some(t) = f.get(&key("rope.scaling.type")) {
            match t.as_str() {
                Some("none") => {}
                Some("linear") => {
                    let factor = f.get_f64(&key("rope.scaling.factor"))?;
                    if factor > 0.0 {
                        rope_freq_scale = (1.0 / factor) as f32;
                    }
                }
                other => {
                    return Err(ModelError::Unsupported(format!(
                        "RoPE scaling type {other:?}"
                    )));
                }
            }
        }
        let cfg = ModelConfig {
            arch,
            n_vocab,
            n_embd,
            n_layer: f.get_u64(&key("block_count"))? as usize,
            n_head,
            n_head_kv,
            head_dim,
            n_rot: opt_u("rope.dimension_count")?.map_or(head_dim, |v| v as usize),
            n_ff: f.get_u64(&key("feed_forward_length"))? as usize,
            rms_eps: f.get_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
            rope_base: match f.get(&key("rope.freq_base")) {
                Some(_) => f.get_f64(&key("rope.freq_base"))? as f32,
                None => 10000.0,
            },
            rope_freq_scale,
            rope_style: match arch {
                Arch::Llama => RopeStyle::Normal,
                Arch::Qwen2 => RopeStyle::Neox,
            },
            n_ctx_train: opt_u("context_length")?.map_or(2048, |v| v as usize),
            sliding_window: opt_u("attention.sliding_window")?.map(|v| v as usize),
        };
        cfg.validate(f.path())?;
        Ok(cfg)
    }

    /// From a Hugging Face `config.json`. Hugging Face checkpoints keep Q/K rows in the
    /// order that pairs dimension i with i + d/2, so every architecture uses NEOX RoPE.
    pub fn from_hf(path: &Path, j: &Json) -> Result<ModelConfig> {
        let bad = |msg: String| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let model_type = j["model_type"]
            .as_str()
            .ok_or_else(|| bad("missing \"model_type\"".into()))?;
        let arch = match model_type {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "{}: model_type {other:?} (brise runs llama, mistral and qwen2 models)",
                    path.display()
                )));
            }
        };
        let u = |k: &str| {
            j[k].as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("missing or invalid {k:?}")))
        };
        let n_embd = u("hidden_size")?;
        let n_head = u("num_attention_heads")?;
        let head_dim = match j.get("head_dim").and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => n_embd / n_head.max(1),
        };
        let mut rope_freq_scale = 1.0;
        if let Some(rs) = j.get("rope_scaling").filter(|v| !v.is_null()) {
            let ty = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(|v| v.as_str());
            match ty {
                Some("linear") => {
                    let f = rs["factor"]
                        .as_f64()
                        .ok_or_else(|| bad("rope_scaling without factor".into()))?;
                    rope_freq_scale = (1.0 / f) as f32;
                }
                Some("default") => {}
                other => return Err(ModelError::Unsupported(format!("RoPE scaling {other:?}"))),
            }
        }
        let sliding_window = match arch {
            Arch::Llama => j
                .get("sliding_window")
                .and_then(|v| v.as_u64())
                .map(|v| v as usize),
            Arch::Qwen2 => {
                if j.get("use_sliding_window").and_then(|v| v.as_bool()) == Some(true) {
                    return Err(ModelError::Unsupported("Qwen2 use_sliding_window".into()));
                }
                None
            }
        };
        let cfg = ModelConfig {
            arch,
            n_vocab: u("vocab_size")?,
            n_embd,
            n_layer: u("num_hidden_layers")?,
            n_head,
            n_head_kv: j
                .get("num_key_value_heads")
                .and_then(|v| v.as_u64())
                .map_or(n_head, |v| v as usize),
            head_dim,
            n_rot: head_dim,
            n_ff: u("intermediate_size")?,
            rms_eps: j["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
            rope_base: j["rope_theta"].as_f64().unwrap_or(10000.0) as f32,
            rope_freq_scale,
            rope_style: RopeStyle::Neox,
            n_ctx_train: j["max_position_embeddings"].as_u64().unwrap_or(2048) as usize,
            sliding_window,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}
