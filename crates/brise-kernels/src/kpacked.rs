//! K-quant weights (Q4_K, Q6_K) repacked at load for AVX-512: the "kq16" layout, the
//! K-quant counterpart of `packed`'s lanes16. One register holds a 4-byte lane of 16
//! rows, so `vpdpbusd` yields 16 rows' integer partial sums at once, and every f32
//! operation of llama.cpp's kernels is done for 16 rows in one instruction, in the
//! same order (vec_dot and the tiled matmul for Q6_K, the repacked GEMV/GEMM for Q4_K).
//!
//! Tile (one 256-element block of 16 rows):
//! - Q6_K: `d[16]` f16 · `sc[16 sub-blocks][16 rows]` i8 · low nibbles: 32 vectors
//!   `(half, c%2, lane)` of 16 rows × 4 bytes (low nibble: chunk c, high: chunk c+2) ·
//!   high bits: 16 vectors `(half, lane)` of 16 rows × 4 bytes (2 bits per chunk).
//!   3360 bytes, the size of 16 Q6_K blocks.
//! - Q4_K: `d[16]`, `dmin[16]` f16 · `sc[8][16]`, `m[8][16]` u8 · nibbles: 32 vectors
//!   `(chunk pair, lane)` (low nibble: even chunk, high: odd). 2368 bytes (16 blocks
//!   take 2304: the unpacked 6-bit scales cost 64 bytes).

use crate::ggml_type::{GgmlType, QK_K};
use crate::quant::dequant::{f16_at, k4_scales_mins};

pub const GROUP: usize = 16;

pub fn packable(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4K | GgmlType::Q6K)
}

pub fn tile_size(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q6K => 3360,
        GgmlType::Q4K => 2368,
        _ => unreachable!(),
    }
}

pub struct KPacked {
    pub ty: GgmlType,
    pub n: usize,
    pub k: usize,
    pub data: Vec<u8>,
}

impl KPacked {
    pub fn groups(&self) -> usize {
        self.n.div_ceil(GROUP)
    }

    pub fn blocks(&self) -> usize {
        self.k / QK_K
    }

    pub fn pack(ty: GgmlType, n: usize, k: usize, src: &[u8]) -> KPacked {
        assert!(packable(ty) && k.is_multiple_of(QK_K));
        let bs = ty.type_size();
        let nb = k / QK_K;
        let rb = nb * bs;
        assert!(src.len() >= n * rb);
        let groups = n.div_ceil(GROUP);
        let ts = tile_size(ty);
        let mut data = vec![0u8; groups * nb * ts];
        for g in 0..groups {
            for b in 0..nb {
                let t = &mut data[(g * nb + b) * ts..(g * nb + b + 1) * ts];
                for r in 0..GROUP {
                    let row = g * GROUP + r;
                    if row >= n {
                        continue;
                    }
                    let x = &src[row * rb + b * bs..row * rb + (b + 1) * bs];
                    match ty {
                        GgmlType::Q6K => {
                            t[2 * r..2 * r + 2].copy_from_slice(&x[208..210]);
                            for s in 0..16 {
                                t[32 + s * 16 + r] = x[192 + s];
                            }
                            for h in 0..2 {
                                for c2 in 0..2 {
                                    for l in 0..8 {
                                        let v = 288 + ((h * 2 + c2) * 8 + l) * 64 + r * 4;
                                        let src = h * 64 + c2 * 32 + 4 * l;
                                        t[v..v + 4].copy_from_slice(&x[src..src + 4]);
                                    }
                                }
                                for l in 0..8 {
                                    let v = 288 + 2048 + (h * 8 + l) * 64 + r * 4;
                                    let src = 128 + h * 32 + 4 * l;
                                    t[v..v + 4].copy_from_slice(&x[src..src + 4]);
                                }
                            }
                        }
                        GgmlType::Q4K => {
                            t[2 * r..2 * r + 2].copy_from_slice(&x[0..2]);
                            t[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&x[2..4]);
                            let (sc, mn) = k4_scales_mins(&x[4..16]);
                            for s in 0..8 {
                                t[64 + s * 16 + r] = sc[s];
                                t[192 + s * 16 + r] = mn[s];
                            }
                            for c in 0..4 {
                                for l in 0..8 {
                                    let v = 320 + (c * 8 + l) * 64 + r * 4;
                                    let src = 16 + c * 32 + 4 * l;
                                    t[v..v + 4].copy_from_slice(&x[src..src + 4]);
                                }
                            }
                        }
                        _ => unreachable!(),
                    }
                }
            }
        }
        KPacked { ty, n, k, data }
    }

    /// Row `r` dequantized (embedding lookups and tests).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let ts = tile_size(self.ty);
        let (g, rr) = (r / GROUP, r % GROUP);
        for b in 0..self.blocks() {
            let t = &self.data[(g * self.blocks() + b) * ts..(g * self.blocks() + b + 1) * ts];
            let y = &mut out[b * QK_K..(b + 1) * QK_K];
            let d = f16_at(t, 2 * rr);
            for j in 0..8 {
                for l in 0..8 {
                    for i in 0..4 {
                        let e = 32 * j + 4 * l + i;
                        y[e] = match self.ty {
                            GgmlType::Q6K => {
                                let (h, c) = (j / 4, j % 4);
                                let lo = (t[288 + ((h * 2 + c % 2) * 8 + l) * 64 + rr * 4 + i]
                                    >> (4 * (c / 2)))
                                    & 0xf;
                                let hi =
                                    (t[288 + 2048 + (h * 8 + l) * 64 + rr * 4 + i] >> (2 * c)) & 3;
                                let q = (lo | (hi << 4)) as i32 - 32;
                                let sc = t[32 + (e / 16) * 16 + rr] as i8 as f32;
                                (d * sc) * q as f32
                            }
                            _ => {
                                let q = (t[320 + ((j / 2) * 8 + l) * 64 + rr * 4 + i]
                                    >> (4 * (j % 2)))
                                    & 0xf;
                                let dm = f16_at(t, 32 + 2 * rr);
                                let sc = t[64 + j * 16 + rr] as f32;
                                let mn = t[192 + j * 16 + rr] as f32;
                                (d * sc) * q as f32 - dm * mn
                            }
                        };
                    }
                }
            }
        }
    }
}

/// What each activation row computes (llama.cpp's kernel for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KMode {
    /// ggml's vec_dot lane order (Q6_K with fewer than 8 rows in the step).
    VecDot,
    /// The tiled matmul's one FMA per block (Q6_K with 8 or more rows).
    Tiled,
    /// Repacked Q4_K GEMV (one FMA per block) or GEMM (one per 64 elements).
    Repack { group: usize },
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! SAFETY (all functions): callers check AVX-512 F/BW/VL/DQ/VNNI, F16C and FMA, and
    //! that pointers cover the tiles, activation blocks (292 bytes each) and outputs.
    use super::{GROUP, KMode, tile_size};
    use crate::ggml_type::GgmlType;
    use core::arch::x86_64::*;

    /// # Safety
    ///
    /// The CPU has AVX-512F; `p` is readable for 64 bytes.
    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m512i {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe { _mm512_loadu_si512(p as *const __m512i) }
    }

    /// Codes (unsigned) of chunk j, lane l, for 16 rows.
    ///
    /// # Safety
    ///
    /// The module's CPU features; `t` is a whole tile of `ty` (`tile_size(ty)` bytes), `j < 8`
    /// and `l < 8`.
    #[inline(always)]
    unsafe fn code(ty: GgmlType, t: *const u8, j: usize, l: usize) -> __m512i {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let m4 = _mm512_set1_epi8(0x0f);
            match ty {
                GgmlType::Q6K => {
                    let (h, c) = (j / 4, j % 4);
                    let v = load(t.add(288 + ((h * 2 + c % 2) * 8 + l) * 64));
                    let lo = if c < 2 {
                        _mm512_and_si512(v, m4)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16(v, 4), m4)
                    };
                    let hv = load(t.add(288 + 2048 + (h * 8 + l) * 64));
                    let hi = _mm512_and_si512(
                        _mm512_srl_epi16(hv, _mm_cvtsi32_si128(2 * c as i32)),
                        _mm512_set1_epi8(3),
                    );
                    _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4))
                }
                _ => {
                    let v = load(t.add(320 + ((j / 2) * 8 + l) * 64));
                    if j.is_multiple_of(2) {
                        _mm512_and_si512(v, m4)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16(v, 4), m4)
                    }
                }
            }
        }
    }

    /// Per-row scale of sub-block s as i32 (Q6_K: 16 sub-blocks of 16, signed; Q4_K: 8 of
    /// 32, unsigned), and Q4_K's mins.
    ///
    /// # Safety
    ///
    /// The module's CPU features; `t` is a whole tile of `ty` and `s` a sub-block index of it
    /// (below 16 for Q6_K, 8 for Q4_K).
    #[inline(always)]
    unsafe fn scale(ty: GgmlType, t: *const u8, s: usize) -> __m512i {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let p = _mm_loadu_si128(
                t.add(if ty == GgmlType::Q6K { 32 } else { 64 } + s * 16) as *const __m128i
            );
            if ty == GgmlType::Q6K {
                _mm512_cvtepi8_epi32(p)
            } else {
                _mm512_cvtepu8_epi32(p)
            }
        }
    }

    /// # Safety
    ///
    /// The module's CPU features; `t` is a whole Q4_K tile and `s < 8`.
    #[inline(always)]
    unsafe fn mins(t: *const u8, s: usize) -> __m512i {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe { _mm512_cvtepu8_epi32(_mm_loadu_si128(t.add(192 + s * 16) as *const __m128i)) }
    }

    /// # Safety
    ///
    /// `y` is a whole activation block (292 bytes) and `g < 16`.
    #[inline(always)]
    unsafe fn bsum(y: *const u8, g: usize) -> i32 {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe { (y.add(260 + 2 * g) as *const i16).read_unaligned() as i32 }
    }

    /// Integer lane vectors of one block for one activation block `y`:
    /// `lane[l] = Σ_j sc(2j + l/4) · Σ_{4 bytes} code·aq` (sub-block scale per row).
    ///
    /// # Safety
    ///
    /// The module's CPU features; `t` is a whole tile of `ty` and `y` a whole activation
    /// block (292 bytes).
    #[inline(always)]
    unsafe fn lanes(ty: GgmlType, t: *const u8, y: *const u8) -> [__m512i; 8] {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let mut out = [_mm512_setzero_si512(); 8];
            for j in 0..8 {
                let (s0, s1) = if ty == GgmlType::Q6K {
                    (scale(ty, t, 2 * j), scale(ty, t, 2 * j + 1))
                } else {
                    let s = scale(ty, t, j);
                    (s, s)
                };
                for (l, o) in out.iter_mut().enumerate() {
                    let a = _mm512_set1_epi32(
                        (y.add(4 + 32 * j + 4 * l) as *const i32).read_unaligned(),
                    );
                    let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), code(ty, t, j, l), a);
                    *o = _mm512_add_epi32(*o, _mm512_mullo_epi32(p, if l < 4 { s0 } else { s1 }));
                }
            }
            out
        }
    }

    /// # Safety
    ///
    /// The CPU has AVX-512F (register arithmetic only).
    #[inline(always)]
    unsafe fn hsum8(a: &[__m512; 8]) -> __m512 {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let l = _mm512_add_ps(_mm512_add_ps(a[4], a[0]), _mm512_add_ps(a[6], a[2]));
            let r = _mm512_add_ps(_mm512_add_ps(a[5], a[1]), _mm512_add_ps(a[7], a[3]));
            _mm512_add_ps(l, r)
        }
    }

    /// One group of 16 rows, one activation row: `out[0..16]`.
    ///
    /// # Safety
    ///
    /// The module's CPU features; `tiles` holds `nb` tiles of `ty`, `act` `nb` activation
    /// blocks (292 bytes each) and `out` is writable for 16 floats.
    #[inline(always)]
    unsafe fn group(
        ty: GgmlType,
        mode: KMode,
        tiles: *const u8,
        nb: usize,
        act: *const u8,
        out: *mut f32,
    ) {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let ts = tile_size(ty);
            let mut acc = [_mm512_setzero_ps(); 8];
            let mut accm = _mm512_setzero_ps();
            for b in 0..nb {
                let t = tiles.add(b * ts);
                let y = act.add(b * 292);
                let dy = (y as *const f32).read_unaligned();
                let dv = _mm512_cvtph_ps(_mm256_loadu_si256(t as *const __m256i));
                match (ty, mode) {
                    (GgmlType::Q6K, _) => {
                        let mut ln = lanes(ty, t, y);
                        // The −32 offset: 32·(bsum[2l]·sc[2l] + bsum[2l+1]·sc[2l+1]) per lane.
                        for (l, v) in ln.iter_mut().enumerate() {
                            let c = _mm512_add_epi32(
                                _mm512_mullo_epi32(
                                    scale(ty, t, 2 * l),
                                    _mm512_set1_epi32(bsum(y, 2 * l)),
                                ),
                                _mm512_mullo_epi32(
                                    scale(ty, t, 2 * l + 1),
                                    _mm512_set1_epi32(bsum(y, 2 * l + 1)),
                                ),
                            );
                            *v = _mm512_sub_epi32(*v, _mm512_slli_epi32(c, 5));
                        }
                        if mode == KMode::VecDot {
                            let d = _mm512_mul_ps(_mm512_set1_ps(dy), dv);
                            for l in 0..8 {
                                acc[l] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(ln[l]), acc[l]);
                            }
                        } else {
                            let mut s1 = ln[0];
                            for v in &ln[1..] {
                                s1 = _mm512_add_epi32(s1, *v);
                            }
                            let r = _mm512_mul_ps(_mm512_cvtepi32_ps(s1), dv);
                            acc[0] = _mm512_fmadd_ps(r, _mm512_set1_ps(dy), acc[0]);
                        }
                    }
                    (_, KMode::Repack { group }) => {
                        let dmv = _mm512_cvtph_ps(_mm256_loadu_si256(t.add(32) as *const __m256i));
                        let ds = _mm512_mul_ps(dv, _mm512_set1_ps(dy));
                        let dm = _mm512_mul_ps(dmv, _mm512_set1_ps(dy));
                        let per = group / 32;
                        for g in 0..256 / group {
                            let mut i = _mm512_setzero_si512();
                            let mut im = _mm512_setzero_si512();
                            for j in g * per..(g + 1) * per {
                                // Chunk j's lanes: recompute from the sub-block (lanes() summed them
                                // over all chunks; the GEMM needs per-group sums).
                                let s = scale(ty, t, j);
                                let mut p = _mm512_setzero_si512();
                                for l in 0..8 {
                                    let a = _mm512_set1_epi32(
                                        (y.add(4 + 32 * j + 4 * l) as *const i32).read_unaligned(),
                                    );
                                    p = _mm512_dpbusd_epi32(p, code(ty, t, j, l), a);
                                }
                                i = _mm512_add_epi32(i, _mm512_mullo_epi32(p, s));
                                im = _mm512_add_epi32(
                                    im,
                                    _mm512_mullo_epi32(
                                        mins(t, j),
                                        _mm512_set1_epi32(bsum(y, 2 * j) + bsum(y, 2 * j + 1)),
                                    ),
                                );
                            }
                            acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), ds, acc[0]);
                            accm = _mm512_fmadd_ps(_mm512_cvtepi32_ps(im), dm, accm);
                        }
                    }
                    _ => unreachable!("Q4_K is only packed for the repacked paths"),
                }
            }
            let r = match (ty, mode) {
                (GgmlType::Q6K, KMode::VecDot) => hsum8(&acc),
                (GgmlType::Q6K, _) => acc[0],
                _ => _mm512_sub_ps(acc[0], accm),
            };
            _mm512_storeu_ps(out, r);
        }
    }

    /// `out[c·ldo + (g − g0)·16 + r]` for each group g in `groups` and activation row c.
    ///
    /// # Safety
    ///
    /// The CPU has AVX2, FMA, F16C and AVX-512F/BW/VL/DQ/VNNI; `data` holds `nb` tiles for
    /// every group in `groups`; `acts` holds `modes.len()` activation rows of `act_stride`
    /// bytes (`nb` blocks of 292 bytes each); `out` is writable at
    /// `c·ldo + (g − g0)·16 + r` for every row `c`, group `g` in `groups` and `r < 16`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    pub unsafe fn matmul_groups(
        ty: GgmlType,
        modes: &[KMode],
        data: *const u8,
        nb: usize,
        groups: std::ops::Range<usize>,
        g0: usize,
        acts: *const u8,
        act_stride: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let ts = tile_size(ty);
            let mut tmp = [0f32; GROUP];
            macro_rules! run {
                ($t:expr, $m:expr, $c:expr, $g:expr) => {{
                    group(
                        $t,
                        $m,
                        data.add($g * nb * ts),
                        nb,
                        acts.add($c * act_stride),
                        tmp.as_mut_ptr(),
                    );
                }};
            }
            let chunk = 64;
            let mut c0 = 0;
            while c0 < modes.len() {
                let c1 = (c0 + chunk).min(modes.len());
                for g in groups.clone() {
                    for c in c0..c1 {
                        match (ty, modes[c]) {
                            (GgmlType::Q6K, KMode::VecDot) => {
                                run!(GgmlType::Q6K, KMode::VecDot, c, g)
                            }
                            (GgmlType::Q6K, _) => run!(GgmlType::Q6K, KMode::Tiled, c, g),
                            (_, KMode::Repack { group: 64 }) => {
                                run!(GgmlType::Q4K, KMode::Repack { group: 64 }, c, g)
                            }
                            (_, m) => run!(GgmlType::Q4K, m, c, g),
                        }
                        std::ptr::copy_nonoverlapping(
                            tmp.as_ptr(),
                            out.add(c * ldo + (g - g0) * GROUP),
                            GROUP,
                        );
                    }
                }
                c0 = c1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_row;

    #[test]
    fn packed_rows_dequantize_like_the_originals() {
        for ty in [GgmlType::Q6K, GgmlType::Q4K] {
            let (n, k) = (20, 512);
            let rb = ty.row_bytes(k).unwrap();
            let mut src: Vec<u8> = (0..n * rb).map(|i| (i * 131 % 251) as u8).collect();
            for blk in src.chunks_exact_mut(ty.type_size()) {
                let o = if ty == GgmlType::Q6K { 208 } else { 0 };
                blk[o..o + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
                if ty == GgmlType::Q4K {
                    blk[2..4].copy_from_slice(&half::f16::from_f32(0.02).to_le_bytes());
                }
            }
            let p = KPacked::pack(ty, n, k, &src);
            let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
            for r in 0..n {
                dequantize_row(ty, &src[r * rb..(r + 1) * rb], &mut a);
                p.dequantize_row(r, &mut b);
                assert_eq!(a, b, "{ty} row {r}");
            }
        }
    }
}
