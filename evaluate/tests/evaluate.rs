//! `evaluate` end to end: tiny models built through the real stages (sft on the demo
//! demonstrations → a reward model on the demo rankings → a few PPO iterations), then `evaluate`
//! on them: every artifact exists and parses, the numbers are finite, intervals contain their
//! means, a model against itself ties, and bad inputs are clear errors that write nothing.
//!
//! The stages run through their binaries in target/release when those are built (as
//! `cargo test --release --workspace` does); otherwise through the same libraries in process.

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn data(p: &str) -> String {
    root()
        .join("datasets/demo/task")
        .join(p)
        .to_string_lossy()
        .into_owned()
}

/// A stage's binary beside this test's (target/release), when built (and
/// `EVALUATE_TEST_IN_PROCESS` is not set).
fn stage_bin(name: &str) -> Option<PathBuf> {
    if std::env::var_os("EVALUATE_TEST_IN_PROCESS").is_some() {
        return None;
    }
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent()?.parent()?.join(name);
    p.exists().then_some(p)
}

/// Runs stage `name` with `--config configs/<name>.toml --out out --set ...`.
fn stage(name: &str, out: &Path, sets: &[String]) {
    let config = root().join(format!("configs/{name}.toml"));
    if let Some(bin) = stage_bin(name) {
        let mut cmd = Command::new(&bin);
        cmd.current_dir(root())
            .arg("--config")
            .arg(&config)
            .arg("--out")
            .arg(out);
        for s in sets {
            cmd.args(["--set", s]);
        }
        let o = cmd.output().unwrap();
        assert!(
            o.status.success(),
            "{} failed:\n{}",
            bin.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        return;
    }
    eprintln!("{name} binary not built; running the stage in process");
    let args = trainer::StageArgs {
        config,
        sets: sets.to_vec(),
        out: Some(out.to_path_buf()),
        resume: None,
        device: None,
        seed: None,
    };
    match name {
        "sft" => {
            let (cfg, used) = args.load::<sft::SftConfig>().unwrap();
            sft::run(&cfg, &used, None).unwrap();
        }
        "reward" => {
            let (cfg, used) = args.load::<reward::RewardConfig>().unwrap();
            reward::run(&cfg, &used, None).unwrap();
        }
        "ppo" => {
            let (cfg, used) = args.load::<ppo::PpoConfig>().unwrap();
            ppo::run(&cfg, &used, None).unwrap();
        }
        _ => unreachable!(),
    }
}

fn evaluate(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_evaluate"))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

use e2e::jsonl;

fn num(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x.is_finite(), "{what} = {x}");
    x
}

/// An estimate {mean, low, high, sd, n}: finite, the interval around the mean.
fn estimate(v: &Value, what: &str) -> f64 {
    let (m, lo, hi) = (
        num(&v["mean"], what),
        num(&v["low"], what),
        num(&v["high"], what),
    );
    assert!(lo <= m && m <= hi, "{what}: {v}");
    assert!(num(&v["sd"], what) >= 0.0);
    m
}

/// A rate or win rate {rate, low, high}: in [0, 1], the interval around it.
fn rate(v: &Value, what: &str) -> f64 {
    let (r, lo, hi) = (
        num(&v["rate"], what),
        num(&v["low"], what),
        num(&v["high"], what),
    );
    assert!(
        (0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi),
        "{what}: {v}"
    );
    assert!(lo <= r && r <= hi, "{what}: {v}");
    r
}

/// Every number anywhere in `v` is finite (serde_json writes NaN as null, checked by the callers).
fn all_finite(v: &Value) {
    match v {
        Value::Number(n) => assert!(n.as_f64().unwrap().is_finite()),
        Value::Array(a) => a.iter().for_each(all_finite),
        Value::Object(o) => o.values().for_each(all_finite),
        _ => {}
    }
}

fn check_model(m: &Value, what: &str, gold: bool, kl: bool, ppl: bool) {
    estimate(&m["reward"], &format!("{what} reward"));
    let len = estimate(&m["length"], &format!("{what} length"));
    assert!((1.0..=24.0).contains(&len), "{what} length {len}");
    rate(&m["eos_rate"], &format!("{what} eos_rate"));
    if gold {
        rate(&m["gold"], &format!("{what} gold"));
    }
    if kl {
        estimate(&m["kl"], &format!("{what} kl"));
    }
    if ppl {
        let p = &m["perplexity"];
        let nll = num(&p["nll"], "nll");
        assert!(nll > 0.0);
        assert!((num(&p["perplexity"], "ppl") - nll.exp()).abs() < 1e-6 * nll.exp());
        assert!(p["tokens"].as_u64().unwrap() > 0);
    }
}

#[test]
fn tiny_pipeline_then_evaluate() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |p: &str| tmp.path().join(p).to_string_lossy().into_owned();
    let set = |k: &str, v: &str| format!("{k}={v}");

    stage(
        "sft",
        &tmp.path().join("sft"),
        &[
            set("data.path", &data("demonstrations.jsonl")),
            "train.max_steps=60".into(),
            "train.eval_every=0".into(),
            "train.save_every=0".into(),
        ],
    );
    stage(
        "reward",
        &tmp.path().join("reward"),
        &[
            set("model.base", &t("sft/final")),
            set("data.path", &data("rankings.csv")),
            set("data.demonstrations", &data("demonstrations.jsonl")),
            "train.max_steps=10".into(),
            // An ensemble of two with the held-out monitor model: the path ppo and evaluate
            // take with the shipped defaults.
            "ensemble.members=2".into(),
            "ensemble.monitor=true".into(),
        ],
    );
    // The ensemble folder: the manifest and both members and the monitor beside it.
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("reward/final/ensemble.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["members"], json!(["member-0", "member-1"]));
    assert_eq!(manifest["monitor"], "monitor");
    for m in ["member-0", "member-1", "monitor"] {
        assert!(
            tmp.path()
                .join("reward/final")
                .join(m)
                .join("model.safetensors")
                .is_file()
        );
    }
    let rs: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("reward/summary.json")).unwrap(),
    )
    .unwrap();
    let e = &rs["ensemble"];
    assert_eq!(e["members"].as_array().unwrap().len(), 2);
    // Two seeds and two bootstrap resamples: the members differ, but agree more than not.
    let corr = num(&e["mean_pairwise_correlation"], "correlation");
    assert!(corr < 0.9999 && corr > -1.0, "{corr}");
    assert!(num(&e["mean_std"], "mean std") > 0.0);
    assert_eq!(e["members"][1]["seed"], 1);
    stage(
        "ppo",
        &tmp.path().join("ppo"),
        &[
            set("model.policy", &t("sft/final")),
            set("model.reward_model", &t("reward/final")),
            set("data.prompts", &data("prompts.jsonl")),
            "train.iterations=3".into(),
            "rollout.batch_size=8".into(),
            "monitor.window=2".into(),
            "monitor.gold=\"final_answer\"".into(),
        ],
    );
    // ppo scored every rollout with the ensemble and the held-out monitor, and kept best/.
    let ppo_lines = jsonl(&tmp.path().join("ppo/metrics.jsonl"));
    assert_eq!(ppo_lines.len(), 3);
    for l in &ppo_lines {
        num(&l["heldout_score_mean"], "heldout_score_mean");
        num(&l["proxy_mean"], "proxy_mean");
        assert!(num(&l["ensemble_std"], "ensemble_std") > 0.0);
        // mean − 1·std over the members, averaged: below the members' mean (EOS penalties
        // aside, which both share).
        assert!(num(&l["score_mean"], "score_mean") <= num(&l["proxy_mean"], "proxy") + 1e-6);
        assert!(l["overoptimization_warning"].is_boolean());
        // monitor.gold: the share of the 8 responses the rule scores 1, logged only.
        let g = num(&l["gold_mean"], "gold_mean");
        assert!(
            (0.0..=1.0).contains(&g) && (g * 8.0 - (g * 8.0).round()).abs() < 1e-9,
            "{g}"
        );
    }
    assert!(tmp.path().join("ppo/best/model.safetensors").is_file());
    let ps: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("ppo/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ps["best_iteration"], 3);

    let prompts = data("eval_prompts.jsonl");
    let demos = data("demonstrations.jsonl");
    let (sft, rm, pol) = (t("sft/final"), t("reward/final"), t("ppo/final"));
    let (rs, rr, rp) = (t("sft"), t("reward"), t("ppo"));
    let out = t("eval");
    let args = |out: &str| {
        vec![
            "--policy".to_string(),
            pol.clone(),
            "--baseline".into(),
            sft.clone(),
            "--reward-model".into(),
            rm.clone(),
            "--prompts".into(),
            prompts.clone(),
            "--max-prompts".into(),
            "12".into(),
            "--samples-per-prompt".into(),
            "2".into(),
            "--demonstrations".into(),
            demos.clone(),
            "--max-new-tokens".into(),
            "24".into(),
            "--batch-size".into(),
            "5".into(),
            "--seed".into(),
            "3".into(),
            "--out".into(),
            out.to_string(),
            "--runs".into(),
            rs.clone(),
            rr.clone(),
            rp.clone(),
        ]
    };
    let run = |out: &str| {
        let a = args(out);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let (ok, stdout, err) = evaluate(&refs);
        assert!(ok, "evaluate failed:\n{err}\n{stdout}");
        stdout
    };
    let stdout = run(&out);
    let report = Path::new(&out).join("report.md");
    assert!(
        stdout
            .trim_end()
            .ends_with(&format!("report: {}", report.display())),
        "{stdout}"
    );

    // metrics.json: finite numbers, intervals around their means, rates in [0, 1].
    let dir = Path::new(&out);
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap();
    all_finite(&m);
    assert_eq!(m["settings"]["prompts"], 12);
    assert_eq!(m["settings"]["gold_rule"], "exact_answer");
    assert_eq!(m["policy"]["responses"], 24);
    check_model(&m["policy"], "policy", true, true, true);
    check_model(&m["baseline"], "baseline", true, false, true);
    assert_eq!(m["baseline"]["kl_note"], "0 (the reference)");
    for k in ["reward", "gold", "heldout_reward", "length", "eos_rate"] {
        estimate(&m["difference"][k], &format!("difference {k}"));
    }
    estimate(&m["policy"]["heldout_reward"], "policy heldout_reward");
    assert!(
        m["settings"]["heldout_reward_model"]
            .as_str()
            .unwrap()
            .ends_with("monitor")
    );
    // The paired difference of means is the difference of the means.
    let d = num(&m["difference"]["reward"]["mean"], "d");
    let (a, b) = (
        num(&m["policy"]["reward"]["mean"], "a"),
        num(&m["baseline"]["reward"]["mean"], "b"),
    );
    assert!((d - (a - b)).abs() < 1e-9);
    for k in ["win_rate", "gold_win_rate"] {
        rate(&m[k], k);
        let w = &m[k];
        let n = w["n"].as_u64().unwrap();
        assert_eq!(n, 24);
        assert_eq!(
            w["wins"].as_u64().unwrap()
                + w["ties"].as_u64().unwrap()
                + w["losses"].as_u64().unwrap(),
            n
        );
    }
    assert!(!m["findings"].as_array().unwrap().is_empty());

    // samples.jsonl: one line per prompt × sample, both models' sides.
    let samples = jsonl(&dir.join("samples.jsonl"));
    assert_eq!(samples.len(), 24);
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(s["sample"], i % 2);
        assert!(s["prompt"].is_string() && s["answer"].is_string());
        for side in ["policy", "baseline"] {
            assert!(s[side]["response"].is_string(), "{s}");
            num(&s[side]["reward"], "reward");
            let g = num(&s[side]["gold"], "gold");
            assert!(g == 0.0 || g == 1.0);
            assert!(s[side]["eos"].is_boolean());
        }
        num(&s["policy"]["kl"], "kl");
    }
    let mean: f64 = samples
        .iter()
        .map(|s| s["policy"]["reward"].as_f64().unwrap())
        .sum::<f64>()
        / 24.0;
    assert!((mean - a).abs() < 1e-9);

    // report.md: the table, the samples, the plots.
    let md = std::fs::read_to_string(&report).unwrap();
    for want in [
        "| metric | policy | baseline | difference (policy − baseline) |",
        "| reward (reward model) |",
        "| reward (held-out reward model) |",
        "| gold reward (exact_answer) |",
        "| win rate over baseline (reward) |",
        "| KL from reference (nats / response) |",
        "| perplexity on demonstrations |",
        "## Samples",
        "### 5.",
        "![ppo_score_vs_kl.png](ppo_score_vs_kl.png)",
        "![ppo_gold_vs_kl.png](ppo_gold_vs_kl.png)",
        "## Distributions",
        "![reward_distribution.png](reward_distribution.png)",
        "![reward_vs_length.png](reward_vs_length.png)",
    ] {
        assert!(md.contains(want), "report.md lacks {want:?}:\n{md}");
    }

    // The plots: one per recognised kind, PNG files of some size.
    for f in [
        "sft_loss.png",
        "reward_accuracy.png",
        "ppo_score.png",
        "ppo_kl.png",
        "ppo_response_length.png",
        "ppo_score_vs_kl.png",
        // The run logged monitor.gold.
        "ppo_gold_vs_kl.png",
        // The evaluation's own.
        "reward_distribution.png",
        "heldout_reward_distribution.png",
        "reward_vs_length.png",
        "gold_by_length.png",
    ] {
        let bytes = std::fs::read(dir.join(f)).unwrap_or_else(|_| panic!("{f} missing"));
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{f}");
        assert!(bytes.len() > 3000, "{f}: {} bytes", bytes.len());
    }
    assert_eq!(m["plots"].as_array().unwrap().len(), 7, "{}", m["plots"]);
    assert_eq!(
        m["evaluation_plots"],
        json!([
            "reward_distribution.png",
            "heldout_reward_distribution.png",
            "reward_vs_length.png",
            "gold_by_length.png"
        ])
    );
    for who in ["policy", "baseline"] {
        let c = &m[who]["reward_length_correlation"];
        let (r, lo, hi) = (num(&c["r"], who), num(&c["low"], who), num(&c["high"], who));
        assert!(-1.0 <= lo && lo <= r && r <= hi && hi <= 1.0, "{who}: {c}");
        assert_eq!(c["n"], 24);
    }
    assert!(
        md.contains("Pearson r of reward with response length (95% Fisher interval): policy "),
        "{md}"
    );
    // No temporary folder is left beside the output.
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // Seeded: a second run gives the same samples and numbers.
    let out2 = t("eval2");
    run(&out2);
    for f in ["samples.jsonl", "metrics.json"] {
        assert_eq!(
            std::fs::read_to_string(dir.join(f)).unwrap(),
            std::fs::read_to_string(Path::new(&out2).join(f)).unwrap(),
            "{f} differs between two runs"
        );
    }

    best_of_n(dir, &args(&t("bon")));

    // A model against itself: the same responses, KL 0, every comparison a tie.
    let same = t("same");
    let (ok, _, err) = evaluate(&[
        "--policy",
        &sft,
        "--baseline",
        &sft,
        "--reward-model",
        &rm,
        "--prompts",
        &prompts,
        "--max-prompts",
        "6",
        "--max-new-tokens",
        "16",
        "--out",
        &same,
    ]);
    assert!(ok, "{err}");
    let m: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&same).join("metrics.json")).unwrap(),
    )
    .unwrap();
    let kl = estimate(&m["policy"]["kl"], "self kl");
    assert!(kl.abs() < 1e-3, "KL of a model from itself: {kl}");
    assert_eq!(m["win_rate"]["ties"], 6);
    assert_eq!(m["win_rate"]["rate"], 0.5);
    assert_eq!(m["difference"]["reward"]["mean"], 0.0);
    assert!(m["plots"].as_array().unwrap().is_empty());
    // Without --runs the evaluation's own plots are still written, listed and linked (the
    // prompts have answers: gold by default; the ensemble has its held-out monitor).
    let own = [
        "reward_distribution.png",
        "heldout_reward_distribution.png",
        "reward_vs_length.png",
        "gold_by_length.png",
    ];
    assert_eq!(m["evaluation_plots"], json!(own));
    let md = std::fs::read_to_string(Path::new(&same).join("report.md")).unwrap();
    assert!(
        md.contains("## Distributions") && !md.contains("## Training runs"),
        "{md}"
    );
    for f in own {
        let bytes =
            std::fs::read(Path::new(&same).join(f)).unwrap_or_else(|_| panic!("{f} missing"));
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{f}");
        assert!(bytes.len() > 3000, "{f}: {} bytes", bytes.len());
        assert!(
            md.contains(&format!("![{f}]({f})")),
            "report.md lacks {f}:\n{md}"
        );
    }

    bad_inputs(tmp.path(), &pol, &sft, &rm);
    // An ensemble folder given as a policy is named for what it is.
    let (ok, _, err) = evaluate(&[
        "--policy",
        &rm,
        "--reward-model",
        &rm,
        "--prompts",
        &prompts,
        "--out",
        &t("bad_ensemble"),
    ]);
    assert!(!ok);
    assert!(
        err.contains("--policy") && err.contains("reward-model ensemble"),
        "{err}"
    );
}

/// `--best-of-n 4` on the run of `dir` (`args` are its flags, for another --out): the baseline's
/// best of 4 per (prompt, sample) is the best of its candidates by the reward model (a finished
/// one first, ties to the first), scores above the baseline and its own candidates, gets the
/// analytic KL ln 4 − 3/4, a column in the report and a side in samples.jsonl; the policy's and
/// baseline's numbers are those of the run without it.
fn best_of_n(dir: &Path, args: &[String]) {
    let out = Path::new(&args[args.iter().position(|a| a == "--out").unwrap() + 1]).to_path_buf();
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    a.extend(["--best-of-n", "4"]);
    let (ok, stdout, err) = evaluate(&a);
    assert!(ok, "evaluate --best-of-n failed:\n{err}\n{stdout}");
    let read = |d: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("metrics.json")).unwrap()).unwrap()
    };
    let (m, before) = (read(&out), read(dir));
    all_finite(&m);
    assert_eq!(m["policy"], before["policy"]);
    assert_eq!(m["baseline"], before["baseline"]);
    assert!(before.get("best_of_n").is_none_or(Value::is_null));
    let b = &m["best_of_n"];
    check_model(b, "best_of_n", true, false, false);
    assert_eq!(b["n"], 4);
    assert_eq!(b["responses"], 24);
    assert_eq!(b["dir"], m["baseline"]["dir"]);
    // The analytic KL, exactly: ln 4 − 3/4 = 0.6363 nats.
    assert_eq!(num(&b["kl_analytic"], "kl_analytic"), 4f64.ln() - 3.0 / 4.0);
    assert_eq!(b["kl_note"], "≤ 0.636 (log N − (N−1)/N)");
    assert!(b["kl"].is_null());
    // Every response the best of its 4 candidates.
    let samples = jsonl(&out.join("samples.jsonl"));
    assert_eq!(samples.len(), 24);
    let mut candidates = Vec::new();
    for s in &samples {
        let side = &s["best_of_n"];
        let r: Vec<f64> = side["candidate_rewards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| num(x, "candidate"))
            .collect();
        let eos: Vec<bool> = side["candidate_eos"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_bool().unwrap())
            .collect();
        assert_eq!((r.len(), eos.len()), (4, 4));
        let k = reward::best_of_n::best(&r, &eos).unwrap();
        assert_eq!(num(&side["reward"], "reward"), r[k], "{s}");
        assert_eq!(side["eos"], eos[k], "{s}");
        candidates.extend(r);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let chosen: Vec<f64> = samples
        .iter()
        .map(|s| num(&s["best_of_n"]["reward"], "r"))
        .collect();
    let best = num(&b["reward"]["mean"], "best-of-4 reward");
    assert!((best - mean(&chosen)).abs() < 1e-9);
    assert!((num(&b["candidate_reward"]["mean"], "candidates") - mean(&candidates)).abs() < 1e-9);
    let baseline = num(&m["baseline"]["reward"]["mean"], "baseline reward");
    // What choosing buys: above the baseline's samples and above its own candidates.
    assert!(best > baseline, "best-of-4 {best} vs baseline {baseline}");
    assert!(
        best > mean(&candidates),
        "best-of-4 {best} vs its candidates {}",
        mean(&candidates)
    );
    // The report: a column, the finding, the note; stdout: the line.
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for want in [
        "| metric | policy | baseline | best-of-4 (baseline) | difference (policy − baseline) |",
        "| ≤ 0.636 (log N − (N−1)/N) |",
        "Best-of-4 of the baseline, without training: reward ",
        "| | policy | baseline | best-of-4 (baseline) |",
    ] {
        assert!(md.contains(want), "report.md lacks {want:?}:\n{md}");
    }
    assert!(
        stdout.contains(&format!(
            "best-of-4 (baseline) reward {best:.3} [{:.3}, {:.3}] at KL <= 0.636 nats",
            num(&b["reward"]["low"], "low"),
            num(&b["reward"]["high"], "high")
        )),
        "{stdout}"
    );
}

/// Bad inputs: one clear error naming the file, line or field; exit ≠ 0; nothing written.
fn bad_inputs(tmp: &Path, policy: &str, sft: &str, ensemble: &str) {
    // One reward model (an ensemble's member) where a causal LM belongs.
    let member = Path::new(ensemble).join("member-0");
    let rm = member.to_str().unwrap();
    let out = tmp.join("bad");
    let o = out.to_str().unwrap();
    let prompts = data("eval_prompts.jsonl");
    let empty = tmp.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let no_answer = tmp.join("no_answer.jsonl");
    std::fs::write(
        &no_answer,
        "{\"prompt\": \"What is 1 + 1?\", \"answer\": \"2\"}\n{\"prompt\": \"Say hi.\"}\n",
    )
    .unwrap();
    let no_prompt = tmp.join("no_prompt.jsonl");
    std::fs::write(&no_prompt, "{\"prompt\": \"a\"}\n{\"question\": \"b\"}\n").unwrap();
    let (e, n, p) = (
        empty.to_str().unwrap(),
        no_answer.to_str().unwrap(),
        no_prompt.to_str().unwrap(),
    );
    let common = [
        "--policy",
        policy,
        "--reward-model",
        rm,
        "--prompts",
        &prompts,
    ];
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--policy", rm, "--reward-model", rm, "--prompts", &prompts],
            vec!["--policy", "no LM head", "reward or value model"],
        ),
        (
            vec![
                "--policy",
                policy,
                "--baseline",
                rm,
                "--reward-model",
                rm,
                "--prompts",
                &prompts,
            ],
            vec!["--baseline", "no LM head"],
        ),
        (
            vec![
                "--policy",
                policy,
                "--reward-model",
                sft,
                "--prompts",
                &prompts,
            ],
            vec!["--reward-model", "no scalar head", "causal LM"],
        ),
        (
            vec!["--policy", policy, "--reward-model", rm, "--prompts", e],
            vec!["empty.jsonl", "no prompts"],
        ),
        (
            vec!["--policy", policy, "--reward-model", rm, "--prompts", n],
            vec!["no_answer.jsonl line 2, field `answer`", "exact_answer"],
        ),
        (
            vec![
                "--policy",
                policy,
                "--reward-model",
                rm,
                "--prompts",
                n,
                "--gold",
                "exact_answer",
            ],
            vec!["no_answer.jsonl line 2, field `answer`"],
        ),
        (
            vec!["--policy", policy, "--reward-model", rm, "--prompts", p],
            vec!["no_prompt.jsonl line 2, field `prompt`: missing"],
        ),
        (
            [&common[..], &["--gold", "fuzzy"]].concat(),
            vec!["--gold", "unknown rule"],
        ),
        (
            [&common[..], &["--runs", e]].concat(),
            vec!["--runs", "metrics.jsonl"],
        ),
        (
            [&common[..], &["--best-of-n", "4"]].concat(),
            vec!["--best-of-n needs --baseline"],
        ),
        (
            [&common[..], &["--baseline", sft, "--best-of-n", "0"]].concat(),
            vec!["--best-of-n must be at least 1"],
        ),
        (
            [
                &common[..],
                &["--baseline", sft, "--best-of-n", "4", "--temperature", "0"],
            ]
            .concat(),
            vec!["--best-of-n needs --temperature > 0"],
        ),
        (
            // A negative number is read as a value, and its range is the error.
            [&common[..], &["--temperature", "-1", "--top-p", "1.5"]].concat(),
            vec![
                "--temperature -1: must be ≥ 0",
                "--top-p 1.5: must be in (0, 1]",
            ],
        ),
    ];
    for (mut args, wants) in cases {
        args.extend_from_slice(&["--out", o, "--max-prompts", "3", "--max-new-tokens", "4"]);
        let (ok, _, err) = evaluate(&args);
        assert!(!ok, "{args:?} was accepted");
        for w in wants {
            assert!(err.contains(w), "{args:?}: {w:?} not in\n{err}");
        }
        assert_eq!(err.trim().lines().count(), 1, "one error line: {err}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
}
