//! A loaded model: configuration, weights, tokenizer and chat template, from a GGUF file
//! or a Hugging Face safetensors directory.

use crate::chat::{ChatTemplate, Message};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::forward::Forward;
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;
use crate::weights::{ModelWeights, SafetensorsDir};
use brise_kernels::quant::Kernels;
use std::path::{Path, PathBuf};

pub struct Model {
    pub name: String,
    pub path: PathBuf,
    pub format: ModelFormat,
    pub cfg: ModelConfig,
    pub weights: ModelWeights,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub kern: Kernels,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    Gguf,
    Safetensors,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let b = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&b).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        msg: format!("invalid JSON: {e}"),
    })
}

/// `"<s>"` or `{"content": "<s>", ...}` in tokenizer_config.json.
fn token_str(v: &serde_json::Value) -> Option<String> {
    v.as_str().map(str::to_string).or_else(|| {
        v.get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string)
    })
}

impl Model {
    /// Loads a `.gguf` file or a directory with config.json and safetensors weights.
    pub fn load(path: &Path, kern: Kernels) -> Result<Model> {
        if path.is_dir() {
            Self::load_dir(path, kern)
        } else {
            Self::load_gguf(path, kern)
        }
    }

    fn load_gguf(path: &Path, kern: Kernels) -> Result<Model> {
        let f = GgufFile::open(path)?;
        let cfg = ModelConfig::from_gguf(&f)?;
        let tokenizer = Tokenizer::from_gguf(&f)?;
        if tokenizer.n_vocab() != cfg.n_vocab {
            return Err(f.err(format!(
                "{} tokens but the model has {} embeddings",
                tokenizer.n_vocab(),
                cfg.n_vocab
            )));
        }
        let mut weights = ModelWeights::load(&f, &cfg)?;
        if kern.isa() == brise_kernels::Isa::Avx512Vnni {
            weights.repack();
        }
        let piece = |id: Option<u32>| {
            id.and_then(|i| tokenizer.token_text(i))
                .unwrap_or("")
                .to_string()
        };
        let chat_template = match f.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
            Some(src) => Some(ChatTemplate::new(
                src,
                &piece(tokenizer.bos),
                &piece(tokenizer.eos),
            )?),
            None => None,
        };
        let name = f
            .get("general.name")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        Ok(Model {
            name,
            path: path.to_path_buf(),
            format: ModelFormat::Gguf,
            cfg,
            weights,
            tokenizer,
            chat_template,
            kern,
        })
    }

    fn load_dir(dir: &Path, kern: Kernels) -> Result<Model> {
        let cfg_path = dir.join("config.json");
        let cfg = ModelConfig::from_hf(&cfg_path, &read_json(&cfg_path)?)?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc = if tc_path.exists() {
            read_json(&tc_path)?
        } else {
            serde_json::Value::Null
        };
        let bos = token_str(&tc["bos_token"]);
        let eos = token_str(&tc["eos_token"]);
        let add_eos = tc["add_eos_token"].as_bool().unwrap_or(false);
        let tokenizer = if dir.join("tokenizer.json").exists() {
            let add_bos = tc["add_bos_token"].as_bool().unwrap_or(false);
            Tokenizer::from_hf_file(
                &dir.join("tokenizer.json"),
                bos.as_deref(),
                eos.as_deref(),
                add_bos,
                add_eos,
            )?
        } else if dir.join("tokenizer.model").exists() {
            let add_bos = tc["add_bos_token"].as_bool().unwrap_or(true);
            Tokenizer::from_spm_file(&dir.join("tokenizer.model"), add_bos, add_eos)?
        } else {
            return Err(ModelError::Config {
                path: dir.to_path_buf(),
                msg: "no tokenizer.json or tokenizer.model".into(),
            });
        };
        if tokenizer.n_vocab() > cfg.n_vocab {
            return Err(ModelError::Config {
                path: dir.to_path_buf(),
                msg: format!(
                    "tokenizer has {} tokens, more than vocab_size {}",
                    tokenizer.n_vocab(),
                    cfg.n_vocab
                ),
            });
        }
        let st = SafetensorsDir::open(dir)?;
        let mut weights = ModelWeights::load(&st, &cfg)?;
        if kern.isa() == brise_kernels::Isa::Avx512Vnni {
            weights.repack();
        }
        let template_src = match &tc["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string),
            _ => None,
        };
        let chat_template = match template_src {
            Some(src) => Some(ChatTemplate::new(
                &src,
                bos.as_deref().unwrap_or(""),
                eos.as_deref().unwrap_or(""),
            )?),
            None => None,
        };
        let name = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Model {
            name,
            path: dir.to_path_buf(),
            format: ModelFormat::Safetensors,
            cfg,
            weights,
            tokenizer,
            chat_template,
            kern,
        })
    }

    /// The conversation rendered by the model's chat template.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_chat_tools(messages, add_generation_prompt, None)
    }

    /// The conversation rendered with the tool definitions the template offers the model
    /// (OpenAI's `tools` list).
    pub fn render_chat_tools(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<String> {
        let t = self.chat_template.as_ref().ok_or_else(|| {
            ModelError::Template(format!(
                "{} has no chat template; use raw completion",
                self.name
            ))
        })?;
        t.render(messages, add_generation_prompt, tools)
    }

    /// Renders (with tools, if any) and tokenizes a conversation.
    pub fn encode_chat_tools(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>> {
        let rendered = self.render_chat_tools(messages, add_generation_prompt, tools)?;
        encode_rendered(&self.tokenizer, &rendered, messages)
    }

    /// Renders and tokenizes a conversation. Control tokens come only from the template:
    /// text inside messages stays text even when it looks like `[INST]` or `<|im_end|>`.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.encode_chat_tools(messages, add_generation_prompt, None)
    }

    /// Number of parameters (elements of every weight, embeddings counted once).
    pub fn n_params(&self) -> u64 {
        let w = &self.weights;
        let mut n = (w.tok_embd.n * w.tok_embd.k) as u64 + w.output_norm.len() as u64;
        if !w.tied_embeddings {
            n += (w.output.n * w.output.k) as u64;
        }
        for l in &w.layers {
            for m in [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down] {
                n += (m.n * m.k) as u64;
            }
            n += (l.attn_norm.len() + l.ffn_norm.len()) as u64;
            for b in [&l.bq, &l.bk, &l.bv].into_iter().flatten() {
                n += b.len() as u64;
            }
        }
        n
    }

    /// Fill-in-the-middle tokens (prefix, suffix, middle), found by their text as
    /// llama.cpp does when the GGUF does not name them: Qwen2.5-Coder's and StarCoder's.
    pub fn fim_tokens(&self) -> Option<(u32, u32, u32)> {
        let tk = &self.tokenizer;
        [
            ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"],
            ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"],
        ]
        .iter()
        .find_map(|[p, s, m]| Some((tk.token_id(p)?, tk.token_id(s)?, tk.token_id(m)?)))
    }

    /// The prompt of a fill-in-the-middle completion (prefix-suffix-middle order).
    pub fn encode_fim(&self, prefix: &str, suffix: &str) -> Result<Vec<u32>> {
        let (p, s, m) = self.fim_tokens().ok_or_else(|| {
            ModelError::Invalid(format!("{} has no fill-in-the-middle tokens", self.name))
        })?;
        let tk = &self.tokenizer;
        let mut ids = Vec::new();
        if tk.add_bos
            && let Some(b) = tk.bos
        {
            ids.push(b);
        }
        ids.push(p);
        ids.extend(tk.encode(prefix, false, false)?);
        ids.push(s);
        ids.extend(tk.encode(suffix, false, false)?);
        ids.push(m);
        Ok(ids)
    }

    pub fn forward(&self) -> Forward<'_> {
        Forward {
            cfg: &self.cfg,
            w: &self.weights,
            kern: self.kern,
        }
    }
}

/// Tokenizes a rendered chat, keeping control tokens out of message content.
pub fn encode_rendered(tk: &Tokenizer, rendered: &str, messages: &[Message]) -> Result<Vec<u32>> {
    let mut spans = Vec::new();
    let mut cursor = 0;
    for m in messages {
        if !tk.has_control_text(&m.content) {
            continue;
        }
        // Templates insert content verbatim or trimmed; find it after the previous one.
        let found = [m.content.as_str(), m.content.trim()]
            .into_iter()
            .find_map(|c| rendered[cursor..].find(c).map(|p| (cursor + p, c.len())));
        match found {
            Some((p, n)) => {
                spans.push(p..p + n);
                cursor = p + n;
            }
            None => {
                return Err(ModelError::Template(
                    "a message contains special-token text that the chat template changed, \
                     so it cannot be kept as plain text"
                        .into(),
                ));
            }
        }
    }
    let mut ids = tk.encode_spans(rendered, false, true, &spans)?;
    // Templates normally write BOS themselves; add it when one that should does not.
    if tk.add_bos
        && let Some(bos) = tk.bos
        && ids.first() != Some(&bos)
    {
        ids.insert(0, bos);
    }
    Ok(ids)
}
