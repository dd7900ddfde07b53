//! The preference types of the whole pipeline, shared by the readers here, the adapters and the
//! `labeling` crate: a [`RankedGroup`] (one labeler's ranking of K ≥ 2 responses to one prompt)
//! and a [`Comparison`] (one pairwise judgement, possibly a tie), and the one expansion of ranked
//! groups into pairs ([`RankedGroup::pairs`], [`expand_pairs`]): each of the K choose 2 pairs is a
//! training example, as in InstructGPT. Labelers' rankings arrive as CSV ([`rankings`]:
//! long or wide, every rule checked) and several labelers' judgements are combined or compared
//! in [`pairs`] (majority, agreement, Kendall's W), so that every stage reads them the same way.

pub mod pairs;
pub mod rankings;

/// One pairwise judgement (reward model): `chosen` is better than `rejected`, unless `tie`.
///
/// A tie (`tie == true`) is not a preference: `chosen` and `rejected` are just the two responses
/// in their group's order and `margin` is `Some(0.0)`; whoever trains on comparisons must drop or
/// handle ties rather than treat them as preferences.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Comparison {
    /// Empty when unknown.
    #[serde(default)]
    pub prompt_id: String,
    pub prompt: String,
    /// Empty for an anonymous labeler; `majority` for a pair merged from several labelers.
    #[serde(default)]
    pub labeler_id: String,
    /// Empty when unknown.
    #[serde(default)]
    pub chosen_id: String,
    pub chosen: String,
    /// Empty when unknown.
    #[serde(default)]
    pub rejected_id: String,
    pub rejected: String,
    /// How much better `chosen` is (e.g. a rank difference; 0 for a tie); None when unknown.
    #[serde(default)]
    pub margin: Option<f64>,
    /// The labeler ranked both responses equal.
    #[serde(default)]
    pub tie: bool,
}

/// K ≥ 2 responses to one prompt ranked by one labeler; rank 1 = best, equal ranks = tie.
///
/// `response_ids`, `responses` and `ranks` hold one entry per response, in the same order.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RankedGroup {
    pub prompt_id: String,
    pub prompt: String,
    /// Empty for an anonymous labeler.
    #[serde(default)]
    pub labeler_id: String,
    /// Unique within the group; "1".."K" when the source names none.
    pub response_ids: Vec<String>,
    pub responses: Vec<String>,
    pub ranks: Vec<u32>,
    /// Line (or Parquet row) of its source file where the group starts; 0 if unknown.
    #[serde(default)]
    pub line: usize,
}

impl RankedGroup {
    /// Every pair i < j of the group, better first, with margin = rank difference. Tied pairs are
    /// kept only if `keep_ties`, with `tie = true`, margin 0 and the two responses in group order.
    pub fn pairs(&self, keep_ties: bool) -> Vec<Comparison> {
        let n = self.responses.len();
        let mut out = Vec::with_capacity(n * n.saturating_sub(1) / 2);
        for i in 0..n {
            for j in i + 1..n {
                let (ri, rj) = (self.ranks[i], self.ranks[j]);
                let tie = ri == rj;
                if tie && !keep_ties {
                    continue;
                }
                let (c, r) = if ri <= rj { (i, j) } else { (j, i) };
                out.push(Comparison {
                    prompt_id: self.prompt_id.clone(),
                    prompt: self.prompt.clone(),
                    labeler_id: self.labeler_id.clone(),
                    chosen_id: self.response_ids[c].clone(),
                    chosen: self.responses[c].clone(),
                    rejected_id: self.response_ids[r].clone(),
                    rejected: self.responses[r].clone(),
                    margin: Some(ri.abs_diff(rj) as f64),
                    tie,
                });
            }
        }
        out
    }
}

/// [`RankedGroup::pairs`] of every group, in order. Returns the pairs and the number of tied pairs
/// seen (kept or not).
pub fn expand_pairs(groups: &[RankedGroup], keep_ties: bool) -> (Vec<Comparison>, usize) {
    let mut out = Vec::new();
    let mut ties = 0;
    for g in groups {
        let pairs = g.pairs(true);
        ties += pairs.iter().filter(|c| c.tie).count();
        out.extend(pairs.into_iter().filter(|c| keep_ties || !c.tie));
    }
    (out, ties)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(ranks: &[u32]) -> RankedGroup {
        let ids: Vec<String> = (1..=ranks.len()).map(|i| i.to_string()).collect();
        RankedGroup {
            prompt_id: "p".into(),
            prompt: "q".into(),
            labeler_id: "x".into(),
            responses: ids.iter().map(|i| format!("text {i}")).collect(),
            response_ids: ids,
            ranks: ranks.to_vec(),
            line: 2,
        }
    }

    #[test]
    fn pairs_put_the_better_first_and_keep_ties_only_when_asked() {
        let g = group(&[2, 1, 2]);
        let p = g.pairs(false);
        // (2 > 1) and (2 > 3); 1 = 3 is a tie.
        assert_eq!(p.len(), 2);
        assert!(
            p.iter()
                .all(|c| c.chosen_id == "2" && c.margin == Some(1.0) && !c.tie)
        );
        assert_eq!(
            (p[0].rejected_id.as_str(), p[1].rejected.as_str()),
            ("1", "text 3")
        );
        let p = g.pairs(true);
        assert_eq!(p.len(), 3);
        let t: Vec<_> = p.iter().filter(|c| c.tie).collect();
        assert_eq!(t.len(), 1);
        assert_eq!(
            (
                t[0].chosen_id.as_str(),
                t[0].rejected_id.as_str(),
                t[0].margin
            ),
            ("1", "3", Some(0.0))
        );
        let (all, ties) = expand_pairs(&[g.clone(), group(&[1, 1])], false);
        assert_eq!((all.len(), ties), (2, 2));
        let (all, ties) = expand_pairs(&[g, group(&[1, 1])], true);
        assert_eq!((all.len(), ties), (4, 2));
    }
}
