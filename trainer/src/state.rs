//! Training checkpoints: an HF model folder plus `trainer_state/` (step, data position, seed, best
//! validation loss, and the optimizer's moments), written to a temporary folder and renamed, so a
//! crash never leaves half a checkpoint. Keeps the last N and the best by validation loss.

use anyhow::{Context, Result};
use burn::optim::ModuleOptimizer;
use model::checkpoint::{replace_dir, sibling, write_model_files};
use model::{CausalLm, Tokenizer};
use std::path::{Path, PathBuf};

/// Everything besides the weights that a resumed run needs to continue exactly. The data order
/// and dropout masks are functions of `seed` and the position, so they are the RNG state.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: usize,
    /// Examples consumed since the start of training (the position in the data order).
    pub examples_seen: usize,
    pub seed: u64,
    /// Best validation loss so far and its step.
    pub best_val_loss: Option<f64>,
    pub best_step: Option<usize>,
}

pub const STATE_DIR: &str = "trainer_state";

/// Writes `out/checkpoint-{step}` atomically; returns its path.
pub fn save_checkpoint(
    out: &Path,
    model: &CausalLm,
    tokenizer: Option<&Tokenizer>,
    optim: &ModuleOptimizer,
    state: &TrainerState,
) -> Result<PathBuf> {
    let dir = out.join(format!("checkpoint-{:06}", state.step));
    let tmp = sibling(&dir, "tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(tmp.join(STATE_DIR))
        .with_context(|| format!("creating {}", tmp.display()))?;
    write_model_files(model, tokenizer, &tmp)?;
    std::fs::write(
        tmp.join(STATE_DIR).join("state.json"),
        serde_json::to_string_pretty(state)? + "\n",
    )?;
    optim
        .save(tmp.join(STATE_DIR).join("optimizer.bpk"))
        .map_err(|e| anyhow::anyhow!("saving optimizer state: {e:?}"))?;
    replace_dir(&tmp, &dir)?;
    Ok(dir)
}

/// Reads `trainer_state/state.json` of a checkpoint folder.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE_DIR).join("state.json");
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "{}: not a training checkpoint (no {STATE_DIR}/state.json)",
            dir.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid trainer state", p.display()))
}

/// Loads the optimizer moments saved with a checkpoint.
pub fn load_optimizer(dir: &Path, optim: ModuleOptimizer) -> Result<ModuleOptimizer> {
    let p = dir.join(STATE_DIR).join("optimizer.bpk");
    optim
        .load(&p)
        .map_err(|e| anyhow::anyhow!("{}: cannot load optimizer state: {e:?}", p.display()))
}

/// Removes all but the newest `keep` `checkpoint-*` folders in `out`.
pub fn prune_checkpoints(out: &Path, keep: usize) -> Result<()> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-"))
        })
        .collect();
    dirs.sort();
    let n = dirs.len().saturating_sub(keep.max(1));
    for d in &dirs[..n] {
        std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
    }
    Ok(())
}

/// Saves the model as `out/best` (atomically).
pub fn save_best(out: &Path, model: &CausalLm, tokenizer: Option<&Tokenizer>) -> Result<()> {
    model::save(model, tokenizer, &out.join("best"))?;
    Ok(())
}
