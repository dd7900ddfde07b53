//! Two runs, one `--out` (issue 29): a second run into the output folder of a live one is
//! refused, naming the folder and the live run's pid, and changes nothing there; the lock dies
//! with its process, so after `kill -9` the run continues (`--resume`) without a stuck lock.

use e2e::{bin, newest_checkpoint, root, small_run};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `stage` with `args` and waits (at most five minutes) until `running` holds, failing
/// if the run ends first; returns the live run.
fn start_until(stage: &str, args: &[String], running: impl Fn() -> bool) -> Child {
    let mut child = Command::new(bin(stage))
        .current_dir(root())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !running() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the first {stage} run ended before it trained"
        );
        assert!(
            start.elapsed().as_secs() < 300,
            "the first {stage} run never logged"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

#[test]
fn a_second_run_into_the_out_of_a_live_one_is_refused_naming_it_and_its_pid() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sft");
    let mut args = small_run("sft", &out);
    // Long enough to be alive while the second starts (it trains a tokenizer first).
    args.extend(["--set".into(), "train.max_steps=1500".into()]);
    // Running: its first metrics line is written.
    let metrics = out.join("metrics.jsonl");
    let mut first = start_until("sft", &args, || {
        std::fs::read_to_string(&metrics).is_ok_and(|t| t.contains('\n'))
    });
    let config = std::fs::read(out.join("config.toml")).unwrap();
    let mut other = args.clone();
    other.extend(["--set".into(), "train.lr=1e-3".into()]);
    let second = Command::new(bin("sft"))
        .current_dir(root())
        .args(&other)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{}: another run (pid {}) is writing into this output folder; wait for it to end, or choose another `out` (or --out)",
            out.display(),
            first.id()
        )),
        "{err}"
    );
    assert_eq!(
        std::fs::read(out.join("config.toml")).unwrap(),
        config,
        "the refused run rewrote config.toml"
    );
    let status = first.wait().unwrap();
    assert!(status.success(), "the first run failed after the refusal");
    assert!(out.join("final/model.safetensors").is_file());
    assert!(out.join("checkpoint-001500").is_dir());
}

#[test]
fn a_run_killed_with_sigkill_leaves_no_stuck_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sft");
    let args = small_run("sft", &out);
    let mut cmd = Command::new(bin("sft"));
    cmd.current_dir(root()).args(&args);
    let newest = e2e::kill_once_written(&mut cmd, &out.join("checkpoint-000010"), &out);
    // The lock file stays, with the dead run's pid; it is not a lock any more.
    assert!(out.join(".lock").is_file());
    let mut resume = args.clone();
    resume.extend(["--resume".into(), newest.display().to_string()]);
    let o = Command::new(bin("sft"))
        .current_dir(root())
        .args(&resume)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        newest_checkpoint(&out).unwrap().file_name().unwrap(),
        "checkpoint-000120"
    );
    // And the same command again, from the start into the same folder, is not locked out either.
    let o = Command::new(bin("sft"))
        .current_dir(root())
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_second_ensemble_into_the_out_of_a_live_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rm");
    let mut args = small_run("reward", &out);
    args.extend([
        "--set".into(),
        "ensemble.members=2".into(),
        "--set".into(),
        "train.max_steps=200".into(),
    ]);
    let member_metrics = out.join("member-0/metrics.jsonl");
    let mut first = start_until("reward", &args, || member_metrics.exists());
    let second = Command::new(bin("reward"))
        .current_dir(root())
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{}: another run (pid {}) is writing into this output folder",
            out.display(),
            first.id()
        )),
        "{err}"
    );
    first.kill().ok();
    first.wait().unwrap();
}
