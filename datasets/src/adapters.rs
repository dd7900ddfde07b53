//! Adapters for two real preference formats:
//! - Anthropic HH-RLHF (`{"chosen", "rejected"}` whole transcripts `\n\nHuman: …\n\nAssistant: …`);
//! - OpenAssistant message trees (`prompt` → `replies` recursively, sibling assistant replies ranked
//!   by humans, rank 0 = best).
//!
//! Each is read two ways: flattened into the HH text format ([`read_hh_rlhf`], [`read_oasst`]), or
//! as multi-turn conversations of [`Message`]s for a chat template ([`read_hh_rlhf_chat`],
//! [`read_oasst_chat`]), with the same records kept and left out.

use crate::chat::{ChatComparison, ChatRankedGroup, Conversation, Message};
use crate::error::{DataError, Result};
use crate::preference::{Comparison, RankedGroup};
use crate::read::{Format, read_records};
use crate::records::Demonstration;
use serde_json::Value;
use std::path::Path;

const ASSISTANT: &str = "\n\nAssistant:";
const HUMAN: &str = "\n\nHuman:";

/// HH-RLHF pairs, split into prompt (up to and including the last `\n\nAssistant:`) and replies.
#[derive(Debug, Default)]
pub struct HhRlhf {
    pub comparisons: Vec<Comparison>,
    /// Lines whose chosen and rejected transcripts differ before the last assistant turn; they
    /// are not comparisons of two replies to one prompt and are left out.
    pub mismatched_prompt_lines: Vec<usize>,
}

/// Splits a transcript at its last `\n\nAssistant:` into (prompt, reply); the reply loses the one
/// space after the colon.
pub fn split_transcript(t: &str) -> Option<(&str, &str)> {
    let at = t.rfind(ASSISTANT)? + ASSISTANT.len();
    let (prompt, reply) = t.split_at(at);
    Some((prompt, reply.strip_prefix(' ').unwrap_or(reply)))
}

pub fn read_hh_rlhf(path: &Path) -> Result<HhRlhf> {
    let recs = read_records(path, Some(Format::Jsonl))?;
    let mut out = HhRlhf::default();
    for rec in recs {
        let get = |k: &str| match rec.fields.get(k) {
            Some(Value::String(s)) => Ok(s.as_str()),
            _ => Err(DataError::at(
                path,
                rec.line,
                Some(k),
                "missing or not a string (expected an HH-RLHF transcript)",
            )),
        };
        let (chosen, rejected) = (get("chosen")?, get("rejected")?);
        let no_turn = |k: &str| {
            DataError::at(
                path,
                rec.line,
                Some(k),
                "transcript has no `\\n\\nAssistant:` turn",
            )
        };
        let (pc, c) = split_transcript(chosen).ok_or_else(|| no_turn("chosen"))?;
        let (pr, r) = split_transcript(rejected).ok_or_else(|| no_turn("rejected"))?;
        if pc != pr {
            out.mismatched_prompt_lines.push(rec.line);
            continue;
        }
        out.comparisons.push(Comparison {
            prompt_id: String::new(),
            prompt: pc.to_string(),
            labeler_id: String::new(),
            chosen_id: String::new(),
            chosen: c.to_string(),
            rejected_id: String::new(),
            rejected: r.to_string(),
            margin: None,
            tie: false,
        });
    }
    Ok(out)
}

/// A transcript `\n\nHuman: …\n\nAssistant: …` as its turns: `Human` → user, `Assistant` →
/// assistant, each content the text up to the next turn with the one space after the colon
/// removed (as [`split_transcript`] does; nothing else is trimmed, so the last turn's content is
/// the reply `split_transcript` gives). `None` when the transcript does not start with a turn.
pub fn transcript_messages(t: &str) -> Option<Vec<Message>> {
    let mut starts: Vec<(usize, &str, &str)> = t
        .match_indices(HUMAN)
        .map(|(at, m)| (at, m, "user"))
        .chain(
            t.match_indices(ASSISTANT)
                .map(|(at, m)| (at, m, "assistant")),
        )
        .collect();
    starts.sort_unstable_by_key(|&(at, ..)| at);
    if starts.first().is_none_or(|&(at, ..)| at != 0) {
        return None;
    }
    let ends = starts.iter().skip(1).map(|&(at, ..)| at).chain([t.len()]);
    Some(
        starts
            .iter()
            .zip(ends)
            .map(|(&(at, marker, role), end)| {
                let text = &t[at + marker.len()..end];
                Message::new(role, text.strip_prefix(' ').unwrap_or(text))
            })
            .collect(),
    )
}

/// HH-RLHF pairs as conversations.
#[derive(Debug, Default)]
pub struct HhRlhfChat {
    /// Prompt = the turns before the last assistant turn, chosen / rejected = that turn and what
    /// follows it (one assistant message in HH-RLHF). Line = the record's line.
    pub comparisons: Vec<ChatComparison>,
    /// Lines whose chosen and rejected turns differ before the last assistant turn (the lines
    /// [`read_hh_rlhf`] leaves out); left out.
    pub mismatched_prompt_lines: Vec<usize>,
}

/// HH-RLHF transcripts split into turns ([`transcript_messages`]), the same pairs as
/// [`read_hh_rlhf`] with each prompt a multi-turn conversation.
pub fn read_hh_rlhf_chat(path: &Path) -> Result<HhRlhfChat> {
    let recs = read_records(path, Some(Format::Jsonl))?;
    let mut out = HhRlhfChat::default();
    for rec in recs {
        let turns = |k: &str| -> Result<(Vec<Message>, Vec<Message>)> {
            let Some(Value::String(t)) = rec.fields.get(k) else {
                return Err(DataError::at(
                    path,
                    rec.line,
                    Some(k),
                    "missing or not a string (expected an HH-RLHF transcript)",
                ));
            };
            let mut messages = transcript_messages(t).ok_or_else(|| {
                DataError::at(
                    path,
                    rec.line,
                    Some(k),
                    "the transcript does not start with `\\n\\nHuman:`; an HH-RLHF transcript is \
                     `\\n\\nHuman: …\\n\\nAssistant: …`",
                )
            })?;
            let last = messages
                .iter()
                .rposition(|m| m.role == "assistant")
                .filter(|&i| i > 0)
                .ok_or_else(|| {
                    DataError::at(
                        path,
                        rec.line,
                        Some(k),
                        "transcript has no `\\n\\nAssistant:` turn after a `\\n\\nHuman:` one",
                    )
                })?;
            let reply = messages.split_off(last);
            Ok((messages, reply))
        };
        let (chosen_prompt, chosen) = turns("chosen")?;
        let (rejected_prompt, rejected) = turns("rejected")?;
        if chosen_prompt != rejected_prompt {
            out.mismatched_prompt_lines.push(rec.line);
            continue;
        }
        out.comparisons.push(ChatComparison {
            prompt_id: String::new(),
            prompt: chosen_prompt,
            labeler_id: String::new(),
            chosen_id: String::new(),
            chosen,
            rejected_id: String::new(),
            rejected,
            margin: None,
            tie: false,
            line: rec.line,
        });
    }
    Ok(out)
}

/// OpenAssistant trees as ranked groups and demonstrations.
#[derive(Debug, Default)]
pub struct Oasst {
    /// Sibling assistant replies with human ranks (K ≥ 2); rank = OASST rank + 1, response ids =
    /// the replies' `message_id`s ("1".."K" where one is missing or repeated), line = the line of
    /// the tree.
    pub groups: Vec<RankedGroup>,
    /// Each best-ranked (rank 0) assistant reply with the conversation before it.
    pub demonstrations: Vec<Demonstration>,
}

/// OpenAssistant trees as conversations: [`Oasst`] with each prompt the conversation so far.
#[derive(Debug, Default)]
pub struct OasstChat {
    /// As [`Oasst::groups`], the prompt as messages (`prompter` → user).
    pub groups: Vec<ChatRankedGroup>,
    /// As [`Oasst::demonstrations`]: prompt-completion conversations, the completion the
    /// best-ranked reply. Line = the line of the tree.
    pub conversations: Vec<Conversation>,
}

/// The conversation so far in the HH format: `\n\nHuman: …\n\nAssistant: …\n\nAssistant:`… ending
/// with `\n\nAssistant:` ready for the reply.
fn render(turns: &[Message]) -> String {
    let mut s = String::new();
    for m in turns {
        let who = if m.role == "assistant" {
            "Assistant"
        } else {
            "Human"
        };
        s.push_str(&format!("\n\n{who}: {}", m.content));
    }
    s.push_str(ASSISTANT);
    s
}

/// Sibling assistant replies with human ranks, found by [`walk`] after a conversation.
struct Ranked<'a> {
    /// The message the replies answer.
    parent: &'a Value,
    replies: Vec<(&'a Value, u64)>,
}

impl Ranked<'_> {
    fn text(reply: &Value) -> String {
        reply
            .get("text")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    }

    fn prompt_id(&self, tree_id: &str, depth: usize) -> String {
        self.parent
            .get("message_id")
            .and_then(Value::as_str)
            .map_or_else(|| format!("{tree_id}:{depth}"), str::to_string)
    }

    /// The replies' `message_id`s, or "1".."K" where one is missing or repeated.
    fn response_ids(&self) -> Vec<String> {
        let ids: Vec<String> = self
            .replies
            .iter()
            .map(|(r, _)| r.get("message_id").and_then(Value::as_str).unwrap_or(""))
            .map(str::to_string)
            .collect();
        let unique = ids
            .iter()
            .enumerate()
            .all(|(i, id)| !id.is_empty() && !ids[..i].contains(id));
        if unique {
            ids
        } else {
            (1..=ids.len()).map(|i| i.to_string()).collect()
        }
    }

    fn responses(&self) -> Vec<String> {
        self.replies.iter().map(|(r, _)| Self::text(r)).collect()
    }

    fn ranks(&self) -> Vec<u32> {
        self.replies.iter().map(|(_, k)| *k as u32 + 1).collect()
    }

    /// The best-ranked (rank 0) replies' texts.
    fn best(&self) -> impl Iterator<Item = String> + '_ {
        self.replies
            .iter()
            .filter(|(_, k)| *k == 0)
            .map(|(r, _)| Self::text(r))
    }
}

/// Reads every OpenAssistant tree of `path`, calling `visit(line, tree_id, history, ranked)` at
/// each message with ranked assistant replies, `history` the conversation up to that message.
fn read_trees(path: &Path, mut visit: impl FnMut(usize, &str, &[Message], &Ranked)) -> Result<()> {
    let recs = read_records(path, Some(Format::Jsonl))?;
    for rec in recs {
        let tree_id = rec
            .fields
            .get("message_tree_id")
            .and_then(Value::as_str)
            .unwrap_or("");
        let root = rec.fields.get("prompt").ok_or_else(|| {
            DataError::at(
                path,
                rec.line,
                Some("prompt"),
                "missing (expected an OpenAssistant tree)",
            )
        })?;
        walk(
            path,
            rec.line,
            root,
            &mut Vec::new(),
            &mut |history: &[Message], ranked: &Ranked| visit(rec.line, tree_id, history, ranked),
        )?;
    }
    Ok(())
}

fn walk(
    path: &Path,
    line: usize,
    msg: &Value,
    history: &mut Vec<Message>,
    visit: &mut dyn FnMut(&[Message], &Ranked),
) -> Result<()> {
    let text = msg
        .get("text")
        .and_then(Value::as_str)
        .ok_or_else(|| DataError::at(path, line, Some("text"), "a message has no text"))?;
    let role = match msg.get("role").and_then(Value::as_str) {
        Some("assistant") => "assistant",
        _ => "user",
    };
    history.push(Message::new(role, text));
    let replies: &[Value] = msg
        .get("replies")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let ranked = Ranked {
        parent: msg,
        replies: replies
            .iter()
            .filter(|r| r.get("role").and_then(Value::as_str) == Some("assistant"))
            .filter_map(|r| r.get("rank").and_then(Value::as_u64).map(|k| (r, k)))
            .collect(),
    };
    if !ranked.replies.is_empty() {
        visit(history, &ranked);
    }
    for r in replies {
        walk(path, line, r, history, visit)?;
    }
    history.pop();
    Ok(())
}

pub fn read_oasst(path: &Path) -> Result<Oasst> {
    let mut out = Oasst::default();
    read_trees(path, |line, tree_id, history, ranked| {
        let prompt = render(history);
        if ranked.replies.len() >= 2 {
            out.groups.push(RankedGroup {
                prompt_id: ranked.prompt_id(tree_id, history.len()),
                prompt: prompt.clone(),
                labeler_id: String::new(),
                response_ids: ranked.response_ids(),
                responses: ranked.responses(),
                ranks: ranked.ranks(),
                line,
            });
        }
        for response in ranked.best() {
            out.demonstrations.push(Demonstration {
                prompt: prompt.clone(),
                response,
            });
        }
    })?;
    Ok(out)
}

/// [`read_oasst`] with each prompt the conversation so far as messages.
pub fn read_oasst_chat(path: &Path) -> Result<OasstChat> {
    let mut out = OasstChat::default();
    read_trees(path, |line, tree_id, history, ranked| {
        if ranked.replies.len() >= 2 {
            out.groups.push(ChatRankedGroup {
                prompt_id: ranked.prompt_id(tree_id, history.len()),
                prompt: history.to_vec(),
                labeler_id: String::new(),
                response_ids: ranked.response_ids(),
                responses: ranked.responses(),
                ranks: ranked.ranks(),
                line,
            });
        }
        for response in ranked.best() {
            let mut messages = history.to_vec();
            messages.push(Message::assistant(response));
            out.conversations.push(Conversation {
                messages,
                completion_start: Some(history.len()),
                line,
            });
        }
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcript_splits_at_the_last_assistant_turn() {
        let t = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you";
        let (p, r) = split_transcript(t).unwrap();
        assert_eq!(
            p,
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
        );
        assert_eq!(r, "see you");
        assert_eq!(
            split_transcript("\n\nHuman: x\n\nAssistant:").unwrap().1,
            ""
        );
        assert!(split_transcript("no turns").is_none());
    }
}
