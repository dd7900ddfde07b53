//! Adapters for two real preference formats:
//! - Anthropic HH-RLHF (`{"chosen", "rejected"}` whole transcripts `\n\nHuman: …\n\nAssistant: …`);
//! - OpenAssistant message trees (`prompt` → `replies` recursively, sibling assistant replies ranked
//!   by humans, rank 0 = best).

use crate::error::{DataError, Result};
use crate::preference::{Comparison, RankedGroup};
use crate::read::{Format, read_records};
use crate::records::Demonstration;
use serde_json::Value;
use std::path::Path;

const ASSISTANT: &str = "\n\nAssistant:";

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

/// The conversation so far in the HH format: `\n\nHuman: …\n\nAssistant: …\n\nAssistant:`… ending
/// with `\n\nAssistant:` ready for the reply.
fn render(turns: &[(String, String)]) -> String {
    let mut s = String::new();
    for (role, text) in turns {
        let who = if role == "assistant" {
            "Assistant"
        } else {
            "Human"
        };
        s.push_str(&format!("\n\n{who}: {text}"));
    }
    s.push_str(ASSISTANT);
    s
}

pub fn read_oasst(path: &Path) -> Result<Oasst> {
    let recs = read_records(path, Some(Format::Jsonl))?;
    let mut out = Oasst::default();
    for rec in recs {
        let tree_id = rec
            .fields
            .get("message_tree_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let root = rec.fields.get("prompt").ok_or_else(|| {
            DataError::at(
                path,
                rec.line,
                Some("prompt"),
                "missing (expected an OpenAssistant tree)",
            )
        })?;
        walk(path, rec.line, &tree_id, root, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

fn walk(
    path: &Path,
    line: usize,
    tree_id: &str,
    msg: &Value,
    history: &mut Vec<(String, String)>,
    out: &mut Oasst,
) -> Result<()> {
    let field = |k: &str| msg.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let text = msg
        .get("text")
        .and_then(Value::as_str)
        .ok_or_else(|| DataError::at(path, line, Some("text"), "a message has no text"))?;
    history.push((field("role"), text.to_string()));
    let replies: &[Value] = msg
        .get("replies")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let ranked: Vec<(&Value, u64)> = replies
        .iter()
        .filter(|r| r.get("role").and_then(Value::as_str) == Some("assistant"))
        .filter_map(|r| r.get("rank").and_then(Value::as_u64).map(|k| (r, k)))
        .collect();
    if !ranked.is_empty() {
        let prompt = render(history);
        if ranked.len() >= 2 {
            let mut response_ids: Vec<String> = ranked
                .iter()
                .map(|(r, _)| r.get("message_id").and_then(Value::as_str).unwrap_or(""))
                .map(str::to_string)
                .collect();
            let unique = response_ids
                .iter()
                .enumerate()
                .all(|(i, id)| !id.is_empty() && !response_ids[..i].contains(id));
            if !unique {
                response_ids = (1..=ranked.len()).map(|i| i.to_string()).collect();
            }
            out.groups.push(RankedGroup {
                prompt_id: msg
                    .get("message_id")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("{tree_id}:{}", history.len()), str::to_string),
                prompt: prompt.clone(),
                labeler_id: String::new(),
                response_ids,
                responses: ranked
                    .iter()
                    .map(|(r, _)| {
                        r.get("text")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string()
                    })
                    .collect(),
                ranks: ranked.iter().map(|(_, k)| *k as u32 + 1).collect(),
                line,
            });
        }
        for (r, k) in &ranked {
            if *k == 0 {
                out.demonstrations.push(Demonstration {
                    prompt: prompt.clone(),
                    response: r
                        .get("text")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                });
            }
        }
    }
    for r in replies {
        walk(path, line, tree_id, r, history, out)?;
    }
    history.pop();
    Ok(())
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
