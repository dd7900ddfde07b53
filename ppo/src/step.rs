//! One iteration's update: the rollout's host arrays ([`Batch`]), one minibatch step of the
//! policy ([`policy_step`]) and of the critic ([`critic_step`]), each returning named
//! statistics, their sums over an iteration ([`UpdateStats`]) and the metrics.jsonl line
//! ([`IterationRecord`]).

use crate::PpoConfig;
use crate::core;
use crate::rollout::{Minibatch, Ptx, Rollout};
use anyhow::Result;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use model::ops::mask_tensor;
use model::{CausalLm, ModelMeta};
use serde::Serialize;
use trainer::Run;

/// The rollout's arrays on the host, row-major [b, n] per response token ([b] for `scores`):
/// what the update reads.
pub struct Batch {
    /// The policy's log-probabilities of the sampled tokens when they were sampled.
    pub old_logprobs: Vec<f32>,
    /// None when nothing reads the KL (β = 0, not adaptive, no monitor): no reference forward.
    pub reference_logprobs: Option<Vec<f32>>,
    /// The critic's values before each token (none without a critic).
    pub values: Option<Vec<f32>>,
    /// The per-token KL estimate to the reference.
    pub kl: Vec<f32>,
    /// The score of each response (penalised, clipped).
    pub scores: Vec<f32>,
    /// −β·KL per token plus the score on the last token.
    pub rewards: Vec<f32>,
    pub advantages: Vec<f32>,
    /// GAE's value targets (with a critic).
    pub returns: Option<Vec<f32>>,
    /// Groups (the samples of one prompt) whose returns were all equal: no gradient from them.
    pub uniform_groups: Option<usize>,
}

/// A critic and its optimizer.
pub struct Critic {
    pub model: CausalLm,
    pub optim: ModuleOptimizer,
    pub meta: ModelMeta,
}

/// What the steps read besides their model: the config, the run (for its NaN guard), the
/// PPO-ptx data, and this iteration's constants.
pub struct StepContext<'a> {
    pub cfg: &'a PpoConfig,
    pub run: &'a Run,
    pub ptx: Option<&'a Ptx>,
    pub device: &'a Device,
    pub pad_id: u32,
    pub temperature: f64,
    pub iteration: usize,
    /// This iteration's learning rate (the policy's; the critic's is scaled).
    pub lr: f64,
    pub critic_lr_scale: f64,
    /// β of this iteration.
    pub beta: f64,
}

/// One policy minibatch step's statistics.
#[derive(Clone, Copy, Debug, Default)]
pub struct PolicyStats {
    /// The policy's whole loss (surrogate, entropy bonus, KL and PPO-ptx terms).
    pub loss: f64,
    pub entropy: f32,
    pub clip_fraction: f32,
    pub approx_kl: f32,
    /// The PPO-ptx LM loss (0 without it).
    pub ptx_loss: f64,
    pub grad_norm: f32,
}

/// One critic minibatch step's statistics.
#[derive(Clone, Copy, Debug, Default)]
pub struct CriticStats {
    /// The value loss (before `vf_coef`).
    pub loss: f64,
    pub clip_fraction: f32,
    pub grad_norm: f32,
}

fn float_tensor(v: &[f32], b: usize, t: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v.to_vec(), [b, t]), device)
}

/// One optimizer step of the policy on a minibatch: the clipped surrogate (+ entropy bonus, KL
/// loss, PPO-ptx). `index` is the minibatch's number in the iteration (PPO-ptx's data order).
pub fn policy_step(
    x: &StepContext,
    policy: CausalLm,
    optim: &mut ModuleOptimizer,
    roll: &Rollout,
    mb: &Minibatch,
    batch: &Batch,
    index: usize,
) -> Result<(CausalLm, PolicyStats)> {
    let (cfg, ppo, device) = (x.cfg, &x.cfg.ppo, x.device);
    let (m, n) = (mb.rows.len(), mb.n);
    let (agg, max_len) = (ppo.loss_agg, cfg.rollout.max_new_tokens);
    let mask = mask_tensor(&mb.pick(&roll.response_mask), m, n, device);
    let tokens = model::ops::token_tensor(&mb.pick(&roll.response_tokens), m, n, device);
    let (logprobs, logits) =
        crate::response_logprobs(&policy, &mb.batch, tokens, mb.prompt_len, x.temperature)?;
    let pl = core::policy_loss(
        logprobs.clone(),
        float_tensor(&mb.pick(&batch.old_logprobs), m, n, device),
        float_tensor(&mb.pick(&batch.advantages), m, n, device),
        mask.clone(),
        ppo.clip_range(),
        agg,
        max_len,
    );
    // The entropy joins the graph only when it is part of the loss.
    let logits = if ppo.entropy_coef > 0.0 {
        logits
    } else {
        logits.detach()
    };
    let per_token_entropy = core::entropy_from_logits(logits);
    let entropy = model::ops::masked_mean(per_token_entropy.clone().detach(), mask.clone())
        .into_scalar::<f32>();
    let mut total = pl.loss;
    if ppo.entropy_coef > 0.0 {
        let bonus = core::aggregate(per_token_entropy, mask.clone(), agg, max_len);
        total = total - bonus.mul_scalar(ppo.entropy_coef);
    }
    if !cfg.kl.in_reward
        && x.beta > 0.0
        && let Some(reference) = &batch.reference_logprobs
    {
        let kl = core::kl_loss(
            logprobs,
            float_tensor(&mb.pick(reference), m, n, device),
            mask,
            cfg.kl.estimator,
            agg,
            max_len,
        );
        total = total + kl.mul_scalar(x.beta);
    }
    let mut ptx_loss = 0.0;
    if ppo.ptx_coef > 0.0
        && let Some(ptx) = x.ptx
    {
        let lm = ptx.loss(&policy, x.iteration, index, m, x.pad_id, device)?;
        ptx_loss = lm.clone().into_scalar::<f32>() as f64;
        total = total + lm.mul_scalar(ppo.ptx_coef);
    }
    let loss = total.clone().into_scalar::<f32>() as f64;
    x.run.check_finite("policy loss", loss)?;
    let grads = GradientsParams::from_grads(total.backward(), &policy);
    let (policy, grad_norm) = trainer::optim::optimizer_step(
        optim,
        policy,
        grads,
        x.lr,
        cfg.train.max_grad_norm,
        x.iteration + 1,
        x.run.last_good(),
    )?;
    Ok((
        policy,
        PolicyStats {
            loss,
            entropy,
            clip_fraction: pl.clip_fraction,
            approx_kl: pl.approx_kl,
            ptx_loss,
            grad_norm,
        },
    ))
}

/// One optimizer step of the critic on a minibatch: the clipped value loss against GAE's returns.
pub fn critic_step(
    x: &StepContext,
    mut critic: Critic,
    roll: &Rollout,
    mb: &Minibatch,
    batch: &Batch,
) -> Result<(Critic, CriticStats)> {
    let (ppo, device) = (&x.cfg.ppo, x.device);
    let (m, n) = (mb.rows.len(), mb.n);
    let (Some(old_values), Some(returns)) = (&batch.values, &batch.returns) else {
        anyhow::bail!("critic_step without values and returns");
    };
    let mask = mask_tensor(&mb.pick(&roll.response_mask), m, n, device);
    let values = crate::values_of(&critic.model, &mb.batch, mb.prompt_len, n)?;
    let vl = core::value_loss(
        values,
        float_tensor(&mb.pick(old_values), m, n, device),
        float_tensor(&mb.pick(returns), m, n, device),
        mask,
        ppo.value_clip,
    );
    let total = vl.loss.mul_scalar(ppo.vf_coef);
    let loss = total.clone().into_scalar::<f32>() as f64 / ppo.vf_coef.max(1e-12);
    x.run.check_finite("value loss", loss)?;
    let grads = GradientsParams::from_grads(total.backward(), &critic.model);
    let (model, grad_norm) = trainer::optim::optimizer_step(
        &mut critic.optim,
        critic.model,
        grads,
        x.lr * x.critic_lr_scale,
        x.cfg.train.max_grad_norm,
        x.iteration + 1,
        x.run.last_good(),
    )?;
    critic.model = model;
    Ok((
        critic,
        CriticStats {
            loss,
            clip_fraction: vl.clip_fraction,
            grad_norm,
        },
    ))
}

/// Sums of one iteration's minibatch statistics.
#[derive(Default)]
pub struct UpdateStats {
    pub minibatches: usize,
    pub policy_loss: f64,
    pub entropy: f64,
    pub clip_fraction: f64,
    pub approx_kl: f64,
    pub policy_grad_norm: f64,
    /// Sum of the PPO-ptx LM loss (mean NLL per demonstration token) over the minibatches.
    pub ptx_loss: f64,
    pub value_loss: f64,
    pub value_clip_fraction: f64,
    pub critic_grad_norm: f64,
    pub early_stopped: bool,
}

impl UpdateStats {
    /// Adds a minibatch's statistics.
    pub fn add(&mut self, p: &PolicyStats, c: Option<&CriticStats>) {
        self.minibatches += 1;
        self.policy_loss += p.loss;
        self.entropy += p.entropy as f64;
        self.clip_fraction += p.clip_fraction as f64;
        self.approx_kl += p.approx_kl as f64;
        self.policy_grad_norm += p.grad_norm as f64;
        self.ptx_loss += p.ptx_loss;
        if let Some(c) = c {
            self.value_loss += c.loss;
            self.value_clip_fraction += c.clip_fraction as f64;
            self.critic_grad_norm += c.grad_norm as f64;
        }
    }

    /// A sum's mean over the minibatches.
    pub fn mean(&self, sum: f64) -> f64 {
        sum / self.minibatches.max(1) as f64
    }
}

/// One line of metrics.jsonl (besides `step` and the rate the run adds). Optional fields are
/// left out when they do not apply.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IterationRecord {
    /// The optimised score (after the EOS penalty and clipping).
    pub score_mean: f64,
    pub score_std: f64,
    /// An ensemble's members' mean and their disagreement (std), averaged over the responses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ensemble_std: Option<f64>,
    /// Responses cut to fit the reward model's context.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cut_responses: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gold_mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heldout_score_mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overoptimization_warning: Option<bool>,
    /// The KL from the reference per response (absent when it is not measured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_per_response: Option<f64>,
    pub kl_coef: f64,
    pub entropy: f64,
    pub policy_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_loss: Option<f64>,
    pub clip_fraction: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_clip_fraction: Option<f64>,
    pub approx_kl: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ptx_loss: Option<f64>,
    pub policy_grad_norm: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub critic_grad_norm: Option<f64>,
    pub minibatches: usize,
    pub early_stopped: bool,
    /// How much of the returns' variance the critic explains (NaN, written null, when undefined).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explained_variance: Option<f64>,
    /// Groups whose samples all scored the same (critic-free group estimators).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uniform_groups: Option<usize>,
    pub response_length_mean: f64,
    pub response_length_std: f64,
    pub eos_rate: f64,
    pub lr: f64,
    pub time_generate_s: f64,
    pub time_score_s: f64,
    pub time_forward_s: f64,
    pub time_train_s: f64,
}

impl UpdateStats {
    /// Fills the update's fields of `r`.
    pub fn record(&self, r: &mut IterationRecord, critic: bool, ptx: bool) {
        r.entropy = self.mean(self.entropy);
        r.policy_loss = self.mean(self.policy_loss);
        r.clip_fraction = self.mean(self.clip_fraction);
        r.approx_kl = self.mean(self.approx_kl);
        r.policy_grad_norm = self.mean(self.policy_grad_norm);
        r.ptx_loss = ptx.then(|| self.mean(self.ptx_loss));
        if critic {
            r.value_loss = Some(self.mean(self.value_loss));
            r.value_clip_fraction = Some(self.mean(self.value_clip_fraction));
            r.critic_grad_norm = Some(self.mean(self.critic_grad_norm));
        }
        r.minibatches = self.minibatches;
        r.early_stopped = self.early_stopped;
    }
}
