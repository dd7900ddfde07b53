//! The pipeline as it exists, end to end, through the real binaries on tiny configs:
//! sft on the demo task's demonstrations → sample from the result → export a labeling sheet from
//! the SFT policy → two labelers fill it → import the rankings → a reward model on them → score.

use e2e::{root, run};

#[test]
fn sft_then_sample_then_label_then_import_then_reward() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_string_lossy().into_owned();

    let out = run(
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
    assert!(out.contains("done: 150 steps"), "{out}");
    let info = run("model", &["info", &t("sft/final")]);
    assert!(
        info.contains("LlamaForCausalLM") && info.contains("file dtype      F32"),
        "{info}"
    );

    // The fine-tuned policy answers a task prompt with a number, as the demonstrations do
    // (careful or sloppy; after 150 steps it measured " 6 is smaller than 5. The answer is 6.",
    // not yet right).
    let sample = run(
        "model",
        &[
            "generate",
            &t("sft/final"),
            "--prompt",
            "What is 3 plus 4?",
            "--template",
            "Human: {prompt}\\n\\nAssistant:",
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(sample.trim()).unwrap();
    let completion = v["completion"].as_str().unwrap();
    assert!(
        completion.chars().any(|c| c.is_ascii_digit()),
        "completion {completion:?}"
    );

    // Sheet from the SFT policy on the demo task's first 64 prompts, filled by two labelers,
    // imported.
    let prompts: String = std::fs::read_to_string(root().join("datasets/demo/task/prompts.jsonl"))
        .unwrap()
        .lines()
        .take(64)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(t("prompts.jsonl"), prompts).unwrap();
    run(
        "labeling",
        &[
            "export-sheet",
            "--policy",
            &t("sft/final"),
            "--prompts",
            &t("prompts.jsonl"),
            "--k",
            "3",
            "--out",
            &t("sheet.csv"),
            "--template",
            "Human: {prompt}\\n\\nAssistant:",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0.8",
            "--seed",
            "3",
        ],
    );
    let mut rdr = csv::Reader::from_path(t("sheet.csv")).unwrap();
    let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), 64 * 3);
    let mut w = csv::Writer::from_path(t("filled.csv")).unwrap();
    w.write_record(labeling::import::LONG_HEADER).unwrap();
    for (labeler, ranks) in [("ann", ["1", "2", "3"]), ("bo", ["1", "3", "2"])] {
        for (i, r) in rows.iter().enumerate() {
            w.write_record([&r[0], &r[1], &r[2], &r[3], labeler, ranks[i % 3]])
                .unwrap();
        }
    }
    w.flush().unwrap();
    run(
        "labeling",
        &["import", &t("filled.csv"), "--out", &t("labels")],
    );
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("labels/stats.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(stats["groups"], 128);
    assert_eq!(stats["pairs"], 128 * 3);
    // Per prompt the labelers agree on (r1, r2) and (r1, r3) and disagree on (r2, r3).
    assert!((stats["pairwise_agreement"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);

    // A reward model on the imported K = 3 groups, from the SFT model's trunk; the prompt
    // template travels from the SFT folder (the reward config does not set one).
    let out = run(
        "reward",
        &[
            "--config",
            "configs/reward.toml",
            "--out",
            &t("rm"),
            "--set",
            "ensemble.members=1",
            "--set",
            &format!("model.base={}", t("sft/final")),
            "--set",
            &format!("data.path={}", t("labels")),
            "--set",
            "train.max_steps=20",
        ],
    );
    assert!(
        out.contains("done: 20 steps") && out.contains("validation accuracy"),
        "{out}"
    );
    let info = run("model", &["info", &t("rm/final")]);
    assert!(info.contains("LlamaForSequenceClassification"), "{info}");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("rm/final/rlhf.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["prompt_template"], "Human: {prompt}\n\nAssistant:");
    assert!(
        meta["reward_normalization"]["reference"]
            .as_str()
            .unwrap()
            .starts_with("training responses"),
        "data.demonstrations is off by default: {meta}"
    );
    // Both labelers put the first sampled response first: it should score above the others.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("rm/summary.json")).unwrap())
            .unwrap();
    assert!(summary["validation"]["pairwise"]["total"].as_u64().unwrap() > 0);
    assert!(
        summary["validation"]["human_ceiling"]["accuracy"]
            .as_f64()
            .is_some()
    );

    // `reward score`: one normalised reward per line, in order.
    let lines: String = rows
        .iter()
        .take(5)
        .map(|r| serde_json::json!({"prompt": &r[1], "response": &r[3]}).to_string() + "\n")
        .collect();
    std::fs::write(t("score.jsonl"), lines).unwrap();
    let scored = run(
        "reward",
        &["score", &t("rm/final"), "--input", &t("score.jsonl")],
    );
    let rewards: Vec<f64> = scored
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["reward"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(rewards.len(), 5);
    assert!(rewards.iter().all(|r| r.is_finite()));
}
