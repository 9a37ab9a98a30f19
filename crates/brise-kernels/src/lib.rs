//! brise's compute kernels: quantized block formats, SIMD dot products, fused ops and
//! the thread pool. Knows nothing of models, files or HTTP.

pub mod amx;
pub mod attn;
pub mod cpu;
pub mod ggml_type;
pub mod kpacked;
pub mod lora;
pub mod matmul;
pub mod ops;
pub mod packed;
pub mod pool;
pub mod quant;

pub use cpu::Isa;
pub use ggml_type::{GgmlType, QK_K};
