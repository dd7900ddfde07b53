//! Conversational records in TRL's dataset formats
//! (<https://huggingface.co/docs/trl/dataset_formats>), read from JSONL, JSONL.gz or Parquet by
//! the machinery of [`crate::records`] (column renames included):
//! - SFT ([`load_conversations`], [`load_sft_records`]): `messages` (language modeling: the whole
//!   conversation), or `prompt` and `completion`, both message lists (prompt-completion: the
//!   completion's turns are the trained ones);
//! - prompts ([`load_chat_prompts`], [`load_prompt_records`]): `prompt`, a message list ending with
//!   a user (or tool) turn, and the optional `answer`;
//! - preferences ([`load_chat_comparisons`], [`load_preference_records`]): `prompt`, `chosen` and
//!   `rejected` message lists, or `chosen` and `rejected` alone (the implicit prompt: their shared
//!   leading turns, as TRL's `extract_prompt`).
//!
//! A message is `{"role", "content"}`: role `system`, `user`, `assistant` or `tool` (the roles
//! TRL's `data_utils` accepts; a tool turn is rendered by the template and never trained), content
//! a string. Other keys of a message are ignored, except `tool_calls`, which [`Message`] cannot
//! carry and is refused rather than dropped. CSV cannot hold lists: a conversational field in a
//! CSV file is an error that says to write JSONL or Parquet.
//!
//! It renders nothing: [`crate::tokenize::tokenize_conversation`] applies a model's chat template.

use crate::error::{DataError, Result};
use crate::preference::{Comparison, RankedGroup};
use crate::read::{Format, Record};
use crate::records::{
    Demonstration, Fields, PromptRecord, Source, answer, comparison, demonstration, load,
    prompt_record,
};
pub use model::chat::Message;
use serde_json::Value;

/// The roles a message may have.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// A conversation to fine-tune on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
    /// TRL's prompt-completion form: `messages[completion_start..]` is the completion, and the loss
    /// covers it only (TRL's `completion_only_loss`, on by default for prompt-completion data).
    /// `None` for the `messages` form, whose loss covers the whole sequence unless
    /// `assistant_only_loss`; set it to `None` to train a prompt-completion record whole.
    #[serde(default)]
    pub completion_start: Option<usize>,
    /// Line (or Parquet row) of the record in its file; 0 if unknown.
    #[serde(default)]
    pub line: usize,
}

impl Conversation {
    /// The messages before the completion (empty for the `messages` form).
    pub fn prompt(&self) -> &[Message] {
        &self.messages[..self.completion_start.unwrap_or(0)]
    }

    /// The completion's messages (all of them for the `messages` form).
    pub fn completion(&self) -> &[Message] {
        &self.messages[self.completion_start.unwrap_or(0)..]
    }
}

/// An SFT file's records: plain (`prompt`/`response` strings) or conversational.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SftRecords {
    Plain(Vec<Demonstration>),
    Chat(Vec<Conversation>),
}

/// A conversational prompt (PPO rollouts, evaluation): the model writes the next assistant turn.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatPrompt {
    /// Ends with a `user` or `tool` message.
    pub messages: Vec<Message>,
    /// The optional `answer` field (a string or a number), for rule rewards and gold scoring.
    #[serde(default)]
    pub answer: Option<String>,
    /// Line (or Parquet row) of the record in its file.
    #[serde(default)]
    pub line: usize,
}

/// A prompt file's records: plain (`prompt` strings) or conversational.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromptRecords {
    Plain(Vec<PromptRecord>),
    Chat(Vec<ChatPrompt>),
}

/// One pairwise judgement of two conversation continuations (reward model, DPO): `prompt` followed
/// by `chosen` is better than followed by `rejected`, unless `tie` (see [`Comparison`]).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatComparison {
    /// Empty when unknown.
    #[serde(default)]
    pub prompt_id: String,
    /// The shared turns; ends with a `user` or `tool` message.
    pub prompt: Vec<Message>,
    /// Empty for an anonymous labeler.
    #[serde(default)]
    pub labeler_id: String,
    /// Empty when unknown.
    #[serde(default)]
    pub chosen_id: String,
    /// The better continuation: at least one message, an assistant one among them.
    pub chosen: Vec<Message>,
    /// Empty when unknown.
    #[serde(default)]
    pub rejected_id: String,
    pub rejected: Vec<Message>,
    /// How much better `chosen` is; None when unknown.
    #[serde(default)]
    pub margin: Option<f64>,
    #[serde(default)]
    pub tie: bool,
    /// Line (or Parquet row) of the record in its file; 0 if unknown.
    #[serde(default)]
    pub line: usize,
}

/// A preference file's records: plain (`prompt`/`chosen`/`rejected` strings) or conversational.
#[derive(Clone, Debug, PartialEq)]
pub enum PreferenceRecords {
    Plain(Vec<Comparison>),
    Chat(Vec<ChatComparison>),
}

/// K ≥ 2 assistant replies to one conversational prompt ranked by one labeler (rank 1 = best);
/// [`RankedGroup`] with the prompt as messages.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatRankedGroup {
    pub prompt_id: String,
    pub prompt: Vec<Message>,
    #[serde(default)]
    pub labeler_id: String,
    pub response_ids: Vec<String>,
    /// The assistant replies' texts.
    pub responses: Vec<String>,
    pub ranks: Vec<u32>,
    #[serde(default)]
    pub line: usize,
}

impl ChatRankedGroup {
    /// Every pair of the group as [`RankedGroup::pairs`] makes them, each reply one assistant
    /// message.
    pub fn pairs(&self, keep_ties: bool) -> Vec<ChatComparison> {
        let flat = RankedGroup {
            prompt_id: self.prompt_id.clone(),
            prompt: String::new(),
            labeler_id: self.labeler_id.clone(),
            response_ids: self.response_ids.clone(),
            responses: self.responses.clone(),
            ranks: self.ranks.clone(),
            line: self.line,
        };
        flat.pairs(keep_ties)
            .into_iter()
            .map(|c| ChatComparison {
                prompt_id: c.prompt_id,
                prompt: self.prompt.clone(),
                labeler_id: c.labeler_id,
                chosen_id: c.chosen_id,
                chosen: vec![Message::assistant(c.chosen)],
                rejected_id: c.rejected_id,
                rejected: vec![Message::assistant(c.rejected)],
                margin: c.margin,
                tie: c.tie,
                line: self.line,
            })
            .collect()
    }
}

/// TRL's `extract_prompt`: the longest run of leading turns `chosen` and `rejected` share is the
/// prompt, the rest of each its continuation. `None` when they share no turn, or when one is the
/// other or a prefix of it (nothing is left to compare).
pub fn extract_prompt(
    chosen: &[Message],
    rejected: &[Message],
) -> Option<(Vec<Message>, Vec<Message>, Vec<Message>)> {
    let shared = chosen
        .iter()
        .zip(rejected)
        .take_while(|(c, r)| c == r)
        .count();
    if shared == 0 || shared == chosen.len() || shared == rejected.len() {
        return None;
    }
    Some((
        chosen[..shared].to_vec(),
        chosen[shared..].to_vec(),
        rejected[shared..].to_vec(),
    ))
}

fn is_csv(src: &Source) -> bool {
    src.format
        .or_else(|| Format::from_path(&src.path).ok())
        .is_some_and(|f| f == Format::Csv)
}

const CSV_LISTS: &str = "a CSV cell cannot hold a list of messages; write the file as JSONL \
                         (.jsonl, .jsonl.gz: one JSON object per line) or Parquet";

/// `found` shortened to 60 bytes for a message.
fn shown(found: &Value) -> String {
    let s = found.to_string();
    if s.len() > 60 {
        format!("{}…", &s[..s.floor_char_boundary(60)])
    } else {
        s
    }
}

/// Whether a record's `field` holds a list (a conversational field).
fn is_list(f: &Fields, field: &str) -> bool {
    matches!(f.present(field), Some(Value::Array(_)))
}

/// The list of messages in `field`, each checked, errors naming the message as `field[i].role`.
fn messages(f: &Fields, field: &str) -> Result<Vec<Message>> {
    let col = f.src.column(field);
    let at = |sub: String, msg: String| DataError::at(f.path, f.rec.line, Some(&sub), msg);
    let list = match f.value(field)? {
        Value::Array(list) => list,
        Value::String(_) if is_csv(f.src) => return Err(f.err(field, CSV_LISTS.into())),
        other => {
            return Err(f.type_err(
                field,
                "a list of messages [{\"role\": ..., \"content\": ...}, ...]",
                other,
            ));
        }
    };
    if list.is_empty() {
        return Err(f.err(
            field,
            "the list of messages is empty; give at least one {\"role\", \"content\"} message or drop the record"
                .into(),
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(at(
                format!("{col}[{i}]"),
                format!(
                    "expected a message {{\"role\": ..., \"content\": ...}}, found {}",
                    shown(m)
                ),
            ));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
            None | Some(Value::Null) => {
                return Err(at(
                    format!("{col}[{i}].role"),
                    "missing; each message needs a role: system, user, assistant or tool".into(),
                ));
            }
            Some(other) => {
                return Err(at(
                    format!("{col}[{i}].role"),
                    format!(
                        "unknown role {}; use system, user, assistant or tool (map other names, \
                         e.g. human or prompter → user, gpt → assistant, before loading)",
                        shown(other)
                    ),
                ));
            }
        };
        if m.get("tool_calls").is_some_and(|t| !t.is_null()) {
            return Err(at(
                format!("{col}[{i}].tool_calls"),
                "tool calls are not supported (a message holds role and content only); \
                 write the call into the content or drop the record"
                    .into(),
            ));
        }
        let content = match m.get("content") {
            Some(Value::String(c)) => c.clone(),
            None | Some(Value::Null) => {
                return Err(at(
                    format!("{col}[{i}].content"),
                    "missing; each message needs its text as a string in content".into(),
                ));
            }
            Some(other) => {
                return Err(at(
                    format!("{col}[{i}].content"),
                    format!(
                        "expected a string, found {}; content parts (lists of {{type, text}}) are \
                         not supported: join the text into one string",
                        shown(other)
                    ),
                ));
            }
        };
        out.push(Message { role, content });
    }
    Ok(out)
}

fn has_assistant(messages: &[Message]) -> bool {
    messages.iter().any(|m| m.role == "assistant")
}

/// Checks that a prompt ends with a turn the model answers (user or tool).
fn check_prompt_end(f: &Fields, field: &str, prompt: &[Message]) -> Result<()> {
    match prompt.last() {
        Some(last) if last.role == "user" || last.role == "tool" => Ok(()),
        Some(last) => Err(f.err(
            field,
            format!(
                "the prompt ends with a `{}` message; it must end with a user (or tool) message, \
                 which the model answers (continuing a final assistant message is not supported)",
                last.role
            ),
        )),
        None => Err(f.err(field, "the prompt has no messages".into())),
    }
}

/// One conversational SFT record: `messages`, or `prompt` and `completion`.
fn conversation(f: &Fields) -> Result<Conversation> {
    if f.present("messages").is_some() {
        let messages = messages(f, "messages")?;
        if !has_assistant(&messages) {
            return Err(f.err(
                "messages",
                "no assistant message: SFT learns the assistant's turns, so a conversation needs \
                 at least one {\"role\": \"assistant\", ...}"
                    .into(),
            ));
        }
        return Ok(Conversation {
            messages,
            completion_start: None,
            line: f.rec.line,
        });
    }
    if f.present("prompt").is_none() {
        return Err(f.err(
            "messages",
            "column missing: a conversational SFT record holds `messages` (a list of {role, \
             content}) or `prompt` and `completion` (both lists); map differently named columns \
             with columns.messages = \"<column name>\""
                .into(),
        ));
    }
    let mut all = messages(f, "prompt")?;
    let completion = messages(f, "completion")?;
    if !has_assistant(&completion) {
        return Err(f.err(
            "completion",
            "no assistant message: the completion is what SFT trains, so it needs at least one \
             {\"role\": \"assistant\", ...}"
                .into(),
        ));
    }
    let start = all.len();
    all.extend(completion);
    Ok(Conversation {
        messages: all,
        completion_start: Some(start),
        line: f.rec.line,
    })
}

/// Conversational SFT records: `messages` (at least one assistant turn), or `prompt` and
/// `completion` message lists (the completion holds an assistant turn). The form may differ from
/// record to record.
pub fn load_conversations(src: &Source) -> Result<Vec<Conversation>> {
    load(src, conversation)
}

/// Whether an SFT record is conversational: it has `messages`, or a list `prompt`.
fn is_chat_sft(f: &Fields) -> bool {
    f.present("messages").is_some() || is_list(f, "prompt")
}

/// The error for a record whose kind differs from the first record's.
fn mixed(f: &Fields, field: &str, first_line: usize, chat: bool, plain_form: &str) -> DataError {
    let (this, first) = if chat {
        ("conversational (message lists)", plain_form)
    } else {
        (plain_form, "conversational (message lists)")
    };
    f.err(
        field,
        format!(
            "this record is {this} but the file's first record (line {first_line}) is {first}; \
             a file holds one kind of record: split it in two, or convert the plain records to \
             message lists"
        ),
    )
}

fn fields_of<'a>(src: &'a Source, rec: &'a Record) -> Fields<'a> {
    Fields {
        path: &src.path,
        src,
        rec,
    }
}

/// Decides the kind of a file by its first record, then reads every record as that kind.
fn load_either<P, C>(
    src: &Source,
    field: &str,
    plain_form: &str,
    is_chat: impl Fn(&Fields) -> bool,
    plain: impl Fn(&Fields) -> Result<P>,
    chat: impl Fn(&Fields) -> Result<C>,
) -> Result<(Vec<P>, Vec<C>)> {
    let recs = src.records()?;
    let fields = |rec| fields_of(src, rec);
    let Some(first) = recs.first().map(fields) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let first_chat = is_chat(&first);
    if is_csv(src) && first.present("messages").is_some() {
        return Err(first.err("messages", CSV_LISTS.into()));
    }
    let (mut plains, mut chats) = (Vec::new(), Vec::new());
    for rec in &recs {
        let f = fields(rec);
        let this_chat = is_chat(&f);
        if this_chat != first_chat {
            return Err(mixed(&f, field, first.rec.line, this_chat, plain_form));
        }
        if first_chat {
            chats.push(chat(&f)?);
        } else {
            plains.push(plain(&f)?);
        }
    }
    Ok((plains, chats))
}

/// SFT records of either kind, decided by the first record: conversational when it has
/// `messages` or a list `prompt` ([`load_conversations`]), plain `prompt`/`response` otherwise
/// ([`crate::load_demonstrations`]). Every record must be of the first one's kind.
pub fn load_sft_records(src: &Source) -> Result<SftRecords> {
    let (plain, chat) = load_either(
        src,
        "prompt",
        "plain (`prompt`/`response` strings)",
        is_chat_sft,
        demonstration,
        conversation,
    )?;
    Ok(if chat.is_empty() {
        SftRecords::Plain(plain)
    } else {
        SftRecords::Chat(chat)
    })
}

fn chat_prompt(f: &Fields) -> Result<ChatPrompt> {
    let messages = messages(f, "prompt")?;
    check_prompt_end(f, "prompt", &messages)?;
    Ok(ChatPrompt {
        messages,
        answer: answer(f)?,
        line: f.rec.line,
    })
}

/// Conversational prompts: `prompt`, a message list ending with a user (or tool) message, and the
/// optional `answer` (a string or a number).
pub fn load_chat_prompts(src: &Source) -> Result<Vec<ChatPrompt>> {
    load(src, chat_prompt)
}

/// Prompts of either kind, decided by the first record: conversational when its `prompt` is a
/// list ([`load_chat_prompts`]), plain strings otherwise ([`crate::load_prompts`]).
pub fn load_prompt_records(src: &Source) -> Result<PromptRecords> {
    let (plain, chat) = load_either(
        src,
        "prompt",
        "plain (a `prompt` string)",
        |f| is_list(f, "prompt"),
        prompt_record,
        chat_prompt,
    )?;
    Ok(if chat.is_empty() {
        PromptRecords::Plain(plain)
    } else {
        PromptRecords::Chat(chat)
    })
}

/// A continuation (`chosen` or `rejected`) must hold an assistant message.
fn check_continuation(f: &Fields, field: &str, continuation: &[Message]) -> Result<()> {
    if has_assistant(continuation) {
        Ok(())
    } else {
        Err(f.err(
            field,
            "no assistant message after the prompt: a preference compares two assistant replies, \
             so each continuation needs an {\"role\": \"assistant\", ...} message"
                .into(),
        ))
    }
}

fn chat_comparison(f: &Fields) -> Result<ChatComparison> {
    let chosen = messages(f, "chosen")?;
    let rejected = messages(f, "rejected")?;
    // As TRL's maybe_extract_prompt: a prompt that is not a message list (absent, or a string
    // beside conversational chosen/rejected) is implicit in chosen and rejected.
    let (prompt, chosen, rejected) = if is_list(f, "prompt") {
        (messages(f, "prompt")?, chosen, rejected)
    } else {
        extract_prompt(&chosen, &rejected).ok_or_else(|| {
            f.err(
                "chosen",
                "no `prompt` list, and chosen and rejected do not share leading turns followed by \
                 different ones, so the prompt cannot be taken from them (TRL's extract_prompt); \
                 give the prompt as a `prompt` message list, or make chosen and rejected full \
                 conversations that start with the same turns and differ after them"
                    .into(),
            )
        })?
    };
    check_prompt_end(f, "prompt", &prompt)?;
    check_continuation(f, "chosen", &chosen)?;
    check_continuation(f, "rejected", &rejected)?;
    Ok(ChatComparison {
        prompt_id: f.opt_string("prompt_id")?,
        prompt,
        labeler_id: f.opt_string("labeler_id")?,
        chosen_id: f.opt_string("chosen_id")?,
        chosen,
        rejected_id: f.opt_string("rejected_id")?,
        rejected,
        margin: f.opt_f64("margin")?,
        tie: f.opt_bool("tie")?,
        line: f.rec.line,
    })
}

/// Conversational comparisons: `chosen` and `rejected` message lists with `prompt` a message list
/// (explicit prompt), or without one (implicit prompt: [`extract_prompt`] of chosen and
/// rejected, as TRL's `maybe_extract_prompt`, which also ignores a string `prompt` beside
/// conversational chosen/rejected). The prompt must end with a user (or tool) message and each
/// continuation hold an assistant message. Optional fields as [`crate::load_comparisons`].
pub fn load_chat_comparisons(src: &Source) -> Result<Vec<ChatComparison>> {
    load(src, chat_comparison)
}

/// Comparisons of either kind, decided by the first record: conversational when its `chosen` is a
/// list ([`load_chat_comparisons`]), plain strings otherwise ([`crate::load_comparisons`]).
pub fn load_preference_records(src: &Source) -> Result<PreferenceRecords> {
    let (plain, chat) = load_either(
        src,
        "chosen",
        "plain (`prompt`/`chosen`/`rejected` strings)",
        |f| is_list(f, "chosen"),
        comparison,
        chat_comparison,
    )?;
    Ok(if chat.is_empty() {
        PreferenceRecords::Plain(plain)
    } else {
        PreferenceRecords::Chat(chat)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extract_prompt_takes_the_shared_leading_turns() {
        let u = Message::user("What color is the sky?");
        let (blue, green) = (Message::assistant("blue"), Message::assistant("green"));
        let (p, c, r) = extract_prompt(&[u.clone(), blue.clone()], &[u.clone(), green.clone()])
            .expect("a shared prompt");
        assert_eq!(
            (p, c, r),
            (vec![u.clone()], vec![blue.clone()], vec![green])
        );
        // Identical, one a prefix of the other, or nothing shared: no prompt to extract.
        assert!(extract_prompt(&[u.clone(), blue.clone()], &[u.clone(), blue.clone()]).is_none());
        assert!(extract_prompt(std::slice::from_ref(&u), &[u.clone(), blue.clone()]).is_none());
        assert!(extract_prompt(std::slice::from_ref(&blue), &[u]).is_none());
    }
}
