//! Tokenisation and batching: SFT examples whose loss covers the response and EOS only, right-padded
//! training batches with shifted targets, left-padded prompt batches for generation, and optional
//! packing of short examples into rows of a fixed budget.
//!
//! Conversations go through a model's chat template ([`tokenize_conversation`],
//! [`encode_chat_prompts`], [`encode_chat_pair`]) as TRL 1.16's SFT and DPO trainers tokenize
//! them (`trl/trainer/sft_trainer.py` `tokenize_fn`, `dpo_trainer.py` `tokenize_fn`): the render
//! encoded without special tokens added (`apply_chat_template(tokenize=True)`), no EOS appended (the
//! template ends each turn), and the prompt's end found where the prompt's own tokens and the
//! whole conversation's tokens diverge (`common_prefix_length`).

use crate::chat::{ChatComparison, Conversation, Message};
use crate::records::Demonstration;
use model::chat::ChatTemplate;
use model::{ModelError, PromptTemplate, TokenBatch, Tokenizer};
use std::ops::Range;

/// One tokenized demonstration: template(prompt) ++ response ++ EOS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftExample {
    pub tokens: Vec<u32>,
    /// [len]: whether token i is a training target (response tokens and EOS).
    pub is_target: Vec<bool>,
}

impl SftExample {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// What a demonstration became for SFT: an example, or why it was dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tokenized {
    Example(SftExample),
    /// Longer than `max_len` tokens: `Some(its tokens)`, or `None` when it has more bytes than
    /// `max_len` tokens of the tokenizer can stand for ([`Tokenizer::max_token_bytes`]), so that
    /// it was dropped without being tokenized (a pasted 10 MB document takes seconds and
    /// gigabytes to tokenize).
    TooLong(Option<usize>),
    /// The prompt renders to no tokens.
    EmptyPrompt,
}

/// Tokenizes a demonstration, template(prompt) ++ response ++ EOS, of at most `max_len` tokens.
pub fn tokenize_demonstration(
    tok: &Tokenizer,
    template: &PromptTemplate,
    demo: &Demonstration,
    max_len: usize,
) -> model::Result<Tokenized> {
    let bytes = template.rendered_len(&demo.prompt) + demo.response.len();
    if bytes > max_len.saturating_mul(tok.max_token_bytes()) {
        return Ok(Tokenized::TooLong(None));
    }
    let prompt = tok.encode(&template.render(&demo.prompt))?;
    if prompt.is_empty() {
        return Ok(Tokenized::EmptyPrompt);
    }
    let mut response = tok.encode(&demo.response)?;
    response.push(tok.eos_id);
    if prompt.len() + response.len() > max_len {
        return Ok(Tokenized::TooLong(Some(prompt.len() + response.len())));
    }
    let mut is_target = vec![false; prompt.len()];
    is_target.extend(std::iter::repeat_n(true, response.len()));
    let mut tokens = prompt;
    tokens.extend(response);
    Ok(Tokenized::Example(SftExample { tokens, is_target }))
}

/// Tokenizes a demonstration; `None` when it is longer than `max_len` tokens (the caller counts
/// what it drops) or when the prompt renders to no tokens. See [`tokenize_demonstration`].
pub fn sft_example(
    tok: &Tokenizer,
    template: &PromptTemplate,
    demo: &Demonstration,
    max_len: usize,
) -> model::Result<Option<SftExample>> {
    Ok(
        match tokenize_demonstration(tok, template, demo, max_len)? {
            Tokenized::Example(e) => Some(e),
            Tokenized::TooLong(_) | Tokenized::EmptyPrompt => None,
        },
    )
}

/// Number of leading tokens `ids` and `other` share (TRL's `common_prefix_length`).
pub fn common_prefix_length(ids: &[u32], other: &[u32]) -> usize {
    ids.iter().zip(other).take_while(|(a, b)| a == b).count()
}

/// The byte span of each assistant turn in `template.render(messages, false)`: from the end of
/// the render of the messages before it with the generation prompt (so the header the prompt
/// already holds, e.g. `<|im_start|>assistant\n`, is outside) to the end of the render of the
/// messages through it (its content and what the template writes after it: `<|im_end|>\n` for
/// Qwen2.5, `<|eot_id|>` for Llama 3). These are the spans of TRL's training templates'
/// `{% generation %}` blocks for Llama 3 and Gemma; Qwen2.5's also holds the `\n` of the header.
///
/// An error when an assistant message opens the conversation (its turn has no prompt to follow)
/// or when the template renders the conversation up to a turn differently from the whole (it is
/// not prefix-preserving, e.g. Mistral's, which moves the system message into the last user turn).
pub fn assistant_spans(
    template: &ChatTemplate,
    messages: &[Message],
) -> model::Result<Vec<Range<usize>>> {
    let text = template.render(messages, false)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        if i == 0 {
            return Err(ModelError::Invalid(
                "the conversation opens with an assistant message, so assistant_only_loss cannot \
                 tell its turn from the template's preamble; drop that message, put a user message \
                 before it, or set assistant_only_loss = false"
                    .into(),
            ));
        }
        let before = template.render(&messages[..i], true)?;
        let through = if i + 1 == messages.len() {
            text.clone()
        } else {
            template.render(&messages[..=i], false)?
        };
        if !text.starts_with(&before) || !text.starts_with(&through) {
            return Err(ModelError::Invalid(format!(
                "the chat template renders the conversation up to message {i} (an assistant turn) \
                 differently from the whole conversation (it is not prefix-preserving), so the \
                 turn has no clean span; set assistant_only_loss = false to train on whole \
                 sequences, or use a template that renders earlier turns the same way"
            )));
        }
        spans.push(before.len()..through.len());
    }
    Ok(spans)
}

/// The tokens of `full` (the encoding of a text) that lie wholly before byte `at`, given
/// `prefix` = the encoding of `text[..at]`: the ones both encodings share.
fn tokens_before(prefix: &[u32], full: &[u32]) -> usize {
    common_prefix_length(prefix, full)
}

/// The tokens of `full` up to byte `at`, a token that straddles `at` included: all of `prefix`
/// when `full` starts with it, else the shared ones and the first that differs.
fn tokens_through(prefix: &[u32], full: &[u32]) -> usize {
    let shared = common_prefix_length(prefix, full);
    if shared == prefix.len() {
        shared
    } else {
        (shared + 1).min(full.len())
    }
}

/// Tokenizes a conversation with a chat template, the loss decided as TRL's `SFTTrainer` decides
/// it with its defaults (`completion_only_loss=None`, `assistant_only_loss=False`):
/// - the tokens are the render (`add_generation_prompt=false`) encoded without special tokens;
///   no EOS is appended (the template ends each turn);
/// - prompt-completion ([`Conversation::completion_start`] set): targets from where the prompt's
///   own tokens (rendered with the generation prompt) and the whole sequence's diverge;
///   the `messages` form: every token;
/// - `assistant_only_loss`: further only the tokens of the assistant turns ([`assistant_spans`]),
///   every assistant turn of a multi-turn conversation, each with its end-of-turn token. A token
///   that straddles a span's edge counts as in the span (transformers' `char_to_token` mask
///   does the same); tool, user and system turns are never targets.
///
/// `Tokenized::TooLong(None)` when the render has more bytes than `max_len` tokens can stand for
/// (not tokenized), `TooLong(Some(n))` for `n > max_len` tokens, `EmptyPrompt` when the render
/// encodes to nothing.
pub fn tokenize_conversation(
    tok: &Tokenizer,
    template: &ChatTemplate,
    conv: &Conversation,
    max_len: usize,
    assistant_only_loss: bool,
) -> model::Result<Tokenized> {
    let text = template.render(&conv.messages, false)?;
    if text.len() > max_len.saturating_mul(tok.max_token_bytes()) {
        return Ok(Tokenized::TooLong(None));
    }
    let tokens = tok.encode(&text)?;
    if tokens.is_empty() {
        return Ok(Tokenized::EmptyPrompt);
    }
    if tokens.len() > max_len {
        return Ok(Tokenized::TooLong(Some(tokens.len())));
    }
    let mut is_target = vec![true; tokens.len()];
    if let Some(start) = conv.completion_start.filter(|&k| k > 0) {
        let prompt = tok.encode(&template.render(&conv.messages[..start], true)?)?;
        is_target[..common_prefix_length(&prompt, &tokens)].fill(false);
    }
    if assistant_only_loss {
        let mut in_turn = vec![false; tokens.len()];
        for span in assistant_spans(template, &conv.messages)? {
            let first = tokens_before(&tok.encode(&text[..span.start])?, &tokens);
            let end = if span.end == text.len() {
                tokens.len()
            } else {
                tokens_through(&tok.encode(&text[..span.end])?, &tokens)
            };
            in_turn[first..end.max(first)].fill(true);
        }
        for (target, assistant) in is_target.iter_mut().zip(in_turn) {
            *target &= assistant;
        }
    }
    if !is_target.contains(&true) {
        return Err(ModelError::Invalid(format!(
            "the conversation of line {} has no target token: the chat template writes nothing \
             for its {} turns; check the template, or set assistant_only_loss = false",
            conv.line,
            if assistant_only_loss {
                "assistant"
            } else {
                "completion"
            }
        )));
    }
    Ok(Tokenized::Example(SftExample { tokens, is_target }))
}

/// Token ids of each conversational prompt, ready for `model::generate`, which left-pads them:
/// the render with the generation prompt, encoded without special tokens added (as
/// `apply_chat_template(messages, add_generation_prompt=True, tokenize=True)`). A prompt must end
/// with a user or tool message.
pub fn encode_chat_prompts(
    tok: &Tokenizer,
    template: &ChatTemplate,
    prompts: &[&[Message]],
) -> model::Result<Vec<Vec<u32>>> {
    prompts
        .iter()
        .map(|p| {
            let text = match p.last() {
                Some(last) if last.role == "tool" => template.render(p, true)?,
                _ => template.render_prompt(p)?,
            };
            tok.encode(&text)
        })
        .collect()
}

/// The token ids of a conversational comparison, as TRL's `DPOTrainer` makes them: `prompt` is
/// the tokens the prompt (rendered with the generation prompt) shares with both whole renders,
/// `chosen` / `rejected` the rest of each. `prompt ++ chosen` is the encoding of the whole chosen
/// conversation (what TRL's `RewardTrainer` scores).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatPairIds {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// Tokenizes a conversational comparison ([`ChatPairIds`]); no length limit is applied.
pub fn encode_chat_pair(
    tok: &Tokenizer,
    template: &ChatTemplate,
    pair: &ChatComparison,
) -> model::Result<ChatPairIds> {
    let whole = |continuation: &[Message]| -> model::Result<Vec<u32>> {
        let mut messages = pair.prompt.clone();
        messages.extend_from_slice(continuation);
        tok.encode(&template.render(&messages, false)?)
    };
    let prompt = tok.encode(&template.render(&pair.prompt, true)?)?;
    let chosen = whole(&pair.chosen)?;
    let rejected = whole(&pair.rejected)?;
    let shared =
        common_prefix_length(&prompt, &chosen).min(common_prefix_length(&prompt, &rejected));
    Ok(ChatPairIds {
        prompt: prompt[..shared].to_vec(),
        chosen: chosen[shared..].to_vec(),
        rejected: rejected[shared..].to_vec(),
    })
}

/// A next-token training batch: inputs are tokens[..n-1], targets tokens[1..], right-padded.
#[derive(Clone, Debug, PartialEq)]
pub struct LmBatch {
    pub inputs: TokenBatch,
    /// [b * t] target token of each input position (pad where not a target).
    pub targets: Vec<u32>,
    /// [b * t] whether the position's target counts in the loss.
    pub target_mask: Vec<bool>,
}

impl LmBatch {
    /// Number of target tokens in the loss.
    pub fn num_targets(&self) -> usize {
        self.target_mask.iter().filter(|&&m| m).count()
    }

    /// The targets of the positions in the loss, in order (what the LM head is evaluated on
    /// when it runs at those positions only).
    pub fn target_tokens(&self) -> Vec<u32> {
        self.targets
            .iter()
            .zip(&self.target_mask)
            .filter(|(_, m)| **m)
            .map(|(t, _)| *t)
            .collect()
    }
}

pub fn lm_batch(examples: &[SftExample], pad: u32) -> LmBatch {
    let inputs: Vec<Vec<u32>> = examples
        .iter()
        .map(|e| e.tokens[..e.len().saturating_sub(1)].to_vec())
        .collect();
    let batch = TokenBatch::right_padded(&inputs, pad);
    let t = batch.seq;
    let mut targets = vec![pad; batch.batch * t];
    let mut target_mask = vec![false; batch.batch * t];
    for (r, e) in examples.iter().enumerate() {
        for j in 0..e.len().saturating_sub(1) {
            targets[r * t + j] = e.tokens[j + 1];
            target_mask[r * t + j] = e.is_target[j + 1];
        }
    }
    LmBatch {
        inputs: batch,
        targets,
        target_mask,
    }
}

/// Token ids of each templated prompt, ready for `model::generate`, which left-pads them.
pub fn encode_prompts(
    tok: &Tokenizer,
    template: &PromptTemplate,
    prompts: &[&str],
) -> model::Result<Vec<Vec<u32>>> {
    prompts
        .iter()
        .map(|p| tok.encode(&template.render(p)))
        .collect()
}

/// Packs examples greedily, in order, into rows of at most `max_len` tokens. Packed examples attend
/// to the earlier examples of their row (as TRL's classic packing); each keeps its own targets.
pub fn pack(examples: &[SftExample], max_len: usize) -> Vec<SftExample> {
    let mut rows: Vec<SftExample> = Vec::new();
    let mut cur = SftExample {
        tokens: Vec::new(),
        is_target: Vec::new(),
    };
    for e in examples {
        if !cur.is_empty() && cur.len() + e.len() > max_len {
            rows.push(std::mem::replace(
                &mut cur,
                SftExample {
                    tokens: Vec::new(),
                    is_target: Vec::new(),
                },
            ));
        }
        cur.tokens.extend_from_slice(&e.tokens);
        cur.is_target.extend_from_slice(&e.is_target);
    }
    if !cur.is_empty() {
        rows.push(cur);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        let texts: Vec<String> = (0..40)
            .map(|i| format!("Human: question {i}\n\nAssistant: answer {i}"))
            .collect();
        Tokenizer::train_bpe(texts.iter(), 300).unwrap()
    }

    #[test]
    fn only_response_and_eos_are_targets() {
        let tok = tok();
        let tpl = PromptTemplate::new("Human: {prompt}\n\nAssistant:").unwrap();
        let d = Demonstration {
            prompt: "question 3".into(),
            response: " answer 3".into(),
        };
        let e = sft_example(&tok, &tpl, &d, 512).unwrap().unwrap();
        let n_prompt = tok.encode("Human: question 3\n\nAssistant:").unwrap().len();
        let n_resp = tok.encode(" answer 3").unwrap().len();
        assert_eq!(e.len(), n_prompt + n_resp + 1);
        assert!(e.is_target[..n_prompt].iter().all(|&t| !t));
        assert!(e.is_target[n_prompt..].iter().all(|&t| t));
        assert_eq!(*e.tokens.last().unwrap(), tok.eos_id);
        assert!(sft_example(&tok, &tpl, &d, e.len() - 1).unwrap().is_none());
        assert_eq!(
            tokenize_demonstration(&tok, &tpl, &d, e.len() - 1).unwrap(),
            Tokenized::TooLong(Some(e.len()))
        );
        // More bytes than max_len tokens can stand for: dropped without tokenizing.
        let long = Demonstration {
            prompt: "question 3".into(),
            response: "x".repeat(4 * tok.max_token_bytes() + 1),
        };
        let bytes = tpl.rendered_len(&long.prompt) + long.response.len();
        assert!(bytes > 4 * tok.max_token_bytes());
        assert_eq!(
            tokenize_demonstration(&tok, &tpl, &long, 4).unwrap(),
            Tokenized::TooLong(None)
        );
        let empty = Demonstration {
            prompt: String::new(),
            response: " answer".into(),
        };
        assert_eq!(
            tokenize_demonstration(&tok, &PromptTemplate::identity(), &empty, 512).unwrap(),
            Tokenized::EmptyPrompt
        );

        let b = lm_batch(&[e.clone(), e.clone()], tok.pad_id);
        assert_eq!(b.inputs.seq, e.len() - 1);
        // Targets are the inputs shifted by one; the loss covers response + EOS.
        assert_eq!(b.targets[..e.len() - 1], e.tokens[1..]);
        assert_eq!(b.num_targets(), 2 * (n_resp + 1));
    }

    #[test]
    fn a_token_straddling_a_span_edge_is_in_the_span() {
        // full = [ab][cde][f] of "abcdef"; the span edge after "c" falls inside [cde].
        let full = [1, 2, 3];
        // Encoded alone, "abc" is [ab][c]: [cde] is the first token that differs.
        assert_eq!(tokens_before(&[1, 9], &full), 1);
        assert_eq!(tokens_through(&[1, 9], &full), 2);
        // An edge on a token boundary ("ab", "abcde").
        assert_eq!(tokens_before(&[1], &full), 1);
        assert_eq!(tokens_through(&[1, 2], &full), 2);
        assert_eq!(common_prefix_length(&[], &full), 0);
    }

    #[test]
    fn packing_fills_rows_and_keeps_targets() {
        let ex = |n: usize| SftExample {
            tokens: (0..n as u32).collect(),
            is_target: (0..n).map(|i| i >= n / 2).collect(),
        };
        let rows = pack(&[ex(4), ex(3), ex(5), ex(2)], 8);
        let lens: Vec<usize> = rows.iter().map(SftExample::len).collect();
        assert_eq!(lens, vec![7, 7]);
        assert_eq!(rows[0].is_target.iter().filter(|&&t| t).count(), 2 + 2);
    }
}
