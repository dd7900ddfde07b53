//! The models of an evaluation and what is computed with them: sampling on the model crate's
//! batched KV-cache path (each model with the template stored in its folder), scoring through
//! `reward::Scorer` exactly as `ppo` scores a rollout, the baseline's best-of-N (through
//! `reward::best_of_n`, as `reward best-of-n` chooses), the per-response KL of a model from a
//! reference (a forward pass of each over prompt + response), and perplexity on demonstrations.

use crate::data::EvalPrompt;
use anyhow::{Result, bail};
use datasets::Demonstration;
use datasets::tokenize::{lm_batch, sft_example};
use model::TokenBatch;
use model::ops::{to_f32_vec, token_logprobs, token_tensor};
use serde::Serialize;
use std::path::Path;

/// A causal LM (policy, baseline or reference) with its tokenizer and stored template; loading,
/// prompt encoding and sampling are `reward::best_of_n`'s, shared with `reward best-of-n`.
pub use reward::best_of_n::Policy as Lm;
pub use reward::best_of_n::{Response, Sampling};

/// template(prompt) tokenized for each prompt of the file `path` with `lm`'s template; a prompt
/// that leaves no room for `max_new_tokens` in the model's context is an error naming its line.
pub fn encode_prompts(
    lm: &Lm,
    prompts: &[EvalPrompt],
    max_new_tokens: usize,
    path: &Path,
) -> Result<Vec<Vec<u32>>> {
    lm.encode_prompts(
        prompts.iter().map(|p| (p.text.as_str(), p.line)),
        max_new_tokens,
        path,
    )
}

/// Samples `samples_per_prompt` responses to each prompt (`encoded` = the templated prompt
/// tokens), prompt-major: index = prompt · samples_per_prompt + sample (see
/// [`reward::best_of_n::sample`]).
pub fn sample(lm: &Lm, encoded: &[Vec<u32>], s: &Sampling) -> Result<Vec<Response>> {
    reward::best_of_n::sample(&lm.model, &lm.tokenizer, encoded, s)
}

/// The baseline's best-of-N: `best_of` samples per (prompt, sample) of `s`, scored through
/// `scorer`, the best of each kept (see [`reward::best_of_n::best`]); returned as [`sample`]
/// returns responses (prompt-major, `s.samples_per_prompt` per prompt), each with its reward,
/// and the rewards of all the candidates; `s.seed` seeds the candidates.
pub fn best_of_n(
    lm: &Lm,
    encoded: &[Vec<u32>],
    s: &Sampling,
    best_of: usize,
    scorer: &reward::Scorer,
    prompts: &[EvalPrompt],
) -> Result<BestOfN> {
    let wide = Sampling {
        samples_per_prompt: s.samples_per_prompt * best_of,
        ..s.clone()
    };
    let candidates = sample(lm, encoded, &wide)?;
    let rewards = score(scorer, prompts, &candidates)?;
    let eos: Vec<bool> = candidates.iter().map(|r| r.eos).collect();
    let choices = reward::best_of_n::choose(&rewards, &eos, best_of);
    let chosen = choices
        .iter()
        .enumerate()
        .map(|(g, c)| Response {
            sample: g % s.samples_per_prompt,
            ..candidates[g * best_of + c.sample].clone()
        })
        .collect();
    Ok(BestOfN {
        chosen,
        rewards: choices.iter().map(|c| c.score).collect(),
        candidate_rewards: rewards,
        candidate_eos: eos,
    })
}

/// What [`best_of_n`] returns.
pub struct BestOfN {
    /// The best response of each (prompt, sample).
    pub chosen: Vec<Response>,
    /// Their rewards.
    pub rewards: Vec<f64>,
    /// Every candidate's reward and EOS, N per chosen response, in order.
    pub candidate_rewards: Vec<f64>,
    pub candidate_eos: Vec<bool>,
}

/// The reward of each response through the one scorer `ppo` scores rollouts with
/// ([`reward::Scorer`]: the response re-encoded with each reward model's tokenizer and template,
/// the score at the last token, the stored normalisation; an ensemble's aggregate); no
/// missing-EOS penalty or clipping.
pub fn score(
    scorer: &reward::Scorer,
    prompts: &[EvalPrompt],
    responses: &[Response],
) -> Result<Vec<f64>> {
    reward::best_of_n::score_responses(scorer, responses, |i| {
        (prompts[i].text.as_str(), prompts[i].answer.as_deref())
    })
}

/// log p(response token) under `lm` at `temperature`, for each response (its own prompt tokens in
/// front), computed `batch_size` rows at a time with one forward pass over prompt + response.
pub fn response_logprobs(
    lm: &Lm,
    responses: &[Response],
    temperature: f64,
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let pad = lm.tokenizer.pad_id;
    let device = lm.model.device();
    let mut order: Vec<usize> = (0..responses.len()).collect();
    order.sort_by_key(|&i| responses[i].prompt_tokens.len() + responses[i].tokens.len());
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); responses.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let rows: Vec<&Response> = chunk.iter().map(|&i| &responses[i]).collect();
        let n = rows.iter().map(|r| r.tokens.len()).max().unwrap_or(0);
        if n == 0 {
            continue;
        }
        // Prompts left padded to width p, responses right padded to width n: position p − 1 + t
        // predicts response token t, as in a PPO rollout.
        let prompts: Vec<Vec<u32>> = rows.iter().map(|r| r.prompt_tokens.clone()).collect();
        let left = TokenBatch::left_padded(&prompts, pad);
        let (b, p) = (left.batch, left.seq);
        let mut tokens = Vec::with_capacity(b * (p + n));
        let mut mask = Vec::with_capacity(b * (p + n));
        let mut targets = Vec::with_capacity(b * n);
        for (r, row) in rows.iter().enumerate() {
            tokens.extend_from_slice(left.row(r));
            mask.extend_from_slice(left.row_mask(r));
            let m = row.tokens.len();
            tokens.extend_from_slice(&row.tokens);
            tokens.extend(std::iter::repeat_n(pad, n - m));
            mask.extend(std::iter::repeat_n(true, m));
            mask.extend(std::iter::repeat_n(false, n - m));
            targets.extend_from_slice(&row.tokens);
            targets.extend(std::iter::repeat_n(pad, n - m));
        }
        let batch = TokenBatch {
            tokens,
            mask,
            batch: b,
            seq: p + n,
        };
        let hidden = lm.model.forward(&batch);
        let d = hidden.dims()[2];
        let h = hidden.slice([0..b, p - 1..p - 1 + n, 0..d]);
        let logits = lm.model.logits(h)?.div_scalar(temperature);
        let lp = to_f32_vec(token_logprobs(
            logits,
            token_tensor(&targets, b, n, &device),
        ));
        for (r, &i) in chunk.iter().enumerate() {
            out[i] = lp[r * n..r * n + responses[i].tokens.len()].to_vec();
        }
    }
    Ok(out)
}

/// KL of `lm` from `reference` per response: Σ over the response's tokens of
/// log p_lm − log p_ref of the sampled token, both at `temperature` (the k1 estimator PPO logs as
/// `kl_per_response`).
pub fn kl_per_response(
    lm: &Lm,
    reference: &Lm,
    responses: &[Response],
    temperature: f64,
    batch_size: usize,
) -> Result<Vec<f64>> {
    let a = response_logprobs(lm, responses, temperature, batch_size)?;
    let b = response_logprobs(reference, responses, temperature, batch_size)?;
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q) as f64).sum())
        .collect())
}

/// Perplexity on demonstrations: exp of the mean NLL of the response tokens and EOS, with the
/// model's template, as `sft` evaluates.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Perplexity {
    pub nll: f64,
    pub perplexity: f64,
    /// Target tokens (response + EOS) summed over.
    pub tokens: usize,
    pub examples: usize,
    /// Demonstrations longer than the model's context, left out.
    pub dropped: usize,
}

pub fn perplexity(lm: &Lm, demos: &[Demonstration], batch_size: usize) -> Result<Perplexity> {
    let context = lm.model.config().max_position_embeddings;
    let mut examples = Vec::with_capacity(demos.len());
    for d in demos {
        if let Some(e) = sft_example(&lm.tokenizer, &lm.template, d, context)? {
            examples.push(e);
        }
    }
    let dropped = demos.len() - examples.len();
    if examples.is_empty() {
        bail!(
            "no demonstration fits the {context}-token context of {}",
            lm.dir.display()
        );
    }
    examples.sort_by_key(|e| e.len());
    let device = lm.model.device();
    let (mut nll, mut tokens) = (0f64, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let b = lm_batch(chunk, lm.tokenizer.pad_id);
        let (bs, t) = (b.inputs.batch, b.inputs.seq);
        let logits = lm.model.logits(lm.model.forward(&b.inputs))?;
        let lp = to_f32_vec(token_logprobs(
            logits,
            token_tensor(&b.targets, bs, t, &device),
        ));
        for (v, &m) in lp.iter().zip(&b.target_mask) {
            if m {
                nll -= *v as f64;
                tokens += 1;
            }
        }
    }
    let mean = nll / tokens.max(1) as f64;
    Ok(Perplexity {
        nll: mean,
        perplexity: mean.exp(),
        tokens,
        examples: examples.len(),
        dropped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{CausalLm, ModelConfig, PromptTemplate, SamplingConfig, Tokenizer, parse_device};
    use std::path::PathBuf;

    fn tiny(seed: u64) -> Lm {
        let texts: Vec<String> = (0..40)
            .map(|i| {
                format!(
                    "Human: what is {i} plus {i}?\n\nAssistant: it is {}.",
                    2 * i
                )
            })
            .collect();
        let tok = Tokenizer::train_bpe(texts.iter(), 300).unwrap();
        let mut cfg = ModelConfig::preset("tiny", tok.vocab_size()).unwrap();
        cfg.set_special_tokens(&tok);
        let device = parse_device("cpu").unwrap();
        Lm {
            dir: PathBuf::from(format!("tiny-{seed}")),
            model: CausalLm::new(&cfg, false, seed, &device).unwrap(),
            tokenizer: tok,
            template: PromptTemplate::new("Human: {prompt}\n\nAssistant:").unwrap(),
        }
    }

    fn prompts() -> Vec<EvalPrompt> {
        [
            "what is 3 plus 3?",
            "hi",
            "what is 12 plus 12? and 4 plus 4?",
        ]
        .iter()
        .enumerate()
        .map(|(i, p)| EvalPrompt {
            text: p.to_string(),
            answer: None,
            line: i + 1,
        })
        .collect()
    }

    #[test]
    fn forward_logprobs_are_the_sampling_logprobs() {
        let lm = tiny(1);
        let encoded = encode_prompts(&lm, &prompts(), 8, Path::new("p")).unwrap();
        let s = Sampling {
            samples_per_prompt: 2,
            max_new_tokens: 8,
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
            seed: 4,
            batch_size: 6,
        };
        let responses = sample(&lm, &encoded, &s).unwrap();
        assert_eq!(responses.len(), 6);
        for (i, r) in responses.iter().enumerate() {
            assert_eq!((r.prompt, r.sample), (i / 2, i % 2));
            assert_eq!(r.prompt_tokens, encoded[i / 2]);
            assert!(!r.tokens.is_empty() && r.tokens.len() <= 8);
        }
        // The log-probabilities `generate` reports for the tokens it samples (one batch of 6),
        // recomputed by a forward pass over prompt + response (batches of 4, then 2).
        let prompt_rows: Vec<Vec<u32>> =
            responses.iter().map(|r| r.prompt_tokens.clone()).collect();
        let cfg = SamplingConfig {
            max_new_tokens: 8,
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
            seed: 99,
            eos_token_ids: vec![lm.tokenizer.eos_id],
            pad_token_id: lm.tokenizer.pad_id,
        };
        let g = model::generate(&lm.model, &prompt_rows, &cfg).unwrap();
        let regenerated: Vec<Response> = responses
            .iter()
            .zip(g.responses())
            .map(|(r, tokens)| Response {
                tokens,
                ..r.clone()
            })
            .collect();
        let lp = response_logprobs(&lm, &regenerated, 0.7, 4).unwrap();
        for ((ours, theirs), r) in lp.iter().zip(&g.logprobs).zip(&regenerated) {
            assert_eq!(ours.len(), r.tokens.len());
            for (x, y) in ours.iter().zip(theirs) {
                assert!((x - y).abs() < 1e-4, "{x} vs {y}");
            }
        }
        // KL of a model from itself is 0; from another model it is a finite number.
        let kl = kl_per_response(&lm, &lm, &responses, 0.7, 3).unwrap();
        assert!(kl.iter().all(|k| k.abs() < 1e-4), "{kl:?}");
        let other = tiny(2);
        let kl = kl_per_response(&lm, &other, &responses, 0.7, 3).unwrap();
        assert!(kl.iter().all(|k| k.is_finite()) && kl.iter().any(|k| k.abs() > 1e-3));
    }

    #[test]
    fn sampling_is_seeded_and_perplexity_is_near_uniform_for_an_untrained_model() {
        let lm = tiny(1);
        let encoded = encode_prompts(&lm, &prompts(), 6, Path::new("p")).unwrap();
        let s = Sampling {
            samples_per_prompt: 1,
            max_new_tokens: 6,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            batch_size: 2,
        };
        let a = sample(&lm, &encoded, &s).unwrap();
        let b = sample(&lm, &encoded, &s).unwrap();
        assert_eq!(
            a.iter().map(|r| &r.tokens).collect::<Vec<_>>(),
            b.iter().map(|r| &r.tokens).collect::<Vec<_>>()
        );
        let demos = vec![
            Demonstration {
                prompt: "what is 3 plus 3?".into(),
                response: " it is 6.".into(),
            },
            Demonstration {
                prompt: "hi".into(),
                response: " hello.".into(),
            },
        ];
        let p = perplexity(&lm, &demos, 1).unwrap();
        let q = perplexity(&lm, &demos, 2).unwrap();
        assert_eq!((p.examples, p.dropped), (2, 0));
        assert!((p.nll - q.nll).abs() < 1e-4);
        let uniform = (lm.tokenizer.vocab_size() as f64).ln();
        assert!(
            (p.nll - uniform).abs() < 0.2 * uniform,
            "{} vs {uniform}",
            p.nll
        );
        // Response tokens + one EOS each.
        let targets: usize = demos
            .iter()
            .map(|d| lm.tokenizer.encode(&d.response).unwrap().len() + 1)
            .sum();
        assert_eq!(p.tokens, targets);
        // A prompt too long for the context is an error naming its line.
        let e = encode_prompts(&lm, &prompts(), 100_000, Path::new("p.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.jsonl line 1, field `prompt`"), "{e}");
    }
}
