//! One turn of the data flywheel through the real binaries on tiny configs: sft → a reward
//! ensemble → ppo → a sheet from the PPO policy (its stored template) → simulated labelers rank
//! it by the gold rule → the first rankings and the sheet imported together → each member
//! continues on old + new groups → ppo continues from its policy with the SFT model as the KL
//! reference.

use e2e::{output, root, run};

fn first_metrics(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(text.lines().next().unwrap()).unwrap()
}

#[test]
fn sheet_from_the_policy_ranked_by_gold_then_reward_and_ppo_continue() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_string_lossy().into_owned();
    let task = "datasets/demo/task";

    run(
        "sft",
        &[
            "--config",
            "configs/sft.toml",
            "--out",
            &t("sft"),
            "--set",
            "train.max_steps=150",
            "--set",
            "train.save_every=0",
        ],
    );
    run(
        "labeling",
        &[
            "import",
            &format!("{task}/rankings.csv"),
            "--out",
            &t("labels-1"),
        ],
    );
    let reward_args = |out: &str, base: &str, labels: &str| -> Vec<String> {
        [
            "--config",
            "configs/reward.toml",
            "--out",
            out,
            "--set",
            &format!("model.base={base}"),
            "--set",
            &format!("data.path={labels}"),
            "--set",
            "ensemble.members=2",
            "--set",
            "train.max_steps=20",
            "--set",
            "train.save_every=0",
        ]
        .map(String::from)
        .to_vec()
    };
    let args = reward_args(&t("rm-1"), &t("sft/final"), &t("labels-1"));
    run(
        "reward",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let ppo_args = |out: &str, policy: &str, rm: &str| -> Vec<String> {
        [
            "--config",
            "configs/ppo.toml",
            "--out",
            out,
            "--set",
            &format!("model.policy={policy}"),
            "--set",
            &format!("model.reference={}", t("sft/final")),
            "--set",
            &format!("model.reward_model={rm}"),
            "--set",
            "train.iterations=6",
            "--set",
            "train.lr=3e-4",
            "--set",
            "train.save_every=0",
        ]
        .map(String::from)
        .to_vec()
    };
    let args = ppo_args(&t("ppo-1"), &t("sft/final"), &t("rm-1/final"));
    run("ppo", &args.iter().map(String::as_str).collect::<Vec<_>>());
    // From the SFT policy with the SFT reference, the first rollout's KL is exactly 0.
    let m = first_metrics(&tmp.path().join("ppo-1/metrics.jsonl"));
    assert!(m["kl_per_response"].as_f64().unwrap().abs() < 1e-6, "{m}");

    // The sheet: 24 prompts, K = 3, round-1 ids. Without --template the PPO policy's stored one
    // ("Human: ...", which ppo copied from the SFT folder) is used: the same sheet as with it
    // given, another with the bare prompt.
    let prompts: String = std::fs::read_to_string(root().join(task).join("prompts.jsonl"))
        .unwrap()
        .lines()
        .take(24)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(t("sheet-prompts.jsonl"), prompts).unwrap();
    let sheet = |out: &str, template: Option<&str>| {
        let mut a = vec![
            "export-sheet".to_string(),
            "--policy".into(),
            t("ppo-1/final"),
            "--prompts".into(),
            t("sheet-prompts.jsonl"),
            "--k".into(),
            "3".into(),
            "--id-prefix".into(),
            "r1-".into(),
            "--max-new-tokens".into(),
            "16".into(),
            "--seed".into(),
            "2".into(),
            "--out".into(),
            t(out),
        ];
        if let Some(tpl) = template {
            a.extend(["--template".into(), tpl.into()]);
        }
        run(
            "labeling",
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        std::fs::read_to_string(t(out)).unwrap()
    };
    let stored = sheet("sheet.csv", None);
    assert_eq!(
        stored,
        sheet("sheet-given.csv", Some("Human: {prompt}\\n\\nAssistant:"))
    );
    assert_ne!(stored, sheet("sheet-bare.csv", Some("{prompt}")));
    assert!(stored.lines().nth(1).unwrap().starts_with("r1-1,"));
    // The policy (r1, r3) and the SFT model (r2) side by side, duplicates left out: every
    // prompt kept has two or more distinct responses.
    let out = run(
        "labeling",
        &[
            "export-sheet",
            "--policy",
            &t("ppo-1/final"),
            "--policy",
            &t("sft/final"),
            "--prompts",
            &t("sheet-prompts.jsonl"),
            "--k",
            "3",
            "--distinct",
            "--max-new-tokens",
            "16",
            "--seed",
            "2",
            "--out",
            &t("sheet-mixed.csv"),
        ],
    );
    assert!(out.contains("duplicate responses"), "{out}");
    let read = |p: &str| -> Vec<csv::StringRecord> {
        csv::Reader::from_path(t(p))
            .unwrap()
            .records()
            .map(|r| r.unwrap())
            .collect()
    };
    let mut by_prompt: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for r in &read("sheet-mixed.csv") {
        by_prompt
            .entry(r[0].to_string())
            .or_default()
            .push(r[3].trim().to_string());
    }
    assert!(!by_prompt.is_empty());
    for (id, rs) in &by_prompt {
        let distinct: std::collections::BTreeSet<&String> = rs.iter().collect();
        assert!(rs.len() >= 2 && distinct.len() == rs.len(), "{id}: {rs:?}");
    }

    let out = run(
        "labeling",
        &[
            "simulate-labelers",
            "--sheet",
            &t("sheet.csv"),
            "--gold",
            "final_answer",
            "--answers",
            &format!("{task}/prompts.jsonl"),
            "--out",
            &t("ranked.csv"),
        ],
    );
    assert!(
        out.contains("labeling cost: 24 prompts, 72 responses, 3 labelers, 216 rows ranked"),
        "{out}"
    );
    run(
        "labeling",
        &[
            "import",
            &format!("{task}/rankings.csv"),
            &t("ranked.csv"),
            "--out",
            &t("labels-2"),
        ],
    );
    let stats = |dir: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join(dir)).unwrap()).unwrap()
    };
    let (s1, s2) = (stats("labels-1/stats.json"), stats("labels-2/stats.json"));
    assert_eq!(
        s2["prompts"].as_u64().unwrap(),
        s1["prompts"].as_u64().unwrap() + 24
    );
    assert_eq!(
        s2["groups"].as_u64().unwrap(),
        s1["groups"].as_u64().unwrap() + 24 * 3
    );

    // Each member continues its own model: a count that differs is refused, naming both.
    let mut bad = reward_args(&t("rm-bad"), &t("rm-1/final"), &t("labels-2"));
    bad.extend(["--set".into(), "ensemble.members=3".into()]);
    let o = output(
        "reward",
        &bad.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("ensemble of 2 members"),
        "{e}"
    );
    assert!(!tmp.path().join("rm-bad").exists());
    // With a learning rate too small to move an f32 weight, each continued member is its old
    // self byte for byte (and not another member): member i continues member i.
    let mut still = reward_args(&t("rm-still"), &t("rm-1/final"), &t("labels-2"));
    still.extend(["--set".into(), "train.lr=1e-30".into()]);
    run(
        "reward",
        &still.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let weights = |d: &str| std::fs::read(tmp.path().join(d).join("model.safetensors")).unwrap();
    for m in ["member-0", "member-1", "monitor"] {
        assert!(
            weights(&format!("rm-still/final/{m}")) == weights(&format!("rm-1/final/{m}")),
            "{m}"
        );
    }
    assert!(weights("rm-still/final/member-1") != weights("rm-1/final/member-0"));
    let args = reward_args(&t("rm-2"), &t("rm-1/final"), &t("labels-2"));
    run(
        "reward",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let cfg = std::fs::read_to_string(tmp.path().join("rm-2/member-1/config.toml")).unwrap();
    assert!(
        cfg.contains(&format!("base = \"{}\"", t("rm-1/final/member-1"))),
        "{cfg}"
    );

    // PPO continues from its policy; the KL is to the SFT model, so not 0 from the start.
    let args = ppo_args(&t("ppo-2"), &t("ppo-1/final"), &t("rm-2/final"));
    run("ppo", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let m = first_metrics(&tmp.path().join("ppo-2/metrics.jsonl"));
    assert!(m["kl_per_response"].as_f64().unwrap() > 1e-3, "{m}");
    let cfg = std::fs::read_to_string(tmp.path().join("ppo-2/config.toml")).unwrap();
    assert!(
        cfg.contains(&format!("reference = \"{}\"", t("sft/final"))),
        "{cfg}"
    );
}
