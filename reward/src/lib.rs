//! Stage 2 of InstructGPT (Ouyang et al. 2022, §3.5): a reward model trained on labelers'
//! rankings of K responses per prompt. Each ranked group is one batch element: its K responses go
//! through the model once, and the loss is the mean over its C(K,2) pairs of
//! −log σ(r_better − r_worse − margin) (or a listwise Plackett–Luce loss). After training the
//! rewards are shifted so that the SFT demonstrations score 0 on average.
//!
//! `run` reads top to bottom: load data → split by prompt → load the base model's trunk and add a
//! scalar head → tokenize → for each optimizer step: one padded forward over the batch's groups,
//! loss, backward, clip, AdamW → validate (pairwise accuracy with a Wilson interval, by K, gap and
//! labeler, the human ceiling) → checkpoint → normalise and save. The plumbing is in `trainer`,
//! the loss math in [`loss`].

#![forbid(unsafe_code)]

pub mod agreement;
pub mod best_of_n;
pub mod data;
pub mod ensemble;
pub mod eval;
pub mod likelihood;
pub mod loss;
pub mod score;
pub mod scorer;
pub mod serve;

pub use scorer::{Aggregate, Item, Scorer, ScorerOptions, Scores};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use data::{DataSection, Group, Ties};
use datasets::tokenize::{SftExample, lm_batch};
use datasets::{Demonstration, RankedGroup, Source, load_demonstrations};
use eval::Validation;
use loss::{ListTerm, PairTerm};
use model::ops::{select_positions, token_logprobs, token_tensor};
use model::{
    CausalLm, Heads, ModelMeta, PromptTemplate, RewardNormalization, TokenBatch, Tokenizer,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, json};
use std::path::{Path, PathBuf};
use trainer::run::{Evaluation, Saving};
use trainer::{Best, Check, Fingerprint, Run, TrainSection};

trainer::stage_config! {
    /// The `reward` config (configs/reward.toml documents every key).
    pub struct RewardConfig {
        pub model: ModelSection,
        pub data: DataSection,
        #[serde(default)]
        pub loss: LossSection,
        pub train: TrainSection,
        #[serde(default)]
        pub ensemble: EnsembleSection,
        /// LoRA adapters on the base's trunk (frozen) instead of training all its weights; the
        /// scalar head trains with them and is saved in the adapter (PEFT's
        /// `modules_to_save = ["score"]`).
        #[serde(default)]
        pub lora: Option<model::LoraConfig>,
    }
}

/// `[ensemble]`: several reward models instead of one (see [`ensemble`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnsembleSection {
    /// Reward models trained; 1 is a single model. Member i has seed `seed + i` (its head and
    /// data order); all share the validation split.
    #[serde(default = "one_usize")]
    pub members: usize,
    /// Each member trains on a bootstrap resample of the training prompts (with all their
    /// groups), for diversity beyond the seed.
    #[serde(default = "yes")]
    pub bootstrap: bool,
    /// Also train a held-out monitor model on the validation prompts (which no member trains
    /// on), for `ppo`'s over-optimisation monitor; stored as `monitor/` of the ensemble.
    #[serde(default = "yes")]
    pub monitor: bool,
    /// Set by the ensemble run in each member's own config.toml; leave unset.
    #[serde(default)]
    pub member: Option<usize>,
    /// Set by the ensemble run in the monitor's config.toml; leave unset.
    #[serde(default)]
    pub is_monitor: bool,
}

fn one_usize() -> usize {
    1
}
fn yes() -> bool {
    true
}

impl Default for EnsembleSection {
    fn default() -> Self {
        Self {
            members: 1,
            bootstrap: true,
            monitor: true,
            member: None,
            is_monitor: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// An SFT (or any HF causal-LM) folder, whose trunk gets a new scalar head; or an HF
    /// `*ForSequenceClassification` folder to continue training.
    pub base: PathBuf,
    /// A tokenizer.json to use instead of the base's.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// α of the likelihood term ([`likelihood`]): the reward is the head's output plus α times
    /// the base SFT model's mean log-probability per response token; 0 is off.
    #[serde(default)]
    pub likelihood_coef: f64,
}

/// Pairwise (InstructGPT) or listwise (Plackett–Luce).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    #[default]
    Pairwise,
    Listwise,
}

/// The margin subtracted inside the sigmoid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Margin {
    #[default]
    None,
    /// The rank difference of the pair (1 for adjacent ranks).
    RankGap,
    /// The data's `margin` field (comparisons); 0 where absent.
    Data,
}

/// How responses go through the model: once per group (K forwards), or once per pair (2 per
/// pair, as pairwise trainers do; for measuring what grouping saves).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Forward {
    #[default]
    Groups,
    Pairs,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossSection {
    /// pairwise or listwise.
    #[serde(default)]
    pub kind: LossKind,
    /// none, rank_gap or data.
    #[serde(default)]
    pub margin: Margin,
    /// Multiplies `margin` (rank gaps are integers; 0.5 · gap is a gentler margin).
    #[serde(default = "one")]
    pub margin_scale: f64,
    /// Reward-centering coefficient on mean(r²); 0 off, 0.01 as TRL suggests.
    #[serde(default)]
    pub centering: f64,
    /// groups or pairs.
    #[serde(default)]
    pub forward: Forward,
}

fn one() -> f64 {
    1.0
}

impl Default for LossSection {
    fn default() -> Self {
        Self {
            kind: LossKind::Pairwise,
            margin: Margin::None,
            margin_scale: 1.0,
            centering: 0.0,
            forward: Forward::Groups,
        }
    }
}

impl trainer::StageConfig for RewardConfig {
    fn check(&self, c: &mut Check) {
        c.lora(self.lora.as_ref(), "model.base", true);
        c.within("loss.centering", self.loss.centering, 0.0, 10.0);
        c.within("loss.margin_scale", self.loss.margin_scale, 0.0, 100.0);
        c.within(
            "model.likelihood_coef",
            self.model.likelihood_coef,
            0.0,
            100.0,
        );
        if self.loss.kind == LossKind::Listwise && self.loss.margin != Margin::None {
            c.that(
                "loss.margin",
                format!("{:?}", self.loss.margin),
                false,
                "none with loss.kind = \"listwise\" (Plackett–Luce has no margin)",
            );
        }
        c.that(
            "ensemble.members",
            self.ensemble.members,
            (1..=64).contains(&self.ensemble.members),
            "1 to 64",
        );
        self.data.check(c);
        self.train.check(c);
    }
}

/// What a run trained on ranked groups ends with, in `reward`'s and `dpo`'s `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub struct PreferenceSummary {
    pub steps: usize,
    pub train_loss: f64,
    pub train_groups: usize,
    pub validation_groups: usize,
    pub dropped: data::Dropped,
    pub validation: Option<Validation>,
}

impl PreferenceSummary {
    /// The summary of `run` after training on `train` (validated on `valid`).
    pub fn of(
        run: &Run,
        train_loss: f64,
        (train, valid): (&[Group], &[Group]),
        dropped: data::Dropped,
        validation: Option<Validation>,
    ) -> Self {
        Self {
            steps: run.state.step,
            train_loss,
            train_groups: train.len(),
            validation_groups: valid.len(),
            dropped,
            validation,
        }
    }
}

/// What a run ends with (`summary.json`).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    #[serde(flatten)]
    pub run: PreferenceSummary,
    pub normalization: RewardNormalization,
    pub final_dir: PathBuf,
    /// An ensemble's members and what they say together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ensemble: Option<ensemble::EnsembleSummary>,
}

/// The rows of one forward and the loss terms over them.
pub struct BatchPlan {
    pub rows: Vec<Vec<u32>>,
    pub pairs: Vec<PairTerm>,
    pub lists: Vec<ListTerm>,
    /// The consecutive rows of each group (they share the group's prompt).
    pub groups: Vec<std::ops::Range<usize>>,
    /// The likelihood term of each row ([`Group::prior`]); empty without one.
    pub priors: Vec<f32>,
}

/// Plans one forward over `groups`: each response once (K per group), or two rows per pair.
pub fn plan(groups: &[&Group], loss: &LossSection, ties: Ties) -> BatchPlan {
    let mut p = BatchPlan {
        rows: Vec::new(),
        pairs: Vec::new(),
        lists: Vec::new(),
        groups: Vec::new(),
        priors: Vec::new(),
    };
    let with_prior = groups.iter().all(|g| g.prior.len() == g.k()) && !groups.is_empty();
    let prior = |g: &Group, i: usize| if with_prior { g.prior[i] } else { 0.0 };
    for (gi, g) in groups.iter().enumerate() {
        let base = p.rows.len();
        if loss.forward == Forward::Groups {
            p.rows.extend(g.sequences.iter().cloned());
            p.priors.extend((0..g.k()).map(|i| prior(g, i)));
        }
        match loss.kind {
            LossKind::Pairwise => {
                for i in 0..g.k() {
                    for j in i + 1..g.k() {
                        let tie = g.ranks[i] == g.ranks[j];
                        if tie && ties == Ties::Drop {
                            continue;
                        }
                        let (a, b) = if g.ranks[i] <= g.ranks[j] {
                            (i, j)
                        } else {
                            (j, i)
                        };
                        let margin = if tie {
                            0.0
                        } else {
                            match loss.margin {
                                Margin::None => 0.0,
                                Margin::RankGap => g.ranks[i].abs_diff(g.ranks[j]) as f64,
                                Margin::Data => g.data_margin.unwrap_or(0.0),
                            }
                        } * loss.margin_scale;
                        let (ra, rb) = if loss.forward == Forward::Groups {
                            (base + a, base + b)
                        } else {
                            p.rows.push(g.sequences[a].clone());
                            p.rows.push(g.sequences[b].clone());
                            p.priors.extend([prior(g, a), prior(g, b)]);
                            (p.rows.len() - 2, p.rows.len() - 1)
                        };
                        p.pairs.push(PairTerm {
                            a: ra,
                            b: rb,
                            margin: margin as f32,
                            tie,
                            group: gi,
                        });
                    }
                }
            }
            LossKind::Listwise => {
                if loss.forward == Forward::Pairs {
                    p.rows.extend(g.sequences.iter().cloned());
                    p.priors.extend((0..g.k()).map(|i| prior(g, i)));
                }
                let worst = *g.ranks.iter().max().expect("K ≥ 2");
                for i in 0..g.k() {
                    if g.ranks[i] == worst {
                        continue;
                    }
                    p.lists.push(ListTerm {
                        item: base + i,
                        candidates: (0..g.k())
                            .filter(|&j| g.ranks[j] >= g.ranks[i])
                            .map(|j| base + j)
                            .collect(),
                        group: gi,
                    });
                }
            }
        }
        p.groups.push(base..p.rows.len());
    }
    if !with_prior {
        p.priors.clear();
    }
    p
}

/// `rewards` plus each row's likelihood term, when the plan has them. rewards: [rows] → [rows]
pub fn with_priors(rewards: Tensor<1>, plan: &BatchPlan) -> Tensor<1> {
    if plan.priors.is_empty() {
        return rewards;
    }
    let n = plan.priors.len();
    let device = rewards.device();
    rewards + Tensor::<1>::from_data(TensorData::new(plan.priors.clone(), [n]), &device)
}

/// The loss of a planned batch. rewards: [rows]; → [1].
pub fn batch_loss(
    rewards: burn::tensor::Tensor<1>,
    plan: &BatchPlan,
    loss: &LossSection,
) -> burn::tensor::Tensor<1> {
    let main = match loss.kind {
        LossKind::Pairwise => loss::pairwise_loss(rewards.clone(), &plan.pairs),
        LossKind::Listwise => loss::listwise_loss(rewards.clone(), &plan.lists),
    };
    if loss.centering > 0.0 {
        main + loss::centering_loss(rewards, loss.centering)
    } else {
        main
    }
}

/// Σ log π(response and EOS | prompt) of each row: one right-padded forward, the LM head at the
/// response positions only. rows: [R] sequences, each template(prompt) ++ response ++ EOS whose
/// first `prompt_lens[r]` tokens are the prompt → [R]
pub fn sequence_logprobs(
    model: &CausalLm,
    rows: &[Vec<u32>],
    prompt_lens: &[usize],
    pad: u32,
) -> Result<Tensor<1>> {
    let examples: Vec<SftExample> = rows
        .iter()
        .zip(prompt_lens)
        .map(|(r, &p)| SftExample {
            tokens: r.clone(),
            is_target: (0..r.len()).map(|i| i >= p.max(1)).collect(),
        })
        .collect();
    let batch = lm_batch(&examples, pad);
    let device = model.device();
    let targets = batch.target_tokens();
    let n = targets.len();
    let hidden = select_positions(model.forward(&batch.inputs), &batch.target_mask);
    let lp = token_logprobs(model.logits(hidden)?, token_tensor(&targets, 1, n, &device));
    // Each row's targets are consecutive in `lp`: a [R, n] 0/1 matrix sums them per row.
    let r = rows.len();
    let mut segments = vec![0f32; r * n];
    let mut at = 0;
    for (row, e) in examples.iter().enumerate() {
        let count = e.is_target[1..].iter().filter(|&&t| t).count();
        for k in at..at + count {
            segments[row * n + k] = 1.0;
        }
        at += count;
    }
    let segments = Tensor::<2>::from_data(TensorData::new(segments, [r, n]), &device);
    Ok(segments.matmul(lp.reshape([n, 1])).reshape([r]))
}

/// Scalar rewards of `rows` at their last real token. rows: [R] sequences → [R].
pub fn rewards_of(
    model: &CausalLm,
    rows: &[Vec<u32>],
    pad: u32,
) -> Result<burn::tensor::Tensor<1>> {
    let batch = TokenBatch::right_padded(rows, pad);
    Ok(model.scalar_last(&batch, model.forward(&batch))?)
}

/// Scalar rewards of a planned batch's rows, as [`rewards_of`], with each group's shared prefix
/// (its prompt, and any response tokens all its rows begin with) run once: the prefixes of all
/// groups go through the model in one left-padded forward, their keys and values are repeated
/// for the group's rows, and only the rows' remaining tokens run on top. With K responses per
/// prompt this saves K − 1 of the K prompt passes, forward and backward. → [rows]
pub fn rewards_of_plan(
    model: &CausalLm,
    plan: &BatchPlan,
    pad: u32,
) -> Result<burn::tensor::Tensor<1>> {
    let mut prefixes = Vec::with_capacity(plan.groups.len());
    let mut suffixes = Vec::with_capacity(plan.rows.len());
    let mut counts = Vec::with_capacity(plan.groups.len());
    for g in &plan.groups {
        let rows = &plan.rows[g.clone()];
        // The longest common prefix, leaving every row at least its last token (whose hidden
        // state is the reward).
        let shortest = rows.iter().map(Vec::len).min().unwrap_or(1);
        let mut n = 0;
        while n + 1 < shortest && rows.iter().all(|r| r[n] == rows[0][n]) {
            n += 1;
        }
        if n == 0 {
            // Nothing shared: the plain forward.
            return rewards_of(model, &plan.rows, pad);
        }
        prefixes.push(rows[0][..n].to_vec());
        suffixes.extend(rows.iter().map(|r| r[n..].to_vec()));
        counts.push(rows.len());
    }
    let layers = model.config().num_layers;
    let prefix = TokenBatch::left_padded(&prefixes, pad);
    let mut cache = model::KvCache::new(layers, prefix.batch);
    let _ = model.forward_cached(&prefix, &mut cache);
    let mut cache = cache.repeat_rows(&counts);
    let suffix = TokenBatch::right_padded(&suffixes, pad);
    let hidden = model.forward_cached(&suffix, &mut cache);
    Ok(model.scalar_last(&suffix, hidden)?)
}

/// Raw rewards of many sequences, in order, in batches of similar length (no autodiff).
pub fn score_sequences(
    model: &CausalLm,
    seqs: &[Vec<u32>],
    batch_size: usize,
    pad: u32,
) -> Result<Vec<f32>> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].len());
    let mut out = vec![0f32; seqs.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let rows: Vec<Vec<u32>> = chunk.iter().map(|&i| seqs[i].clone()).collect();
        let r = model::ops::to_f32_vec(rewards_of(model, &rows, pad)?);
        for (&i, v) in chunk.iter().zip(r) {
            out[i] = v;
        }
    }
    Ok(out)
}

/// Validation metrics of `model` on `groups` (None without groups), scored `batch` sequences at
/// a time.
pub fn validate(
    model: &CausalLm,
    groups: &[Group],
    tok: &Tokenizer,
    batch: usize,
) -> Result<Option<Validation>> {
    let flat: Vec<Vec<u32>> = groups.iter().flat_map(|g| g.sequences.clone()).collect();
    if flat.is_empty() {
        return Ok(None);
    }
    let scores = score_sequences(model, &flat, batch, tok.pad_id)?;
    let mut at = 0;
    let per_group: Vec<Vec<f32>> = groups
        .iter()
        .map(|g| {
            let mut r = scores[at..at + g.k()].to_vec();
            at += g.k();
            for (x, p) in r.iter_mut().zip(&g.prior) {
                *x += p;
            }
            r
        })
        .collect();
    Ok(Some(eval::validate(groups, &per_group)))
}

impl Evaluation for Validation {
    /// Pairwise accuracy picks `best/` (higher is better).
    fn metric(&self) -> f64 {
        self.pairwise.accuracy
    }

    /// Adds the headline validation numbers to a metrics line.
    fn record(&self, f: &mut Map<String, serde_json::Value>) {
        f.insert("eval_accuracy".into(), json!(self.pairwise.accuracy));
        f.insert("eval_accuracy_low".into(), json!(self.pairwise.low));
        f.insert("eval_accuracy_high".into(), json!(self.pairwise.high));
        f.insert("eval_loss".into(), json!(self.loss));
        f.insert("eval_mean_margin".into(), json!(self.mean_margin));
        if let Some(c) = &self.human_ceiling {
            f.insert("eval_human_ceiling".into(), json!(c.accuracy));
        }
    }
}

/// Loads the model to train: from `resume`, or the base's trunk with a new scalar head (or the
/// base's own head when it is a reward model already). Dropout off.
fn load_model(
    cfg: &RewardConfig,
    resume: Option<&Path>,
    device: &Device,
) -> Result<(CausalLm, Tokenizer)> {
    let tokenizer = cfg.model.tokenizer.as_deref();
    if let Some(lora) = &cfg.lora {
        // The base as given, frozen, with a new head and new adapters, or (resuming) the
        // checkpoint's adapters and head.
        let (m, tok) = load_model(
            &RewardConfig {
                lora: None,
                ..cfg.clone()
            },
            None,
            device,
        )?;
        let m = m.adapt(lora, cfg.seed, resume)?.keep_frozen(cfg.dtype);
        return Ok((m, tok));
    }
    let (m, tok) = match resume {
        Some(dir) => {
            let (m, t, _) = model::checkpoint::load_with_tokenizer(
                dir,
                Some(Heads::SCALAR),
                tokenizer,
                device,
            )?;
            (m, t)
        }
        None => {
            let base = &cfg.model.base;
            let declared = model::checkpoint::declared_heads(base)
                .with_context(|| format!("model.base = {}", base.display()))?;
            if declared.scalar {
                let (m, t, _) = model::checkpoint::load_with_tokenizer(
                    base,
                    Some(Heads::SCALAR),
                    tokenizer,
                    device,
                )?;
                (m, t)
            } else {
                let (m, t, _) = model::checkpoint::load_with_tokenizer(
                    base,
                    Some(Heads::NONE),
                    tokenizer,
                    device,
                )?;
                (m.with_scalar_head(cfg.seed), t)
            }
        }
    };
    Ok((m.with_dropout(0.0), tok))
}

/// Writes the reward-model folder `dir` atomically: the model's files and, with a likelihood
/// term, its model and manifest ([`likelihood::Likelihood::write_into`]) go into a temporary
/// sibling folder that is renamed into place; a failed write leaves no temporary folder.
fn save_reward_model(
    m: &CausalLm,
    tok: &Tokenizer,
    meta: &ModelMeta,
    likelihood: Option<&likelihood::Likelihood>,
    dir: &Path,
) -> Result<()> {
    use model::checkpoint::{replace_dir, sibling, write_model_files};
    let tmp = sibling(dir, "tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let written = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        write_model_files(m, Some(tok), meta, &tmp)?;
        if let Some(l) = likelihood {
            l.write_into(&tmp)?;
        }
        Ok(replace_dir(&tmp, dir)?)
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

/// The likelihood term of the reward ([`likelihood`]) when `model.likelihood_coef` > 0: the base
/// itself when it is a causal LM, else the likelihood model stored with the base reward model.
/// Loaded for inference only (no gradients reach it).
fn load_likelihood(cfg: &RewardConfig, tok: &Tokenizer) -> Result<Option<likelihood::Likelihood>> {
    let coef = cfg.model.likelihood_coef;
    if coef == 0.0 {
        return Ok(None);
    }
    let device = model::parse_device(&cfg.device)?;
    let dtype = cfg.dtype;
    let base = &cfg.model.base;
    let declared = model::checkpoint::declared_heads(base)
        .with_context(|| format!("model.base = {}", base.display()))?;
    let dir = if declared.scalar {
        match likelihood::read_manifest(base)? {
            Some(m) => base.join(m.model),
            None => bail!(
                "model.likelihood_coef = {coef}: model.base = {} is a reward model with no likelihood model stored ({} missing); set model.likelihood_coef = 0, or start from the SFT folder",
                base.display(),
                base.join(likelihood::FILE).display()
            ),
        }
    } else {
        base.clone()
    };
    likelihood::Likelihood::load(&dir, coef, tok, dtype, &device).map(Some)
}

/// Reads the preference data, merges labelers by majority when asked, keeps the first
/// `max_groups`, and splits by prompt (with `data.split_seed`, else `seed`). Also `dpo`'s reader.
pub fn read_data(d: &DataSection, seed: u64) -> Result<(Vec<data::Read>, Vec<data::Read>)> {
    let mut groups = data::read_groups(d)?;
    if d.aggregate == data::Aggregate::Majority {
        let plain: Vec<RankedGroup> = groups.into_iter().map(|(g, _)| g).collect();
        let (pairs, tied, split) = datasets::preference::pairs::majority(&plain);
        println!(
            "data: majority of labelers: {} pairs ({tied} dropped as ties, {split} without a majority)",
            pairs.len()
        );
        groups = pairs
            .into_iter()
            .map(|c| {
                let margin = c.margin;
                let (mut g, _) = data::comparison_group(c);
                g.labeler_id = "majority".into();
                (g, margin)
            })
            .collect();
    }
    if d.max_groups > 0 {
        groups.truncate(d.max_groups);
    }
    if groups.is_empty() {
        bail!("{}: no preference groups found", d.path.display());
    }
    data::split(
        groups,
        &d.path,
        d.validation_fraction,
        d.split_seed.unwrap_or(seed),
    )
}

/// InstructGPT's normalisation: the offset that makes the reference responses (the SFT
/// demonstrations, else the training responses) score 0 on average.
fn normalization(
    model: &CausalLm,
    cfg: &RewardConfig,
    demos: Option<&(PathBuf, Vec<Demonstration>)>,
    train: &[Group],
    tok: &Tokenizer,
    template: &PromptTemplate,
    likelihood: Option<&likelihood::Likelihood>,
) -> Result<RewardNormalization> {
    let (seqs, priors, reference) = match demos {
        Some((p, demos)) => {
            let (mut seqs, mut lens) = (Vec::new(), Vec::new());
            for d in demos {
                if let Some(e) = data::fit(
                    tok,
                    template,
                    &d.prompt,
                    &d.response,
                    cfg.data.max_length,
                    data::Long::Drop,
                )? {
                    seqs.push(e.tokens);
                    lens.push(e.prompt_len);
                }
            }
            let priors = match likelihood {
                Some(l) => l.terms(&seqs, &lens, cfg.train.eval_batch_size, tok.pad_id)?,
                None => vec![0.0; seqs.len()],
            };
            let n = seqs.len();
            (
                seqs,
                priors,
                format!("sft demonstrations {} ({n})", p.display()),
            )
        }
        None => {
            // Each distinct training sequence once, with its likelihood term.
            let mut rows: Vec<(Vec<u32>, f32)> = train
                .iter()
                .flat_map(|g| {
                    (0..g.k()).map(|i| {
                        (
                            g.sequences[i].clone(),
                            g.prior.get(i).copied().unwrap_or(0.0),
                        )
                    })
                })
                .collect();
            rows.sort_by(|a, b| a.0.cmp(&b.0));
            rows.dedup_by(|a, b| a.0 == b.0);
            let n = rows.len();
            let (seqs, priors) = rows.into_iter().unzip();
            (seqs, priors, format!("training responses ({n})"))
        }
    };
    if seqs.is_empty() {
        bail!("{reference}: no sequence fits data.max_length to normalise the rewards on");
    }
    let mut raw = score_sequences(model, &seqs, cfg.train.eval_batch_size, tok.pad_id)?;
    for (r, p) in raw.iter_mut().zip(&priors) {
        *r += p;
    }
    let n = raw.len() as f64;
    let offset = raw.iter().map(|&r| r as f64).sum::<f64>() / n;
    let var = raw
        .iter()
        .map(|&r| (r as f64 - offset).powi(2))
        .sum::<f64>()
        / n;
    Ok(RewardNormalization {
        offset,
        mean: 0.0,
        std: var.sqrt(),
        reference,
    })
}

/// Trains a reward model (or, with `ensemble.members > 1`, an ensemble: [`ensemble::run`]) with
/// the config and its TOML text as used.
pub fn run(cfg: &RewardConfig, config_used: &str, resume: Option<&Path>) -> Result<Summary> {
    let e = &cfg.ensemble;
    if e.member.is_none() && !e.is_monitor && e.members > 1 {
        return ensemble::run(cfg, config_used, resume);
    }
    if let Some(m) = scorer::Manifest::read(&cfg.model.base)? {
        bail!(
            "model.base = {} is an ensemble of {} members: set ensemble.members = {} to continue each of them, or set model.base to one member's folder",
            cfg.model.base.display(),
            m.members.len(),
            m.members.len()
        );
    }
    run_one(cfg, config_used, resume)
}

/// Trains one reward model: a single one, an ensemble member, or an ensemble's monitor.
fn run_one(cfg: &RewardConfig, config_used: &str, resume: Option<&Path>) -> Result<Summary> {
    trainer::state::check_checkpoint(resume, "reward")?;
    let device = model::parse_device(&cfg.device)?.autodiff();
    println!(
        "matrix products: {}",
        model::set_matmul_precision(cfg.matmul)
    );
    let t = &cfg.train;
    let template = model::checkpoint::resolve_template(
        cfg.data.template.as_deref(),
        resume.or(Some(cfg.model.base.as_path())),
    )?;
    let meta = ModelMeta {
        stage: Some("reward".into()),
        prompt_template: Some(template.as_str().to_string()),
        reward_normalization: None,
        chat_template: None,
    };
    let (mut train_raw, mut valid_raw) = read_data(&cfg.data, cfg.seed)?;
    if cfg.ensemble.is_monitor {
        // The monitor trains on the prompts no member trains on, and is checked on the others.
        std::mem::swap(&mut train_raw, &mut valid_raw);
    } else if let Some(i) = cfg.ensemble.member
        && cfg.ensemble.bootstrap
    {
        train_raw = ensemble::bootstrap(train_raw, cfg.seed, i);
    }
    // Read now, so that a bad file stops the run before training rather than after.
    let demos = match cfg.data.demonstrations.as_deref() {
        Some(p) if !p.as_os_str().is_empty() => {
            Some((p.to_path_buf(), load_demonstrations(&Source::new(p))?))
        }
        _ => None,
    };
    let (mut model, tok) = load_model(cfg, resume, &device)?;
    let (mut train, mut valid, dropped) =
        data::tokenize_split((&train_raw, &valid_raw), &tok, &template, &cfg.data)?;
    let likelihood = load_likelihood(cfg, &tok)?;
    if let Some(l) = &likelihood {
        for g in train.iter_mut().chain(valid.iter_mut()) {
            g.prior = l.terms(&g.sequences, &g.prompt_lens, t.eval_batch_size, tok.pad_id)?;
        }
        println!(
            "likelihood term: {} x the mean log-probability per token under {}",
            l.coef,
            l.dir.display()
        );
    }

    let per_step = t.examples_per_step();
    let mut fingerprint = Fingerprint::default();
    for g in &train {
        for s in &g.sequences {
            fingerprint.tokens(s);
        }
        fingerprint.tokens(&g.ranks);
    }
    let data_id = (train.len(), fingerprint.hex());
    let saving = Saving::new(
        &tok,
        &meta,
        "responses_per_s",
        Best::highest("eval_accuracy"),
    );
    let (mut run, mut optim, mut order) =
        Run::for_training(cfg.setup(config_used, resume), t, data_id, saving)?;
    let mut last_eval = None;
    let mut last_loss = f64::NAN;

    run.baseline(|| validate(&model.valid(), &valid, &tok, t.eval_batch_size))?;
    while !run.done() {
        run.begin_step();
        // Nothing else of a run draws from the device's generator than dropout (LoRA's).
        trainer::seed_step(&device, cfg.seed, run.state.step);
        let idx = order.take(run.state.examples_seen, per_step);
        let mut accumulator = GradientsAccumulator::new();
        let (mut step_loss, mut responses, mut correct, mut judged) = (0.0, 0, 0, 0);
        for micro in idx.chunks(t.batch_size) {
            // All responses of the micro-batch's groups in one padded forward.
            let groups: Vec<&Group> = micro.iter().map(|&i| &train[i]).collect();
            let plan = plan(&groups, &cfg.loss, cfg.data.ties);
            let rewards = with_priors(rewards_of_plan(&model, &plan, tok.pad_id)?, &plan);
            // Every micro-batch weighs the same in the step.
            let loss =
                batch_loss(rewards.clone(), &plan, &cfg.loss).div_scalar(t.grad_accum as f64);
            step_loss += loss.clone().into_scalar::<f32>() as f64;
            let r = model::ops::to_f32_vec(rewards.detach());
            for p in plan.pairs.iter().filter(|p| !p.tie) {
                correct += (r[p.a] > r[p.b]) as usize;
                judged += 1;
            }
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            accumulator.accumulate(&model, grads);
            responses += plan.rows.len();
        }
        let mut fields;
        let grads = accumulator.grads();
        (model, fields) = run.optimizer_step(&mut optim, (model, grads), step_loss, responses)?;
        last_loss = step_loss;
        if judged > 0 {
            fields.insert("accuracy".into(), json!(correct as f64 / judged as f64));
        }
        let evaluated = run.after_step(&model, &optim, fields, |frozen| {
            validate(frozen, &valid, &tok, t.eval_batch_size)
        })?;
        last_eval = evaluated.or(last_eval);
    }
    // Normalise as InstructGPT, and store the shift with the final and the best model.
    let save = |m: &CausalLm, dir: &Path| -> Result<RewardNormalization> {
        let norm = normalization(
            m,
            cfg,
            demos.as_ref(),
            &train,
            &tok,
            &template,
            likelihood.as_ref(),
        )?;
        let meta = ModelMeta {
            reward_normalization: Some(norm.clone()),
            ..meta.clone()
        };
        save_reward_model(m, &tok, &meta, likelihood.as_ref(), dir)?;
        Ok(norm)
    };
    let trained = model.valid();
    let final_dir = cfg.out.join("final");
    let norm = save(&trained, &final_dir)?;
    let best = cfg.out.join("best");
    if best.exists() {
        let (best_model, _, _) = model::checkpoint::load_with_tokenizer(
            &best,
            Some(Heads::SCALAR),
            None,
            &trained.device(),
        )?;
        save(&best_model, &best)?;
    }
    println!(
        "normalised: offset {:.4} (mean raw reward of the {}), std {:.4}",
        norm.offset, norm.reference, norm.std
    );
    let summary = Summary {
        run: PreferenceSummary::of(&run, last_loss, (&train, &valid), dropped, last_eval),
        normalization: norm,
        final_dir,
        ensemble: None,
    };
    run.finish(&summary)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(ranks: Vec<u32>) -> Group {
        Group {
            prompt_id: "p".into(),
            labeler_id: String::new(),
            origin: "line 1".into(),
            response_ids: (1..=ranks.len()).map(|i| i.to_string()).collect(),
            sequences: (0..ranks.len())
                .map(|i| vec![i as u32 + 2; i + 1])
                .collect(),
            prompt_lens: vec![1; ranks.len()],
            ranks,
            data_margin: Some(0.5),
            prior: Vec::new(),
        }
    }

    #[test]
    fn grouped_forward_runs_each_response_once_and_pairs_twice_per_pair() {
        let (a, b) = (group(vec![1, 2, 3, 4]), group(vec![2, 1]));
        let loss = LossSection::default();
        let p = plan(&[&a, &b], &loss, Ties::Drop);
        // K forwards per group: 4 + 2 rows, for 6 + 1 pairs.
        assert_eq!(p.rows.len(), 6);
        assert_eq!(p.pairs.len(), 7);
        // The better response first: in group b, response 2 (row 5) beats response 1 (row 4).
        assert_eq!((p.pairs[6].a, p.pairs[6].b), (5, 4));
        let flat = plan(
            &[&a, &b],
            &LossSection {
                forward: Forward::Pairs,
                ..LossSection::default()
            },
            Ties::Drop,
        );
        assert_eq!(flat.rows.len(), 2 * 7);
        assert_eq!(flat.rows[2 * 6], b.sequences[1]);
    }

    #[test]
    fn ties_are_dropped_or_kept_as_tie_terms_and_margins_follow_the_option() {
        let g = group(vec![1, 1, 2]);
        let keep = plan(&[&g], &LossSection::default(), Ties::Keep);
        assert_eq!(keep.pairs.iter().filter(|p| p.tie).count(), 1);
        assert_eq!(keep.pairs.len(), 3);
        let drop = plan(&[&g], &LossSection::default(), Ties::Drop);
        assert_eq!(drop.pairs.len(), 2);
        assert!(drop.pairs.iter().all(|p| !p.tie));
        let gap = plan(
            &[&group(vec![1, 3, 2])],
            &LossSection {
                margin: Margin::RankGap,
                margin_scale: 0.5,
                ..LossSection::default()
            },
            Ties::Drop,
        );
        let margins: Vec<f32> = gap.pairs.iter().map(|p| p.margin).collect();
        assert_eq!(margins, vec![1.0, 0.5, 0.5]);
        let data = plan(
            &[&group(vec![1, 2])],
            &LossSection {
                margin: Margin::Data,
                ..LossSection::default()
            },
            Ties::Drop,
        );
        assert_eq!(data.pairs[0].margin, 0.5);
        // Listwise: K − 1 terms for a strict ranking, each over the items ranked no better.
        let list = plan(
            &[&group(vec![2, 1, 3])],
            &LossSection {
                kind: LossKind::Listwise,
                ..LossSection::default()
            },
            Ties::Drop,
        );
        assert_eq!(list.lists.len(), 2);
        assert_eq!(list.lists[0].item, 0);
        assert_eq!(list.lists[0].candidates, vec![0, 2]);
        assert_eq!(list.lists[1].candidates, vec![0, 1, 2]);
    }
}

#[cfg(test)]
mod shared_prefix_tests {
    use super::*;
    use burn::module::Module;

    /// The shared-prefix forward gives the rewards of the plain forward, and the same gradients.
    #[test]
    fn rewards_of_plan_equal_the_plain_forward_with_gradients() {
        let device = model::parse_device("cpu").unwrap().autodiff();
        let cfg = model::ModelConfig::preset("tiny", 50).unwrap();
        let model = CausalLm::new(&cfg, true, 3, &device).unwrap();
        // Two groups: prompts of 4 and 2 tokens; responses of different lengths, two of them
        // starting alike (a longer common prefix in group 0).
        let rows = vec![
            vec![1, 2, 3, 4, 10, 11, 12],
            vec![1, 2, 3, 4, 10, 13],
            vec![1, 2, 3, 4, 10, 14, 15, 16],
            vec![5, 6, 20],
            vec![5, 6, 21, 22],
        ];
        let plan = BatchPlan {
            rows: rows.clone(),
            pairs: Vec::new(),
            lists: Vec::new(),
            groups: vec![0..3, 3..5],
            priors: Vec::new(),
        };
        let coef = [1.0f32, -0.5, 2.0, 0.7, -1.3];
        let weights = burn::tensor::Tensor::<1>::from_data(
            burn::tensor::TensorData::new(coef.to_vec(), [5]),
            &device,
        );
        let shared = rewards_of_plan(&model, &plan, 0).unwrap();
        let plain = rewards_of(&model, &rows, 0).unwrap();
        let (a, b) = (
            model::ops::to_f32_vec(shared.clone()),
            model::ops::to_f32_vec(plain.clone()),
        );
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
        let g1 = GradientsParams::from_grads((shared * weights.clone()).sum().backward(), &model);
        let g2 = GradientsParams::from_grads((plain * weights).sum().backward(), &model);
        let (n1, n2) = (
            model::ops::grad_norm(&model, &g1),
            model::ops::grad_norm(&model, &g2),
        );
        assert!(n1 > 1e-3 && (n1 - n2).abs() < 1e-4 * n2, "{n1} vs {n2}");
        // Every parameter's gradient (the embedding rows of the prompt tokens get theirs from
        // every response of the group).
        let emb = |g: &GradientsParams| {
            let mut v = Vec::new();
            struct Grab<'a>(&'a GradientsParams, &'a mut Vec<f32>);
            impl burn::module::ModuleVisitor for Grab<'_> {
                fn visit_float<const D: usize>(
                    &mut self,
                    p: &burn::module::Param<burn::tensor::Tensor<D>>,
                ) {
                    if let Some(t) = self.0.get::<D>(p.id) {
                        self.1.extend(model::ops::to_f32_vec(t));
                    }
                }
            }
            model.visit(&mut Grab(g, &mut v));
            v
        };
        let (e1, e2) = (emb(&g1), emb(&g2));
        assert_eq!(e1.len(), e2.len());
        for (x, y) in e1.iter().zip(&e2) {
            assert!((x - y).abs() < 1e-4, "gradient {x} vs {y}");
        }
    }
}
