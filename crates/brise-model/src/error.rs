use std::path::PathBuf;

/// Errors of the model layer. Every variant names the file or thing at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid GGUF file: {msg}")]
    Gguf { path: PathBuf, msg: String },
    #[error("{path}: not a valid safetensors model: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{path}: LoRA adapter: {msg}")]
    Lora { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error(
        "the prompt is {n_prompt} tokens but the context holds {n_ctx}; shorten the prompt or raise --ctx-size"
    )]
    ContextOverflow { n_prompt: usize, n_ctx: usize },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;
