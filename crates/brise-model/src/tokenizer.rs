//! Tokenizers: byte-level BPE (GGUF `gpt2` vocabularies and `tokenizer.json` files, with
//! the `tokenizers` crate doing pre-tokenization and merges) and SentencePiece (GGUF
//! `llama` vocabularies and `tokenizer.model` files). Special tokens are split out the
//! way llama.cpp does it: user-defined tokens always, control tokens only in text the
//! caller marks as trusted (rendered chat templates), never in user text.

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::spm::{SpmEncoder, SpmModel, TokenType, parse_byte_token};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior};

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// Pre-tokenizer regexes by GGUF `tokenizer.ggml.pre`, as llama.cpp applies them.
fn pre_regexes(pre: &str) -> Option<(&'static [&'static str], bool)> {
    const GPT2: &str =
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)";
    const LLAMA3: &str = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
    const QWEN2: &str = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
    // (regexes, ignore_merges)
    Some(match pre {
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => (&[GPT2], false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => (&[LLAMA3], true),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => (&[QWEN2], false),
        "smollm" | "codeshell" | "exaone" | "minerva-7b" => (&["\\p{N}", GPT2], false),
        _ => return None,
    })
}

/// Inverse of GPT-2's bytes→unicode table.
fn byte_decoder() -> HashMap<char, u8> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .map(|(b, c)| (char::from_u32(c).unwrap(), b as u8))
        .collect()
}

enum Engine {
    /// Byte-level BPE: the `tokenizers` pipeline without added tokens (brise splits them).
    Bpe(Box<tokenizers::Tokenizer>),
    /// A full `tokenizer.json` pipeline, with its special tokens kept as text.
    Hf(Box<tokenizers::Tokenizer>),
    Spm {
        enc: Box<SpmEncoder>,
        add_space_prefix: bool,
        remove_extra_ws: bool,
    },
}

/// How token texts turn back into bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decoding {
    ByteLevel,
    /// U+2581 for spaces, `<0xXX>` byte tokens.
    Metaspace,
}

pub struct Tokenizer {
    tokens: Vec<String>,
    types: Vec<TokenType>,
    engine: Engine,
    decoding: Decoding,
    /// Control, user-defined and unknown tokens, longest text first.
    specials: Vec<u32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    eog: HashSet<u32>,
    byte_dec: HashMap<char, u8>,
    token_map: HashMap<String, u32>,
}

/// The special token ids and flags a vocabulary source provides.
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    extra_eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
}

/// Token texts that end a turn in the chat formats brise knows (llama.cpp's list).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "</s>",
    "<|end_of_text|>",
    // Fill-in-the-middle pad, repository and file separators end a generation too
    // (llama.cpp adds its FIM pad/rep/sep tokens to the end-of-generation set).
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<reponame>",
    "<|file_sep|>",
];

impl Tokenizer {
    fn finish(
        tokens: Vec<String>,
        types: Vec<TokenType>,
        engine: Engine,
        decoding: Decoding,
        sp: SpecialIds,
    ) -> Tokenizer {
        let SpecialIds {
            bos,
            eos,
            extra_eog,
            add_bos,
            add_eos,
        } = sp;
        let mut specials: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| {
                matches!(
                    types[i as usize],
                    TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                )
            })
            .filter(|&i| !tokens[i as usize].is_empty())
            .collect();
        specials.sort_by_key(|&i| std::cmp::Reverse(tokens[i as usize].len()));
        let mut eog: HashSet<u32> = eos.into_iter().chain(extra_eog).collect();
        for (i, t) in tokens.iter().enumerate() {
            if matches!(types[i], TokenType::Control | TokenType::UserDefined)
                && EOG_TEXTS.contains(&t.as_str())
            {
                eog.insert(i as u32);
            }
        }
        let token_map = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        Tokenizer {
            tokens,
            types,
            engine,
            decoding,
            specials,
            bos,
            eos,
            add_bos,
            add_eos,
            eog,
            byte_dec: byte_decoder(),
            token_map,
        }
    }

    /// The tokenizer a GGUF file describes.
    pub fn from_gguf(f: &GgufFile) -> Result<Tokenizer> {
        let model = f.get_str("tokenizer.ggml.model")?;
        let tokens: Vec<String> = f
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .ok_or_else(|| f.err("missing tokenizer.ggml.tokens"))?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| f.err("a token is not a string"))
            })
            .collect::<Result<_>>()?;
        let n = tokens.len();
        let types: Vec<TokenType> = match f
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            Some(a) if a.len() == n => a
                .iter()
                .map(|v| TokenType::from_id(v.as_i64().unwrap_or(1)))
                .collect(),
            Some(_) => {
                return Err(f.err("tokenizer.ggml.token_type length differs from the token list"));
            }
            None => vec![TokenType::Normal; n],
        };
        let id = |k: &str| -> Result<Option<u32>> {
            match f.get(k) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(i) if (i as usize) < n => Ok(Some(i as u32)),
                    // llama.cpp writes -1 (as u32 max) for "none".
                    Some(i) if i == u32::MAX as u64 => Ok(None),
                    _ => Err(f.err(format!("{k} = {v} is not a token id"))),
                },
            }
        };
        let flag = |k: &str, d: bool| f.get(k).and_then(|v| v.as_bool()).unwrap_or(d);
        let extra_eog: Vec<u32> = ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
            .iter()
            .filter_map(|k| id(k).transpose())
            .collect::<Result<_>>()?;
        match model {
            "gpt2" => {
                let pre = f
                    .get("tokenizer.ggml.pre")
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                let (regexes, ignore_merges) = pre_regexes(pre).ok_or_else(|| {
                    ModelError::Unsupported(format!("pre-tokenizer {pre:?} (brise knows default, gpt2, llama-bpe, qwen2, smollm)"))
                })?;
                let merges: Vec<(String, String)> = f
                    .get("tokenizer.ggml.merges")
                    .and_then(|v| v.as_array())
                    .ok_or_else(|| f.err("missing tokenizer.ggml.merges"))?
                    .iter()
                    .map(|v| {
                        let s = v.as_str().ok_or_else(|| f.err("a merge is not a string"))?;
                        let (a, b) = s
                            .split_once(' ')
                            .ok_or_else(|| f.err(format!("merge {s:?} has no space")))?;
                        Ok((a.to_string(), b.to_string()))
                    })
                    .collect::<Result<_>>()?;
                let vocab: tokenizers::models::bpe::Vocab = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.clone(), i as u32))
                    .collect();
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .ignore_merges(ignore_merges)
                    .build()
                    .map_err(tok_err)?;
                let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
                for re in regexes {
                    let split = Split::new(
                        SplitPattern::Regex(re.to_string()),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )
                    .map_err(tok_err)?;
                    steps.push(split.into());
                }
                steps.push(ByteLevel::new(false, false, false).into());
                let mut tk = tokenizers::Tokenizer::new(bpe);
                tk.with_pre_tokenizer(Some(Sequence::new(steps)));
                Ok(Self::finish(
                    tokens,
                    types,
                    Engine::Bpe(Box::new(tk)),
                    Decoding::ByteLevel,
                    SpecialIds {
                        bos: id("tokenizer.ggml.bos_token_id")?,
                        eos: id("tokenizer.ggml.eos_token_id")?,
                        extra_eog,
                        add_bos: flag("tokenizer.ggml.add_bos_token", false),
                        add_eos: flag("tokenizer.ggml.add_eos_token", false),
                    },
                ))
            }
            "llama" => {
                let scores: Vec<f32> =
                    match f.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
                        Some(a) if a.len() == n => {
                            a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect()
                        }
                        _ => return Err(f.err(
                            "a SentencePiece vocabulary needs tokenizer.ggml.scores, one per token",
                        )),
                    };
                let unk = id("tokenizer.ggml.unknown_token_id")?;
                let enc = SpmEncoder::new(&tokens, &scores, &types, unk);
                Ok(Self::finish(
                    tokens,
                    types,
                    Engine::Spm {
                        enc: Box::new(enc),
                        add_space_prefix: flag("tokenizer.ggml.add_space_prefix", true),
                        remove_extra_ws: false,
                    },
                    Decoding::Metaspace,
                    SpecialIds {
                        bos: id("tokenizer.ggml.bos_token_id")?,
                        eos: id("tokenizer.ggml.eos_token_id")?,
                        extra_eog,
                        add_bos: flag("tokenizer.ggml.add_bos_token", true),
                        add_eos: flag("tokenizer.ggml.add_eos_token", false),
                    },
                ))
            }
            other => Err(ModelError::Unsupported(format!(
                "tokenizer model {other:?} (brise reads gpt2 and llama vocabularies)"
            ))),
        }
    }

    /// A SentencePiece `tokenizer.model` file.
    pub fn from_spm_file(path: &Path, add_bos: bool, add_eos: bool) -> Result<Tokenizer> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let m = SpmModel::parse(&bytes)?;
        if m.model_type != 2 {
            return Err(ModelError::Unsupported(format!(
                "{}: SentencePiece model type {} (brise reads BPE models, type 2)",
                path.display(),
                m.model_type
            )));
        }
        let tokens: Vec<String> = m.pieces.iter().map(|p| p.0.clone()).collect();
        let scores: Vec<f32> = m.pieces.iter().map(|p| p.1).collect();
        let types: Vec<TokenType> = m.pieces.iter().map(|p| p.2).collect();
        let enc = SpmEncoder::new(&tokens, &scores, &types, m.unk_id);
        Ok(Self::finish(
            tokens,
            types,
            Engine::Spm {
                enc: Box::new(enc),
                add_space_prefix: m.add_dummy_prefix,
                remove_extra_ws: m.remove_extra_whitespaces,
            },
            Decoding::Metaspace,
            SpecialIds {
                bos: m.bos_id,
                eos: m.eos_id,
                extra_eog: vec![],
                add_bos,
                add_eos,
            },
        ))
    }

    /// A Hugging Face `tokenizer.json`; special-token flags come from its added tokens.
    pub fn from_hf_file(
        path: &Path,
        bos: Option<&str>,
        eos: Option<&str>,
        add_bos: bool,
        add_eos: bool,
    ) -> Result<Tokenizer> {
        let mut tk = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| tok_err(format!("{}: {e}", path.display())))?;
        // Special tokens in user text stay text; brise splits trusted text itself.
        tk.set_encode_special_tokens(true);
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).map_err(|source| ModelError::Io {
                path: path.to_path_buf(),
                source,
            })?)
            .map_err(tok_err)?;
        let decoding = if json["decoder"].to_string().contains("ByteLevel") {
            Decoding::ByteLevel
        } else {
            Decoding::Metaspace
        };
        let vocab = tk.get_vocab(true);
        let n = vocab.values().max().map_or(0, |m| *m as usize + 1);
        let mut tokens = vec![String::new(); n];
        let mut types = vec![TokenType::Normal; n];
        for (t, i) in vocab {
            if decoding == Decoding::Metaspace && parse_byte_token(&t).is_some() {
                types[i as usize] = TokenType::Byte;
            }
            tokens[i as usize] = t;
        }
        for (id, at) in tk.get_added_tokens_decoder() {
            types[id as usize] = if at.special {
                TokenType::Control
            } else {
                TokenType::UserDefined
            };
        }
        let find = |s: Option<&str>| s.and_then(|s| tk.token_to_id(s));
        let (bos, eos) = (find(bos), find(eos));
        Ok(Self::finish(
            tokens,
            types,
            Engine::Hf(Box::new(tk)),
            decoding,
            SpecialIds {
                bos,
                eos,
                extra_eog: vec![],
                add_bos,
                add_eos,
            },
        ))
    }

    /// Whether `text` contains the text of a control token (so it must be kept from being
    /// parsed as one when it is user content).
    pub fn has_control_text(&self, text: &str) -> bool {
        self.specials.iter().any(|&i| {
            matches!(
                self.types[i as usize],
                TokenType::Control | TokenType::Unknown
            ) && text.contains(self.tokens[i as usize].as_str())
        })
    }

    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_map.get(text).copied()
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Whether `id` ends generation (end of sequence or end of turn).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    pub fn eog_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.eog.iter().copied()
    }

    /// Tokenizes `text`. `add_special` adds BOS/EOS when the model asks for them;
    /// `parse_special` lets control tokens in the text become control tokens (only for
    /// trusted text such as a rendered chat template).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        self.encode_spans(text, add_special, parse_special, &[])
    }

    /// Like [`Self::encode`] with `parse_special`, except that control tokens are not
    /// recognised inside the `untrusted` byte ranges (the user's content in a rendered
    /// chat template), so user text can never produce control tokens.
    pub fn encode_spans(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
        untrusted: &[std::ops::Range<usize>],
    ) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        enum Frag {
            /// A byte range of `text` still to be tokenized.
            Text(usize, usize),
            Tok(u32),
        }
        let mut frags = vec![Frag::Text(0, text.len())];
        for &sid in &self.specials {
            let control = matches!(
                self.types[sid as usize],
                TokenType::Control | TokenType::Unknown
            );
            if !parse_special && control {
                continue;
            }
            let st = self.tokens[sid as usize].as_str();
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                match f {
                    Frag::Text(mut start, end) => {
                        let mut from = start;
                        while let Some(p) = text[from..end].find(st).map(|p| p + from) {
                            let q = p + st.len();
                            if control && untrusted.iter().any(|r| p < r.end && q > r.start) {
                                from = p + 1;
                                while !text.is_char_boundary(from) {
                                    from += 1;
                                }
                                continue;
                            }
                            if p > start {
                                next.push(Frag::Text(start, p));
                            }
                            next.push(Frag::Tok(sid));
                            start = q;
                            from = q;
                        }
                        if end > start {
                            next.push(Frag::Text(start, end));
                        }
                    }
                    tok => next.push(tok),
                }
            }
            frags = next;
        }
        for f in frags {
            match f {
                Frag::Tok(id) => out.push(id),
                // SentencePiece's dummy prefix goes on the start of the input only, as
                // sentencepiece and mistral-common add it (llama.cpp also adds one after
                // every special token, which breaks chat prompts rendered with spaces).
                Frag::Text(a, b) if b > a => self.encode_fragment(&text[a..b], a == 0, &mut out)?,
                Frag::Text(..) => {}
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    fn encode_fragment(&self, t: &str, at_start: bool, out: &mut Vec<u32>) -> Result<()> {
        match &self.engine {
            Engine::Bpe(tk) | Engine::Hf(tk) => {
                let enc = tk.encode_fast(t, false).map_err(tok_err)?;
                out.extend_from_slice(enc.get_ids());
            }
            Engine::Spm {
                enc,
                add_space_prefix,
                remove_extra_ws,
            } => {
                let mut s = String::with_capacity(t.len() + 3);
                let body: std::borrow::Cow<str> = if *remove_extra_ws {
                    t.split(' ')
                        .filter(|w| !w.is_empty())
                        .collect::<Vec<_>>()
                        .join(" ")
                        .into()
                } else {
                    t.into()
                };
                if *add_space_prefix && at_start {
                    s.push('\u{2581}');
                }
                for c in body.chars() {
                    s.push(if c == ' ' { '\u{2581}' } else { c });
                }
                enc.encode(&s, out);
            }
        }
        Ok(())
    }

    /// The bytes token `id` stands for. Control and unknown tokens render only when
    /// `special` is set; user-defined tokens always render as their text.
    pub fn token_to_piece(&self, id: u32, special: bool) -> Vec<u8> {
        let Some(text) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        match self.types[id as usize] {
            TokenType::Control | TokenType::Unknown => {
                if special {
                    text.as_bytes().to_vec()
                } else {
                    Vec::new()
                }
            }
            TokenType::UserDefined => text.as_bytes().to_vec(),
            TokenType::Byte if self.decoding == Decoding::Metaspace => {
                parse_byte_token(text).map(|b| vec![b]).unwrap_or_default()
            }
            _ => match self.decoding {
                Decoding::ByteLevel => text
                    .chars()
                    .filter_map(|c| self.byte_dec.get(&c).copied())
                    .collect(),
                Decoding::Metaspace => text.replace('\u{2581}', " ").into_bytes(),
            },
        }
    }

    /// Detokenizes, like llama.cpp's `detokenize` without special tokens: the leading
    /// space SentencePiece adds is removed.
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let mut bytes = Vec::new();
        let mut strip = matches!(
            self.engine,
            Engine::Spm {
                add_space_prefix: true,
                ..
            }
        );
        for &id in ids {
            let mut p = self.token_to_piece(id, special);
            if strip && p.first() == Some(&b' ') {
                p.remove(0);
            }
            strip = false;
            bytes.extend(p);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
