//! End-to-end tests of the pipeline live in `tests/`; this library holds the little the stages'
//! own end-to-end tests share: the workspace root, the path of a built binary, running one, and
//! killing a training run with SIGKILL mid-way, as the exact-resume tests of `reward` and `ppo` do,
//! and comparing two runs' metrics and weights.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace root (configs and datasets are given relative to it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// A workspace binary, built by `cargo test --workspace` beside the running test executable
/// (`target/<profile>/deps/…` → `target/<profile>/NAME`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        p.exists(),
        "{} not built; run `cargo test --release --workspace`",
        p.display()
    );
    p
}

/// Runs workspace binary `name` with `args` from the workspace root.
pub fn output(name: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin(name))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap()
}

/// Runs workspace binary `name` with `args` from the workspace root, asserts it succeeded
/// (showing its stderr otherwise) and returns its stdout.
pub fn run(name: &str, args: &[&str]) -> String {
    let out = output(name, args);
    assert!(
        out.status.success(),
        "{name} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `cmd`, kills it with SIGKILL as soon as `marker` exists (or lets it end, at most five
/// minutes), and returns the newest `checkpoint-*` folder it left in `out`.
pub fn kill_once_written(cmd: &mut Command, marker: &Path, out: &Path) -> PathBuf {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the run to kill");
    let start = Instant::now();
    while !marker.exists() && start.elapsed().as_secs() < 300 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().ok(); // SIGKILL
    child.wait().unwrap();
    std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-"))
        })
        .max()
        .expect("a checkpoint was written before the kill")
}

/// Runs the executable `exe` with `args` from the workspace root: (succeeded, stdout, stderr).
pub fn run_exe(exe: &Path, args: &[String]) -> (bool, String, String) {
    let out = Command::new(exe)
        .current_dir(root())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The lines of a JSONL file, each parsed.
pub fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The lines of `out/metrics.jsonl`.
pub fn metrics(out: &Path) -> Vec<serde_json::Value> {
    jsonl(&out.join("metrics.jsonl"))
}

/// The metrics lines without what depends on the machine's speed (`time_*`, `*_per_s`).
pub fn metrics_without_timing(out: &Path) -> Vec<serde_json::Value> {
    metrics(out)
        .into_iter()
        .map(|mut l| {
            if let Some(o) = l.as_object_mut() {
                o.retain(|k, _| !k.starts_with("time_") && !k.ends_with("_per_s"));
            }
            l
        })
        .collect()
}

/// Asserts that runs `a` and `b` (output folders) wrote the same metrics (timings aside) and
/// byte-identical `files` (paths relative to each folder); `why` says what should have made
/// them equal.
pub fn assert_same_runs(a: &Path, b: &Path, files: &[&str], why: &str) {
    for f in files {
        let read = |d: &Path| {
            std::fs::read(d.join(f)).unwrap_or_else(|e| panic!("{}/{f}: {e}", d.display()))
        };
        assert!(read(a) == read(b), "{f} differs ({why})");
    }
    assert_eq!(
        metrics_without_timing(a),
        metrics_without_timing(b),
        "metrics differ ({why})"
    );
}

/// One SFT policy on the demo task for a test binary's tests (the tiny preset, 400 steps, about
/// 5 s), trained on first use; its folder lives as long as the test process.
pub fn demo_sft_policy() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("sft");
        run(
            "sft",
            &[
                "--config",
                "configs/sft.toml",
                "--out",
                out.to_str().unwrap(),
                "--set",
                "data.path=datasets/demo/task/demonstrations.jsonl",
                "--set",
                "train.max_steps=400",
                "--set",
                "train.eval_every=0",
                "--set",
                "train.save_every=0",
            ],
        );
        (tmp, out.join("final"))
    })
    .1
}

/// The newest `checkpoint-*` folder of `out`, if any (a checkpoint folder exists only once all
/// its files were written: it is renamed into place).
pub fn newest_checkpoint(out: &Path) -> Option<PathBuf> {
    std::fs::read_dir(out)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-"))
        })
        .max()
}

/// Every file under `dir` (relative path → bytes), leaving out the top-level names in `skip`.
pub fn files_under(dir: &Path, skip: &[&str]) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(
        base: &Path,
        at: &Path,
        skip: &[&str],
        found: &mut std::collections::BTreeMap<String, Vec<u8>>,
    ) {
        let entries =
            std::fs::read_dir(at).unwrap_or_else(|e| panic!("reading {}: {e}", at.display()));
        for e in entries {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            if at == base && skip.contains(&rel.as_str()) {
                continue;
            }
            if p.is_dir() {
                walk(base, &p, skip, found);
            } else {
                let bytes =
                    std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
                found.insert(rel, bytes);
            }
        }
    }
    let mut found = std::collections::BTreeMap::new();
    walk(dir, dir, skip, &mut found);
    found
}

/// A small training run of `stage` (`sft`, `reward`, `ppo`, `dpo`) into `out` on the demo task,
/// checkpointing often and keeping two checkpoints (so pruning happens), a few seconds on two
/// cores; `reward`, `ppo` and `dpo` start from [`demo_sft_policy`]. The arguments after the
/// binary's name.
pub fn small_run(stage: &str, out: &Path) -> Vec<String> {
    let policy = || demo_sft_policy().display().to_string();
    let (config, sets): (&str, Vec<String>) = match stage {
        "sft" => (
            "configs/sft.toml",
            vec![
                "data.path=datasets/demo/task/demonstrations.jsonl".into(),
                "train.max_steps=120".into(),
                "train.save_every=10".into(),
                "train.eval_every=20".into(),
                "model.dropout=0.1".into(),
            ],
        ),
        "reward" => (
            "configs/reward.toml",
            vec![
                format!("model.base={}", policy()),
                "data.path=datasets/demo/task/rankings.csv".into(),
                "ensemble.members=1".into(),
                "train.max_steps=24".into(),
                "train.save_every=4".into(),
                "train.eval_every=8".into(),
            ],
        ),
        "ppo" => (
            "configs/ppo.toml",
            vec![
                format!("model.policy={}", policy()),
                "reward.rule=\"regex:^ The answer is\"".into(),
                "model.critic=\"policy\"".into(),
                "train.iterations=12".into(),
                "train.save_every=3".into(),
                "rollout.batch_size=8".into(),
                "kl.adaptive=true".into(),
                "monitor.enabled=false".into(),
            ],
        ),
        "dpo" => (
            "configs/dpo.toml",
            vec![
                format!("model.policy={}", policy()),
                "data.path=datasets/demo/task/rankings.csv".into(),
                "train.max_steps=40".into(),
                "train.save_every=5".into(),
                "train.eval_every=10".into(),
            ],
        ),
        _ => panic!("no small run of stage {stage}"),
    };
    let mut args: Vec<String> = vec![
        "--config".into(),
        config.into(),
        "--out".into(),
        out.display().to_string(),
    ];
    for s in sets
        .into_iter()
        .chain(["train.keep_last=2".into(), "train.log_every=1".into()])
    {
        args.push("--set".into());
        args.push(s);
    }
    args
}
