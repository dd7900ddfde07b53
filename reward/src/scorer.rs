//! The one way a response is scored, for every caller: `ppo`'s rollouts, `evaluate`, `reward
//! score` (and a server). A [`Scorer`] is a rule, a reward model or an ensemble of reward models,
//! each model with its own tokenizer, template and normalisation (`rlhf.json`).
//!
//! Encoding is [`crate::data::fit`]'s, the same as training's: template(prompt) + response + EOS,
//! the prompt cut from the left to fit the model's context; a response too long by itself is cut
//! at the end (its EOS kept) and counted in [`Scores::cut_responses`], never replaced.
//!
//! An ensemble folder (written by `reward` with `ensemble.members > 1`) holds `ensemble.json` and
//! one HF reward-model folder per member (`member-0/`, ...), and optionally `monitor/`: a model
//! trained on prompts no member saw (the held-out signal of `ppo`'s over-optimisation monitor).
//! What an ensemble optimises is [`Aggregate`]: the members' mean, mean − λ·std
//! (uncertainty-weighted, Coste et al. 2023; Eisenstein et al. 2023) or their minimum
//! (worst-case).

use crate::data::{Long, fit};
use crate::likelihood::Likelihood;
use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use datasets::CompiledRule;
use model::{
    CausalLm, Heads, ModelMeta, PromptTemplate, RewardNormalization, Tokenizer, WeightDtype,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The manifest of an ensemble folder.
pub const ENSEMBLE_FILE: &str = "ensemble.json";

/// `ensemble.json`: the member folders (relative to the ensemble folder) and the optional
/// held-out monitor model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub members: Vec<String>,
    #[serde(default)]
    pub monitor: Option<String>,
    /// What the members were trained on (seeds, bootstrap), for people.
    #[serde(default)]
    pub note: String,
}

impl Manifest {
    /// The manifest of `dir`, None when `dir` is a plain reward-model folder.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let p = dir.join(ENSEMBLE_FILE);
        match std::fs::read_to_string(&p) {
            Ok(text) => {
                let m: Manifest = serde_json::from_str(&text)
                    .with_context(|| format!("{}: not an ensemble manifest", p.display()))?;
                if m.members.is_empty() {
                    bail!("{}: `members` is empty", p.display());
                }
                Ok(Some(m))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("{}: cannot read", p.display())),
        }
    }
}

/// The folder of a reward model to start a critic from, or to read a template from: the folder
/// itself, or an ensemble's first member.
pub fn first_model_dir(dir: &Path) -> Result<PathBuf> {
    Ok(match Manifest::read(dir)? {
        Some(m) => dir.join(&m.members[0]),
        None => dir.to_path_buf(),
    })
}

/// The held-out monitor model stored with an ensemble, if any.
pub fn monitor_dir(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(Manifest::read(dir)?.and_then(|m| m.monitor.map(|d| dir.join(d))))
}

/// How an ensemble's members' rewards become the one reward that is optimised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// The members' mean.
    Mean,
    /// mean − λ·std over the members (uncertainty-weighted optimisation).
    #[default]
    MeanMinusStd,
    /// The lowest member (worst-case optimisation).
    Min,
}

impl Aggregate {
    /// The aggregate of one response's member rewards; `coef` is λ of `mean_minus_std`.
    pub fn apply(self, rewards: &[f32], coef: f64) -> f32 {
        let (mean, std) = mean_std(rewards);
        match self {
            Aggregate::Mean => mean as f32,
            Aggregate::MeanMinusStd => (mean - coef * std) as f32,
            Aggregate::Min => rewards.iter().copied().fold(f32::INFINITY, f32::min),
        }
    }
}

/// Mean and population standard deviation (0 for one value).
pub fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// A frozen reward model with its own tokenizer, template and normalisation.
pub struct RewardModel {
    pub dir: PathBuf,
    pub model: CausalLm,
    pub tokenizer: Tokenizer,
    pub template: PromptTemplate,
    /// Applied unless the scorer is raw; None when the folder stores none.
    pub normalization: Option<RewardNormalization>,
    /// The likelihood term of the reward, when the folder stores one ([`crate::likelihood`]).
    pub likelihood: Option<Likelihood>,
}

impl RewardModel {
    /// Loads a reward-model folder (dropout off, its matrices kept as `dtype` says:
    /// [`model::WeightDtype`]); `template` overrides the stored one.
    pub fn load(
        dir: &Path,
        template: Option<&str>,
        dtype: WeightDtype,
        device: &Device,
    ) -> Result<Self> {
        let (model, tokenizer, meta): (_, _, ModelMeta) =
            model::checkpoint::load_with_tokenizer(dir, Some(Heads::SCALAR), None, device)
                .with_context(|| format!("reward model {}", dir.display()))?;
        let model = model.keep_frozen(dtype);
        let template = model::checkpoint::resolve_template(template, Some(dir))
            .with_context(|| format!("reward model {}", dir.display()))?;
        let likelihood = Likelihood::stored(dir, &tokenizer, dtype, device)
            .with_context(|| format!("reward model {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            model: model.with_dropout(0.0),
            tokenizer,
            template,
            normalization: meta.reward_normalization,
            likelihood,
        })
    }

    /// The longest sequence the model reads.
    pub fn max_len(&self) -> usize {
        self.model.config().max_position_embeddings.max(2)
    }

    /// Rewards of `items` (normalised unless `raw`), in order, and what was cut; prompts
    /// rendered with `template`, else this model's own.
    fn score(
        &self,
        items: &[Item],
        template: Option<&PromptTemplate>,
        batch_size: usize,
        raw: bool,
    ) -> Result<(Vec<f32>, Cuts)> {
        let mut cuts = Cuts::default();
        let mut seqs = Vec::with_capacity(items.len());
        let mut prompt_lens = Vec::with_capacity(items.len());
        for it in items {
            let e = fit(
                &self.tokenizer,
                template.unwrap_or(&self.template),
                it.prompt,
                it.response,
                self.max_len(),
                Long::Cut,
            )?
            .expect("Long::Cut always fits");
            cuts.prompts += e.prompt_cut as usize;
            cuts.responses += e.response_cut as usize;
            seqs.push(e.tokens);
            prompt_lens.push(e.prompt_len);
        }
        Ok((
            self.score_tokens(&seqs, &prompt_lens, batch_size, raw)?,
            cuts,
        ))
    }

    /// Rewards of sequences already encoded with this model's tokenizer, whose first
    /// `prompt_lens` tokens are the prompt (normalised unless `raw`; with the likelihood term
    /// when the folder has one, raw or not: it is part of the reward).
    pub fn score_tokens(
        &self,
        seqs: &[Vec<u32>],
        prompt_lens: &[usize],
        batch_size: usize,
        raw: bool,
    ) -> Result<Vec<f32>> {
        let pad = self.tokenizer.pad_id;
        let mut r = crate::score_sequences(&self.model, seqs, batch_size, pad)?;
        if let Some(l) = &self.likelihood {
            for (x, p) in r
                .iter_mut()
                .zip(l.terms(seqs, prompt_lens, batch_size, pad)?)
            {
                *x += p;
            }
        }
        if !raw && let Some(n) = &self.normalization {
            for x in r.iter_mut() {
                *x = n.apply(*x);
            }
        }
        Ok(r)
    }
}

/// One response to score.
#[derive(Clone, Copy, Debug)]
pub struct Item<'a> {
    pub prompt: &'a str,
    /// The response text, EOS excluded.
    pub response: &'a str,
    /// The prompt's reference answer (rules that check answers need it).
    pub answer: Option<&'a str>,
}

impl<'a> Item<'a> {
    /// Items of (prompt, response) pairs, without reference answers.
    pub fn pairs(pairs: &'a [(String, String)]) -> Vec<Self> {
        pairs
            .iter()
            .map(|(p, r)| Item {
                prompt: p,
                response: r,
                answer: None,
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
struct Cuts {
    prompts: usize,
    responses: usize,
}

/// What a scorer returned for a batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scores {
    /// The reward of each response: the rule's, the model's, or the ensemble's aggregate.
    pub rewards: Vec<f32>,
    /// Each member's rewards (one row per member; one row for a single model; none for a rule).
    pub members: Vec<Vec<f32>>,
    /// Prompts cut from the left to fit a model's context (summed over members).
    pub cut_prompts: usize,
    /// Responses too long for a model's context by themselves, cut at the end (summed over
    /// members).
    pub cut_responses: usize,
}

impl Scores {
    /// The members' mean reward of each response (the rewards for a rule).
    pub fn member_mean(&self) -> Vec<f32> {
        if self.members.is_empty() {
            return self.rewards.clone();
        }
        self.per_response(|v| mean_std(v).0 as f32)
    }

    /// The members' standard deviation for each response: the ensemble's disagreement (0 for a
    /// single model or a rule).
    pub fn member_std(&self) -> Vec<f32> {
        if self.members.is_empty() {
            return vec![0.0; self.rewards.len()];
        }
        self.per_response(|v| mean_std(v).1 as f32)
    }

    /// `f` of each response's member rewards.
    fn per_response(&self, f: impl Fn(&[f32]) -> f32) -> Vec<f32> {
        (0..self.members.first().map_or(0, Vec::len))
            .map(|i| {
                let col: Vec<f32> = self.members.iter().map(|m| m[i]).collect();
                f(&col)
            })
            .collect()
    }
}

/// A rule could not score the response at `index` of the batch (the prompt's reference answer is
/// missing or not of the rule's kind); callers that know where the prompt came from say so
/// (`ppo` names the prompts file and line).
#[derive(Debug)]
pub struct ItemError {
    pub index: usize,
    pub message: String,
}

impl std::fmt::Display for ItemError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "response {}: {}", self.index + 1, self.message)
    }
}

impl std::error::Error for ItemError {}

/// How a folder is loaded as a scorer.
#[derive(Clone, Debug)]
pub struct ScorerOptions {
    pub aggregate: Aggregate,
    /// λ of `mean_minus_std`.
    pub uncertainty_coef: f64,
    /// The heads' raw outputs, without the stored normalisation.
    pub raw: bool,
    /// Overrides the template stored with each model.
    pub template: Option<String>,
    /// Sequences per scoring forward.
    pub batch_size: usize,
    /// How the models' matrices are kept ([`model::WeightDtype`]).
    pub dtype: WeightDtype,
}

impl Default for ScorerOptions {
    fn default() -> Self {
        Self {
            aggregate: Aggregate::default(),
            uncertainty_coef: 1.0,
            raw: false,
            template: None,
            batch_size: 32,
            dtype: WeightDtype::Auto,
        }
    }
}

/// A rule, or one or more reward models.
pub enum Scorer {
    Rule(CompiledRule),
    Models {
        members: Vec<RewardModel>,
        options: ScorerOptions,
    },
}

impl Scorer {
    /// A reward-model folder or an ensemble folder (its members; the monitor is not a member).
    pub fn load(dir: &Path, options: ScorerOptions, device: &Device) -> Result<Self> {
        let dirs = match Manifest::read(dir)? {
            Some(m) => m.members.iter().map(|d| dir.join(d)).collect(),
            None => vec![dir.to_path_buf()],
        };
        let members = dirs
            .iter()
            .map(|d| RewardModel::load(d, options.template.as_deref(), options.dtype, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Scorer::Models { members, options })
    }

    /// Reward models whose folder stores no normalisation (their raw outputs are used).
    pub fn unnormalized(&self) -> Vec<&Path> {
        match self {
            Scorer::Rule(_) => Vec::new(),
            Scorer::Models { members, .. } => members
                .iter()
                .filter(|m| m.normalization.is_none())
                .map(|m| m.dir.as_path())
                .collect(),
        }
    }

    /// Members of an ensemble (1 for a model, 0 for a rule).
    pub fn members(&self) -> usize {
        match self {
            Scorer::Rule(_) => 0,
            Scorer::Models { members, .. } => members.len(),
        }
    }

    /// A rule that checks the prompt's reference answer.
    pub fn needs_answer(&self) -> bool {
        matches!(self, Scorer::Rule(r) if r.rule().needs_answer())
    }

    /// The template of the (first) reward model; None for a rule.
    pub fn template(&self) -> Option<&PromptTemplate> {
        match self {
            Scorer::Rule(_) => None,
            Scorer::Models { members, .. } => members.first().map(|m| &m.template),
        }
    }

    /// Scores `items`, in order.
    pub fn score(&self, items: &[Item]) -> Result<Scores> {
        self.score_with(items, None)
    }

    /// Scores `items`, in order, their prompts rendered with `template` by every model instead
    /// of each model's own (`reward serve`: a client that rendered its prompts sends them as
    /// they are, `{prompt}`).
    pub fn score_with(&self, items: &[Item], template: Option<&PromptTemplate>) -> Result<Scores> {
        match self {
            Scorer::Rule(rule) => {
                let rewards = items
                    .iter()
                    .enumerate()
                    .map(|(i, it)| {
                        rule.score(it.response, it.answer)
                            .map_err(|message| anyhow::Error::new(ItemError { index: i, message }))
                    })
                    .collect::<Result<Vec<f32>>>()?;
                Ok(Scores {
                    rewards,
                    ..Scores::default()
                })
            }
            Scorer::Models { members, options } => {
                let mut out = Scores::default();
                for m in members {
                    let (r, cuts) = m.score(items, template, options.batch_size, options.raw)?;
                    out.cut_prompts += cuts.prompts;
                    out.cut_responses += cuts.responses;
                    out.members.push(r);
                }
                out.rewards = if members.len() == 1 {
                    out.members[0].clone()
                } else {
                    out.per_response(|v| options.aggregate.apply(v, options.uncertainty_coef))
                };
                Ok(out)
            }
        }
    }
}
