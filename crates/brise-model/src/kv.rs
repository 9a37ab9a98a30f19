//! The KV cache of one sequence: keys and values of every layer, stored as f16 like
//! llama.cpp's default cache. Keys are laid out [kv_head][position][head_dim] (a key is
//! contiguous for its dot with the query); values are transposed, [kv_head][head_dim]
//! [position], as llama.cpp stores them without flash attention, so the weighted sum
//! runs over contiguous positions in the same order llama.cpp sums them.

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
        let per_layer = cfg.n_head_kv * n_ctx * cfg.head_dim * 2;
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

    fn off(&self, head: usize, pos: usize) -> usize {
        (head * self.n_ctx + pos) * self.head_dim * 2
    }

    pub(crate) fn k_row_mut(&mut self, layer: usize, head: usize, pos: usize) -> &mut [u8] {
        let o = self.off(head, pos);
        &mut self.k[layer][o..o + self.head_dim * 2]
    }

    /// Stores the value vector of `head` at `pos` (scattered into the transposed layout).
    pub(crate) fn set_v(&mut self, layer: usize, head: usize, pos: usize, v: &[f32]) {
        let base = head * self.head_dim * self.n_ctx;
        let buf = &mut self.v[layer];
        for (d, x) in v.iter().enumerate() {
            let o = (base + d * self.n_ctx + pos) * 2;
            buf[o..o + 2].copy_from_slice(&half::f16::from_f32(*x).to_le_bytes());
        }
    }

    /// Keys of `head` for positions `range`, contiguous.
    pub(crate) fn k_rows(&self, layer: usize, head: usize, range: std::ops::Range<usize>) -> &[u8] {
        &self.k[layer][self.off(head, range.start)..self.off(head, range.end)]
    }

    /// Values of dimension `dim` of `head` for every position (n_ctx of them).
    pub(crate) fn v_dim(&self, layer: usize, head: usize, dim: usize) -> &[u8] {
        let o = (head * self.head_dim + dim) * self.n_ctx * 2;
        &self.v[layer][o..o + self.n_ctx * 2]
    }

    pub fn n_head_kv(&self) -> usize {
        self.n_head_kv
    }
}
