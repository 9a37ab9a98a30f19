//! Training data: the examples the trainer and the eval gate use, tokenized through the
//! model's chat template exactly as `brise serve` tokenizes a request, loaded from JSONL
//! in the formats `brise export` writes (trl-sft, trl-dpo, trl-kto, openai-sft,
//! openai-dpo, mistral-sft) or straight from the ledger, and the held-out split.
//!
//! Rows that are not what their format says (bad JSON, a missing field, a wrong type)
//! are errors naming `FILE:LINE`. Rows that are well formed but cannot be trained on (no
//! assistant turn at the end, a conversation the template refuses, too long) are
//! skipped, and every skip is listed in [`Dataset::skipped`] with its place and reason.

use brise_ledger::Ledger;
use brise_ledger::export::{ExportFilter, ExportReport, Format, TrainingRow};
use brise_model::chat::Message;
use brise_model::{Model, ModelError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// One tokenized sequence: the prompt (chat-templated, with the generation prompt) then
/// the completion (the assistant's answer and its end-of-turn token(s)); loss is taken on
/// the completion tokens only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seq {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

impl Seq {
    /// Prompt then completion, as the forward pass reads them.
    pub fn tokens(&self) -> Vec<u32> {
        let mut t = self.prompt.clone();
        t.extend_from_slice(&self.completion);
        t
    }

    pub fn len(&self) -> usize {
        self.prompt.len() + self.completion.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one example trains: a target answer (SFT), a preference (DPO), or a binary
/// judgement of one answer (KTO).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Sft(Seq),
    Pref { chosen: Seq, rejected: Seq },
    Kto { seq: Seq, desirable: bool },
}

impl Item {
    pub fn method(&self) -> Method {
        match self {
            Item::Sft(_) => Method::Sft,
            Item::Pref { .. } => Method::Dpo,
            Item::Kto { .. } => Method::Kto,
        }
    }

    /// The answer users preferred or corrected to, if the item has one: the SFT answer,
    /// DPO's chosen, a desirable KTO completion.
    pub fn preferred(&self) -> Option<&Seq> {
        match self {
            Item::Sft(s) => Some(s),
            Item::Pref { chosen, .. } => Some(chosen),
            Item::Kto { seq, desirable } => desirable.then_some(seq),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub item: Item,
    /// sha256 (hex) of the prompt messages in canonical JSON.
    pub prompt_key: String,
    pub subject: Option<String>,
    /// The subject's tenant (ledger rows): subjects are named per tenant.
    pub tenant: Option<String>,
    pub record_ids: Vec<String>,
    pub feedback_ids: Vec<String>,
    /// Where it came from: `FILE:LINE`, or `feedback ID`.
    pub origin: String,
    /// The last user message of the prompt (the gate's report shows it).
    pub prompt_text: String,
    /// For a correction trained as SFT: the answer it replaced (the model's own), so the
    /// gate can tell answers that moved towards the correction from ones that stayed.
    pub replaced: Option<String>,
}

impl Example {
    /// The key of the group the split keeps together: the subject when known (all of a
    /// person's data lands on one side), else the prompt.
    pub fn group(&self) -> String {
        match &self.subject {
            Some(s) => format!("subject:{}/{s}", self.tenant.as_deref().unwrap_or_default()),
            None => format!("prompt:{}", self.prompt_key),
        }
    }
}

/// The training methods: one enum for datasets and training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Sft,
    Dpo,
    Kto,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Sft => "sft",
            Method::Dpo => "dpo",
            Method::Kto => "kto",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Method, String> {
        parse_method(s)
    }
}

/// `sft`, `dpo` or `kto` (command-line values).
pub fn parse_method(s: &str) -> std::result::Result<Method, String> {
    match s {
        "sft" => Ok(Method::Sft),
        "dpo" => Ok(Method::Dpo),
        "kto" => Ok(Method::Kto),
        _ => Err(format!("unknown method {s:?}: one of sft, dpo, kto")),
    }
}

/// The format of a JSONL file, from its first row's fields (as the fine-tuning jobs
/// API takes files without naming their format): `messages` is SFT (OpenAI's and
/// Mistral's shape); `input` with `preferred_output` is OpenAI's DPO; `chosen` with
/// `rejected` is TRL's DPO; `label` is TRL's KTO; `prompt` with `completion` is TRL's
/// SFT. `None` when the first row is none of these.
pub fn detect_format(text: &str) -> std::result::Result<Format, String> {
    let Some(line) = text.lines().find(|l| !l.trim().is_empty()) else {
        return Err("the file is empty".into());
    };
    let v: Value =
        serde_json::from_str(line).map_err(|e| format!("the first row is not JSON: {e}"))?;
    let Value::Object(o) = &v else {
        return Err(format!(
            "a row must be a JSON object, not {}",
            type_name(&v)
        ));
    };
    let has = |k: &str| o.contains_key(k);
    Ok(if has("messages") {
        Format::OpenaiSft
    } else if has("input") && has("preferred_output") {
        Format::OpenaiDpo
    } else if has("chosen") && has("rejected") {
        Format::TrlDpo
    } else if has("label") {
        Format::TrlKto
    } else if has("prompt") && has("completion") {
        Format::TrlSft
    } else {
        let keys: Vec<&str> = o.keys().map(String::as_str).collect();
        return Err(format!(
            "the first row's fields {keys:?} are none of the known formats: messages (SFT), \
             input + preferred_output (OpenAI DPO), prompt + chosen + rejected (TRL DPO), \
             prompt + completion + label (TRL KTO), prompt + completion (TRL SFT)"
        ));
    })
}

/// A row left out, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Skip {
    pub at: String,
    pub reason: String,
}

/// Ledger rows per method before `auto` chose one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Available {
    pub sft: usize,
    pub dpo: usize,
    /// Of the DPO rows, the pairwise choices between two answers (the rest are
    /// corrections, each paired with the answer it corrects).
    #[serde(default)]
    pub choices: usize,
    /// Corrections (each gives an SFT row and a DPO row).
    #[serde(default)]
    pub corrections: usize,
    pub kto_desirable: usize,
    pub kto_undesirable: usize,
}

#[derive(Clone, Debug)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// sha256 (hex) of the rows that gave the examples, each in canonical JSON (keys
    /// sorted, no spaces) and followed by a newline, in order.
    pub snapshot_sha256: String,
    /// `FILE (FORMAT)` or `ledger (…)`.
    pub source: String,
    pub method: Method,
    /// Non-blank rows read.
    pub rows: usize,
    pub skipped: Vec<Skip>,
    /// The ledger's export report (consent, objections, redactions), for ledger datasets.
    pub export: Option<ExportReport>,
    pub available: Option<Available>,
}

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Longest sequence kept, in tokens (default: the model's training context).
    pub max_tokens: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{at}: {msg}")]
    Row { at: String, msg: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("ledger: {0}")]
    Ledger(#[from] brise_ledger::LedgerError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, DataError>;

/// Why a row gives no example.
enum Bad {
    /// Not what the format says: an error.
    Malformed(String),
    /// Well formed, but nothing to train on: a counted skip.
    Unusable(String),
}

fn malformed<T>(msg: impl Into<String>) -> std::result::Result<T, Bad> {
    Err(Bad::Malformed(msg.into()))
}

fn unusable<T>(msg: impl Into<String>) -> std::result::Result<T, Bad> {
    Err(Bad::Unusable(msg.into()))
}

/// A row's conversation before tokenization.
enum Raw {
    Sft {
        prompt: Vec<Message>,
        answer: Message,
    },
    Pref {
        prompt: Vec<Message>,
        chosen: Message,
        rejected: Message,
    },
    Kto {
        prompt: Vec<Message>,
        answer: Message,
        desirable: bool,
    },
}

impl Raw {
    fn prompt(&self) -> &[Message] {
        match self {
            Raw::Sft { prompt, .. } | Raw::Pref { prompt, .. } | Raw::Kto { prompt, .. } => prompt,
        }
    }
}

/// JSON with object keys sorted and no spaces: one text per value, whatever order the
/// file or the JSON library keeps keys in.
pub fn canonical_json(v: &Value) -> String {
    fn go(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                out.push('{');
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).expect("a string serializes"));
                    out.push(':');
                    go(&m[k], out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    go(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut s = String::new();
    go(v, &mut s);
    s
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of the prompt's messages (after the same normalisation as the server's, so
/// one prompt has one key whichever format carried it).
pub fn prompt_key(prompt: &[Message]) -> String {
    let v = serde_json::to_value(prompt).expect("messages serialize");
    hex(Sha256::digest(canonical_json(&v).as_bytes()))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// One message, read the way the server reads a request's (`developer` is `system`,
/// text parts are joined, tool-call arguments given as JSON text become objects), so
/// the template sees what it saw when the answer was made. OpenAI's `weight` comes back
/// separately. Other fields (metadata some tools add) are ignored.
fn message(v: &Value, at: &str) -> std::result::Result<(Message, Option<f64>), Bad> {
    let Value::Object(o) = v else {
        return malformed(format!("{at} must be an object, not {}", type_name(v)));
    };
    let role = match o.get("role") {
        Some(Value::String(r)) => r.as_str(),
        Some(other) => {
            return malformed(format!(
                "{at}.role must be a string, not {}",
                type_name(other)
            ));
        }
        None => return malformed(format!("{at} has no role")),
    };
    let role = match role {
        "system" | "user" | "assistant" | "tool" => role,
        "developer" => "system",
        other => {
            return malformed(format!(
                "{at}.role {other:?} is not one of system, developer, user, assistant, tool"
            ));
        }
    };
    let tool_calls = match o.get("tool_calls") {
        None | Some(Value::Null) => None,
        Some(Value::Array(calls)) => {
            let mut calls = calls.clone();
            for c in &mut calls {
                if let Some(a) = c.pointer_mut("/function/arguments")
                    && let Some(parsed) = a
                        .as_str()
                        .and_then(|s| serde_json::from_str::<Value>(s).ok())
                {
                    *a = parsed;
                }
            }
            Some(Value::Array(calls))
        }
        Some(other) => {
            return malformed(format!(
                "{at}.tool_calls must be a list, not {}",
                type_name(other)
            ));
        }
    };
    let content = match o.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut s = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => s.push_str(t),
                    (Some("text"), None) => {
                        return malformed(format!("{at}.content[{j}] has no string `text`"));
                    }
                    (Some(other), _) => {
                        return unusable(format!(
                            "{at}.content[{j}] is of type {other:?} (only text is)"
                        ));
                    }
                    (None, _) => return malformed(format!("{at}.content[{j}] has no type")),
                }
            }
            s
        }
        None | Some(Value::Null) if role == "assistant" && tool_calls.is_some() => String::new(),
        None | Some(Value::Null) => return malformed(format!("{at} has no content")),
        Some(other) => {
            return malformed(format!(
                "{at}.content must be a string or a list of text parts, not {}",
                type_name(other)
            ));
        }
    };
    let string = |k: &str| -> std::result::Result<Option<String>, Bad> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => malformed(format!(
                "{at}.{k} must be a string, not {}",
                type_name(other)
            )),
        }
    };
    let weight = match o.get("weight") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_f64(),
        Some(other) => {
            return malformed(format!(
                "{at}.weight must be a number, not {}",
                type_name(other)
            ));
        }
    };
    Ok((
        Message {
            role: role.to_string(),
            content,
            tool_calls,
            tool_call_id: string("tool_call_id")?,
            name: string("name")?,
        },
        weight,
    ))
}

fn messages(v: &Value, at: &str) -> std::result::Result<Vec<(Message, Option<f64>)>, Bad> {
    match v {
        Value::Array(list) => list
            .iter()
            .enumerate()
            .map(|(i, m)| message(m, &format!("{at}[{i}]")))
            .collect(),
        Value::String(_) => unusable(format!(
            "{at} is plain text: brise trains chat models through their template, so it needs a list of messages"
        )),
        other => malformed(format!(
            "{at} must be a list of messages, not {}",
            type_name(other)
        )),
    }
}

fn field<'a>(o: &'a Map<String, Value>, k: &str) -> std::result::Result<&'a Value, Bad> {
    match o.get(k) {
        Some(v) => Ok(v),
        None => {
            let keys: Vec<&str> = o.keys().map(String::as_str).collect();
            malformed(format!("no field {k:?} (the row has {keys:?})"))
        }
    }
}

fn check_prompt(prompt: &[Message]) -> std::result::Result<(), Bad> {
    match prompt.last() {
        None => unusable("the prompt has no messages"),
        Some(m) if m.role == "assistant" => {
            unusable("the prompt ends with an assistant turn: nothing asked it")
        }
        _ => Ok(()),
    }
}

/// The one assistant message of a completion list (`chosen`, `completion`, …).
fn one_answer(v: &Value, at: &str) -> std::result::Result<Message, Bad> {
    let mut list = messages(v, at)?;
    if list.len() != 1 {
        return unusable(format!(
            "{at} has {} messages: brise trains on one assistant answer",
            list.len()
        ));
    }
    let (m, _) = list.remove(0);
    if m.role != "assistant" {
        return unusable(format!(
            "{at}[0] is a {} message, not the assistant's",
            m.role
        ));
    }
    Ok(m)
}

/// A conversation split before its final assistant turn (the one the loss is on).
fn split_last(
    list: Vec<(Message, Option<f64>)>,
) -> std::result::Result<(Vec<Message>, Message), Bad> {
    let mut msgs = list;
    match msgs.last() {
        None => return unusable("the conversation is empty"),
        Some((m, _)) if m.role != "assistant" => {
            return unusable(format!(
                "the conversation ends with a {} message: no assistant answer to learn",
                m.role
            ));
        }
        Some((_, Some(w))) if *w == 0.0 => {
            return unusable("the final assistant message has weight 0");
        }
        _ => {}
    }
    let (answer, _) = msgs.pop().expect("checked non-empty");
    let prompt: Vec<Message> = msgs.into_iter().map(|(m, _)| m).collect();
    check_prompt(&prompt)?;
    Ok((prompt, answer))
}

fn parse_row(format: Format, v: &Value) -> std::result::Result<Raw, Bad> {
    let Value::Object(o) = v else {
        return malformed(format!("a row must be a JSON object, not {}", type_name(v)));
    };
    let plain = |m: Vec<(Message, Option<f64>)>| m.into_iter().map(|(m, _)| m).collect::<Vec<_>>();
    match format {
        Format::OpenaiSft | Format::MistralSft | Format::TrlSft => {
            if let Some(msgs) = o.get("messages") {
                let (prompt, answer) = split_last(messages(msgs, "messages")?)?;
                return Ok(Raw::Sft { prompt, answer });
            }
            // TRL's conversational prompt-completion form.
            if format == Format::TrlSft && o.contains_key("prompt") && o.contains_key("completion")
            {
                if o.contains_key("label") {
                    return malformed("a row with a label is trl-kto, not trl-sft");
                }
                let prompt = plain(messages(field(o, "prompt")?, "prompt")?);
                check_prompt(&prompt)?;
                let answer = one_answer(field(o, "completion")?, "completion")?;
                return Ok(Raw::Sft { prompt, answer });
            }
            if o.contains_key("text") {
                return unusable(
                    "a plain-text row (\"text\"): brise trains chat models through their template, so it needs messages",
                );
            }
            let keys: Vec<&str> = o.keys().map(String::as_str).collect();
            malformed(format!("no field \"messages\" (the row has {keys:?})"))
        }
        Format::OpenaiDpo => {
            let input = field(o, "input")?;
            let Value::Object(io) = input else {
                return malformed(format!(
                    "input must be an object with messages, not {}",
                    type_name(input)
                ));
            };
            let prompt = plain(messages(field(io, "messages")?, "input.messages")?);
            check_prompt(&prompt)?;
            Ok(Raw::Pref {
                prompt,
                chosen: one_answer(field(o, "preferred_output")?, "preferred_output")?,
                rejected: one_answer(field(o, "non_preferred_output")?, "non_preferred_output")?,
            })
        }
        Format::TrlDpo => {
            let (c, r) = (field(o, "chosen")?, field(o, "rejected")?);
            if let Some(p) = o.get("prompt") {
                let prompt = plain(messages(p, "prompt")?);
                check_prompt(&prompt)?;
                return Ok(Raw::Pref {
                    prompt,
                    chosen: one_answer(c, "chosen")?,
                    rejected: one_answer(r, "rejected")?,
                });
            }
            // TRL's implicit prompt: two whole conversations that differ in the last turn.
            let (pc, chosen) = split_last(messages(c, "chosen")?)?;
            let (pr, rejected) = split_last(messages(r, "rejected")?)?;
            if pc != pr {
                return unusable(
                    "chosen and rejected differ before their last turn: no common prompt",
                );
            }
            Ok(Raw::Pref {
                prompt: pc,
                chosen,
                rejected,
            })
        }
        Format::TrlKto => {
            let prompt = plain(messages(field(o, "prompt")?, "prompt")?);
            check_prompt(&prompt)?;
            let answer = one_answer(field(o, "completion")?, "completion")?;
            let desirable = match field(o, "label")? {
                Value::Bool(b) => *b,
                other => {
                    return malformed(format!(
                        "label must be true or false, not {}",
                        type_name(other)
                    ));
                }
            };
            Ok(Raw::Kto {
                prompt,
                answer,
                desirable,
            })
        }
    }
}

/// Tokenizes prompt and answer the way the answer is produced: the prompt is what the
/// server feeds the model for a request with these messages (`Model::encode_chat` with
/// the generation prompt); the completion is the rest of the whole conversation's
/// tokens, up to and including the first end-of-generation token the template writes
/// after the answer (`<|im_end|>`, `</s>`; ChatML's newline after it is never
/// generated, so it is not scored). A template that writes none gets the tokenizer's
/// EOS appended, so the model learns to stop.
pub fn encode_seq(
    model: &Model,
    prompt: &[Message],
    answer: &Message,
    max_tokens: usize,
) -> std::result::Result<Seq, String> {
    if answer.content.trim().is_empty() && answer.tool_calls.is_none() {
        return Err("the answer is empty".into());
    }
    let refuse = |e: ModelError| format!("the chat template refuses this conversation: {e}");
    let p = model.encode_chat(prompt, true).map_err(refuse)?;
    let mut all = prompt.to_vec();
    all.push(answer.clone());
    let full = model.encode_chat(&all, false).map_err(refuse)?;
    if !full.starts_with(&p) {
        return Err(
            "the prompt's tokens are not a prefix of the conversation's (the template renders \
             the prompt differently once the answer follows, or the answer's first characters \
             merge with the generation prompt)"
                .into(),
        );
    }
    let tk = &model.tokenizer;
    let rest = &full[p.len()..];
    let mut completion = match rest.iter().position(|&t| tk.is_eog(t)) {
        Some(i) => rest[..=i].to_vec(),
        None => rest.to_vec(),
    };
    if !completion.last().is_some_and(|&t| tk.is_eog(t))
        && let Some(eos) = tk.eos
    {
        completion.push(eos);
    }
    if completion.len() < 2 {
        return Err("the answer renders to no tokens".into());
    }
    let n = p.len() + completion.len();
    if n > max_tokens {
        return Err(format!("{n} tokens, more than the limit of {max_tokens}"));
    }
    Ok(Seq {
        prompt: p,
        completion,
    })
}

fn to_item(model: &Model, raw: &Raw, max: usize) -> std::result::Result<Item, String> {
    Ok(match raw {
        Raw::Sft { prompt, answer } => Item::Sft(encode_seq(model, prompt, answer, max)?),
        Raw::Pref {
            prompt,
            chosen,
            rejected,
        } => Item::Pref {
            chosen: encode_seq(model, prompt, chosen, max).map_err(|e| format!("chosen: {e}"))?,
            rejected: encode_seq(model, prompt, rejected, max)
                .map_err(|e| format!("rejected: {e}"))?,
        },
        Raw::Kto {
            prompt,
            answer,
            desirable,
        } => Item::Kto {
            seq: encode_seq(model, prompt, answer, max)?,
            desirable: *desirable,
        },
    })
}

fn method_of(format: Format) -> Method {
    match format {
        Format::OpenaiSft | Format::MistralSft | Format::TrlSft => Method::Sft,
        Format::OpenaiDpo | Format::TrlDpo => Method::Dpo,
        Format::TrlKto => Method::Kto,
    }
}

fn check_model(model: &Model) -> Result<()> {
    if model.chat_template.is_none() {
        return Err(DataError::Invalid(format!(
            "{} has no chat template: brise trains chat models through their template",
            model.name
        )));
    }
    Ok(())
}

/// Builds the dataset from rows; `Err` only for malformed rows.
struct Builder<'m> {
    model: &'m Model,
    max: usize,
    hash: Sha256,
    examples: Vec<Example>,
    skipped: Vec<Skip>,
    rows: usize,
}

impl<'m> Builder<'m> {
    fn new(model: &'m Model, opts: &LoadOptions) -> Builder<'m> {
        Builder {
            model,
            max: opts.max_tokens.unwrap_or(model.cfg.n_ctx_train),
            hash: Sha256::new(),
            examples: Vec::new(),
            skipped: Vec::new(),
            rows: 0,
        }
    }

    /// Adds one row; `ids` are (tenant, subject, record ids, feedback ids).
    fn row(
        &mut self,
        format: Format,
        v: &Value,
        at: String,
        ids: (Option<String>, Option<String>, Vec<String>, Vec<String>),
    ) -> Result<()> {
        self.rows += 1;
        let parsed = parse_row(format, v).and_then(|raw| {
            to_item(self.model, &raw, self.max)
                .map(|item| {
                    let text = raw
                        .prompt()
                        .iter()
                        .rev()
                        .find(|m| m.role == "user")
                        .map(|m| m.content.clone())
                        .unwrap_or_default();
                    (item, prompt_key(raw.prompt()), text)
                })
                .map_err(Bad::Unusable)
        });
        match parsed {
            Ok((item, prompt_key, prompt_text)) => {
                self.hash.update(canonical_json(v).as_bytes());
                self.hash.update(b"\n");
                let (tenant, subject, record_ids, feedback_ids) = ids;
                self.examples.push(Example {
                    item,
                    prompt_key,
                    subject,
                    tenant,
                    record_ids,
                    feedback_ids,
                    origin: at,
                    prompt_text,
                    replaced: None,
                });
                Ok(())
            }
            Err(Bad::Unusable(reason)) => {
                self.skipped.push(Skip { at, reason });
                Ok(())
            }
            Err(Bad::Malformed(msg)) => Err(DataError::Row {
                at,
                msg: format!("not a {} row: {msg}", format.name()),
            }),
        }
    }

    fn finish(self, source: String, method: Method) -> Dataset {
        Dataset {
            examples: self.examples,
            snapshot_sha256: hex(self.hash.finalize()),
            source,
            method,
            rows: self.rows,
            skipped: self.skipped,
            export: None,
            available: None,
        }
    }
}

/// Which ledger rows to train on, and who asks (the export is audited under that name).
#[derive(Clone, Debug, Default)]
pub struct LedgerQuery {
    /// The model id completions were recorded under (`brise serve`'s name for it).
    pub model: Option<String>,
    pub since_ms: Option<i64>,
    /// `None` is `auto`: DPO when users chose between two answers (pairwise or arena
    /// feedback; every pair is used, corrections paired with the answer they correct,
    /// and with `rpo_alpha` auto the chosen answers also get an NLL term); else SFT when
    /// there are corrections (a correction is a demonstration of the answer wanted: SFT
    /// on the corrected answers and the thumbed-up ones); else KTO when there are
    /// thumbs-down ratings; else SFT on the thumbed-up answers. Thumbs-up alone give SFT
    /// rather than KTO: with no undesirable answers, raising the desirable ones is all
    /// KTO could do, and SFT does that directly.
    pub method: Option<Method>,
    pub actor: String,
}

impl Dataset {
    /// Reads a JSONL file of `format`.
    pub fn from_jsonl(
        path: &Path,
        format: Format,
        model: &Model,
        opts: &LoadOptions,
    ) -> Result<Dataset> {
        let io = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let f = std::fs::File::open(path).map_err(io)?;
        Self::from_reader(
            std::io::BufReader::new(f),
            &path.display().to_string(),
            format,
            model,
            opts,
        )
    }

    /// Reads JSONL of `format` from `r`; `name` is the file's name in messages.
    pub fn from_reader(
        r: impl BufRead,
        name: &str,
        format: Format,
        model: &Model,
        opts: &LoadOptions,
    ) -> Result<Dataset> {
        check_model(model)?;
        let mut b = Builder::new(model, opts);
        for (i, line) in r.lines().enumerate() {
            let at = format!("{name}:{}", i + 1);
            let line = line.map_err(|e| DataError::Row {
                at: at.clone(),
                msg: format!("cannot read: {e}"),
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| DataError::Row {
                at: at.clone(),
                msg: format!("not JSON: {e}"),
            })?;
            b.row(format, &v, at, (None, None, vec![], vec![]))?;
        }
        Ok(b.finish(format!("{name} ({})", format.name()), method_of(format)))
    }

    /// The ledger's feedback as a dataset, through its training export (consent,
    /// objections, redaction and retention as for `brise export`), keeping each
    /// example's record and feedback ids and its subject.
    pub async fn from_ledger(
        ledger: &Ledger,
        model: &Model,
        q: &LedgerQuery,
        opts: &LoadOptions,
    ) -> Result<Dataset> {
        check_model(model)?;
        let filter = ExportFilter {
            since_ms: q.since_ms,
            model: q.model.clone(),
        };
        let formats = [Format::TrlSft, Format::TrlDpo, Format::TrlKto];
        let (rows, report) = ledger.training_rows(&q.actor, &formats, &filter).await?;
        let mut avail = Available::default();
        for r in &rows {
            match r.format {
                Format::TrlDpo if r.record_ids.len() >= 2 => {
                    avail.dpo += 1;
                    avail.choices += 1;
                }
                Format::TrlDpo => {
                    avail.dpo += 1;
                    avail.corrections += 1;
                }
                Format::TrlKto if r.row["label"] == Value::Bool(true) => avail.kto_desirable += 1,
                Format::TrlKto => avail.kto_undesirable += 1,
                _ => avail.sft += 1,
            }
        }
        let method = q.method.unwrap_or(if avail.choices > 0 {
            Method::Dpo
        } else if avail.corrections > 0 {
            Method::Sft
        } else if avail.kto_undesirable > 0 {
            Method::Kto
        } else {
            Method::Sft
        });
        // A correction's DPO row holds the answer it replaced.
        let replaced: BTreeMap<String, String> = rows
            .iter()
            .filter(|r| r.format == Format::TrlDpo && r.record_ids.len() == 1)
            .filter_map(|r| {
                let t = r.row["rejected"][0]["content"].as_str()?;
                Some((r.feedback_id.clone(), t.to_string()))
            })
            .collect();
        let mut b = Builder::new(model, opts);
        for r in rows.into_iter().filter(|r| method_of(r.format) == method) {
            let orig = (method == Method::Sft)
                .then(|| replaced.get(&r.feedback_id).cloned())
                .flatten();
            let before = b.examples.len();
            let TrainingRow {
                format,
                row,
                feedback_id,
                record_ids,
                tenant,
                subject,
            } = r;
            b.row(
                format,
                &row,
                format!("feedback {feedback_id}"),
                (Some(tenant), subject, record_ids, vec![feedback_id]),
            )?;
            if b.examples.len() > before
                && let Some(e) = b.examples.last_mut()
            {
                e.replaced = orig;
            }
        }
        let mut source = String::from("ledger");
        if let Some(m) = &q.model {
            source += &format!(", model {m}");
        }
        if let Some(s) = q.since_ms {
            source += &format!(", since {s} ms");
        }
        let mut d = b.finish(source, method);
        d.export = Some(report);
        d.available = Some(avail);
        Ok(d)
    }

    /// The held-out split of this dataset (see [`split`]).
    pub fn split(&self, held_out_fraction: f64) -> Result<Split> {
        split(&self.examples, held_out_fraction)
    }

    /// Every record id and feedback id used, sorted, once each (for lineage).
    pub fn ids(&self) -> (Vec<String>, Vec<String>) {
        let mut r = BTreeSet::new();
        let mut f = BTreeSet::new();
        for e in &self.examples {
            r.extend(e.record_ids.iter().cloned());
            f.extend(e.feedback_ids.iter().cloned());
        }
        (r.into_iter().collect(), f.into_iter().collect())
    }
}

/// The share of examples held out by default.
pub const DEFAULT_HELD_OUT: f64 = 0.2;

/// Indices into the examples: what the trainer may see, what the gate evaluates on, and
/// what neither uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub held_out: Vec<usize>,
    /// Training-side examples whose prompt is also held out (another subject asked the
    /// same thing): kept out of training so no held-out prompt is trained on.
    pub excluded: Vec<usize>,
}

/// Where a group falls in [0, 1): the first 8 bytes of sha256(key), so the same group
/// lands at the same place in every dataset and on every machine.
pub fn group_position(key: &str) -> f64 {
    let d = Sha256::digest(key.as_bytes());
    let x = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Splits by group (the subject, else the prompt: [`Example::group`]). A group is held
/// out when its position ([`group_position`]) is below `held_out_fraction`, so its side
/// depends on nothing but its key: as the dataset grows, groups never change sides.
/// Two exceptions keep both sides non-empty when there are at least two groups: if no
/// group falls below the fraction, the lowest is held out; if all do, the highest
/// trains. (A group held out that way goes back to training once another group falls
/// below the fraction, never the other way: nothing trained on is ever held out later.)
/// Examples on the training side whose prompt is held out are `excluded`.
pub fn split(examples: &[Example], held_out_fraction: f64) -> Result<Split> {
    if !(held_out_fraction > 0.0 && held_out_fraction < 1.0) {
        return Err(DataError::Invalid(format!(
            "the held-out fraction must be between 0 and 1 (exclusive), not {held_out_fraction}"
        )));
    }
    let keys: Vec<String> = examples.iter().map(Example::group).collect();
    let pos: BTreeMap<&str, f64> = keys
        .iter()
        .map(|k| (k.as_str(), group_position(k)))
        .collect();
    let mut held: BTreeSet<&str> = pos
        .iter()
        .filter(|(_, p)| **p < held_out_fraction)
        .map(|(k, _)| *k)
        .collect();
    let by_pos = |a: &(&&str, &f64), b: &(&&str, &f64)| a.1.total_cmp(b.1).then(a.0.cmp(b.0));
    if pos.len() >= 2 {
        if held.is_empty() {
            let lowest = pos.iter().min_by(by_pos).expect("two groups");
            held.insert(lowest.0);
        } else if held.len() == pos.len() {
            let highest = pos.iter().max_by(by_pos).expect("two groups");
            held.remove(highest.0);
        }
    }
    let mut s = Split::default();
    let mut held_prompts = BTreeSet::new();
    for (i, k) in keys.iter().enumerate() {
        if held.contains(k.as_str()) {
            s.held_out.push(i);
            held_prompts.insert(examples[i].prompt_key.as_str());
        }
    }
    for (i, k) in keys.iter().enumerate() {
        if held.contains(k.as_str()) {
            continue;
        }
        if held_prompts.contains(examples[i].prompt_key.as_str()) {
            s.excluded.push(i);
        } else {
            s.train.push(i);
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(prompt: &str, subject: Option<&str>) -> Example {
        Example {
            item: Item::Sft(Seq {
                prompt: vec![1],
                completion: vec![2],
            }),
            prompt_key: prompt_key(&[Message::new("user", prompt)]),
            subject: subject.map(str::to_string),
            tenant: subject.map(|_| "acme".to_string()),
            record_ids: vec![],
            feedback_ids: vec![],
            origin: String::new(),
            prompt_text: prompt.to_string(),
            replaced: None,
        }
    }

    fn side(s: &Split, i: usize) -> &'static str {
        if s.held_out.contains(&i) {
            "held"
        } else if s.train.contains(&i) {
            "train"
        } else {
            assert!(s.excluded.contains(&i));
            "excluded"
        }
    }

    #[test]
    fn groups_stay_together_and_prompts_never_cross() {
        // 40 subjects with 3 prompts each, and 40 anonymous prompts asked twice.
        let mut v = Vec::new();
        for s in 0..40 {
            for p in 0..3 {
                v.push(ex(&format!("s{s} q{p}"), Some(&format!("user{s}"))));
            }
        }
        for p in 0..40 {
            v.push(ex(&format!("anon {p}"), None));
            v.push(ex(&format!("anon {p}"), None));
        }
        let s = split(&v, 0.2).unwrap();
        assert_eq!(s.train.len() + s.held_out.len() + s.excluded.len(), v.len());
        assert!(s.excluded.is_empty());
        for i in 0..v.len() {
            for j in 0..v.len() {
                if v[i].group() == v[j].group() {
                    assert_eq!(side(&s, i), side(&s, j), "{i} {j}");
                }
            }
        }
        // Roughly the fraction, by groups (80 groups).
        let groups: BTreeSet<String> = s.held_out.iter().map(|&i| v[i].group()).collect();
        assert!((8..=26).contains(&groups.len()), "{}", groups.len());
        // A held-out prompt asked by someone else is not trained on.
        let h = s.held_out[0];
        let mut same = v[h].clone();
        same.subject = Some("someone-new-zz".into());
        v.push(same);
        let s2 = split(&v, 0.2).unwrap();
        let last = v.len() - 1;
        assert!(
            side(&s2, last) == "held" || side(&s2, last) == "excluded",
            "{}",
            side(&s2, last)
        );
    }

    #[test]
    fn sides_are_stable_as_the_dataset_grows() {
        let mut v: Vec<Example> = (0..30).map(|i| ex(&format!("p{i}"), None)).collect();
        let before = split(&v, 0.25).unwrap();
        assert!(!before.held_out.is_empty() && !before.train.is_empty());
        // New groups and more examples of old groups, in front and behind.
        let mut grown: Vec<Example> = (30..90).map(|i| ex(&format!("p{i}"), None)).collect();
        grown.extend(v.iter().cloned());
        grown.extend((0..30).map(|i| ex(&format!("p{i}"), None)));
        let after = split(&grown, 0.25).unwrap();
        for i in 0..v.len() {
            let was = side(&before, i);
            assert_eq!(side(&after, 60 + i), was, "example {i}");
            assert_eq!(side(&after, 90 + i), was, "a second copy of {i}");
        }
        // The order of examples does not matter.
        v.reverse();
        let rev = split(&v, 0.25).unwrap();
        for i in 0..v.len() {
            assert_eq!(side(&rev, i), side(&before, v.len() - 1 - i));
        }
        // Positions are what sha256 says (a fixed value, so no platform drift).
        let p = group_position("prompt:x");
        assert!((0.0..1.0).contains(&p));
        assert_eq!(p, group_position("prompt:x"));
    }

    #[test]
    fn both_sides_nonempty_with_two_groups() {
        for (a, b) in [("a", "b"), ("x", "y"), ("hello", "world")] {
            let v = vec![ex(a, None), ex(a, None), ex(b, None)];
            for f in [0.01, 0.5, 0.99] {
                let s = split(&v, f).unwrap();
                assert!(!s.held_out.is_empty() && !s.train.is_empty(), "{a} {b} {f}");
                assert_eq!(side(&s, 0), side(&s, 1));
            }
        }
        // One group: nothing can be held out without leaking it.
        let s = split(&[ex("a", None), ex("a", None)], 0.5).unwrap();
        assert_eq!(s.held_out.len() + s.train.len(), 2);
        assert!(split(&[], 0.2).unwrap() == Split::default());
        assert!(split(&[ex("a", None)], 0.0).is_err());
        assert!(split(&[ex("a", None)], 1.0).is_err());
        assert!(split(&[ex("a", None)], f64::NAN).is_err());
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": [ {"y": "é", "x": null} ]}"#).unwrap();
        assert_eq!(canonical_json(&a), r#"{"a":[{"x":null,"y":"é"}],"b":1}"#);
        // One prompt, one key, whatever the row's shape.
        let p1 = message(
            &serde_json::json!({"role": "developer", "content": [{"type": "text", "text": "hi"}]}),
            "m",
        )
        .ok()
        .unwrap()
        .0;
        assert_eq!(
            prompt_key(&[p1]),
            prompt_key(&[Message::new("system", "hi")])
        );
    }
}
