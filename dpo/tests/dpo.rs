//! The `dpo` binary end to end on the demo task: a tiny SFT policy trained first, then DPO on
//! the demo's labeler rankings (a rankings CSV, K-way groups) with each loss; exact resume after
//! kill -9 (the reference's log-probabilities read back, not recomputed); bad input.

use e2e::root;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn run(args: &[String]) -> (bool, String, String) {
    e2e::run_exe(Path::new(env!("CARGO_BIN_EXE_dpo")), args)
}

/// The demo task's SFT policy, shared by the tests.
fn sft_policy() -> &'static Path {
    e2e::demo_sft_policy()
}

/// `dpo` on the demo rankings with `sets` after the shared ones.
fn args(out: &Path, sets: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["--config".into(), "configs/dpo.toml".into()];
    let shared = [
        format!("model.policy={}", sft_policy().display()),
        "data.path=datasets/demo/task/rankings.csv".into(),
        format!("out={}", out.display()),
        "train.max_steps=60".into(),
        "train.eval_every=20".into(),
        "train.save_every=20".into(),
        "train.log_every=1".into(),
    ];
    for s in shared
        .iter()
        .map(String::as_str)
        .chain(sets.iter().copied())
    {
        v.push("--set".into());
        v.push(s.to_string());
    }
    v
}

use e2e::metrics;

/// Each loss raises the implicit rewards' agreement with held-out rankings above chance, beyond
/// its Wilson interval; the policy is an HF causal-LM folder with the template beside it.
#[test]
fn every_loss_learns_the_held_out_rankings() {
    let tmp = tempfile::tempdir().unwrap();
    for (kind, extra) in [
        ("sigmoid", &[][..]),
        ("sigmoid", &["loss.label_smoothing=0.1"][..]),
        ("ipo", &[][..]),
        ("listwise", &[][..]),
    ] {
        let out = tmp.path().join(format!("{kind}-{}", extra.len()));
        let k = format!("loss.kind=\"{kind}\"");
        let mut sets = vec![k.as_str()];
        sets.extend(extra);
        let (ok, stdout, err) = run(&args(&out, &sets));
        assert!(ok, "{kind}: {err}");
        let m = metrics(&out);
        // Step 0: the policy is the reference, every implicit reward 0.
        assert_eq!(m[0]["step"], 0);
        assert_eq!(m[0]["eval_mean_margin"].as_f64(), Some(0.0));
        let last = m
            .iter()
            .rev()
            .find(|l| l.get("eval_accuracy").is_some())
            .unwrap();
        let low = last["eval_accuracy_low"].as_f64().unwrap();
        println!(
            "{kind} {extra:?}: validation accuracy {} [low {low:.3}]\n{stdout}",
            last["eval_accuracy"]
        );
        assert!(low > 0.5, "{kind} {extra:?}: {last}");
        let train: Vec<&Value> = m.iter().filter(|l| l.get("loss").is_some()).collect();
        assert_eq!(train.len(), 60);
        for l in &train {
            for key in [
                "rewards/chosen",
                "rewards/rejected",
                "rewards/margins",
                "rewards/accuracies",
                "logps/chosen",
                "logps/rejected",
                "grad_norm",
            ] {
                assert!(l[key].as_f64().is_some_and(f64::is_finite), "{key} in {l}");
            }
            let (c, r, margin) = (
                l["rewards/chosen"].as_f64().unwrap(),
                l["rewards/rejected"].as_f64().unwrap(),
                l["rewards/margins"].as_f64().unwrap(),
            );
            assert!((c - r - margin).abs() < 1e-6, "{l}");
        }
        // The first step's implicit rewards are 0 (policy = reference): its loss is log 2 for
        // the sigmoid loss.
        if kind == "sigmoid" && extra.is_empty() {
            let first = train[0]["loss"].as_f64().unwrap();
            assert!((first - std::f64::consts::LN_2).abs() < 1e-5, "{first}");
        }
        let meta: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("final/rlhf.json")).unwrap())
                .unwrap();
        assert_eq!(meta["stage"], "dpo");
        assert!(out.join("final/model.safetensors").exists());
        assert!(out.join("reference_logprobs.json").exists());
    }
}

#[test]
fn killed_and_resumed_run_ends_bit_identical_without_recomputing_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let (ok, _, err) = run(&args(&full, &["loss.kind=\"listwise\""]));
    assert!(ok, "{err}");
    let killed = tmp.path().join("killed");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dpo"));
    cmd.current_dir(root())
        .args(args(&killed, &["loss.kind=\"listwise\""]));
    let newest = e2e::kill_once_written(&mut cmd, &killed.join("checkpoint-000020"), &killed);
    let mut resume = args(&killed, &["loss.kind=\"listwise\""]);
    resume.extend(["--resume".into(), newest.display().to_string()]);
    let (ok, stdout, err) = run(&resume);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("reference log-probabilities read from"),
        "{stdout}"
    );
    e2e::assert_same_runs(
        &full,
        &killed,
        &["final/model.safetensors"],
        &format!("kill -9 and resume from {}", newest.display()),
    );
}

#[test]
fn bad_input_is_one_clear_error_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never");
    for (sets, want) in [
        (&["data.ties=\"keep\""][..], "`data.ties`"),
        (
            &["loss.kind=\"ipo\"", "loss.label_smoothing=0.2"][..],
            "`loss.label_smoothing`",
        ),
        (
            &["loss.label_smoothing=0.5"][..],
            "`loss.label_smoothing` = 0.5 is out of range",
        ),
        (&["loss.beta=0"][..], "`loss.beta` = 0 is out of range"),
        (&["loss.kind=\"dpo\""][..], "loss.kind"),
        (
            &["data.demonstrations=\"datasets/demo/task/demonstrations.jsonl\""][..],
            "`data.demonstrations`",
        ),
        (
            &["data.path=datasets/demo/task/nothing.csv"][..],
            "nothing.csv",
        ),
        (
            &["model.policy=/nonexistent/policy"][..],
            "/nonexistent/policy",
        ),
        (&["data.max_length=3"][..], "data.max_length"),
    ] {
        let (ok, _, err) = run(&args(&out, sets));
        assert!(!ok, "{sets:?} succeeded");
        assert!(err.contains(want), "{sets:?}: {err}");
        assert!(!out.exists(), "{sets:?} left {}", out.display());
    }
}

/// The sources `reward` reads, through the same readers: a `labeling import` folder (its K-way
/// groups, and its pairs), and the real public data in ../shared/data (OpenAssistant ranked
/// groups listwise, HH-RLHF pairs) from a tiny model with a BPE trained on a slice of them; the
/// held-out accuracy and its interval are printed, whatever they are.
#[test]
fn every_preference_source_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let labels = tmp.path().join("labels");
    e2e::run(
        "labeling",
        &[
            "import",
            "datasets/demo/task/rankings.csv",
            "--out",
            labels.to_str().unwrap(),
        ],
    );
    let mut sources = vec![
        ("import-groups", labels.clone(), "import", "sigmoid", "true"),
        ("import-pairs", labels.clone(), "import", "sigmoid", "false"),
    ];
    let shared = root().join("../shared/data/preference");
    let (oasst, hh) = (
        shared.join("oasst_en_100_tree.jsonl"),
        shared.join("hh-rlhf_harmless-base_test.jsonl.gz"),
    );
    let real = oasst.exists() && hh.exists();
    if real {
        sources.push(("oasst", oasst.clone(), "oasst", "listwise", "true"));
        sources.push(("hh", hh, "hh_rlhf", "sigmoid", "true"));
    } else {
        eprintln!("skipped the real data: ../shared/data is absent");
    }
    for (name, path, kind, loss, groups) in sources {
        let policy = if name.starts_with("import") {
            sft_policy().to_path_buf()
        } else {
            let texts = tmp.path().join("texts.txt");
            let mut t = std::fs::read_to_string(&oasst).unwrap();
            t.truncate(t.floor_char_boundary(300_000));
            std::fs::write(&texts, t).unwrap();
            let dir = tmp.path().join("base");
            if !dir.exists() {
                e2e::run(
                    "model",
                    &[
                        "init",
                        "--preset",
                        "tiny",
                        "--vocab-size",
                        "512",
                        "--texts",
                        texts.to_str().unwrap(),
                        "--out",
                        dir.to_str().unwrap(),
                    ],
                );
            }
            dir
        };
        let out = tmp.path().join(name);
        let sets = [
            format!("model.policy={}", policy.display()),
            format!("data.path={}", path.display()),
            format!("data.kind=\"{kind}\""),
            format!("data.use_groups={groups}"),
            format!("loss.kind=\"{loss}\""),
            format!("out={}", out.display()),
            "data.max_length=256".into(),
            "data.max_groups=400".into(),
            "train.max_steps=20".into(),
            "train.eval_every=0".into(),
            "train.save_every=0".into(),
        ];
        let mut a: Vec<String> = vec!["--config".into(), "configs/dpo.toml".into()];
        for s in &sets {
            a.push("--set".into());
            a.push(s.clone());
        }
        let (ok, stdout, err) = run(&a);
        assert!(ok, "{name}: {err}");
        let summary: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap())
                .unwrap();
        let v = &summary["validation"]["pairwise"];
        let (acc, lo, hi) = (
            v["accuracy"].as_f64().unwrap(),
            v["low"].as_f64().unwrap(),
            v["high"].as_f64().unwrap(),
        );
        println!(
            "{name}: validation accuracy {acc:.3} [{lo:.3}, {hi:.3}] on {} pairs\n{stdout}",
            v["total"]
        );
        assert!(v["total"].as_u64().unwrap() > 10, "{name}: {v}");
        assert!(lo <= acc && acc <= hi && acc.is_finite());
        if name == "import-pairs" {
            assert_eq!(
                summary["validation"]["by_k"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .collect::<Vec<_>>(),
                ["2"],
                "pairs are K = 2 groups"
            );
        }
    }
}

/// `[lora]`: DPO trains the adapters alone (the reference is the frozen policy), their
/// implicit rewards still learn the rankings, and final/ has the merged policy and adapter/.
#[test]
fn lora_dpo_learns_with_adapters_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lora");
    let (ok, _, err) = run(&args(
        &out,
        &[
            "lora.r=8",
            "lora.alpha=16",
            "lora.target_modules=[\"all-linear\"]",
            "train.lr=1e-3",
        ],
    ));
    assert!(ok, "{err}");
    assert!(
        out.join("final/adapter/adapter_model.safetensors")
            .is_file()
    );
    let m = metrics(&out);
    let acc: Vec<f64> = m
        .iter()
        .filter_map(|l| l["eval_accuracy"].as_f64())
        .collect();
    assert!(acc.len() >= 2, "{m:?}");
    let state = std::fs::metadata(out.join("checkpoint-000060/trainer_state/optimizer.bpk"))
        .unwrap()
        .len();
    let weights = std::fs::metadata(out.join("final/model.safetensors"))
        .unwrap()
        .len();
    // Full fine-tuning keeps two moments per weight (2× model.safetensors).
    assert!(
        state * 2 < weights,
        "adapter state only: {state} vs {weights}"
    );
    assert!(
        acc.last().unwrap() > &0.55,
        "held-out accuracy of the implicit reward: {acc:?}"
    );
}
