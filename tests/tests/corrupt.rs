//! Corrupt checkpoints (issue 29): `--resume` of a damaged checkpoint of `sft`, `reward`, `ppo`
//! and `dpo` gives one clear error naming the damaged file and what to do, exits non-zero, never
//! panics and never starts afresh. One tiny run per stage makes the checkpoint; each case
//! resumes from a damaged copy of it: a truncated `model.safetensors` (PPO: also the critic's),
//! `trainer_state/state.json` that is not JSON, has a wrong type or a step other than its
//! folder's, or is missing, a missing or truncated optimizer file, and the optimizer file of
//! another model (a reward model's in a policy's checkpoint and the other way round).

use e2e::{bin, root, small_run};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tiny run of `stage`: four steps (PPO: two iterations), a checkpoint every two (one).
fn tiny_run(stage: &str, out: &Path) -> Vec<String> {
    let mut args = small_run(stage, out);
    let sets: &[&str] = match stage {
        "ppo" => &["train.iterations=2", "train.save_every=1"],
        _ => &[
            "train.max_steps=4",
            "train.save_every=2",
            "train.eval_every=0",
        ],
    };
    for s in sets {
        args.push("--set".into());
        args.push(s.to_string());
    }
    args
}

/// Runs `stage` with `args` from the workspace root: (exit code, stdout, stderr).
fn run(stage: &str, args: &[String]) -> (Option<i32>, String, String) {
    let o = Command::new(bin(stage))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

fn truncate(p: &Path) {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    std::fs::write(p, &bytes[..bytes.len() * 2 / 3]).unwrap();
}

/// A way to damage a checkpoint: what it is, the damage done to the copy at the folder given,
/// the file the error must name (relative to that folder) and what the error must say.
struct Damage {
    name: &'static str,
    damage: Box<dyn Fn(&Path)>,
    file: String,
    says: Vec<&'static str>,
}

fn damage(
    name: &'static str,
    damage: impl Fn(&Path) + 'static,
    file: &str,
    says: &[&'static str],
) -> Damage {
    Damage {
        name,
        damage: Box::new(damage),
        file: file.to_string(),
        says: says.to_vec(),
    }
}

fn edit_state(dir: &Path, f: impl Fn(&mut serde_json::Value)) {
    let p = dir.join("trainer_state/state.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

/// The damages every stage's checkpoint is tried with; `optimizer` is the stage's (first)
/// optimizer file, `foreign` the optimizer file of another model.
fn damages(optimizer: &'static str, foreign: PathBuf) -> Vec<Damage> {
    const AGAIN: &str = "start a new run without --resume";
    let optimizer_file = format!("trainer_state/{optimizer}");
    vec![
        damage(
            "truncated model.safetensors",
            |d| truncate(&d.join("model.safetensors")),
            "model.safetensors",
            &["the file is truncated", "the checkpoint is damaged", AGAIN],
        ),
        damage(
            "state.json that is not JSON",
            |d| std::fs::write(d.join("trainer_state/state.json"), "{\"step\": 2,").unwrap(),
            "trainer_state/state.json",
            &[
                "invalid trainer state",
                "the file was edited or damaged",
                AGAIN,
            ],
        ),
        damage(
            "state.json with a wrong type",
            |d| edit_state(d, |v| v["examples_seen"] = "many".into()),
            "trainer_state/state.json",
            &["invalid trainer state", "examples_seen", AGAIN],
        ),
        damage(
            "state.json with a step beyond the run",
            |d| edit_state(d, |v| v["step"] = 999.into()),
            "trainer_state/state.json",
            &[
                "\"step\" is 999 but the folder is the checkpoint of step",
                AGAIN,
            ],
        ),
        damage(
            "missing state.json",
            |d| std::fs::remove_file(d.join("trainer_state/state.json")).unwrap(),
            "trainer_state/state.json",
            &["missing: the checkpoint is incomplete", AGAIN],
        ),
        damage(
            "missing optimizer file",
            move |d| std::fs::remove_file(d.join("trainer_state").join(optimizer)).unwrap(),
            &optimizer_file,
            &["missing: the checkpoint has no state for its", AGAIN],
        ),
        damage(
            "truncated optimizer file",
            move |d| truncate(&d.join("trainer_state").join(optimizer)),
            &optimizer_file,
            &["not a readable optimizer state file", AGAIN],
        ),
        damage(
            "optimizer file of another model",
            move |d| {
                std::fs::copy(&foreign, d.join("trainer_state").join(optimizer)).unwrap();
            },
            &optimizer_file,
            &[
                "the optimizer state does not belong to the model of the checkpoint",
                AGAIN,
            ],
        ),
    ]
}

/// Resumes `stage` from a damaged copy of `checkpoint` for each damage, and checks the one
/// error. Returns the cases that fell short, with what happened.
fn try_damages(stage: &str, checkpoint: &Path, damages: Vec<Damage>, tmp: &Path) -> Vec<String> {
    let mut failed = Vec::new();
    for (
        i,
        Damage {
            name,
            damage,
            file,
            says,
        },
    ) in damages.into_iter().enumerate()
    {
        let case = tmp.join(format!("{stage}-case{i}"));
        let dir = case.join("run").join(checkpoint.file_name().unwrap());
        copy_dir(checkpoint, &dir);
        damage(&dir);
        let out = case.join("resumed");
        let mut args = tiny_run(stage, &out);
        args.push("--resume".into());
        args.push(dir.display().to_string());
        let (code, stdout, err) = run(stage, &args);
        let named = dir.join(file).display().to_string();
        let ok = code.is_some_and(|c| c != 0)
            && !err.contains("panicked")
            && err.contains(&named)
            && says.iter().all(|s| err.contains(s))
            && !stdout.contains("resumed from")
            && !out.join("final").exists();
        println!("{stage}: {name}: exit {code:?}\n  {}", err.trim());
        if !ok {
            failed.push(format!(
                "{stage}: {name}: exit {code:?}, stderr must name {named} and say {says:?}:\n{err}"
            ));
        }
    }
    failed
}

/// The tiny run of `stage` into `out`; returns its first checkpoint.
fn first_checkpoint(stage: &str, out: &Path) -> PathBuf {
    let (code, _, err) = run(stage, &tiny_run(stage, out));
    assert_eq!(code, Some(0), "{stage}: {err}");
    let first = match stage {
        "ppo" => "checkpoint-000001",
        _ => "checkpoint-000002",
    };
    let dir = out.join(first);
    assert!(
        dir.join("trainer_state/state.json").is_file(),
        "{}",
        dir.display()
    );
    dir
}

/// Every stage, every damage: one clear error each. The stages share the runs, so they are one
/// test (sft's and reward's optimizers are each other's foreign file).
#[test]
fn damaged_checkpoints_are_refused_with_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let sft = first_checkpoint("sft", &t.join("sft"));
    let reward = first_checkpoint("reward", &t.join("reward"));
    let dpo = first_checkpoint("dpo", &t.join("dpo"));
    let ppo = first_checkpoint("ppo", &t.join("ppo"));

    // The untouched checkpoints resume (so the damages are what is refused).
    for (stage, dir) in [("sft", &sft), ("dpo", &dpo)] {
        let mut args = tiny_run(stage, &t.join(format!("{stage}-resumed")));
        args.extend(["--resume".into(), dir.display().to_string()]);
        let (code, stdout, err) = run(stage, &args);
        assert_eq!(code, Some(0), "{stage}: {err}");
        assert!(stdout.contains("resumed from"), "{stdout}");
    }

    let reward_optimizer = reward.join("trainer_state/optimizer.bpk");
    let sft_optimizer = sft.join("trainer_state/optimizer.bpk");
    let mut failed = Vec::new();
    failed.extend(try_damages(
        "sft",
        &sft,
        damages("optimizer.bpk", reward_optimizer.clone()),
        t,
    ));
    failed.extend(try_damages(
        "reward",
        &reward,
        damages("optimizer.bpk", sft_optimizer.clone()),
        t,
    ));
    failed.extend(try_damages(
        "dpo",
        &dpo,
        damages("optimizer.bpk", reward_optimizer.clone()),
        t,
    ));
    let mut ppo_damages = damages("optimizer-policy.bpk", reward_optimizer);
    ppo_damages.push(damage(
        "truncated critic/model.safetensors",
        |d| truncate(&d.join("critic/model.safetensors")),
        "critic/model.safetensors",
        &["the file is truncated", "the checkpoint is damaged"],
    ));
    ppo_damages.push(damage(
        "the policy's optimizer file as the critic's",
        |d| {
            std::fs::copy(
                d.join("trainer_state/optimizer-policy.bpk"),
                d.join("trainer_state/optimizer-critic.bpk"),
            )
            .unwrap();
        },
        "trainer_state/optimizer-critic.bpk",
        &["the optimizer state does not belong to the model of the checkpoint"],
    ));
    failed.extend(try_damages("ppo", &ppo, ppo_damages, t));
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}
