//! The reward model's losses, as pure functions of the rewards of one padded forward.
//!
//! InstructGPT (Ouyang et al. 2022, §3.5, eq. 1): for a prompt whose K responses a labeler
//! ranked, every one of the C(K,2) pairs is a comparison, and the group's loss is the mean of
//! −log σ(r_better − r_worse) over its pairs; all K responses of a group are scored in one forward,
//! so each response is computed once per group rather than once per pair. Options:
//! - a margin m subtracted inside the sigmoid (Llama 2's margin loss; here the rank gap or the
//!   data's `margin`);
//! - ties kept as a term that pulls the two rewards together: binary cross-entropy of σ(r_a − r_b)
//!   against the label ½, −½·log σ(d) − ½·log σ(−d), minimal at r_a = r_b;
//! - a listwise Plackett–Luce loss instead of pairs (Plackett 1975; Luce 1959): −log P(ranking)
//!   = −Σ_i [r_(i) − log Σ_{j ranked no better than i} e^{r_j}], ties sharing their level
//!   (Breslow's approximation), averaged over the group's terms;
//! - a reward-centering term c · mean(r²) over the batch's responses (Eisenstein et al. 2023;
//!   TRL's `center_rewards_coefficient`, 0.01 suggested), which keeps rewards near 0.
//!
//! Every group weighs the same in a batch: the batch loss is the mean over groups of each group's
//! mean term.

use burn::tensor::activation::softplus;
use burn::tensor::{Int, Tensor, TensorData};

/// One pairwise term: rows `a` and `b` of the rewards vector.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairTerm {
    /// The better response's row (either for a tie).
    pub a: usize,
    /// The worse response's row.
    pub b: usize,
    /// Subtracted inside the sigmoid (0 for none).
    pub margin: f32,
    /// A tie: the term pulls r_a and r_b together.
    pub tie: bool,
    /// The group the term belongs to.
    pub group: usize,
}

/// One listwise term: row `item`, and the rows ranked no better than it (`item` included).
#[derive(Clone, Debug, PartialEq)]
pub struct ListTerm {
    pub item: usize,
    pub candidates: Vec<usize>,
    pub group: usize,
}

/// 1 / (number of groups · terms in the term's group), so that each group weighs the same.
pub fn group_weights(groups: &[usize]) -> Vec<f32> {
    let n_groups = groups.iter().copied().max().map_or(0, |g| g + 1);
    let mut count = vec![0usize; n_groups];
    for &g in groups {
        count[g] += 1;
    }
    let used = count.iter().filter(|&&c| c > 0).count().max(1);
    groups
        .iter()
        .map(|&g| 1.0 / (used * count[g]) as f32)
        .collect()
}

fn rows(idx: &[usize], device: &burn::tensor::Device) -> Tensor<1, Int> {
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [idx.len()]), device)
}

fn floats(v: Vec<f32>, device: &burn::tensor::Device) -> Tensor<1> {
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// The grouped pairwise loss. rewards: [R] (one per response row); → [1].
pub fn pairwise_loss(rewards: Tensor<1>, terms: &[PairTerm]) -> Tensor<1> {
    let device = rewards.device();
    if terms.is_empty() {
        return rewards.sum().mul_scalar(0.0);
    }
    let a = rewards.clone().select(
        0,
        rows(&terms.iter().map(|t| t.a).collect::<Vec<_>>(), &device),
    );
    let b = rewards.select(
        0,
        rows(&terms.iter().map(|t| t.b).collect::<Vec<_>>(), &device),
    );
    let d = a - b;
    let margin = floats(terms.iter().map(|t| t.margin).collect(), &device);
    let tie = floats(
        terms
            .iter()
            .map(|t| if t.tie { 1.0 } else { 0.0 })
            .collect(),
        &device,
    );
    // −log σ(x) = softplus(−x).
    let preference = softplus((d.clone() - margin).neg(), 1.0);
    let tied = (softplus(d.clone().neg(), 1.0) + softplus(d, 1.0)).mul_scalar(0.5);
    let term = preference * tie.clone().neg().add_scalar(1.0) + tied * tie;
    let w = floats(
        group_weights(&terms.iter().map(|t| t.group).collect::<Vec<_>>()),
        &device,
    );
    (term * w).sum()
}

/// The listwise Plackett–Luce loss. rewards: [R]; → [1].
pub fn listwise_loss(rewards: Tensor<1>, terms: &[ListTerm]) -> Tensor<1> {
    let device = rewards.device();
    if terms.is_empty() {
        return rewards.sum().mul_scalar(0.0);
    }
    let r = rewards.dims()[0];
    let t = terms.len();
    // mask[t, j] = 0 for candidates, a large negative number otherwise.
    let mut mask = vec![-1e9f32; t * r];
    for (k, term) in terms.iter().enumerate() {
        for &j in &term.candidates {
            mask[k * r + j] = 0.0;
        }
    }
    let mask: Tensor<2> = Tensor::from_data(TensorData::new(mask, [t, r]), &device);
    let logits = rewards.clone().unsqueeze_dim::<2>(0).expand([t, r]) + mask;
    let lse = logits.clone().max_dim(1);
    let lse = (logits - lse.clone()).exp().sum_dim(1).log() + lse;
    let item = rewards.select(
        0,
        rows(&terms.iter().map(|t| t.item).collect::<Vec<_>>(), &device),
    );
    let nll = lse.reshape([t]) - item;
    let w = floats(
        group_weights(&terms.iter().map(|t| t.group).collect::<Vec<_>>()),
        &device,
    );
    (nll * w).sum()
}

/// coef · mean(r²) over the rewards. rewards: [R]; → [1].
pub fn centering_loss(rewards: Tensor<1>, coef: f64) -> Tensor<1> {
    rewards.powi_scalar(2).mean().mul_scalar(coef)
}

/// −log σ(x), on the host, for the evaluation's loss.
pub fn neg_log_sigmoid(x: f64) -> f64 {
    if x > 0.0 {
        (-x).exp().ln_1p()
    } else {
        -x + x.exp().ln_1p()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> burn::tensor::Device {
        model::parse_device("cpu").unwrap()
    }

    fn scalar(t: Tensor<1>) -> f32 {
        t.into_scalar::<f32>()
    }

    fn rewards(v: &[f32]) -> Tensor<1> {
        floats(v.to_vec(), &device())
    }

    /// Two groups: K = 3 ranked 1 < 2 < 3 (rows 0..3) and K = 2 (rows 3..5).
    fn terms(margin: bool) -> Vec<PairTerm> {
        let m = |gap: f32| if margin { gap } else { 0.0 };
        vec![
            PairTerm {
                a: 0,
                b: 1,
                margin: m(1.0),
                tie: false,
                group: 0,
            },
            PairTerm {
                a: 0,
                b: 2,
                margin: m(2.0),
                tie: false,
                group: 0,
            },
            PairTerm {
                a: 1,
                b: 2,
                margin: m(1.0),
                tie: false,
                group: 0,
            },
            PairTerm {
                a: 3,
                b: 4,
                margin: m(1.0),
                tie: false,
                group: 1,
            },
        ]
    }

    const R: [f32; 5] = [0.5, -0.25, 1.5, 2.0, -1.0];

    #[test]
    fn grouped_loss_is_the_mean_of_pairwise_losses_taken_one_by_one() {
        let grouped = scalar(pairwise_loss(rewards(&R), &terms(false)));
        // One by one: each pair through its own two-row forward, −log σ(r_a − r_b).
        let one = |a: f32, b: f32| neg_log_sigmoid((a - b) as f64);
        let g0 = (one(R[0], R[1]) + one(R[0], R[2]) + one(R[1], R[2])) / 3.0;
        let g1 = one(R[3], R[4]);
        assert!((grouped as f64 - (g0 + g1) / 2.0).abs() < 1e-6, "{grouped}");
    }

    // import torch, torch.nn.functional as F
    // r = torch.tensor([0.5, -0.25, 1.5, 2.0, -1.0], dtype=torch.float64)
    // def grp(pairs, margins):
    //     return torch.stack([-F.logsigmoid(r[a] - r[b] - m) for (a, b), m in zip(pairs, margins)]).mean()
    // g0 = [(0, 1), (0, 2), (1, 2)]; g1 = [(3, 4)]
    // print(((grp(g0, [0, 0, 0]) + grp(g1, [0])) / 2).item())             # 0.6260198
    // print(((grp(g0, [1, 2, 1]) + grp(g1, [1])) / 2).item())             # 1.1778797 (margins = rank gaps)
    // tie = 0.5 * (-F.logsigmoid(r[0] - r[1]) - F.logsigmoid(r[1] - r[0]))
    // print(((tie + grp(g1, [0])) / 2).item())                          # 0.4052292 (group 0: one tie)
    // def pl(order):   # rows best first
    //     x = r[order]
    //     return -torch.stack([x[i] - torch.logsumexp(x[i:], 0) for i in range(len(order) - 1)]).mean()
    // print(((pl([0, 1, 2]) + pl([3, 4])) / 2).item())                  # 0.8600636
    // print((0.01 * (r ** 2).mean()).item())                            # 0.015125
    #[test]
    fn losses_match_pytorch() {
        let cases = [
            (
                scalar(pairwise_loss(rewards(&R), &terms(false))),
                0.626_019_8,
            ),
            (
                scalar(pairwise_loss(rewards(&R), &terms(true))),
                1.177_879_7,
            ),
            (
                scalar(pairwise_loss(
                    rewards(&R),
                    &[
                        PairTerm {
                            a: 0,
                            b: 1,
                            margin: 0.0,
                            tie: true,
                            group: 0,
                        },
                        PairTerm {
                            a: 3,
                            b: 4,
                            margin: 0.0,
                            tie: false,
                            group: 1,
                        },
                    ],
                )),
                0.405_229_2,
            ),
            (
                scalar(listwise_loss(
                    rewards(&R),
                    &[
                        ListTerm {
                            item: 0,
                            candidates: vec![0, 1, 2],
                            group: 0,
                        },
                        ListTerm {
                            item: 1,
                            candidates: vec![1, 2],
                            group: 0,
                        },
                        ListTerm {
                            item: 3,
                            candidates: vec![3, 4],
                            group: 1,
                        },
                    ],
                )),
                0.860_063_6,
            ),
            (scalar(centering_loss(rewards(&R), 0.01)), 0.015_125),
        ];
        for (i, (got, want)) in cases.iter().enumerate() {
            assert!(
                (got - want).abs() < 1e-5,
                "case {i}: {got} vs PyTorch {want}"
            );
        }
    }

    #[test]
    fn a_tie_term_is_smallest_when_the_rewards_are_equal() {
        let tie = |a: f32, b: f32| {
            scalar(pairwise_loss(
                rewards(&[a, b]),
                &[PairTerm {
                    a: 0,
                    b: 1,
                    margin: 0.0,
                    tie: true,
                    group: 0,
                }],
            ))
        };
        assert!((tie(0.3, 0.3) - std::f32::consts::LN_2).abs() < 1e-6);
        assert!(tie(1.3, 0.3) > tie(0.3, 0.3));
        assert!((tie(1.3, 0.3) - tie(0.3, 1.3)).abs() < 1e-6, "symmetric");
    }
}
