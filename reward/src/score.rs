//! `reward score DIR --input FILE.jsonl`: one `{"reward": r}` line per input line
//! `{"prompt", "response"}`, in order; normalised with the model's stored offset unless `raw`.

use anyhow::{Context, Result, bail};
use model::{Heads, ModelMeta, PromptTemplate};
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// What `score` measured.
pub struct Scored {
    pub rewards: Vec<f32>,
    pub seconds: f64,
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

/// Scores `inputs` with the reward model in `dir`.
pub fn score(
    dir: &Path,
    inputs: &[(String, String)],
    template: Option<&str>,
    batch_size: usize,
    raw: bool,
    device: &burn::tensor::Device,
) -> Result<Scored> {
    let (model, tok, meta): (_, _, ModelMeta) =
        model::checkpoint::load_with_tokenizer(dir, Some(Heads::SCALAR), None, device)?;
    let template = match template {
        Some(t) => PromptTemplate::new(t)?,
        None => model::checkpoint::resolve_template(None, Some(dir))?,
    };
    let mut seqs = Vec::with_capacity(inputs.len());
    for (p, r) in inputs {
        let mut s = tok.encode(&template.render(p))?;
        s.extend(tok.encode(r)?);
        s.push(tok.eos_id);
        seqs.push(s);
    }
    let start = Instant::now();
    let mut rewards = crate::score_sequences(&model, &seqs, batch_size, tok.pad_id)?;
    let seconds = start.elapsed().as_secs_f64();
    if !raw {
        let Some(norm) = &meta.reward_normalization else {
            bail!(
                "{}: no reward normalisation stored (rlhf.json); pass --raw for the head's raw output",
                dir.display()
            );
        };
        for r in rewards.iter_mut() {
            *r = norm.apply(*r);
        }
    }
    Ok(Scored { rewards, seconds })
}

/// Writes one `{"reward": r}` line per reward.
pub fn write_lines(out: &mut impl Write, rewards: &[f32]) -> Result<()> {
    for r in rewards {
        writeln!(out, "{}", serde_json::json!({ "reward": r }))?;
    }
    Ok(())
}
