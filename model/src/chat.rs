//! Chat templates: a model folder's Jinja chat template rendered as transformers'
//! `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=..)` does.
//!
//! Follows `transformers/utils/chat_template_utils.py` (`_compile_jinja_template`,
//! `render_jinja_template`) and `tokenization_utils_base.py` (`from_pretrained`,
//! `apply_chat_template`, `get_chat_template`) of transformers 5: Jinja with `trim_blocks`,
//! `lstrip_blocks`, one trailing newline of the source dropped, loop controls, `raise_exception`,
//! `strftime_now`, transformers' `tojson` (no HTML escaping, `ensure_ascii=False`), Python string and
//! dict methods (minijinja-contrib's pycompat), `{% generation %}` blocks (rendered as their body;
//! their spans are not tracked), and the variables `messages`,
//! `add_generation_prompt`, `tools` / `documents` (None) and every special-token string of
//! `tokenizer_config.json`. The engine is minijinja, as in HF text-generation-inference; printed
//! booleans, None, lists and dicts follow Python's `str()` as Jinja2's do.
//!
//! It is not a tokenizer: encode the rendered text with [`crate::Tokenizer::encode`], which adds no
//! special tokens (`apply_chat_template(tokenize=True)` adds none either).
//!
//! Known differences from Jinja2 (none is reached by the templates of `tests/chat.rs`): `~` and
//! `+` print booleans and None the minijinja way (`true`, `none`); tuples are lists; `repr` of
//! strings knows Python's unprintable characters only approximately; `tojson` takes `sort_keys`
//! by keyword only; `strftime_now` reads UTC, not the local time zone. Fuel bounds the time of a
//! render, not its memory (a template that doubles a string in a loop can still exhaust memory).

use crate::error::{ModelError, Result, io_err};
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{
    Environment, Error as JinjaError, ErrorKind, Output, State, UndefinedBehavior, Value,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Instructions one render may run: 2 000 messages through the Llama 3.1 template take about
/// 70 000; a template that loops without end stops here after about 3 s (2 cores, release build).
pub const RENDER_FUEL: u64 = 50_000_000;
/// Nesting depth (macro calls, includes, nested blocks) a template may reach.
pub const RECURSION_LIMIT: usize = 200;

/// The template's name inside its environment (error messages show it with a line number).
const TEMPLATE_NAME: &str = "chat_template";

/// Special-token names transformers always passes when set (`SPECIAL_TOKENS_ATTRIBUTES`).
const NAMED_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (templates decide which they accept).
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// The special-token strings a template sees, by variable name (`bos_token`, `eos_token`, ..., and
/// model-specific ones such as `image_token`): transformers' `tokenizer.special_tokens_map`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens(BTreeMap<String, String>);

/// The string of a token entry: a string, or an `AddedToken` dict's `content`.
fn token_content(value: &serde_json::Value, named: bool) -> Option<&str> {
    match value {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Object(m) => {
            // transformers turns `{"__type": "AddedToken", ..}` into an AddedToken; a named token may
            // also be a plain `{content: ..}` here (transformers refuses it), a model-specific one not.
            let added = m.get("__type").and_then(|t| t.as_str()) == Some("AddedToken");
            if added || named {
                m.get("content").and_then(|c| c.as_str())
            } else {
                None
            }
        }
        _ => None,
    }
}

impl SpecialTokens {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` (e.g. `"bos_token"`) to `content`.
    pub fn with(mut self, name: &str, content: &str) -> Self {
        self.0.insert(name.to_string(), content.to_string());
        self
    }

    /// The tokens of a parsed `tokenizer_config.json`, as transformers 5 collects them: the named
    /// tokens (bos, eos, unk, sep, pad, cls, mask), every other key ending in `_token` whose value
    /// is a string or an AddedToken, and the entries of an `extra_special_tokens` dict. Nulls are
    /// left out; `additional_special_tokens` (a list) is not passed to templates.
    pub fn from_tokenizer_config(config: &serde_json::Value) -> Self {
        let mut tokens = BTreeMap::new();
        let Some(map) = config.as_object() else {
            return Self(tokens);
        };
        for (key, value) in map {
            let named = NAMED_TOKENS.contains(&key.as_str());
            if (named || key.ends_with("_token"))
                && let Some(content) = token_content(value, named)
            {
                tokens.insert(key.clone(), content.to_string());
            }
        }
        if let Some(extra) = map.get("extra_special_tokens").and_then(|e| e.as_object()) {
            for (key, value) in extra {
                if let Some(content) = token_content(value, false) {
                    tokens.insert(key.clone(), content.to_string());
                }
            }
        }
        Self(tokens)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

/// A conversation rendered whole, with the byte span of its final assistant turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssistantTurn {
    pub text: String,
    /// `text[span]` is what the template writes after the prompt for the final assistant message
    /// (its content and the end-of-turn tokens that follow): the part an assistant-only loss trains.
    pub span: Range<usize>,
}

/// A compiled chat template and the special tokens it is rendered with.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    special: SpecialTokens,
    /// The file the template came from, named in errors.
    origin: PathBuf,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("special", &self.special)
            .finish()
    }
}

fn template_err(path: &Path, msg: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// The source of the chat template in `dir` and the file it came from, chosen as transformers 5
/// does: `chat_template.jinja`, else `additional_chat_templates/default.jinja`, else the config's
/// `chat_template` (a string, or a list of `{name, template}` of which "default" is used).
fn find_template(
    dir: &Path,
    config: Option<&serde_json::Value>,
) -> Result<Option<(String, PathBuf)>> {
    let read = |path: PathBuf| -> Result<Option<(String, PathBuf)>> {
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        Ok(Some((text, path)))
    };
    let file = dir.join("chat_template.jinja");
    if file.is_file() {
        return read(file);
    }
    let extra_dir = dir.join("additional_chat_templates");
    if extra_dir.is_dir() {
        let default = extra_dir.join("default.jinja");
        if default.is_file() {
            return read(default);
        }
        let mut names: Vec<String> = std::fs::read_dir(&extra_dir)
            .map_err(io_err(&extra_dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".jinja")
                    .map(String::from)
            })
            .collect();
        if !names.is_empty() {
            // transformers lets these files replace the config's templates, and has no default.
            names.sort();
            return Err(template_err(
                &extra_dir,
                format!(
                    "holds the chat templates {names:?} but none is the default; \
                     add chat_template.jinja (or additional_chat_templates/default.jinja)"
                ),
            ));
        }
    }
    let config_path = dir.join("tokenizer_config.json");
    let config_err = |msg: String| ModelError::ConfigKey {
        path: config_path.clone(),
        key: "chat_template".into(),
        msg,
    };
    match config.and_then(|c| c.get("chat_template")) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some((s.clone(), config_path.clone()))),
        Some(serde_json::Value::Array(list)) => {
            let mut names = Vec::new();
            for entry in list {
                let name = entry.get("name").and_then(|n| n.as_str());
                let template = entry.get("template").and_then(|t| t.as_str());
                match (name, template) {
                    (Some("default"), Some(t)) => {
                        return Ok(Some((t.to_string(), config_path.clone())));
                    }
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => {
                        return Err(config_err(
                            "must list objects with string fields `name` and `template`".into(),
                        ));
                    }
                }
            }
            Err(config_err(format!(
                "lists the templates {names:?} but none named \"default\"; name the one to use \"default\""
            )))
        }
        Some(other) => Err(config_err(format!(
            "must be a string or a list of {{name, template}}, found {other}"
        ))),
    }
}

impl ChatTemplate {
    /// The chat template of a Hugging Face model folder with the special tokens of its
    /// `tokenizer_config.json`; `Ok(None)` when the folder has none.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Option<serde_json::Value> = match std::fs::read_to_string(&config_path) {
            Ok(text) => Some(serde_json::from_str(&text).map_err(|e| ModelError::Json {
                path: config_path.clone(),
                msg: format!("not valid JSON: {e}"),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&config_path)(e)),
        };
        let Some((source, origin)) = find_template(dir, config.as_ref())? else {
            return Ok(None);
        };
        let special = config
            .as_ref()
            .map(SpecialTokens::from_tokenizer_config)
            .unwrap_or_default();
        Self::compile(&source, special, origin).map(Some)
    }

    /// Compiles `source` once, to be rendered with `special`.
    pub fn new(source: &str, special: SpecialTokens) -> Result<Self> {
        Self::compile(source, special, PathBuf::from(TEMPLATE_NAME))
    }

    fn compile(source: &str, special: SpecialTokens, origin: PathBuf) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_fuel(Some(RENDER_FUEL));
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_filter("string", |v: &Value| py_str(v));
        // Jinja2 reads "\r\n" and "\r" as "\n" everywhere in the source (its lexer's newline_re).
        let source = generation_tags_as_blocks(&source.replace("\r\n", "\n").replace('\r', "\n"));
        env.add_template_owned(TEMPLATE_NAME, source).map_err(|e| {
            template_err(
                &origin,
                format!(
                    "the chat template is not valid Jinja: {}; fix the template, or replace it with \
                     the one of the model it was made from",
                    describe(&e)
                ),
            )
        })?;
        Ok(Self {
            env,
            special,
            origin,
        })
    }

    /// The special tokens the template is rendered with.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// `messages` rendered as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=..)` renders them. A template's `raise_exception` (e.g. "Conversation
    /// roles must alternate ...") becomes an error carrying its message.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(template_err(
                &self.origin,
                "cannot apply the chat template to an empty conversation; give at least one message",
            ));
        }
        let mut vars: BTreeMap<String, Value> = self
            .special
            .0
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        vars.insert("messages".into(), Value::from_serialize(messages));
        vars.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        vars.insert("tools".into(), Value::from(()));
        vars.insert("documents".into(), Value::from(()));
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| template_err(&self.origin, describe(&e)))?;
        template
            .render(Value::from_iter(vars))
            .map_err(|e| self.render_err(&e))
    }

    /// The model input for a reply to `messages` (which end in a user turn): the render with
    /// `add_generation_prompt=true`.
    pub fn render_prompt(&self, messages: &[Message]) -> Result<String> {
        match messages.last() {
            Some(last) if last.role == "user" => self.render(messages, true),
            Some(last) => Err(template_err(
                &self.origin,
                format!(
                    "a prompt must end with a user message, found `{}` last; drop the trailing \
                     turns or render the conversation with `render`",
                    last.role
                ),
            )),
            None => self.render(messages, true),
        }
    }

    /// The whole conversation rendered (`add_generation_prompt=false`) and the byte span of its
    /// final assistant turn: everything after the render of `messages[..n-1]` with
    /// `add_generation_prompt=true`, which must be a prefix of the full render.
    pub fn render_with_final_assistant(&self, messages: &[Message]) -> Result<AssistantTurn> {
        let Some((last, earlier)) = messages.split_last() else {
            return Err(template_err(
                &self.origin,
                "the conversation is empty; it must end with an assistant message",
            ));
        };
        if last.role != "assistant" || earlier.is_empty() {
            return Err(template_err(
                &self.origin,
                format!(
                    "to find the final assistant turn the conversation must end with an assistant \
                     message after at least one other, found {} message(s) ending with `{}`",
                    messages.len(),
                    last.role
                ),
            ));
        }
        let prompt = self.render(earlier, true)?;
        let text = self.render(messages, false)?;
        if !text.starts_with(&prompt) {
            return Err(template_err(
                &self.origin,
                "the chat template renders the turns before the final assistant message differently \
                 as a prompt than inside the whole conversation, so the assistant turn has no clean \
                 span; train on whole sequences, or use a template whose prompt render is a prefix",
            ));
        }
        Ok(AssistantTurn {
            span: prompt.len()..text.len(),
            text,
        })
    }

    fn render_err(&self, e: &JinjaError) -> ModelError {
        let msg = if let Some(raised) = raised_message(e) {
            format!(
                "the chat template refused the conversation: {raised} (raise_exception at {}); \
                 change the messages to what the template accepts",
                location(e)
            )
        } else if e.kind() == ErrorKind::OutOfFuel {
            format!(
                "the chat template ran past {RENDER_FUEL} instructions without finishing (a loop \
                 that does not end?) at {}; fix the template",
                location(e)
            )
        } else {
            format!("the chat template failed to render: {}", describe(e))
        };
        template_err(&self.origin, msg)
    }
}

/// `source` with transformers' `{% generation %}` / `{% endgeneration %}` tags (its
/// AssistantTracker extension, which renders the body unchanged) written as `{% if true %}` /
/// `{% endif %}`: the same output, whitespace control (`-`, `+`) and trim_blocks included.
fn generation_tags_as_blocks(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at + 2..];
        let (left, after) = match tag.chars().next() {
            Some(c @ ('-' | '+')) => (Some(c), &tag[1..]),
            _ => (None, tag),
        };
        let trimmed = after.trim_start();
        let word_end = trimmed
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(trimmed.len());
        let replacement = match &trimmed[..word_end] {
            "generation" => Some(" if true "),
            "endgeneration" => Some(" endif "),
            _ => None,
        };
        let tail = trimmed[word_end..].trim_start();
        let (right, tail) = match tail.chars().next() {
            Some(c @ ('-' | '+')) => (Some(c), &tail[1..]),
            _ => (None, tail),
        };
        match (replacement, tail.strip_prefix("%}")) {
            (Some(body), Some(next)) => {
                out.push_str("{%");
                out.extend(left);
                out.push_str(body);
                out.extend(right);
                out.push_str("%}");
                rest = next;
            }
            _ => {
                out.push_str("{%");
                rest = tag;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The message a template passed to `raise_exception`, found in the error's chain.
fn raised_message(e: &JinjaError) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(raised) = err.downcast_ref::<Raised>() {
            return Some(raised.0.clone());
        }
        source = err.source();
    }
    None
}

fn location(e: &JinjaError) -> String {
    match e.line() {
        Some(line) => format!("template line {line}"),
        None => "the template".into(),
    }
}

/// An engine error in one line: kind, detail and template line.
fn describe(e: &JinjaError) -> String {
    let mut msg = e.kind().to_string();
    if let Some(detail) = e.detail() {
        let _ = write!(msg, ": {detail}");
    }
    if let Some(line) = e.line() {
        let _ = write!(msg, " (template line {line})");
    }
    msg
}

/// The error `raise_exception` carries, to tell it from the engine's own.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// `raise_exception(message)`: transformers raises `jinja2.exceptions.TemplateError(message)`.
fn raise_exception(message: Value) -> std::result::Result<Value, JinjaError> {
    let text = if message.kind() == ValueKind::String {
        message.as_str().unwrap_or_default().to_string()
    } else {
        py_str(&message)
    };
    Err(JinjaError::new(ErrorKind::InvalidOperation, text.clone()).with_source(Raised(text)))
}

/// Writes what `{{ value }}` prints in Jinja2: strings as they are, undefined as nothing, and
/// everything else as Python's `str()`.
fn python_formatter(
    out: &mut Output,
    _state: &State,
    value: &Value,
) -> std::result::Result<(), JinjaError> {
    let result = match value.kind() {
        ValueKind::Undefined => Ok(()),
        ValueKind::String => out.write_str(value.as_str().unwrap_or_default()),
        _ => out.write_str(&py_str(value)),
    };
    result.map_err(|_| JinjaError::new(ErrorKind::WriteFailure, "cannot write the render"))
}

/// Python's `str(value)`.
fn py_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        ValueKind::Undefined => String::new(),
        _ => {
            let mut out = String::new();
            py_repr(value, &mut out);
            out
        }
    }
}

/// Python's `repr(value)` of the JSON-like values templates hold.
fn py_repr(value: &Value, out: &mut String) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => out.push_str(&py_number(value)),
        ValueKind::String => py_repr_str(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&item, out);
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&key, out);
                out.push_str(": ");
                py_repr(&value.get_item(&key).unwrap_or_default(), out);
            }
            out.push('}');
        }
        _ => out.push_str(&value.to_string()),
    }
}

/// Python's `repr(str)`: single quotes unless the text has `'` and no `"`, escapes for the quote,
/// backslash and characters Python does not print (control, separator and format characters).
fn py_repr_str(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !py_printable(c) => {
                let code = c as u32;
                let _ = match code {
                    0..=0xff => write!(out, "\\x{code:02x}"),
                    0x100..=0xffff => write!(out, "\\u{code:04x}"),
                    _ => write!(out, "\\U{code:08x}"),
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `str.isprintable` for one character, without the Unicode tables: control characters,
/// separators other than the space, and the common format and private-use characters are not.
fn py_printable(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    let code = c as u32;
    let format = matches!(code, 0xad | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x180e | 0x200b..=0x200f
        | 0x202a..=0x202e | 0x2060..=0x2064 | 0x2066..=0x206f | 0xfeff | 0xfff9..=0xfffb);
    let private = matches!(code, 0xe000..=0xf8ff | 0xf0000..);
    !(c.is_control() || c.is_whitespace() || format || private)
}

/// A number as Python prints it: integers in full, floats as `repr(float)` (`2.0`, `1e+20`,
/// `0.30000000000000004`, `inf`, `nan`).
fn py_number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(x) => py_float(x, "inf", "nan"),
        Err(_) => value.to_string(),
    }
}

/// `repr(x)` of a float; `inf` / `nan` name the non-finite values (JSON writes `Infinity`, `NaN`).
fn py_float(x: f64, inf: &str, nan: &str) -> String {
    if x.is_nan() {
        return nan.to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 {
            inf.to_string()
        } else {
            format!("-{inf}")
        };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Shortest round-trip digits from Rust, laid out as Python's float_repr_style 'r' does:
    // positional for exponents -4..16, scientific (e+XX, two digits at least) otherwise.
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if x < 0.0 { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp < 0 {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        } else if exp + 1 >= n {
            format!("{digits}{}.0", "0".repeat((exp + 1 - n) as usize))
        } else {
            let (int, frac) = digits.split_at((exp + 1) as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let mantissa = if rest.is_empty() {
            first.to_string()
        } else {
            format!("{first}.{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{esign}{:02}", exp.abs())
    }
}

/// How `tojson` writes: transformers' `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)` with the options a template passes.
struct JsonStyle {
    ensure_ascii: bool,
    /// One level of indentation; `None` writes everything on one line.
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// The `tojson` filter as transformers defines it (Jinja2's own escapes `<`, `>`, `&`, `'`);
/// `sort_keys` is taken by keyword only (minijinja filters take at most five arguments).
fn tojson(
    value: &Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    separators: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<String, JinjaError> {
    let pick =
        |positional: Option<Value>, name: &str| -> std::result::Result<Option<Value>, JinjaError> {
            let keyword: Option<Value> = kwargs.get(name)?;
            Ok(keyword
                .or(positional)
                .filter(|v| !v.is_none() && !v.is_undefined()))
        };
    let ensure_ascii = pick(ensure_ascii, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match pick(indent, "indent")? {
        None => None,
        Some(v) if v.kind() == ValueKind::String => {
            Some(v.as_str().unwrap_or_default().to_string())
        }
        Some(v) => match v.as_i64() {
            Some(n) => Some(" ".repeat(n.max(0) as usize)),
            None => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "tojson: indent must be an integer or a string, found {}",
                        py_str(&v)
                    ),
                ));
            }
        },
    };
    let (item_sep, key_sep) = match pick(separators, "separators")? {
        Some(v) => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [item, key]
                    if item.kind() == ValueKind::String && key.kind() == ValueKind::String =>
                {
                    (item.to_string(), key.to_string())
                }
                _ => {
                    return Err(JinjaError::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings, (item separator, key separator)",
                    ));
                }
            }
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys = pick(None, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let style = JsonStyle {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    write_json(value, &style, 0, &mut out)?;
    Ok(out)
}

fn json_newline(style: &JsonStyle, depth: usize, out: &mut String) {
    if let Some(unit) = &style.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(unit);
        }
    }
}

fn write_json(
    value: &Value,
    style: &JsonStyle,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), JinjaError> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => {
            let x = f64::try_from(value.clone())?;
            out.push_str(&py_float(x, "Infinity", "NaN"));
        }
        ValueKind::String => json_str(value.as_str().unwrap_or_default(), style.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                json_newline(style, depth + 1, out);
                write_json(item, style, depth + 1, out)?;
            }
            json_newline(style, depth, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                    ValueKind::None => "null".into(),
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).into(),
                    ValueKind::Number => {
                        let mut s = String::new();
                        write_json(&key, style, depth, &mut s)?;
                        s
                    }
                    _ => {
                        return Err(JinjaError::new(
                            ErrorKind::InvalidOperation,
                            format!(
                                "tojson: keys must be str, int, float, bool or None, not {}",
                                key.kind()
                            ),
                        ));
                    }
                };
                entries.push((key, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                json_newline(style, depth + 1, out);
                json_str(key, style.ensure_ascii, out);
                out.push_str(&style.key_sep);
                write_json(item, style, depth + 1, out)?;
            }
            json_newline(style, depth, out);
            out.push('}');
        }
        kind => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of type {kind} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

/// A JSON string as Python's `json.dumps` writes it.
fn json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `strftime_now(format)`: the current time (UTC) formatted as Python's `datetime.strftime`.
fn strftime_now(format: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    strftime(format, now.as_secs() as i64, now.subsec_micros())
}

const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
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

/// `(year, month 1..=12, day 1..=31)` of a day counted from 1970-01-01 (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `secs` (Unix time, UTC) formatted by the C-locale `strftime` directives Python passes to glibc:
/// `%a %A %b %B %h %c %d %e %D %F %H %I %j %m %M %p %S %f %T %R %u %w %x %X %y %Y %Z %z %n %t %%`,
/// and the `-` flag (no padding) on the numeric ones. Others are written as they are.
fn strftime(format: &str, secs: i64, micros: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday; 0 = Monday
    let year_start = {
        let mut d = days;
        while civil_from_days(d - 1).0 == year {
            d -= 1;
        }
        d
    };
    let yday = days - year_start + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let num = |n: i64, width: usize| {
            if unpadded {
                n.to_string()
            } else {
                format!("{n:0width$}")
            }
        };
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let piece = match d {
            'a' => WEEKDAYS[weekday][..3].to_string(),
            'A' => WEEKDAYS[weekday].to_string(),
            'b' | 'h' => MONTHS[month as usize - 1][..3].to_string(),
            'B' => MONTHS[month as usize - 1].to_string(),
            'c' => format!(
                "{} {} {:>2} {hour:02}:{minute:02}:{second:02} {year}",
                &WEEKDAYS[weekday][..3],
                &MONTHS[month as usize - 1][..3],
                day
            ),
            'd' => num(i64::from(day), 2),
            'e' => format!("{day:>2}"),
            'D' | 'x' => format!("{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            'F' => format!("{year}-{month:02}-{day:02}"),
            'H' => num(hour, 2),
            'I' => num(hour12, 2),
            'j' => num(yday, 3),
            'm' => num(i64::from(month), 2),
            'M' => num(minute, 2),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_string(),
            'S' => num(second, 2),
            'f' => format!("{micros:06}"),
            'T' | 'X' => format!("{hour:02}:{minute:02}:{second:02}"),
            'R' => format!("{hour:02}:{minute:02}"),
            'u' => (weekday + 1).to_string(),
            'w' => ((weekday + 1) % 7).to_string(),
            'y' => num(year.rem_euclid(100), 2),
            'Y' => year.to_string(),
            // datetime.now() is naive: no zone name, no offset.
            'Z' | 'z' => String::new(),
            'n' => "\n".into(),
            't' => "\t".into(),
            '%' => "%".into(),
            other => format!("%{}{other}", if unpadded { "-" } else { "" }),
        };
        out.push_str(&piece);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[Message]) -> Result<String> {
        ChatTemplate::new(source, SpecialTokens::new().with("bos_token", "<s>"))?
            .render(messages, false)
    }

    #[test]
    fn strftime_matches_python() {
        // import datetime; t = datetime.datetime(2024, 7, 26, 9, 5, 3, 42)
        // t.strftime(f) for f in the formats below; t is 1721984703 s after the epoch (UTC).
        let secs = 1_721_984_703;
        let cases = [
            ("%d %b %Y", "26 Jul 2024"),
            ("%B %d, %Y", "July 26, 2024"),
            ("%A %a %j %u %w", "Friday Fri 208 5 5"),
            ("%H:%M:%S %I %p %f", "09:05:03 09 AM 000042"),
            ("%-d/%-m %-H %y %F %D", "26/7 9 24 2024-07-26 07/26/24"),
            (
                "%c|%x|%X|%e",
                "Fri Jul 26 09:05:03 2024|07/26/24|09:05:03|26",
            ),
            ("100%% %Z%z%q", "100% %q"),
        ];
        for (format, expected) in cases {
            assert_eq!(strftime(format, secs, 42), expected, "{format}");
        }
        // datetime.datetime(2000, 2, 29).strftime("%j %a %d %b %Y") and 1969-12-31 (before the epoch).
        assert_eq!(
            strftime("%j %a %d %b %Y", 951_782_400, 0),
            "060 Tue 29 Feb 2000"
        );
        assert_eq!(strftime("%Y-%m-%d %H %j", -3600, 0), "1969-12-31 23 365");
    }

    #[test]
    fn floats_print_as_python_repr() {
        // [repr(x) for x in (2.0, 0.1 + 0.2, 1e20, 1e16, 1e15, 1.5e-5, 0.0001, -3.25, 123456.789, 5e-324)]
        let cases = [
            (2.0, "2.0"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1e20, "1e+20"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (-3.25, "-3.25"),
            (123456.789, "123456.789"),
            (5e-324, "5e-324"),
        ];
        for (x, expected) in cases {
            assert_eq!(py_float(x, "inf", "nan"), expected);
        }
    }

    #[test]
    fn printed_values_follow_python_str() {
        // jinja2 with transformers' environment prints, for the same expressions:
        // True|None|[1, 'a', None, True]|{'a': 1}|2.0|1.5|["it's", 'a"b', 'q\n', 'é\x01']|True
        let source = "{{ 1 == 1 }}|{{ none }}|{{ [1, 'a', none, true] }}|{{ {'a': 1} }}|{{ 4 / 2 }}|\
                      {{ 3 / 2 }}|{{ [\"it's\", 'a\"b', 'q\\n', 'é\\x01'] }}|{{ true|string }}{{ undefined_name }}";
        let out = render(source, &[Message::user("x")]).unwrap();
        assert_eq!(
            out,
            "True|None|[1, 'a', None, True]|{'a': 1}|2.0|1.5|[\"it's\", 'a\"b', 'q\\n', 'é\\x01']|True"
        );
    }

    #[test]
    fn tojson_matches_json_dumps() {
        // json.dumps(v, ensure_ascii=False) and the options below, v = {"k": ["é\u0001<&>", 1.0, None]}
        let cases = [
            ("{{ v|tojson }}", r#"{"k": ["é\u0001<&>", 1.0, null]}"#),
            (
                "{{ v|tojson(indent=2) }}",
                "{\n  \"k\": [\n    \"é\\u0001<&>\",\n    1.0,\n    null\n  ]\n}",
            ),
            (
                "{{ v|tojson(ensure_ascii=true) }}",
                r#"{"k": ["\u00e9\u0001<&>", 1.0, null]}"#,
            ),
            (
                "{{ v|tojson(separators=(',', ':')) }}",
                r#"{"k":["é\u0001<&>",1.0,null]}"#,
            ),
            (
                "{{ []|tojson(indent=2) }}{{ {}|tojson }}{{ '😀'|tojson(ensure_ascii=true) }}",
                r#"[]{}"\ud83d\ude00""#,
            ),
        ];
        for (expr, expected) in cases {
            let source = format!("{{% set v = {{'k': ['é\\x01<&>', 1.0, none]}} %}}{expr}");
            assert_eq!(
                render(&source, &[Message::user("x")]).unwrap(),
                expected,
                "{expr}"
            );
        }
        let err = render("{{ 1|tojson(colour=1) }}", &[Message::user("x")]).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn generation_tags_render_their_body() {
        // transformers' render_jinja_template([[user "u", assistant "a"]], chat_template=source)
        let source = "{% for m in messages %}{% if m.role == 'assistant' %}[{%- generation -%}  \
                      {{ m.content }}  {%- endgeneration %}\n]\n{% else %}{{ m.content }}\n{% endif %}\
                      {% endfor %}{%generation%}x{%+ endgeneration +%}\n  {% generation %}\n y\n  \
                      {% endgeneration %}\nz";
        let out = render(source, &[Message::user("u"), Message::assistant("a")]).unwrap();
        assert_eq!(out, "u\n[a]\nx\n y\nz");
        // Only whole tags are rewritten.
        assert_eq!(
            generation_tags_as_blocks("{% generations %}{%"),
            "{% generations %}{%"
        );
    }

    #[test]
    fn crlf_source_renders_as_lf() {
        // Jinja2's lexer turns "\r\n" into "\n"; the trailing one is dropped (keep_trailing_newline=False).
        let out = render(
            "a\r\n{% if true %}\r\nb\r\n{% endif %}\r\n",
            &[Message::user("x")],
        )
        .unwrap();
        assert_eq!(out, "a\nb\n");
    }

    #[test]
    fn special_tokens_from_config() {
        let config = serde_json::json!({
            "bos_token": {"__type": "AddedToken", "content": "<s>"},
            "eos_token": "</s>",
            "pad_token": null,
            "image_token": {"__type": "AddedToken", "content": "<image>"},
            "video_token": {"content": "<video>"},
            "add_bos_token": true,
            "extra_special_tokens": {"audio_token": "<audio>"},
            "additional_special_tokens": ["<x>"],
        });
        let special = SpecialTokens::from_tokenizer_config(&config);
        let expected = SpecialTokens::new()
            .with("bos_token", "<s>")
            .with("eos_token", "</s>")
            .with("image_token", "<image>")
            .with("audio_token", "<audio>");
        assert_eq!(special, expected);
    }
}
