//! The `ppo` config: one struct per section, each with its defaults in one `Default` impl
//! (section-level serde defaults); configs/ppo.toml documents every key. Keys a user must set
//! (`train.iterations`, `train.lr`, `rollout.batch_size`, `rollout.max_new_tokens`) default to 0,
//! which the range checks reject with the key's name.

use crate::core::{Estimator, KlEstimator, LossAgg};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use trainer::Check;
use trainer::optim::AdamW;
use trainer::schedule::{Decay, Schedule};

trainer::stage_config! {
    /// The `ppo` config (configs/ppo.toml documents every key).
    pub struct PpoConfig {
        pub model: ModelSection,
        pub data: DataSection,
        #[serde(default)]
        pub reward: RewardSection,
        pub rollout: RolloutSection,
        #[serde(default)]
        pub advantage: AdvantageSection,
        #[serde(default)]
        pub kl: KlSection,
        #[serde(default)]
        pub ppo: PpoSection,
        pub train: TrainSection,
        #[serde(default)]
        pub monitor: MonitorSection,
        /// LoRA adapters on the policy and the critic instead of training all their weights;
        /// the KL reference is then the policy with its adapters off (no second copy).
        #[serde(default)]
        pub lora: Option<model::LoraConfig>,
    }
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
    /// "policy" (the policy's trunk with a fresh head), or a reward-model folder. Unused (nothing
    /// loaded) with a critic-free `advantage.estimator`.
    #[serde(default)]
    pub critic: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Prompts: .jsonl / .csv / .parquet with `prompt` (and `answer` for rule rewards).
    pub prompts: PathBuf,
    /// Our field → the file's column, e.g. { prompt = "question" }.
    #[serde(default)]
    pub columns: HashMap<String, String>,
    /// How a prompt is shown; default: the template stored with the policy.
    #[serde(default)]
    pub template: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardSection {
    /// A rule reward instead of the reward model (`datasets::gold::parse_rule`'s names).
    pub rule: Option<String>,
    /// Score of a response that ended without EOS (hit max_new_tokens); −1 is usual.
    pub missing_eos_penalty: f64,
    /// false: score responses without EOS as they are.
    pub penalize_missing_eos: bool,
    /// Clip scores to ±this; 0 disables (10 is usual).
    pub clip_score: f64,
    /// Whiten the per-token rewards over the batch (off in most recipes).
    pub whiten_rewards: bool,
    /// An ensemble's reward: "mean", "mean_minus_std" (mean − uncertainty_coef · std over the
    /// members) or "min".
    pub ensemble: reward::Aggregate,
    /// λ of "mean_minus_std".
    pub uncertainty_coef: f64,
}

impl Default for RewardSection {
    fn default() -> Self {
        Self {
            rule: None,
            missing_eos_penalty: -1.0,
            penalize_missing_eos: true,
            clip_score: 10.0,
            whiten_rewards: false,
            ensemble: reward::Aggregate::default(),
            uncertainty_coef: 1.0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutSection {
    /// Prompts per iteration (must be set).
    pub batch_size: usize,
    /// Responses sampled per prompt (a group); ≥ 2 for the group baselines of grpo, dr_grpo and
    /// rloo. An iteration has batch_size × samples_per_prompt episodes.
    pub samples_per_prompt: usize,
    /// Longest response in tokens (must be set).
    pub max_new_tokens: usize,
    /// Sampling temperature (also applied to the log-probabilities of the loss); 1.0 usual.
    pub temperature: f64,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f64,
}

impl Default for RolloutSection {
    fn default() -> Self {
        Self {
            batch_size: 0,
            samples_per_prompt: 1,
            max_new_tokens: 0,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

/// How advantages are estimated (see [`crate::core::Estimator`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdvantageSection {
    /// "gae" (a critic; PPO), or critic-free: "grpo", "dr_grpo", "rloo", "reinforce_pp".
    pub estimator: Estimator,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KlSection {
    /// β: the initial (adaptive) or fixed KL coefficient; 0.05 in TRL's defaults.
    pub coef: f64,
    /// Adapt β to reach `target` (Ziegler et al. 2019).
    pub adaptive: bool,
    /// Target KL per response for the adaptive controller; 6 in Ziegler et al.
    pub target: f64,
    /// Horizon (episodes) of the adaptive controller; 10000 in Ziegler et al.
    pub horizon: f64,
    /// k1 (log p − log p_ref, usual in the reward) or k3.
    pub estimator: KlEstimator,
    /// true: −β·KL in the per-token rewards (InstructGPT); false: β·KL as a loss term (GRPO, verl).
    pub in_reward: bool,
}

impl Default for KlSection {
    fn default() -> Self {
        Self {
            coef: 0.05,
            adaptive: false,
            target: 6.0,
            horizon: 10000.0,
            estimator: KlEstimator::K1,
            in_reward: true,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoSection {
    /// Passes over each rollout; 4 usual.
    pub epochs: usize,
    /// Episodes per minibatch.
    pub minibatch_size: usize,
    /// ε of the clipped policy loss; 0.2.
    pub clip_eps: f64,
    /// The ratio's lower clip 1 − clip_eps_low; default clip_eps.
    pub clip_eps_low: Option<f64>,
    /// The ratio's upper clip 1 + clip_eps_high; default clip_eps (DAPO's clip-higher: 0.28).
    pub clip_eps_high: Option<f64>,
    /// How per-token losses become one: "token-mean", "seq-mean-token-sum",
    /// "seq-mean-token-mean" or "seq-mean-token-sum-norm" (Dr. GRPO).
    pub loss_agg: LossAgg,
    /// Clip range of the value loss; 0.2.
    pub value_clip: f64,
    /// Weight of the value loss; 0.1 as TRL.
    pub vf_coef: f64,
    /// Entropy bonus; 0 usual.
    pub entropy_coef: f64,
    /// Discount; 1 in RLHF.
    pub gamma: f64,
    /// GAE λ; 0.95.
    pub lam: f64,
    /// Whiten GAE's advantages over the batch; true usual (the critic-free estimators normalise
    /// as their definitions say).
    pub whiten_advantages: bool,
    /// Stop an iteration's epochs when the minibatch approximate KL passes this; 0 disables.
    pub max_approx_kl: f64,
    /// PPO-ptx: γ_ptx × the LM loss on demonstrations added to the policy loss; 0 disables.
    pub ptx_coef: f64,
    /// Demonstrations (`prompt`, `response`) for PPO-ptx.
    pub ptx_data: Option<PathBuf>,
}

impl Default for PpoSection {
    fn default() -> Self {
        Self {
            epochs: 4,
            minibatch_size: 8,
            clip_eps: 0.2,
            clip_eps_low: None,
            clip_eps_high: None,
            loss_agg: LossAgg::TokenMean,
            value_clip: 0.2,
            vf_coef: 0.1,
            entropy_coef: 0.0,
            gamma: 1.0,
            lam: 0.95,
            whiten_advantages: true,
            max_approx_kl: 0.0,
            ptx_coef: 0.0,
            ptx_data: None,
        }
    }
}

impl PpoSection {
    /// (ε_low, ε_high) of the ratio's clip.
    pub fn clip_range(&self) -> (f64, f64) {
        (
            self.clip_eps_low.unwrap_or(self.clip_eps),
            self.clip_eps_high.unwrap_or(self.clip_eps),
        )
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// PPO iterations (rollout + update); must be set.
    pub iterations: usize,
    /// Policy learning rate (1e-6 to 1e-5 for real models); must be set.
    pub lr: f64,
    /// Critic learning rate; default: the policy's.
    pub critic_lr: Option<f64>,
    pub warmup_steps: usize,
    /// constant (usual for PPO), linear or cosine over the iterations.
    pub decay: Decay,
    pub min_lr_ratio: f64,
    /// AdamW's keys, shared with every stage ([`AdamW`]).
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip per model; 1.0 usual; 0 disables.
    pub max_grad_norm: f64,
    /// Write a metrics line every N iterations.
    pub log_every: usize,
    /// Write `samples_per_log` samples to samples.jsonl every N iterations (0: never).
    pub sample_every: usize,
    pub samples_per_log: usize,
    /// Checkpoint every N iterations (0: only at the end).
    pub save_every: usize,
    pub keep_last: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        let a = AdamW::default();
        Self {
            iterations: 0,
            lr: 0.0,
            critic_lr: None,
            warmup_steps: 0,
            decay: Decay::Constant,
            min_lr_ratio: 1.0,
            weight_decay: a.weight_decay,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
            max_grad_norm: a.max_grad_norm,
            log_every: 1,
            sample_every: 1,
            samples_per_log: 4,
            save_every: 0,
            keep_last: trainer::optim::d_keep(),
        }
    }
}

impl TrainSection {
    /// The optimizer keys as trainer's shared [`AdamW`].
    pub fn adamw(&self) -> AdamW {
        AdamW {
            weight_decay: self.weight_decay,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            max_grad_norm: self.max_grad_norm,
        }
    }

    /// The learning-rate schedule over the iterations.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            lr: self.lr,
            warmup_steps: self.warmup_steps,
            total_steps: self.iterations,
            decay: self.decay,
            min_lr_ratio: self.min_lr_ratio,
        }
    }
}

/// The over-optimisation monitor (see [`crate::monitor`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorSection {
    /// Track the held-out signal, warn, and keep `best/`.
    pub enabled: bool,
    /// A reward model trained on prompts the optimised one never saw; default: the `monitor/`
    /// stored with an ensemble (`reward` with `ensemble.monitor = true`).
    pub reward_model: Option<PathBuf>,
    /// Iterations per trend window (the warning compares the last two windows; `best/` uses the
    /// last one).
    pub window: usize,
    /// `best/` only from checkpoints whose KL from the SFT model (nats per response, averaged over
    /// the last `window` iterations) is at most this; 0 = no limit.
    pub max_kl: f64,
    /// For studying a run, never for training it: a gold rule (as `reward.rule` takes it) whose
    /// mean over each iteration's responses is logged as `gold_mean`. Nothing optimises it and
    /// `best/` does not look at it; with it, metrics.jsonl shows when the gold peaked.
    pub gold: Option<String>,
}

impl Default for MonitorSection {
    fn default() -> Self {
        Self {
            enabled: true,
            reward_model: None,
            window: 10,
            max_kl: 6.0,
            gold: None,
        }
    }
}

impl PpoConfig {
    /// Whether anything reads the KL from the reference: the penalty (β > 0 or adaptive) or the
    /// monitor (its KL limit, and `kl_per_response` in the metrics). Otherwise (GRPO's usual β = 0
    /// with the monitor off) the reference is neither loaded nor run.
    pub fn measures_kl(&self) -> bool {
        self.kl.coef > 0.0 || self.kl.adaptive || self.monitor.enabled
    }
}

impl trainer::StageConfig for PpoConfig {
    fn check(&self, c: &mut Check) {
        let (r, p) = (&self.rollout, &self.ppo);
        c.lora(self.lora.as_ref(), "model.policy", true);
        c.at_least_one("rollout.batch_size", r.batch_size);
        c.at_least_one("rollout.samples_per_prompt", r.samples_per_prompt);
        if self.advantage.estimator.needs_group() {
            c.that(
                "rollout.samples_per_prompt",
                r.samples_per_prompt,
                r.samples_per_prompt >= 2,
                &format!(
                    "at least 2 with advantage.estimator = \"{}\" (its baseline is the other samples of the same prompt)",
                    self.advantage.estimator
                ),
            );
        }
        c.at_least_one("rollout.max_new_tokens", r.max_new_tokens);
        c.within("rollout.temperature", r.temperature, 0.0, 100.0);
        c.that(
            "rollout.top_p",
            r.top_p,
            r.top_p > 0.0 && r.top_p <= 1.0,
            "in (0, 1]",
        );
        c.within("kl.coef", self.kl.coef, 0.0, 1e3);
        c.positive("kl.target", self.kl.target);
        c.positive("kl.horizon", self.kl.horizon);
        c.at_least_one("ppo.epochs", p.epochs);
        c.at_least_one("ppo.minibatch_size", p.minibatch_size);
        c.within("ppo.clip_eps", p.clip_eps, 1e-6, 10.0);
        if let Some(e) = p.clip_eps_low {
            c.within("ppo.clip_eps_low", e, 1e-6, 1.0);
        }
        if let Some(e) = p.clip_eps_high {
            c.within("ppo.clip_eps_high", e, 1e-6, 10.0);
        }
        c.within("ppo.value_clip", p.value_clip, 1e-6, 1e6);
        c.within("ppo.vf_coef", p.vf_coef, 0.0, 1e3);
        c.within("ppo.entropy_coef", p.entropy_coef, 0.0, 10.0);
        c.within("ppo.gamma", p.gamma, 0.0, 1.0);
        c.within("ppo.lam", p.lam, 0.0, 1.0);
        c.within("ppo.max_approx_kl", p.max_approx_kl, 0.0, 1e3);
        c.within("ppo.ptx_coef", p.ptx_coef, 0.0, 1e3);
        let t = &self.train;
        c.at_least_one("train.iterations", t.iterations);
        c.positive("train.lr", t.lr);
        if let Some(lr) = t.critic_lr {
            c.positive("train.critic_lr", lr);
        }
        c.within("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0);
        t.adamw().check("train", c);
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
