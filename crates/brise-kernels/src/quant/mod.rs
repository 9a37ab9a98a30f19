//! Quantized block formats: dequantization, activation quantization and dot products.

mod act;
pub(crate) mod dequant;
mod dot_ref;
pub mod ggml_exact;
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
    /// Matrix products of long steps in f32 instead of llama.cpp's arithmetic (see
    /// [`crate::matmul::FAST_MIN_STEP`]): for training, which does not need its bits.
    fast: bool,
}

impl Kernels {
    /// Kernels for `isa`, or `None` if this CPU lacks it.
    pub fn new(isa: Isa) -> Option<Kernels> {
        (isa <= Isa::detect()).then_some(Kernels { isa, fast: false })
    }

    /// The best kernels this CPU runs.
    pub fn best() -> Kernels {
        Kernels {
            isa: Isa::detect(),
            fast: false,
        }
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// These kernels with the fast f32 matrix products on or off (off by default, so
    /// inference keeps llama.cpp's bits). Only below [`Isa::Avx512Vnni`] do they change
    /// anything: there the packed int8 products are already fast.
    pub fn with_fast(self, fast: bool) -> Kernels {
        Kernels { fast, ..self }
    }

    /// Whether matrix products of long steps take the f32 path.
    pub fn fast(&self) -> bool {
        self.fast && self.isa < Isa::Avx512Vnni
    }

    /// One output element exactly as llama.cpp computes it on `path` (see
    /// [`ggml_exact`]): SIMD where brise has a bit-identical kernel, the scalar model
    /// otherwise. Types and paths ggml_exact does not model fall back to [`Self::dot`].
    #[inline]
    pub fn dot_path(
        &self,
        path: ggml_exact::Path,
        wty: GgmlType,
        k: usize,
        w: &[u8],
        a: &[u8],
    ) -> f32 {
        use GgmlType::*;
        use ggml_exact::Path as P;
        match (path, wty) {
            // brise's SIMD kernels use ggml's lanes and float order.
            (P::VecDot | P::TinyBlasQ0, Q4_0 | Q5_0 | Q8_0)
            | (P::VecDot, Q4_1 | Q5_1 | Q2K | Q3K | Q4K | Q5K | Q6K)
                if self.isa != Isa::Scalar =>
            {
                self.dot(wty, k, w, a)
            }
            #[cfg(target_arch = "x86_64")]
            (P::Tiled | P::RepackGemv | P::RepackGemm, _)
                if self.isa != Isa::Scalar && ggml_exact::is_modeled(path, wty) =>
            {
                let xp = match (path, wty) {
                    (P::Tiled, _) => x86::ExactPath::Tiled,
                    (_, Q4_0) => x86::ExactPath::RepackQ4_0,
                    (P::RepackGemv, _) => x86::ExactPath::RepackKquant { group: 256 },
                    (_, Q4K) => x86::ExactPath::RepackKquant { group: 64 },
                    _ => x86::ExactPath::RepackKquant { group: 128 },
                };
                let wb = wty.row_bytes(k).expect("whole blocks");
                assert!(
                    w.len() >= wb && a.len() >= act_row_bytes(wty.vec_dot_type(), k),
                    "row too short"
                );
                // SAFETY: a `Kernels` above Scalar exists only on CPUs with its ISA; the
                // rows hold k elements (checked above).
                unsafe {
                    match self.isa {
                        Isa::Avx512Vnni => {
                            x86::dot_exact_avx512vnni(xp, wty, k, w.as_ptr(), a.as_ptr())
                        }
                        _ => x86::dot_exact_avx2(xp, wty, k, w.as_ptr(), a.as_ptr()),
                    }
                }
            }
            (P::VecDot, F16) => crate::attn::dot_f16(crate::attn::DotOrder::Vec, w, a, 0, k, k),
            (P::TinyBlasF16, F16) => {
                crate::attn::dot_f16(crate::attn::DotOrder::Tiny, w, a, 0, k, k)
            }
            _ if ggml_exact::is_modeled(path, wty) => ggml_exact::ggml_dot(path, wty, k, w, a),
            _ => self.dot(wty, k, w, a),
        }
    }

    /// `out[r]` = [`Self::dot_path`] of weight row `r` of `w` (consecutive rows of `k`
    /// elements) with activation row `a`, for `out.len()` rows: the hot loop of every
    /// matrix product, with the type and path dispatched once per call.
    pub fn dot_rows(
        &self,
        path: ggml_exact::Path,
        wty: GgmlType,
        k: usize,
        w: &[u8],
        a: &[u8],
        out: &mut [f32],
    ) {
        use GgmlType::*;
        use ggml_exact::Path as P;
        let rb = wty.row_bytes(k).expect("whole blocks");
        let n = out.len();
        assert!(w.len() >= n * rb, "weight rows too short");
        assert!(
            a.len() >= act_row_bytes(wty.vec_dot_type(), k),
            "activation row too short"
        );
        #[cfg(target_arch = "x86_64")]
        if self.isa != Isa::Scalar {
            let kind = match (path, wty) {
                (P::VecDot | P::TinyBlasQ0, Q4_0 | Q5_0 | Q8_0)
                | (P::VecDot, Q4_1 | Q5_1 | Q2K | Q3K | Q4K | Q5K | Q6K) => {
                    Some(x86::RowKind::Plain)
                }
                (P::Tiled, Q2K | Q3K | Q4K | Q5K | Q6K) => {
                    Some(x86::RowKind::Exact(x86::ExactPath::Tiled))
                }
                (P::RepackGemv | P::RepackGemm, Q4_0) => {
                    Some(x86::RowKind::Exact(x86::ExactPath::RepackQ4_0))
                }
                (P::RepackGemv, Q4K | Q2K) => {
                    Some(x86::RowKind::Exact(x86::ExactPath::RepackKquant {
                        group: 256,
                    }))
                }
                (P::RepackGemm, Q4K) => Some(x86::RowKind::Exact(x86::ExactPath::RepackKquant {
                    group: 64,
                })),
                (P::RepackGemm, Q2K) => Some(x86::RowKind::Exact(x86::ExactPath::RepackKquant {
                    group: 128,
                })),
                _ => None,
            };
            if let Some(kind) = kind {
                // SAFETY: the ISA is supported (a `Kernels` exists only then) and the
                // slices hold n weight rows and one activation row (checked above).
                unsafe {
                    match self.isa {
                        Isa::Avx512Vnni => x86::rows_avx512vnni(
                            kind,
                            wty,
                            k,
                            w.as_ptr(),
                            rb,
                            n,
                            a.as_ptr(),
                            out.as_mut_ptr(),
                        ),
                        _ => x86::rows_avx2(
                            kind,
                            wty,
                            k,
                            w.as_ptr(),
                            rb,
                            n,
                            a.as_ptr(),
                            out.as_mut_ptr(),
                        ),
                    }
                }
                return;
            }
        }
        for (r, o) in out.iter_mut().enumerate() {
            *o = self.dot_path(path, wty, k, &w[r * rb..(r + 1) * rb], a);
        }
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
