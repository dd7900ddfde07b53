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

/// Writes `out/checkpoint-{step:06}` atomically; returns its path. The files go into
/// `out/.checkpoint-{step:06}.tmp`, renamed into place once all are written; when a write fails
/// (a full disk), the temporary folder is removed and the error names the file, so the run's
/// earlier checkpoints are all that is left, intact.
pub fn save_checkpoint(
    out: &Path,
    models: &[SavedModel],
    optimizers: &[(&str, &ModuleOptimizer)],
    state: &TrainerState,
) -> Result<PathBuf> {
    let dir = out.join(format!("checkpoint-{:06}", state.step));
    let tmp = sibling(&dir, "tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let written = write_checkpoint_files(&tmp, models, optimizers, state)
        .and_then(|()| replace_dir(&tmp, &dir).map_err(anyhow::Error::from));
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "writing checkpoint {} (nothing of it was kept)",
            dir.display()
        )));
    }
    Ok(dir)
}

/// The files of a checkpoint, written into the folder `tmp`.
fn write_checkpoint_files(
    tmp: &Path,
    models: &[SavedModel],
    optimizers: &[(&str, &ModuleOptimizer)],
    state: &TrainerState,
) -> Result<()> {
    let state_dir = tmp.join(STATE_DIR);
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    for (i, m) in models.iter().enumerate() {
        let at = model_dir(tmp, m.name, i == 0);
        std::fs::create_dir_all(&at).with_context(|| format!("creating {}", at.display()))?;
        write_model_files(m.model, m.tokenizer, m.meta, &at)?;
    }
    let state_file = state_dir.join("state.json");
    std::fs::write(&state_file, serde_json::to_string_pretty(state)? + "\n")
        .with_context(|| format!("writing {}", state_file.display()))?;
    for (name, optim) in optimizers {
        let p = state_dir.join(optimizer_file(name));
        optim.save(&p).map_err(|e| {
            anyhow::anyhow!("{}: saving the {name} optimizer state: {e:?}", p.display())
        })?;
    }
    Ok(())
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
/// fail on first (a PPO `final/` has no critic). A damaged checkpoint is refused here too, each
/// time naming the file and what to do: a `state.json` that does not parse, has the wrong types
/// or a step other than its folder's, a missing or unreadable optimizer file, or one whose
/// parameters are not those of the checkpoint's model (see [`check_optimizer_file`]).
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
    let state_file = dir.join(STATE_DIR).join("state.json");
    if !state_file.is_file() {
        if dir.join(STATE_DIR).is_dir() {
            bail!(
                "{}: missing: the checkpoint is incomplete; {}",
                state_file.display(),
                what_to_do(dir)
            );
        }
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
    load_state(dir)?;
    // The weights of each model of the checkpoint (the first at its root, the others in
    // sub-folders), from their headers: a truncated file is named before anything loads.
    let sub_models = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file());
    for folder in std::iter::once(dir.to_path_buf()).chain(sub_models) {
        model::weights::tensor_shapes(&folder)
            .map_err(|e| anyhow::anyhow!("{e}; the checkpoint is damaged: {}", what_to_do(dir)))?;
    }
    // The optimizers each stage saves: its one model's, or PPO's policy and (with a value
    // model) critic; an unknown stage's are checked when they load.
    let optimizers: &[&str] = match stage {
        "sft" | "reward" | "dpo" => &["model"],
        "ppo" if dir.join("critic").is_dir() => &["policy", "critic"],
        "ppo" => &["policy"],
        _ => &[],
    };
    for name in optimizers {
        check_optimizer_file(dir, name)?;
    }
    Ok(())
}

/// What to do about a damaged checkpoint `dir`: resume from another of the run (the newest
/// other one there, when there is one), or start again.
fn what_to_do(dir: &Path) -> String {
    let other = dir
        .parent()
        .and_then(|run| checkpoints(run).ok())
        .and_then(|c| c.into_iter().rev().find(|c| c.as_path() != dir));
    match other {
        Some(c) => format!(
            "resume from another checkpoint of the run (the newest other one: {}), or start a new run without --resume",
            c.display()
        ),
        None => "resume from another checkpoint-NNNNNN folder of the run, or start a new run without --resume".into(),
    }
}

/// Reads `trainer_state/state.json` of a checkpoint folder. A file that does not parse, has the
/// wrong types, or whose step is not the one in the folder's name (`checkpoint-NNNNNN`) is an
/// error naming it.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE_DIR).join("state.json");
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "{}: not a training checkpoint (no {STATE_DIR}/state.json); --resume takes a checkpoint-NNNNNN folder of this stage",
            dir.display()
        )
    })?;
    let mut json = serde_json::Deserializer::from_str(&text);
    let state: TrainerState = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." {
            String::new()
        } else {
            format!("key `{key}`: ")
        };
        anyhow::anyhow!(
            "{}: invalid trainer state ({key}{}); the file was edited or damaged: {}",
            p.display(),
            e.into_inner(),
            what_to_do(dir)
        )
    })?;
    let folder_step = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("checkpoint-"))
        .and_then(|n| n.parse::<usize>().ok());
    if let Some(folder_step) = folder_step
        && folder_step != state.step
    {
        bail!(
            "{}: \"step\" is {} but the folder is the checkpoint of step {folder_step}; the file was edited or belongs to another checkpoint: {}",
            p.display(),
            state.step,
            what_to_do(dir)
        );
    }
    Ok(state)
}

/// Loads optimizer `name`'s moments saved with a checkpoint, after [`check_optimizer_file`].
pub fn load_optimizer(dir: &Path, name: &str, optim: ModuleOptimizer) -> Result<ModuleOptimizer> {
    check_optimizer_file(dir, name)?;
    let p = dir.join(STATE_DIR).join(optimizer_file(name));
    optim.load(&p).map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot load optimizer state: {e:?}; {}",
            p.display(),
            what_to_do(dir)
        )
    })
}

/// Checks optimizer `name`'s file of checkpoint `dir` from its header alone (no moments are
/// read): it is there and readable, every parameter's state is whole (AdamW's two moments of
/// one shape and its step count), and the parameters are those of the model saved beside it
/// (`dir/name/` when that folder exists, else `dir`): each one's tensor is in that model's
/// safetensors with a shape that fits, and they hold as many values as the model. burn would
/// otherwise load a foreign file silently (states it cannot rebuild are dropped and started
/// fresh) and fail on the first step with a shape panic.
pub fn check_optimizer_file(dir: &Path, name: &str) -> Result<()> {
    let p = dir.join(STATE_DIR).join(optimizer_file(name));
    if !p.is_file() {
        bail!(
            "{}: missing: the checkpoint has no state for its {name} optimizer and is incomplete; {}",
            p.display(),
            what_to_do(dir)
        );
    }
    let bad = |msg: String| {
        anyhow::anyhow!(
            "{}: {msg}; the file is damaged or comes from another model or run: {}",
            p.display(),
            what_to_do(dir)
        )
    };
    let reader = burn_pack::Reader::from_file_exact(&p)
        .map_err(|e| bad(format!("not a readable optimizer state file ({e})")))?;
    let scalars = reader.scalars().clone();
    let tensors = reader
        .into_tensors()
        .map_err(|e| bad(format!("not a readable optimizer state file ({e})")))?;
    // Parameter id → (its moments' shape, how many moments).
    let mut params: std::collections::BTreeMap<u64, (Vec<usize>, usize)> = Default::default();
    for t in &tensors {
        let Some(id) = t.param_id else {
            return Err(bad(format!("tensor `{}` has no parameter id", t.name)));
        };
        let shape = t.shape.as_slice().to_vec();
        if !t.name.starts_with(&format!("{id}.")) {
            return Err(bad(format!(
                "tensor `{}` is not named after its parameter {id}",
                t.name
            )));
        }
        let entry = params.entry(id).or_insert_with(|| (shape.clone(), 0));
        if entry.0 != shape {
            return Err(bad(format!(
                "the moments of parameter {id} have shapes {:?} and {shape:?}",
                entry.0
            )));
        }
        entry.1 += 1;
    }
    for (id, (_, moments)) in &params {
        let has = |leaf: &str| {
            scalars
                .keys()
                .any(|k| k.starts_with(&format!("{id}.")) && k.ends_with(leaf))
        };
        if *moments < 2 || !has("time") {
            return Err(bad(format!(
                "the state of parameter {id} is incomplete (AdamW keeps two moments and a step count)"
            )));
        }
    }
    let model_dir = if dir.join(name).join("config.json").is_file() {
        dir.join(name)
    } else {
        dir.to_path_buf()
    };
    // A model trained with LoRA: only its adapter's tensors (in adapter/) have optimizer state.
    let adapter = model_dir
        .join(model::lora::ADAPTER_DIR)
        .join(model::lora::ADAPTER_WEIGHTS);
    let weights = if adapter.is_file() {
        model::weights::file_tensor_shapes(&adapter)?
            .into_iter()
            .map(|(n, s)| {
                let n = n
                    .strip_prefix(model::lora::PEFT_PREFIX)
                    .unwrap_or(&n)
                    .to_string();
                (n, s)
            })
            .collect()
    } else {
        model::weights::tensor_shapes(&model_dir)?
    };
    let by_id: std::collections::HashMap<u64, (&str, &[usize])> = weights
        .iter()
        .map(|(n, s)| (model::weights::stable_id(n), (n.as_str(), s.as_slice())))
        .collect();
    let model_files = model_dir.join("model.safetensors");
    let foreign = |msg: String| {
        anyhow::anyhow!(
            "{}: the optimizer state does not belong to the model of the checkpoint ({}): {msg}; the file comes from another model or run: {}",
            p.display(),
            model_files.display(),
            what_to_do(dir)
        )
    };
    let numel = |s: &[usize]| s.iter().fold(1u128, |a, &d| a.saturating_mul(d as u128));
    let (mut state_values, mut model_values) = (0u128, 0u128);
    for (id, (shape, _)) in &params {
        let Some((tensor, hf)) = by_id.get(id) else {
            return Err(foreign(format!(
                "it holds the state of a parameter ({id}) that the model does not have"
            )));
        };
        // A parameter is stored [in, out] (burn) from one or several HF tensors (q|k|v and
        // gate|up are fused along `out`): the first of them, `tensor`, is [out, in] or [in, out].
        let fits = match (shape.as_slice(), *hf) {
            ([a], [h0]) => a >= h0,
            ([a, b], [h0, h1]) => (a == h1 && b >= h0) || (a == h0 && b >= h1),
            _ => false,
        };
        if !fits {
            return Err(foreign(format!(
                "the state of `{tensor}` has shape {shape:?}, which does not fit the model's {hf:?}"
            )));
        }
        state_values = state_values.saturating_add(numel(shape));
    }
    for (_, s) in &weights {
        model_values = model_values.saturating_add(numel(s));
    }
    if state_values != model_values {
        return Err(foreign(format!(
            "it holds the state of {state_values} values for a model of {model_values}"
        )));
    }
    Ok(())
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

/// Removes all but the newest `keep` `checkpoint-*` folders in `out`. Each is first renamed to
/// `.checkpoint-NNNNNN.old` and then removed, so a run killed while removing one never leaves a
/// half-removed folder under a checkpoint's name; such leftovers are removed the next time.
pub fn prune_checkpoints(out: &Path, keep: usize) -> Result<()> {
    let dirs = checkpoints(out)?;
    let n = dirs.len().saturating_sub(keep.max(1));
    for d in &dirs[..n] {
        let old = sibling(d, "old");
        std::fs::rename(d, &old).with_context(|| format!("removing {}", d.display()))?;
    }
    for e in std::fs::read_dir(out)?.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".checkpoint-") && name.ends_with(".old") {
            let p = e.path();
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
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
        // The stage matches, so the contents are checked next: this stand-in's `{}` state is not
        // a trainer state (tests/tests/corrupt.rs resumes real checkpoints of every stage).
        let e = check_checkpoint(Some(&ckpt), "ppo")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("state.json") && !e.contains("is not a checkpoint of a ppo run"),
            "{e}"
        );
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
