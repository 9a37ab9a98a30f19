//! Request bodies of the OpenAI and Mistral APIs, validated field by field so that every
//! error names its parameter, and no field is silently ignored: a field brise does not
//! know is a 400, and one it knows but cannot honour yet is a 400 saying so.

use crate::error::{ApiError, ApiResult};
use brise_engine::json::Schema;
use brise_model::chat::Message;
use serde_json::{Map, Value};
use std::sync::Arc;

/// Mistral's guardrail prompt for `safe_prompt: true`.
pub const MISTRAL_SAFE_PROMPT: &str = "Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity.";

/// Generation parameters shared by chat and text completions. `None` means the model's
/// default.
#[derive(Debug, Default, Clone)]
pub struct GenParams {
    pub model: String,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub logit_bias: Vec<(u32, f32)>,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// End-user identifier (OpenAI `user`); recorded, never used for generation.
    pub user: Option<String>,
    pub metadata: Option<Map<String, Value>>,
    /// Log probabilities of the generated tokens, with this many alternatives each.
    pub logprobs: Option<usize>,
    /// Mistral's `min_tokens`: no end of generation before this many tokens.
    pub min_tokens: usize,
    /// brise's `adapter`: a LoRA adapter of the model, by name (or `model` = `id:name`).
    pub adapter: Option<String>,
}

pub struct ChatRequest {
    pub params: GenParams,
    pub messages: Vec<Message>,
    /// `response_format` json_object / json_schema: the output's constraint.
    pub json: Option<Arc<Schema>>,
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
}

/// A function the model may call.
#[derive(Clone, Debug)]
pub struct Tool {
    pub name: String,
    /// JSON Schema of the arguments (`{"type": "object"}` when absent).
    pub parameters: Value,
    /// The tool as the chat template receives it (OpenAI's shape).
    pub raw: Value,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    /// OpenAI's `required`, Mistral's `any`: some call.
    Required,
    Named(String),
}

fn tools(v: Option<Value>) -> ApiResult<Vec<Tool>> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    let Value::Array(list) = v else {
        return Err(ApiError::param("tools", "tools must be a list"));
    };
    let mut out: Vec<Tool> = Vec::new();
    for (i, t) in list.into_iter().enumerate() {
        let at = format!("tools[{i}]");
        if let Some(k) = t
            .as_object()
            .and_then(|o| o.keys().find(|k| *k != "type" && *k != "function"))
        {
            return Err(ApiError::unknown_param(&format!("{at}.{k}")));
        }
        if t.get("type").and_then(|x| x.as_str()) != Some("function") {
            return Err(ApiError::param(
                &format!("{at}.type"),
                "only tools of type \"function\" exist",
            ));
        }
        let Some(Value::Object(func)) = t.get("function") else {
            return Err(ApiError::param(
                &format!("{at}.function"),
                "a tool needs a function object",
            ));
        };
        let name = func
            .get("name")
            .and_then(|n| n.as_str())
            .filter(|n| {
                !n.is_empty()
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            })
            .ok_or_else(|| {
                ApiError::param(
                    &format!("{at}.function.name"),
                    "a function needs a name of letters, digits, _ - .",
                )
            })?
            .to_string();
        if out.iter().any(|o| o.name == name) {
            return Err(ApiError::param(
                &format!("{at}.function.name"),
                format!("two tools are named {name:?}"),
            ));
        }
        let parameters = match func.get("parameters") {
            None | Some(Value::Null) => serde_json::json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                return Err(ApiError::param(
                    &format!("{at}.function.parameters"),
                    "parameters must be a JSON Schema object",
                ));
            }
        };
        for k in func.keys() {
            if !["name", "description", "parameters", "strict"].contains(&k.as_str()) {
                return Err(ApiError::unknown_param(&format!("{at}.function.{k}")));
            }
        }
        out.push(Tool {
            name,
            parameters,
            raw: t,
        });
    }
    Ok(out)
}

fn tool_choice(v: Option<Value>, tools: &[Tool]) -> ApiResult<ToolChoice> {
    let c = match v {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" | "any" => ToolChoice::Required,
            other => {
                return Err(ApiError::param(
                    "tool_choice",
                    format!("tool_choice {other:?} is not none, auto, required, any or a function"),
                ));
            }
        },
        Some(Value::Object(o)) => {
            if o.get("type").and_then(|t| t.as_str()) != Some("function") {
                return Err(ApiError::param(
                    "tool_choice",
                    "a named tool_choice needs \"type\": \"function\"",
                ));
            }
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(|n| n.as_str())
                .ok_or_else(|| ApiError::param("tool_choice", "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": …}}"))?;
            ToolChoice::Named(name.to_string())
        }
        Some(_) => {
            return Err(ApiError::param(
                "tool_choice",
                "tool_choice must be a string or an object",
            ));
        }
    };
    match &c {
        ToolChoice::Required if tools.is_empty() => Err(ApiError::param(
            "tool_choice",
            "tool_choice requires a call but no tools were given",
        )),
        ToolChoice::Named(n) if !tools.iter().any(|t| &t.name == n) => Err(ApiError::param(
            "tool_choice",
            format!("tool_choice names {n:?}, which is not in tools"),
        )),
        _ => Ok(c),
    }
}

pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

pub struct CompletionRequest {
    pub params: GenParams,
    pub prompts: Vec<PromptInput>,
    pub echo: bool,
    /// Fill in the middle: the text after the completion.
    pub suffix: Option<String>,
}

pub struct FimRequest {
    pub params: GenParams,
    pub prompt: String,
    pub suffix: String,
}

/// Mistral's FIM body: `model`, `prompt`, `suffix` and the sampling parameters.
pub fn parse_fim(body: &[u8], n_vocab: impl Fn(&str) -> usize) -> ApiResult<FimRequest> {
    let mut f = Fields::parse(body)?;
    let model = f
        .map
        .get("model")
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .to_string();
    let params = gen_params(&mut f, n_vocab(&model))?;
    let prompt = f
        .string("prompt")?
        .ok_or_else(|| ApiError::param("prompt", "you must provide a prompt"))?;
    let suffix = f.string("suffix")?.unwrap_or_default();
    f.finish()?;
    Ok(FimRequest {
        params,
        prompt,
        suffix,
    })
}

/// A JSON object being consumed field by field.
pub struct Fields {
    map: Map<String, Value>,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Fields {
    pub fn parse(body: &[u8]) -> ApiResult<Fields> {
        let v: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!(
                "We could not parse the JSON body of your request: {e}"
            ))
        })?;
        match v {
            Value::Object(map) => Ok(Fields { map }),
            other => Err(ApiError::bad_request(format!(
                "the request body must be a JSON object, not {}",
                type_name(&other)
            ))),
        }
    }

    /// Takes a field out, unchecked, for a route that reads it itself.
    pub fn remove(&mut self, k: &str) -> Option<Value> {
        self.map.remove(k)
    }

    /// The fields left, as a JSON body.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(&self.map).unwrap_or_default()
    }

    /// Whether the field is present (even as null).
    pub fn has(&self, k: &str) -> bool {
        self.map.contains_key(k)
    }

    /// Removes a field; JSON null counts as absent.
    pub fn take(&mut self, k: &str) -> Option<Value> {
        self.map.remove(k).filter(|v| !v.is_null())
    }

    pub fn f32(&mut self, k: &str) -> ApiResult<Option<f32>> {
        match self.take(k) {
            None => Ok(None),
            // Finite as an f32 too: 1e300 would become infinity.
            Some(Value::Number(n)) => match n.as_f64() {
                Some(x) if x.is_finite() && (x as f32).is_finite() => Ok(Some(x as f32)),
                _ => Err(ApiError::param(
                    k,
                    format!("{k} must be a finite number (at most about 3.4e38 in magnitude)"),
                )),
            },
            Some(v) => Err(ApiError::param(
                k,
                format!("{k} must be a number, not {}", type_name(&v)),
            )),
        }
    }

    pub fn f32_in(&mut self, k: &str, lo: f32, hi: f32) -> ApiResult<Option<f32>> {
        let v = self.f32(k)?;
        if let Some(x) = v
            && !(lo..=hi).contains(&x)
        {
            return Err(ApiError::param(
                k,
                format!("{k} = {x} is out of range: it must be between {lo} and {hi}"),
            ));
        }
        Ok(v)
    }

    pub fn i64(&mut self, k: &str) -> ApiResult<Option<i64>> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| ApiError::param(k, format!("{k} must be an integer"))),
            Some(v) => Err(ApiError::param(
                k,
                format!("{k} must be an integer, not {}", type_name(&v)),
            )),
        }
    }

    pub fn u64(&mut self, k: &str) -> ApiResult<Option<u64>> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| ApiError::param(k, format!("{k} must be a non-negative integer"))),
            Some(v) => Err(ApiError::param(
                k,
                format!("{k} must be an integer, not {}", type_name(&v)),
            )),
        }
    }

    pub fn bool(&mut self, k: &str) -> ApiResult<Option<bool>> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(v) => Err(ApiError::param(
                k,
                format!("{k} must be a boolean, not {}", type_name(&v)),
            )),
        }
    }

    pub fn string(&mut self, k: &str) -> ApiResult<Option<String>> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ApiError::param(
                k,
                format!("{k} must be a string, not {}", type_name(&v)),
            )),
        }
    }

    /// Every field left over is unknown.
    pub fn finish(self) -> ApiResult<()> {
        match self.map.into_iter().find(|(_, v)| !v.is_null()) {
            Some((k, _)) => Err(ApiError::unknown_param(&k)),
            None => Ok(()),
        }
    }
}

fn positive(k: &str, v: Option<u64>) -> ApiResult<Option<usize>> {
    match v {
        Some(0) => Err(ApiError::param(k, format!("{k} must be at least 1"))),
        Some(x) => Ok(Some(x as usize)),
        None => Ok(None),
    }
}

/// The parameters common to chat and text completions.
fn gen_params(f: &mut Fields, n_vocab: usize) -> ApiResult<GenParams> {
    let model = f
        .string("model")?
        .ok_or_else(|| ApiError::param("model", "you must provide a model parameter"))?;
    let temperature = f.f32("temperature")?;
    if let Some(t) = temperature
        && t < 0.0
    {
        return Err(ApiError::param(
            "temperature",
            format!("temperature = {t} is out of range: it must be ≥ 0"),
        ));
    }
    let top_p = f.f32("top_p")?;
    if let Some(p) = top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::param(
            "top_p",
            format!("top_p = {p} is out of range: it must be in (0, 1]"),
        ));
    }
    let top_k = match f.i64("top_k")? {
        None => None,
        // vLLM's -1 and llama.cpp's 0 both mean "off".
        Some(-1) | Some(0) => Some(0),
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::param(
                "top_k",
                format!("top_k = {k} must be ≥ 0 (0 or -1 disables it)"),
            ));
        }
    };
    let min_p = f.f32_in("min_p", 0.0, 1.0)?;
    let presence_penalty = f.f32_in("presence_penalty", -2.0, 2.0)?;
    let frequency_penalty = f.f32_in("frequency_penalty", -2.0, 2.0)?;
    let mut repeat_penalty = None;
    for k in ["repetition_penalty", "repeat_penalty"] {
        if let Some(r) = f.f32(k)? {
            if r <= 0.0 {
                return Err(ApiError::param(k, format!("{k} = {r} must be > 0")));
            }
            repeat_penalty = Some(r);
        }
    }
    let seed = match (f.i64("seed")?, f.i64("random_seed")?) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::param(
                "random_seed",
                "seed and random_seed are both set, to different values",
            ));
        }
        (a, b) => a.or(b).map(|s| s as u64),
    };
    let logit_bias = match f.take("logit_bias") {
        None => Vec::new(),
        Some(Value::Object(m)) => {
            let mut out = Vec::new();
            for (k, v) in m {
                let id: u32 = k.parse().ok().filter(|&i| (i as usize) < n_vocab).ok_or_else(|| {
                    ApiError::param(
                        "logit_bias",
                        format!("logit_bias key {k:?} is not a token id of this model (0..{n_vocab})"),
                    )
                })?;
                let b = v
                    .as_f64()
                    .filter(|b| (-100.0..=100.0).contains(b))
                    .ok_or_else(|| {
                        ApiError::param(
                            "logit_bias",
                            format!("logit_bias[{k}] must be a number between -100 and 100"),
                        )
                    })?;
                out.push((id, b as f32));
            }
            out
        }
        Some(v) => {
            return Err(ApiError::param(
                "logit_bias",
                format!(
                    "logit_bias must be an object of token id → bias, not {}",
                    type_name(&v)
                ),
            ));
        }
    };
    let max_tokens = positive("max_tokens", f.u64("max_tokens")?)?;
    let max_completion = positive("max_completion_tokens", f.u64("max_completion_tokens")?)?;
    let max_tokens = match (max_tokens, max_completion) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::param(
                "max_completion_tokens",
                "max_tokens and max_completion_tokens are both set, to different values",
            ));
        }
        (a, b) => b.or(a),
    };
    let stop = match f.take("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => {
            let mut out = Vec::new();
            for v in a {
                match v {
                    Value::String(s) => out.push(s),
                    _ => {
                        return Err(ApiError::param(
                            "stop",
                            "stop must be a string or a list of strings",
                        ));
                    }
                }
            }
            out
        }
        Some(_) => {
            return Err(ApiError::param(
                "stop",
                "stop must be a string or a list of strings",
            ));
        }
    };
    if stop.len() > 16 {
        return Err(ApiError::param("stop", "at most 16 stop sequences"));
    }
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::param("stop", "stop sequences must not be empty"));
    }
    let min_tokens = f.u64("min_tokens")?.unwrap_or(0) as usize;
    let n = positive("n", f.u64("n")?)?.unwrap_or(1);
    if n > 16 {
        return Err(ApiError::param("n", format!("n = {n}: at most 16 choices")));
    }
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.take("stream_options") {
        None => false,
        Some(Value::Object(mut m)) => {
            let iu = match m.remove("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => b,
                Some(_) => {
                    return Err(ApiError::param(
                        "stream_options",
                        "stream_options.include_usage must be a boolean",
                    ));
                }
            };
            if let Some(k) = m.keys().next() {
                return Err(ApiError::unknown_param(&format!("stream_options.{k}")));
            }
            if !stream {
                return Err(ApiError::param(
                    "stream_options",
                    "stream_options is only allowed with stream: true",
                ));
            }
            iu
        }
        Some(_) => {
            return Err(ApiError::param(
                "stream_options",
                "stream_options must be an object",
            ));
        }
    };
    let user = f.string("user")?;
    let adapter = f.string("adapter")?;
    let metadata = match f.take("metadata") {
        None => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => return Err(ApiError::param("metadata", "metadata must be an object")),
    };
    Ok(GenParams {
        model,
        temperature,
        top_p,
        top_k,
        min_p,
        repeat_penalty,
        presence_penalty,
        frequency_penalty,
        seed,
        logit_bias,
        max_tokens,
        stop,
        n,
        stream,
        include_usage,
        user,
        metadata,
        logprobs: None,
        min_tokens,
        adapter,
    })
}

/// Chat's `logprobs: bool` and `top_logprobs: 0..=20`.
fn chat_logprobs(f: &mut Fields) -> ApiResult<Option<usize>> {
    let on = f.bool("logprobs")?.unwrap_or(false);
    let top = f.u64("top_logprobs")?;
    match (on, top) {
        (_, Some(t)) if t > 20 => Err(ApiError::param(
            "top_logprobs",
            format!("top_logprobs = {t}: at most 20"),
        )),
        (false, Some(_)) => Err(ApiError::param(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        )),
        (true, t) => Ok(Some(t.unwrap_or(0) as usize)),
        (false, None) => Ok(None),
    }
}

fn content_text(v: Value, at: &str) -> ApiResult<String> {
    match v {
        Value::String(s) => Ok(s),
        Value::Array(parts) => {
            let mut out = String::new();
            for (j, p) in parts.into_iter().enumerate() {
                let ty = p.get("type").and_then(|t| t.as_str()).unwrap_or("");
                match (ty, p.get("text").and_then(|t| t.as_str())) {
                    ("text", Some(t)) => out.push_str(t),
                    ("text", None) => {
                        return Err(ApiError::param(
                            &format!("{at}[{j}].text"),
                            "a text part needs a string `text`",
                        ));
                    }
                    (other, _) => {
                        return Err(ApiError::unsupported(
                            &format!("{at}[{j}].type"),
                            &format!("content of type {other:?} (only text is)"),
                        ));
                    }
                }
            }
            Ok(out)
        }
        other => Err(ApiError::param(
            at,
            format!(
                "content must be a string or a list of text parts, not {}",
                type_name(&other)
            ),
        )),
    }
}

fn messages(v: Value) -> ApiResult<Vec<Message>> {
    let Value::Array(list) = v else {
        return Err(ApiError::param("messages", "messages must be a list"));
    };
    if list.is_empty() {
        return Err(ApiError::param("messages", "messages must not be empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.into_iter().enumerate() {
        let at = format!("messages[{i}]");
        let Value::Object(obj) = m else {
            return Err(ApiError::param(&at, "each message must be an object"));
        };
        let mut f = Fields { map: obj };
        let role = f
            .string("role")
            .map_err(|_| ApiError::param(&format!("{at}.role"), "role must be a string"))?
            .ok_or_else(|| ApiError::param(&format!("{at}.role"), "each message needs a role"))?;
        let role = match role.as_str() {
            "system" | "user" | "assistant" | "tool" => role,
            // OpenAI's newer name for system instructions.
            "developer" => "system".to_string(),
            other => {
                return Err(ApiError::param(
                    &format!("{at}.role"),
                    format!(
                        "role {other:?} is not one of system, developer, user, assistant, tool"
                    ),
                ));
            }
        };
        // Clients send arguments as JSON text; templates expect the object.
        let tool_calls = f.take("tool_calls").map(|mut tc| {
            if let Value::Array(calls) = &mut tc {
                for c in calls {
                    if let Some(a) = c.pointer_mut("/function/arguments")
                        && let Some(parsed) = a
                            .as_str()
                            .and_then(|s| serde_json::from_str::<Value>(s).ok())
                    {
                        *a = parsed;
                    }
                }
            }
            tc
        });
        let content = match f.take("content") {
            Some(c) => content_text(c, &format!("{at}.content"))?,
            None if role == "assistant" && tool_calls.is_some() => String::new(),
            None => {
                return Err(ApiError::param(
                    &format!("{at}.content"),
                    "a message needs content",
                ));
            }
        };
        let name = f
            .string("name")
            .map_err(|_| ApiError::param(&format!("{at}.name"), "name must be a string"))?;
        let tool_call_id = f.string("tool_call_id").map_err(|_| {
            ApiError::param(
                &format!("{at}.tool_call_id"),
                "tool_call_id must be a string",
            )
        })?;
        let prefix = f
            .bool("prefix")
            .map_err(|_| ApiError::param(&format!("{at}.prefix"), "prefix must be a boolean"))?;
        if prefix == Some(true) {
            return Err(ApiError::unsupported(
                &format!("{at}.prefix"),
                "continuing an assistant prefix",
            ));
        }
        if let Some(k) = f.map.keys().find(|k| !f.map[*k].is_null()).cloned() {
            return Err(ApiError::unknown_param(&format!("{at}.{k}")));
        }
        out.push(Message {
            role,
            content,
            tool_calls,
            tool_call_id,
            name,
        });
    }
    Ok(out)
}

/// `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`.
fn response_format(m: Map<String, Value>) -> ApiResult<Option<Arc<Schema>>> {
    let mut f = Fields { map: m };
    let ty = f
        .string("type")
        .map_err(|_| ApiError::param("response_format.type", "type must be a string"))?
        .ok_or_else(|| ApiError::param("response_format.type", "response_format needs a type"))?;
    let out = match ty.as_str() {
        "text" => None,
        "json_object" => Some(Arc::new(Schema::any_object())),
        "json_schema" => {
            let Some(Value::Object(js)) = f.take("json_schema") else {
                return Err(ApiError::param(
                    "response_format.json_schema",
                    "json_schema must be an object with a `schema`",
                ));
            };
            let mut g = Fields { map: js };
            let at = "response_format.json_schema";
            g.string("name")
                .map_err(|_| ApiError::param(&format!("{at}.name"), "name must be a string"))?;
            g.string("description").map_err(|_| {
                ApiError::param(&format!("{at}.description"), "description must be a string")
            })?;
            // brise always enforces the schema, so strict or not, the output matches it.
            g.bool("strict").map_err(|_| {
                ApiError::param(&format!("{at}.strict"), "strict must be a boolean")
            })?;
            let schema = g.take("schema").ok_or_else(|| {
                ApiError::param(&format!("{at}.schema"), "json_schema needs a schema")
            })?;
            if let Some(k) = g.map.keys().find(|k| !g.map[*k].is_null()).cloned() {
                return Err(ApiError::unknown_param(&format!("{at}.{k}")));
            }
            let compiled = Schema::compile(&schema).map_err(|e| ApiError {
                code: Some("unsupported_schema"),
                ..ApiError::param(
                    &format!("{at}.schema"),
                    format!("brise cannot enforce this schema: {e}"),
                )
            })?;
            Some(Arc::new(compiled))
        }
        other => {
            return Err(ApiError::param(
                "response_format.type",
                format!(
                    "response_format type {other:?} is not one of text, json_object, json_schema"
                ),
            ));
        }
    };
    if let Some(k) = f.map.keys().find(|k| !f.map[*k].is_null()).cloned() {
        return Err(ApiError::unknown_param(&format!("response_format.{k}")));
    }
    Ok(out)
}

pub fn parse_chat(body: &[u8], n_vocab: impl Fn(&str) -> usize) -> ApiResult<ChatRequest> {
    let mut f = Fields::parse(body)?;
    let model = f
        .map
        .get("model")
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .to_string();
    let mut params = gen_params(&mut f, n_vocab(&model))?;
    let msgs = f
        .take("messages")
        .ok_or_else(|| ApiError::param("messages", "you must provide messages"))?;
    let mut messages = messages(msgs)?;
    params.logprobs = chat_logprobs(&mut f)?;
    let tools = tools(f.take("tools"))?;
    let tool_choice = tool_choice(f.take("tool_choice"), &tools)?;
    // One forced call at most; in `auto` the model may write several, all returned.
    f.bool("parallel_tool_calls")?;
    let json = match f.take("response_format") {
        None => None,
        Some(Value::Object(m)) => response_format(m)?,
        Some(_) => {
            return Err(ApiError::param(
                "response_format",
                "response_format must be an object",
            ));
        }
    };
    if f.bool("safe_prompt")?.unwrap_or(false) {
        match messages.first_mut() {
            Some(m) if m.role == "system" => {
                m.content = format!("{MISTRAL_SAFE_PROMPT}\n\n{}", m.content);
            }
            _ => messages.insert(0, Message::new("system", MISTRAL_SAFE_PROMPT)),
        }
    }
    if let Some(p) = f.take("prediction") {
        return Err(ApiError::unsupported(
            "prediction",
            &format!("predicted outputs ({p})"),
        ));
    }
    match f.string("prompt_mode")? {
        None => {}
        Some(m) => {
            return Err(ApiError::unsupported(
                "prompt_mode",
                &format!("prompt_mode {m:?}"),
            ));
        }
    }
    f.finish()?;
    params.model = model;
    if json.is_some() && !tools.is_empty() && tool_choice != ToolChoice::None {
        return Err(ApiError::param(
            "response_format",
            "response_format and tools cannot constrain the same answer",
        ));
    }
    Ok(ChatRequest {
        params,
        messages,
        json,
        tools,
        tool_choice,
    })
}

pub fn parse_completion(
    body: &[u8],
    n_vocab: impl Fn(&str) -> usize,
) -> ApiResult<CompletionRequest> {
    let mut f = Fields::parse(body)?;
    let model = f
        .map
        .get("model")
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .to_string();
    let nv = n_vocab(&model);
    let params = gen_params(&mut f, nv)?;
    let tokens = |a: &[Value]| -> ApiResult<Vec<u32>> {
        a.iter()
            .map(|t| {
                t.as_u64()
                    .filter(|&t| (t as usize) < nv)
                    .map(|t| t as u32)
                    .ok_or_else(|| {
                        ApiError::param("prompt", format!("{t} is not a token id of this model"))
                    })
            })
            .collect()
    };
    let prompts = match f.take("prompt") {
        None => return Err(ApiError::param("prompt", "you must provide a prompt")),
        Some(Value::String(s)) => vec![PromptInput::Text(s)],
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::param("prompt", "prompt must not be empty"));
        }
        Some(Value::Array(a)) if a.iter().all(|v| v.is_string()) => a
            .into_iter()
            .map(|v| PromptInput::Text(v.as_str().unwrap_or_default().to_string()))
            .collect(),
        Some(Value::Array(a)) if a.iter().all(|v| v.is_number()) => {
            vec![PromptInput::Tokens(tokens(&a)?)]
        }
        Some(Value::Array(a)) if a.iter().all(|v| v.is_array()) => a
            .iter()
            .map(|v| {
                tokens(v.as_array().map(|x| x.as_slice()).unwrap_or(&[])).map(PromptInput::Tokens)
            })
            .collect::<ApiResult<_>>()?,
        Some(_) => {
            return Err(ApiError::param(
                "prompt",
                "prompt must be a string, a list of strings, a list of token ids, or a list of those",
            ));
        }
    };
    if prompts.len() * params.n > 16 {
        return Err(ApiError::param(
            "prompt",
            "at most 16 choices (prompts × n) per request",
        ));
    }
    let echo = f.bool("echo")?.unwrap_or(false);
    let suffix = f.string("suffix")?;
    let mut params = params;
    params.logprobs = match f.u64("logprobs")? {
        Some(n) if n > 5 => {
            return Err(ApiError::param(
                "logprobs",
                format!("logprobs = {n}: at most 5"),
            ));
        }
        n => n.map(|n| n as usize),
    };
    if let Some(b) = f.u64("best_of")?
        && b != 1
    {
        return Err(ApiError::unsupported("best_of", "best_of > 1"));
    }
    f.finish()?;
    Ok(CompletionRequest {
        params,
        prompts,
        echo,
        suffix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> ApiResult<ChatRequest> {
        parse_chat(body.as_bytes(), |_| 1000)
    }

    fn param_of(r: ApiResult<ChatRequest>) -> String {
        r.err().expect("should fail").param.unwrap_or_default()
    }

    #[test]
    fn parses_a_full_chat_request() {
        let r = chat(
            r#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
            "temperature":0.5,"top_p":0.9,"top_k":-1,"max_tokens":7,"stop":"x","seed":3,"n":2,
            "stream":true,"stream_options":{"include_usage":true},"logit_bias":{"5":-100},"user":"u","metadata":{"a":1}}"#,
        )
        .unwrap();
        let p = &r.params;
        assert_eq!(r.messages[1].content, "ab");
        assert_eq!(
            (p.temperature, p.top_p, p.top_k),
            (Some(0.5), Some(0.9), Some(0))
        );
        assert_eq!((p.max_tokens, p.seed, p.n), (Some(7), Some(3), 2));
        assert_eq!(p.stop, vec!["x".to_string()]);
        assert!(p.stream && p.include_usage);
        assert_eq!(p.logit_bias, vec![(5, -100.0)]);
    }

    #[test]
    fn errors_name_the_parameter() {
        let base = r#""model":"m","messages":[{"role":"user","content":"hi"}]"#;
        for (extra, param) in [
            (r#","temperature":-1"#, "temperature"),
            // Issue 21: these became infinities and an error with no param.
            (r#","temperature":1e300"#, "temperature"),
            (r#","presence_penalty":-1e39"#, "presence_penalty"),
            (r#","top_p":2"#, "top_p"),
            (r#","max_tokens":0"#, "max_tokens"),
            (r#","n":0"#, "n"),
            (r#","stop":[1]"#, "stop"),
            (r#","logit_bias":{"99999":1}"#, "logit_bias"),
            (r#","frobnicate":1"#, "frobnicate"),
            (r#","tools":[{"type":"function"}]"#, "tools[0].function"),
            (
                r#","tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"type":"function","function":{"name":"g"}}"#,
                "tool_choice",
            ),
            (
                r#","tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"function":{"name":"f"}}"#,
                "tool_choice",
            ),
            (
                r#","tools":[{"type":"function","function":{"name":"f"},"extra":1}]"#,
                "tools[0].extra",
            ),
            (
                r#","response_format":{"type":"xml"}"#,
                "response_format.type",
            ),
            (
                r#","response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"string","pattern":"a"}}}"#,
                "response_format.json_schema.schema",
            ),
            (r#","seed":1,"random_seed":2"#, "random_seed"),
            (
                r#","stream_options":{"include_usage":true}"#,
                "stream_options",
            ),
        ] {
            assert_eq!(
                param_of(chat(&format!("{{{base}{extra}}}"))),
                param,
                "{extra}"
            );
        }
        assert_eq!(param_of(chat(r#"{"model":"m","messages":[]}"#)), "messages");
        assert_eq!(
            param_of(chat(
                r#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#
            )),
            "messages[0].role"
        );
        assert_eq!(
            param_of(chat(r#"{"messages":[{"role":"user","content":"x"}]}"#)),
            "model"
        );
        assert!(chat("{not json").is_err());
    }

    #[test]
    fn safe_prompt_prepends_mistral_guardrail() {
        let r =
            chat(r#"{"model":"m","safe_prompt":true,"messages":[{"role":"user","content":"hi"}]}"#)
                .unwrap();
        assert_eq!(r.messages[0].role, "system");
        assert_eq!(r.messages[0].content, MISTRAL_SAFE_PROMPT);
        let r = chat(
            r#"{"model":"m","safe_prompt":true,"messages":[{"role":"system","content":"S"},{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        assert_eq!(r.messages.len(), 2);
        assert_eq!(r.messages[0].content, format!("{MISTRAL_SAFE_PROMPT}\n\nS"));
    }

    #[test]
    fn completion_prompts() {
        let r = parse_completion(br#"{"model":"m","prompt":["a","b"],"n":2}"#, |_| 10).unwrap();
        assert_eq!(r.prompts.len(), 2);
        let r = parse_completion(br#"{"model":"m","prompt":[1,2,3]}"#, |_| 10).unwrap();
        assert!(matches!(&r.prompts[0], PromptInput::Tokens(t) if t == &[1, 2, 3]));
        let e = parse_completion(br#"{"model":"m","prompt":[1,20]}"#, |_| 10)
            .err()
            .unwrap();
        assert_eq!(e.param.as_deref(), Some("prompt"));
        let r = parse_completion(br#"{"model":"m","prompt":"a","suffix":"b"}"#, |_| 10).unwrap();
        assert_eq!(r.suffix.as_deref(), Some("b"));
    }
}
