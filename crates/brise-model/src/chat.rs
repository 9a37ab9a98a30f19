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
}

/// A tool call parsed from a model's output.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: serde_json::Value,
}

impl ChatTemplate {
    /// The tool-call format the template renders, if it renders tools at all.
    pub fn tool_format(&self) -> Option<ToolFormat> {
        (self.source.contains("tools") && self.source.contains("<tool_call>"))
            .then_some(ToolFormat::Hermes)
    }
}

impl ToolFormat {
    /// What opens a call in the output.
    pub fn open(self) -> &'static str {
        "<tool_call>"
    }

    /// Exact text around one forced call's JSON object.
    pub fn wrap(self) -> (&'static str, &'static str) {
        ("<tool_call>\n", "\n</tool_call>")
    }

    /// Splits generated text into its content and tool calls. `None` when the text opens
    /// a call that is not a JSON object with a string `name` and object `arguments`.
    pub fn parse(self, text: &str) -> Option<(String, Vec<ToolCall>)> {
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
            let name = v.get("name")?.as_str()?.to_string();
            let arguments = match v.get("arguments") {
                Some(a @ serde_json::Value::Object(_)) => a.clone(),
                Some(serde_json::Value::String(s)) => serde_json::from_str(s).ok()?,
                None => serde_json::json!({}),
                _ => return None,
            };
            calls.push(ToolCall { name, arguments });
            rest = next;
        }
        content.push_str(rest);
        Some((content.trim().to_string(), calls))
    }
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
