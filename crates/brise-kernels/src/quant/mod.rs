//! Quantized block formats: dequantization, activation quantization and dot products.

mod act;
mod dequant;
mod dot_ref;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use act::{act_row_bytes, quantize_act_row};
pub use dequant::dequantize_row;
pub use dot_ref::dot_ref;

use crate::cpu::Isa;
use crate::ggml_type::GgmlType;

/// A dot-product kernel set for one ISA level. Holding one proves the CPU supports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    isa: Isa,
}

impl Kernels {
    /// Kernels for `isa`, or `None` if this CPU lacks it.
    pub fn new(isa: Isa) -> Option<Kernels> {
        (isa <= Isa::detect()).then_some(Kernels { isa })
    }

    /// The best kernels this CPU runs.
    pub fn best() -> Kernels {
        Kernels { isa: Isa::detect() }
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Dot product of one `wty` weight row (`k` elements) with one activation row
    /// already in `wty.vec_dot_type()`'s format.
    ///
    /// Panics if a slice is shorter than `k` elements need.
    #[inline]
    pub fn dot(&self, wty: GgmlType, k: usize, w: &[u8], a: &[u8]) -> f32 {
        let wb = wty.row_bytes(k).expect("k is a whole number of blocks");
        assert!(w.len() >= wb, "weight row too short");
        assert!(
            a.len() >= act_row_bytes(wty.vec_dot_type(), k),
            "activation row too short"
        );
        match self.isa {
            Isa::Scalar => dot_ref(wty, k, w, a),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a `Kernels` exists only for an ISA the CPU supports, and both rows
            // hold `k` elements (checked above).
            Isa::Avx2 => unsafe { x86::dot_avx2(wty, k, w.as_ptr(), a.as_ptr()) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, for AVX-512 F/BW/VL/VNNI.
            Isa::Avx512Vnni => unsafe { x86::dot_avx512vnni(wty, k, w.as_ptr(), a.as_ptr()) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => dot_ref(wty, k, w, a),
        }
    }
}
