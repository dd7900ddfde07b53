//! `reward score DIR --input FILE.jsonl`: one `{"reward": r}` line per input line
//! `{"prompt", "response"}`, in order, through the one [`Scorer`]; normalised with each model's
//! stored offset unless `raw`.

use crate::{Item, Scorer, ScorerOptions, Scores};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// What `score` measured.
pub struct Scored {
    pub scores: Scores,
    pub seconds: f64,
    /// Reward models scored with (members of an ensemble).
    pub members: usize,
}

/// Reads `{"prompt", "response"}` lines; errors name the file, line and field.
pub fn read_inputs(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the input", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{} line {}: not JSON: {e}", path.display(), i + 1))?;
        let field = |k: &str| -> Result<String> {
            match v.get(k) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => bail!(
                    "{} line {}, field `{k}`: expected a string, found {other}",
                    path.display(),
                    i + 1
                ),
                None => bail!(
                    "{} line {}: field `{k}` is missing; each line is {{\"prompt\": ..., \"response\": ...}}",
                    path.display(),
                    i + 1
                ),
            }
        };
        out.push((field("prompt")?, field("response")?));
    }
    Ok(out)
}

/// Scores `inputs` with the reward model (or ensemble) in `dir`, through [`Scorer`].
pub fn score(
    dir: &Path,
    inputs: &[(String, String)],
    options: ScorerOptions,
    device: &burn::tensor::Device,
) -> Result<Scored> {
    let raw = options.raw;
    let scorer = Scorer::load(dir, options, device)?;
    if !raw && let Some(d) = scorer.unnormalized().first() {
        bail!(
            "{}: no reward normalisation stored (rlhf.json); pass --raw for the head's raw output",
            d.display()
        );
    }
    let items = Item::pairs(inputs);
    let start = Instant::now();
    let scores = scorer.score(&items)?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(Scored {
        scores,
        seconds,
        members: scorer.members(),
    })
}

/// Writes one `{"reward": r}` line per response; for an ensemble also each member's reward and
/// their standard deviation (`{"reward", "members", "std"}`).
pub fn write_lines(out: &mut impl Write, scores: &Scores) -> Result<()> {
    let std = scores.member_std();
    for (i, r) in scores.rewards.iter().enumerate() {
        let line = if scores.members.len() > 1 {
            let m: Vec<f32> = scores.members.iter().map(|m| m[i]).collect();
            serde_json::json!({ "reward": r, "members": m, "std": std[i] })
        } else {
            serde_json::json!({ "reward": r })
        };
        writeln!(out, "{line}")?;
    }
    Ok(())
}
