//! `reward agreement DIR --candidates FILE.jsonl`: how often the reward model (or ensemble) orders
//! two candidates of one prompt as a gold scorer does. Each line is `{"prompt_id", "prompt",
//! "response", "gold"[, "kind"]}` (`labeling simulate` writes `heldout_candidates.jsonl` so, for
//! prompts no labeler ranked); every pair of one prompt whose gold scores differ is judged, a
//! reward tie counting half. With `kind`, the pairs are also broken down by the kind of the
//! gold-worse candidate (empty, repeated and refusal-like responses are the ones a policy finds).

use crate::eval::Accuracy;
use crate::{Item, Scorer};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// One scored candidate.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub prompt_id: String,
    pub prompt: String,
    pub response: String,
    pub gold: f64,
    pub kind: Option<String>,
}

/// Reads the candidates; errors name the file, the line and the field.
pub fn read_candidates(path: &Path) -> Result<Vec<Candidate>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the candidates", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| anyhow::anyhow!("{} line {}: {msg}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
        let s = |k: &str| -> Result<String> {
            match v.get(k) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(Value::Number(n)) if k == "prompt_id" => Ok(n.to_string()),
                Some(o) => Err(at(format!("field `{k}`: expected a string, found {o}"))),
                None => Err(at(format!(
                    "field `{k}` is missing; each line is {{\"prompt_id\", \"prompt\", \"response\", \"gold\"}}"
                ))),
            }
        };
        let gold = match v.get("gold") {
            Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
            Some(o) => return Err(at(format!("field `gold`: expected a number, found {o}"))),
            None => return Err(at("field `gold` is missing".into())),
        };
        if !gold.is_finite() {
            return Err(at("field `gold`: not a finite number".into()));
        }
        out.push(Candidate {
            prompt_id: s("prompt_id")?,
            prompt: s("prompt")?,
            response: s("response")?,
            gold,
            kind: v.get("kind").and_then(Value::as_str).map(str::to_string),
        });
    }
    if out.is_empty() {
        bail!("{}: no candidates", path.display());
    }
    Ok(out)
}

/// Agreement with gold, overall and by the kind of the gold-worse candidate.
#[derive(Clone, Debug, Serialize)]
pub struct Agreement {
    pub overall: Accuracy,
    pub prompts: usize,
    pub by_worse_kind: BTreeMap<String, Accuracy>,
    /// Mean reward by candidate kind.
    pub mean_reward_by_kind: BTreeMap<String, f64>,
}

/// Judges every gold-differing pair of each prompt by `rewards` (in `candidates`' order).
pub fn agreement(candidates: &[Candidate], rewards: &[f32]) -> Agreement {
    let mut by_prompt: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, c) in candidates.iter().enumerate() {
        by_prompt.entry(&c.prompt_id).or_default().push(i);
    }
    // (half-points of agreement, pairs)
    let mut total = (0usize, 0usize);
    let mut kinds: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for idx in by_prompt.values() {
        for (a, &i) in idx.iter().enumerate() {
            for &j in &idx[a + 1..] {
                let (ci, cj) = (&candidates[i], &candidates[j]);
                if ci.gold == cj.gold {
                    continue;
                }
                let (better, worse) = if ci.gold > cj.gold { (i, j) } else { (j, i) };
                let half = match rewards[better].partial_cmp(&rewards[worse]) {
                    Some(std::cmp::Ordering::Greater) => 2,
                    Some(std::cmp::Ordering::Equal) => 1,
                    _ => 0,
                };
                total.0 += half;
                total.1 += 1;
                if let Some(k) = &candidates[worse].kind {
                    let e = kinds.entry(k.clone()).or_default();
                    e.0 += half;
                    e.1 += 1;
                }
            }
        }
    }
    let acc = |(h, n): (usize, usize)| {
        let mut a = Accuracy::new(h / 2, n);
        // Ties count half: the rate and interval from the half-points.
        a.accuracy = if n == 0 {
            f64::NAN
        } else {
            h as f64 / (2.0 * n as f64)
        };
        let (lo, hi) = crate::eval::wilson(h as f64 / 2.0, n, 0.95);
        a.low = lo;
        a.high = hi;
        a
    };
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (c, &r) in candidates.iter().zip(rewards) {
        if let Some(k) = &c.kind {
            let e = sums.entry(k.clone()).or_default();
            e.0 += r as f64;
            e.1 += 1;
        }
    }
    Agreement {
        overall: acc(total),
        prompts: by_prompt.len(),
        by_worse_kind: kinds.into_iter().map(|(k, v)| (k, acc(v))).collect(),
        mean_reward_by_kind: sums
            .into_iter()
            .map(|(k, (s, n))| (k, s / n as f64))
            .collect(),
    }
}

/// Scores the candidates with `scorer` and judges them.
pub fn run(scorer: &Scorer, candidates: &[Candidate]) -> Result<Agreement> {
    let items: Vec<Item> = candidates
        .iter()
        .map(|c| Item {
            prompt: &c.prompt,
            response: &c.response,
            answer: None,
        })
        .collect();
    let scores = scorer.score(&items)?;
    Ok(agreement(candidates, &scores.rewards))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(p: &str, gold: f64, kind: &str) -> Candidate {
        Candidate {
            prompt_id: p.into(),
            prompt: p.into(),
            response: kind.into(),
            gold,
            kind: Some(kind.into()),
        }
    }

    #[test]
    fn pairs_with_different_gold_are_judged_ties_half() {
        let cands = vec![
            c("a", 1.0, "correct"),
            c("a", 0.0, "empty"),
            c("a", 0.0, "wrong"),
            c("b", 1.0, "correct"),
            c("b", 0.0, "empty"),
        ];
        // a: correct > empty (right), correct < wrong (wrong); empty vs wrong same gold: not
        // judged. b: a reward tie: half.
        let r = [1.0, 0.0, 2.0, 0.5, 0.5];
        let a = agreement(&cands, &r);
        assert_eq!(a.overall.total, 3);
        assert!((a.overall.accuracy - 1.5 / 3.0).abs() < 1e-12);
        assert_eq!(a.by_worse_kind["empty"].total, 2);
        assert!((a.by_worse_kind["empty"].accuracy - 0.75).abs() < 1e-12);
        assert_eq!(a.by_worse_kind["wrong"].accuracy, 0.0);
        assert!((a.mean_reward_by_kind["correct"] - 0.75).abs() < 1e-12);
        assert_eq!(a.prompts, 2);
    }
}
