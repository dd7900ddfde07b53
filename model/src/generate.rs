//! Batched sampling with a KV cache: left-padded prompts, greedy / temperature / top-k / top-p,
//! per-row stop at EOS, seeded and deterministic. Returns what PPO needs: the sampled tokens, their
//! log-probabilities, and the response mask.

use crate::batch::TokenBatch;
use crate::transformer::{CausalLm, KvCache};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// How to sample. `temperature == 0` means greedy.
#[derive(Clone, Debug)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1.0 disables.
    pub top_p: f32,
    pub seed: u64,
    /// Rows stop after sampling any of these; empty means never stop early.
    pub eos_token_ids: Vec<u32>,
    /// Written after a row has stopped.
    pub pad_token_id: u32,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            eos_token_ids: Vec::new(),
            pad_token_id: 0,
        }
    }
}

/// The result of [`generate`]: rows in prompt order, all `new_tokens` long.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// [b][n]: sampled tokens, `pad_token_id` after a row stopped.
    pub tokens: Vec<Vec<u32>>,
    /// [b][n]: log-prob of each sampled token under the (temperature-scaled, untruncated)
    /// distribution; 0 where the mask is false.
    pub logprobs: Vec<Vec<f32>>,
    /// [b][n]: true for sampled tokens, the EOS that ended a row included.
    pub mask: Vec<Vec<bool>>,
}

impl Generation {
    /// Each row's sampled tokens up to and including EOS.
    pub fn responses(&self) -> Vec<Vec<u32>> {
        self.tokens
            .iter()
            .zip(&self.mask)
            .map(|(t, m)| {
                t.iter()
                    .zip(m)
                    .filter(|(_, m)| **m)
                    .map(|(t, _)| *t)
                    .collect()
            })
            .collect()
    }
}

/// Samples up to `cfg.max_new_tokens` tokens after each prompt.
/// An error for a model without an LM head.
pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
) -> crate::Result<Generation> {
    crate::device::hot(|| sample_all(model, prompts, cfg))
}

fn sample_all(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
) -> crate::Result<Generation> {
    let b = prompts.len();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut out = Generation {
        tokens: vec![Vec::new(); b],
        logprobs: vec![Vec::new(); b],
        mask: vec![Vec::new(); b],
    };
    if b == 0 || cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    // Held until the last step: the weights packed for the decoding products (see
    // `CausalLm::pack_for_decoding`).
    let _packed = model.pack_for_decoding();
    let mut batch = TokenBatch::left_padded(prompts, cfg.pad_token_id);
    let mut cache =
        KvCache::with_capacity(model.config().num_layers, b, batch.seq + cfg.max_new_tokens);
    let mut finished = vec![false; b];
    // Greedy decoding reports log-probs under the untempered distribution.
    let inv_temperature = if cfg.temperature > 0.0 {
        1.0 / cfg.temperature
    } else {
        1.0
    };
    for step in 0..cfg.max_new_tokens {
        let logits = next_logits(model, &batch, &mut cache)?;
        let v = logits.len() / b;
        // One uniform per unfinished row, drawn in row order (greedy decoding draws none), so
        // that the rows can be sampled on both halves of the pool with the numbers a row-by-row
        // loop would give.
        let live: Vec<usize> = (0..b).filter(|&r| !finished[r]).collect();
        let draws: Vec<f32> = live
            .iter()
            .map(|_| {
                if cfg.temperature > 0.0 {
                    rng.random::<f32>()
                } else {
                    0.0
                }
            })
            .collect();
        let pick = |rows: &[usize], draws: &[f32]| -> Vec<(u32, f32)> {
            let mut probs = Vec::new();
            rows.iter()
                .zip(draws)
                .map(|(&r, &u)| {
                    let row = &logits[r * v..(r + 1) * v];
                    let (max, total) = exponentiate(row, inv_temperature, &mut probs);
                    let tok = if cfg.temperature <= 0.0 {
                        argmax(row)
                    } else {
                        sample(&probs, total, cfg.top_k, cfg.top_p, u)
                    };
                    (tok, row[tok as usize] * inv_temperature - max - total.ln())
                })
                .collect()
        };
        // A row is a few microseconds of work per thousand logits: splitting fewer than 4 rows
        // costs more in hand-off than it saves.
        let half = live.len() / 2;
        let picked: Vec<(u32, f32)> = if live.len() >= 4 {
            let (a, z) = crate::device::join(
                || pick(&live[..half], &draws[..half]),
                || pick(&live[half..], &draws[half..]),
            );
            a.into_iter().chain(z).collect()
        } else {
            pick(&live, &draws)
        };
        let mut picked = picked.into_iter();
        let mut next = Vec::with_capacity(b);
        for (r, done) in finished.iter_mut().enumerate() {
            if *done {
                out.tokens[r].push(cfg.pad_token_id);
                out.logprobs[r].push(0.0);
                out.mask[r].push(false);
                next.push(cfg.pad_token_id);
                continue;
            }
            let (tok, logprob) = picked.next().expect("one pick per unfinished row");
            out.tokens[r].push(tok);
            out.logprobs[r].push(logprob);
            out.mask[r].push(true);
            if cfg.eos_token_ids.contains(&tok) {
                *done = true;
            }
            next.push(tok);
        }
        if finished.iter().all(|&f| f) || step + 1 == cfg.max_new_tokens {
            break;
        }
        // Finished rows keep feeding padding, masked out as keys.
        batch = TokenBatch {
            mask: finished.iter().map(|&f| !f).collect(),
            tokens: next,
            batch: b,
            seq: 1,
        };
    }
    // Rows that finished early were padded step by step; every row has the same length.
    Ok(out)
}

/// One step of a generation: `batch` run after what `cache` holds (its keys and values appended),
/// and the LM logits at each row's last position, [b · vocab] on the host.
pub(crate) fn next_logits(
    model: &CausalLm,
    batch: &TokenBatch,
    cache: &mut KvCache,
) -> crate::Result<Vec<f32>> {
    let hidden = model.forward_cached(batch, cache);
    let [b, t, d] = hidden.dims();
    let logits = model.logits(hidden.slice([0..b, t - 1..t, 0..d]))?;
    Ok(crate::ops::to_f32_vec(logits))
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

crate::cpu::simd::multiversion! {
    /// Unnormalised probabilities of a row of logits at a temperature: probs = e^(x · s − max)
    /// with max the largest x · s, in one vectorised pass. Returns (max, Σ probs), so that
    /// log p(x) = x · s − max − ln Σ.
    fn exponentiate(row: &[f32], s: f32, probs: &mut Vec<f32>) -> (f32, f32) {
        let max = crate::cpu::simd::max_of(row) * s;
        probs.resize(row.len(), 0.0);
        for (p, &x) in probs.iter_mut().zip(row) {
            *p = crate::cpu::simd::exp(x * s - max);
        }
        (max, crate::cpu::simd::sum_map(probs, |p| p))
    }
}

/// Samples a token from unnormalised probabilities `probs` (summing to `total`) after top-k and
/// top-p truncation, with `u` uniform in [0, 1).
fn sample(probs: &[f32], total: f32, top_k: usize, top_p: f32, u: f32) -> u32 {
    let truncate = (top_k > 0 && top_k < probs.len()) || top_p < 1.0;
    if !truncate {
        return draw(probs, total, u) as u32;
    }
    let mut idx: Vec<u32> = (0..probs.len() as u32).collect();
    // Sort by probability, highest first; ties by index for determinism.
    idx.sort_by(|&a, &b| {
        probs[b as usize]
            .partial_cmp(&probs[a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    if top_k > 0 && top_k < idx.len() {
        idx.truncate(top_k);
    }
    if top_p < 1.0 {
        let kept: f32 = idx.iter().map(|&i| probs[i as usize]).sum();
        let mut cum = 0.0;
        let mut keep = 0;
        for &i in &idx {
            keep += 1;
            cum += probs[i as usize] / kept;
            if cum >= top_p {
                break;
            }
        }
        idx.truncate(keep.max(1));
    }
    let weights: Vec<f32> = idx.iter().map(|&i| probs[i as usize]).collect();
    idx[draw(&weights, weights.iter().sum(), u)]
}

/// Position drawn from `weights` (summing to `total`) by inverse CDF at `u` in [0, 1).
fn draw(weights: &[f32], total: f32, u: f32) -> usize {
    let mut u = u * total;
    for (i, &w) in weights.iter().enumerate() {
        if u < w {
            return i;
        }
        u -= w;
    }
    // Rounding left u past the end: the last position with non-zero weight.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_head() {
        // Unnormalised: the same distribution as [0.1, 0.6, 0.3].
        let probs = [0.2f32, 1.2, 0.6];
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            assert_eq!(sample(&probs, 2.0, 1, 1.0, rng.random()), 1);
            // p = 0.5: 0.6 alone already reaches it.
            assert_eq!(sample(&probs, 2.0, 0, 0.5, rng.random()), 1);
            // p = 0.8: {1, 2}, never 0.
            assert_ne!(sample(&probs, 2.0, 0, 0.8, rng.random()), 0);
        }
        assert_eq!(argmax(&probs), 1);
    }

    #[test]
    fn sampling_frequencies_follow_probabilities() {
        let mut rng = StdRng::seed_from_u64(7);
        let n = 20_000;
        let mut probs = Vec::new();
        // Logits ln 0.2, ln 0.8 at temperature 1, through the same path as generation.
        let (max, total) = exponentiate(&[0.2f32.ln(), 0.8f32.ln()], 1.0, &mut probs);
        assert!((max - 0.8f32.ln()).abs() < 1e-6 && (total - 1.25).abs() < 1e-5);
        let ones = (0..n)
            .filter(|_| sample(&probs, total, 0, 1.0, rng.random()) == 1)
            .count();
        let freq = ones as f64 / n as f64;
        assert!((freq - 0.8).abs() < 0.015, "freq {freq}");
    }
}

/// The sampling flags shared by every command that samples (`model generate`,
/// `labeling export-sheet`, …).
#[derive(clap::Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Prompt template with one `{prompt}`, e.g. "Human: {prompt}\n\nAssistant:" (`\n` and `\t`
    /// are read as newline and tab); default: the template stored in the model folder's
    /// rlhf.json, else "Human: {prompt}\n\nAssistant:".
    #[arg(long)]
    pub template: Option<String>,
    /// At least 1 ([`SamplingArgs::problems`]).
    #[arg(long, default_value_t = 64, allow_negative_numbers = true,
          value_parser = crate::flags::at_least::<usize>(0))]
    pub max_new_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true,
          value_parser = crate::flags::at_least::<usize>(0))]
    pub top_k: usize,
    /// 1.0 disables.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true,
          value_parser = crate::flags::at_least::<u64>(0))]
    pub seed: u64,
}

/// What is wrong with the sampling settings every sampling command shares, each naming its flag,
/// value and range (`--max-new-tokens`, `--temperature`, `--top-p`).
pub fn sampling_problems(max_new_tokens: usize, temperature: f32, top_p: f32) -> Vec<String> {
    let mut out = Vec::new();
    if max_new_tokens == 0 {
        out.push("--max-new-tokens must be at least 1".to_string());
    }
    if !(temperature >= 0.0 && temperature.is_finite()) {
        out.push(format!(
            "--temperature {temperature}: must be ≥ 0 (0 is greedy)"
        ));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        out.push(format!("--top-p {top_p}: must be in (0, 1] (1 disables)"));
    }
    out
}

impl SamplingArgs {
    /// What is wrong with the flags, each naming its flag, value and range (the counts and
    /// seed are checked as they are parsed: a negative one is a range error there). The same
    /// words as `reward best-of-n`'s checks of these flags.
    pub fn problems(&self) -> Vec<String> {
        sampling_problems(self.max_new_tokens, self.temperature, self.top_p)
    }

    /// [`SamplingArgs::problems`] as one error.
    pub fn check(&self) -> crate::Result<()> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(crate::ModelError::Invalid(problems.join("; ")))
        }
    }

    /// The prompt template: `--template` (shell-typed `\n` / `\t` turned into newline / tab),
    /// else the one stored with the model folder `dir` (see
    /// [`crate::checkpoint::resolve_template`]).
    pub fn template(&self, dir: &std::path::Path) -> crate::Result<crate::PromptTemplate> {
        let given = self
            .template
            .as_ref()
            .map(|t| t.replace("\\n", "\n").replace("\\t", "\t"));
        crate::checkpoint::resolve_template(given.as_deref(), Some(dir))
    }

    /// The sampling config for a tokenizer's EOS and padding ids.
    pub fn config(&self, eos: u32, pad: u32) -> SamplingConfig {
        SamplingConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            eos_token_ids: vec![eos],
            pad_token_id: pad,
        }
    }
}

/// What a model's context leaves for a prompt after `max_new_tokens`: a prompt that does not fit
/// is refused (never cut: a cut prompt asks another question), naming its length, the context and
/// what to change. Every command that samples from a model folder (`model generate`, `labeling
/// export-sheet`) checks its prompts with it.
pub struct PromptRoom {
    /// Tokens a prompt may have.
    pub tokens: usize,
    /// "the model's context of C tokens (KEY in DIR/config.json) leaves T for the prompt after
    /// --max-new-tokens N; ...".
    why: String,
}

impl PromptRoom {
    /// The room `model` (loaded from `dir`) leaves a prompt after `max_new_tokens`; an error when
    /// it leaves none.
    pub fn new(
        model: &CausalLm,
        dir: &std::path::Path,
        max_new_tokens: usize,
    ) -> crate::Result<Self> {
        let cfg = model.config();
        let context = cfg.max_position_embeddings;
        let key = cfg.context_key();
        let config = dir.join("config.json");
        if max_new_tokens >= context {
            return Err(crate::ModelError::Invalid(format!(
                "--max-new-tokens {max_new_tokens} leaves no room for a prompt in the context of {context} tokens ({key} in {}); lower --max-new-tokens",
                config.display()
            )));
        }
        let tokens = context - max_new_tokens;
        Ok(Self {
            tokens,
            why: format!(
                "the model's context of {context} tokens ({key} in {}) leaves {tokens} for the prompt after --max-new-tokens {max_new_tokens}; shorten the prompt or lower --max-new-tokens",
                config.display()
            ),
        })
    }

    /// The tokens of the templated `prompt`, or an error when they do not fit. A prompt of more
    /// bytes than the room's tokens can cover is refused without being tokenized.
    pub fn encode(
        &self,
        tok: &crate::Tokenizer,
        template: &crate::PromptTemplate,
        prompt: &str,
    ) -> crate::Result<Vec<u32>> {
        let bytes = template.rendered_len(prompt);
        if bytes > self.tokens.saturating_mul(tok.max_token_bytes()) {
            return Err(crate::ModelError::Invalid(format!(
                "the prompt is {bytes} bytes with its template, more than {} tokens can cover (a token of this tokenizer stands for at most {} bytes), and {}",
                self.tokens,
                tok.max_token_bytes(),
                self.why
            )));
        }
        let ids = tok.encode(&template.render(prompt))?;
        if ids.len() > self.tokens {
            return Err(crate::ModelError::Invalid(format!(
                "the prompt is {} tokens with its template, but {}",
                ids.len(),
                self.why
            )));
        }
        Ok(ids)
    }
}
