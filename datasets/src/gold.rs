//! Rule rewards: the programmatic gold scorer.
//!
//! Some tasks have an answer a program can check: arithmetic (GSM8K and the project's own demo task,
//! `labeling simulate`), or a format a pattern can check. For them a [`Rule`] scores a response
//! 1.0 or 0.0 without any learned model. The `ppo` stage can use a rule as its reward (instead of,
//! or beside, the reward model), and evaluation uses it to measure the policy's real (gold)
//! quality, which the reward model never sees, so that reward hacking shows as a rising reward
//! with a flat or falling gold score.
//!
//! - [`Rule::ExactAnswer`]: the response's final answer ([`extract_answer`]: after the last `####`,
//!   "answer is", "答案是" or "答案：", else the last number) equals the prompt's reference answer
//!   ([`gold_answer`] of the prompts file's `answer` field), both [`normalize`]d, numbers compared
//!   numerically ("1,234" = "1234", "8.0" = "8").
//! - [`Rule::FinalAnswer`]: the same, but the answer must be stated after a marker
//!   ([`extract_final_answer`]); a bare number, however right, scores 0. For tasks whose
//!   instructions fix the answer's form (the demo task: "The answer is X.").
//! - [`Rule::Regex`]: the response matches a regular expression.
//!
//! Rules come from configs (serde, `kind = "exact_answer"` or `kind = "regex", pattern = "…"`) or
//! from CLI strings ([`parse_rule`]: `exact_answer`, `final_answer` or `regex:<pattern>`), and are compiled once
//! ([`Rule::compile`]) so that a bad pattern is an error at load, not at the first response.

use regex::Regex;
use std::fmt;
use std::sync::LazyLock;

/// The reference answer in a prompts file's `answer` field: for GSM8K-style solutions the text
/// after the last `####`, trimmed; otherwise the whole field, trimmed.
pub fn gold_answer(answer_field: &str) -> String {
    match answer_field.rfind("####") {
        Some(i) => answer_field[i + 4..].trim().to_string(),
        None => answer_field.trim().to_string(),
    }
}

/// Markers after which a response states its final answer; matched ASCII-case-insensitively.
const MARKERS: [&str; 5] = ["####", "answer is", "答案是", "答案：", "答案:"];

/// A number: sign, digits with optional thousands commas, optional decimals.
static NUMBER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?").expect("valid regex"));

/// The final answer a response states: the text after the last marker (`####`, "answer is" in any
/// case, "答案是", "答案："), up to the end of that sentence, without trailing `.`, `。`, `!` or
/// whitespace; without any marker (or with nothing after it), the last number in the response
/// (with its sign, thousands commas removed). None when neither is found.
pub fn extract_answer(response: &str) -> Option<String> {
    extract_final_answer(response).or_else(|| last_number(response))
}

/// The final answer a response states after its last marker (`####`, "answer is" in any case,
/// "答案是", "答案："), up to the end of that sentence, without trailing `.`, `。`, `!` or
/// whitespace; None without a marker or with nothing after it.
pub fn extract_final_answer(response: &str) -> Option<String> {
    // ASCII lowercasing keeps byte offsets, so positions found here index `response`.
    let lower = response.to_ascii_lowercase();
    let last = MARKERS
        .iter()
        .filter_map(|m| lower.rfind(m).map(|i| (i, i + m.len())))
        .max_by_key(|&(start, _)| start);
    if let Some((_, end)) = last {
        let rest = response[end..].trim_start_matches(|c: char| {
            c.is_whitespace() || matches!(c, ':' | '：' | ',' | '，')
        });
        let sentence = &rest[..sentence_end(rest)];
        let answer = sentence
            .trim_end_matches(|c: char| c.is_whitespace() || matches!(c, '.' | '。' | '!' | '！'));
        if !answer.is_empty() {
            return Some(answer.to_string());
        }
    }
    None
}

/// Byte offset where the first sentence of `s` ends (exclusive of what follows): at a newline, a
/// `。`, `!`, `！`, `?`, `？`, or a `.` followed by whitespace or the end (so "3.5" stays whole).
fn sentence_end(s: &str) -> usize {
    let mut it = s.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        match c {
            '\n' | '\r' => return i,
            '。' | '!' | '！' | '?' | '？' => return i + c.len_utf8(),
            '.' => match it.peek() {
                None => return i + 1,
                Some((_, n)) if n.is_whitespace() => return i + 1,
                _ => {}
            },
            _ => {}
        }
    }
    s.len()
}

/// The last number in `s`, thousands commas removed; a sign right after a letter or digit ("7-5")
/// is an operator, not a sign.
fn last_number(s: &str) -> Option<String> {
    let m = NUMBER.find_iter(s).last()?;
    let mut text = m.as_str();
    if text.starts_with(['-', '+'])
        && s[..m.start()]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric())
    {
        text = &text[1..];
    }
    Some(text.replace(',', ""))
}

/// Canonical form for comparing answers: trimmed, lowercased, trailing `.`, `。`, `!`, `！`
/// removed, thousands commas inside numbers removed ("1,234" → "1234"), runs of whitespace
/// collapsed to one space; a number (optionally with a leading `$`) is written canonically, so
/// "8.0", "+8" and "$8" all become "8".
pub fn normalize(s: &str) -> String {
    let s = s
        .trim()
        .trim_end_matches(|c: char| c.is_whitespace() || matches!(c, '.' | '。' | '!' | '！'))
        .to_lowercase();
    let s = remove_thousands_commas(&s);
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let num = s.strip_prefix('$').unwrap_or(&s);
    let plain = num.strip_prefix('+').unwrap_or(num);
    if !plain.is_empty()
        && plain
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.' || c == '-')
        && let Ok(v) = plain.parse::<f64>()
        && v.is_finite()
    {
        return canonical_number(v);
    }
    s
}

fn canonical_number(v: f64) -> String {
    let v = if v == 0.0 { 0.0 } else { v }; // -0 → 0
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Drops a comma that sits between a digit and exactly three digits ("1,234,567" → "1234567"),
/// leaving list commas ("3,9" and "3, 9") alone.
fn remove_thousands_commas(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    for (i, &c) in chars.iter().enumerate() {
        if c == ','
            && i > 0
            && chars[i - 1].is_ascii_digit()
            && chars.len() >= i + 4
            && chars[i + 1..i + 4].iter().all(|d| d.is_ascii_digit())
            && chars.get(i + 4).is_none_or(|d| !d.is_ascii_digit())
        {
            continue;
        }
        out.push(c);
    }
    out
}

/// A programmatic reward: 1.0 when the response passes, 0.0 when it does not.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rule {
    /// The response's final answer ([`extract_answer`]) equals the prompt's reference answer
    /// ([`gold_answer`] of its `answer` field), both [`normalize`]d.
    ExactAnswer,
    /// As `ExactAnswer`, but only an answer stated after a marker counts
    /// ([`extract_final_answer`]; no last-number fallback).
    FinalAnswer,
    /// The response matches the regular expression (Rust `regex` syntax) anywhere.
    Regex { pattern: String },
}

impl Rule {
    /// Checks the rule (compiles a pattern) once; score responses with the result.
    pub fn compile(&self) -> Result<CompiledRule, String> {
        let regex =
            match self {
                Rule::ExactAnswer | Rule::FinalAnswer => None,
                Rule::Regex { pattern } => Some(Regex::new(pattern).map_err(|e| {
                    format!("rule regex:{pattern}: invalid pattern {pattern:?}: {e}")
                })?),
            };
        Ok(CompiledRule {
            rule: self.clone(),
            regex,
        })
    }

    /// Scores one response (compiling the rule each call; use [`Rule::compile`] for many).
    pub fn score(&self, response: &str, answer: Option<&str>) -> Result<f32, String> {
        self.compile()?.score(response, answer)
    }

    /// Whether scoring needs the prompt's reference answer.
    pub fn needs_answer(&self) -> bool {
        matches!(self, Rule::ExactAnswer | Rule::FinalAnswer)
    }
}

/// `exact_answer`, `final_answer` or `regex:<pattern>`, as [`parse_rule`] reads it.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::ExactAnswer => write!(f, "exact_answer"),
            Rule::FinalAnswer => write!(f, "final_answer"),
            Rule::Regex { pattern } => write!(f, "regex:{pattern}"),
        }
    }
}

/// A [`Rule`] ready to score: its pattern compiled.
#[derive(Clone, Debug)]
pub struct CompiledRule {
    rule: Rule,
    regex: Option<Regex>,
}

impl CompiledRule {
    pub fn rule(&self) -> &Rule {
        &self.rule
    }

    /// 1.0 or 0.0; an error when the rule needs the prompt's answer and `answer` is None.
    pub fn score(&self, response: &str, answer: Option<&str>) -> Result<f32, String> {
        match (&self.rule, &self.regex) {
            (rule @ (Rule::ExactAnswer | Rule::FinalAnswer), _) => {
                let answer = answer.ok_or_else(|| {
                    format!(
                        "rule {rule} needs the prompt's reference answer, but the prompt has \
                         none; give the prompts file an `answer` field (or map one with \
                         columns.answer)"
                    )
                })?;
                let gold = normalize(&gold_answer(answer));
                let stated = if *rule == Rule::FinalAnswer {
                    extract_final_answer(response)
                } else {
                    extract_answer(response)
                };
                let ok = stated.is_some_and(|a| normalize(&a) == gold);
                Ok(if ok { 1.0 } else { 0.0 })
            }
            (Rule::Regex { .. }, Some(re)) => Ok(if re.is_match(response) { 1.0 } else { 0.0 }),
            (Rule::Regex { pattern }, None) => Err(format!("rule regex:{pattern} is not compiled")),
        }
    }
}

/// A rule from a CLI or config string: `exact_answer`, `final_answer` or `regex:<pattern>` (the pattern is
/// compiled here, so a bad one is an error naming it).
pub fn parse_rule(s: &str) -> Result<Rule, String> {
    let t = s.trim();
    let rule = if t == "exact_answer" || t == "exact-answer" {
        Rule::ExactAnswer
    } else if t == "final_answer" || t == "final-answer" {
        Rule::FinalAnswer
    } else if let Some(p) = s.trim_start().strip_prefix("regex:") {
        if p.is_empty() {
            return Err(format!(
                "rule {s:?}: the pattern after `regex:` is empty; write e.g. regex:^ The answer is"
            ));
        }
        Rule::Regex {
            pattern: p.to_string(),
        }
    } else {
        return Err(format!(
            "unknown rule {s:?}; expected `exact_answer`, `final_answer` or `regex:<pattern>`"
        ));
    };
    rule.compile()?;
    Ok(rule)
}
