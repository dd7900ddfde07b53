//! The data of PPO's loop: the prompts (with optional answers for rule rewards), a rollout (the
//! prompt rows and the sampled responses as one padded batch), the PPO-ptx demonstrations and
//! `samples.jsonl`.

use crate::PpoSection;
use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor};
use datasets::tokenize::{SftExample, lm_batch, sft_example};
use datasets::{Demonstration, Source, load_demonstrations};
use model::{CausalLm, Generation, PromptTemplate, TokenBatch, Tokenizer};
use serde_json::json;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A prompt of the prompts file.
#[derive(Clone, Debug)]
pub struct Prompt {
    /// As in the file, without the template.
    pub text: String,
    pub answer: Option<String>,
    /// template(prompt), tokenized.
    pub tokens: Vec<u32>,
    pub source: String,
    pub line: usize,
}

/// The scorer's view of a batch: each prompt's text and answer with its response.
pub fn items<'a>(prompts: &[&'a Prompt], responses: &'a [String]) -> Vec<reward::Item<'a>> {
    prompts
        .iter()
        .zip(responses)
        .map(|(p, r)| reward::Item {
            prompt: &p.text,
            response: r,
            answer: p.answer.as_deref(),
        })
        .collect()
}

/// A rule's scoring error ([`reward::scorer::ItemError`]) named by the prompt's file and line;
/// other errors as they are.
pub fn locate(e: anyhow::Error, prompts: &[&Prompt]) -> anyhow::Error {
    match e.downcast_ref::<reward::scorer::ItemError>() {
        Some(ie) if ie.index < prompts.len() => {
            let p = prompts[ie.index];
            anyhow::anyhow!("{} line {}: {}", p.source, p.line, ie.message)
        }
        _ => e,
    }
}

/// Reads the prompts; errors name the file, the line and the field. `max_tokens` is the longest
/// templated prompt that leaves room for the response in the policy's context.
pub fn read_prompts(
    path: &Path,
    columns: &HashMap<String, String>,
    tok: &Tokenizer,
    template: &PromptTemplate,
    max_tokens: usize,
    need_answer: bool,
) -> Result<Vec<Prompt>> {
    let src = Source {
        path: path.to_path_buf(),
        format: None,
        columns: columns.clone(),
    };
    let records = datasets::load_prompts(&src)?;
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let at = |field: &str, msg: String| {
            let col = columns.get(field).map_or(field, String::as_str);
            anyhow::anyhow!("{} line {}, field `{col}`: {msg}", path.display(), r.line)
        };
        if need_answer && r.answer.is_none() {
            return Err(at(
                "answer",
                "missing; the exact_answer rule needs an answer per prompt".into(),
            ));
        }
        let tokens = tok.encode(&template.render(&r.prompt))?;
        if tokens.is_empty() {
            return Err(at("prompt", "renders to no tokens".into()));
        }
        if tokens.len() > max_tokens {
            return Err(at(
                "prompt",
                format!(
                    "the prompt is {} tokens with its template, longer than the {max_tokens} the policy's context leaves after rollout.max_new_tokens; shorten it or lower max_new_tokens",
                    tokens.len()
                ),
            ));
        }
        out.push(Prompt {
            text: r.prompt,
            answer: r.answer,
            tokens,
            source: path.display().to_string(),
            line: r.line,
        });
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

/// One rollout: the prompt rows (left padded, width `p`) followed by the sampled responses
/// (width `n`, right padded after EOS) as one batch.
pub struct Rollout {
    pub p: usize,
    pub n: usize,
    pub batch: TokenBatch,
    /// [b, n] row-major: sampled tokens and whether each is a real response token.
    pub response_tokens: Vec<u32>,
    pub response_mask: Vec<bool>,
    /// Response texts (EOS and special tokens left out), for the scorer and samples.
    pub texts: Vec<String>,
    pub has_eos: Vec<bool>,
    /// Response lengths in tokens (EOS included).
    pub lengths: Vec<usize>,
}

impl Rollout {
    /// The rollout of `prompts` and their `generation` (which stopped each row at its EOS).
    pub fn new(prompts: &[Vec<u32>], g: &Generation, tok: &Tokenizer) -> Result<Self> {
        let left = TokenBatch::left_padded(prompts, tok.pad_id);
        let (b, p) = (left.batch, left.seq);
        let n = g.tokens.first().map_or(0, Vec::len);
        let mut tokens = Vec::with_capacity(b * (p + n));
        let mut mask = Vec::with_capacity(b * (p + n));
        let mut response_tokens = Vec::with_capacity(b * n);
        let mut response_mask = Vec::with_capacity(b * n);
        let mut texts = Vec::with_capacity(b);
        let mut has_eos = Vec::with_capacity(b);
        let mut lengths = Vec::with_capacity(b);
        for r in 0..b {
            tokens.extend_from_slice(left.row(r));
            mask.extend_from_slice(left.row_mask(r));
            tokens.extend_from_slice(&g.tokens[r]);
            mask.extend_from_slice(&g.mask[r]);
            response_tokens.extend_from_slice(&g.tokens[r]);
            response_mask.extend_from_slice(&g.mask[r]);
            let real: Vec<u32> = g.tokens[r]
                .iter()
                .zip(&g.mask[r])
                .filter(|(_, m)| **m)
                .map(|(t, _)| *t)
                .collect();
            let eos = real.last() == Some(&tok.eos_id);
            let body = if eos {
                &real[..real.len() - 1]
            } else {
                &real[..]
            };
            texts.push(tok.decode(body)?);
            has_eos.push(eos);
            lengths.push(real.len());
        }
        Ok(Self {
            p,
            n,
            batch: TokenBatch {
                tokens,
                mask,
                batch: b,
                seq: p + n,
            },
            response_tokens,
            response_mask,
            texts,
            has_eos,
            lengths,
        })
    }

    /// The minibatch of the given rows, without the columns that are padding in all of them:
    /// the prompt padding left of the longest prompt and the response positions after the
    /// longest response. Those columns are masked out of every loss, so dropping them changes
    /// no value (up to float rounding) and saves the forward and backward work on them.
    pub fn minibatch(&self, rows: &[usize]) -> Minibatch {
        let (p, n, s) = (self.p, self.n, self.batch.seq);
        let lead = rows
            .iter()
            .map(|&r| {
                let m = self.batch.row_mask(r);
                // Every prompt has a token at p - 1, which predicts the first response token.
                m[..p].iter().position(|&x| x).unwrap_or(p - 1).min(p - 1)
            })
            .min()
            .unwrap_or(0);
        let resp = rows
            .iter()
            .map(|&r| {
                let m = &self.response_mask[r * n..(r + 1) * n];
                m.iter().rposition(|&x| x).map_or(0, |i| i + 1)
            })
            .max()
            .unwrap_or(0)
            .max(1)
            .min(n);
        let cols = lead..p + resp;
        let batch = TokenBatch {
            tokens: rows
                .iter()
                .flat_map(|&r| self.batch.tokens[r * s..(r + 1) * s][cols.clone()].to_vec())
                .collect(),
            mask: rows
                .iter()
                .flat_map(|&r| self.batch.mask[r * s..(r + 1) * s][cols.clone()].to_vec())
                .collect(),
            batch: rows.len(),
            seq: cols.len(),
        };
        Minibatch {
            rows: rows.to_vec(),
            batch,
            prompt_len: p - lead,
            n: resp,
            full_n: n,
        }
    }
}

/// A minibatch of a rollout (see [`Rollout::minibatch`]): its rows, their batch, and where the
/// responses are in it.
pub struct Minibatch {
    pub rows: Vec<usize>,
    pub batch: TokenBatch,
    /// Columns of prompt (left padding included) before the first response token.
    pub prompt_len: usize,
    /// Response positions kept (the longest response of the rows).
    pub n: usize,
    /// Response positions of the rollout.
    full_n: usize,
}

impl Minibatch {
    /// The rows' slices of a rollout-wide per-response-token array [b · full_n], cut to the
    /// kept positions → [rows · n].
    pub fn pick<T: Copy>(&self, v: &[T]) -> Vec<T> {
        self.rows
            .iter()
            .flat_map(|&r| v[r * self.full_n..r * self.full_n + self.n].to_vec())
            .collect()
    }
}

/// PPO-ptx demonstrations (InstructGPT's "PPO-ptx": the pretraining/SFT LM loss mixed in).
pub struct Ptx {
    examples: Vec<SftExample>,
}

pub fn read_ptx(
    ppo: &PpoSection,
    tok: &Tokenizer,
    template: &PromptTemplate,
    context: usize,
) -> Result<Option<Ptx>> {
    if ppo.ptx_coef <= 0.0 {
        return Ok(None);
    }
    let Some(path) = &ppo.ptx_data else {
        bail!("ppo.ptx_coef > 0 needs ppo.ptx_data (demonstrations: prompt, response)");
    };
    let demos: Vec<Demonstration> = load_demonstrations(&Source::new(path))?;
    let mut examples = Vec::new();
    for d in &demos {
        if let Some(e) = sft_example(tok, template, d, context)? {
            examples.push(e);
        }
    }
    if examples.is_empty() {
        bail!(
            "{}: no demonstration fits the policy's context",
            path.display()
        );
    }
    Ok(Some(Ptx { examples }))
}

impl Ptx {
    /// The LM loss (mean over response tokens) of `m` demonstrations chosen by (iteration,
    /// minibatch), deterministic for exact resume.
    pub fn loss(
        &self,
        policy: &CausalLm,
        iteration: usize,
        minibatch: usize,
        m: usize,
        pad: u32,
        device: &Device,
    ) -> Result<Tensor<1>> {
        let start = (iteration * 7919 + minibatch * m) % self.examples.len();
        let ex: Vec<SftExample> = (0..m)
            .map(|i| self.examples[(start + i) % self.examples.len()].clone())
            .collect();
        let b = lm_batch(&ex, pad);
        // The LM head only at the target positions (response and EOS), as in sft.
        let h = model::ops::select_positions(policy.forward(&b.inputs), &b.target_mask);
        let targets = b.target_tokens();
        let n = targets.len();
        let lp = model::ops::token_logprobs(
            policy.logits(h)?,
            model::ops::token_tensor(&targets, 1, n, device),
        );
        Ok(lp.mean().neg())
    }
}

/// `samples.jsonl`: a few `{"iteration", "prompt", "response", "score"}` lines every N iterations.
pub struct Samples {
    path: PathBuf,
}

impl Samples {
    /// Opens `out/samples.jsonl`; a run resumed at `start` drops the lines of later iterations.
    pub fn open(out: &Path, start: usize) -> Result<Self> {
        let path = out.join("samples.jsonl");
        if start > 0 {
            trainer::metrics::drop_lines_after(&path, "iteration", start)?;
        } else if path.exists() {
            // A run from the start (rerun after one killed before its first checkpoint).
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(Self { path })
    }

    pub fn write(
        &mut self,
        iteration: usize,
        prompts: &[&Prompt],
        responses: &[String],
        scores: &[f32],
        k: usize,
    ) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        for ((p, r), s) in prompts.iter().zip(responses).zip(scores).take(k) {
            writeln!(
                f,
                "{}",
                json!({"iteration": iteration, "prompt": p.text, "response": r, "score": s})
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three rows: prompts of 2, 4 and 3 tokens (width 4, left padded), responses of 1, 3 and 2
    /// tokens (width 4). Token ids encode (row, column) so that a misplaced column shows.
    fn rollout() -> Rollout {
        let (p, n) = (4, 4);
        let prompt_len = [2, 4, 3];
        let resp_len = [1, 3, 2];
        let (mut tokens, mut mask, mut response_tokens, mut response_mask) =
            (vec![], vec![], vec![], vec![]);
        for r in 0..3 {
            for c in 0..p + n {
                tokens.push((10 * r + c) as u32);
                let real = if c < p {
                    c >= p - prompt_len[r]
                } else {
                    c - p < resp_len[r]
                };
                mask.push(real);
                if c >= p {
                    response_tokens.push((10 * r + c) as u32);
                    response_mask.push(real);
                }
            }
        }
        Rollout {
            p,
            n,
            batch: TokenBatch {
                tokens,
                mask,
                batch: 3,
                seq: p + n,
            },
            response_tokens,
            response_mask,
            texts: vec![String::new(); 3],
            has_eos: vec![true; 3],
            lengths: resp_len.to_vec(),
        }
    }

    #[test]
    fn minibatch_drops_only_columns_that_are_padding_in_all_its_rows() {
        let roll = rollout();
        // Rows 0 and 2: prompts of 2 and 3 tokens (1 pad column in common), responses of 1 and
        // 2 tokens (2 response columns kept).
        let mb = roll.minibatch(&[2, 0]);
        assert_eq!((mb.prompt_len, mb.n, mb.batch.seq), (3, 2, 5));
        assert_eq!(mb.batch.tokens, vec![21, 22, 23, 24, 25, 1, 2, 3, 4, 5]);
        assert_eq!(
            mb.batch.mask,
            vec![true, true, true, true, true, false, true, true, true, false]
        );
        assert_eq!(mb.pick(&roll.response_tokens), vec![24, 25, 4, 5]);
        assert_eq!(mb.pick(&roll.response_mask), vec![true, true, true, false]);
        // The position before the first response token is the last prompt column.
        assert_eq!(mb.batch.tokens[mb.prompt_len - 1], 23);
        // Row 1 has a full-width prompt: nothing on the left goes.
        let all = roll.minibatch(&[0, 1, 2]);
        assert_eq!((all.prompt_len, all.n, all.batch.seq), (4, 3, 7));
    }
}
