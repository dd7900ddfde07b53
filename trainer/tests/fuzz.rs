//! Fuzzing (issue 29) of what the shared training plumbing reads from users' files: stage
//! configs (TOML text and `--set key.path=value` overrides, then the range checks and the values
//! derived from them), a checkpoint's `trainer_state/state.json`, and its optimizer file. On any
//! input each returns Ok or an error: no panic, no unbounded allocation (this binary's allocator
//! refuses any one allocation over 1 GiB, which aborts the test), and it finishes.
//!
//! Cases per property: 64 by default; `FUZZ_CASES=N` raises it for a long run.

#[path = "../../tests/common/fuzz.rs"]
mod fuzz;
use fuzz::{Edit, apply};

use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use trainer::state::{STATE_DIR, check_optimizer_file, load_optimizer, load_state};

fn cases() -> u32 {
    fuzz::cases(64)
}

trainer::stage_config! {
    /// A stage config made of the shared sections, as sft's and reward's are.
    pub struct FuzzConfig {
        pub train: trainer::TrainSection,
    }
}

fn hostile() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"1000000000000".to_vec()),
        Just(b"18446744073709551615".to_vec()),
        Just(b"4294967296".to_vec()),
        Just(b"99999999999999999999999999999".to_vec()),
        Just(b"-1".to_vec()),
        Just(b"1e999".to_vec()),
        Just(b"nan".to_vec()),
        Just(b"inf".to_vec()),
        Just("[".repeat(5000).into_bytes()),
        Just("{a=".repeat(2000).into_bytes()),
        Just(b"\n[train]\n".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"\0".to_vec()),
        Just(vec![0xff, 0xfe]),
        proptest::collection::vec(any::<u8>(), 0..12),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    fuzz::edit(hostile())
}

const VALID_CONFIG: &str = r#"out = "runs/x"
seed = 3
[train]
batch_size = 4
grad_accum = 2
lr = 3e-4
max_steps = 10
warmup_steps = 2
"#;

/// What a stage does with its config: load it with the overrides, check the ranges, and (when
/// they pass) derive the run's steps and its schedule.
fn load_and_derive(path: &Path, sets: &[String]) {
    let Ok((cfg, _used)) = trainer::config::load_config::<FuzzConfig>(path, sets) else {
        return;
    };
    let mut c = trainer::Check::new(path);
    cfg.train.check(&mut c);
    if c.finish().is_ok() {
        for examples in [0, 1, 1000, usize::MAX] {
            let steps = cfg.train.total_steps(examples);
            let schedule = cfg.train.schedule(steps);
            for step in [0, 1, steps / 2, steps, steps.saturating_add(1)] {
                let _ = schedule.at(step);
            }
        }
        let _ = cfg.train.examples_per_step();
    }
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("seed".to_string()),
        Just("out".to_string()),
        Just("device".to_string()),
        Just("matmul".to_string()),
        Just("train".to_string()),
        Just("train.batch_size".to_string()),
        Just("train.grad_accum".to_string()),
        Just("train.lr".to_string()),
        Just("train.epochs".to_string()),
        Just("train.max_steps".to_string()),
        Just("train.warmup_steps".to_string()),
        Just("train.min_lr_ratio".to_string()),
        Just("train.eval_every".to_string()),
        Just("train.save_every".to_string()),
        Just("train.max_grad_norm".to_string()),
        Just("train.beta1".to_string()),
        Just("train.lr.x".to_string()),
        Just("seed.x.y".to_string()),
        Just("a..b".to_string()),
        Just(".".to_string()),
        Just("".to_string()),
        "[a-z._]{0,12}",
    ]
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("1".to_string()),
        Just("4294967296".to_string()),
        Just("9223372036854775807".to_string()),
        Just("18446744073709551615".to_string()),
        Just("1e308".to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("-inf".to_string()),
        Just("true".to_string()),
        Just("\"x\"".to_string()),
        Just("[1, 2]".to_string()),
        Just("{ a = 1 }".to_string()),
        Just("1\nseed = 5".to_string()),
        Just("[".repeat(3000)),
        Just("{a=".repeat(3000)),
        Just("=".to_string()),
        ".{0,16}",
    ]
}

/// A tiny model's folder (at the root of `checkpoint-000001/`) with the optimizer state of one
/// AdamW step on it, made once per test process: (the run folder, the optimizer file's bytes).
fn optimizer_checkpoint() -> &'static (PathBuf, Vec<u8>) {
    static ONCE: OnceLock<(PathBuf, Vec<u8>)> = OnceLock::new();
    ONCE.get_or_init(|| {
        let run = std::env::temp_dir().join(format!("trainer-fuzz-{}", std::process::id()));
        let dir = run.join("checkpoint-000001");
        let p = write_checkpoint(&dir, 64);
        let bytes = std::fs::read(p).unwrap();
        (run, bytes)
    })
}

/// Writes a tiny model of hidden size `hidden` to `dir` and the optimizer state of one step on
/// it to `dir/trainer_state/optimizer.bpk`; returns that file.
fn write_checkpoint(dir: &Path, hidden: usize) -> PathBuf {
    use burn::optim::GradientsParams;
    let device = model::parse_device("cpu").unwrap().autodiff();
    let mut cfg = model::ModelConfig::preset("tiny", 40).unwrap();
    cfg.hidden_size = hidden;
    cfg.head_dim = hidden / cfg.num_heads;
    let m = model::CausalLm::new(&cfg, false, 1, &device).unwrap();
    let batch = model::TokenBatch::dense(vec![1, 2, 3, 4, 5, 6, 7, 8], 2, 4);
    let loss = m.logits(m.forward(&batch)).unwrap().powi_scalar(2).mean();
    let grads = GradientsParams::from_grads(loss.backward(), &m);
    let mut optim = trainer::optim::adamw(0.9, 0.999, 1e-8, 0.0);
    let m = optim.step(1e-3, m, grads);
    model::save(&m, None, dir).unwrap();
    std::fs::create_dir_all(dir.join(STATE_DIR)).unwrap();
    let p = dir.join(STATE_DIR).join("optimizer.bpk");
    optim.save(&p).unwrap();
    p
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    /// Mutations of a valid config text, with and without overrides.
    #[test]
    fn mutated_config_text_loads_or_fails(
        edits in proptest::collection::vec(edit(), 1..4),
        sets in proptest::collection::vec((key(), value()), 0..3),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("c.toml");
        std::fs::write(&p, apply(VALID_CONFIG.as_bytes().to_vec(), &edits)).unwrap();
        let sets: Vec<String> = sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
        load_and_derive(&p, &[]);
        load_and_derive(&p, &sets);
    }

    /// Any overrides on a valid config: each gives a config or an error.
    #[test]
    fn arbitrary_overrides_load_or_fail(
        sets in proptest::collection::vec((key(), value()), 1..5),
        raw in proptest::collection::vec(".{0,24}", 0..2),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("c.toml");
        std::fs::write(&p, VALID_CONFIG).unwrap();
        let mut sets: Vec<String> = sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
        sets.extend(raw);
        load_and_derive(&p, &sets);
    }

    /// The shipped configs (any TOML) mutated, read as tables.
    #[test]
    fn mutated_shipped_configs_parse_or_fail(
        which in 0usize..4,
        edits in proptest::collection::vec(edit(), 1..4),
        sets in proptest::collection::vec((key(), value()), 0..3),
    ) {
        let name = ["sft.toml", "reward.toml", "ppo.toml", "dpo.toml"][which];
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs").join(name);
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join(name);
        std::fs::write(&p, apply(std::fs::read(&shipped).unwrap(), &edits)).unwrap();
        let sets: Vec<String> = sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = trainer::config::load_config::<toml::Table>(&p, &sets);
    }

    /// `trainer_state/state.json` mutated, and as random bytes.
    #[test]
    fn mutated_trainer_state_loads_or_fails(
        edits in proptest::collection::vec(edit(), 1..4),
        random in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("checkpoint-000004");
        std::fs::create_dir_all(dir.join(STATE_DIR)).unwrap();
        let valid = br#"{"step": 4, "examples_seen": 32, "seed": 3, "data_fingerprint": "abc", "best_metric": 0.5, "best_step": 4, "stage": {"kl_controller": {"coef": 0.1}}}"#;
        let p = dir.join(STATE_DIR).join("state.json");
        std::fs::write(&p, apply(valid.to_vec(), &edits)).unwrap();
        if let Ok(state) = load_state(&dir) {
            prop_assert_eq!(state.step, 4);
            let _ = trainer::state::check_resume(&dir, &state, 3, "abc");
        }
        std::fs::write(&p, &random).unwrap();
        prop_assert!(load_state(&dir).is_err());
    }

    /// A real optimizer file mutated: checked, then loaded when the check passes.
    #[test]
    fn mutated_optimizer_files_load_or_fail(edits in proptest::collection::vec(edit(), 1..4)) {
        let (_, bytes) = optimizer_checkpoint();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("checkpoint-000001");
        let (run, _) = optimizer_checkpoint();
        std::fs::create_dir_all(dir.join(STATE_DIR)).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(run.join("checkpoint-000001").join(f), dir.join(f)).unwrap();
        }
        // Half the edits go to the header and metadata (the first KB).
        let edits: Vec<Edit> = edits
            .into_iter()
            .enumerate()
            .map(|(k, e)| match e {
                Edit::Set(i, b) if k % 2 == 0 => Edit::Set(i % 1024, b),
                Edit::Insert(i, s) if k % 2 == 0 => Edit::Insert(i % 1024, s),
                e => e,
            })
            .collect();
        std::fs::write(dir.join(STATE_DIR).join("optimizer.bpk"), apply(bytes.clone(), &edits)).unwrap();
        if check_optimizer_file(&dir, "model").is_ok() {
            let _ = load_optimizer(&dir, "model", trainer::optim::adamw(0.9, 0.999, 1e-8, 0.0));
        }
    }
}

/// The untouched optimizer file of a checkpoint passes the check and loads.
#[test]
fn a_whole_optimizer_file_passes_and_loads() {
    let (run, _) = optimizer_checkpoint();
    let dir = run.join("checkpoint-000001");
    check_optimizer_file(&dir, "model").unwrap();
    load_optimizer(&dir, "model", trainer::optim::adamw(0.9, 0.999, 1e-8, 0.0)).unwrap();
}

/// The optimizer file of another model (hidden size 32, not 64) in the checkpoint: refused
/// naming the file and the first tensor that does not fit, not a shape panic at the first step.
#[test]
fn an_optimizer_file_of_another_model_is_refused() {
    let (run, _) = optimizer_checkpoint();
    let tmp = tempfile::tempdir().unwrap();
    let other = write_checkpoint(&tmp.path().join("other"), 32);
    let dir = tmp.path().join("checkpoint-000001");
    std::fs::create_dir_all(dir.join(STATE_DIR)).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(run.join("checkpoint-000001").join(f), dir.join(f)).unwrap();
    }
    let p = dir.join(STATE_DIR).join("optimizer.bpk");
    std::fs::copy(&other, &p).unwrap();
    let e = load_optimizer(&dir, "model", trainer::optim::adamw(0.9, 0.999, 1e-8, 0.0))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.starts_with(&format!(
            "{}: the optimizer state does not belong to the model of the checkpoint",
            p.display()
        )) && e.contains("which does not fit the model's")
            && e.contains("the file comes from another model or run"),
        "{e}"
    );
}

/// A truncated optimizer file, and a missing one: each refused naming the file.
#[test]
fn a_truncated_or_missing_optimizer_file_is_refused() {
    let (run, bytes) = optimizer_checkpoint();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("checkpoint-000001");
    std::fs::create_dir_all(dir.join(STATE_DIR)).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(run.join("checkpoint-000001").join(f), dir.join(f)).unwrap();
    }
    let p = dir.join(STATE_DIR).join("optimizer.bpk");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = check_optimizer_file(&dir, "model").unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}: not a readable optimizer state file",
            p.display()
        )),
        "{e}"
    );
    std::fs::remove_file(&p).unwrap();
    let e = check_optimizer_file(&dir, "model").unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}: missing", p.display())) && e.contains("start a new run"),
        "{e}"
    );
}
