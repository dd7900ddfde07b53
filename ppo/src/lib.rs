//! Stage 3 of InstructGPT (Ouyang et al. 2022, §3.5): the SFT policy optimised with PPO against a
//! reward model, with a per-token KL penalty to the SFT (reference) policy. The details follow
//! "The N+ implementation details of RLHF with PPO" (Huang et al. 2024), cleanrl's `ppo.py`,
//! OpenRLHF and verl; the loss math is in [`core`].
//!
//! [`run`] reads top to bottom in the order of one iteration:
//! 1. rollout: a batch of prompts (template from the policy's folder), left padded, sampled on
//!    the model crate's KV-cache batch path; each response ends at its first EOS;
//! 2. score: the reward model (normalised as stored with it, optionally clipped) or a rule
//!    reward; a response without EOS gets `missing_eos_penalty` instead;
//! 3. forward passes over the whole rollout, without autodiff: the policy's log-probabilities
//!    (the "old" ones of the ratio, recomputed by a forward pass as TRL and OpenRLHF do, under the
//!    same temperature-scaled distribution the loss uses), the reference policy's, the critic's
//!    values;
//! 4. per-token rewards −β·KL_t plus the score on the last token (β fixed or adaptive), or the KL
//!    as a loss term instead;
//! 5. GAE (γ, λ) and advantage whitening;
//! 6. PPO epochs over shuffled minibatches: clipped policy loss, clipped value loss, entropy
//!    bonus, optional PPO-ptx; token-mean aggregation; global-norm clipping; an epoch stops early
//!    when the approximate KL passes a limit;
//! 7. update β, log, write samples, checkpoint.

pub mod core;
pub mod monitor;
pub mod rollout;

use crate::core::{KlController, KlEstimator};
use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use model::ops::{mask_tensor, to_f32_vec, token_tensor};
use model::{CausalLm, Heads, ModelMeta, SamplingConfig, TokenBatch, Tokenizer};
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use reward::scorer::mean_std;
use reward::{Scorer, ScorerOptions};
use rollout::{Prompt, Rollout};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};
use std::time::Instant;
use trainer::schedule::{Decay, Schedule};
use trainer::state::{SavedModel, load_optimizer};
use trainer::{Best, Cadence, Check, EpochOrder, Fingerprint, Run};

trainer::stage_config! {
    /// The `ppo` config (configs/ppo.toml documents every key).
    pub struct PpoConfig {
        pub model: ModelSection,
        pub data: DataSection,
        #[serde(default)]
        pub reward: RewardSection,
        pub rollout: RolloutSection,
        #[serde(default)]
        pub kl: KlSection,
        #[serde(default)]
        pub ppo: PpoSection,
        pub train: TrainSection,
        #[serde(default)]
        pub monitor: MonitorSection,
    }
}

/// The over-optimisation monitor (see [`monitor`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorSection {
    /// Track the held-out signal, warn, and keep `best/`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A reward model trained on prompts the optimised one never saw; default: the `monitor/`
    /// stored with an ensemble (`reward` with `ensemble.monitor = true`).
    #[serde(default)]
    pub reward_model: Option<PathBuf>,
    /// Iterations per trend window (the warning compares the last two windows; `best/` uses the
    /// last one).
    #[serde(default = "d_window")]
    pub window: usize,
    /// `best/` only from checkpoints whose KL from the SFT model (nats per response, averaged over
    /// the last `window` iterations) is at most this; 0 = no limit.
    #[serde(default = "d_max_kl")]
    pub max_kl: f64,
    /// For studying a run, never for training it: a gold rule (as `reward.rule` takes it) whose
    /// mean over each iteration's responses is logged as `gold_mean`. Nothing optimises it and
    /// `best/` does not look at it; with it, metrics.jsonl shows when the gold peaked.
    #[serde(default)]
    pub gold: Option<String>,
}

impl Default for MonitorSection {
    fn default() -> Self {
        Self {
            enabled: true,
            reward_model: None,
            window: d_window(),
            max_kl: d_max_kl(),
            gold: None,
        }
    }
}

fn d_window() -> usize {
    10
}

fn d_max_kl() -> f64 {
    6.0
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The SFT policy (an HF causal-LM folder).
    pub policy: PathBuf,
    /// The KL reference (frozen); default: `policy`. A policy that continues from an earlier
    /// PPO run (the data flywheel's next round) keeps the SFT model as its reference.
    #[serde(default)]
    pub reference: Option<PathBuf>,
    /// The reward model (an HF *ForSequenceClassification folder); empty with a rule reward.
    #[serde(default)]
    pub reward_model: Option<PathBuf>,
    /// The critic's start: "reward_model" (default: its scalar head becomes the value head),
    /// "policy" (the policy's trunk with a fresh head), or a reward-model folder.
    #[serde(default)]
    pub critic: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Prompts: .jsonl / .csv / .parquet with `prompt` (and `answer` for the exact-answer rule).
    pub prompts: PathBuf,
    /// Our field → the file's column, e.g. { prompt = "question" }.
    #[serde(default)]
    pub columns: std::collections::HashMap<String, String>,
    /// How a prompt is shown; default: the template stored with the policy.
    #[serde(default)]
    pub template: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSection {
    /// A rule reward instead of the reward model: "exact_answer" (against the prompts' `answer`;
    /// GSM8K: the number after ####), "final_answer" (the same, stated after a marker only) or
    /// "regex:<pattern>".
    #[serde(default)]
    pub rule: Option<String>,
    /// Score of a response that ended without EOS (hit max_new_tokens); −1 is usual.
    #[serde(default = "d_missing_eos")]
    pub missing_eos_penalty: f64,
    /// false: score responses without EOS as they are.
    #[serde(default = "yes")]
    pub penalize_missing_eos: bool,
    /// Clip scores to ±this; 0 disables (10 is usual).
    #[serde(default = "d_clip_score")]
    pub clip_score: f64,
    /// Whiten the per-token rewards over the batch (off in most recipes).
    #[serde(default)]
    pub whiten_rewards: bool,
    /// An ensemble's reward: "mean", "mean_minus_std" (mean − uncertainty_coef · std over the
    /// members) or "min".
    #[serde(default)]
    pub ensemble: reward::Aggregate,
    /// λ of "mean_minus_std".
    #[serde(default = "d_uncertainty")]
    pub uncertainty_coef: f64,
}

impl Default for RewardSection {
    fn default() -> Self {
        Self {
            rule: None,
            missing_eos_penalty: d_missing_eos(),
            penalize_missing_eos: true,
            clip_score: d_clip_score(),
            whiten_rewards: false,
            ensemble: reward::Aggregate::default(),
            uncertainty_coef: d_uncertainty(),
        }
    }
}

fn d_uncertainty() -> f64 {
    1.0
}

fn d_missing_eos() -> f64 {
    -1.0
}
fn d_clip_score() -> f64 {
    10.0
}
fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSection {
    /// Prompts (episodes) per iteration.
    pub batch_size: usize,
    /// Longest response in tokens.
    pub max_new_tokens: usize,
    /// Sampling temperature (also applied to the log-probabilities of the loss); 1.0 usual.
    #[serde(default = "d_one_f")]
    pub temperature: f64,
    /// 0 disables.
    #[serde(default)]
    pub top_k: usize,
    /// 1.0 disables.
    #[serde(default = "d_one_f")]
    pub top_p: f64,
}

fn d_one_f() -> f64 {
    1.0
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KlSection {
    /// β: the initial (adaptive) or fixed KL coefficient; 0.05 in TRL's defaults.
    #[serde(default = "d_kl_coef")]
    pub coef: f64,
    /// Adapt β to reach `target` (Ziegler et al. 2019).
    #[serde(default)]
    pub adaptive: bool,
    /// Target KL per response for the adaptive controller; 6 in Ziegler et al.
    #[serde(default = "d_kl_target")]
    pub target: f64,
    /// Horizon (episodes) of the adaptive controller; 10000 in Ziegler et al.
    #[serde(default = "d_kl_horizon")]
    pub horizon: f64,
    /// k1 (log p − log p_ref, usual in the reward) or k3.
    #[serde(default)]
    pub estimator: KlEstimator,
    /// true: −β·KL in the per-token rewards (InstructGPT); false: β·KL as a loss term (GRPO, verl).
    #[serde(default = "yes")]
    pub in_reward: bool,
}

impl Default for KlSection {
    fn default() -> Self {
        Self {
            coef: d_kl_coef(),
            adaptive: false,
            target: d_kl_target(),
            horizon: d_kl_horizon(),
            estimator: KlEstimator::K1,
            in_reward: true,
        }
    }
}

fn d_kl_coef() -> f64 {
    0.05
}
fn d_kl_target() -> f64 {
    6.0
}
fn d_kl_horizon() -> f64 {
    10000.0
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoSection {
    /// Passes over each rollout; 4 usual.
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    /// Episodes per minibatch.
    #[serde(default = "d_minibatch")]
    pub minibatch_size: usize,
    /// ε of the clipped policy loss; 0.2.
    #[serde(default = "d_clip")]
    pub clip_eps: f64,
    /// Clip range of the value loss; 0.2.
    #[serde(default = "d_clip")]
    pub value_clip: f64,
    /// Weight of the value loss; 0.1 as TRL.
    #[serde(default = "d_vf")]
    pub vf_coef: f64,
    /// Entropy bonus; 0 usual.
    #[serde(default)]
    pub entropy_coef: f64,
    /// Discount; 1 in RLHF.
    #[serde(default = "d_one_f")]
    pub gamma: f64,
    /// GAE λ; 0.95.
    #[serde(default = "d_lam")]
    pub lam: f64,
    /// Whiten advantages over the batch; true usual.
    #[serde(default = "yes")]
    pub whiten_advantages: bool,
    /// Stop an iteration's epochs when the minibatch approximate KL passes this; 0 disables.
    #[serde(default)]
    pub max_approx_kl: f64,
    /// PPO-ptx: γ_ptx × the LM loss on demonstrations added to the policy loss; 0 disables.
    #[serde(default)]
    pub ptx_coef: f64,
    /// Demonstrations (`prompt`, `response`) for PPO-ptx.
    #[serde(default)]
    pub ptx_data: Option<PathBuf>,
}

impl Default for PpoSection {
    fn default() -> Self {
        Self {
            epochs: d_epochs(),
            minibatch_size: d_minibatch(),
            clip_eps: d_clip(),
            value_clip: d_clip(),
            vf_coef: d_vf(),
            entropy_coef: 0.0,
            gamma: 1.0,
            lam: d_lam(),
            whiten_advantages: true,
            max_approx_kl: 0.0,
            ptx_coef: 0.0,
            ptx_data: None,
        }
    }
}

fn d_epochs() -> usize {
    4
}
fn d_minibatch() -> usize {
    8
}
fn d_clip() -> f64 {
    0.2
}
fn d_vf() -> f64 {
    0.1
}
fn d_lam() -> f64 {
    0.95
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// PPO iterations (rollout + update).
    pub iterations: usize,
    /// Policy learning rate (1e-6 to 1e-5 for real models).
    pub lr: f64,
    /// Critic learning rate; default: the policy's.
    #[serde(default)]
    pub critic_lr: Option<f64>,
    #[serde(default)]
    pub warmup_steps: usize,
    /// constant (usual for PPO), linear or cosine over the iterations.
    #[serde(default = "d_decay")]
    pub decay: Decay,
    #[serde(default = "d_one_f")]
    pub min_lr_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "trainer::optim::d_beta1")]
    pub beta1: f64,
    #[serde(default = "trainer::optim::d_beta2")]
    pub beta2: f64,
    #[serde(default = "trainer::optim::d_eps")]
    pub eps: f64,
    /// Global gradient-norm clip per model; 1.0 usual; 0 disables.
    #[serde(default = "d_one_f")]
    pub max_grad_norm: f64,
    /// Write a metrics line every N iterations.
    #[serde(default = "trainer::optim::d_one")]
    pub log_every: usize,
    /// Write `samples_per_log` samples to samples.jsonl every N iterations (0: never).
    #[serde(default = "trainer::optim::d_one")]
    pub sample_every: usize,
    #[serde(default = "d_samples")]
    pub samples_per_log: usize,
    /// Checkpoint every N iterations (0: only at the end).
    #[serde(default)]
    pub save_every: usize,
    #[serde(default = "trainer::optim::d_keep")]
    pub keep_last: usize,
}

fn d_decay() -> Decay {
    Decay::Constant
}
fn d_samples() -> usize {
    4
}

impl trainer::StageConfig for PpoConfig {
    fn check(&self, c: &mut Check) {
        c.at_least_one("rollout.batch_size", self.rollout.batch_size);
        c.at_least_one("rollout.max_new_tokens", self.rollout.max_new_tokens);
        c.within("rollout.temperature", self.rollout.temperature, 0.0, 100.0);
        c.that(
            "rollout.top_p",
            self.rollout.top_p,
            self.rollout.top_p > 0.0 && self.rollout.top_p <= 1.0,
            "in (0, 1]",
        );
        c.within("kl.coef", self.kl.coef, 0.0, 1e3);
        c.positive("kl.target", self.kl.target);
        c.positive("kl.horizon", self.kl.horizon);
        c.at_least_one("ppo.epochs", self.ppo.epochs);
        c.at_least_one("ppo.minibatch_size", self.ppo.minibatch_size);
        c.within("ppo.clip_eps", self.ppo.clip_eps, 1e-6, 10.0);
        c.within("ppo.value_clip", self.ppo.value_clip, 1e-6, 1e6);
        c.within("ppo.vf_coef", self.ppo.vf_coef, 0.0, 1e3);
        c.within("ppo.entropy_coef", self.ppo.entropy_coef, 0.0, 10.0);
        c.within("ppo.gamma", self.ppo.gamma, 0.0, 1.0);
        c.within("ppo.lam", self.ppo.lam, 0.0, 1.0);
        c.within("ppo.max_approx_kl", self.ppo.max_approx_kl, 0.0, 1e3);
        c.within("ppo.ptx_coef", self.ppo.ptx_coef, 0.0, 1e3);
        c.at_least_one("train.iterations", self.train.iterations);
        c.positive("train.lr", self.train.lr);
        if let Some(lr) = self.train.critic_lr {
            c.positive("train.critic_lr", lr);
        }
        c.within("train.min_lr_ratio", self.train.min_lr_ratio, 0.0, 1.0);
        c.within("train.max_grad_norm", self.train.max_grad_norm, 0.0, 1e6);
        c.within("reward.clip_score", self.reward.clip_score, 0.0, 1e9);
        c.within(
            "reward.uncertainty_coef",
            self.reward.uncertainty_coef,
            0.0,
            1e3,
        );
        c.at_least("monitor.window", self.monitor.window, 2);
        c.within("monitor.max_kl", self.monitor.max_kl, 0.0, 1e9);
        if self.model.reward_model.is_none() && self.reward.rule.is_none() {
            c.that(
                "model.reward_model",
                "(unset)",
                false,
                "a reward-model folder, or set reward.rule",
            );
        }
    }
}

/// What a run ends with (`summary.json`).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub iterations: usize,
    /// Mean score of the first and the last iteration's rollouts.
    pub first_score_mean: f64,
    pub last_score_mean: f64,
    pub last_kl: f64,
    pub final_dir: PathBuf,
    /// Iterations (1-based) at which the monitor warned of over-optimisation.
    pub overoptimization_warnings: Vec<usize>,
    /// The iteration `best/` holds (by the held-out signal), when one was kept.
    pub best_iteration: Option<usize>,
}

/// The KL controller of the config.
fn kl_controller(k: &KlSection) -> KlController {
    if k.adaptive {
        KlController::Adaptive(core::AdaptiveKlController::new(k.coef, k.target, k.horizon))
    } else {
        KlController::Fixed(k.coef)
    }
}

/// The models of a run: the trained policy and critic (on the autodiff device), the frozen
/// reference policy and the scorer (without autodiff).
struct Models {
    policy: CausalLm,
    critic: CausalLm,
    reference: CausalLm,
    tokenizer: Tokenizer,
    scorer: Scorer,
    /// The held-out reward model of the monitor, if any.
    monitor: Option<Scorer>,
    policy_meta: ModelMeta,
}

fn load_models(cfg: &PpoConfig, resume: Option<&Path>, device: &Device) -> Result<Models> {
    let frozen = device.clone(); // the inner (non-autodiff) device
    let train = device.clone().autodiff();
    let policy_dir = resume.unwrap_or(&cfg.model.policy);
    let load_policy = |d: &Device| {
        model::checkpoint::load_with_tokenizer(policy_dir, Some(Heads::LM), None, d)
            .with_context(|| format!("model.policy = {}", policy_dir.display()))
    };
    let (policy, tokenizer, policy_meta) = load_policy(&train)?;
    let (reference, reference_tok, _) = match &cfg.model.reference {
        Some(r) => model::checkpoint::load_with_tokenizer(r, Some(Heads::LM), None, &frozen)
            .with_context(|| format!("model.reference = {}", r.display()))?,
        None => model::checkpoint::load_with_tokenizer(
            &cfg.model.policy,
            Some(Heads::LM),
            None,
            &frozen,
        )
        .with_context(|| format!("model.policy = {}", cfg.model.policy.display()))?,
    };
    if !tokenizer.same_ids(&reference_tok) {
        bail!(
            "model.reference's tokenizer differs from the policy's ({} vs {} tokens); the KL is per token, so the reference must be the model the policy was trained from",
            reference_tok.vocab_size(),
            tokenizer.vocab_size()
        );
    }
    let scorer = match (&cfg.reward.rule, &cfg.model.reward_model) {
        (Some(rule), _) => Scorer::Rule(
            datasets::gold::parse_rule(rule)
                .and_then(|r| r.compile())
                .map_err(|e| anyhow::anyhow!("reward.rule = {rule:?}: {e}"))?,
        ),
        (None, Some(dir)) => {
            let options = ScorerOptions {
                aggregate: cfg.reward.ensemble,
                uncertainty_coef: cfg.reward.uncertainty_coef,
                ..ScorerOptions::default()
            };
            let scorer = Scorer::load(dir, options, &frozen)
                .with_context(|| format!("model.reward_model = {}", dir.display()))?;
            for d in scorer.unnormalized() {
                println!(
                    "note: {} stores no reward normalisation; its raw scores are used",
                    d.display()
                );
            }
            scorer
        }
        (None, None) => bail!("set model.reward_model or reward.rule"),
    };
    let monitor_dir = match (&cfg.monitor.reward_model, &cfg.model.reward_model) {
        _ if !cfg.monitor.enabled || cfg.reward.rule.is_some() => None,
        (Some(d), _) => Some(d.clone()),
        (None, Some(rm)) => reward::scorer::monitor_dir(rm)?,
        (None, None) => None,
    };
    let monitor = match monitor_dir {
        Some(d) => Some(
            Scorer::load(&d, ScorerOptions::default(), &frozen)
                .with_context(|| format!("the monitor's reward model {}", d.display()))?,
        ),
        None => None,
    };
    let critic_choice = cfg.model.critic.as_deref().unwrap_or("reward_model");
    let (critic, critic_tok) = if let Some(dir) = resume {
        let d = dir.join("critic");
        let (m, t, _) =
            model::checkpoint::load_with_tokenizer(&d, Some(Heads::SCALAR), None, &train)?;
        (m, t)
    } else if critic_choice == "policy" {
        let (m, t, _) = model::checkpoint::load_with_tokenizer(
            &cfg.model.policy,
            Some(Heads::NONE),
            None,
            &train,
        )?;
        (m.with_scalar_head(cfg.seed), t)
    } else {
        let dir: PathBuf = if critic_choice == "reward_model" {
            // An ensemble's critic starts from its first member.
            reward::scorer::first_model_dir(&cfg.model.reward_model.clone().context(
                "model.critic = \"reward_model\" needs model.reward_model; with a rule reward set model.critic = \"policy\"",
            )?)?
        } else {
            PathBuf::from(critic_choice)
        };
        let (m, t, _) =
            model::checkpoint::load_with_tokenizer(&dir, Some(Heads::SCALAR), None, &train)
                .with_context(|| format!("the critic ({})", dir.display()))?;
        (m, t)
    };
    if !tokenizer.same_ids(&critic_tok) {
        bail!(
            "the critic's tokenizer differs from the policy's ({} vs {} tokens); the critic reads the policy's tokens, so start it from a reward model trained on the policy (or set model.critic = \"policy\")",
            critic_tok.vocab_size(),
            tokenizer.vocab_size()
        );
    }
    Ok(Models {
        policy: policy.with_dropout(0.0),
        critic: critic.with_dropout(0.0),
        reference: reference.with_dropout(0.0),
        tokenizer,
        scorer,
        monitor,
        policy_meta,
    })
}

/// Log-probabilities of each response token under `model` (temperature-scaled) and, with a
/// critic, the values before each response token. batch: the rollout rows; → [b, n] tensors.
fn response_logprobs(
    model: &CausalLm,
    batch: &TokenBatch,
    responses: Tensor<2, burn::tensor::Int>,
    prompt_len: usize,
    temperature: f64,
) -> Result<(Tensor<2>, Tensor<3>)> {
    let [b, n] = responses.dims();
    let hidden = model.forward(batch);
    let d = hidden.dims()[2];
    // Position p−1+t predicts response token t.
    let h = hidden.slice([0..b, prompt_len - 1..prompt_len - 1 + n, 0..d]);
    let logits = model.logits(h)?.div_scalar(temperature);
    let lp = model::ops::token_logprobs(logits.clone(), responses);
    Ok((lp, logits))
}

fn values_of(
    critic: &CausalLm,
    batch: &TokenBatch,
    prompt_len: usize,
    n: usize,
) -> Result<Tensor<2>> {
    let hidden = critic.forward(batch);
    let [b, _, d] = hidden.dims();
    let h = hidden.slice([0..b, prompt_len - 1..prompt_len - 1 + n, 0..d]);
    Ok(critic.scalar(h)?)
}

fn float_tensor(v: &[f32], b: usize, t: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v.to_vec(), [b, t]), device)
}

/// The seed of iteration `it`'s sampling and minibatch order: a function of (seed, iteration),
/// so that a resumed run draws exactly what the uninterrupted one would.
fn iteration_seed(seed: u64, it: usize, salt: u64) -> u64 {
    seed.wrapping_mul(0x9E3779B97F4A7C15)
        .wrapping_add((it as u64).wrapping_mul(1_000_003))
        .wrapping_add(salt)
}

/// Runs PPO with the config and its TOML text as used; `resume` continues from a checkpoint.
pub fn run(cfg: &PpoConfig, config_used: &str, resume: Option<&Path>) -> Result<Summary> {
    let base_device = model::parse_device(&cfg.device)?;
    println!(
        "matrix products: {}",
        model::set_matmul_precision(cfg.matmul)
    );
    let device = base_device.clone().autodiff();
    let t = &cfg.train;
    let ppo = &cfg.ppo;
    let template = model::checkpoint::resolve_template(
        cfg.data.template.as_deref(),
        Some(cfg.model.policy.as_path()),
    )?;
    let Models {
        mut policy,
        mut critic,
        reference,
        tokenizer: tok,
        scorer,
        monitor: heldout,
        policy_meta,
    } = load_models(cfg, resume, &base_device)?;
    let context = policy.config().max_position_embeddings;
    let gold = cfg
        .monitor
        .gold
        .as_ref()
        .map(|rule| {
            datasets::gold::parse_rule(rule)
                .and_then(|r| r.compile())
                .map(Scorer::Rule)
                .map_err(|e| anyhow::anyhow!("monitor.gold = {rule:?}: {e}"))
        })
        .transpose()?;
    let prompts = rollout::read_prompts(
        &cfg.data.prompts,
        &cfg.data.columns,
        &tok,
        &template,
        context.saturating_sub(cfg.rollout.max_new_tokens),
        scorer.needs_answer() || gold.as_ref().is_some_and(|g| g.needs_answer()),
    )?;
    let ptx = rollout::read_ptx(ppo, &tok, &template, context)?;
    let meta = ModelMeta {
        stage: Some("ppo".into()),
        prompt_template: Some(template.as_str().to_string()),
        reward_normalization: None,
    };
    let critic_meta = ModelMeta {
        stage: Some("ppo-critic".into()),
        ..policy_meta.clone()
    };

    // Derived values, computed once.
    let b = cfg.rollout.batch_size;
    let temperature = if cfg.rollout.temperature > 0.0 {
        cfg.rollout.temperature
    } else {
        1.0
    };
    let schedule = Schedule {
        lr: t.lr,
        warmup_steps: t.warmup_steps,
        total_steps: t.iterations,
        decay: t.decay,
        min_lr_ratio: t.min_lr_ratio,
    };
    let critic_lr_scale = t.critic_lr.map_or(1.0, |c| c / t.lr);
    let mut fingerprint = Fingerprint::default();
    for p in &prompts {
        fingerprint.tokens(&p.tokens);
    }
    let mut run = Run::start(
        cfg.setup(config_used, resume),
        schedule,
        Cadence {
            log_every: t.log_every,
            eval_every: 0,
            save_every: t.save_every,
            keep_last: t.keep_last,
        },
        Best::highest("heldout_score_mean"),
        fingerprint.hex(),
    )?;
    let adamw = || trainer::optim::adamw(t.beta1, t.beta2, t.eps, t.weight_decay);
    let (mut policy_optim, mut critic_optim): (ModuleOptimizer, ModuleOptimizer) = match resume {
        Some(dir) => (
            load_optimizer(dir, "policy", adamw())?,
            load_optimizer(dir, "critic", adamw())?,
        ),
        None => (adamw(), adamw()),
    };
    let mut kl_ctl = match resume {
        Some(_) => serde_json::from_value(run.state.stage["kl_controller"].clone())
            .context("the checkpoint's KL controller state")?,
        None => kl_controller(&cfg.kl),
    };
    if let Some(dir) = resume {
        println!(
            "resumed from {} at iteration {}",
            dir.display(),
            run.state.step
        );
    }
    let mut monitor = match resume {
        Some(_) => match run.state.stage.get("monitor") {
            Some(v) => {
                serde_json::from_value(v.clone()).context("the checkpoint's monitor state")?
            }
            None => monitor::Monitor::new(cfg.monitor.window),
        },
        None => monitor::Monitor::new(cfg.monitor.window),
    };
    // best/ by the held-out model's signal (not by the ensemble's disagreement, which is lowest
    // before any training).
    let keep_best = heldout.is_some();
    if cfg.monitor.enabled && !keep_best && scorer.members() > 0 {
        println!(
            "monitor: {}; no best/ is kept (train the reward model with ensemble.monitor = true, or set monitor.reward_model)",
            if scorer.members() > 1 {
                "no held-out reward model: warnings from the ensemble's disagreement only"
            } else {
                "no held-out reward model and a single reward model: no over-optimisation warnings"
            }
        );
    }
    let mut order = EpochOrder::new(prompts.len(), cfg.seed);
    let mut samples = rollout::Samples::open(&cfg.out, run.state.step)?;
    let (mut first_score, mut last_score, mut last_kl) = (f64::NAN, f64::NAN, f64::NAN);

    while !run.done() {
        run.begin_step();
        let it = run.state.step;
        let started = Instant::now();

        // 1. Rollout: sample responses on the KV-cache batch path.
        let batch_prompts: Vec<&Prompt> = order
            .take(run.state.examples_seen, b)
            .into_iter()
            .map(|i| &prompts[i])
            .collect();
        let sampling = SamplingConfig {
            max_new_tokens: cfg.rollout.max_new_tokens,
            temperature: cfg.rollout.temperature as f32,
            top_k: cfg.rollout.top_k,
            top_p: cfg.rollout.top_p as f32,
            seed: iteration_seed(cfg.seed, it, 1),
            eos_token_ids: vec![tok.eos_id],
            pad_token_id: tok.pad_id,
        };
        let policy_frozen = policy.valid();
        let prompt_tokens: Vec<Vec<u32>> = batch_prompts.iter().map(|p| p.tokens.clone()).collect();
        let generation = model::generate(&policy_frozen, &prompt_tokens, &sampling)?;
        let roll = Rollout::new(&prompt_tokens, &generation, &tok)?;
        let t_generate = started.elapsed().as_secs_f64();

        // 2–3. Score each response (a response without EOS gets the penalty), and the forward
        // passes over the whole rollout without autodiff: old log-probs, reference log-probs,
        // values. All four are independent of each other: they run side by side
        // (`model::device::join`), each returning its values on the host.
        let t0 = Instant::now();
        let (n, p) = (roll.n, roll.p);
        let resp_tokens = token_tensor(&roll.response_tokens, b, n, &base_device);
        let logprobs = |m: &CausalLm| -> Result<Vec<f32>> {
            let (lp, _) = response_logprobs(m, &roll.batch, resp_tokens.clone(), p, temperature)?;
            Ok(to_f32_vec(lp))
        };
        let critic_frozen = critic.valid();
        // The held-out monitor model (if any) scores the same responses after the optimised
        // reward.
        let items = rollout::items(&batch_prompts, &roll.texts);
        let score = || {
            let t = Instant::now();
            let scored = scorer.score(&items).and_then(|s| {
                let h = heldout.as_ref().map(|m| m.score(&items)).transpose()?;
                Ok((s, h))
            });
            (scored, t.elapsed().as_secs_f64())
        };
        let values = || -> Result<Vec<f32>> {
            Ok(to_f32_vec(values_of(&critic_frozen, &roll.batch, p, n)?))
        };
        let forwards = || {
            model::device::join(
                || logprobs(&policy_frozen),
                || model::device::join(|| logprobs(&reference), values),
            )
        };
        let ((scores, t_score), (old_lp, (ref_lp, old_values))) =
            model::device::join(score, forwards);
        let (scored, heldout_scored) = scores.map_err(|e| rollout::locate(e, &batch_prompts))?;
        let (old_lp, ref_lp, old_values) = (old_lp?, ref_lp?, old_values?);
        let t_forward = t0.elapsed().as_secs_f64();
        // A response without EOS gets the penalty; scores are clipped (the monitor's alike).
        let finish = |mut v: Vec<f32>| {
            for (s, &eos) in v.iter_mut().zip(&roll.has_eos) {
                if !eos && cfg.reward.penalize_missing_eos {
                    *s = cfg.reward.missing_eos_penalty as f32;
                }
                if cfg.reward.clip_score > 0.0 {
                    *s = s.clamp(-cfg.reward.clip_score as f32, cfg.reward.clip_score as f32);
                }
            }
            v
        };
        let scores = finish(scored.rewards.clone());
        let heldout_scores = heldout_scored.map(|h| finish(h.rewards));
        let gold_mean = match &gold {
            Some(g) => Some(
                mean_std(
                    &g.score(&items)
                        .map_err(|e| rollout::locate(e, &batch_prompts))?
                        .rewards,
                )
                .0,
            ),
            None => None,
        };

        // 4. Per-token rewards: −β·KL on every response token plus the score on the last one.
        let t0 = Instant::now();
        let mask = &roll.response_mask;
        let kl = core::kl_per_token(&old_lp, &ref_lp, mask, cfg.kl.estimator);
        let beta = kl_ctl.value();
        let reward_kl_coef = if cfg.kl.in_reward { beta } else { 0.0 };
        let mut rewards = core::per_token_rewards(&kl, &scores, mask, b, n, reward_kl_coef);
        if cfg.reward.whiten_rewards {
            rewards = core::whiten(&rewards, mask, false);
        }
        // 5. GAE and advantage whitening.
        let (advantages, returns) =
            core::gae(&rewards, &old_values, mask, b, n, ppo.gamma, ppo.lam);
        let advantages = if ppo.whiten_advantages {
            core::whiten(&advantages, mask, true)
        } else {
            advantages
        };

        // 6. PPO epochs over shuffled minibatches.
        let lr = run.schedule.at(it);
        let mut stats = rollout::UpdateStats::default();
        let mut rng = StdRng::seed_from_u64(iteration_seed(cfg.seed, it, 2));
        'epochs: for _epoch in 0..ppo.epochs {
            let mut rows: Vec<usize> = (0..b).collect();
            rows.shuffle(&mut rng);
            for mb in rows.chunks(ppo.minibatch_size) {
                let m = mb.len();
                // The minibatch without the columns that are padding in all its rows.
                let mbx = roll.minibatch(mb);
                let (mb_batch, mp, n) = (&mbx.batch, mbx.prompt_len, mbx.n);
                let pick = |v: &[f32]| mbx.pick(v);
                let mb_resp = token_tensor(&mbx.pick(&roll.response_tokens), m, n, &device);
                let minibatch_index = stats.minibatches;
                // The policy's and the critic's updates read the same minibatch and nothing of
                // each other: they run side by side (`model::device::join`; each still splits
                // its own operations across the pool), in separate autodiff graphs. Every
                // operation's result is the same whichever thread computes it.
                let policy_update = || -> Result<_> {
                    let mb_mask = mask_tensor(&mbx.pick(mask), m, n, &device);
                    // Policy: clipped surrogate (+ entropy bonus, KL loss, PPO-ptx).
                    let (new_lp, logits) =
                        response_logprobs(&policy, mb_batch, mb_resp, mp, temperature)?;
                    let pl = core::policy_loss(
                        new_lp.clone(),
                        float_tensor(&pick(&old_lp), m, n, &device),
                        float_tensor(&pick(&advantages), m, n, &device),
                        mb_mask.clone(),
                        ppo.clip_eps,
                    );
                    // The entropy joins the graph only when it is part of the loss.
                    let logits = if ppo.entropy_coef > 0.0 {
                        logits
                    } else {
                        logits.detach()
                    };
                    let entropy_t =
                        model::ops::masked_mean(core::entropy_from_logits(logits), mb_mask.clone());
                    let entropy = entropy_t.clone().into_scalar::<f32>();
                    let mut policy_total = pl.loss;
                    if ppo.entropy_coef > 0.0 {
                        policy_total = policy_total - entropy_t.mul_scalar(ppo.entropy_coef);
                    }
                    if !cfg.kl.in_reward {
                        let kl_term = core::kl_loss(
                            new_lp,
                            float_tensor(&pick(&ref_lp), m, n, &device),
                            mb_mask,
                            cfg.kl.estimator,
                        );
                        policy_total = policy_total + kl_term.mul_scalar(beta);
                    }
                    let mut ptx_loss = 0.0;
                    if ppo.ptx_coef > 0.0
                        && let Some(ptx) = &ptx
                    {
                        let lm = ptx.loss(&policy, it, minibatch_index, m, tok.pad_id, &device)?;
                        ptx_loss = lm.clone().into_scalar::<f32>() as f64;
                        policy_total = policy_total + lm.mul_scalar(ppo.ptx_coef);
                    }
                    let policy_loss_value = policy_total.clone().into_scalar::<f32>() as f64;
                    run.check_finite("policy loss", policy_loss_value)?;
                    let grads = GradientsParams::from_grads(policy_total.backward(), &policy);
                    let (next, norm) = trainer::optim::optimizer_step(
                        &mut policy_optim,
                        policy,
                        grads,
                        lr,
                        t.max_grad_norm,
                        it + 1,
                        run.last_good(),
                    )?;
                    let fractions = (pl.clip_fraction, pl.approx_kl);
                    Ok((next, norm, policy_loss_value, entropy, fractions, ptx_loss))
                };
                let critic_update = || -> Result<_> {
                    let mb_mask = mask_tensor(&mbx.pick(mask), m, n, &device);
                    // Critic: clipped value loss.
                    let values = values_of(&critic, mb_batch, mp, n)?;
                    let vl = core::value_loss(
                        values,
                        float_tensor(&pick(&old_values), m, n, &device),
                        float_tensor(&pick(&returns), m, n, &device),
                        mb_mask,
                        ppo.value_clip,
                    );
                    let value_total = vl.loss.mul_scalar(ppo.vf_coef);
                    let value_loss_value =
                        value_total.clone().into_scalar::<f32>() as f64 / ppo.vf_coef.max(1e-12);
                    run.check_finite("value loss", value_loss_value)?;
                    let grads = GradientsParams::from_grads(value_total.backward(), &critic);
                    let (next, norm) = trainer::optim::optimizer_step(
                        &mut critic_optim,
                        critic,
                        grads,
                        lr * critic_lr_scale,
                        t.max_grad_norm,
                        it + 1,
                        run.last_good(),
                    )?;
                    Ok((next, norm, value_loss_value, vl.clip_fraction))
                };
                let (p, c) = model::device::join(policy_update, critic_update);
                let (
                    next_policy,
                    policy_norm,
                    policy_loss_value,
                    entropy,
                    (clip_fraction, approx_kl),
                    ptx_loss,
                ) = p?;
                let (next_critic, critic_norm, value_loss_value, value_clip_fraction) = c?;
                policy = next_policy;
                critic = next_critic;
                stats.ptx_loss += ptx_loss;
                stats.add(
                    policy_loss_value,
                    value_loss_value,
                    entropy as f64,
                    clip_fraction as f64,
                    value_clip_fraction as f64,
                    approx_kl as f64,
                    (policy_norm as f64, critic_norm as f64),
                );
                if ppo.max_approx_kl > 0.0 && approx_kl as f64 > ppo.max_approx_kl {
                    stats.early_stopped = true;
                    break 'epochs;
                }
            }
        }
        let t_train = t0.elapsed().as_secs_f64();

        // 7. Update β from this rollout's KL per response, log, write samples, checkpoint.
        let kl_per_response: Vec<f32> = (0..b)
            .map(|r| kl[r * n..(r + 1) * n].iter().sum::<f32>())
            .collect();
        let (kl_mean, _) = mean_std(&kl_per_response);
        kl_ctl.update(kl_mean, b);
        let (score_mean, score_std) = mean_std(&scores);
        // The monitor: the held-out model's mean score, else (an ensemble) minus the members'
        // disagreement, against the optimised score's mean.
        let signal = match (&heldout_scores, scored.members.len()) {
            (Some(h), _) => Some(mean_std(h).0),
            (None, n) if n > 1 && cfg.monitor.enabled => Some(-mean_std(&scored.member_std()).0),
            _ => None,
        };
        let watch = signal.map(|h| (h, monitor.record(it, score_mean, h)));
        let was_within = monitor.kl.is_empty() || monitor.smoothed_kl() <= cfg.monitor.max_kl;
        monitor.record_kl(kl_mean);
        if watch.is_some()
            && cfg.monitor.max_kl > 0.0
            && was_within
            && monitor.smoothed_kl() > cfg.monitor.max_kl
        {
            println!(
                "monitor: at iteration {} the KL from the SFT model (mean of the last {} iterations) is {:.2} nats per response, past monitor.max_kl = {}: best/ is not replaced while it stays there",
                it + 1,
                cfg.monitor.window.min(monitor.kl.len()),
                monitor.smoothed_kl(),
                cfg.monitor.max_kl
            );
        }
        if let Some((_, v)) = &watch
            && v.warning
            && let (Some(p), Some(h)) = (v.proxy, v.heldout)
        {
            println!(
                "warning: over-optimisation at iteration {}: over the last {} iterations the optimised score rose by {:+.3} (s.e. {:.3}) while the {} changed by {:+.3} (s.e. {:.3}); best/ is no longer replaced (it keeps the best held-out signal saved before the first warning)",
                it + 1,
                cfg.monitor.window,
                p.change,
                p.se,
                if heldout_scores.is_some() {
                    "held-out reward model's score"
                } else {
                    "ensemble's agreement (−std)"
                },
                h.change,
                h.se
            );
        }
        if it == 0 || first_score.is_nan() {
            first_score = score_mean;
        }
        last_score = score_mean;
        last_kl = kl_mean;
        let lengths: Vec<f32> = roll.lengths.iter().map(|&l| l as f32).collect();
        let (len_mean, len_std) = mean_std(&lengths);
        let eos_rate = roll.has_eos.iter().filter(|&&e| e).count() as f64 / b as f64;
        run.end_step(b, b);
        let mut f = Map::new();
        let mut put = |k: &str, v: Value| {
            f.insert(k.into(), v);
        };
        put("score_mean", json!(score_mean));
        put("score_std", json!(score_std));
        if scored.members.len() > 1 {
            put(
                "proxy_mean",
                json!(mean_std(&finish(scored.member_mean())).0),
            );
            put("ensemble_std", json!(mean_std(&scored.member_std()).0));
        }
        if scored.cut_responses > 0 {
            put("cut_responses", json!(scored.cut_responses));
        }
        if let Some(g) = gold_mean {
            put("gold_mean", json!(g));
        }
        if let Some((signal, verdict)) = &watch {
            put("heldout_score_mean", json!(signal));
            put("overoptimization_warning", json!(verdict.warning));
        }
        put("kl_per_response", json!(kl_mean));
        put("kl_coef", json!(beta));
        put("entropy", json!(stats.mean(stats.entropy)));
        put("policy_loss", json!(stats.mean(stats.policy_loss)));
        put("value_loss", json!(stats.mean(stats.value_loss)));
        put("clip_fraction", json!(stats.mean(stats.clip_fraction)));
        put(
            "value_clip_fraction",
            json!(stats.mean(stats.value_clip_fraction)),
        );
        put("approx_kl", json!(stats.mean(stats.approx_kl)));
        if ptx.is_some() {
            put("ptx_loss", json!(stats.mean(stats.ptx_loss)));
        }
        put("policy_grad_norm", json!(stats.mean(stats.grad_norms.0)));
        put("critic_grad_norm", json!(stats.mean(stats.grad_norms.1)));
        put("minibatches", json!(stats.minibatches));
        put("early_stopped", json!(stats.early_stopped));
        put(
            "explained_variance",
            json!(core::explained_variance(&old_values, &returns, mask)),
        );
        put("response_length_mean", json!(len_mean));
        put("response_length_std", json!(len_std));
        put("eos_rate", json!(eos_rate));
        put("lr", json!(lr));
        put("time_generate_s", json!(t_generate));
        put("time_score_s", json!(t_score));
        put("time_forward_s", json!(t_forward));
        put("time_train_s", json!(t_train));
        run.log_step(f, false, "episodes_per_s")?;
        let done = it + 1;
        if t.sample_every > 0 && done.is_multiple_of(t.sample_every) {
            samples.write(
                done,
                &batch_prompts,
                &roll.texts,
                &scores,
                t.samples_per_log,
            )?;
        }
        if run.save_due() {
            let (pf, cf) = (policy.valid(), critic.valid());
            // After a warning, or past monitor.max_kl, the held-out model is suspect too (a policy
            // far from the SFT model can fool both: seen on the suite with β = 0), so best/ stays.
            if keep_best
                && monitor.trusts(cfg.monitor.max_kl)
                && run.improved(monitor.smoothed_heldout())
            {
                run.save_best(&pf, Some(&tok), &meta)?;
            }
            run.save(
                &[
                    SavedModel {
                        name: "policy",
                        model: &pf,
                        tokenizer: Some(&tok),
                        meta: &meta,
                    },
                    SavedModel {
                        name: "critic",
                        model: &cf,
                        tokenizer: Some(&tok),
                        meta: &critic_meta,
                    },
                ],
                &[("policy", &policy_optim), ("critic", &critic_optim)],
                json!({ "kl_controller": kl_ctl, "monitor": monitor }),
            )?;
        }
    }
    let final_dir = cfg.out.join("final");
    model::save_with_meta(&policy.valid(), Some(&tok), &meta, &final_dir)?;
    let summary = Summary {
        iterations: run.state.step,
        first_score_mean: first_score,
        last_score_mean: last_score,
        last_kl,
        final_dir,
        overoptimization_warnings: monitor.warnings.iter().map(|i| i + 1).collect(),
        best_iteration: run.state.best_step.filter(|_| keep_best),
    };
    if !summary.overoptimization_warnings.is_empty() {
        println!(
            "warning: the monitor saw over-optimisation at {} of {} iterations (first at {}); compare best/ (iteration {}) with final/",
            summary.overoptimization_warnings.len(),
            summary.iterations,
            summary.overoptimization_warnings[0],
            summary
                .best_iteration
                .map_or("none kept".to_string(), |b| b.to_string())
        );
    }
    run.finish(&summary)?;
    Ok(summary)
}
