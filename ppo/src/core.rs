//! The loss math of PPO for RLHF, as pure functions: per-token KL, per-token rewards, GAE,
//! whitening, explained variance, the adaptive KL controller (host side, on plain slices), and the
//! clipped policy and value losses, entropy and a KL loss term (burn tensors, differentiable).
//!
//! The formulas follow the usual references: cleanrl's `ppo.py` (clipped surrogate, clipped value
//! loss, explained variance), OpenRLHF's `openrlhf/models/loss.py` and `openrlhf/models/utils.py`
//! / `ppo_utils` (masked whitening, KL estimators, token-mean aggregation), and the original TRL
//! `ppo_trainer.py` (per-token rewards from KL plus the score on the last token, GAE over the
//! response, the adaptive KL controller of Ziegler et al. 2019).
//!
//! # Layout
//!
//! A rollout batch of `B` responses is stored row-major as `[B, T]`: element `(i, j)` is at
//! `i * T + j`. A response mask of the same shape is `true` (host) or `1.0` (tensors) at the real
//! response tokens, which are contiguous from column 0; padding follows. Host functions take
//! `&[f32]`/`&[bool]` with `b` and `t` where the row structure matters; tensor functions take
//! `[B, T]` tensors and a float mask (see [`model::ops::mask_tensor`]). Values at masked positions
//! of the inputs are ignored (they must be finite); outputs are 0 there.
//!
//! # Advantage estimators
//!
//! [`Estimator::Gae`] is PPO's: a critic's values and [`gae`]. The critic-free ones compare each
//! response's return (the sum of its per-token rewards: the score, minus β·KL when the KL is in
//! the reward) with other responses, as `verl/trainer/ppo/core_algos.py` computes them:
//! [`group_advantages`] for GRPO, Dr. GRPO and RLOO (a group is the responses to one prompt),
//! [`reinforce_pp_advantages`] for REINFORCE++.
//!
//! # Aggregation
//!
//! A tensor loss is a per-token loss reduced by [`aggregate`] under a [`LossAgg`] (verl's
//! `loss_agg_mode`). The default is the *token-mean*: the sum over all masked-in tokens of the
//! minibatch divided by the number of those tokens ([`model::ops::masked_mean`]), as OpenRLHF and
//! verl. Historically TRL averaged the per-sequence means instead (`seq-mean-token-mean`), which
//! weighs the tokens of short responses more; Dr. GRPO sums each response's tokens and divides by
//! a constant (`seq-mean-token-sum-norm`), so that no length is favoured.

use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;
use model::ops::masked_mean;
use serde::{Deserialize, Serialize};
use std::fmt;

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

/// How the KL divergence between the policy and the reference policy is estimated from the
/// log-probabilities of the sampled tokens (Schulman, "Approximating KL divergence", 2020).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `log p − log p_ref`: unbiased, high variance, can be negative per token (InstructGPT, TRL).
    #[default]
    K1,
    /// `exp(log p_ref − log p) − (log p_ref − log p) − 1`: unbiased, never negative, lower
    /// variance (GRPO, verl's `low_var_kl` without the clamp).
    K3,
}

/// The per-token KL estimate of the sampled tokens under `est`.
/// logprobs, ref_logprobs, mask: [B, T] → [B, T], 0 at masked positions.
pub fn kl_per_token(
    logprobs: &[f32],
    ref_logprobs: &[f32],
    mask: &[bool],
    est: KlEstimator,
) -> Vec<f32> {
    assert_eq!(
        logprobs.len(),
        ref_logprobs.len(),
        "logprobs vs ref_logprobs"
    );
    assert_eq!(logprobs.len(), mask.len(), "logprobs vs mask");
    logprobs
        .iter()
        .zip(ref_logprobs)
        .zip(mask)
        .map(|((&lp, &rp), &m)| {
            if !m {
                return 0.0;
            }
            match est {
                KlEstimator::K1 => lp - rp,
                KlEstimator::K3 => {
                    let r = rp as f64 - lp as f64;
                    (r.exp_m1() - r) as f32
                }
            }
        })
        .collect()
}

/// How advantages are estimated (`advantage.estimator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    /// GAE(γ, λ) over a critic's values, whitened over the batch (PPO; InstructGPT).
    #[default]
    Gae,
    /// GRPO (Shao et al. 2024): `(R − mean_group) / (std_group + 1e-6)`, the std with Bessel's
    /// correction, the same for every token of the response.
    Grpo,
    /// Dr. GRPO (Liu et al. 2025): `R − mean_group`, no std division (pair it with
    /// `ppo.loss_agg = "seq-mean-token-sum-norm"` for no length normalisation either).
    DrGrpo,
    /// RLOO (Ahmadian et al. 2024): `R − mean of the group's other returns`
    /// (`= (R − mean_group) · n/(n−1)`).
    Rloo,
    /// REINFORCE++ (Hu 2025): per-token discounted returns of the per-token rewards, whitened
    /// over the batch.
    ReinforcePp,
}

impl Estimator {
    /// Whether a critic is loaded, trained and checkpointed.
    pub fn needs_critic(self) -> bool {
        self == Estimator::Gae
    }

    /// Whether the baseline is the other samples of the same prompt (n ≥ 2 needed).
    pub fn needs_group(self) -> bool {
        matches!(self, Estimator::Grpo | Estimator::DrGrpo | Estimator::Rloo)
    }
}

impl fmt::Display for Estimator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Estimator::Gae => "gae",
            Estimator::Grpo => "grpo",
            Estimator::DrGrpo => "dr_grpo",
            Estimator::Rloo => "rloo",
            Estimator::ReinforcePp => "reinforce_pp",
        })
    }
}

/// Each row's sum over its columns: a response's return from its per-token rewards (0 at the
/// padding). x: [B, T] → [B].
pub fn row_sums(x: &[f32], b: usize, t: usize) -> Vec<f32> {
    assert_eq!(x.len(), b * t, "x is not [b, t]");
    (0..b)
        .map(|i| x[i * t..(i + 1) * t].iter().map(|&v| v as f64).sum::<f64>() as f32)
        .collect()
}

/// A per-response value on every real token of its row. per_row: [B], mask: [B, T] → [B, T].
pub fn broadcast_rows(per_row: &[f32], mask: &[bool], b: usize, t: usize) -> Vec<f32> {
    assert_eq!(per_row.len(), b, "per_row is not [b]");
    assert_eq!(mask.len(), b * t, "mask is not [b, t]");
    (0..b * t)
        .map(|k| if mask[k] { per_row[k / t] } else { 0.0 })
        .collect()
}

/// The group-baseline advantages of GRPO, Dr. GRPO and RLOO, one per response, from the
/// responses' returns; a group is `group` consecutive responses (the samples of one prompt).
/// Also returns how many groups had all returns equal (their advantages are all 0: no gradient;
/// DAPO's "dynamic sampling" counts them too). returns: [G · group] → ([G · group], uniform groups).
pub fn group_advantages(returns: &[f32], group: usize, est: Estimator) -> (Vec<f32>, usize) {
    assert!(group >= 1, "group size 0");
    assert!(
        returns.len().is_multiple_of(group),
        "{} returns are not whole groups of {group}",
        returns.len()
    );
    let mut adv = Vec::with_capacity(returns.len());
    let mut uniform = 0;
    for g in returns.chunks(group) {
        let n = g.len() as f64;
        let mean = g.iter().map(|&v| v as f64).sum::<f64>() / n;
        if g.iter().all(|&v| v == g[0]) {
            uniform += 1;
        }
        let std = if g.len() > 1 {
            (g.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            1.0
        };
        for &r in g {
            let d = r as f64 - mean;
            adv.push(match est {
                Estimator::Grpo => d / (std + 1e-6),
                Estimator::DrGrpo => d,
                Estimator::Rloo if g.len() > 1 => d * n / (n - 1.0),
                Estimator::Rloo => 0.0,
                Estimator::Gae | Estimator::ReinforcePp => {
                    panic!("group_advantages of {est}: not a group estimator")
                }
            } as f32);
        }
    }
    (adv, uniform)
}

/// REINFORCE++'s advantages: per token the discounted return of the per-token rewards,
/// `G_t = r_t + γ·G_{t+1}` (0 after the row's last real token), whitened over the batch's
/// masked-in tokens ([`whiten`] with the mean removed). rewards, mask: [B, T] → [B, T].
pub fn reinforce_pp_advantages(
    rewards: &[f32],
    mask: &[bool],
    b: usize,
    t: usize,
    gamma: f64,
) -> Vec<f32> {
    assert_eq!(rewards.len(), b * t, "rewards is not [b, t]");
    assert_eq!(mask.len(), b * t, "mask is not [b, t]");
    let mut ret = vec![0.0f32; b * t];
    for i in 0..b {
        let mut running = 0.0f64;
        for j in (0..t).rev() {
            let k = i * t + j;
            if !mask[k] {
                running = 0.0;
                continue;
            }
            running = rewards[k] as f64 + gamma * running;
            ret[k] = running as f32;
        }
    }
    whiten(&ret, mask, true)
}

/// The last masked-in column of each row, or `None` for an empty row. mask: [B, T] → [B]
pub fn last_token_index(mask: &[bool], b: usize, t: usize) -> Vec<Option<usize>> {
    assert_eq!(mask.len(), b * t, "mask is not [b, t]");
    (0..b)
        .map(|i| mask[i * t..(i + 1) * t].iter().rposition(|&m| m))
        .collect()
}

/// Per-token rewards of InstructGPT/TRL: `−kl_coef · kl` on every response token, plus the
/// reward model's score added on each row's last real token (a row without tokens gets nothing).
/// kl, mask: [B, T], scores: [B] → [B, T], 0 at masked positions.
pub fn per_token_rewards(
    kl: &[f32],
    scores: &[f32],
    mask: &[bool],
    b: usize,
    t: usize,
    kl_coef: f64,
) -> Vec<f32> {
    assert_eq!(kl.len(), b * t, "kl is not [b, t]");
    assert_eq!(scores.len(), b, "scores is not [b]");
    let mut r: Vec<f32> = kl
        .iter()
        .zip(mask)
        .map(|(&k, &m)| if m { (-kl_coef * k as f64) as f32 } else { 0.0 })
        .collect();
    for (i, last) in last_token_index(mask, b, t).into_iter().enumerate() {
        if let Some(j) = last {
            r[i * t + j] += scores[i];
        }
    }
    r
}

/// Generalised advantage estimation (Schulman et al. 2016) over each response, as a reverse loop:
/// `δ_t = r_t + γ·V_{t+1} − V_t`, `A_t = δ_t + γλ·A_{t+1}`, with `V` and `A` taken as 0 after
/// the last real token (the episode ends there). Returns `(advantages, returns)` with
/// `returns = advantages + values`, both 0 at masked positions. A masked position inside a row
/// ends the episode there as well. rewards, values, mask: [B, T] → ([B, T], [B, T]).
pub fn gae(
    rewards: &[f32],
    values: &[f32],
    mask: &[bool],
    b: usize,
    t: usize,
    gamma: f64,
    lam: f64,
) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(rewards.len(), b * t, "rewards is not [b, t]");
    assert_eq!(values.len(), b * t, "values is not [b, t]");
    assert_eq!(mask.len(), b * t, "mask is not [b, t]");
    let mut adv = vec![0.0f32; b * t];
    let mut ret = vec![0.0f32; b * t];
    for i in 0..b {
        let mut next_value = 0.0f64;
        let mut last_gae = 0.0f64;
        for j in (0..t).rev() {
            let k = i * t + j;
            if !mask[k] {
                next_value = 0.0;
                last_gae = 0.0;
                continue;
            }
            let v = values[k] as f64;
            let delta = rewards[k] as f64 + gamma * next_value - v;
            last_gae = delta + gamma * lam * last_gae;
            adv[k] = last_gae as f32;
            ret[k] = (last_gae + v) as f32;
            next_value = v;
        }
    }
    (adv, ret)
}

/// Masked mean and masked variance with Bessel's correction (`var · n/(n−1)`, as TRL's and
/// OpenRLHF's `masked_var`), in f64. `None` for an empty mask; the variance is 0 for one token.
fn masked_mean_var(x: &[f32], mask: &[bool]) -> Option<(f64, f64)> {
    assert_eq!(x.len(), mask.len(), "x vs mask");
    let n = mask.iter().filter(|&&m| m).count();
    if n == 0 {
        return None;
    }
    let sel = || {
        x.iter()
            .zip(mask)
            .filter(|(_, m)| **m)
            .map(|(&v, _)| v as f64)
    };
    let mean = sel().sum::<f64>() / n as f64;
    let var = if n > 1 {
        sel().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    Some((mean, var))
}

/// Whitening over the masked positions, as TRL/OpenRLHF `masked_whiten`:
/// `(x − mean) / sqrt(var + 1e-8)` with the masked mean and the Bessel-corrected masked variance;
/// the mean is added back when `shift_mean` is false (rewards are whitened that way, advantages
/// with `shift_mean = true`). x, mask: any shape → same shape, 0 at masked positions.
pub fn whiten(x: &[f32], mask: &[bool], shift_mean: bool) -> Vec<f32> {
    let Some((mean, var)) = masked_mean_var(x, mask) else {
        return vec![0.0; x.len()];
    };
    let inv_std = 1.0 / (var + 1e-8).sqrt();
    x.iter()
        .zip(mask)
        .map(|(&v, &m)| {
            if !m {
                return 0.0;
            }
            let w = (v as f64 - mean) * inv_std;
            (if shift_mean { w } else { w + mean }) as f32
        })
        .collect()
}

/// How much of the variance of the returns the value head explains, over the masked positions:
/// `1 − Var[returns − values] / Var[returns]` with population variances (cleanrl's
/// `explained_var`). 1 is perfect, 0 is no better than a constant, negative is worse. NaN when
/// `Var[returns]` is 0 or the mask is empty. values, returns, mask: any shape.
pub fn explained_variance(values: &[f32], returns: &[f32], mask: &[bool]) -> f64 {
    assert_eq!(values.len(), returns.len(), "values vs returns");
    assert_eq!(values.len(), mask.len(), "values vs mask");
    let (diff, ret): (Vec<f64>, Vec<f64>) = values
        .iter()
        .zip(returns)
        .zip(mask)
        .filter(|(_, m)| **m)
        .map(|((&v, &r), _)| (r as f64 - v as f64, r as f64))
        .unzip();
    let var_y = population_variance(&ret);
    if ret.is_empty() || var_y == 0.0 {
        return f64::NAN;
    }
    1.0 - population_variance(&diff) / var_y
}

/// The variance of `x` with divisor `n` (numpy's default).
fn population_variance(x: &[f64]) -> f64 {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n
}

/// The adaptive KL coefficient of Ziegler et al. 2019 ("Fine-tuning language models from human
/// preferences", §2.2), as TRL's `AdaptiveKLController`: the coefficient `value` is nudged so that
/// the measured KL moves towards `target`, over a time scale of `horizon` samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveKlController {
    /// The current KL coefficient β.
    pub value: f64,
    /// The KL (nats per response) the controller steers towards.
    pub target: f64,
    /// The number of samples over which an error is corrected (10 000 in the paper).
    pub horizon: f64,
}

impl AdaptiveKlController {
    /// A controller starting at `init`.
    pub fn new(init: f64, target: f64, horizon: f64) -> Self {
        Self {
            value: init,
            target,
            horizon,
        }
    }

    /// `e = clip(current_kl / target − 1, −0.2, 0.2)`, `value *= 1 + e · n_steps / horizon`, where
    /// `n_steps` is the number of samples (responses) the KL was measured on. A non-finite KL
    /// leaves the coefficient unchanged instead of poisoning it.
    pub fn update(&mut self, current_kl: f64, n_steps: usize) {
        if !current_kl.is_finite() {
            return;
        }
        let proportional_error = (current_kl / self.target - 1.0).clamp(-0.2, 0.2);
        self.value *= 1.0 + proportional_error * n_steps as f64 / self.horizon;
    }
}

/// The KL coefficient: fixed, or adapted to a target KL. Serialised (externally tagged,
/// lowercase: `{"fixed": 0.05}`, `{"adaptive": {"value": …, "target": …, "horizon": …}}`) into
/// configs and checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlController {
    /// A constant coefficient.
    Fixed(f64),
    /// Ziegler et al.'s proportional controller.
    Adaptive(AdaptiveKlController),
}

impl KlController {
    /// The current KL coefficient.
    pub fn value(&self) -> f64 {
        match self {
            KlController::Fixed(v) => *v,
            KlController::Adaptive(c) => c.value,
        }
    }

    /// Feeds the KL measured on `n_steps` samples; a fixed coefficient ignores it.
    pub fn update(&mut self, current_kl: f64, n_steps: usize) {
        if let KlController::Adaptive(c) = self {
            c.update(current_kl, n_steps);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Tensors
// ------------------------------------------------------------------------------------------------

/// How a per-token loss becomes one number (verl's `loss_agg_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossAgg {
    /// Sum over all real tokens of the minibatch / their number (OpenRLHF, verl).
    #[default]
    TokenMean,
    /// Each response's token sum, averaged over the responses.
    SeqMeanTokenSum,
    /// Each response's token mean, averaged over the responses (the original TRL).
    SeqMeanTokenMean,
    /// Each response's token sum divided by a constant (the longest possible response,
    /// `rollout.max_new_tokens`), averaged over the responses (Dr. GRPO).
    SeqMeanTokenSumNorm,
}

/// `per_token` reduced under `agg` over the masked-in tokens; `max_len` is the constant of
/// `SeqMeanTokenSumNorm`. per_token, mask (float 0/1): [B, T] → [1].
pub fn aggregate(per_token: Tensor<2>, mask: Tensor<2>, agg: LossAgg, max_len: usize) -> Tensor<1> {
    if agg == LossAgg::TokenMean {
        return masked_mean(per_token, mask);
    }
    let [b, _] = per_token.dims();
    let sums = (per_token * mask.clone()).sum_dim(1).reshape([b]);
    let per_seq = match agg {
        LossAgg::SeqMeanTokenSum => sums,
        LossAgg::SeqMeanTokenMean => sums / mask.sum_dim(1).reshape([b]).clamp_min(1.0),
        LossAgg::SeqMeanTokenSumNorm => sums.div_scalar(max_len.max(1) as f64),
        LossAgg::TokenMean => unreachable!(),
    };
    per_seq.mean()
}

/// The clipped surrogate loss and its diagnostics.
#[derive(Debug, Clone)]
pub struct PolicyLoss {
    /// The loss to minimise, [1], differentiable w.r.t. the current log-probabilities.
    pub loss: Tensor<1>,
    /// The fraction of masked-in tokens where the clipped term is the active one (strictly larger).
    pub clip_fraction: f32,
    /// `mean ½ (log p − log p_old)²`: the k2 estimator of KL(old ‖ new), as cleanrl's and TRL's
    /// `approxkl`; second-order accurate, never negative.
    pub approx_kl: f32,
    /// `mean (ratio − 1) − log ratio`: the k3 estimator of KL(old ‖ new) (cleanrl's
    /// `approx_kl`), unbiased under samples from the old policy, never negative.
    pub approx_kl_k3: f32,
}

/// PPO's clipped surrogate objective as a loss (Schulman et al. 2017):
/// `ratio = exp(log p − log p_old)`, per token `max(−A·ratio, −A·clip(ratio, 1−ε_low, 1+ε_high))`
/// (ε_low = ε_high = ε in PPO; DAPO raises ε_high), reduced by [`aggregate`] under `agg`. The
/// gradient flows into `logprobs` only (and is 0 for the tokens where the clipped term is active);
/// `old_logprobs` and `advantages` are constants. The diagnostics are token-means.
/// logprobs, old_logprobs, advantages, mask (float 0/1): [B, T] → loss [1].
pub fn policy_loss(
    logprobs: Tensor<2>,
    old_logprobs: Tensor<2>,
    advantages: Tensor<2>,
    mask: Tensor<2>,
    (clip_low, clip_high): (f64, f64),
    agg: LossAgg,
    max_len: usize,
) -> PolicyLoss {
    // Zeroing the padding before `exp` keeps garbage there from overflowing into NaN gradients.
    let log_ratio = (logprobs - old_logprobs.detach()) * mask.clone();
    let ratio = log_ratio.clone().exp();
    let neg_adv = advantages.detach().neg();
    let unclipped = neg_adv.clone() * ratio.clone();
    let clipped = neg_adv * ratio.clone().clamp(1.0 - clip_low, 1.0 + clip_high);
    // On ties `max_pair` keeps `unclipped`, whose gradient is the unclipped one.
    let per_token = unclipped.clone().max_pair(clipped.clone());
    let loss = aggregate(per_token, mask.clone(), agg, max_len);

    let mask = mask.detach();
    let scalar = |x: Tensor<2>| masked_mean(x.detach(), mask.clone()).into_scalar::<f32>();
    let clip_fraction = scalar(clipped.detach().greater(unclipped.detach()).float());
    let log_ratio = log_ratio.detach();
    let approx_kl = scalar(log_ratio.clone().square().mul_scalar(0.5));
    let approx_kl_k3 = scalar(ratio.detach().sub_scalar(1.0) - log_ratio);
    PolicyLoss {
        loss,
        clip_fraction,
        approx_kl,
        approx_kl_k3,
    }
}

/// The clipped value loss and its diagnostic.
#[derive(Debug, Clone)]
pub struct ValueLoss {
    /// The loss to minimise, [1], differentiable w.r.t. the current values.
    pub loss: Tensor<1>,
    /// The fraction of masked-in tokens where the clipped error is the larger one (TRL's
    /// `vf_clipfrac`).
    pub clip_fraction: f32,
}

/// PPO's clipped value loss (cleanrl `clip_vloss`, OpenRLHF `ValueLoss`):
/// `v_clipped = v_old + clamp(v − v_old, −clip, clip)`,
/// `loss = ½ · token-mean of max((v − R)², (v_clipped − R)²)`.
/// values, old_values, returns, mask (float 0/1): [B, T] → loss [1].
pub fn value_loss(
    values: Tensor<2>,
    old_values: Tensor<2>,
    returns: Tensor<2>,
    mask: Tensor<2>,
    clip: f64,
) -> ValueLoss {
    let old_values = old_values.detach();
    let returns = returns.detach();
    let v_clipped = old_values.clone() + (values.clone() - old_values).clamp(-clip, clip);
    let unclipped = (values - returns.clone()).square();
    let clipped = (v_clipped - returns).square();
    let per_token = unclipped.clone().max_pair(clipped.clone());
    let loss = masked_mean(per_token, mask.clone()).mul_scalar(0.5);
    let clip_fraction = masked_mean(
        clipped.detach().greater(unclipped.detach()).float(),
        mask.detach(),
    )
    .into_scalar::<f32>();
    ValueLoss {
        loss,
        clip_fraction,
    }
}

/// The entropy of the categorical distribution of each position,
/// `logsumexp(l) − Σ softmax(l)·l`, computed stably as `−Σ p·log p` from `log_softmax`
/// (the same quantity: `log p = l − logsumexp(l)` and `Σ p = 1`). logits: [B, T, V] → [B, T].
pub fn entropy_from_logits(logits: Tensor<3>) -> Tensor<2> {
    let [b, t, _] = logits.dims();
    let logp = log_softmax(logits, 2);
    let p = logp.clone().exp();
    (p * logp).sum_dim(2).neg().reshape([b, t])
}

/// The KL to the reference policy as a loss term instead of a reward penalty (GRPO, verl's
/// `use_kl_loss`): the per-token estimate, k1 `log p − log p_ref` or (usual) k3
/// `exp(log p_ref − log p) − (log p_ref − log p) − 1`, reduced by [`aggregate`] under `agg`.
/// Differentiable w.r.t. `logprobs`. logprobs, ref_logprobs, mask (float 0/1): [B, T] → [1].
pub fn kl_loss(
    logprobs: Tensor<2>,
    ref_logprobs: Tensor<2>,
    mask: Tensor<2>,
    est: KlEstimator,
    agg: LossAgg,
    max_len: usize,
) -> Tensor<1> {
    // log(p_ref / p), zeroed on the padding.
    let d = (ref_logprobs.detach() - logprobs) * mask.clone();
    let per_token = match est {
        KlEstimator::K1 => d.neg(),
        KlEstimator::K3 => d.clone().exp() - d.add_scalar(1.0),
    };
    aggregate(per_token, mask, agg, max_len)
}
