//! bf16 products for the training backward's largest products, `dx = dy · W` through
//! the frozen base (`matmul::matmul_backward_input`) and three of the attention
//! backward's: inputs rounded to bf16, products accumulated in f32, as PyTorch's autocast
//! does on this hardware. Two kernels share one operand layout: AMX tiles (`tdpbf16ps`)
//! where the CPU has AMX-BF16, else AVX512-BF16's `vdpbf16ps` (AMD Zen 4 and later,
//! Intel Cooper Lake), which does the same pairs of bf16 products 16 lanes at a time.
//!
//! Inference never comes here (its kernels reproduce llama.cpp's arithmetic); training
//! only needs gradients within the tolerances its tests state against TRL and finite
//! differences, and bf16 inputs keep them. `BRISE_NO_BF16=1` turns both kernels off (f32
//! everywhere); `BRISE_NO_AMX=1` turns off only the tiles.
//!
//! Layouts, all zero-padded to whole tiles:
//! - A (`m × g`, the rows of `dy`): bf16, row-major, rows of `g_pad` (a multiple of 32).
//! - B (`g × k`, rows of W): "VNNI" pairs, one 1 KiB tile per (32 rows of g, 16 columns
//!   of k): element `[p][2c + e]` is `B[32·kb + 2p + e][16·nb + c]`; the tiles of one
//!   column block follow each other along g, so a column block is one run of 64-byte
//!   pair rows, which is also what `vdpbf16ps` reads.
//! - C (`m × k` f32): rows of `k_pad` (a multiple of 32), computed in 32 × 32 blocks of
//!   four 16 × 16 tiles (AMX) or 8 × 48 blocks of zmm registers (AVX512-BF16).

use std::sync::OnceLock;

/// Which kernel [`gemm`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AMX-TILE and AMX-BF16, with the tile state granted by Linux.
    Tiles,
    /// AVX512-BF16 (`vdpbf16ps`) with AVX-512F/BW/VL/DQ, AVX2 and FMA.
    Avx512Bf16,
}

/// The bf16 kernel here, if any: AMX first, then AVX512-BF16; none when `BRISE_NO_BF16`
/// is set (`BRISE_NO_AMX` skips only the tiles).
pub fn kernel() -> Option<Kernel> {
    static K: OnceLock<Option<Kernel>> = OnceLock::new();
    *K.get_or_init(|| {
        if std::env::var_os("BRISE_NO_BF16").is_some() {
            return None;
        }
        if std::env::var_os("BRISE_NO_AMX").is_none() && detect_tiles() {
            return Some(Kernel::Tiles);
        }
        detect_avx512_bf16().then_some(Kernel::Avx512Bf16)
    })
}

/// Whether the bf16 products run here (on either kernel).
pub fn available() -> bool {
    kernel().is_some()
}

/// The SIMD levels both kernels' callers use besides the bf16 instructions (the
/// packers, `lora::dot` in the attention backward).
#[cfg(target_arch = "x86_64")]
fn simd_levels() -> bool {
    crate::cpu::has_avx512()
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
fn detect_avx512_bf16() -> bool {
    std::arch::is_x86_feature_detected!("avx512bf16") && simd_levels()
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx512_bf16() -> bool {
    false
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect_tiles() -> bool {
    static T: OnceLock<bool> = OnceLock::new();
    *T.get_or_init(|| {
        let l7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (bf16, tile) = (l7.edx & (1 << 22) != 0, l7.edx & (1 << 24) != 0);
        if !(bf16 && tile && simd_levels()) {
            return false;
        }
        // Linux gives a process the (8 KiB) tile state only once it asks for it.
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with integer arguments; a refusal is a return value.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        r == 0
    })
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect_tiles() -> bool {
    false
}

/// f32 → bf16, rounding to nearest even (inputs here are finite).
#[inline(always)]
pub fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

pub fn pad32(x: usize) -> usize {
    x.div_ceil(32) * 32
}

/// Tiles of B per column block for `g` rows.
pub fn b_tiles(g: usize) -> usize {
    pad32(g) / 32
}

/// Writes rows `j` and `j + 1` (`j` even; `k` values each) of B into the VNNI layout
/// `bp` for `g` rows: one pass of 64-byte runs, the pairs interleaved.
pub fn pack_b_pair(bp: &mut [u16], g: usize, k: usize, j: usize, r0: &[f32], r1: &[f32]) {
    debug_assert!(j.is_multiple_of(2));
    assert!(r0.len() >= k && r1.len() >= k && bp.len() >= b_len(g, k));
    let kbs = b_tiles(g);
    let (kb, p) = (j / 32, (j % 32) / 2);
    let full = k / 16;
    let mut nb0 = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx512() {
        // SAFETY: AVX-512F is present (checked); the lengths are asserted above.
        unsafe { x86::pack_b_pair(bp, kbs, kb, p, full, r0, r1) };
        nb0 = full;
    }
    for nb in nb0..k.div_ceil(16) {
        let o = (nb * kbs + kb) * 512 + p * 32;
        let dst = &mut bp[o..o + 32];
        let c0 = nb * 16;
        let w = 16.min(k - c0);
        for c in 0..w {
            dst[2 * c] = bf16(r0[c0 + c]);
            dst[2 * c + 1] = bf16(r1[c0 + c]);
        }
    }
}

/// The size (in u16) of B's layout for `g × k`.
pub fn b_len(g: usize, k: usize) -> usize {
    pad32(k) / 16 * b_tiles(g) * 512
}

/// Rows `rows` of A (`a[i·lda + c0 ..][..g]`) as bf16 rows of `pad32(g)`.
pub fn pack_a(ap: &mut [u16], a: &[f32], lda: usize, c0: usize, g: usize, rows: usize) {
    let gp = pad32(g);
    #[cfg(target_arch = "x86_64")]
    let simd = crate::cpu::has_avx512();
    for i in 0..rows {
        let src = &a[i * lda + c0..i * lda + c0 + g];
        let dst = &mut ap[i * gp..i * gp + gp];
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX-512F is present (checked).
            done = unsafe { x86::to_bf16(src, dst) };
        }
        for (d, &s) in dst[done..].iter_mut().zip(&src[done..]) {
            *d = bf16(s);
        }
        dst[g..].fill(0);
    }
}

/// `c (m_pad × k_pad, rows of k_pad) += a · b` (or `=` when not `accumulate`, so `c`
/// need not be zeroed first), with `a` from [`pack_a`] (`m_pad` rows, a multiple of 32)
/// and `b` from [`pack_b_pair`] for `g` rows and `k_pad` columns.
///
/// # Safety
/// [`available`] returned true, and the buffers have the sizes above.
pub unsafe fn gemm(
    c: &mut [f32],
    m_pad: usize,
    k_pad: usize,
    a: &[u16],
    b: &[u16],
    g: usize,
    accumulate: bool,
) {
    let kbs = b_tiles(g);
    // SAFETY: the caller checked `available`; `gemm_with` asserts the sizes.
    unsafe {
        gemm_with(
            kernel().expect("the caller checks available"),
            c,
            m_pad,
            k_pad,
            a,
            b,
            kbs,
            accumulate,
        )
    }
}

/// [`gemm`] on a given kernel (`kbs` tiles along g), so tests can run each one here.
///
/// # Safety
/// The CPU has `kern` (for tiles, with the tile state granted); the sizes are asserted.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_with(
    kern: Kernel,
    c: &mut [f32],
    m_pad: usize,
    k_pad: usize,
    a: &[u16],
    b: &[u16],
    kbs: usize,
    accumulate: bool,
) {
    assert!(m_pad.is_multiple_of(32) && k_pad.is_multiple_of(32));
    assert!(
        c.len() >= m_pad * k_pad
            && a.len() >= m_pad * kbs * 32
            && b.len() >= k_pad / 16 * kbs * 512
    );
    if kbs == 0 {
        if !accumulate {
            c[..m_pad * k_pad].fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as the caller promises.
    unsafe {
        match kern {
            Kernel::Tiles => x86::gemm(c, m_pad, k_pad, a, b, kbs, accumulate),
            Kernel::Avx512Bf16 => x86::gemm_dp(c, m_pad, k_pad, a, b, kbs, accumulate),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (kern, c, m_pad, k_pad, a, b, kbs, accumulate);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;

    /// Palette 1: tmm0–3 the C tiles (16 rows × 64 bytes), tmm4–5 A, tmm6–7 B.
    #[repr(C, align(64))]
    struct TileCfg([u8; 64]);

    fn config() -> TileCfg {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
        }
        TileCfg(c)
    }

    /// [`super::bf16`]'s rounding on 16 f32 bit patterns: the bf16 is each lane's high half.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn round_bf16(x: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
        _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), odd)
    }

    /// [`super::bf16`] of `src`'s first multiple of 16 values into `dst`; returns how
    /// many it wrote.
    ///
    /// # Safety
    ///
    /// AVX-512F/BW/VL/DQ are present.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    pub unsafe fn to_bf16(src: &[f32], dst: &mut [u16]) -> usize {
        use std::arch::x86_64::*;
        let body = src.len().min(dst.len()) / 16 * 16;
        let mut i = 0;
        while i < body {
            // SAFETY: i + 16 ≤ body, inside both slices.
            unsafe {
                let x = _mm512_castps_si512(_mm512_loadu_ps(src.as_ptr().add(i)));
                let h = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(round_bf16(x)));
                _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, h);
            }
            i += 16;
        }
        body
    }

    /// The first `full` column blocks of [`super::pack_b_pair`]: [`super::bf16`]'s
    /// rounding on 16 lanes, each u32 lane then holding row 0's bf16 in its low half and
    /// row 1's in its high half, which is the pair's interleaved layout.
    ///
    /// # Safety
    ///
    /// AVX-512F/BW/VL/DQ are present; `r0` and `r1` hold `16 · full` values and `bp` the
    /// layout's `(full · kbs) · 512` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    pub unsafe fn pack_b_pair(
        bp: &mut [u16],
        kbs: usize,
        kb: usize,
        p: usize,
        full: usize,
        r0: &[f32],
        r1: &[f32],
    ) {
        use std::arch::x86_64::*;
        for nb in 0..full {
            let o = (nb * kbs + kb) * 512 + p * 32;
            // SAFETY: columns 16·nb.. of both rows and the 32 values at o are in bounds.
            unsafe {
                let a = round_bf16(_mm512_castps_si512(_mm512_loadu_ps(
                    r0.as_ptr().add(16 * nb),
                )));
                let b = round_bf16(_mm512_castps_si512(_mm512_loadu_ps(
                    r1.as_ptr().add(16 * nb),
                )));
                let v = _mm512_or_si512(
                    _mm512_srli_epi32::<16>(a),
                    _mm512_and_si512(b, _mm512_set1_epi32(0xffff_0000u32 as i32)),
                );
                _mm512_storeu_si512(bp.as_mut_ptr().add(o) as *mut __m512i, v);
            }
        }
    }

    /// # Safety
    ///
    /// As `super::gemm` (the tile kernel): the CPU has AMX-TILE and AMX-BF16 with the tile
    /// state granted by Linux, and `c`, `a`, `b` are sized as it says.
    pub unsafe fn gemm(
        c: &mut [f32],
        m_pad: usize,
        k_pad: usize,
        a: &[u16],
        b: &[u16],
        kbs: usize,
        accumulate: bool,
    ) {
        let cfg = config();
        let ldc = k_pad * 4;
        let lda = kbs * 64;
        // SAFETY: loads the tile configuration; the tiles stay ours until tilerelease
        // below (Rust code never uses tile registers).
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack)) };
        for i0 in (0..m_pad).step_by(32) {
            for j0 in (0..k_pad).step_by(32) {
                // SAFETY: C rows i0..i0+32 and columns j0..j0+32 are inside m_pad × k_pad;
                // A rows i0..i0+32 have kbs chunks of 32 bf16; B's column blocks j0/16 and
                // j0/16 + 1 have kbs tiles each. All asserted by the caller.
                unsafe {
                    let pc = c.as_mut_ptr().add(i0 * k_pad + j0) as *mut u8;
                    let pa = a.as_ptr().add(i0 * kbs * 32) as *const u8;
                    let pb = b.as_ptr().add((j0 / 16) * kbs * 512) as *const u8;
                    asm!(
                        "test {acc}, {acc}",
                        "jz 3f",
                        "tileloadd tmm0, [{c} + {ldc}*1]",
                        "tileloadd tmm1, [{c1} + {ldc}*1]",
                        "tileloadd tmm2, [{c2} + {ldc}*1]",
                        "tileloadd tmm3, [{c3} + {ldc}*1]",
                        "jmp 2f",
                        "3:",
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        "2:",
                        // Each product issued as soon as its operands are loaded:
                        // 10% faster than four loads then four products.
                        "tileloadd tmm4, [{a0} + {lda}*1]",
                        "tileloadd tmm6, [{b0} + {s64}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm7, [{b1} + {s64}*1]",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tileloadd tmm5, [{a1} + {lda}*1]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        "add {a0}, 64",
                        "add {a1}, 64",
                        "add {b0}, 1024",
                        "add {b1}, 1024",
                        "dec {n}",
                        "jnz 2b",
                        "tilestored [{c} + {ldc}*1], tmm0",
                        "tilestored [{c1} + {ldc}*1], tmm1",
                        "tilestored [{c2} + {ldc}*1], tmm2",
                        "tilestored [{c3} + {ldc}*1], tmm3",
                        c = in(reg) pc,
                        c1 = in(reg) pc.add(64),
                        c2 = in(reg) pc.add(16 * ldc),
                        c3 = in(reg) pc.add(16 * ldc + 64),
                        ldc = in(reg) ldc,
                        a0 = inout(reg) pa => _,
                        a1 = inout(reg) pa.add(16 * lda) => _,
                        lda = in(reg) lda,
                        b0 = inout(reg) pb => _,
                        b1 = inout(reg) pb.add(kbs * 1024) => _,
                        s64 = in(reg) 64usize,
                        n = inout(reg) kbs => _,
                        acc = in(reg) usize::from(accumulate),
                        options(nostack),
                    );
                }
            }
        }
        // SAFETY: gives the tile state back (and marks it unused for context switches).
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// Column blocks of 16 per register block of [`gemm_dp`]: 8 rows × 3 blocks are 24
    /// accumulators, plus 3 of B and A's broadcast, of the 32 zmm registers.
    const DP_NB: usize = 3;

    /// [`super::gemm`] on AVX512-BF16: C in blocks of 8 rows × up to 3 column blocks held
    /// in registers through one pass over g's pairs; per pair, each row's two bf16 of A
    /// are broadcast and `vdpbf16ps` adds their products with B's 16 columns.
    ///
    /// # Safety
    ///
    /// see `super::gemm`; the CPU has AVX512-BF16, F and BW.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn gemm_dp(
        c: &mut [f32],
        m_pad: usize,
        k_pad: usize,
        a: &[u16],
        b: &[u16],
        kbs: usize,
        accumulate: bool,
    ) {
        let nbs = k_pad / 16;
        let (lda, bstride, pairs) = (kbs * 32, kbs * 512, kbs * 16);
        let mut nb = 0;
        while nb < nbs {
            let w = (nbs - nb).min(DP_NB);
            for i0 in (0..m_pad).step_by(8) {
                // SAFETY: rows i0..i0+8 (m_pad is a multiple of 32) and column blocks
                // nb..nb+w are inside C, A and B as the caller sized them.
                unsafe {
                    let pc = c.as_mut_ptr().add(i0 * k_pad + nb * 16);
                    let pa = a.as_ptr().add(i0 * lda);
                    let pb = b.as_ptr().add(nb * bstride);
                    match w {
                        3 => dp_block::<3>(pc, k_pad, pa, lda, pb, bstride, pairs, accumulate),
                        2 => dp_block::<2>(pc, k_pad, pa, lda, pb, bstride, pairs, accumulate),
                        _ => dp_block::<1>(pc, k_pad, pa, lda, pb, bstride, pairs, accumulate),
                    }
                }
            }
            nb += w;
        }
    }

    /// One block of [`gemm_dp`]: 8 rows of C (rows of `ldc`) × `NB` column blocks.
    ///
    /// # Safety
    ///
    /// AVX512-BF16, F and BW; `c` has 8 rows of `16·NB` values, `a` 8 rows of
    /// `2·pairs`, and `b` `NB` column blocks of `pairs` 32-value pair rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dp_block<const NB: usize>(
        c: *mut f32,
        ldc: usize,
        a: *const u16,
        lda: usize,
        b: *const u16,
        bstride: usize,
        pairs: usize,
        accumulate: bool,
    ) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); NB]; 8];
        if accumulate {
            for (r, row) in acc.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    // SAFETY: inside C's block (the caller's promise).
                    *v = unsafe { _mm512_loadu_ps(c.add(r * ldc + 16 * j)) };
                }
            }
        }
        for q in 0..pairs {
            let mut bv = [_mm512_setzero_si512(); NB];
            for (j, v) in bv.iter_mut().enumerate() {
                // SAFETY: pair row q of column block j is inside B.
                *v = unsafe { _mm512_loadu_si512(b.add(j * bstride + q * 32) as *const __m512i) };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: A's pair q of row r is inside A; an unaligned 4-byte read.
                let pair = unsafe { (a.add(r * lda + 2 * q) as *const i32).read_unaligned() };
                // SAFETY: __m512i and __m512bh are both 64 bytes of plain lanes; the
                // instruction reads them as 32 bf16.
                let av: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(pair)) };
                for (v, bj) in row.iter_mut().zip(&bv) {
                    // SAFETY: as above.
                    let bh: __m512bh = unsafe { std::mem::transmute(*bj) };
                    *v = _mm512_dpbf16_ps(*v, av, bh);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                // SAFETY: inside C's block.
                unsafe { _mm512_storeu_ps(c.add(r * ldc + 16 * j), *v) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn pair_packing_matches_its_scalar_model() {
        for (g, k) in [(2, 16), (64, 576), (70, 100), (33, 47)] {
            let rows = lcg(9, (g + 1) * k);
            let mut got = vec![0u16; b_len(g, k)];
            let mut want = got.clone();
            for j in (0..g).step_by(2) {
                let (r0, r1) = (&rows[j * k..(j + 1) * k], &rows[(j + 1) * k..(j + 2) * k]);
                pack_b_pair(&mut got, g, k, j, r0, r1);
                let (kbs, kb, p) = (b_tiles(g), j / 32, (j % 32) / 2);
                for c in 0..k {
                    let o = (c / 16 * kbs + kb) * 512 + p * 32 + 2 * (c % 16);
                    want[o] = bf16(r0[c]);
                    want[o + 1] = bf16(r1[c]);
                }
            }
            assert_eq!(got, want, "g {g} k {k}");
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: even (1.0) wins.
        assert_eq!(bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(bf16(-2.5), 0xc020);
        assert_eq!(bf16_to_f32(bf16(0.15625)), 0.15625);
    }

    /// The tiles against a float64 product of the same bf16-rounded inputs, on shapes
    /// with every kind of padding (m, g, k not multiples of 32), and accumulation into
    /// a non-zero C.
    #[test]
    fn kernels_match_the_reference_product() {
        let kernels: Vec<Kernel> = [
            detect_tiles().then_some(Kernel::Tiles),
            detect_avx512_bf16().then_some(Kernel::Avx512Bf16),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !detect_tiles() {
            crate::skipped(
                "no AMX on this CPU: amx::tests::kernels_match_the_reference_product did not \
                 test the AMX tile kernel; run it on a CPU with AMX-TILE and AMX-BF16",
            );
        }
        if !detect_avx512_bf16() {
            crate::skipped(
                "no AVX512-BF16 on this CPU: amx::tests::kernels_match_the_reference_product \
                 did not test the AVX512-BF16 kernel",
            );
        }
        for kern in kernels {
            reference_product(kern);
        }
    }

    fn reference_product(kern: Kernel) {
        for &(m, g, k) in &[
            (32, 32, 32),
            (7, 5, 3),
            (45, 70, 100),
            (64, 257, 48),
            (33, 1024, 576),
            (9, 40, 64),
        ] {
            let (mp, kp) = (pad32(m), pad32(k));
            let lda = g + 3;
            let a = lcg(1, m * lda);
            let bm = lcg(2, g * k);
            let c0 = lcg(3, m * k);
            let mut ap = vec![0u16; mp * pad32(g)];
            pack_a(&mut ap, &a, lda, 3, g, m);
            let mut bp = vec![0u16; b_len(g, kp)];
            let zero = vec![0f32; k];
            let row = |j: usize| {
                if j < g {
                    &bm[j * k..(j + 1) * k]
                } else {
                    &zero[..]
                }
            };
            for j in (0..g).step_by(2) {
                pack_b_pair(&mut bp, g, k, j, row(j), row(j + 1));
            }
            let mut c = vec![0f32; mp * kp];
            for i in 0..m {
                c[i * kp..i * kp + k].copy_from_slice(&c0[i * k..(i + 1) * k]);
            }
            let kbs = b_tiles(g);
            // SAFETY: the CPU has `kern` (detected) and the buffers are sized as `gemm`
            // says.
            unsafe { gemm_with(kern, &mut c, mp, kp, &ap, &bp, kbs, true) };
            let r = |x: f32| f64::from(bf16_to_f32(bf16(x)));
            for i in 0..m {
                for j in 0..k {
                    let (mut want, mut mag) =
                        (f64::from(c0[i * k + j]), f64::from(c0[i * k + j]).abs());
                    for p in 0..g {
                        let t = r(a[i * lda + 3 + p]) * r(bm[p * k + j]);
                        want += t;
                        mag += t.abs();
                    }
                    let got = f64::from(c[i * kp + j]);
                    assert!(
                        (got - want).abs() <= 1e-6 * mag + 1e-30,
                        "{kern:?} m {m} g {g} k {k} at ({i}, {j}): {got} vs {want}"
                    );
                }
                // Padding columns stay zero.
                assert!(c[i * kp + k..(i + 1) * kp].iter().all(|&x| x == 0.0));
            }
            // Without accumulation, C's old contents (NaN here) do not matter.
            let mut fresh = vec![f32::NAN; mp * kp];
            // SAFETY: as above.
            unsafe { gemm_with(kern, &mut fresh, mp, kp, &ap, &bp, kbs, false) };
            let mut c1 = vec![0f32; mp * kp];
            // SAFETY: as above.
            unsafe { gemm_with(kern, &mut c1, mp, kp, &ap, &bp, kbs, true) };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&fresh),
                bits(&c1),
                "{kern:?} m {m} g {g} k {k}: C from zero"
            );
        }
    }
}
