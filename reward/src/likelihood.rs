//! The SFT model's likelihood as a term of the reward: r(x, y) = head(x, y) + α · ℓ̄(y | x), with
//! ℓ̄ the mean log-probability per token of the response and its EOS under a frozen causal LM
//! (the SFT model the reward model was started from), α = `model.likelihood_coef`.
//!
//! Why: a small reward model trained on a few hundred ranked prompts learns the response's form
//! (empty, refused, repeated, badly formatted) but hardly its content, which the SFT model, trained
//! on every demonstration, knows much better: on the task suite the SFT likelihood alone orders
//! right above nearly right or wrong answers for 67–97% of held-out pairs, where the reward head
//! alone is at 47–73% (README, "Reward models against gold"). The head is trained with the term in
//! place, so it learns what the likelihood does not already say (form, refusals), and the ranking
//! loss sees the sum. The idea is the one behind DPO's and SimPO's implicit rewards (a policy's
//! log-likelihood ranks responses); here the likelihood is a fixed feature of a conventional
//! reward model rather than the thing trained.
//!
//! Stored with the reward model: `likelihood.json` ({"coef": α, "model": "likelihood"}) and a copy
//! of the causal-LM folder in `likelihood/`. The head alone is still an HF
//! `*ForSequenceClassification` folder that transformers loads (its scores then lack the term);
//! [`crate::Scorer`] (ppo, evaluate, `reward score`, `reward serve`) adds it.

use crate::sequence_logprobs;
use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use model::{CausalLm, Heads, Tokenizer, WeightDtype};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The manifest stored in a reward-model folder whose reward has the likelihood term.
pub const FILE: &str = "likelihood.json";
/// The folder (inside the reward-model folder) holding the causal LM.
pub const DIR: &str = "likelihood";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// α: the term is α times the mean log-probability per response token.
    pub coef: f64,
    /// The causal-LM folder, relative to the reward-model folder.
    pub model: String,
}

/// A frozen causal LM and the weight of its mean log-likelihood in the reward.
pub struct Likelihood {
    pub model: CausalLm,
    pub coef: f64,
    /// The folder it was loaded from.
    pub dir: PathBuf,
}

impl Likelihood {
    /// The causal LM of folder `dir` (dropout off), with weight `coef`; its tokenizer must have
    /// the reward model's vocabulary.
    pub fn load(
        dir: &Path,
        coef: f64,
        tokenizer: &Tokenizer,
        dtype: WeightDtype,
        device: &Device,
    ) -> Result<Self> {
        let (model, tok, _) =
            model::checkpoint::load_with_tokenizer(dir, Some(Heads::LM), None, device)
                .with_context(|| format!("likelihood model {}", dir.display()))?;
        if tok.vocab_size() != tokenizer.vocab_size() {
            bail!(
                "likelihood model {}: its tokenizer has {} tokens and the reward model's {}; the likelihood model must share the reward model's tokenizer (set model.likelihood_coef = 0, or use the SFT folder the reward model starts from)",
                dir.display(),
                tok.vocab_size(),
                tokenizer.vocab_size()
            );
        }
        Ok(Self {
            model: model.with_dropout(0.0).keep_frozen(dtype),
            coef,
            dir: dir.to_path_buf(),
        })
    }

    /// The likelihood term stored with the reward-model folder `rm_dir`, if it has one.
    pub fn stored(
        rm_dir: &Path,
        tokenizer: &Tokenizer,
        dtype: WeightDtype,
        device: &Device,
    ) -> Result<Option<Self>> {
        let Some(m) = read_manifest(rm_dir)? else {
            return Ok(None);
        };
        Self::load(&rm_dir.join(&m.model), m.coef, tokenizer, dtype, device).map(Some)
    }

    /// α · ℓ̄ of each sequence (template(prompt) ++ response ++ EOS, whose first `prompt_lens`
    /// tokens are the prompt), `batch` sequences per forward, no gradients.
    pub fn terms(
        &self,
        seqs: &[Vec<u32>],
        prompt_lens: &[usize],
        batch: usize,
        pad: u32,
    ) -> Result<Vec<f32>> {
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i].len());
        let mut out = vec![0f32; seqs.len()];
        for chunk in order.chunks(batch.max(1)) {
            let rows: Vec<Vec<u32>> = chunk.iter().map(|&i| seqs[i].clone()).collect();
            let lens: Vec<usize> = chunk.iter().map(|&i| prompt_lens[i]).collect();
            let lp = model::ops::to_f32_vec(sequence_logprobs(&self.model, &rows, &lens, pad)?);
            for ((&i, v), (r, &p)) in chunk.iter().zip(lp).zip(rows.iter().zip(&lens)) {
                let n = r.len().saturating_sub(p.max(1)).max(1);
                out[i] = (self.coef * v as f64 / n as f64) as f32;
            }
        }
        Ok(out)
    }

    /// Writes the term into the reward-model folder `rm_dir` being built (the caller renames the
    /// folder into place): a copy of the causal-LM folder in `likelihood/` and the manifest.
    pub fn write_into(&self, rm_dir: &Path) -> Result<()> {
        copy_dir(&self.dir, &rm_dir.join(DIR))?;
        let m = Manifest {
            coef: self.coef,
            model: DIR.into(),
        };
        let p = rm_dir.join(FILE);
        std::fs::write(&p, serde_json::to_string_pretty(&m)? + "\n")
            .with_context(|| format!("writing {}", p.display()))
    }
}

/// The manifest of `rm_dir`, None when its reward has no likelihood term.
pub fn read_manifest(rm_dir: &Path) -> Result<Option<Manifest>> {
    let p = rm_dir.join(FILE);
    match std::fs::read_to_string(&p) {
        Ok(text) => {
            let m: Manifest = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{}: not a likelihood manifest (expected {{\"coef\": number, \"model\": \"likelihood\"}})",
                    p.display()
                )
            })?;
            if !m.coef.is_finite() {
                bail!("{}: `coef` must be a finite number", p.display());
            }
            Ok(Some(m))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", p.display())),
    }
}

/// Copies a folder's files and sub-folders.
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("{}", from.display()))? {
        let e = e?;
        let kind = e.file_type()?;
        if kind.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else if kind.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name()))
                .with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}
