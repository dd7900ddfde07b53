//! What several labelers' rankings say together: majority aggregation of their pairwise judgements
//! into [`Comparison`]s, and agreement statistics between labelers: pairwise agreement, Fleiss' κ
//! (raters per item may vary) and Kendall's W. Each labeler's own pairs come from the one pair
//! expansion of the `datasets` crate ([`RankedGroup::pairs`], [`crate::expand_pairs`]), which
//! the votes here are built on too.

use crate::{Comparison, RankedGroup};
use std::collections::{BTreeMap, HashMap};

/// A labeler's verdict on the unordered pair (a, b), a < b by id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Verdict {
    ABetter,
    BBetter,
    Tie,
}

/// (prompt_id, a, b) with a < b → verdicts, one per labeler.
type Votes = BTreeMap<(String, String, String), Vec<(Verdict, f64)>>;

fn votes(groups: &[RankedGroup]) -> Votes {
    let mut v: Votes = BTreeMap::new();
    for g in groups {
        for p in g.pairs(true) {
            let a_first = p.chosen_id < p.rejected_id;
            let verdict = match (p.tie, a_first) {
                (true, _) => Verdict::Tie,
                (false, true) => Verdict::ABetter,
                (false, false) => Verdict::BBetter,
            };
            let (a, b) = if a_first {
                (p.chosen_id, p.rejected_id)
            } else {
                (p.rejected_id, p.chosen_id)
            };
            v.entry((p.prompt_id, a, b))
                .or_default()
                .push((verdict, p.margin.unwrap_or(0.0)));
        }
    }
    v
}

/// Merges the labelers' judgements of each (prompt_id, response pair) by strict majority (more
/// than half the votes). Pairs whose majority is a tie, and pairs with no majority, are dropped;
/// the merged pair's labeler is `majority` and its margin the mean margin of the majority's votes.
/// Returns (pairs, dropped as tie, dropped without majority).
pub fn majority(groups: &[RankedGroup]) -> (Vec<Comparison>, usize, usize) {
    let mut text: HashMap<(&str, &str), &str> = HashMap::new();
    let mut prompts: HashMap<&str, &str> = HashMap::new();
    for g in groups {
        prompts.insert(&g.prompt_id, &g.prompt);
        for (id, t) in g.response_ids.iter().zip(&g.responses) {
            text.insert((&g.prompt_id, id), t);
        }
    }
    let (mut out, mut tied, mut split) = (Vec::new(), 0, 0);
    for ((pid, a, b), vs) in votes(groups) {
        let n = vs.len();
        let winner = [Verdict::ABetter, Verdict::BBetter, Verdict::Tie]
            .into_iter()
            .find(|v| 2 * vs.iter().filter(|x| x.0 == *v).count() > n);
        let (c, r, verdict) = match winner {
            Some(Verdict::ABetter) => (a, b, Verdict::ABetter),
            Some(Verdict::BBetter) => (b, a, Verdict::BBetter),
            Some(Verdict::Tie) => {
                tied += 1;
                continue;
            }
            None => {
                split += 1;
                continue;
            }
        };
        let agreeing: Vec<f64> = vs.iter().filter(|x| x.0 == verdict).map(|x| x.1).collect();
        out.push(Comparison {
            prompt: prompts[pid.as_str()].to_string(),
            chosen: text[&(pid.as_str(), c.as_str())].to_string(),
            rejected: text[&(pid.as_str(), r.as_str())].to_string(),
            prompt_id: pid,
            labeler_id: "majority".into(),
            chosen_id: c,
            rejected_id: r,
            margin: Some(agreeing.iter().sum::<f64>() / agreeing.len() as f64),
            tie: false,
        });
    }
    (out, tied, split)
}

/// Agreement between labelers over the response pairs that ≥ 2 of them judged: the share of
/// labeler pairs that agree (a better / b better / tie), and Fleiss' κ over those three categories
/// with a varying number of raters per item. None when no pair was judged twice.
pub fn agreement(groups: &[RankedGroup]) -> Option<(f64, f64)> {
    let items: Vec<[usize; 3]> = votes(groups)
        .values()
        .filter(|vs| vs.len() >= 2)
        .map(|vs| {
            let mut c = [0usize; 3];
            for (v, _) in vs {
                c[*v as usize] += 1;
            }
            c
        })
        .collect();
    if items.is_empty() {
        return None;
    }
    let (mut agree, mut total) = (0usize, 0usize);
    let mut p_bar = 0.0;
    let mut cat = [0f64; 3];
    let mut ratings = 0f64;
    for c in &items {
        let n: usize = c.iter().sum();
        agree += c.iter().map(|k| k * k.saturating_sub(1) / 2).sum::<usize>();
        total += n * (n - 1) / 2;
        let nf = n as f64;
        p_bar += (c.iter().map(|&k| (k * k) as f64).sum::<f64>() - nf) / (nf * (nf - 1.0));
        for (j, &k) in c.iter().enumerate() {
            cat[j] += k as f64;
        }
        ratings += nf;
    }
    p_bar /= items.len() as f64;
    let p_e: f64 = cat.iter().map(|c| (c / ratings).powi(2)).sum();
    let kappa = if (1.0 - p_e).abs() < 1e-12 {
        // Every rating in one category: agreement is perfect and κ is undefined; report 1.
        1.0
    } else {
        (p_bar - p_e) / (1.0 - p_e)
    };
    Some((agree as f64 / total as f64, kappa))
}

/// Kendall's W (with the correction for ties) of the labelers who ranked the same set of K ≥ 3
/// responses to a prompt, averaged over such sets. None when there is none.
pub fn kendall_w_mean(groups: &[RankedGroup]) -> Option<f64> {
    // (prompt_id, sorted response ids) → each labeler's ranks in that id order.
    let mut sets: BTreeMap<(String, Vec<String>), Vec<Vec<f64>>> = BTreeMap::new();
    for g in groups.iter().filter(|g| g.ranks.len() >= 3) {
        let mut idx: Vec<usize> = (0..g.ranks.len()).collect();
        idx.sort_by(|&a, &b| g.response_ids[a].cmp(&g.response_ids[b]));
        let ids: Vec<String> = idx.iter().map(|&i| g.response_ids[i].clone()).collect();
        let ranks: Vec<u32> = idx.iter().map(|&i| g.ranks[i]).collect();
        sets.entry((g.prompt_id.clone(), ids))
            .or_default()
            .push(average_ranks(&ranks));
    }
    let ws: Vec<f64> = sets
        .values()
        .filter(|raters| raters.len() >= 2)
        .filter_map(|raters| kendall_w(raters))
        .collect();
    if ws.is_empty() {
        None
    } else {
        Some(ws.iter().sum::<f64>() / ws.len() as f64)
    }
}

/// Ranks 1..=n with ties given their average position ("fractional ranking").
pub fn average_ranks(ranks: &[u32]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..ranks.len()).collect();
    order.sort_by_key(|&i| ranks[i]);
    let mut out = vec![0.0; ranks.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && ranks[order[j + 1]] == ranks[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = avg;
        }
        i = j + 1;
    }
    out
}

/// Kendall's W of m raters' fractional ranks of n items, tie-corrected:
/// W = 12 S / (m² (n³ − n) − m Σ T), T = Σ (t³ − t) over each rater's tie groups.
pub fn kendall_w(raters: &[Vec<f64>]) -> Option<f64> {
    let m = raters.len() as f64;
    let n = raters.first()?.len();
    let nf = n as f64;
    let sums: Vec<f64> = (0..n).map(|i| raters.iter().map(|r| r[i]).sum()).collect();
    let mean = sums.iter().sum::<f64>() / nf;
    let s: f64 = sums.iter().map(|r| (r - mean).powi(2)).sum();
    let mut t = 0.0;
    for r in raters {
        let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
        for x in r {
            *counts.entry((x * 2.0) as u64).or_default() += 1;
        }
        t += counts.values().map(|&c| (c.pow(3) - c) as f64).sum::<f64>();
    }
    let denom = m * m * (nf.powi(3) - nf) - m * t;
    if denom <= 0.0 {
        None
    } else {
        Some(12.0 * s / denom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expand_pairs;

    fn j(pid: &str, lab: &str, ids: &[&str], ranks: &[u32]) -> RankedGroup {
        RankedGroup {
            prompt_id: pid.into(),
            prompt: format!("prompt {pid}"),
            labeler_id: lab.into(),
            response_ids: ids.iter().map(|s| s.to_string()).collect(),
            responses: ids.iter().map(|s| format!("text {s}")).collect(),
            ranks: ranks.to_vec(),
            line: 2,
        }
    }

    #[test]
    fn pairs_skip_or_keep_ties() {
        let g = [j("p", "x", &["a", "b", "c", "d"], &[1, 3, 3, 7])];
        let (p, ties) = expand_pairs(&g, false);
        assert_eq!(p.len(), 5);
        assert_eq!(ties, 1);
        assert!(p.iter().all(|x| x.margin.unwrap() > 0.0 && !x.tie));
        let first = &p[0];
        assert_eq!(
            (
                first.chosen_id.as_str(),
                first.rejected_id.as_str(),
                first.margin
            ),
            ("a", "b", Some(2.0))
        );
        let d = p
            .iter()
            .find(|x| x.rejected_id == "d" && x.chosen_id == "b")
            .unwrap();
        assert_eq!(d.margin, Some(4.0));
        let (p, _) = expand_pairs(&g, true);
        assert_eq!(p.len(), 6);
        assert_eq!(p.iter().filter(|x| x.tie).count(), 1);
    }

    #[test]
    fn majority_drops_ties_and_splits() {
        let g = [
            j("p", "x", &["a", "b"], &[1, 2]),
            j("p", "y", &["a", "b"], &[1, 2]),
            j("p", "z", &["a", "b"], &[2, 1]),
            j("q", "x", &["a", "b"], &[1, 1]),
            j("q", "y", &["a", "b"], &[1, 1]),
            j("r", "x", &["a", "b"], &[1, 2]),
            j("r", "y", &["a", "b"], &[2, 1]),
        ];
        let (p, tied, split) = majority(&g);
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].prompt_id.as_str(), p[0].chosen_id.as_str()),
            ("p", "a")
        );
        assert_eq!((tied, split), (1, 1));
    }

    /// Fleiss' κ against the value from the formula worked by hand: 2 items, 3 raters each,
    /// counts [3,0,0] and [2,1,0]: P̄ = (1 + 1/3)/2 = 2/3; p = (5/6, 1/6, 0), Pe = 26/36;
    /// κ = (2/3 − 26/36)/(1 − 26/36) = −0.2.
    #[test]
    fn fleiss_kappa_matches_hand_computation() {
        let g = [
            j("p", "x", &["a", "b"], &[1, 2]),
            j("p", "y", &["a", "b"], &[1, 2]),
            j("p", "z", &["a", "b"], &[1, 2]),
            j("q", "x", &["a", "b"], &[1, 2]),
            j("q", "y", &["a", "b"], &[1, 2]),
            j("q", "z", &["a", "b"], &[2, 1]),
        ];
        let (agree, kappa) = agreement(&g).unwrap();
        // Labeler pairs: item p 3 of 3 agree, item q 1 of 3.
        assert!((agree - 4.0 / 6.0).abs() < 1e-12);
        assert!((kappa + 0.2).abs() < 1e-12, "kappa {kappa}");
    }

    #[test]
    fn kendall_w_is_one_for_identical_rankings_and_low_for_reversed() {
        let same = [
            j("p", "x", &["a", "b", "c"], &[1, 2, 3]),
            j("p", "y", &["a", "b", "c"], &[1, 2, 3]),
        ];
        assert!((kendall_w_mean(&same).unwrap() - 1.0).abs() < 1e-12);
        let reversed = [
            j("p", "x", &["a", "b", "c"], &[1, 2, 3]),
            j("p", "y", &["c", "b", "a"], &[1, 2, 3]),
        ];
        assert!(kendall_w_mean(&reversed).unwrap().abs() < 1e-12);
        // Textbook: 3 raters, 4 items, ranks (1,2,3,4), (2,1,3,4), (1,3,2,4): sums 4,6,8,12,
        // S = 35, W = 12·35 / (9·60) = 0.7778.
        let three = [
            j("p", "x", &["a", "b", "c", "d"], &[1, 2, 3, 4]),
            j("p", "y", &["a", "b", "c", "d"], &[2, 1, 3, 4]),
            j("p", "z", &["a", "b", "c", "d"], &[1, 3, 2, 4]),
        ];
        assert!((kendall_w_mean(&three).unwrap() - 420.0 / 540.0).abs() < 1e-12);
        assert_eq!(average_ranks(&[1, 3, 3, 7]), vec![1.0, 2.5, 2.5, 4.0]);
    }
}
