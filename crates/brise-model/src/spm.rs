//! SentencePiece: reading `tokenizer.model` files and the BPE-style encoder llama.cpp
//! uses for them (highest-scoring adjacent pair merged first, byte fallback for text no
//! piece covers).

use crate::error::{ModelError, Result};
use std::collections::{BinaryHeap, HashMap};

/// Token kinds, numbered as both SentencePiece and GGUF number them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    pub fn from_id(id: i64) -> TokenType {
        match id {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }
}

/// What brise needs from a SentencePiece `ModelProto`.
#[derive(Debug, Default)]
pub struct SpmModel {
    pub pieces: Vec<(String, f32, TokenType)>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub byte_fallback: bool,
    /// 1 unigram, 2 BPE.
    pub model_type: i64,
    pub unk_id: Option<u32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
}

struct Pb<'a> {
    b: &'a [u8],
    p: usize,
}

impl<'a> Pb<'a> {
    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.p).ok_or("truncated varint")?;
            self.p += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn bytes(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .p
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or("truncated field")?;
        let s = &self.b[self.p..end];
        self.p = end;
        Ok(s)
    }

    /// Next (field number, wire value). Length-delimited fields return their bytes.
    fn field(&mut self) -> std::result::Result<Option<(u64, Wire<'a>)>, String> {
        if self.p >= self.b.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (num, wt) = (key >> 3, key & 7);
        let w = match wt {
            0 => Wire::Varint(self.varint()?),
            1 => Wire::Fixed(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap())),
            2 => {
                let n = self.varint()? as usize;
                Wire::Bytes(self.bytes(n)?)
            }
            5 => Wire::Fixed(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap()) as u64),
            other => return Err(format!("unsupported protobuf wire type {other}")),
        };
        Ok(Some((num, w)))
    }
}

enum Wire<'a> {
    Varint(u64),
    Fixed(u64),
    Bytes(&'a [u8]),
}

impl SpmModel {
    /// Parses a serialized SentencePiece `ModelProto`.
    pub fn parse(bytes: &[u8]) -> Result<SpmModel> {
        Self::parse_inner(bytes).map_err(|e| ModelError::Tokenizer(format!("tokenizer.model: {e}")))
    }

    fn parse_inner(bytes: &[u8]) -> std::result::Result<SpmModel, String> {
        let mut m = SpmModel {
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            model_type: 1,
            ..Default::default()
        };
        let (mut unk, mut bos, mut eos) = (0i64, 1i64, 2i64);
        let mut pb = Pb { b: bytes, p: 0 };
        while let Some((num, w)) = pb.field()? {
            match (num, w) {
                (1, Wire::Bytes(piece)) => {
                    let mut p = Pb { b: piece, p: 0 };
                    let (mut text, mut score, mut ty) = (String::new(), 0f32, 1i64);
                    while let Some((n, w)) = p.field()? {
                        match (n, w) {
                            (1, Wire::Bytes(s)) => {
                                text = String::from_utf8(s.to_vec())
                                    .map_err(|_| "piece is not UTF-8")?
                            }
                            (2, Wire::Fixed(f)) => score = f32::from_bits(f as u32),
                            (3, Wire::Varint(t)) => ty = t as i64,
                            _ => {}
                        }
                    }
                    m.pieces.push((text, score, TokenType::from_id(ty)));
                }
                (2, Wire::Bytes(spec)) => {
                    let mut p = Pb { b: spec, p: 0 };
                    while let Some((n, w)) = p.field()? {
                        match (n, w) {
                            (3, Wire::Varint(v)) => m.model_type = v as i64,
                            (35, Wire::Varint(v)) => m.byte_fallback = v != 0,
                            (40, Wire::Varint(v)) => unk = v as i32 as i64,
                            (41, Wire::Varint(v)) => bos = v as i32 as i64,
                            (42, Wire::Varint(v)) => eos = v as i32 as i64,
                            _ => {}
                        }
                    }
                }
                (3, Wire::Bytes(spec)) => {
                    let mut p = Pb { b: spec, p: 0 };
                    while let Some((n, w)) = p.field()? {
                        match (n, w) {
                            (3, Wire::Varint(v)) => m.add_dummy_prefix = v != 0,
                            (4, Wire::Varint(v)) => m.remove_extra_whitespaces = v != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if m.pieces.is_empty() {
            return Err("no pieces (is this a SentencePiece model?)".into());
        }
        let id = |v: i64| (v >= 0 && (v as usize) < m.pieces.len()).then_some(v as u32);
        m.unk_id = id(unk);
        m.bos_id = id(bos);
        m.eos_id = id(eos);
        Ok(m)
    }
}

/// The encoder: llama.cpp's `llm_tokenizer_spm`, restricted so that merges never
/// produce control or unknown tokens (SentencePiece never does).
pub struct SpmEncoder {
    map: HashMap<String, u32>,
    scores: Vec<f32>,
    mergeable: Vec<bool>,
    byte_tokens: [Option<u32>; 256],
    unk: Option<u32>,
}

#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.score == o.score && self.left == o.left
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    // Max-heap: higher score first, then the leftmost pair.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl SpmEncoder {
    pub fn new(
        tokens: &[String],
        scores: &[f32],
        types: &[TokenType],
        unk: Option<u32>,
    ) -> SpmEncoder {
        let mut map = HashMap::with_capacity(tokens.len());
        let mut byte_tokens = [None; 256];
        for (i, t) in tokens.iter().enumerate() {
            if types[i] == TokenType::Byte {
                if let Some(b) = parse_byte_token(t) {
                    byte_tokens[b as usize] = Some(i as u32);
                }
                continue;
            }
            map.entry(t.clone()).or_insert(i as u32);
        }
        let mergeable = types
            .iter()
            .map(|t| {
                matches!(
                    t,
                    TokenType::Normal | TokenType::UserDefined | TokenType::Unused
                )
            })
            .collect();
        SpmEncoder {
            map,
            scores: scores.to_vec(),
            mergeable,
            byte_tokens,
            unk,
        }
    }

    fn lookup(&self, s: &str) -> Option<u32> {
        self.map
            .get(s)
            .copied()
            .filter(|&id| self.mergeable[id as usize])
    }

    /// Encodes text whose spaces are already escaped as U+2581.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut syms: Vec<Sym> = Vec::new();
        for (start, ch) in text.char_indices() {
            let i = syms.len();
            syms.push(Sym {
                start,
                len: ch.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                syms[i - 1].next = Some(i);
            }
        }
        let mut heap = BinaryHeap::new();
        let try_add = |heap: &mut BinaryHeap<Bigram>, syms: &[Sym], l: usize, r: usize| {
            let (a, b) = (syms[l], syms[r]);
            let s = &text[a.start..b.start + b.len];
            if let Some(id) = self.lookup(s) {
                heap.push(Bigram {
                    left: l,
                    right: r,
                    score: self.scores[id as usize],
                    size: s.len(),
                });
            }
        };
        for i in 1..syms.len() {
            try_add(&mut heap, &syms, i - 1, i);
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (bg.left, bg.right);
            // Skip pairs made stale by an earlier merge.
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != bg.size {
                continue;
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if let Some(n) = syms[r].next {
                syms[n].prev = Some(l);
            }
            if let Some(p) = syms[l].prev {
                try_add(&mut heap, &syms, p, l);
            }
            if let Some(n) = syms[l].next {
                try_add(&mut heap, &syms, l, n);
            }
        }
        let mut i = Some(0);
        while let Some(k) = i {
            let s = syms[k];
            let piece = &text[s.start..s.start + s.len];
            // Merged spans are pieces by construction; single characters may not be.
            match self.lookup(piece) {
                Some(id) => out.push(id),
                None if self.byte_tokens.iter().any(|b| b.is_some()) => {
                    for b in piece.bytes() {
                        out.extend(self.byte_tokens[b as usize].or(self.unk));
                    }
                }
                None => out.extend(self.unk),
            }
            i = s.next;
        }
    }
}

/// "<0x0A>" → 0x0A.
pub fn parse_byte_token(t: &str) -> Option<u8> {
    let h = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if h.len() != 2 {
        return None;
    }
    u8::from_str_radix(h, 16).ok()
}
