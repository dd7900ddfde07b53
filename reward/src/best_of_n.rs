//! Best-of-N sampling (rejection sampling): draw N responses per prompt from a policy, score
//! them all with the one [`Scorer`], keep the best. No training: the reward model is used at
//! sampling time only (Nakano et al. 2021, WebGPT; Stiennon et al. 2020; Touvron et al. 2023,
//! Llama 2 §3.2.3, "rejection sampling"). Two uses here:
//!
//! - `reward best-of-n`: the best responses written as demonstrations that `sft` reads. Fine-tuning
//!   the policy on them is expert iteration (Anthony et al. 2017), OpenAI's FeedME (supervised
//!   fine-tuning on the model's own best-rated samples; its model index for researchers lists
//!   `text-davinci-002` as trained so) and Llama 2's rejection-sampling fine-tuning.
//! - `evaluate --best-of-n N`: the baseline's best-of-N as a reference row: what the proxy reward
//!   buys with no training, at a known KL (Gao et al. 2022 compare RL against it).
//!
//! Which sample is kept: the highest score among the samples that ended with EOS; a sample cut at
//! `max_new_tokens` is kept only when none of its prompt's samples ended (it ranks below every
//! finished one, whatever its score, rather than getting PPO's fixed −1: a fixed penalty means
//! nothing on a reward model's own scale). `sft` appends EOS to every demonstration, so a cut
//! response would teach the policy to stop mid-sentence. Of equal scores, the first sample; a NaN
//! score ranks lowest. Scores are kept as the scorer gives them, so a written line can be checked
//! by scoring it again.
//!
//! The KL of the best-of-N distribution from the policy is log N − (N−1)/N nats (Stiennon et al.
//! 2020, App. G.3; Gao et al. 2022, §2), which Beirami et al. 2024 show is an upper bound: 0 at
//! N = 1, 0.636 at 4, 1.204 at 8, 3.175 at 64.
//!
//! The sampler [`sample`] is also `evaluate`'s: the samples of a prompt are adjacent, batches are
//! grouped by prompt length on the KV-cache path ([`model::generate`]), and each batch is seeded
//! from (seed, batch index): the same seed and batch size give the same samples.

use crate::{Aggregate, Item, Scorer, ScorerOptions};
use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use model::{CausalLm, Heads, PromptTemplate, SamplingConfig, Tokenizer};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// log N − (N−1)/N: the KL (nats) of the best-of-N distribution from the one sampled from, the
/// analytic value of Stiennon et al. 2020 (App. G.3) and Gao et al. 2022 (§2), an upper bound
/// (Beirami et al. 2024). 0 for N ≤ 1.
pub fn kl_bound(n: usize) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let n = n as f64;
    n.ln() - (n - 1.0) / n
}

/// Index of the sample to keep among one prompt's (see the module docs): the highest score among
/// those with EOS, else the highest of all; the first of equal scores; NaN lowest. None when
/// there are none. scores, eos: [n].
pub fn best(scores: &[f64], eos: &[bool]) -> Option<usize> {
    let key = |i: usize| {
        let s = if scores[i].is_nan() {
            f64::NEG_INFINITY
        } else {
            scores[i]
        };
        (eos[i], s)
    };
    (0..scores.len().min(eos.len())).reduce(|kept, i| if key(i) > key(kept) { i } else { kept })
}

/// One prompt's best of its N samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    /// Which of the prompt's samples (0-based).
    pub sample: usize,
    pub score: f64,
    /// The mean score of the prompt's N samples.
    pub mean_score: f64,
}

/// The best of each consecutive run of `n` samples (prompt-major, as [`sample`] returns them).
/// scores, eos: [prompts · n] → [prompts].
pub fn choose(scores: &[f64], eos: &[bool], n: usize) -> Vec<Choice> {
    scores
        .chunks(n.max(1))
        .zip(eos.chunks(n.max(1)))
        .map(|(s, e)| {
            let i = best(s, e).expect("chunks are not empty");
            Choice {
                sample: i,
                score: s[i],
                mean_score: s.iter().sum::<f64>() / s.len() as f64,
            }
        })
        .collect()
}

/// A causal LM to sample from (a policy, baseline or reference) with its tokenizer and template.
pub struct Policy {
    pub dir: PathBuf,
    pub model: CausalLm,
    pub tokenizer: Tokenizer,
    /// The template stored with the folder (its rlhf.json), unless replaced.
    pub template: PromptTemplate,
}

impl Policy {
    /// Loads a causal-LM folder (dropout off); a reward model or an ensemble here is an error
    /// naming the folder and `what` (the option it was given to).
    pub fn load(dir: &Path, what: &str, device: &Device) -> Result<Self> {
        if crate::scorer::Manifest::read(dir)?.is_some() {
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
            model: model
                .with_dropout(0.0)
                .keep_frozen(model::WeightDtype::Auto),
            tokenizer,
            template,
        })
    }

    /// template(prompt) tokenized for each (prompt, line) of the file `path`; a prompt that
    /// renders to no tokens, or leaves no room for `max_new_tokens` in the model's context, is an
    /// error naming its line.
    pub fn encode_prompts<'a>(
        &self,
        prompts: impl IntoIterator<Item = (&'a str, usize)>,
        max_new_tokens: usize,
        path: &Path,
    ) -> Result<Vec<Vec<u32>>> {
        let context = self.model.config().max_position_embeddings;
        prompts
            .into_iter()
            .map(|(text, line)| {
                let t = self.tokenizer.encode(&self.template.render(text))?;
                if t.is_empty() {
                    bail!(
                        "{} line {line}, field `prompt`: renders to no tokens with the template {:?}",
                        path.display(),
                        self.template.as_str()
                    );
                }
                if t.len() + max_new_tokens > context {
                    bail!(
                        "{} line {line}, field `prompt`: {} tokens with the template of {}, which leaves less than --max-new-tokens {max_new_tokens} of its {context}-token context",
                        path.display(),
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
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sampling {
    pub samples_per_prompt: usize,
    pub max_new_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    pub seed: u64,
    /// Sequences per generation batch.
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

    /// What is wrong with the settings every sampling command shares, each naming its flag
    /// (`--max-new-tokens`, `--temperature`, `--top-p`); the callers check their own counts.
    pub fn problems(&self) -> Vec<String> {
        model::generate::sampling_problems(self.max_new_tokens, self.temperature, self.top_p)
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
pub fn sample(
    model: &CausalLm,
    tok: &Tokenizer,
    encoded: &[Vec<u32>],
    s: &Sampling,
) -> Result<Vec<Response>> {
    let k = s.samples_per_prompt;
    let mut order: Vec<usize> = (0..encoded.len() * k).collect();
    // Stable: a prompt's samples stay adjacent, so a batch of m · k rows holds m whole prompts.
    order.sort_by_key(|&i| encoded[i / k].len());
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
        let g = model::generate(model, &prompts, &cfg)?;
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

/// `reward best-of-n`: sample N responses per prompt from a policy, score them with a reward
/// model (or ensemble) or a rule, and write the best of each prompt as a demonstration line
/// `{"prompt", "response", "score", "n", "mean_score", "sample", "eos"}` that `sft` reads (it
/// reads `prompt` and `response`; the others are for people and scripts).
#[derive(clap::Args, Clone, Debug)]
pub struct BestOfNArgs {
    /// The policy to sample from (a causal-LM folder, e.g. sft's final/).
    #[arg(long)]
    pub policy: PathBuf,
    /// Prompts (.jsonl, .csv, .parquet) with `prompt`, and `answer` for a rule that checks
    /// answers.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Read field NAME from the file's column COLUMN, e.g. --col prompt=question (repeatable).
    #[arg(long = "col", value_name = "NAME=COLUMN")]
    pub cols: Vec<String>,
    /// Samples per prompt (N).
    #[arg(long, default_value_t = 8)]
    pub n: usize,
    /// The demonstrations written (JSONL; a temporary file beside it, renamed when complete).
    #[arg(long)]
    pub out: PathBuf,
    /// Every sample too, one line each: {"prompt", "sample", "response", "score", "eos",
    /// "chosen"}.
    #[arg(long)]
    pub samples: Option<PathBuf>,
    /// The reward model (or ensemble folder) that scores the samples; or give --rule.
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// A rule reward instead of a reward model (`exact_answer`, `final_answer`, `regex:<p>`,
    /// ...: the names of ppo's `reward.rule`).
    #[arg(long)]
    pub rule: Option<String>,
    /// An ensemble's reward: mean, mean_minus_std (mean − λ·std) or min over the members.
    #[arg(long, alias = "aggregate", value_parser = parse_aggregate, default_value = "mean_minus_std")]
    pub ensemble: Aggregate,
    /// λ of mean_minus_std.
    #[arg(long, default_value_t = 1.0)]
    pub uncertainty_coef: f64,
    /// Prompts per batch: their N samples are generated, then scored, together.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[command(flatten)]
    pub sampling: model::generate::SamplingArgs,
    /// `cpu`, or `cuda:N` with the tch backend.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `mean`, `mean_minus_std` or `min` (ppo's spelling), or the hyphenated names of `reward score
/// --aggregate`.
fn parse_aggregate(s: &str) -> std::result::Result<Aggregate, String> {
    <Aggregate as clap::ValueEnum>::from_str(&s.replace('_', "-"), true)
        .map_err(|_| format!("{s:?}: expected mean, mean_minus_std or min"))
}

impl BestOfNArgs {
    fn sampling(&self) -> Sampling {
        let a = &self.sampling;
        Sampling {
            samples_per_prompt: self.n,
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
            batch_size: self.batch_size.saturating_mul(self.n),
        }
    }

    /// The field → column renames of `--col`.
    fn columns(&self) -> Result<HashMap<String, String>> {
        self.cols
            .iter()
            .map(|c| match c.split_once('=') {
                Some((name, col)) if !name.trim().is_empty() && !col.trim().is_empty() => {
                    Ok((name.trim().to_string(), col.trim().to_string()))
                }
                _ => bail!("--col {c:?}: expected NAME=COLUMN, e.g. --col prompt=question"),
            })
            .collect()
    }

    /// Every problem of the flags in one error, each naming its flag.
    fn check(&self) -> Result<()> {
        let mut errs = Vec::new();
        if self.n == 0 {
            errs.push("--n must be at least 1".to_string());
        }
        if self.batch_size == 0 {
            errs.push("--batch-size must be at least 1".to_string());
        }
        if self.n > 1 && self.sampling.temperature == 0.0 {
            errs.push(format!(
                "--temperature 0 is greedy: the {} samples of a prompt would all be the same; give a temperature > 0",
                self.n
            ));
        }
        match (&self.reward_model, &self.rule) {
            (Some(_), Some(_)) => {
                errs.push("--reward-model and --rule both given: give one of them".into())
            }
            (None, None) => errs.push("give the scorer: --reward-model DIR or --rule RULE".into()),
            _ => {}
        }
        if !(self.uncertainty_coef.is_finite() && self.uncertainty_coef >= 0.0) {
            errs.push(format!(
                "--uncertainty-coef {}: must be ≥ 0",
                self.uncertainty_coef
            ));
        }
        errs.extend(self.sampling().problems());
        if let Err(e) = self.columns() {
            errs.push(e.to_string());
        }
        for (flag, p) in [
            ("--out", Some(&self.out)),
            ("--samples", self.samples.as_ref()),
        ] {
            let Some(p) = p else { continue };
            if p.is_dir() {
                errs.push(format!("{flag} {}: is a folder; give a file", p.display()));
            } else if same_file(p, &self.prompts) {
                errs.push(format!(
                    "{flag} {}: is the prompts file; give another file",
                    p.display()
                ));
            }
        }
        if self
            .samples
            .as_ref()
            .is_some_and(|s| same_file(s, &self.out))
        {
            errs.push("--samples is the --out file; give another file".into());
        }
        if !errs.is_empty() {
            bail!("{}", errs.join("; "));
        }
        Ok(())
    }

    /// The scorer of `--rule` or `--reward-model`.
    fn scorer(&self, device: &Device) -> Result<Scorer> {
        if let Some(rule) = &self.rule {
            let compiled = datasets::parse_rule(rule)
                .and_then(|r| r.compile())
                .map_err(|e| anyhow::anyhow!("--rule {rule:?}: {e}"))?;
            return Ok(Scorer::Rule(compiled));
        }
        let dir = self.reward_model.as_ref().expect("checked: one scorer");
        let options = ScorerOptions {
            aggregate: self.ensemble,
            uncertainty_coef: self.uncertainty_coef,
            batch_size: self.batch_size.saturating_mul(self.n),
            ..ScorerOptions::default()
        };
        Scorer::load(dir, options, device).context("--reward-model")
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// What `reward best-of-n` did; its `Display` is the summary line.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub n: usize,
    pub prompts: usize,
    pub samples: usize,
    /// The mean score of every sample: what sampling once from the policy scores.
    pub mean_score: f64,
    /// The mean score of the chosen samples.
    pub mean_chosen: f64,
    /// [`kl_bound`] of n, nats.
    pub kl: f64,
    /// Prompts whose chosen sample has no EOS (none of its samples ended).
    pub chosen_without_eos: usize,
    /// Reward models whose folder stores no normalisation (their raw scores were used).
    pub unnormalized: Vec<PathBuf>,
    pub out: PathBuf,
    pub seconds: f64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for d in &self.unnormalized {
            writeln!(
                f,
                "note: {} stores no reward normalisation; its raw scores were used",
                d.display()
            )?;
        }
        write!(
            f,
            "best-of-{}: {} prompts, {} samples in {:.1}s; mean score of all samples {:.4}, of the chosen {:.4} ({:+.4}); KL(best-of-{} ‖ policy) ≤ log n − (n−1)/n = {:.4} nats",
            self.n,
            self.prompts,
            self.samples,
            self.seconds,
            self.mean_score,
            self.mean_chosen,
            self.mean_chosen - self.mean_score,
            self.n,
            self.kl
        )?;
        if self.chosen_without_eos > 0 {
            write!(
                f,
                "; {} prompts had no sample with EOS (their best, cut at --max-new-tokens, was written)",
                self.chosen_without_eos
            )?;
        }
        write!(f, "; wrote {}", self.out.display())
    }
}

/// Runs `reward best-of-n` (see [`BestOfNArgs`]): checks every flag and reads every input before
/// sampling, and writes nothing unless all of it succeeds.
pub fn run(args: &BestOfNArgs) -> Result<Summary> {
    args.check()?;
    let device = model::parse_device(&args.device).context("--device")?;
    let scorer = args.scorer(&device)?;
    let mut policy = Policy::load(&args.policy, "--policy", &device)?;
    if args.sampling.template.is_some() {
        policy.template = args.sampling.template(&args.policy).context("--template")?;
    }
    let prompts = read_prompts(&args.prompts, args.columns()?, scorer.needs_answer())?;
    let sampling = args.sampling();
    let encoded = policy.encode_prompts(
        prompts.iter().map(|p| (p.prompt.as_str(), p.line)),
        sampling.max_new_tokens,
        &args.prompts,
    )?;

    let t0 = Instant::now();
    let responses = sample(&policy.model, &policy.tokenizer, &encoded, &sampling)?;
    let scores = score_responses(&scorer, &responses, |i| {
        (prompts[i].prompt.as_str(), prompts[i].answer.as_deref())
    })
    .map_err(|e| locate(e, &args.prompts, &prompts, args.n))?;
    let eos: Vec<bool> = responses.iter().map(|r| r.eos).collect();
    let choices = choose(&scores, &eos, args.n);
    let seconds = t0.elapsed().as_secs_f64();

    write_outputs(args, &prompts, &responses, &scores, &choices)?;
    Ok(Summary {
        n: args.n,
        prompts: prompts.len(),
        samples: responses.len(),
        mean_score: scores.iter().sum::<f64>() / scores.len() as f64,
        mean_chosen: choices.iter().map(|c| c.score).sum::<f64>() / choices.len() as f64,
        kl: kl_bound(args.n),
        chosen_without_eos: choices
            .iter()
            .enumerate()
            .filter(|(i, c)| !responses[i * args.n + c.sample].eos)
            .count(),
        unnormalized: scorer
            .unnormalized()
            .into_iter()
            .map(Path::to_path_buf)
            .collect(),
        out: args.out.clone(),
        seconds,
    })
}

/// The score of each response through `scorer`, in order; `prompt(i)` is the text and the
/// reference answer of prompt i (what [`Response::prompt`] indexes).
pub fn score_responses<'a>(
    scorer: &Scorer,
    responses: &'a [Response],
    prompt: impl Fn(usize) -> (&'a str, Option<&'a str>),
) -> Result<Vec<f64>> {
    let items: Vec<Item> = responses
        .iter()
        .map(|r| {
            let (text, answer) = prompt(r.prompt);
            Item {
                prompt: text,
                response: &r.text,
                answer,
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

/// Writes `--out` (the chosen of each prompt) and `--samples` (every sample), all or nothing.
fn write_outputs(
    args: &BestOfNArgs,
    prompts: &[datasets::PromptRecord],
    responses: &[Response],
    scores: &[f64],
    choices: &[Choice],
) -> Result<()> {
    let demos = choices.iter().zip(prompts).enumerate().map(|(i, (c, p))| {
        let r = &responses[i * args.n + c.sample];
        Demo {
            prompt: &p.prompt,
            response: &r.text,
            score: c.score,
            n: args.n,
            mean_score: c.mean_score,
            sample: c.sample,
            eos: r.eos,
        }
    });
    let mut files = vec![(args.out.clone(), lines(demos)?)];
    if let Some(path) = &args.samples {
        let all = responses.iter().zip(scores).map(|(r, &score)| SampleLine {
            prompt: &prompts[r.prompt].prompt,
            sample: r.sample,
            response: &r.text,
            score,
            eos: r.eos,
            chosen: choices[r.prompt].sample == r.sample,
        });
        files.push((path.clone(), lines(all)?));
    }
    write_all_or_nothing(&files)
}

/// The prompts of `path`, with `columns` renamed; none, or a missing answer where the rule needs
/// one, is an error naming the file and line.
fn read_prompts(
    path: &Path,
    columns: HashMap<String, String>,
    need_answer: bool,
) -> Result<Vec<datasets::PromptRecord>> {
    let src = datasets::Source {
        path: path.to_path_buf(),
        format: None,
        columns,
    };
    let prompts = datasets::load_prompts(&src).with_context(|| "--prompts".to_string())?;
    if prompts.is_empty() {
        bail!("--prompts {}: no prompts", path.display());
    }
    if need_answer && let Some(p) = prompts.iter().find(|p| p.answer.is_none()) {
        let col = src.columns.get("answer").map_or("answer", String::as_str);
        bail!(
            "{} line {}, field `{col}`: missing; the --rule checks each response against its prompt's answer",
            path.display(),
            p.line
        );
    }
    Ok(prompts)
}

/// A rule's scoring error ([`crate::scorer::ItemError`]) named by the prompt's file and line
/// (sample i is of prompt i / n); other errors as they are.
fn locate(
    e: anyhow::Error,
    path: &Path,
    prompts: &[datasets::PromptRecord],
    n: usize,
) -> anyhow::Error {
    match e.downcast_ref::<crate::scorer::ItemError>() {
        Some(ie) if ie.index / n < prompts.len() => anyhow::anyhow!(
            "{} line {}: {}",
            path.display(),
            prompts[ie.index / n].line,
            ie.message
        ),
        _ => e,
    }
}

/// A line of `--out`: a demonstration `sft` reads (`prompt`, `response`) with what chose it.
#[derive(Serialize)]
struct Demo<'a> {
    prompt: &'a str,
    response: &'a str,
    score: f64,
    n: usize,
    /// The mean score of the prompt's n samples.
    mean_score: f64,
    /// Which of the n samples (0-based).
    sample: usize,
    eos: bool,
}

/// A line of `--samples`: one sample of a prompt.
#[derive(Serialize)]
struct SampleLine<'a> {
    prompt: &'a str,
    sample: usize,
    response: &'a str,
    score: f64,
    eos: bool,
    chosen: bool,
}

/// Records as JSONL text, in order.
fn lines<T: Serialize>(records: impl Iterator<Item = T>) -> Result<String> {
    let mut s = String::new();
    for r in records {
        s.push_str(&serde_json::to_string(&r)?);
        s.push('\n');
    }
    Ok(s)
}

/// Writes each (path, text) to a temporary file beside it (`.NAME.tmp`), then renames them all
/// into place: an error while writing leaves no temporary file and touches no path.
fn write_all_or_nothing(files: &[(PathBuf, String)]) -> Result<()> {
    let tmps: Vec<PathBuf> = files
        .iter()
        .map(|(p, _)| model::checkpoint::sibling(p, "tmp"))
        .collect();
    let written = files.iter().zip(&tmps).try_for_each(|((path, text), tmp)| {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut f = std::fs::File::create(tmp)
            .with_context(|| format!("{}: cannot create", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))
    });
    let renamed = written.and_then(|_| {
        files.iter().zip(&tmps).try_for_each(|((path, _), tmp)| {
            std::fs::rename(tmp, path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
        })
    });
    if renamed.is_err() {
        for t in &tmps {
            let _ = std::fs::remove_file(t);
        }
    }
    renamed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_bound_is_log_n_minus_n_minus_one_over_n() {
        assert_eq!(kl_bound(1), 0.0);
        assert_eq!(kl_bound(0), 0.0);
        // ln 2 − 1/2, ln 4 − 3/4, ln 8 − 7/8, ln 64 − 63/64.
        for (n, want) in [
            (2, 0.193_147_180_559_945_3),
            (4, 0.636_294_361_119_890_6),
            (8, 1.204_441_541_679_835_7),
            (64, 3.174_508_083_359_671_5),
        ] {
            assert!((kl_bound(n) - want).abs() < 1e-15, "{n}: {}", kl_bound(n));
        }
    }

    #[test]
    fn the_best_has_eos_then_the_highest_score_and_ties_go_to_the_first() {
        // The highest score has no EOS: the best finished one wins.
        assert_eq!(best(&[0.2, 0.9, 0.5], &[true, false, true]), Some(2));
        // Ties: the first.
        assert_eq!(best(&[0.5, 0.7, 0.7], &[true, true, true]), Some(1));
        assert_eq!(best(&[1.0, 1.0], &[true, true]), Some(0));
        // None finished: the highest of all.
        assert_eq!(best(&[0.1, 0.3, 0.2], &[false, false, false]), Some(1));
        // NaN ranks lowest, even first.
        assert_eq!(best(&[f64::NAN, -5.0], &[true, true]), Some(1));
        assert_eq!(best(&[], &[]), None);
        // Negative scores: a finished −3 beats an unfinished −1 (no fixed penalty involved).
        assert_eq!(best(&[-1.0, -3.0], &[false, true]), Some(1));
    }

    #[test]
    fn choose_takes_the_best_of_each_run_of_n_with_its_mean() {
        let scores = [0.0, 1.0, 0.5, 0.25, 2.0, 2.0, -1.0, 3.0];
        let eos = [true, true, true, true, true, true, true, false];
        let c = choose(&scores, &eos, 4);
        assert_eq!(
            c,
            vec![
                Choice {
                    sample: 1,
                    score: 1.0,
                    mean_score: 0.4375
                },
                Choice {
                    sample: 0,
                    score: 2.0,
                    mean_score: 1.5
                },
            ]
        );
        // n = 1: every sample is its own best.
        let c = choose(&scores, &eos, 1);
        assert_eq!(c.len(), 8);
        assert!(
            c.iter()
                .zip(scores)
                .all(|(c, s)| c.score == s && c.sample == 0)
        );
    }

    #[test]
    fn aggregate_names_take_both_spellings() {
        assert_eq!(
            parse_aggregate("mean_minus_std"),
            Ok(Aggregate::MeanMinusStd)
        );
        assert_eq!(
            parse_aggregate("mean-minus-std"),
            Ok(Aggregate::MeanMinusStd)
        );
        assert_eq!(parse_aggregate("min"), Ok(Aggregate::Min));
        assert!(
            parse_aggregate("median")
                .unwrap_err()
                .contains("mean_minus_std")
        );
    }

    #[test]
    fn a_failed_write_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("a.jsonl");
        // A path below a regular file cannot be created.
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "x").unwrap();
        let bad = blocker.join("b.jsonl");
        let e = write_all_or_nothing(&[(good.clone(), "1\n".into()), (bad, "2\n".into())]);
        assert!(e.is_err());
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["file".to_string()], "left: {names:?}");
        write_all_or_nothing(&[(good.clone(), "1\n".into())]).unwrap();
        assert_eq!(std::fs::read_to_string(&good).unwrap(), "1\n");
    }
}
