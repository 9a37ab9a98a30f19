//! Chat templates: the model's own Jinja template rendered with minijinja, configured the
//! way Hugging Face renders them (trim_blocks, lstrip_blocks, Python string methods,
//! `raise_exception`, a `tojson` that writes what Python's `json.dumps` writes).

use crate::error::{ModelError, Result};
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

/// One chat message as templates see it.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: String,
    bos: String,
    eos: String,
}

/// Python's `json.dumps(v, ensure_ascii=False, indent=indent)`.
fn py_json(v: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    use serde_json::Value as J;
    let nl = |out: &mut String, lvl: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * lvl));
        }
    };
    let (item_sep, key_sep) = if indent.is_some() {
        (",", ": ")
    } else {
        (", ", ": ")
    };
    match v {
        J::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                nl(out, level + 1);
                py_json(x, indent, level + 1, out);
            }
            nl(out, level);
            out.push(']');
        }
        J::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                nl(out, level + 1);
                out.push_str(&serde_json::to_string(k).unwrap());
                out.push_str(key_sep);
                py_json(x, indent, level + 1, out);
            }
            nl(out, level);
            out.push('}');
        }
        J::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap();
            // Python prints floats with a fractional part: 1.0, not 1.
            if f.fract() == 0.0 && f.abs() < 1e16 {
                out.push_str(&format!("{f:.1}"))
            } else {
                out.push_str(&n.to_string())
            }
        }
        other => out.push_str(&serde_json::to_string(other).unwrap()),
    }
}

fn tojson(v: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let j = serde_json::to_value(&v)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut s = String::new();
    py_json(&j, indent, 0, &mut s);
    Ok(Value::from_safe_string(s))
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use it for "today's date"; brise has no clock dependency here, so
            // render the format's date parts from the system time.
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            strftime_utc(&fmt, secs)
        });
        env.add_filter("tojson", tojson);
        // Jinja2's `int` and `float` give their default for text that is not a number
        // (Mistral's templates rely on it to type tool results); minijinja's fail.
        env.add_filter("int", |v: Value, default: Option<i64>| -> Value {
            let d = Value::from(default.unwrap_or(0));
            if let Some(s) = v.as_str() {
                let t = s.trim();
                return match t.parse::<i64>() {
                    Ok(i) => Value::from(i),
                    Err(_) => t
                        .parse::<f64>()
                        .ok()
                        .filter(|f| f.is_finite())
                        .map_or(d, |f| Value::from(f.trunc() as i64)),
                };
            }
            match f64::try_from(v.clone()) {
                Ok(f) if f.is_finite() => Value::from(f.trunc() as i64),
                _ => i64::try_from(v).map_or(d, Value::from),
            }
        });
        env.add_filter("float", |v: Value, default: Option<f64>| -> Value {
            let d = Value::from(default.unwrap_or(0.0));
            match v.as_str() {
                Some(s) => s.trim().parse::<f64>().map_or(d, Value::from),
                None => f64::try_from(v).map_or(d, Value::from),
            }
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::Template(format!("does not parse: {e}")))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos: bos.into(),
            eos: eos.into(),
        })
    }

    /// Renders a conversation. `add_generation_prompt` opens the assistant's turn.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<String> {
        let t = self
            .env
            .get_template("chat")
            .expect("added at construction");
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos,
            eos_token => &self.eos,
            tools => tools.map(|t| Value::from(minijinja::value::Serde(t))),
        };
        t.render(ctx).map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            ModelError::Template(msg)
        })
    }
}

/// How a model writes tool calls, as its chat template teaches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>` (Qwen2.5, Hermes).
    Hermes,
    /// `[TOOL_CALLS] [{"name": …, "arguments": {…}, "id": …}, …]` (Mistral's v3
    /// tokenizers: Mistral 7B v0.3 and its template), where `[TOOL_CALLS]` is a control
    /// token and call ids are 9 letters or digits.
    Mistral,
}

/// A tool call parsed from a model's output.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: serde_json::Value,
    /// The id the model wrote, when it wrote one in its format's shape.
    pub id: Option<String>,
}

impl ChatTemplate {
    /// The tool-call format the template renders, if it renders tools at all.
    pub fn tool_format(&self) -> Option<ToolFormat> {
        if !self.source.contains("tools") {
            None
        } else if self.source.contains("[TOOL_CALLS]") {
            Some(ToolFormat::Mistral)
        } else if self.source.contains("<tool_call>") {
            Some(ToolFormat::Hermes)
        } else {
            None
        }
    }
}

/// Whether `id` is a Mistral tool call id: 9 ASCII letters or digits.
pub fn is_mistral_call_id(id: &str) -> bool {
    id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl ToolFormat {
    /// What opens a call in the output.
    pub fn open(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "<tool_call>",
            ToolFormat::Mistral => "[TOOL_CALLS]",
        }
    }

    /// Control tokens the output must keep as text so calls can be found (llama.cpp's
    /// "preserved tokens"): without them `[TOOL_CALLS]` would decode to nothing.
    pub fn preserved(self) -> &'static [&'static str] {
        match self {
            ToolFormat::Hermes => &[],
            ToolFormat::Mistral => &["[TOOL_CALLS]"],
        }
    }

    /// Exact text around one forced call's JSON object.
    pub fn wrap(self) -> (&'static str, &'static str) {
        match self {
            ToolFormat::Hermes => ("<tool_call>\n", "\n</tool_call>"),
            ToolFormat::Mistral => ("[TOOL_CALLS] [", "]"),
        }
    }

    /// Splits generated text into its content and tool calls. `None` when the text opens
    /// a call that is not a JSON object with a string `name` and object `arguments`.
    pub fn parse(self, text: &str) -> Option<(String, Vec<ToolCall>)> {
        match self {
            ToolFormat::Hermes => parse_hermes(text),
            ToolFormat::Mistral => parse_mistral(text),
        }
    }
}

/// One call object: `name`, `arguments` (an object, or JSON text of one), and an `id`
/// kept when it is a string.
fn call_of(v: &serde_json::Value) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments") {
        Some(a @ serde_json::Value::Object(_)) => a.clone(),
        Some(serde_json::Value::String(s)) => serde_json::from_str(s).ok()?,
        None => serde_json::json!({}),
        _ => return None,
    };
    let id = v.get("id").and_then(|i| i.as_str()).map(str::to_string);
    Some(ToolCall {
        name,
        arguments,
        id,
    })
}

/// `[TOOL_CALLS]` then a JSON array of calls (or one call object); the text before the
/// first `[TOOL_CALLS]` is the content. Everything after it must be calls.
fn parse_mistral(text: &str) -> Option<(String, Vec<ToolCall>)> {
    let open = ToolFormat::Mistral.open();
    let Some(i) = text.find(open) else {
        return Some((text.trim().to_string(), Vec::new()));
    };
    let content = text[..i].trim().to_string();
    let mut calls = Vec::new();
    for part in text[i + open.len()..].split(open) {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(part).ok()?;
        match &v {
            serde_json::Value::Array(items) => {
                for it in items {
                    calls.push(call_of(it)?);
                }
            }
            serde_json::Value::Object(_) => calls.push(call_of(&v)?),
            _ => return None,
        }
    }
    Some((content, calls))
}

fn parse_hermes(text: &str) -> Option<(String, Vec<ToolCall>)> {
    let (open, close) = ("<tool_call>", "</tool_call>");
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(open) {
        content.push_str(&rest[..i]);
        let after = &rest[i + open.len()..];
        let (body, next) = match after.find(close) {
            Some(j) => (&after[..j], &after[j + close.len()..]),
            // The end of generation may come before the closing tag.
            None => (after, ""),
        };
        let v: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
        calls.push(call_of(&v)?);
        rest = next;
    }
    content.push_str(rest);
    Some((content.trim().to_string(), calls))
}

/// Enough of strftime for chat templates (%d %b %B %Y %m %H %M), in UTC.
fn strftime_utc(fmt: &str, secs: u64) -> String {
    let days = (secs / 86400) as i64;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600 % 24)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tool_tests {
    use super::*;

    #[test]
    fn hermes_calls_parse() {
        let f = ToolFormat::Hermes;
        let (c, calls) = f
            .parse("Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}")
            .unwrap();
        assert_eq!(c, "Sure.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, serde_json::json!({"city": "Paris"}));
        assert_eq!(calls[1].arguments, serde_json::json!({"x": 1}));
        assert_eq!(
            f.parse("no calls").unwrap(),
            ("no calls".to_string(), vec![])
        );
        assert!(f.parse("<tool_call>{not json}</tool_call>").is_none());
        assert!(
            f.parse("<tool_call>{\"arguments\": {}}</tool_call>")
                .is_none()
        );
    }

    #[test]
    fn mistral_calls_parse() {
        let f = ToolFormat::Mistral;
        let (c, calls) = f
            .parse("[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": \"a1B2c3D4e\"}, {\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}]")
            .unwrap();
        assert_eq!(c, "");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, serde_json::json!({"city": "Paris"}));
        assert_eq!(calls[0].id.as_deref(), Some("a1B2c3D4e"));
        assert_eq!(calls[1].arguments, serde_json::json!({"x": 1}));
        assert_eq!(calls[1].id, None);
        let (c, calls) = f
            .parse("Let me check. [TOOL_CALLS] {\"name\": \"g\", \"arguments\": {}}")
            .unwrap();
        assert_eq!((c.as_str(), calls.len()), ("Let me check.", 1));
        assert_eq!(f.parse("plain").unwrap(), ("plain".to_string(), vec![]));
        // A cut-off or malformed list is not a call.
        assert!(f.parse("[TOOL_CALLS] [{\"name\": \"g\", \"argu").is_none());
        assert!(f.parse("[TOOL_CALLS] [1]").is_none());
        assert!(is_mistral_call_id("a1B2c3D4e"));
        assert!(!is_mistral_call_id("call_1234"));
        assert!(!is_mistral_call_id("a1B2c3D4"));
    }

    #[test]
    fn formats_from_templates() {
        let t = |src: &str| ChatTemplate::new(src, "<s>", "</s>").unwrap().tool_format();
        assert_eq!(
            t("{% if tools %}[TOOL_CALLS]{% endif %}{{ messages[0].content }}"),
            Some(ToolFormat::Mistral)
        );
        assert_eq!(
            t("{% if tools %}<tool_call>{% endif %}{{ messages[0].content }}"),
            Some(ToolFormat::Hermes)
        );
        assert_eq!(t("{{ messages[0].content }}"), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_and_float_filters_default_like_jinja2() {
        // The expected text is Jinja2 3.1's rendering of the same template and contents.
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.content|int }} {{ m.content|float }} {{ m.content|int(7) }}|{% endfor %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let msgs: Vec<Message> = ["21", " 2.5 ", "{\"t\": 1}", "x"]
            .iter()
            .map(|c| {
                serde_json::from_value(serde_json::json!({"role": "user", "content": c})).unwrap()
            })
            .collect();
        assert_eq!(
            t.render(&msgs, false, None).unwrap(),
            "21 21.0 21|2 2.5 2|0 0.0 7|0 0.0 7|"
        );
    }

    #[test]
    fn python_methods_and_raise() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'x' %}{{ raise_exception('bad role') }}{% endif %}[{{ m.content.strip() }}]{% endfor %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  hi ")], false, None)
                .unwrap(),
            "[hi]"
        );
        let e = t
            .render(&[Message::new("x", "a")], false, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad role"), "{e}");
    }

    #[test]
    fn tojson_is_pythons() {
        let t = ChatTemplate::new(
            "{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}",
            "",
            "",
        )
        .unwrap();
        let tools = serde_json::json!([{"a": 1, "b": [1.0, "é<"]}]);
        let s = t.render(&[], false, Some(&tools)).unwrap();
        assert_eq!(
            s,
            "[{\"a\": 1, \"b\": [1.0, \"é<\"]}]|{\n  \"a\": 1,\n  \"b\": [\n    1.0,\n    \"é<\"\n  ]\n}"
        );
    }

    #[test]
    fn strftime_known_date() {
        // 2024-07-26 12:34 UTC
        assert_eq!(
            strftime_utc("%d %b %Y %H:%M", 1_721_997_240),
            "26 Jul 2024 12:34"
        );
    }
}
