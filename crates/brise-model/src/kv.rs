//! The KV cache of one sequence: keys and values of every layer, stored as f16 like
//! llama.cpp's default cache. Keys are kept in blocks of 16 positions, transposed
//! ([kv_head][block][head_dim][16]), so scores of 16 keys come from one SIMD pass; values
//! are rows by position ([kv_head][position][head_dim]), so 16 output dimensions come
//! from one pass. (The layout only changes which elements are computed together, never
//! the arithmetic of any of them.)

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

pub struct KvCache {
    n_ctx: usize,
    n_head_kv: usize,
    head_dim: usize,
    /// Per layer, f16 bytes.
    k: Vec<Vec<u8>>,
    v: Vec<Vec<u8>>,
    len: usize,
}

impl KvCache {
    /// A cache for `n_ctx` positions. Memory is reserved zeroed, so pages are only
    /// touched as positions fill.
    pub fn new(cfg: &ModelConfig, n_ctx: usize) -> KvCache {
        let blocks = n_ctx.div_ceil(16);
        let per_layer = cfg.n_head_kv * blocks * 16 * cfg.head_dim * 2;
        KvCache {
            n_ctx,
            n_head_kv: cfg.n_head_kv,
            head_dim: cfg.head_dim,
            k: (0..cfg.n_layer).map(|_| vec![0u8; per_layer]).collect(),
            v: (0..cfg.n_layer).map(|_| vec![0u8; per_layer]).collect(),
            len: 0,
        }
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Positions filled so far (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets positions from `len` on (rewind for a shared prefix, or clear with 0).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Checks that `n` more tokens fit.
    pub fn check_room(&self, n: usize) -> Result<()> {
        if self.len + n > self.n_ctx {
            return Err(ModelError::ContextOverflow {
                n_prompt: self.len + n,
                n_ctx: self.n_ctx,
            });
        }
        Ok(())
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.len <= self.n_ctx);
    }

    fn head_bytes(&self) -> usize {
        self.n_ctx.div_ceil(16) * 16 * self.head_dim * 2
    }

    pub(crate) fn set_k(&mut self, layer: usize, head: usize, pos: usize, k: &[f32]) {
        let base = head * self.head_bytes() + (pos / 16) * 16 * self.head_dim * 2 + (pos % 16) * 2;
        let buf = &mut self.k[layer];
        let mut h = [0u8; 2 * 256];
        let h = if k.len() <= 256 {
            &mut h[..2 * k.len()]
        } else {
            &mut vec![0u8; 2 * k.len()][..]
        };
        brise_kernels::ops::f32_to_f16_bytes(k, h);
        for (d, c) in h.chunks_exact(2).enumerate() {
            let o = base + d * 32;
            buf[o..o + 2].copy_from_slice(c);
        }
    }

    pub(crate) fn set_v(&mut self, layer: usize, head: usize, pos: usize, v: &[f32]) {
        let o = head * self.head_bytes() + pos * self.head_dim * 2;
        brise_kernels::ops::f32_to_f16_bytes(v, &mut self.v[layer][o..o + self.head_dim * 2]);
    }

    /// Key block `b` (positions 16b..16b+16) of `head`, transposed: `head_dim` rows of 16.
    pub(crate) fn k_block(&self, layer: usize, head: usize, b: usize) -> &[u8] {
        let o = head * self.head_bytes() + b * 16 * self.head_dim * 2;
        &self.k[layer][o..o + 16 * self.head_dim * 2]
    }

    /// The key at `pos` as a contiguous f16 row (for head sizes the block kernels do not
    /// take).
    pub(crate) fn k_row(&self, layer: usize, head: usize, pos: usize, out: &mut [u8]) {
        let blk = self.k_block(layer, head, pos / 16);
        for d in 0..self.head_dim {
            let o = (d * 16 + pos % 16) * 2;
            out[2 * d..2 * d + 2].copy_from_slice(&blk[o..o + 2]);
        }
    }

    /// Values of `head` as rows by position (`n_ctx` rows of `head_dim`).
    pub(crate) fn v_rows(&self, layer: usize, head: usize) -> &[u8] {
        let o = head * self.head_bytes();
        &self.v[layer][o..o + self.n_ctx * self.head_dim * 2]
    }

    pub fn n_head_kv(&self) -> usize {
        self.n_head_kv
    }
}
