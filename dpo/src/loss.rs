//! DPO's losses, as pure functions of the sequence log-probabilities of one planned batch
//! (`reward::plan`: each ranked group's K responses once, its pair or list terms over them).
//!
//! With π and π_ref the summed log-probabilities of a response (its tokens and EOS) under the
//! policy and the frozen reference, DPO's implicit reward is r = β·(π − π_ref) (Rafailov et al.
//! 2023), and for a pair (a better than b) `h = (π_a − π_ref,a) − (π_b − π_ref,b)`:
//! - `sigmoid` (DPO, eq. 7): −log σ(β·h); with label smoothing ε (conservative DPO, Mitchell
//!   2023; TRL's `label_smoothing`): −(1 − ε)·log σ(β·h) − ε·log σ(−β·h);
//! - `ipo` (Azar et al. 2023, as TRL): (h − 1/(2β))², with each log-probability averaged over its
//!   tokens first;
//! - `listwise` (Rafailov et al. 2023, appendix A.3): the Plackett–Luce negative log-likelihood of
//!   each group's ranking under the implicit rewards, −Σ_k [r_(k) − log Σ_{j ranked no better}
//!   e^{r_j}], ties sharing their level — `reward`'s listwise loss applied to r.
//!
//! Every group weighs the same in a batch: a group's terms are averaged, then the groups (as the
//! reward model's losses; for K = 2 comparisons this is TRL's mean over pairs).

use burn::tensor::activation::softplus;
use burn::tensor::{Int, Tensor, TensorData};
use reward::BatchPlan;
use reward::loss::{PairTerm, group_weights, listwise_loss};
use serde::{Deserialize, Serialize};

/// `loss.kind`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// DPO's −log σ(β·h) (with `label_smoothing`: conservative DPO).
    #[default]
    Sigmoid,
    /// IPO's (h − 1/(2β))² on length-averaged log-probabilities.
    Ipo,
    /// Plackett–Luce over each K-way ranking.
    Listwise,
}

/// β·(π − π_ref), the implicit reward of each row. policy, reference: [R] → [R]
pub fn implicit_rewards(policy: Tensor<1>, reference: Tensor<1>, beta: f64) -> Tensor<1> {
    (policy - reference.detach()).mul_scalar(beta)
}

fn index(rows: Vec<i64>, device: &burn::tensor::Device) -> Tensor<1, Int> {
    let n = rows.len();
    Tensor::from_data(TensorData::new(rows, [n]), device)
}

/// h of each pair term: (π_a − π_ref,a) − (π_b − π_ref,b). policy, reference: [R] → [P]
pub fn pair_logits(policy: Tensor<1>, reference: Tensor<1>, terms: &[PairTerm]) -> Tensor<1> {
    let device = policy.device();
    let d = policy - reference.detach();
    let a = index(terms.iter().map(|t| t.a as i64).collect(), &device);
    let b = index(terms.iter().map(|t| t.b as i64).collect(), &device);
    d.clone().select(0, a) - d.select(0, b)
}

/// −(1 − ε)·log σ(β·h) − ε·log σ(−β·h) per pair. h: [P] → [P]
pub fn sigmoid_loss(h: Tensor<1>, beta: f64, label_smoothing: f64) -> Tensor<1> {
    let x = h.mul_scalar(beta);
    // −log σ(x) = softplus(−x).
    let chosen = softplus(x.clone().neg(), 1.0).mul_scalar(1.0 - label_smoothing);
    if label_smoothing == 0.0 {
        return chosen;
    }
    chosen + softplus(x, 1.0).mul_scalar(label_smoothing)
}

/// (h − 1/(2β))² per pair. h: [P] → [P]
pub fn ipo_loss(h: Tensor<1>, beta: f64) -> Tensor<1> {
    h.sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2)
}

/// The batch loss of `plan` (pair terms for sigmoid and IPO, list terms for listwise) from the
/// rows' log-probabilities: summed for sigmoid and listwise, length-averaged for IPO (the caller
/// passes what [`LossKind`] needs). policy, reference: [R] → [1]
pub fn batch_loss(
    policy: Tensor<1>,
    reference: Tensor<1>,
    plan: &BatchPlan,
    kind: LossKind,
    beta: f64,
    label_smoothing: f64,
) -> Tensor<1> {
    let device = policy.device();
    if kind == LossKind::Listwise {
        return listwise_loss(implicit_rewards(policy, reference, beta), &plan.lists);
    }
    if plan.pairs.is_empty() {
        return policy.sum().mul_scalar(0.0);
    }
    let h = pair_logits(policy, reference, &plan.pairs);
    let per_pair = match kind {
        LossKind::Sigmoid => sigmoid_loss(h, beta, label_smoothing),
        LossKind::Ipo => ipo_loss(h, beta),
        LossKind::Listwise => unreachable!("handled above"),
    };
    let w = group_weights(&plan.pairs.iter().map(|t| t.group).collect::<Vec<_>>());
    let n = w.len();
    (per_pair * Tensor::<1>::from_data(TensorData::new(w, [n]), &device)).sum()
}

/// TRL's DPO metrics over a batch's non-tied pairs, from the rows' implicit rewards and summed
/// log-probabilities (host values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PairStats {
    pub pairs: usize,
    /// Mean implicit reward of the better and the worse response of each pair.
    pub chosen: f64,
    pub rejected: f64,
    /// Mean of chosen − rejected, and how often it is > 0.
    pub margin: f64,
    pub accuracy: f64,
    /// Mean summed log-probability of the better and the worse response.
    pub logps_chosen: f64,
    pub logps_rejected: f64,
}

impl PairStats {
    /// The statistics of `pairs` (better row, worse row) over `rewards` and `logps` ([R]).
    pub fn of(pairs: &[(usize, usize)], rewards: &[f32], logps: &[f32]) -> Self {
        let n = pairs.len();
        if n == 0 {
            return Self::default();
        }
        let mean = |f: &dyn Fn(usize, usize) -> f64| {
            pairs.iter().map(|&(a, b)| f(a, b)).sum::<f64>() / n as f64
        };
        let r = |i: usize| rewards[i] as f64;
        let l = |i: usize| logps[i] as f64;
        Self {
            pairs: n,
            chosen: mean(&|a, _| r(a)),
            rejected: mean(&|_, b| r(b)),
            margin: mean(&|a, b| r(a) - r(b)),
            accuracy: mean(&|a, b| (r(a) > r(b)) as u8 as f64),
            logps_chosen: mean(&|a, _| l(a)),
            logps_rejected: mean(&|_, b| l(b)),
        }
    }
}
