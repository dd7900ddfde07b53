//! Regression tests of issue 29 across stages, through the real binaries: `--resume` of a folder
//! that is not a checkpoint of the stage resumed names the folder and says what to resume from,
//! before any model is loaded.

use e2e::{bin, root};
use std::path::Path;
use std::process::Command;

fn run(name: &str, args: &[String]) -> (bool, String, String) {
    let out = Command::new(bin(name))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// `ppo` on a tiny SFT policy with a rule reward and the policy as the critic.
fn ppo_args(policy: &Path, out: &Path, iterations: usize) -> Vec<String> {
    let mut a = args(&[
        "--config",
        "configs/ppo.toml",
        "--out",
        out.to_str().unwrap(),
    ]);
    for s in [
        format!("model.policy={}", policy.display()),
        "reward.rule=\"regex:^ The answer is\"".into(),
        "model.critic=\"policy\"".into(),
        format!("train.iterations={iterations}"),
        "rollout.batch_size=4".into(),
        "ppo.minibatch_size=4".into(),
        "ppo.epochs=1".into(),
        "monitor.enabled=false".into(),
    ] {
        a.push("--set".into());
        a.push(s);
    }
    a
}

/// Regression (issue 29): `--resume` of a PPO `final/` folder into `ppo` said `critic: cannot read
/// file`. It now says the folder is not a checkpoint of a ppo run and names the run's newest
/// checkpoint; a checkpoint of another stage (sft) is refused the same way, naming that stage.
#[test]
fn ppo_resume_from_a_final_folder_or_an_sft_checkpoint_says_it_is_not_a_ppo_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let sft_out = tmp.path().join("sft");
    let (ok, _, err) = run(
        "sft",
        &args(&[
            "--config",
            "configs/sft.toml",
            "--out",
            sft_out.to_str().unwrap(),
            "--set",
            "train.max_steps=4",
            "--set",
            "train.eval_every=0",
        ]),
    );
    assert!(ok, "{err}");
    let policy = sft_out.join("final");
    let ppo_out = tmp.path().join("ppo");
    let (ok, _, err) = run("ppo", &ppo_args(&policy, &ppo_out, 2));
    assert!(ok, "{err}");
    assert!(ppo_out.join("checkpoint-000002/critic").is_dir());

    let again = tmp.path().join("again");
    let mut resume_final = ppo_args(&policy, &again, 3);
    resume_final.extend(args(&["--resume", ppo_out.join("final").to_str().unwrap()]));
    let (ok, _, err) = run("ppo", &resume_final);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{} is not a checkpoint of a ppo run: it has no trainer_state/",
            ppo_out.join("final").display()
        )) && err.contains("resume from one of its checkpoint-NNNNNN folders")
            && err.contains(&ppo_out.join("checkpoint-000002").display().to_string()),
        "{err}"
    );
    assert!(!err.contains("critic"), "{err}");
    assert!(!again.exists(), "nothing is written");

    let mut resume_sft = ppo_args(&policy, &again, 3);
    resume_sft.extend(args(&[
        "--resume",
        sft_out.join("checkpoint-000004").to_str().unwrap(),
    ]));
    let (ok, _, err) = run("ppo", &resume_sft);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{} is not a checkpoint of a ppo run: it is a checkpoint of an sft run",
            sft_out.join("checkpoint-000004").display()
        )),
        "{err}"
    );
    assert!(!again.exists(), "nothing is written");

    // The run's own checkpoint still resumes.
    let mut resume_own = ppo_args(&policy, &again, 3);
    resume_own.extend(args(&[
        "--resume",
        ppo_out.join("checkpoint-000002").to_str().unwrap(),
    ]));
    let (ok, stdout, err) = run("ppo", &resume_own);
    assert!(ok, "{err}");
    assert!(stdout.contains("resumed from"), "{stdout}");
}

/// Regression (issue 29): a checkpoint resumed into a shorter run finished at once with exit 0
/// and a final/ of the longer run's weights; it is refused, naming the step and what to change.
#[test]
fn a_checkpoint_beyond_the_runs_length_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sft");
    let mut a = e2e::small_run("sft", &out);
    a.extend(args(&["--set", "train.max_steps=20"]));
    let (ok, _, err) = run("sft", &a);
    assert!(ok, "{err}");
    let ckpt = out.join("checkpoint-000020");
    assert!(ckpt.is_dir());
    let again = tmp.path().join("shorter");
    let mut b = e2e::small_run("sft", &again);
    b.extend(args(&[
        "--set",
        "train.max_steps=10",
        "--resume",
        ckpt.to_str().unwrap(),
    ]));
    let (ok, _, err) = run("sft", &b);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{}: the checkpoint is at step 20 but this run has 10 steps",
            ckpt.display()
        )) && err.contains("train.max_steps"),
        "{err}"
    );
    assert!(
        !again.join("final").exists(),
        "nothing is trained or written"
    );
}
