//! JSON-constrained generation: a JSON Schema compiled into a byte-level recognizer that
//! says, for any prefix of the output, whether some completion is valid JSON matching
//! the schema. The sampler asks it which tokens may come next, so a constrained output
//! always parses and validates (unless `max_tokens` cuts it short).
//!
//! The recognizer keeps a set of parser stacks (more than one only under `anyOf`, `enum`
//! and `type` lists). A schema keyword it cannot enforce is an error at compile time,
//! never ignored.

use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schema {
    /// Any JSON value.
    Any,
    Null,
    Bool,
    Integer,
    Number,
    String {
        min_len: usize,
        max_len: Option<usize>,
    },
    /// One of these exact JSON texts (`enum`, `const`); build it with
    /// [`Schema::literals`].
    Literals(Arc<LitSet>),
    Array {
        items: Arc<Schema>,
        min: usize,
        max: Option<usize>,
    },
    Object {
        props: Vec<(String, Arc<Schema>)>,
        required: Vec<String>,
        /// Schema of properties not in `props`; `None` forbids them.
        additional: Option<Arc<Schema>>,
    },
    AnyOf(Vec<Arc<Schema>>),
    /// Parts one after the other: exact text and JSON values (e.g. a tool call's
    /// `<tool_call>` tags around its object).
    Seq(Vec<SeqPart>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeqPart {
    /// These bytes exactly, with no whitespace before them.
    Raw(Vec<u8>),
    Json(Arc<Schema>),
}

/// The texts of an `enum`/`const`, sorted and without duplicates or empty texts, so
/// that those still possible after a prefix form one contiguous range: a byte narrows the
/// range with two binary searches, whatever the number of texts (a trie in a sorted
/// list), instead of trying every text at every byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LitSet(Vec<Vec<u8>>);

impl LitSet {
    pub fn texts(&self) -> &[Vec<u8>] {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {msg}")]
pub struct SchemaError {
    pub path: String,
    pub msg: String,
}

/// Keywords that only annotate.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$defs",
    "definitions",
];

/// Properties per object the recognizer tracks.
const MAX_PROPS: usize = 64;
/// Nesting of free-form (`Any`) values.
const MAX_DEPTH: usize = 24;
/// Indentation after a newline (llama.cpp's JSON grammar: `"\n" [ \t]{0,20}`).
const MAX_INDENT: u8 = 20;
/// Digits of one number.
const MAX_NUM: u8 = 32;
/// Parser stacks alive at once.
const MAX_STATES: usize = 256;

impl Schema {
    /// One of these exact texts (an `enum`, a `const`).
    pub fn literals(mut texts: Vec<Vec<u8>>) -> Schema {
        texts.retain(|t| !t.is_empty());
        texts.sort_unstable();
        texts.dedup();
        Schema::Literals(Arc::new(LitSet(texts)))
    }

    /// Any JSON object (`response_format: json_object`).
    pub fn any_object() -> Schema {
        Schema::Object {
            props: Vec::new(),
            required: Vec::new(),
            additional: Some(Arc::new(Schema::Any)),
        }
    }

    /// Compiles a JSON Schema (the subset brise enforces).
    pub fn compile(root: &serde_json::Value) -> Result<Schema, SchemaError> {
        Compiler {
            root,
            depth: 0,
            nodes: 0,
            lit_bytes: 0,
        }
        .node(root, "schema")
    }
}

/// Compiled nodes per schema: `$ref`s are expanded, so a small schema could otherwise
/// grow exponentially. Each `enum`/`const` value counts as a node.
pub const MAX_NODES: usize = 20_000;
/// Bytes of all `enum`/`const` values of a schema (as compact JSON, `$ref`s expanded).
pub const MAX_LITERAL_BYTES: usize = 256 * 1024;

struct Compiler<'a> {
    root: &'a serde_json::Value,
    depth: usize,
    nodes: usize,
    lit_bytes: usize,
}

impl Compiler<'_> {
    fn err(path: &str, msg: impl Into<String>) -> SchemaError {
        SchemaError {
            path: path.to_string(),
            msg: msg.into(),
        }
    }

    /// Counts an `enum`/`const`'s values against the limits.
    fn literals(
        &mut self,
        values: &[serde_json::Value],
        path: &str,
    ) -> Result<Schema, SchemaError> {
        self.nodes += values.len();
        if self.nodes > MAX_NODES {
            return Err(Self::err(
                path,
                format!(
                    "schema too large: more than {MAX_NODES} nodes once $refs are expanded \
                     (each enum/const value counts as one)"
                ),
            ));
        }
        let texts: Vec<Vec<u8>> = values.iter().map(canonical).collect();
        self.lit_bytes += texts.iter().map(Vec::len).sum::<usize>();
        if self.lit_bytes > MAX_LITERAL_BYTES {
            return Err(Self::err(
                path,
                format!(
                    "schema too large: its enum/const values take more than \
                     {MAX_LITERAL_BYTES} bytes once $refs are expanded"
                ),
            ));
        }
        Ok(Schema::literals(texts))
    }

    fn node(&mut self, v: &serde_json::Value, path: &str) -> Result<Schema, SchemaError> {
        use serde_json::Value as J;
        self.depth += 1;
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(Self::err(
                path,
                format!("schema too large: more than {MAX_NODES} nodes once $refs are expanded"),
            ));
        }
        if self.depth > 64 {
            return Err(Self::err(
                path,
                "schema nested too deeply (recursive $ref?)",
            ));
        }
        let r = match v {
            J::Bool(true) => Ok(Schema::Any),
            J::Bool(false) => Err(Self::err(path, "a `false` schema matches nothing")),
            J::Object(m) => self.object_schema(m, path),
            _ => Err(Self::err(path, "a schema must be an object or a boolean")),
        };
        self.depth -= 1;
        r
    }

    fn object_schema(
        &mut self,
        m: &serde_json::Map<String, serde_json::Value>,
        path: &str,
    ) -> Result<Schema, SchemaError> {
        use serde_json::Value as J;
        if let Some(r) = m.get("$ref") {
            let r = r
                .as_str()
                .ok_or_else(|| Self::err(path, "$ref must be a string"))?;
            if m.keys()
                .any(|k| k != "$ref" && !ANNOTATIONS.contains(&k.as_str()))
            {
                return Err(Self::err(path, "keywords beside $ref are not supported"));
            }
            let target = r
                .strip_prefix('#')
                .and_then(|p| self.root.pointer(p))
                .ok_or_else(|| {
                    Self::err(path, format!("$ref {r:?} does not point into this schema"))
                })?;
            return self.node(target, &format!("{path}.$ref({r})"));
        }
        for k in [
            "allOf",
            "not",
            "if",
            "then",
            "else",
            "patternProperties",
            "prefixItems",
        ] {
            if m.contains_key(k) {
                return Err(Self::err(path, format!("`{k}` is not supported")));
            }
        }
        // Keywords that replace the whole schema: anything beside them (but `type` beside
        // `enum`/`const`, which the values already satisfy) would be ignored, so it is refused.
        for (k, beside_ok) in [
            ("const", &["type"][..]),
            ("enum", &["type"][..]),
            ("anyOf", &[][..]),
            ("oneOf", &[][..]),
        ] {
            if m.contains_key(k)
                && let Some(other) = m.keys().find(|o| {
                    o.as_str() != k
                        && !beside_ok.contains(&o.as_str())
                        && !ANNOTATIONS.contains(&o.as_str())
                })
            {
                return Err(Self::err(
                    path,
                    format!("`{other}` beside `{k}` is not supported"),
                ));
            }
        }
        if let Some(c) = m.get("const") {
            return self.literals(std::slice::from_ref(c), path);
        }
        if let Some(e) = m.get("enum") {
            let list = e
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| Self::err(path, "enum must be a non-empty list"))?;
            return self.literals(list, path);
        }
        for k in ["anyOf", "oneOf"] {
            if let Some(alts) = m.get(k) {
                let list = alts
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| Self::err(path, format!("{k} must be a non-empty list")))?;
                let mut out = Vec::new();
                for (i, a) in list.iter().enumerate() {
                    out.push(Arc::new(self.node(a, &format!("{path}.{k}[{i}]"))?));
                }
                return Ok(Schema::AnyOf(out));
            }
        }
        let types: Vec<&str> = match m.get("type") {
            None => {
                // No type: infer from the keywords, else anything.
                if m.contains_key("properties") {
                    vec!["object"]
                } else if m.contains_key("items") {
                    vec!["array"]
                } else {
                    vec![]
                }
            }
            Some(J::String(t)) => vec![t.as_str()],
            Some(J::Array(ts)) => ts
                .iter()
                .map(|t| {
                    t.as_str()
                        .ok_or_else(|| Self::err(path, "type must name types"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(Self::err(path, "type must be a string or a list")),
        };
        let mut known: Vec<&str> = vec!["type"];
        let mut alts = Vec::new();
        for t in &types {
            let s = match *t {
                "null" => Schema::Null,
                "boolean" => Schema::Bool,
                "integer" | "number" => {
                    known.extend([
                        "minimum",
                        "maximum",
                        "exclusiveMinimum",
                        "exclusiveMaximum",
                        "multipleOf",
                    ]);
                    for k in [
                        "minimum",
                        "maximum",
                        "exclusiveMinimum",
                        "exclusiveMaximum",
                        "multipleOf",
                    ] {
                        if m.contains_key(k) {
                            return Err(Self::err(path, format!("`{k}` is not supported")));
                        }
                    }
                    if *t == "integer" {
                        Schema::Integer
                    } else {
                        Schema::Number
                    }
                }
                "string" => {
                    known.extend(["minLength", "maxLength"]);
                    for k in ["pattern", "format", "contentEncoding", "contentMediaType"] {
                        if m.contains_key(k) {
                            return Err(Self::err(path, format!("`{k}` is not supported")));
                        }
                    }
                    let len = |k: &str| -> Result<Option<usize>, SchemaError> {
                        match m.get(k) {
                            None => Ok(None),
                            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                                Self::err(path, format!("{k} must be a non-negative integer"))
                            }),
                        }
                    };
                    Schema::String {
                        min_len: len("minLength")?.unwrap_or(0),
                        max_len: len("maxLength")?,
                    }
                }
                "array" => {
                    known.extend(["items", "minItems", "maxItems"]);
                    if m.contains_key("uniqueItems") && m["uniqueItems"] != J::Bool(false) {
                        return Err(Self::err(path, "`uniqueItems` is not supported"));
                    }
                    known.push("uniqueItems");
                    let items = match m.get("items") {
                        None => Schema::Any,
                        Some(i) => self.node(i, &format!("{path}.items"))?,
                    };
                    let n = |k: &str| -> Result<Option<usize>, SchemaError> {
                        match m.get(k) {
                            None => Ok(None),
                            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                                Self::err(path, format!("{k} must be a non-negative integer"))
                            }),
                        }
                    };
                    let (min, max) = (n("minItems")?.unwrap_or(0), n("maxItems")?);
                    if max.is_some_and(|x| x < min) {
                        return Err(Self::err(path, "maxItems < minItems"));
                    }
                    Schema::Array {
                        items: Arc::new(items),
                        min,
                        max,
                    }
                }
                "object" => {
                    known.extend(["properties", "required", "additionalProperties"]);
                    for k in [
                        "minProperties",
                        "maxProperties",
                        "propertyNames",
                        "dependentRequired",
                        "dependentSchemas",
                        "unevaluatedProperties",
                    ] {
                        if m.contains_key(k) {
                            return Err(Self::err(path, format!("`{k}` is not supported")));
                        }
                    }
                    let mut props = Vec::new();
                    if let Some(p) = m.get("properties") {
                        let p = p
                            .as_object()
                            .ok_or_else(|| Self::err(path, "properties must be an object"))?;
                        for (k, v) in p {
                            if k.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
                                return Err(Self::err(
                                    path,
                                    format!(
                                        "property name {k:?} needs escaping, which is not supported"
                                    ),
                                ));
                            }
                            props.push((
                                k.clone(),
                                Arc::new(self.node(v, &format!("{path}.properties.{k}"))?),
                            ));
                        }
                    }
                    let required: Vec<String> = match m.get("required") {
                        None => Vec::new(),
                        Some(J::Array(r)) => r
                            .iter()
                            .map(|x| {
                                x.as_str()
                                    .map(str::to_string)
                                    .ok_or_else(|| Self::err(path, "required must list names"))
                            })
                            .collect::<Result<_, _>>()?,
                        Some(_) => return Err(Self::err(path, "required must be a list")),
                    };
                    // Generating only the declared properties is always valid, so extra
                    // ones are produced only when the schema asks for them explicitly.
                    let additional = match m.get("additionalProperties") {
                        None | Some(J::Bool(false)) => None,
                        Some(J::Bool(true)) => Some(Arc::new(Schema::Any)),
                        Some(s) => Some(Arc::new(
                            self.node(s, &format!("{path}.additionalProperties"))?,
                        )),
                    };
                    for r in &required {
                        if props.iter().any(|(k, _)| k == r) {
                            continue;
                        }
                        // Required but undeclared: it takes the additional schema.
                        let Some(a) = &additional else {
                            return Err(Self::err(
                                path,
                                format!("required property {r:?} is not in properties"),
                            ));
                        };
                        if r.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
                            return Err(Self::err(
                                path,
                                format!(
                                    "property name {r:?} needs escaping, which is not supported"
                                ),
                            ));
                        }
                        props.push((r.clone(), a.clone()));
                    }
                    if props.len() > MAX_PROPS {
                        return Err(Self::err(path, format!("more than {MAX_PROPS} properties")));
                    }
                    Schema::Object {
                        props,
                        required,
                        additional,
                    }
                }
                other => return Err(Self::err(path, format!("unknown type {other:?}"))),
            };
            alts.push(Arc::new(s));
        }
        for k in m.keys() {
            if !known.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()) {
                let why = if types.is_empty() {
                    "is not supported without a type".to_string()
                } else {
                    format!("is not supported for type {}", types.join("/"))
                };
                return Err(Self::err(path, format!("`{k}` {why}")));
            }
        }
        Ok(match alts.len() {
            0 => Schema::Any,
            1 => Arc::try_unwrap(alts.pop().expect("one")).unwrap_or_else(|a| (*a).clone()),
            _ => Schema::AnyOf(alts),
        })
    }
}

/// The compact JSON text of a value, as an `enum`/`const` must appear.
fn canonical(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

#[derive(Clone, Debug, PartialEq)]
enum Num {
    Start,
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

impl Num {
    fn complete(&self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }
}

#[derive(Clone, Debug, PartialEq)]
enum ArrPhase {
    Open,
    AfterValue,
    NeedValue,
}

#[derive(Clone, Debug, PartialEq)]
enum ObjPhase {
    Open,
    Key(Vec<u8>),
    /// After a key: its schema, waiting for ':'.
    Colon(Arc<Schema>),
    AfterValue,
    NeedKey,
}

#[derive(Clone, Debug, PartialEq)]
enum Frame {
    Value(Arc<Schema>),
    Lit {
        text: Arc<Vec<u8>>,
        pos: usize,
    },
    /// Inside one of `set`'s texts: those in `lo..hi` all start with the `pos` bytes
    /// read, and are longer (fields compared first, the set last, for `dedup`).
    Lits {
        pos: usize,
        lo: usize,
        hi: usize,
        set: Arc<LitSet>,
    },
    Str {
        min: usize,
        max: Option<usize>,
        len: usize,
        /// 0: none; 1: after a backslash; 2..=5: hex digits of \u left + 1.
        esc: u8,
        /// UTF-8 continuation bytes still due, and the range of the next one.
        cont: u8,
        next: (u8, u8),
    },
    Num {
        int_only: bool,
        phase: Num,
        n: u8,
    },
    Arr {
        items: Arc<Schema>,
        min: usize,
        max: Option<usize>,
        count: usize,
        phase: ArrPhase,
    },
    Obj {
        schema: Arc<Schema>,
        seen: u64,
        n_extra: usize,
        phase: ObjPhase,
    },
}

#[derive(Clone, Debug, PartialEq)]
struct State {
    stack: Vec<Frame>,
    /// Whitespace bytes since the last token (0: none; 255 marks a newline run).
    ws: u8,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\t')
}

/// Whitespace between tokens is one space, or one newline and up to 20 spaces of
/// indentation (llama.cpp's JSON grammar allows about that), and none before `,` or `:`:
/// enough for compact and pretty-printed JSON, and no room for a small model to fill its
/// budget with blank lines and tabs.
fn ws_next(ws: u8, b: u8) -> Option<u8> {
    const NL: u8 = 0x80;
    match (ws, b) {
        (0, b'\n') => Some(NL),
        (0, b' ') => Some(1),
        (w, b' ') if w & NL != 0 && (w & !NL) < MAX_INDENT => Some(w + 1),
        _ => None,
    }
}

/// Feeds byte `b` to `st`, pushing the resulting states (none: `b` is not allowed).
// Conditions stay inside the arms: as guards, a failed one would fall through to the
// next arm, which for some phases accepts any byte.
#[allow(clippy::collapsible_match)]
fn step(mut st: State, b: u8, out: &mut Vec<State>) {
    if out.len() >= MAX_STATES {
        return;
    }
    let Some(top) = st.stack.last_mut() else {
        return; // the value is complete: nothing may follow
    };
    let ws_ok = ws_next(st.ws, b);
    match top {
        Frame::Value(s) => {
            if is_ws(b) {
                if let Some(w) = ws_ok {
                    st.ws = w;
                    out.push(st);
                }
                return;
            }
            let s = s.clone();
            st.stack.pop();
            let depth = st.stack.len();
            match &*s {
                Schema::AnyOf(alts) => {
                    for a in alts {
                        let mut c = st.clone();
                        c.stack.push(Frame::Value(a.clone()));
                        step(c, b, out);
                    }
                }
                Schema::Literals(set) => {
                    if !set.0.is_empty() {
                        st.stack.push(Frame::Lits {
                            pos: 0,
                            lo: 0,
                            hi: set.0.len(),
                            set: set.clone(),
                        });
                        step(st, b, out);
                    }
                }
                Schema::Seq(parts) => {
                    for p in parts.iter().rev() {
                        st.stack.push(match p {
                            SeqPart::Raw(t) => Frame::Lit {
                                text: Arc::new(t.clone()),
                                pos: 0,
                            },
                            SeqPart::Json(j) => Frame::Value(j.clone()),
                        });
                    }
                    step(st, b, out);
                }
                Schema::Null => lit(st, b"null", b, out),
                Schema::Bool => {
                    lit(st.clone(), b"true", b, out);
                    lit(st, b"false", b, out);
                }
                Schema::Integer | Schema::Number => {
                    st.stack.push(Frame::Num {
                        int_only: matches!(&*s, Schema::Integer),
                        phase: Num::Start,
                        n: 0,
                    });
                    step(st, b, out);
                }
                Schema::String { min_len, max_len } => {
                    if b == b'"' {
                        st.ws = 0;
                        st.stack.push(Frame::Str {
                            min: *min_len,
                            max: *max_len,
                            len: 0,
                            esc: 0,
                            cont: 0,
                            next: (0x80, 0xBF),
                        });
                        out.push(st);
                    }
                }
                Schema::Array { items, min, max } => {
                    if b == b'[' {
                        st.ws = 0;
                        st.stack.push(Frame::Arr {
                            items: items.clone(),
                            min: *min,
                            max: *max,
                            count: 0,
                            phase: ArrPhase::Open,
                        });
                        out.push(st);
                    }
                }
                Schema::Object { .. } => {
                    if b == b'{' {
                        st.ws = 0;
                        st.stack.push(Frame::Obj {
                            schema: s.clone(),
                            seen: 0,
                            n_extra: 0,
                            phase: ObjPhase::Open,
                        });
                        out.push(st);
                    }
                }
                Schema::Any => {
                    let scalar_only = depth >= MAX_DEPTH;
                    let next = match b {
                        b'{' if !scalar_only => Schema::any_object(),
                        b'[' if !scalar_only => Schema::Array {
                            items: Arc::new(Schema::Any),
                            min: 0,
                            max: None,
                        },
                        b'"' => Schema::String {
                            min_len: 0,
                            max_len: None,
                        },
                        b'-' | b'0'..=b'9' => Schema::Number,
                        b't' | b'f' => Schema::Bool,
                        b'n' => Schema::Null,
                        _ => return,
                    };
                    st.stack.push(Frame::Value(Arc::new(next)));
                    step(st, b, out);
                }
            }
        }
        Frame::Lit { text, pos } => {
            if text.get(*pos) == Some(&b) {
                *pos += 1;
                if *pos == text.len() {
                    st.stack.pop();
                }
                st.ws = 0;
                out.push(st);
            }
        }
        Frame::Lits { pos, lo, hi, set } => {
            let (p, lo0, set) = (*pos, *lo, set.clone());
            let texts = &set.0[lo0..*hi];
            let start = lo0 + texts.partition_point(|t| t[p] < b);
            let end = lo0 + texts.partition_point(|t| t[p] <= b);
            if start == end {
                return;
            }
            st.ws = 0;
            // Sorted and distinct: at most one text ends here, the first of the range.
            let mut first = start;
            if set.0[start].len() == p + 1 {
                first += 1;
                let mut done = st.clone();
                done.stack.pop();
                out.push(done);
            }
            if first < end {
                let Some(Frame::Lits { pos, lo, hi, .. }) = st.stack.last_mut() else {
                    unreachable!("the top frame is this one");
                };
                (*pos, *lo, *hi) = (p + 1, first, end);
                out.push(st);
            }
        }
        Frame::Str {
            min,
            max,
            len,
            esc,
            cont,
            next,
        } => {
            if *cont > 0 {
                // Inside a multi-byte character: only its continuation bytes.
                if b < next.0 || b > next.1 {
                    return;
                }
                *cont -= 1;
                *next = (0x80, 0xBF);
                out.push(st);
                return;
            }
            match *esc {
                0 => match b {
                    b'"' => {
                        if *len >= *min {
                            st.stack.pop();
                            st.ws = 0;
                            out.push(st);
                        }
                        return;
                    }
                    // An escape is one character: counted at its backslash, so a
                    // maximum length never leaves an escape unfinishable.
                    b'\\' => {
                        *esc = 1;
                        *len += 1;
                    }
                    0..=0x1f | 0x7f => return,
                    0x20..=0x7e => *len += 1,
                    // Well-formed UTF-8 only (RFC 3629), so the text decodes cleanly.
                    _ => {
                        let (n, lo, hi) = match b {
                            0xC2..=0xDF => (1, 0x80, 0xBF),
                            0xE0 => (2, 0xA0, 0xBF),
                            0xED => (2, 0x80, 0x9F),
                            0xE1..=0xEF => (2, 0x80, 0xBF),
                            0xF0 => (3, 0x90, 0xBF),
                            0xF1..=0xF3 => (3, 0x80, 0xBF),
                            0xF4 => (3, 0x80, 0x8F),
                            _ => return,
                        };
                        *cont = n;
                        *next = (lo, hi);
                        *len += 1;
                    }
                },
                1 => match b {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => *esc = 0,
                    b'u' => *esc = 5,
                    _ => return,
                },
                _ => {
                    if !b.is_ascii_hexdigit() {
                        return;
                    }
                    *esc -= 1;
                    if *esc == 1 {
                        *esc = 0;
                    }
                }
            }
            if max.is_some_and(|m| *len > m) {
                return;
            }
            out.push(st);
        }
        Frame::Num { int_only, phase, n } => {
            let digit = b.is_ascii_digit();
            let next = match (&*phase, b) {
                (Num::Start, b'-') => Some(Num::Minus),
                (Num::Start | Num::Minus, b'0') => Some(Num::Zero),
                (Num::Start | Num::Minus, _) if digit => Some(Num::Int),
                (Num::Int, _) if digit => Some(Num::Int),
                (Num::Zero | Num::Int, b'.') if !*int_only => Some(Num::Dot),
                (Num::Dot | Num::Frac, _) if digit => Some(Num::Frac),
                (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') if !*int_only => Some(Num::Exp),
                (Num::Exp, b'+' | b'-') => Some(Num::ExpSign),
                (Num::Exp | Num::ExpSign | Num::ExpDigits, _) if digit => Some(Num::ExpDigits),
                _ => None,
            };
            match next {
                Some(p) => {
                    *n += 1;
                    // An unfinished number must keep room for the digit that ends it.
                    if *n > MAX_NUM || (!p.complete() && *n == MAX_NUM) {
                        return;
                    }
                    *phase = p;
                    st.ws = 0;
                    out.push(st);
                }
                None => {
                    // The number ended: the byte belongs to what follows.
                    if phase.complete() {
                        st.stack.pop();
                        st.ws = 0;
                        step(st, b, out);
                    }
                }
            }
        }
        Frame::Arr {
            items,
            min,
            max,
            count,
            phase,
        } => {
            if is_ws(b) {
                // After a value only `]` may follow whitespace (no space before `,`).
                let viable = *phase != ArrPhase::AfterValue || *count >= *min;
                if let Some(w) = ws_ok
                    && viable
                {
                    st.ws = w;
                    out.push(st);
                }
                return;
            }
            match (&*phase, b) {
                (ArrPhase::Open | ArrPhase::AfterValue, b']') => {
                    if *count >= *min {
                        st.stack.pop();
                        st.ws = 0;
                        out.push(st);
                    }
                }
                (ArrPhase::AfterValue, b',') => {
                    if st.ws == 0 && max.is_none_or(|m| *count < m) {
                        *phase = ArrPhase::NeedValue;
                        st.ws = 0;
                        out.push(st);
                    }
                }
                (ArrPhase::Open | ArrPhase::NeedValue, _) => {
                    if max.is_some_and(|m| *count >= m) {
                        return;
                    }
                    *count += 1;
                    *phase = ArrPhase::AfterValue;
                    let it = items.clone();
                    st.stack.push(Frame::Value(it));
                    step(st, b, out);
                }
                _ => {}
            }
        }
        Frame::Obj {
            schema,
            seen,
            n_extra,
            phase,
        } => {
            let Schema::Object {
                props,
                required,
                additional,
            } = &**schema
            else {
                return;
            };
            if let ObjPhase::Key(buf) = phase {
                match b {
                    b'"' => {
                        let key = &buf[..];
                        let found = props.iter().position(|(k, _)| k.as_bytes() == key);
                        let target = match found {
                            Some(i) if *seen & (1 << i) == 0 => {
                                *seen |= 1 << i;
                                Some(props[i].1.clone())
                            }
                            Some(_) => None,
                            None if *n_extra < MAX_PROPS => {
                                *n_extra += 1;
                                additional.clone()
                            }
                            None => None,
                        };
                        if let Some(t) = target {
                            *phase = ObjPhase::Colon(t);
                            st.ws = 0;
                            out.push(st);
                        }
                    }
                    b'\\' | 0..=0x1f => {}
                    _ => {
                        buf.push(b);
                        let ok = (additional.is_some() && *n_extra < MAX_PROPS)
                            || props.iter().enumerate().any(|(i, (k, _))| {
                                *seen & (1 << i) == 0 && k.as_bytes().starts_with(buf)
                            });
                        if ok {
                            out.push(st);
                        }
                    }
                }
                return;
            }
            let all_required = required.iter().all(|r| {
                props
                    .iter()
                    .position(|(k, _)| k == r)
                    .is_some_and(|i| *seen & (1 << i) != 0)
            });
            let more_keys = (additional.is_some() && *n_extra < MAX_PROPS)
                || (0..props.len()).any(|i| *seen & (1 << i) == 0);
            if is_ws(b) {
                // Whitespace only where something can still follow it: not before `:`,
                // and after a value only when `}` may close the object.
                let viable = match phase {
                    ObjPhase::Colon(_) => false,
                    ObjPhase::AfterValue => all_required,
                    _ => true,
                };
                if let Some(w) = ws_ok
                    && viable
                {
                    st.ws = w;
                    out.push(st);
                }
                return;
            }
            match (&*phase, b) {
                (ObjPhase::Open | ObjPhase::AfterValue, b'}') => {
                    if all_required {
                        st.stack.pop();
                        st.ws = 0;
                        out.push(st);
                    }
                }
                (ObjPhase::Open | ObjPhase::NeedKey, b'"') => {
                    if more_keys {
                        *phase = ObjPhase::Key(Vec::new());
                        st.ws = 0;
                        out.push(st);
                    }
                }
                (ObjPhase::AfterValue, b',') => {
                    if st.ws == 0 && more_keys {
                        *phase = ObjPhase::NeedKey;
                        st.ws = 0;
                        out.push(st);
                    }
                }
                (ObjPhase::Colon(t), b':') if st.ws == 0 => {
                    let t = t.clone();
                    *phase = ObjPhase::AfterValue;
                    st.ws = 0;
                    st.stack.push(Frame::Value(t));
                    out.push(st);
                }
                _ => {}
            }
        }
    }
}

fn lit(mut st: State, text: &[u8], b: u8, out: &mut Vec<State>) {
    st.stack.push(Frame::Lit {
        text: Arc::new(text.to_vec()),
        pos: 0,
    });
    step(st, b, out);
}

/// Where a constrained output stands: the parser stacks still alive.
#[derive(Clone, Debug)]
pub struct JsonMatcher {
    states: Vec<State>,
}

impl JsonMatcher {
    pub fn new(schema: Arc<Schema>) -> JsonMatcher {
        JsonMatcher {
            states: vec![State {
                stack: vec![Frame::Value(schema)],
                ws: 0,
            }],
        }
    }

    fn advance_states(states: &[State], bytes: &[u8]) -> Vec<State> {
        let mut cur = states.to_vec();
        for &b in bytes {
            let mut next = Vec::with_capacity(cur.len());
            for s in cur {
                step(s, b, &mut next);
            }
            if next.len() > 1 {
                dedup(&mut next);
            }
            if next.is_empty() {
                return next;
            }
            cur = next;
        }
        cur
    }

    /// Whether `bytes` may come next.
    pub fn allows(&self, bytes: &[u8]) -> bool {
        !bytes.is_empty() && !Self::advance_states(&self.states, bytes).is_empty()
    }

    /// Consumes `bytes` (which `allows` accepted).
    pub fn advance(&mut self, bytes: &[u8]) {
        self.states = Self::advance_states(&self.states, bytes);
    }

    /// Whether the output so far is a complete value (so the generation may end).
    pub fn is_complete(&self) -> bool {
        self.states.iter().any(|s| {
            s.stack.iter().rev().all(|f| match f {
                Frame::Num { phase, .. } => phase.complete(),
                _ => false,
            })
        })
    }

    /// Whether anything but the end may follow.
    pub fn can_continue(&self) -> bool {
        self.states.iter().any(|s| !s.stack.is_empty())
    }
}

fn dedup(v: &mut Vec<State>) {
    let mut i = 0;
    while i < v.len() {
        if v[..i].contains(&v[i]) {
            v.swap_remove(i);
        } else {
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn matcher(schema: serde_json::Value) -> JsonMatcher {
        JsonMatcher::new(Arc::new(Schema::compile(&schema).unwrap()))
    }

    fn accepts(m: &JsonMatcher, text: &str) -> bool {
        let mut m = m.clone();
        if !m.allows(text.as_bytes()) {
            return false;
        }
        m.advance(text.as_bytes());
        m.is_complete()
    }

    #[test]
    fn free_json_object() {
        let m = JsonMatcher::new(Arc::new(Schema::any_object()));
        for ok in [
            "{}",
            r#"{"a": 1, "b": [true, null, -2.5e3], "c": {"d": "x\"y\u00e9"}}"#,
            "{\n  \"k\": \"v\"\n}",
            "\n{ \"k\": [ 1,\n    2 ] }",
        ] {
            assert!(accepts(&m, ok), "{ok}");
        }
        // Strings are well-formed UTF-8.
        assert!(accepts(&m, "{\"k\": \"é😀\"}"));
        for bad in [
            &b"{\"k\": \"\xC3\""[..],
            b"{\"k\": \"\xC0\x80\"",
            b"{\"k\": \"\xED\xA0\x80\"",
        ] {
            assert!(!m.allows(bad), "{bad:?}");
        }
        // Blank lines, whitespace runs, and indentation past 20 are not allowed.
        let deep = format!("{{\n{}\"k\": 1}}", " ".repeat(21));
        for bad in [
            "{\n\n\"k\": 1}",
            "{  \"k\": 1}",
            "{ \n\"k\": 1}",
            "{\t\"k\": 1}",
            "{\"k\" : 1}",
            "{\"k\": [1 , 2]}",
            deep.as_str(),
        ] {
            assert!(!accepts(&m, bad), "{bad:?}");
        }
        for bad in [
            "[]",
            "{a:1}",
            r#"{"a":01}"#,
            r#"{"a":1,}"#,
            r#"{"a" 1}"#,
            "{} x",
            r#"{"a":"x"#,
        ] {
            assert!(!accepts(&m, bad), "{bad}");
        }
    }

    #[test]
    fn schema_with_required_enum_and_arrays() {
        let m = matcher(json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 5},
                "age": {"type": "integer"},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
                "kind": {"anyOf": [{"type": "null"}, {"const": 3}]},
            },
            "required": ["name", "tags"],
        }));
        for ok in [
            r#"{"name": "Ann", "tags": ["a"]}"#,
            r#"{"tags": ["b", "a"], "name": "", "age": -12, "kind": null}"#,
            r#"{"name":"Bo","tags":["a"],"kind":3}"#,
        ] {
            assert!(accepts(&m, ok), "{ok}");
        }
        for bad in [
            r#"{"name": "Ann"}"#,                           // missing required
            r#"{"name": "Annabel", "tags": ["a"]}"#,        // too long
            r#"{"name": "A", "tags": []}"#,                 // minItems
            r#"{"name": "A", "tags": ["a","b","a"]}"#,      // maxItems
            r#"{"name": "A", "tags": ["c"]}"#,              // enum
            r#"{"name": "A", "tags": ["a"], "age": 1.5}"#,  // integer
            r#"{"name": "A", "tags": ["a"], "x": 1}"#,      // additional
            r#"{"name": "A", "name": "B", "tags": ["a"]}"#, // duplicate
            r#"{"name": "A", "tags": ["a"], "kind": 4}"#,
        ] {
            assert!(!accepts(&m, bad), "{bad}");
        }
        // Prefixes of valid output are allowed, and are not complete.
        let mut p = m.clone();
        assert!(p.allows(br#"{"na"#));
        p.advance(br#"{"na"#);
        assert!(!p.is_complete() && p.can_continue());
        assert!(!p.allows(b"x"));
    }

    #[test]
    fn refs_and_unsupported_keywords() {
        let m = matcher(json!({
            "$defs": {"pt": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
            "type": "array", "items": {"$ref": "#/$defs/pt"}
        }));
        assert!(accepts(&m, r#"[{"x": 1}, {"x": -0.5}]"#));
        assert!(!accepts(&m, r#"[{"y": 1}]"#));
        for bad in [
            json!({"type": "object", "properties": {"k": {"type": "string"}}, "anyOf": [{"type": "object"}]}),
            json!({"enum": ["a"], "pattern": "a"}),
            json!({"type": "string", "format": "email"}),
            json!({"type": "integer", "minimum": 3}),
            json!({"allOf": [{"type": "string"}]}),
            json!({"type": "object", "foo": 1}),
            json!({"$ref": "#/nowhere"}),
        ] {
            assert!(Schema::compile(&bad).is_err(), "{bad}");
        }
        let e = Schema::compile(
            &json!({"type":"object","properties":{"a":{"type":"string","pattern":"x"}}}),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("schema.properties.a") && e.to_string().contains("pattern"),
            "{e}"
        );
    }

    #[test]
    fn sequences_wrap_values_in_exact_text() {
        let obj = Schema::compile(
            &json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
        )
        .unwrap();
        let m = JsonMatcher::new(Arc::new(Schema::Seq(vec![
            SeqPart::Raw(b"<c>\n".to_vec()),
            SeqPart::Json(Arc::new(obj)),
            SeqPart::Raw(b"\n</c>".to_vec()),
        ])));
        assert!(accepts(&m, "<c>\n{\"a\": 1}\n</c>"));
        assert!(!accepts(&m, "<c>\n{\"a\": 1}"));
        assert!(!accepts(&m, "<c>\n{\"a\": 1}\n\n</c>"));
        assert!(!accepts(&m, "<c>{\"a\": 1}\n</c>"));
    }

    #[test]
    fn required_extra_property_and_size_limit() {
        let m = matcher(
            json!({"type": "object", "required": ["name"], "additionalProperties": {"type": "string"}}),
        );
        assert!(accepts(&m, r#"{"name": "x"}"#));
        assert!(accepts(&m, r#"{"x": "y", "name": "x"}"#));
        assert!(!accepts(&m, r#"{"x": "y"}"#));
        // Typed enums are fine.
        assert!(Schema::compile(&json!({"type": "string", "enum": ["a", "b"]})).is_ok());
        // $refs doubling at every level: refused, not expanded 2^30 times.
        let mut defs = serde_json::Map::new();
        for i in 0..30 {
            defs.insert(format!("a{i}"), json!({"anyOf": [{"$ref": format!("#/$defs/a{}", i + 1)}, {"$ref": format!("#/$defs/a{}", i + 1)}]}));
        }
        defs.insert("a30".into(), json!({"type": "null"}));
        let e = Schema::compile(&json!({"$defs": defs, "$ref": "#/$defs/a0"})).unwrap_err();
        assert!(e.msg.contains("too large"), "{e}");
    }

    /// Issue 21: every literal of a large enum stays reachable (the parser stacks used to
    /// be cut at 256, dropping the rest), and a token costs a few binary searches, not a
    /// pass over every literal.
    #[test]
    fn large_enums_are_exact_and_cheap() {
        let values: Vec<serde_json::Value> = (0..19_000)
            .map(|i| json!(format!("value-{i}")))
            .chain([json!(7), json!(70), json!(null), json!("value-1")])
            .collect();
        let m = matcher(json!({"enum": values}));
        for ok in [
            "\"value-18999\"",
            "\"value-0\"",
            "\"value-1\"",
            "7",
            "70",
            "null",
        ] {
            assert!(accepts(&m, ok), "{ok}");
        }
        for bad in [
            "\"value-19000\"",
            "\"value-\"",
            "\"value-1",
            "8",
            "700",
            "nul",
        ] {
            assert!(!accepts(&m, bad), "{bad}");
        }
        // "7" is complete and may also go on to "70".
        let mut p = m.clone();
        p.advance(b"7");
        assert!(p.is_complete() && p.can_continue());
        // Masking a vocabulary of 50k pieces after the opening quote: well under a
        // second (it took minutes when each piece was checked against every literal).
        let mut q = m.clone();
        q.advance(b"\"value-1");
        let pieces: Vec<Vec<u8>> = (0..50_000u32)
            .map(|i| format!("{}", i % 1000).into_bytes())
            .collect();
        let t = std::time::Instant::now();
        let n = pieces.iter().filter(|p| q.allows(p)).count();
        assert!(n > 0);
        assert!(t.elapsed().as_secs_f64() < 5.0, "{:?}", t.elapsed());
    }

    #[test]
    fn literal_count_and_size_are_limited() {
        let many: Vec<serde_json::Value> = (0..MAX_NODES).map(|i| json!(i)).collect();
        let e = Schema::compile(&json!({"enum": many})).unwrap_err();
        assert!(e.msg.contains("20000") && e.msg.contains("enum"), "{e}");
        let big: Vec<serde_json::Value> = (0..1000).map(|i| json!(format!("{i:0300}"))).collect();
        let e = Schema::compile(&json!({"type": "object", "properties": {"k": {"enum": big}}}))
            .unwrap_err();
        assert!(
            e.msg.contains("bytes") && e.path == "schema.properties.k",
            "{e}"
        );
        // A big enum behind a $ref used many times counts each time.
        let mid: Vec<serde_json::Value> = (0..5000).map(|i| json!(i)).collect();
        let e = Schema::compile(&json!({
            "$defs": {"e": {"enum": mid}},
            "type": "array", "items": {"anyOf": [
                {"$ref": "#/$defs/e"}, {"$ref": "#/$defs/e"}, {"$ref": "#/$defs/e"},
                {"$ref": "#/$defs/e"}, {"$ref": "#/$defs/e"}]}
        }))
        .unwrap_err();
        assert!(e.msg.contains("too large"), "{e}");
    }

    /// Issue 21: out-of-range array bounds were silently ignored.
    #[test]
    fn array_bounds_must_be_non_negative_integers() {
        for (k, v) in [
            ("maxItems", json!(-1)),
            ("minItems", json!(1e12)),
            ("minItems", json!("2")),
            ("maxItems", json!(1.5)),
        ] {
            let mut sc = json!({"type": "array"});
            sc[k] = v;
            let e = Schema::compile(&sc).unwrap_err();
            assert!(
                e.msg.contains(k) && e.msg.contains("non-negative integer"),
                "{e}"
            );
        }
        assert!(Schema::compile(&json!({"type": "array", "minItems": 1, "maxItems": 3})).is_ok());
    }

    #[test]
    fn top_level_numbers_end_at_the_end() {
        let m = matcher(json!({"type": "integer"}));
        assert!(accepts(&m, "42"));
        assert!(!accepts(&m, "4.2"));
        assert!(!accepts(&m, "-"));
        let m = matcher(json!({"type": "number"}));
        assert!(accepts(&m, "-0.5e+3"));
        assert!(!accepts(&m, "1e"));
    }

    /// Random walks over allowed bytes never reach a state where nothing may follow but
    /// the value is not complete: the sampler can always continue a constrained output.
    #[test]
    fn no_dead_ends() {
        let schemas = [
            json!({"type": "object", "properties": {
                "a": {"type": "integer"}, "b": {"type": "array", "items": {"type": "number"}, "minItems": 1},
                "c": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]},
                "d": {"enum": ["x", 10, 1, [1]]}}, "required": ["a", "b"]}),
            json!({"type": "array", "items": {"type": "object"}, "minItems": 2, "maxItems": 3}),
            json!(true),
        ];
        let alphabet: Vec<u8> = (0x20u8..0x7f).chain([b'\n']).collect();
        let mut seed = 0x2545F4914F6CDD1Du64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for sc in &schemas {
            let m0 = matcher(sc.clone());
            for _ in 0..200 {
                let mut m = m0.clone();
                for _ in 0..300 {
                    let ok: Vec<u8> = alphabet
                        .iter()
                        .copied()
                        .filter(|&b| m.allows(&[b]))
                        .collect();
                    if ok.is_empty() {
                        assert!(m.is_complete(), "dead end for {sc}: {:?}", m.states);
                        break;
                    }
                    let b = ok[rand() as usize % ok.len()];
                    m.advance(&[b]);
                }
            }
        }
    }
}
