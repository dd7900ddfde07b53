//! kill -9 anywhere (issue 29): each training stage (`sft`, `reward`, `ppo`, `dpo`) is killed
//! with SIGKILL at seeded random moments of a small run ([`e2e::small_run`]: checkpoints every
//! few steps, two kept, so kills land in steps, in checkpoint writes, in pruning and in the final
//! writes), then continued the way a user would: `--resume` from the newest checkpoint folder
//! (a folder named `checkpoint-*` is complete: it is renamed into place once written), or, when
//! the kill came before the first checkpoint, the same command again. The continued run must
//! equal an uninterrupted one bit for bit: every file it leaves in `out` (weights, optimizer
//! moments, trainer state, `best/`, `final/`, samples; the same set of files, so no temporary
//! folder is left behind), and `metrics.jsonl` without its timing fields.
//!
//! Two kills per stage by default; `KILLS=20` for the long run, `KILL_SEED` for another draw.
//! Each test prints how its kills fell and how many passed.

use e2e::{bin, files_under, metrics_without_timing, newest_checkpoint, root, small_run};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What two runs may write differently: `config.toml` names its own `out`, `summary.json` its
/// folders; `metrics.jsonl` is compared without timings; `.lock` holds the pid.
const NOT_COMPARED: &[&str] = &["config.toml", "summary.json", "metrics.jsonl", ".lock"];

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v}: expected a number"))
        })
        .unwrap_or(default)
}

/// splitmix64: the seeded draws of the kill moments.
struct Draws(u64);

impl Draws {
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn run(stage: &str, args: &[String]) -> (bool, String) {
    let o = Command::new(bin(stage))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Whether `out` holds a `.checkpoint-*.tmp` folder: the kill came while a checkpoint was being
/// written.
fn mid_checkpoint(out: &Path) -> bool {
    std::fs::read_dir(out).is_ok_and(|d| {
        d.filter_map(|e| e.ok()).any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(".checkpoint-") && n.ends_with(".tmp")
        })
    })
}

/// The first difference between two runs' files, if any.
/// Optimizer files are not byte-stable between runs (their record's layout), even uninterrupted
/// ones: the weights they lead to are compared instead.
fn compared(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut f = files_under(dir, NOT_COMPARED);
    f.retain(|k, _| !k.ends_with(".bpk"));
    f
}

fn first_difference(
    want: &std::collections::BTreeMap<String, Vec<u8>>,
    got: &std::collections::BTreeMap<String, Vec<u8>>,
) -> Option<String> {
    for (f, bytes) in want {
        match got.get(f) {
            None => return Some(format!("{f} is missing")),
            Some(b) if b != bytes => return Some(format!("{f} differs")),
            Some(_) => {}
        }
    }
    got.keys()
        .find(|f| !want.contains_key(*f))
        .map(|f| format!("{f} is left over"))
}

fn killed_anywhere_resumes_bit_identical(stage: &str, stage_index: u64) {
    let kills = env_number("KILLS", 2);
    let seed = env_number("KILL_SEED", 0);
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let started = Instant::now();
    let (ok, err) = run(stage, &small_run(stage, &full));
    assert!(ok, "{stage}: the uninterrupted run failed: {err}");
    let duration = started.elapsed();
    let want_files = compared(&full);
    let want_metrics = metrics_without_timing(&full);
    let mut draws = Draws(seed ^ (stage_index + 1).wrapping_mul(0xA076_1D64_78BD_642F));
    let (mut before_first, mut in_write, mut finished, mut passed) = (0, 0, 0, 0);
    let mut failures = Vec::new();
    for k in 0..kills {
        let out = tmp.path().join(format!("killed-{k}"));
        let args = small_run(stage, &out);
        let at = duration.mul_f64(draws.unit());
        let mut child = Command::new(bin(stage))
            .current_dir(root())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let mut ended = false;
        while t.elapsed() < at {
            if child.try_wait().unwrap().is_some() {
                ended = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().ok(); // SIGKILL
        let status = child.wait().unwrap();
        let newest = newest_checkpoint(&out);
        let how = format!(
            "kill {k} at {:.3} s of {:.3} s, newest checkpoint {}",
            at.as_secs_f64(),
            duration.as_secs_f64(),
            newest
                .as_ref()
                .map_or("none".to_string(), |c| c.display().to_string())
        );
        if ended {
            finished += 1;
            if !status.success() {
                failures.push(format!("{how}: the run failed by itself"));
                continue;
            }
        } else {
            in_write += usize::from(mid_checkpoint(&out));
            before_first += usize::from(newest.is_none());
            let mut again = args.clone();
            if let Some(c) = &newest {
                for f in ["trainer_state/state.json", "model.safetensors"] {
                    if !c.join(f).is_file() {
                        failures.push(format!("{how}: the newest checkpoint has no {f}"));
                    }
                }
                again.extend(["--resume".to_string(), c.display().to_string()]);
            }
            let (ok, err) = run(stage, &again);
            if !ok {
                failures.push(format!("{how}: continuing failed: {err}"));
                continue;
            }
        }
        if let Some(d) = first_difference(&want_files, &compared(&out)) {
            failures.push(format!("{how}: {d}"));
        } else if metrics_without_timing(&out) != want_metrics {
            failures.push(format!("{how}: metrics.jsonl differs"));
        } else {
            passed += 1;
            let _ = std::fs::remove_dir_all(&out);
        }
    }
    println!(
        "{stage}: {kills} kills tried, {passed} passed ({before_first} before the first checkpoint, {in_write} during a checkpoint write, {finished} after the run had ended)"
    );
    assert!(
        failures.is_empty(),
        "{stage}: {} of {kills} kills failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn sft_killed_anywhere_resumes_bit_identical() {
    killed_anywhere_resumes_bit_identical("sft", 0);
}

#[test]
fn reward_killed_anywhere_resumes_bit_identical() {
    killed_anywhere_resumes_bit_identical("reward", 1);
}

#[test]
fn ppo_killed_anywhere_resumes_bit_identical() {
    killed_anywhere_resumes_bit_identical("ppo", 2);
}

#[test]
fn dpo_killed_anywhere_resumes_bit_identical() {
    killed_anywhere_resumes_bit_identical("dpo", 3);
}
