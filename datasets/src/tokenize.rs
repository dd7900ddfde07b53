//! Tokenisation and batching: SFT examples whose loss covers the response and EOS only, right-padded
//! training batches with shifted targets, left-padded prompt batches for generation, and optional
//! packing of short examples into rows of a fixed budget.

use crate::records::Demonstration;
use model::{PromptTemplate, TokenBatch, Tokenizer};

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
