//! Training checkpoints: HF model folders plus `trainer_state/` (step, data position, seed, data
//! fingerprint, best metric, the stage's own state, and each optimizer's moments), written to a
//! temporary folder and renamed, so a crash never leaves half a checkpoint.
//!
//! A checkpoint holds one or more named models: the first is written at the folder's root (so the
//! checkpoint is itself an HF folder that `transformers` and our stages load), the others in
//! sub-folders named after them (PPO: the policy at the root, `critic/` beside it).

use anyhow::{Context, Result, bail};
use burn::optim::ModuleOptimizer;
use model::checkpoint::{replace_dir, sibling, write_model_files};
use model::{CausalLm, ModelMeta, Tokenizer};
use std::path::{Path, PathBuf};

/// Everything besides the weights that a resumed run needs to continue exactly. The data order
/// and dropout masks are functions of `seed` and the position, so they are the RNG state; a
/// stage with more state (PPO's KL controller, sampling RNG) keeps it in `stage`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// Optimizer steps (or PPO iterations) taken.
    pub step: usize,
    /// Examples consumed since the start of training (the position in the data order).
    pub examples_seen: usize,
    pub seed: u64,
    /// Fingerprint of the training data ([`crate::order::Fingerprint`]).
    #[serde(default)]
    pub data_fingerprint: String,
    /// Best validation metric so far, and its step.
    #[serde(default)]
    pub best_metric: Option<f64>,
    #[serde(default)]
    pub best_step: Option<usize>,
    /// The stage's own state.
    #[serde(default)]
    pub stage: serde_json::Value,
}

pub const STATE_DIR: &str = "trainer_state";

/// One model of a checkpoint: `name` is the sub-folder (the first model goes to the root).
pub struct SavedModel<'a> {
    pub name: &'a str,
    pub model: &'a CausalLm,
    pub tokenizer: Option<&'a Tokenizer>,
    pub meta: &'a ModelMeta,
}

/// Writes `out/checkpoint-{step:06}` atomically; returns its path.
pub fn save_checkpoint(
    out: &Path,
    models: &[SavedModel],
    optimizers: &[(&str, &ModuleOptimizer)],
    state: &TrainerState,
) -> Result<PathBuf> {
    let dir = out.join(format!("checkpoint-{:06}", state.step));
    let tmp = sibling(&dir, "tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(tmp.join(STATE_DIR))
        .with_context(|| format!("creating {}", tmp.display()))?;
    for (i, m) in models.iter().enumerate() {
        let at = if i == 0 {
            tmp.clone()
        } else {
            tmp.join(m.name)
        };
        std::fs::create_dir_all(&at)?;
        write_model_files(m.model, m.tokenizer, m.meta, &at)?;
    }
    std::fs::write(
        tmp.join(STATE_DIR).join("state.json"),
        serde_json::to_string_pretty(state)? + "\n",
    )?;
    for (name, optim) in optimizers {
        optim
            .save(tmp.join(STATE_DIR).join(optimizer_file(name)))
            .map_err(|e| anyhow::anyhow!("saving the {name} optimizer state: {e:?}"))?;
    }
    replace_dir(&tmp, &dir)?;
    Ok(dir)
}

/// `optimizer.bpk` for a stage's one optimizer (`model`), `optimizer-{name}.bpk` for others.
fn optimizer_file(name: &str) -> String {
    if name == "model" {
        "optimizer.bpk".into()
    } else {
        format!("optimizer-{name}.bpk")
    }
}

/// The folder of model `name` in checkpoint `dir` (`first` = the one at the root).
pub fn model_dir(dir: &Path, name: &str, first: bool) -> PathBuf {
    if first {
        dir.to_path_buf()
    } else {
        dir.join(name)
    }
}

/// Checks that `resume`, when given, is a checkpoint of a `stage` run (`sft`, `reward`, `dpo`,
/// `ppo`): a folder with `trainer_state/state.json` whose model that stage wrote (its rlhf.json
/// says so). A stage calls it first, before it loads any model, so that a `final/` or `best/`
/// folder, or another stage's checkpoint, gets this one error instead of whatever its files
/// fail on first (a PPO `final/` has no critic).
pub fn check_checkpoint(resume: Option<&Path>, stage: &str) -> Result<()> {
    let Some(dir) = resume else {
        return Ok(());
    };
    let run_of = |stage: &str| {
        let article = if stage == "sft" || stage.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        format!("{article} {stage} run")
    };
    let not = format!("{} is not a checkpoint of {}", dir.display(), run_of(stage));
    if !dir.is_dir() {
        bail!("{not}: there is no such folder; resume from a checkpoint-NNNNNN folder of the run");
    }
    if !dir.join(STATE_DIR).join("state.json").is_file() {
        let newest = dir
            .parent()
            .and_then(|run| checkpoints(run).ok())
            .and_then(|c| c.last().cloned())
            .map_or(String::new(), |c| {
                format!(" (the newest there: {})", c.display())
            });
        bail!(
            "{not}: it has no {STATE_DIR}/ (a final/ or best/ folder holds the model only); resume from one of its checkpoint-NNNNNN folders{newest}"
        );
    }
    let meta = model::ModelMeta::read(dir)?;
    if let Some(written_by) = meta.stage.filter(|s| s != stage) {
        bail!(
            "{not}: it is a checkpoint of {} (rlhf.json: \"stage\": \"{written_by}\"); resume from a checkpoint-NNNNNN folder of {}, or start a new run from this model",
            run_of(&written_by),
            run_of(stage)
        );
    }
    Ok(())
}

/// Reads `trainer_state/state.json` of a checkpoint folder.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE_DIR).join("state.json");
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "{}: not a training checkpoint (no {STATE_DIR}/state.json); --resume takes a checkpoint-NNNNNN folder of this stage",
            dir.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid trainer state", p.display()))
}

/// Loads optimizer `name`'s moments saved with a checkpoint.
pub fn load_optimizer(dir: &Path, name: &str, optim: ModuleOptimizer) -> Result<ModuleOptimizer> {
    let p = dir.join(STATE_DIR).join(optimizer_file(name));
    optim
        .load(&p)
        .map_err(|e| anyhow::anyhow!("{}: cannot load optimizer state: {e:?}", p.display()))
}

/// Checks that a resumed run has the checkpoint's seed and data; says which differs and how.
pub fn check_resume(dir: &Path, state: &TrainerState, seed: u64, fingerprint: &str) -> Result<()> {
    if state.seed != seed {
        bail!(
            "{}: the checkpoint was trained with seed {} but this run has seed {seed}; an exact resume needs the same seed (--seed {})",
            dir.display(),
            state.seed,
            state.seed
        );
    }
    if !state.data_fingerprint.is_empty() && state.data_fingerprint != fingerprint {
        bail!(
            "{}: the training data differs from the checkpoint's (fingerprint {} vs {fingerprint}); an exact resume needs the same data, split and tokenizer settings",
            dir.display(),
            state.data_fingerprint
        );
    }
    Ok(())
}

/// The `checkpoint-*` folders of `out`, oldest first (their steps are zero-padded).
pub fn checkpoints(out: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-"))
        })
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// Removes all but the newest `keep` `checkpoint-*` folders in `out`.
pub fn prune_checkpoints(out: &Path, keep: usize) -> Result<()> {
    let dirs = checkpoints(out)?;
    let n = dirs.len().saturating_sub(keep.max(1));
    for d in &dirs[..n] {
        std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(seed: u64, fingerprint: &str) -> TrainerState {
        TrainerState {
            step: 10,
            examples_seen: 80,
            seed,
            data_fingerprint: fingerprint.into(),
            best_metric: None,
            best_step: None,
            stage: serde_json::Value::Null,
        }
    }

    #[test]
    fn only_a_checkpoint_of_the_stage_resumes() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let ckpt = run.join("checkpoint-000004");
        std::fs::create_dir_all(ckpt.join(STATE_DIR)).unwrap();
        std::fs::write(ckpt.join(STATE_DIR).join("state.json"), "{}").unwrap();
        std::fs::write(ckpt.join("rlhf.json"), r#"{"stage": "ppo"}"#).unwrap();
        let final_dir = run.join("final");
        std::fs::create_dir_all(&final_dir).unwrap();
        assert!(check_checkpoint(None, "ppo").is_ok());
        assert!(check_checkpoint(Some(&ckpt), "ppo").is_ok());
        let e = check_checkpoint(Some(&final_dir), "ppo")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "{} is not a checkpoint of a ppo run: it has no trainer_state/ (a final/ or best/ folder holds the model only); resume from one of its checkpoint-NNNNNN folders (the newest there: {})",
                final_dir.display(),
                ckpt.display()
            )
        );
        let e = check_checkpoint(Some(&ckpt), "sft")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is not a checkpoint of an sft run: it is a checkpoint of a ppo run"),
            "{e}"
        );
        let e = check_checkpoint(Some(&run.join("nope")), "dpo")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is not a checkpoint of a dpo run: there is no such folder"),
            "{e}"
        );
    }

    #[test]
    fn resume_checks_seed_and_data_and_says_which_differs() {
        let dir = Path::new("out/checkpoint-000010");
        assert!(check_resume(dir, &state(3, "abc"), 3, "abc").is_ok());
        let e = check_resume(dir, &state(3, "abc"), 4, "abc")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("checkpoint-000010") && e.contains("seed 3") && e.contains("--seed 3"),
            "{e}"
        );
        let e = check_resume(dir, &state(3, "abc"), 3, "abd")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("training data differs") && e.contains("abc vs abd"),
            "{e}"
        );
    }
}
