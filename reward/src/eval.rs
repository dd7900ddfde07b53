//! Validation of a reward model on held-out groups: pairwise accuracy with a 95% Wilson interval,
//! accuracy by K, by rank gap and by labeler, the mean margin r_better − r_worse, the loss, and,
//! where several labelers ranked the same prompts, the human ceiling beside it: how often one
//! labeler agrees with another on the same pair.

use crate::data::Group;
use crate::loss::neg_log_sigmoid;
use serde::Serialize;
use statrs::distribution::{ContinuousCDF, Normal};
use std::collections::{BTreeMap, HashMap};

/// An accuracy with its 95% Wilson score interval (Wilson 1927).
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    pub low: f64,
    pub high: f64,
}

impl Accuracy {
    pub fn new(correct: usize, total: usize) -> Self {
        let (low, high) = wilson(correct as f64, total, 0.95);
        Self {
            correct,
            total,
            accuracy: if total == 0 {
                f64::NAN
            } else {
                correct as f64 / total as f64
            },
            low,
            high,
        }
    }
}

/// The Wilson score interval of `k` successes in `n` trials at `level` (e.g. 0.95); `k` may be
/// fractional (a win rate counting ties as half). (0, 1) for no trials.
pub fn wilson(k: f64, n: usize, level: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = Normal::new(0.0, 1.0)
        .expect("standard normal")
        .inverse_cdf(0.5 + level / 2.0);
    let (n, p) = (n as f64, k / n as f64);
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Validation {
    /// Over every non-tied pair of every validation group (each labeler's judgement counts).
    pub pairwise: Accuracy,
    pub by_k: BTreeMap<String, Accuracy>,
    /// By rank gap: "1", "2", "3+".
    pub by_rank_gap: BTreeMap<String, Accuracy>,
    pub by_labeler: BTreeMap<String, Accuracy>,
    /// Mean of r_better − r_worse over the non-tied pairs.
    pub mean_margin: f64,
    /// Mean pairwise loss per group (no margin, ties as in training).
    pub loss: f64,
    /// How often another labeler agrees with a labeler's judgement of the same pair, where
    /// several labelers ranked a prompt; None when no pair was judged twice.
    pub human_ceiling: Option<Accuracy>,
    /// The model's accuracy on those same judgements, for comparison with the ceiling.
    pub model_on_ceiling_pairs: Option<Accuracy>,
}

/// Metrics of `rewards` (one per sequence of each group, in order) on `groups`.
pub fn validate(groups: &[Group], rewards: &[Vec<f32>]) -> Validation {
    let mut all = (0, 0);
    let mut by_k: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut by_gap: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut by_labeler: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let (mut margin_sum, mut loss_sum) = (0.0f64, 0.0f64);
    let mut loss_groups = 0;
    // (prompt_id, lower id, higher id) → [(labeler, verdict: +1 lower better, −1, 0 tie, model correct)]
    type Key = (String, String, String);
    let mut judged: HashMap<Key, Vec<(String, i8, bool)>> = HashMap::new();
    for (g, r) in groups.iter().zip(rewards) {
        let mut group_loss = (0.0, 0);
        for i in 0..g.k() {
            for j in i + 1..g.k() {
                let (ri, rj) = (g.ranks[i], g.ranks[j]);
                let (lo, hi) = if g.response_ids[i] <= g.response_ids[j] {
                    (i, j)
                } else {
                    (j, i)
                };
                let verdict = match g.ranks[lo].cmp(&g.ranks[hi]) {
                    std::cmp::Ordering::Less => 1,
                    std::cmp::Ordering::Greater => -1,
                    std::cmp::Ordering::Equal => 0,
                };
                // Every judgement of the pair, for the human ceiling; the model's verdict is
                // right when the better response scores higher.
                let (b, w) = if ri <= rj { (i, j) } else { (j, i) };
                let d = (r[b] - r[w]) as f64;
                let ok = d > 0.0;
                judged
                    .entry((
                        g.prompt_id.clone(),
                        g.response_ids[lo].clone(),
                        g.response_ids[hi].clone(),
                    ))
                    .or_default()
                    .push((g.labeler_id.clone(), verdict, ok));
                if ri == rj {
                    group_loss.0 += 0.5 * (neg_log_sigmoid(d) + neg_log_sigmoid(-d));
                    group_loss.1 += 1;
                    continue;
                }
                margin_sum += d;
                group_loss.0 += neg_log_sigmoid(d);
                group_loss.1 += 1;
                let add = |m: &mut BTreeMap<String, (usize, usize)>, k: String| {
                    let e = m.entry(k).or_default();
                    e.0 += ok as usize;
                    e.1 += 1;
                };
                all.0 += ok as usize;
                all.1 += 1;
                add(&mut by_k, g.k().to_string());
                let gap = ri.abs_diff(rj);
                add(
                    &mut by_gap,
                    if gap >= 3 {
                        "3+".into()
                    } else {
                        gap.to_string()
                    },
                );
                add(&mut by_labeler, g.labeler_id.clone());
            }
        }
        if group_loss.1 > 0 {
            loss_sum += group_loss.0 / group_loss.1 as f64;
            loss_groups += 1;
        }
    }
    // Human ceiling: each non-tied judgement against every other labeler's on the same pair.
    let (mut agree, mut pairs, mut model_ok, mut model_n) = (0, 0, 0, 0);
    for votes in judged.values() {
        for (a, (la, va, ok)) in votes.iter().enumerate() {
            if *va == 0 {
                continue;
            }
            let others: Vec<i8> = votes
                .iter()
                .enumerate()
                .filter(|(b, (lb, _, _))| *b != a && lb != la)
                .map(|(_, (_, vb, _))| *vb)
                .collect();
            if others.is_empty() {
                continue;
            }
            for vb in &others {
                agree += (vb == va) as usize;
                pairs += 1;
            }
            model_ok += *ok as usize;
            model_n += 1;
        }
    }
    let acc = |m: BTreeMap<String, (usize, usize)>| {
        m.into_iter()
            .map(|(k, (c, n))| (k, Accuracy::new(c, n)))
            .collect()
    };
    Validation {
        pairwise: Accuracy::new(all.0, all.1),
        by_k: acc(by_k),
        by_rank_gap: acc(by_gap),
        by_labeler: acc(by_labeler),
        mean_margin: margin_sum / all.1.max(1) as f64,
        loss: loss_sum / loss_groups.max(1) as f64,
        human_ceiling: (pairs > 0).then(|| Accuracy::new(agree, pairs)),
        model_on_ceiling_pairs: (model_n > 0).then(|| Accuracy::new(model_ok, model_n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_interval_matches_the_textbook_values() {
        // 81 of 100, 95%: (0.72221, 0.87485) (e.g. statsmodels proportion_confint(81, 100, method="wilson")).
        let (lo, hi) = wilson(81.0, 100, 0.95);
        assert!(
            (lo - 0.722_2).abs() < 1e-4 && (hi - 0.874_85).abs() < 1e-4,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson(0.0, 10, 0.95);
        assert!(lo.abs() < 1e-12 && (hi - 0.277_5).abs() < 1e-4, "{lo} {hi}");
    }

    fn group(labeler: &str, ranks: Vec<u32>) -> Group {
        Group {
            prompt_id: "p".into(),
            labeler_id: labeler.into(),
            origin: "line 1".into(),
            response_ids: (1..=ranks.len()).map(|i| i.to_string()).collect(),
            sequences: vec![vec![1]; ranks.len()],
            prompt_lens: vec![1; ranks.len()],
            ranks,
            data_margin: None,
            prior: Vec::new(),
        }
    }

    #[test]
    fn accuracy_breakdowns_and_the_human_ceiling() {
        // Rewards order the responses 1 > 2 > 3.
        let r = vec![1.0f32, 0.0, -1.0];
        let a = group("a", vec![1, 2, 3]); // agrees with the rewards on all 3 pairs
        let b = group("b", vec![2, 1, 3]); // swaps 1 and 2: 2 of 3 right
        let v = validate(&[a, b], &[r.clone(), r]);
        assert_eq!((v.pairwise.correct, v.pairwise.total), (5, 6));
        assert_eq!(v.by_labeler["a"].correct, 3);
        assert_eq!(v.by_labeler["b"].correct, 2);
        // Gap 1 pairs: a (1,2) ok, a (2,3) ok, b (1,2) wrong, b (1,3) ok → 3 of 4; gap 2: 2 of 2.
        assert_eq!(
            (v.by_rank_gap["1"].correct, v.by_rank_gap["1"].total),
            (3, 4)
        );
        assert_eq!(
            (v.by_rank_gap["2"].correct, v.by_rank_gap["2"].total),
            (2, 2)
        );
        assert_eq!(v.by_k["3"].total, 6);
        // The labelers agree on (1,3) and (2,3), not on (1,2): 4 of 6 directed comparisons.
        let c = v.human_ceiling.unwrap();
        assert_eq!((c.correct, c.total), (4, 6));
        assert!((v.mean_margin - (1.0 + 2.0 + 1.0 - 1.0 + 2.0 + 1.0) / 6.0).abs() < 1e-9);
    }
}
