//! The models of an evaluation and what is computed with them: sampling on the model crate's
//! batched KV-cache path (each model with the template stored in its folder), scoring through
//! `reward::Scorer` exactly as `ppo` scores a rollout, the per-response KL of a model from a reference
//! (a forward pass of each over prompt + response), and perplexity on demonstrations.

use crate::data::EvalPrompt;
use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use datasets::Demonstration;
use datasets::tokenize::{lm_batch, sft_example};
use model::ops::{to_f32_vec, token_logprobs, token_tensor};
use model::{CausalLm, Heads, PromptTemplate, SamplingConfig, TokenBatch, Tokenizer};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// A causal LM (policy, baseline or reference) with its tokenizer and stored template.
pub struct Lm {
    pub dir: PathBuf,
    pub model: CausalLm,
    pub tokenizer: Tokenizer,
    pub template: PromptTemplate,
}

impl Lm {
    /// Loads a causal-LM folder; a reward model here is an error naming the folder and `what`
    /// (the option it was given to).
    pub fn load(dir: &Path, what: &str, device: &Device) -> Result<Self> {
        if reward::scorer::Manifest::read(dir)?.is_some() {
            bail!(
                "{what}: {} is a reward-model ensemble (ensemble.json), not a causal LM; give a policy folder",
                dir.display()
            );
        }
        let (model, tokenizer, _) =
            model::checkpoint::load_with_tokenizer(dir, Some(Heads::LM), None, device)
                .with_context(|| what.to_string())?;
        let template = model::checkpoint::resolve_template(None, Some(dir))
            .with_context(|| format!("{what} {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            model: model.with_dropout(0.0),
            tokenizer,
            template,
        })
    }

    /// template(prompt) tokenized, for each prompt; a prompt that leaves no room for
    /// `max_new_tokens` in the model's context is an error naming its line.
    pub fn encode_prompts(
        &self,
        prompts: &[EvalPrompt],
        max_new_tokens: usize,
        path: &Path,
    ) -> Result<Vec<Vec<u32>>> {
        let context = self.model.config().max_position_embeddings;
        prompts
            .iter()
            .map(|p| {
                let t = self.tokenizer.encode(&self.template.render(&p.text))?;
                if t.len() + max_new_tokens > context {
                    bail!(
                        "{} line {}, field `prompt`: {} tokens with the template of {}, which leaves less than --max-new-tokens {max_new_tokens} of its {context}-token context",
                        path.display(),
                        p.line,
                        t.len(),
                        self.dir.display()
                    );
                }
                Ok(t)
            })
            .collect()
    }
}

/// How to sample.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Sampling {
    pub samples_per_prompt: usize,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
    pub batch_size: usize,
}

impl Sampling {
    /// The temperature log-probabilities are scaled by (as sampled; 1 for greedy, as `ppo`).
    pub fn logprob_temperature(&self) -> f64 {
        if self.temperature > 0.0 {
            self.temperature as f64
        } else {
            1.0
        }
    }
}

/// One sampled response.
#[derive(Clone, Debug)]
pub struct Response {
    /// Index into the prompts.
    pub prompt: usize,
    /// Which of the prompt's samples.
    pub sample: usize,
    /// template(prompt) tokens the response was sampled after.
    pub prompt_tokens: Vec<u32>,
    /// The sampled tokens, up to and including EOS when sampled.
    pub tokens: Vec<u32>,
    /// Decoded without EOS.
    pub text: String,
    pub eos: bool,
}

/// The seed of batch `k` of a run seeded `seed`.
fn batch_seed(seed: u64, k: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((k as u64).wrapping_mul(1_000_003))
}

/// Samples `samples_per_prompt` responses to each prompt (`encoded` = the templated prompt tokens),
/// `batch_size` at a time, grouped by prompt length; responses are cut at EOS. Returned in order
/// prompt-major: index = prompt · samples_per_prompt + sample.
pub fn sample(lm: &Lm, encoded: &[Vec<u32>], s: &Sampling) -> Result<Vec<Response>> {
    let k = s.samples_per_prompt;
    let mut order: Vec<usize> = (0..encoded.len() * k).collect();
    order.sort_by_key(|&i| encoded[i / k].len());
    let tok = &lm.tokenizer;
    let mut out: Vec<Option<Response>> = vec![None; order.len()];
    for (b, chunk) in order.chunks(s.batch_size.max(1)).enumerate() {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| encoded[i / k].clone()).collect();
        let cfg = SamplingConfig {
            max_new_tokens: s.max_new_tokens,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed: batch_seed(s.seed, b),
            eos_token_ids: vec![tok.eos_id],
            pad_token_id: tok.pad_id,
        };
        let g = model::generate(&lm.model, &prompts, &cfg)?;
        for ((&i, tokens), prompt_tokens) in chunk.iter().zip(g.responses()).zip(prompts) {
            let eos = tokens.last() == Some(&tok.eos_id);
            let body = if eos {
                &tokens[..tokens.len() - 1]
            } else {
                &tokens[..]
            };
            out[i] = Some(Response {
                prompt: i / k,
                sample: i % k,
                prompt_tokens,
                text: tok.decode(body)?,
                tokens,
                eos,
            });
        }
    }
    Ok(out
        .into_iter()
        .map(|r| r.expect("every response sampled"))
        .collect())
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
    let items: Vec<reward::Item> = responses
        .iter()
        .map(|r| {
            let p = &prompts[r.prompt];
            reward::Item {
                prompt: &p.text,
                response: &r.text,
                answer: p.answer.as_deref(),
            }
        })
        .collect();
    Ok(scorer
        .score(&items)?
        .rewards
        .into_iter()
        .map(f64::from)
        .collect())
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
    use model::{ModelConfig, parse_device};

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
        let encoded = lm.encode_prompts(&prompts(), 8, Path::new("p")).unwrap();
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
        let encoded = lm.encode_prompts(&prompts(), 6, Path::new("p")).unwrap();
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
        let e = lm
            .encode_prompts(&prompts(), 100_000, Path::new("p.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.jsonl line 1, field `prompt`"), "{e}");
    }
}
