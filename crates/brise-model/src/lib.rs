//! brise's model layer: GGUF and safetensors readers, tokenizers, chat templates,
//! architectures, the KV cache and the forward pass. Knows nothing of HTTP or databases.

pub mod error;
pub mod gguf;

pub use error::{ModelError, Result};
pub mod backward;
pub mod chat;
pub mod config;
pub mod forward;
pub mod kv;
pub mod lora;
pub mod model;
pub mod spm;
pub mod tokenizer;
pub mod weights;
pub use lora::LoraAdapter;
pub use model::{Model, ModelFormat};
