//! Weights repacked at load for the AVX-512 kernels: the "lanes16" layout of the 32-wide
//! block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
//!
//! ggml's dot products split every 32-element block into eight 4-element "lanes" and keep
//! one f32 accumulator per lane (see `quant::ggml_exact`). brise keeps exactly those
//! accumulators, but transposed: one AVX-512 register holds lane L of 16 weight rows, so
//! a single `vpdpbusd` produces lane L's integer sums for 16 rows, and the f32 work
//! (convert, scale, FMA) is done for 16 rows at once. The per-row arithmetic is
//! unchanged, so results stay bit-identical to llama.cpp's.
//!
//! A tile holds one block of 16 rows and is exactly as large as those 16 blocks were:
//! - `d[16]` f16 scales, then `m[16]` f16 mins (Q4_1, Q5_1);
//! - `qh[8]` u64 (Q5_0, Q5_1): bit 4r+j of mask L is the high bit of row r's element 4L+j;
//! - codes: for 4-bit formats four 64-byte vectors, vector L holding bytes 4L..4L+4 of
//!   each row's `qs` (low nibbles are lane L, high nibbles lane L+4); for Q8_0 eight
//!   64-byte vectors of `q + 128` (so they are unsigned for `vpdpbusd`).
//!
//! Tiles are stored group by group (16 rows), block after block, so a row group streams
//! from memory in order.

use crate::ggml_type::GgmlType;

pub const GROUP: usize = 16;

/// Whether brise has a lanes16 layout for `ty`.
pub fn packable(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0
    )
}

/// Byte offsets inside a tile: (d, m, qh, qs).
pub(crate) fn offsets(ty: GgmlType) -> (usize, Option<usize>, Option<usize>, usize) {
    match ty {
        GgmlType::Q4_0 => (0, None, None, 32),
        GgmlType::Q4_1 => (0, Some(32), None, 64),
        GgmlType::Q5_0 => (0, None, Some(32), 96),
        GgmlType::Q5_1 => (0, Some(32), Some(64), 128),
        GgmlType::Q8_0 => (0, None, None, 32),
        _ => unreachable!("not packable"),
    }
}

/// A weight matrix in lanes16 layout.
pub struct Packed {
    pub ty: GgmlType,
    /// Real rows (the last group may be padded with zero rows).
    pub n: usize,
    pub k: usize,
    pub data: Vec<u8>,
}

impl Packed {
    pub fn groups(&self) -> usize {
        self.n.div_ceil(GROUP)
    }

    pub fn blocks(&self) -> usize {
        self.k / 32
    }

    pub fn tile_size(&self) -> usize {
        GROUP * self.ty.type_size()
    }

    pub fn tile(&self, g: usize, b: usize) -> &[u8] {
        let ts = self.tile_size();
        let o = (g * self.blocks() + b) * ts;
        &self.data[o..o + ts]
    }

    /// Repacks `n` rows of `k` elements given in GGUF layout.
    pub fn pack(ty: GgmlType, n: usize, k: usize, src: &[u8]) -> Packed {
        assert!(packable(ty) && k.is_multiple_of(32));
        let bs = ty.type_size();
        let rb = k / 32 * bs;
        assert!(src.len() >= n * rb);
        let nb = k / 32;
        let groups = n.div_ceil(GROUP);
        let ts = GROUP * bs;
        let mut data = vec![0u8; groups * nb * ts];
        let (od, om, oh, oq) = offsets(ty);
        for g in 0..groups {
            for b in 0..nb {
                let tile = &mut data[(g * nb + b) * ts..(g * nb + b + 1) * ts];
                for r in 0..GROUP {
                    let row = g * GROUP + r;
                    if row >= n {
                        continue;
                    }
                    let blk = &src[row * rb + b * bs..row * rb + (b + 1) * bs];
                    tile[od + 2 * r..od + 2 * r + 2].copy_from_slice(&blk[0..2]);
                    if let Some(om) = om {
                        tile[om + 2 * r..om + 2 * r + 2].copy_from_slice(&blk[2..4]);
                    }
                    match ty {
                        GgmlType::Q8_0 => {
                            for l in 0..8 {
                                for j in 0..4 {
                                    tile[oq + l * 64 + r * 4 + j] = blk[2 + 4 * l + j] ^ 0x80;
                                }
                            }
                        }
                        _ => {
                            let qs_at = bs - 16;
                            for l in 0..4 {
                                tile[oq + l * 64 + r * 4..oq + l * 64 + r * 4 + 4]
                                    .copy_from_slice(&blk[qs_at + 4 * l..qs_at + 4 * l + 4]);
                            }
                            if let Some(oh) = oh {
                                let h0 = if om.is_some() { 4 } else { 2 };
                                let qh = u32::from_le_bytes([
                                    blk[h0],
                                    blk[h0 + 1],
                                    blk[h0 + 2],
                                    blk[h0 + 3],
                                ]);
                                for l in 0..8 {
                                    let nib = ((qh >> (4 * l)) & 0xf) as u64;
                                    let o = oh + 8 * l;
                                    let mut m =
                                        u64::from_le_bytes(tile[o..o + 8].try_into().unwrap());
                                    m |= nib << (4 * r);
                                    tile[o..o + 8].copy_from_slice(&m.to_le_bytes());
                                }
                            }
                        }
                    }
                }
            }
        }
        Packed { ty, n, k, data }
    }

    /// Row `r` dequantized into `out` (`k` values), with the bits of unpacking it and
    /// [`crate::quant::dequantize_row`]: straight from the tiles on AVX-512 for Q4_0,
    /// Q4_1 and Q8_0 (the training backward reads every weight row each step), through
    /// the GGUF bytes (`tmp`) otherwise.
    pub fn dequantize_row(&self, r: usize, tmp: &mut Vec<u8>, out: &mut [f32]) {
        assert!(r < self.n && out.len() >= self.k);
        #[cfg(target_arch = "x86_64")]
        if matches!(self.ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
            && crate::cpu::has_avx512()
        {
            // SAFETY: AVX-512F is present (checked); row r and its k values exist.
            return unsafe { x86::dequantize_row(self, r, out) };
        }
        tmp.resize(self.ty.row_bytes(self.k).expect("packable"), 0);
        self.unpack_row(r, tmp);
        crate::quant::dequantize_row(self.ty, tmp, &mut out[..self.k]);
    }

    /// Rows `r` and `r + 1` (`r` even, both real) into pair row `j` of the bf16 layout
    /// of [`crate::amx::pack_b_pair`] for `g` rows: the bits of dequantizing both rows
    /// and packing them, in one pass from the tiles (the training backward packs every
    /// weight row each step). Returns false, writing nothing, where there is no such
    /// pass (other formats, or no AVX-512): the caller then dequantizes and packs.
    pub fn pack_bf16_pair(&self, r: usize, bp: &mut [u16], g: usize, j: usize) -> bool {
        assert!(r.is_multiple_of(2) && r + 1 < self.n && j.is_multiple_of(2) && j + 1 < g);
        assert!(bp.len() >= crate::amx::b_len(g, self.k));
        #[cfg(target_arch = "x86_64")]
        if matches!(self.ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
            && crate::cpu::has_avx512()
        {
            let kbs = crate::amx::b_tiles(g);
            // SAFETY: AVX-512F is present (checked); rows r, r + 1 exist and B holds the
            // layout for g rows and k columns (asserted).
            unsafe { x86::pack_bf16_pair(self, r, bp, kbs, j / 32, (j % 32) / 2) };
            return true;
        }
        false
    }

    /// Row `r` in GGUF layout (for embedding lookups and tests).
    pub fn unpack_row(&self, r: usize, out: &mut [u8]) {
        let bs = self.ty.type_size();
        let (g, rr) = (r / GROUP, r % GROUP);
        let (od, om, oh, oq) = offsets(self.ty);
        for b in 0..self.blocks() {
            let t = self.tile(g, b);
            let blk = &mut out[b * bs..(b + 1) * bs];
            blk[0..2].copy_from_slice(&t[od + 2 * rr..od + 2 * rr + 2]);
            if let Some(om) = om {
                blk[2..4].copy_from_slice(&t[om + 2 * rr..om + 2 * rr + 2]);
            }
            match self.ty {
                GgmlType::Q8_0 => {
                    for l in 0..8 {
                        for j in 0..4 {
                            blk[2 + 4 * l + j] = t[oq + l * 64 + rr * 4 + j] ^ 0x80;
                        }
                    }
                }
                _ => {
                    let qs_at = bs - 16;
                    for l in 0..4 {
                        blk[qs_at + 4 * l..qs_at + 4 * l + 4]
                            .copy_from_slice(&t[oq + l * 64 + rr * 4..oq + l * 64 + rr * 4 + 4]);
                    }
                    if let Some(oh) = oh {
                        let h0 = if om.is_some() { 4 } else { 2 };
                        let mut qh = 0u32;
                        for l in 0..8 {
                            let m = u64::from_le_bytes(
                                t[oh + 8 * l..oh + 8 * l + 8].try_into().unwrap(),
                            );
                            qh |= (((m >> (4 * rr)) & 0xf) as u32) << (4 * l);
                        }
                        blk[h0..h0 + 4].copy_from_slice(&qh.to_le_bytes());
                    }
                }
            }
        }
    }
}

/// Per-block values of one activation row that every weight row shares: the scale (and
/// Q8_1's `s`) as f32, and each lane's correction for formats whose codes are stored
/// with an offset (`−offset · Σ lane activations`).
#[derive(Default, Clone)]
pub struct ActPrep {
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub init: Vec<[i32; 8]>,
}

/// The offset a format's stored codes carry in the lanes16 layout.
pub(crate) fn code_offset(ty: GgmlType) -> i32 {
    match ty {
        GgmlType::Q4_0 => 8,
        GgmlType::Q5_0 => 16,
        GgmlType::Q8_0 => 128,
        _ => 0,
    }
}

impl ActPrep {
    /// From one activation row in brise's Q8_0/Q8_1 layout (36-byte blocks).
    pub fn build(&mut self, wty: GgmlType, act: &[u8], nb: usize) {
        let off = code_offset(wty);
        self.d.clear();
        self.s.clear();
        self.init.clear();
        for b in 0..nb {
            let y = &act[b * 36..(b + 1) * 36];
            self.d.push(half::f16::from_le_bytes([y[0], y[1]]).to_f32());
            self.s.push(if wty.vec_dot_type() == GgmlType::Q8_1 {
                half::f16::from_le_bytes([y[2], y[3]]).to_f32()
            } else {
                0.0
            });
            let mut init = [0i32; 8];
            if off != 0 {
                for (l, v) in init.iter_mut().enumerate() {
                    let s: i32 = (0..4).map(|j| y[4 + 4 * l + j] as i8 as i32).sum();
                    *v = -off * s;
                }
            }
            self.init.push(init);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_round_trip() {
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
        ] {
            let (n, k) = (37, 96);
            let rb = ty.row_bytes(k).unwrap();
            let src: Vec<u8> = (0..n * rb).map(|i| (i * 131 % 251) as u8).collect();
            let p = Packed::pack(ty, n, k, &src);
            assert_eq!(p.data.len(), 3 * 3 * p.tile_size());
            let mut row = vec![0u8; rb];
            let (mut got, mut want, mut tmp) = (vec![0f32; k], vec![0f32; k], Vec::new());
            for r in 0..n {
                p.unpack_row(r, &mut row);
                assert_eq!(row, &src[r * rb..(r + 1) * rb], "{ty} row {r}");
                p.dequantize_row(r, &mut tmp, &mut got);
                crate::quant::dequantize_row(ty, &row, &mut want);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{ty} row {r} dequantized");
            }
        }
    }

    #[test]
    fn bf16_pairs_equal_dequantize_then_pack() {
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
        ] {
            // Rows 16..36 of a 37-row matrix as a slab of g = 20 (B padded to 32 rows).
            let (n, k, r0, g) = (37, 96, 16, 20);
            let rb = ty.row_bytes(k).unwrap();
            let src: Vec<u8> = (0..n * rb).map(|i| (i * 131 % 251) as u8).collect();
            let p = Packed::pack(ty, n, k, &src);
            let len = crate::amx::b_len(g, k);
            let (mut got, mut want) = (vec![7u16; len], vec![7u16; len]);
            let (mut w0, mut w1, mut tmp) = (vec![0f32; k], vec![0f32; k], Vec::new());
            let mut fused = false;
            for j in (0..g).step_by(2) {
                p.dequantize_row(r0 + j, &mut tmp, &mut w0);
                p.dequantize_row(r0 + j + 1, &mut tmp, &mut w1);
                crate::amx::pack_b_pair(&mut want, g, k, j, &w0, &w1);
                if p.pack_bf16_pair(r0 + j, &mut got, g, j) {
                    fused = true;
                } else {
                    crate::amx::pack_b_pair(&mut got, g, k, j, &w0, &w1);
                }
            }
            assert_eq!(got, want, "{ty}");
            #[cfg(target_arch = "x86_64")]
            let simd = crate::cpu::has_avx512();
            #[cfg(not(target_arch = "x86_64"))]
            let simd = false;
            let expect = simd && matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0);
            assert_eq!(fused, expect, "{ty}: which path ran");
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! AVX-512 VNNI kernels over lanes16 tiles. SAFETY (all functions): callers check
    //! the CPU supports AVX-512 F/BW/VL/DQ/VNNI, F16C and FMA, that `tiles` holds `nb`
    //! tiles of the group, that each activation pointer covers `nb` 36-byte blocks and
    //! its `ActPrep` `nb` entries, and that each output pointer covers 16 floats.
    use super::{ActPrep, GROUP, offsets};
    use crate::ggml_type::GgmlType;

    /// [`super::Packed::dequantize_row`] for Q4_0, Q4_1 and Q8_0: each block's codes
    /// gathered from the tile's 4-byte runs, converted 16 at a time, and scaled as the
    /// scalar dequantization does (`d · q + m` as a product then a sum; `(q − 8) · d`
    /// and `q · d` as `d · q`).
    ///
    /// # Safety
    ///
    /// The CPU has AVX-512F/BW/VL/DQ, F16C and FMA; `r < p.n` and `out` holds at least
    /// `p.k` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
    pub unsafe fn dequantize_row(p: &super::Packed, r: usize, out: &mut [f32]) {
        let (g, rr) = (r / GROUP, r % GROUP);
        let (od, om, _, oq) = offsets(p.ty);
        let ts = p.tile_size();
        let nb = p.blocks();
        let group = &p.data[g * nb * ts..(g + 1) * nb * ts];
        for b in 0..nb {
            // SAFETY: tile b of the group (ts bytes) holds the scales, mins and codes
            // read below at their offsets; block b's 32 values are inside out (k = 32 ·
            // blocks, asserted by the caller).
            unsafe {
                let t = group.as_ptr().add(b * ts);
                let f16 = |o: usize| {
                    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                        (t.add(o) as *const u16).read_unaligned() as i32,
                    )))
                };
                let run = |l: usize| (t.add(oq + l * 64 + rr * 4) as *const i32).read_unaligned();
                let d = _mm512_set1_ps(f16(od + 2 * rr));
                let y = out.as_mut_ptr().add(32 * b);
                match p.ty {
                    GgmlType::Q8_0 => {
                        let v = _mm256_xor_si256(
                            _mm256_setr_epi32(
                                run(0),
                                run(1),
                                run(2),
                                run(3),
                                run(4),
                                run(5),
                                run(6),
                                run(7),
                            ),
                            _mm256_set1_epi8(0x80u8 as i8),
                        );
                        for h in 0..2 {
                            let q = _mm512_cvtepi8_epi32(if h == 0 {
                                _mm256_castsi256_si128(v)
                            } else {
                                _mm256_extracti128_si256::<1>(v)
                            });
                            let x = _mm512_mul_ps(_mm512_cvtepi32_ps(q), d);
                            _mm512_storeu_ps(y.add(16 * h), x);
                        }
                    }
                    _ => {
                        let v = _mm_setr_epi32(run(0), run(1), run(2), run(3));
                        let lo = _mm_and_si128(v, _mm_set1_epi8(0x0f));
                        let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), _mm_set1_epi8(0x0f));
                        let m = om.map(|om| _mm512_set1_ps(f16(om + 2 * rr)));
                        for (h, q) in [lo, hi].into_iter().enumerate() {
                            let mut q = _mm512_cvtepu8_epi32(q);
                            if m.is_none() {
                                q = _mm512_sub_epi32(q, _mm512_set1_epi32(8));
                            }
                            let x = _mm512_mul_ps(d, _mm512_cvtepi32_ps(q));
                            let x = match m {
                                Some(m) => _mm512_add_ps(x, m),
                                None => x,
                            };
                            _mm512_storeu_ps(y.add(16 * h), x);
                        }
                    }
                }
            }
        }
    }
    use core::arch::x86_64::*;

    /// [`super::Packed::pack_bf16_pair`]: per block, both rows' codes come from the
    /// same 8-byte runs of the tile's lane vectors; each row is scaled as
    /// [`dequantize_row`] scales it, rounded as `amx::bf16` rounds, and the two rows'
    /// 16-column halves interleaved as `amx::pack_b_pair` does.
    ///
    /// # Safety
    ///
    /// The CPU has AVX-512F/BW/VL/DQ, F16C and FMA; `r` even with `r + 1 < n`; `bp` holds
    /// the layout of `kbs` pair tiles by `k / 16` column blocks, `kb < kbs`, `pr < 16`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
    pub unsafe fn pack_bf16_pair(
        p: &super::Packed,
        r: usize,
        bp: &mut [u16],
        kbs: usize,
        kb: usize,
        pr: usize,
    ) {
        let (g, rr) = (r / GROUP, r % GROUP);
        let (od, om, _, oq) = offsets(p.ty);
        let ts = p.tile_size();
        let nb = p.blocks();
        let group = &p.data[g * nb * ts..(g + 1) * nb * ts];
        // SAFETY (all below): AVX-512F (the caller's promise); every tile read is inside
        // `group` (offsets of its scales, mins and lane vectors; rows rr, rr + 1 < 16),
        // every store inside `bp` (column block < k / 16, pair tile kb, pair row pr).
        unsafe {
            let round = |x: __m512| {
                let x = _mm512_castps_si512(x);
                let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
                _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), odd)
            };
            let pair = |a: __m512, b: __m512| {
                _mm512_or_si512(
                    _mm512_srli_epi32::<16>(round(a)),
                    _mm512_and_si512(round(b), _mm512_set1_epi32(0xffff_0000u32 as i32)),
                )
            };
            let bpp = bp.as_mut_ptr();
            let store = |nbc: usize, v: __m512i| {
                let o = (nbc * kbs + kb) * 512 + pr * 32;
                _mm512_storeu_si512(bpp.add(o) as *mut __m512i, v);
            };
            for b in 0..nb {
                let t = group.as_ptr().add(b * ts);
                // Both rows' f16 values at `o`, each broadcast.
                let two = |o: usize| {
                    let v =
                        _mm_cvtph_ps(_mm_cvtsi32_si128((t.add(o) as *const i32).read_unaligned()));
                    (
                        _mm512_broadcastss_ps(v),
                        _mm512_broadcastss_ps(_mm_movehdup_ps(v)),
                    )
                };
                let (d0, d1) = two(od + 2 * rr);
                // Lane vectors l and l + 1: [row rr's run, row rr+1's run] of each.
                let runs = |l: usize| {
                    let a = _mm_loadl_epi64(t.add(oq + l * 64 + rr * 4) as *const __m128i);
                    let b = _mm_loadl_epi64(t.add(oq + (l + 1) * 64 + rr * 4) as *const __m128i);
                    _mm_unpacklo_epi64(a, b)
                };
                // Four runs from two pairs of lane vectors, split by row.
                let split = |v01: __m128i, v23: __m128i| {
                    let (x, y) = (_mm_castsi128_ps(v01), _mm_castsi128_ps(v23));
                    (
                        _mm_castps_si128(_mm_shuffle_ps::<0b10_00_10_00>(x, y)),
                        _mm_castps_si128(_mm_shuffle_ps::<0b11_01_11_01>(x, y)),
                    )
                };
                let blk = 2 * b;
                match p.ty {
                    GgmlType::Q8_0 => {
                        let flip = _mm_set1_epi8(0x80u8 as i8);
                        let (a_lo, b_lo) = split(runs(0), runs(2));
                        let (a_hi, b_hi) = split(runs(4), runs(6));
                        let f = |q: __m128i, d: __m512| {
                            let q = _mm512_cvtepi8_epi32(_mm_xor_si128(q, flip));
                            _mm512_mul_ps(_mm512_cvtepi32_ps(q), d)
                        };
                        store(blk, pair(f(a_lo, d0), f(b_lo, d1)));
                        store(blk + 1, pair(f(a_hi, d0), f(b_hi, d1)));
                    }
                    _ => {
                        let (qa, qb) = split(runs(0), runs(2));
                        let nib = _mm_set1_epi8(0x0f);
                        let m = om.map(|om| two(om + 2 * rr));
                        let f = |q: __m128i, d: __m512, m: Option<__m512>| {
                            let mut q = _mm512_cvtepu8_epi32(q);
                            if m.is_none() {
                                q = _mm512_sub_epi32(q, _mm512_set1_epi32(8));
                            }
                            let x = _mm512_mul_ps(d, _mm512_cvtepi32_ps(q));
                            match m {
                                Some(m) => _mm512_add_ps(x, m),
                                None => x,
                            }
                        };
                        let (ma, mb) = (m.map(|m| m.0), m.map(|m| m.1));
                        let lo = |q: __m128i| _mm_and_si128(q, nib);
                        let hi = |q: __m128i| _mm_and_si128(_mm_srli_epi16::<4>(q), nib);
                        store(blk, pair(f(lo(qa), d0, ma), f(lo(qb), d1, mb)));
                        store(blk + 1, pair(f(hi(qa), d0, ma), f(hi(qb), d1, mb)));
                    }
                }
            }
        }
    }

    /// Prefetch distance in bytes for the streaming (one activation row) kernel.
    const PREFETCH: usize = 4096;

    /// # Safety
    ///
    /// The CPU has AVX-512F; `p` is readable for 64 bytes.
    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m512i {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe { _mm512_loadu_si512(p as *const __m512i) }
    }

    /// # Safety
    ///
    /// `p` is readable for 4 bytes.
    #[inline(always)]
    unsafe fn dword(p: *const u8) -> i32 {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe { (p as *const i32).read_unaligned() }
    }

    /// The lane vectors (codes as unsigned bytes, 16 rows × 4 bytes) of one tile.
    ///
    /// # Safety
    ///
    /// The module's CPU features; `t` is a whole lanes16 tile of `ty`.
    #[inline(always)]
    unsafe fn decode(ty: GgmlType, t: *const u8) -> [__m512i; 8] {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let (_, _, oh, oq) = offsets(ty);
            let mut w = [_mm512_setzero_si512(); 8];
            if ty == GgmlType::Q8_0 {
                for (l, v) in w.iter_mut().enumerate() {
                    *v = load(t.add(oq + 64 * l));
                }
                return w;
            }
            let m4 = _mm512_set1_epi8(0x0f);
            for l in 0..4 {
                let v = load(t.add(oq + 64 * l));
                w[l] = _mm512_and_si512(v, m4);
                w[l + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            }
            if let Some(oh) = oh {
                let b4 = _mm512_set1_epi8(0x10);
                for (l, v) in w.iter_mut().enumerate() {
                    let m = (t.add(oh + 8 * l) as *const u64).read_unaligned();
                    *v = _mm512_or_si512(*v, _mm512_maskz_mov_epi8(m, b4));
                }
            }
            w
        }
    }

    /// ggml's `hsum_float_8` over the eight lane registers, for 16 rows at once.
    ///
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

    /// 16 rows × NA activation rows over all `nb` blocks of a row group.
    /// `block_sum` selects the repacked-Q4_0 order (one FMA per block of the block's
    /// integer sum) instead of ggml's per-lane vec_dot order. `PF`: prefetch the tiles
    /// ahead, for the first pass over a group (later passes find them in cache).
    ///
    /// # Safety
    ///
    /// The module's contract: its CPU features; `tiles` holds `nb` tiles of `ts` bytes; each
    /// `act[i]` covers `nb` 36-byte blocks and `prep[i]` `nb` entries; each `out[i]` is
    /// writable for 16 floats.
    #[inline(always)]
    unsafe fn group<const NA: usize, const PF: bool>(
        ty: GgmlType,
        block_sum: bool,
        tiles: *const u8,
        ts: usize,
        nb: usize,
        act: [*const u8; NA],
        prep: [&ActPrep; NA],
        out: [*mut f32; NA],
    ) {
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            let (od, om, _, _) = offsets(ty);
            let offset = super::code_offset(ty) != 0;
            let mut acc = [[_mm512_setzero_ps(); 8]; NA];
            let mut summs = [_mm512_setzero_ps(); NA];
            for b in 0..nb {
                let t = tiles.add(b * ts);
                // Weights stream from memory (L3 at best) once: request lines well ahead
                // so several misses are in flight (one demand stream alone is
                // latency-bound, for a batch of rows as for one).
                if PF {
                    let pf = t.add(PREFETCH);
                    let mut o = 0;
                    while o < ts {
                        _mm_prefetch::<_MM_HINT_T0>(pf.add(o) as *const i8);
                        o += 64;
                    }
                }
                let w = decode(ty, t);
                let dv = _mm512_cvtph_ps(_mm256_loadu_si256(t.add(od) as *const __m256i));
                let mv =
                    om.map(|om| _mm512_cvtph_ps(_mm256_loadu_si256(t.add(om) as *const __m256i)));
                for c in 0..NA {
                    let y = act[c].add(b * 36 + 4);
                    let dd = _mm512_mul_ps(dv, _mm512_set1_ps(*prep[c].d.get_unchecked(b)));
                    let init = prep[c].init.get_unchecked(b);
                    let mut s = [_mm512_setzero_si512(); 8];
                    for l in 0..8 {
                        let z = if offset {
                            _mm512_set1_epi32(init[l])
                        } else {
                            _mm512_setzero_si512()
                        };
                        s[l] = _mm512_dpbusd_epi32(z, w[l], _mm512_set1_epi32(dword(y.add(4 * l))));
                    }
                    if block_sum {
                        let mut tot = s[0];
                        for v in &s[1..] {
                            tot = _mm512_add_epi32(tot, *v);
                        }
                        acc[c][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tot), dd, acc[c][0]);
                    } else {
                        for l in 0..8 {
                            acc[c][l] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(s[l]), acc[c][l]);
                        }
                    }
                    if let Some(mv) = mv {
                        summs[c] = _mm512_add_ps(
                            summs[c],
                            _mm512_mul_ps(mv, _mm512_set1_ps(*prep[c].s.get_unchecked(b))),
                        );
                    }
                }
            }
            for c in 0..NA {
                let r = if block_sum { acc[c][0] } else { hsum8(&acc[c]) };
                let r = if om.is_some() {
                    _mm512_add_ps(r, summs[c])
                } else {
                    r
                };
                _mm512_storeu_ps(out[c], r);
            }
        }
    }

    /// Activation rows per pass of [`matmul_groups`] (sharing each tile's decode) for
    /// `na` rows of `ty`: four, whose accumulators spill to L1 through ports Intel's cores
    /// leave idle; two on AMD's Zen 4 (which runs a 512-bit operation as two halves)
    /// for Q8_0, whose eight weight registers make the spills heavier, and for long
    /// products. `mmbench` on Zen 4, two against four: Q8_0 +27% to +60% (8 to 256
    /// rows), Q4_1 and Q5_0 +10% to +20% at 128 and 256 rows, Q4_1 −5% to −10% at 8.
    fn rows_per_pass(ty: GgmlType, na: usize) -> usize {
        if crate::cpu::zen4() && (ty == GgmlType::Q8_0 || na >= 64) {
            2
        } else {
            4
        }
    }

    /// Computes `out[c·ldo + (g − g0)·16 + r]` for the 16 rows of each group `g` in
    /// `groups`, for every activation row `c` in `0..na`.
    ///
    /// # Safety
    ///
    /// The CPU has AVX2, FMA, F16C and AVX-512F/BW/VL/DQ/VNNI; `data` holds `nb` tiles for
    /// every group in `groups`; `acts` holds `preps.len()` activation rows of `act_stride`
    /// bytes (`nb` 36-byte blocks each) and `preps` their `ActPrep`s; `out` is writable at
    /// `c·ldo + (g − g0)·16 + r` for every row `c`, group `g` in `groups` and `r < 16`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    pub unsafe fn matmul_groups(
        ty: GgmlType,
        block_sum: bool,
        data: *const u8,
        nb: usize,
        groups: std::ops::Range<usize>,
        g0: usize,
        acts: *const u8,
        act_stride: usize,
        preps: &[ActPrep],
        out: *mut f32,
        ldo: usize,
        tmp: &mut [f32; 4 * GROUP],
    ) {
        macro_rules! run {
            ($t:expr) => {{
                let t = $t;
                let ts = GROUP * t.type_size();
                let na = preps.len();
                let w = rows_per_pass(t, na);
                // Activations in chunks that stay in cache while the groups pass over them.
                let chunk = 64;
                let mut c0 = 0;
                while c0 < na {
                    let c1 = (c0 + chunk).min(na);
                    for g in groups.clone() {
                        let tiles = data.add(g * nb * ts);
                        let mut c = c0;
                        // `NA` activation rows from `c` on, through one decode of each tile
                        // (prefetching it when `PF`), into `out`.
                        macro_rules! pass {
                            ($na:literal, $pf:expr) => {{
                                let a = std::array::from_fn::<_, $na, _>(|j| {
                                    acts.add((c + j) * act_stride)
                                });
                                let p = std::array::from_fn::<_, $na, _>(|j| &preps[c + j]);
                                let o = std::array::from_fn::<_, $na, _>(|j| {
                                    tmp.as_mut_ptr().add(j * GROUP)
                                });
                                if $pf {
                                    group::<$na, true>(t, block_sum, tiles, ts, nb, a, p, o);
                                } else {
                                    group::<$na, false>(t, block_sum, tiles, ts, nb, a, p, o);
                                }
                                for j in 0..$na {
                                    std::ptr::copy_nonoverlapping(
                                        tmp.as_ptr().add(j * GROUP),
                                        out.add((c + j) * ldo + (g - g0) * GROUP),
                                        GROUP,
                                    );
                                }
                            }};
                        }
                        // Four activation rows per pass share each tile's decode. Their
                        // 32 accumulators do not all fit in registers, but on Intel the
                        // spills go to L1 through ports the kernel leaves idle: 10%
                        // faster than two rows at 8 and 64 rows (`mmbench`), and eight
                        // rows were slower again. Zen 4 differs (`rows_per_pass`).
                        while w == 4 && c + 4 <= c1 {
                            pass!(4, c == c0);
                            c += 4;
                        }
                        while c + 2 <= c1 {
                            pass!(2, c == c0);
                            c += 2;
                        }
                        if c < c1 {
                            pass!(1, true);
                        }
                    }
                    c0 = c1;
                }
            }};
        }
        // SAFETY: within this function's `# Safety` contract (its CPU features, and the
        // extents of the memory it is given).
        unsafe {
            match ty {
                GgmlType::Q4_0 => run!(GgmlType::Q4_0),
                GgmlType::Q4_1 => run!(GgmlType::Q4_1),
                GgmlType::Q5_0 => run!(GgmlType::Q5_0),
                GgmlType::Q5_1 => run!(GgmlType::Q5_1),
                GgmlType::Q8_0 => run!(GgmlType::Q8_0),
                _ => unreachable!(),
            }
        }
    }
}
