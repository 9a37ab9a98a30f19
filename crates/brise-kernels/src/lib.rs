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

/// Says on the real stderr that a test did not check something this CPU lacks. Written
/// past the test harness's capture (which hides `eprintln!` of passing tests), so a run
/// on a CPU without the feature cannot look like a full pass.
#[cfg(test)]
pub(crate) fn skipped(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {what}");
}

pub use cpu::Isa;
pub use ggml_type::{GgmlType, QK_K};
