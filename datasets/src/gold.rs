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
//!   numerically ("1,234" = "1234", "8.0" = "8"); or the whole response, [`normalize`]d, equals
//!   the answer (" Stone stone stone." for "stone stone stone", which has no number to find).
//! - [`Rule::FinalAnswer`]: the same, but the answer must be stated after a marker
//!   ([`extract_final_answer`]); a bare number, however right, scores 0. For tasks whose
//!   instructions fix the answer's form (the demo task: "The answer is X.").
//! - [`Rule::NormalizedMatch`]: the whole response is the answer, both [`normalize_text`]ed
//!   (trimmed, lowercased, whitespace runs collapsed, trailing `.`, `。`, `!`, `！` dropped):
//!   " Stone stone stone." scores 1 for "stone stone stone", " Sure! stone stone stone" scores 0;
//!   " 石头。" scores 1 for "石头". Unlike `exact_answer` it never looks for a stated answer inside
//!   a longer response, and it compares numbers as text ("8.0" is not "8").
//! - [`Rule::ContainsAnswer`]: the normalised answer occurs in the normalised response, not inside
//!   a longer ASCII word or number ("the cat sat" contains "cat", "concatenate" does not, "112"
//!   does not contain "12"); next to Chinese characters a plain substring ("我觉得是北京。"
//!   contains "北京").
//! - [`Rule::Numeric`]: the response's answer ([`extract_answer`]), [`normalize`]d, is a number
//!   within the absolute tolerance of the reference number: with `numeric:0.01`, "The answer is
//!   3.141." scores 1 for "3.14" and "答案是3.2。" scores 0. A stated answer with words around the
//!   number ("3.14 metres") is not a number and scores 0.
//! - [`Rule::Choice`]: a multiple-choice letter A–E ([`extract_choice`]: the first standalone
//!   capital A–E after the last "answer is" / "答案是" / "答案：", else the first standalone one
//!   in the response, bare or as "(B)", "B)", "B.", "B:") equals the reference letter: " The
//!   answer is (B)." and " 答案是B。" score 1 for "B", " 47" scores 0.
//! - [`Rule::JsonAnswer`]: the whole response, trimmed, is a JSON object whose `answer` field
//!   equals the reference answer: a string [`normalize`]d on both sides, a number numerically:
//!   ` {"answer": 12}` and ` {"answer": "12.0"}` score 1 for "12", ` {"answer": "北京"}` for
//!   "北京"; " the answer is 12" (no JSON) and ` {"result": 12}` score 0.
//! - [`Rule::Regex`]: the response matches a regular expression.
//!
//! Rules come from configs (serde, `kind = "exact_answer"`, `kind = "numeric", tolerance = 0.01`
//! or `kind = "regex", pattern = "…"`) or from CLI strings ([`parse_rule`]: `exact_answer`,
//! `final_answer`, `normalized_match`, `contains_answer`, `numeric:<tolerance>`, `choice`,
//! `json_answer` or `regex:<pattern>`), and are compiled once ([`Rule::compile`]) so that a bad
//! pattern is an error at load, not at the first response.

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
    /// ([`gold_answer`] of its `answer` field), both [`normalize`]d; or the whole response does.
    ExactAnswer,
    /// As `ExactAnswer`, but only an answer stated after a marker counts
    /// ([`extract_final_answer`]; no last-number fallback).
    FinalAnswer,
    /// The whole response equals the reference answer, both [`normalize_text`]ed.
    NormalizedMatch,
    /// The [`normalize_text`]ed response contains the normalised reference answer, on ASCII word
    /// boundaries ([`contains_on_boundaries`]).
    ContainsAnswer,
    /// The response's answer ([`extract_answer`], [`normalize`]d) is a number within `tolerance`
    /// (absolute) of the reference number.
    Numeric { tolerance: f64 },
    /// The response's multiple-choice letter ([`extract_choice`]) is the reference letter A–E.
    Choice,
    /// The trimmed response is a JSON object whose `answer` equals the reference answer (strings
    /// [`normalize`]d, numbers numerically).
    JsonAnswer,
    /// The response matches the regular expression (Rust `regex` syntax) anywhere.
    Regex { pattern: String },
}

impl Rule {
    /// Checks the rule (compiles a pattern) once; score responses with the result.
    pub fn compile(&self) -> Result<CompiledRule, String> {
        let regex =
            match self {
                Rule::Regex { pattern } => Some(Regex::new(pattern).map_err(|e| {
                    format!("rule regex:{pattern}: invalid pattern {pattern:?}: {e}")
                })?),
                Rule::Numeric { tolerance } => {
                    check_tolerance(*tolerance)?;
                    None
                }
                Rule::ExactAnswer
                | Rule::FinalAnswer
                | Rule::NormalizedMatch
                | Rule::ContainsAnswer
                | Rule::Choice
                | Rule::JsonAnswer => None,
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
        !matches!(self, Rule::Regex { .. })
    }
}

/// `exact_answer`, `final_answer`, `normalized_match`, `contains_answer`, `numeric:<tolerance>`,
/// `choice`, `json_answer` or `regex:<pattern>`, as [`parse_rule`] reads it.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::ExactAnswer => write!(f, "exact_answer"),
            Rule::FinalAnswer => write!(f, "final_answer"),
            Rule::NormalizedMatch => write!(f, "normalized_match"),
            Rule::ContainsAnswer => write!(f, "contains_answer"),
            Rule::Numeric { tolerance } => write!(f, "numeric:{tolerance}"),
            Rule::Choice => write!(f, "choice"),
            Rule::JsonAnswer => write!(f, "json_answer"),
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

    /// 1.0 or 0.0; an error when the rule needs the prompt's answer and `answer` is None, or when
    /// the answer is not of the rule's kind (not a number for `numeric`, not a letter A–E for
    /// `choice`).
    pub fn score(&self, response: &str, answer: Option<&str>) -> Result<f32, String> {
        let rule = &self.rule;
        let reference = || {
            answer.map(gold_answer).ok_or_else(|| {
                format!(
                    "rule {rule} needs the prompt's reference answer, but the prompt has \
                     none; give the prompts file an `answer` field (or map one with \
                     columns.answer)"
                )
            })
        };
        let ok = match rule {
            Rule::Regex { pattern } => self
                .regex
                .as_ref()
                .ok_or_else(|| format!("rule regex:{pattern} is not compiled"))?
                .is_match(response),
            Rule::ExactAnswer | Rule::FinalAnswer => {
                let gold = normalize(&reference()?);
                let stated = if *rule == Rule::FinalAnswer {
                    extract_final_answer(response)
                } else {
                    extract_answer(response)
                };
                stated.is_some_and(|a| normalize(&a) == gold)
                    || (*rule == Rule::ExactAnswer && normalize(response) == gold)
            }
            Rule::NormalizedMatch => normalize_text(response) == normalize_text(&reference()?),
            Rule::ContainsAnswer => {
                contains_on_boundaries(&normalize_text(response), &normalize_text(&reference()?))
            }
            Rule::Numeric { tolerance } => {
                let reference = reference()?;
                let gold = number(&reference).ok_or_else(|| {
                    format!(
                        "rule {rule} needs a numeric reference answer, found {reference:?}; \
                         use exact_answer or normalized_match for answers that are not numbers"
                    )
                })?;
                extract_answer(response)
                    .and_then(|a| number(&a))
                    .is_some_and(|x| (x - gold).abs() <= *tolerance)
            }
            Rule::Choice => {
                let reference = reference()?;
                let gold = reference_letter(&reference).ok_or_else(|| {
                    format!(
                        "rule choice needs a letter A–E as the reference answer, found \
                         {reference:?}"
                    )
                })?;
                extract_choice(response) == Some(gold)
            }
            Rule::JsonAnswer => json_answer_matches(response, &reference()?),
        };
        Ok(if ok { 1.0 } else { 0.0 })
    }
}

fn check_tolerance(tolerance: f64) -> Result<(), String> {
    if tolerance.is_finite() && tolerance >= 0.0 {
        Ok(())
    } else {
        Err(format!(
            "rule numeric:{tolerance}: the tolerance must be a finite number ≥ 0, e.g. numeric:0.01"
        ))
    }
}

/// Canonical form of a whole response for [`Rule::NormalizedMatch`] and
/// [`Rule::ContainsAnswer`]: trimmed, trailing `.`, `。`, `!`, `！` (and whitespace among them)
/// dropped, Unicode-lowercased, runs of whitespace collapsed to one space. Unlike [`normalize`] it
/// leaves numbers as written ("8.0" stays "8.0") and full-width characters as they are.
pub fn normalize_text(s: &str) -> String {
    s.trim()
        .trim_end_matches(|c: char| c.is_whitespace() || matches!(c, '.' | '。' | '!' | '！'))
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `needle` occurs in `haystack` without running into a longer ASCII word or number: an
/// end of the needle that is an ASCII letter or digit must not touch another one, nor continue a
/// decimal ("cat" is in "the cat." but not in "concatenate"; "12" is in "is 12." but not in "112"
/// or "12.5"). An end that is not ASCII (Chinese) needs no boundary: "北京" is in "是北京吧".
/// An empty needle occurs nowhere.
pub fn contains_on_boundaries(haystack: &str, needle: &str) -> bool {
    let (Some(first), Some(last)) = (needle.chars().next(), needle.chars().next_back()) else {
        return false;
    };
    let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    let digit = |c: Option<char>| c.is_some_and(|c| c.is_ascii_digit());
    haystack.match_indices(needle).any(|(i, _)| {
        let mut before = haystack[..i].chars().rev();
        let mut after = haystack[i + needle.len()..].chars();
        let (b1, b2) = (before.next(), before.next());
        let (a1, a2) = (after.next(), after.next());
        let starts = !first.is_ascii_alphanumeric()
            || !(word(b1) || (first.is_ascii_digit() && b1 == Some('.') && digit(b2)));
        let ends = !last.is_ascii_alphanumeric()
            || !(word(a1) || (last.is_ascii_digit() && a1 == Some('.') && digit(a2)));
        starts && ends
    })
}

/// A [`normalize`]d answer as a number; None when it is not one.
fn number(answer: &str) -> Option<f64> {
    normalize(answer)
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
}

/// Markers after which a response states its multiple-choice letter.
const CHOICE_MARKERS: [&str; 4] = ["answer is", "答案是", "答案：", "答案:"];

/// The multiple-choice letter a response gives: the first standalone capital A–E (bare, "(B)",
/// "B)", "B.", "B:") after the last "answer is" (any case), "答案是" or "答案：", else the first
/// standalone one in the whole response. Standalone: no ASCII letter or digit right before or
/// after it. None when there is none.
pub fn extract_choice(response: &str) -> Option<char> {
    let lower = response.to_ascii_lowercase();
    let after_marker = CHOICE_MARKERS
        .iter()
        .filter_map(|m| lower.rfind(m).map(|i| (i, i + m.len())))
        .max_by_key(|&(start, _)| start)
        .and_then(|(_, end)| first_letter(&response[end..]));
    after_marker.or_else(|| first_letter(response))
}

fn first_letter(s: &str) -> Option<char> {
    let chars: Vec<char> = s.chars().collect();
    let word = |c: Option<&char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    (0..chars.len()).find_map(|i| {
        let c = chars[i];
        let standalone = ('A'..='E').contains(&c)
            && !word(i.checked_sub(1).and_then(|j| chars.get(j)))
            && !word(chars.get(i + 1));
        standalone.then_some(c)
    })
}

/// The reference letter: "B", "b", "(B)" or "B." → 'B'; None for anything else.
fn reference_letter(reference: &str) -> Option<char> {
    let t = reference
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(['.', ')', ':', '。']);
    let mut chars = t.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if ('A'..='E').contains(&c.to_ascii_uppercase()) => {
            Some(c.to_ascii_uppercase())
        }
        _ => None,
    }
}

/// Whether the trimmed response is a JSON object whose `answer` equals `reference`: a string both
/// [`normalize`]d, a number compared numerically with the reference as a number.
fn json_answer_matches(response: &str, reference: &str) -> bool {
    let Ok(serde_json::Value::Object(map)) =
        serde_json::from_str::<serde_json::Value>(response.trim())
    else {
        return false;
    };
    match map.get("answer") {
        Some(serde_json::Value::String(s)) => normalize(s) == normalize(reference),
        Some(serde_json::Value::Number(n)) => n
            .as_f64()
            .zip(number(reference))
            .is_some_and(|(x, gold)| x == gold),
        _ => false,
    }
}

/// A rule from a CLI or config string: `exact_answer`, `final_answer`, `normalized_match`,
/// `contains_answer`, `numeric:<tolerance>` (e.g. `numeric:0.01`), `choice`, `json_answer` or
/// `regex:<pattern>` (dashes for underscores too; the pattern is compiled here, so a bad one is an
/// error naming it).
pub fn parse_rule(s: &str) -> Result<Rule, String> {
    let t = s.trim();
    let name = t.replace('-', "_");
    let rule = match name.as_str() {
        "exact_answer" => Rule::ExactAnswer,
        "final_answer" => Rule::FinalAnswer,
        "normalized_match" => Rule::NormalizedMatch,
        "contains_answer" => Rule::ContainsAnswer,
        "choice" => Rule::Choice,
        "json_answer" => Rule::JsonAnswer,
        _ => {
            if let Some(p) = s.trim_start().strip_prefix("regex:") {
                if p.is_empty() {
                    return Err(format!(
                        "rule {s:?}: the pattern after `regex:` is empty; write e.g. regex:^ The answer is"
                    ));
                }
                Rule::Regex {
                    pattern: p.to_string(),
                }
            } else if let Some(tol) = t.strip_prefix("numeric:") {
                let tolerance = tol.trim().parse::<f64>().map_err(|_| {
                    format!(
                        "rule {s:?}: the tolerance after `numeric:` must be a number, found \
                         {tol:?}; write e.g. numeric:0.01"
                    )
                })?;
                Rule::Numeric { tolerance }
            } else if t == "numeric" {
                return Err(format!(
                    "rule {s:?}: give the absolute tolerance, e.g. numeric:0.01 (numeric:0 for exact)"
                ));
            } else {
                return Err(format!(
                    "unknown rule {s:?}; expected `exact_answer`, `final_answer`, \
                     `normalized_match`, `contains_answer`, `numeric:<tolerance>`, `choice`, \
                     `json_answer` or `regex:<pattern>`"
                ));
            }
        }
    };
    rule.compile()?;
    Ok(rule)
}
