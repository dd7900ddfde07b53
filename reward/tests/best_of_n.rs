//! `reward best-of-n` end to end through the real binaries, and FeedME / expert iteration: a tiny
//! SFT policy on the demo task, its best of 4 samples by a rule reward written as demonstrations,
//! `sft` trained on them. The chosen are the best of their samples (re-scored by the rule), beat
//! the samples on average, are the same for the same seed; bad input is one clear error that
//! writes nothing.

use e2e::{output, root, run};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Prompts with answers, the first 40 of the demo task's.
const PROMPTS: usize = 40;
const N: usize = 4;

/// An SFT policy on the demo task shared by the tests: a tiny model, 1000 steps (~10 s on two
/// cores; at 400 steps it answers too few prompts right for best-of-4 to have much to choose
/// from), and a prompts file of the first 40 demo prompts.
fn fixture() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static F: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("sft");
        sft(
            &out,
            &[
                "data.path=datasets/demo/task/demonstrations.jsonl".into(),
                "train.max_steps=1000".into(),
            ],
        );
        let all = std::fs::read_to_string(root().join("datasets/demo/task/prompts.jsonl")).unwrap();
        let prompts = tmp.path().join("prompts.jsonl");
        let first: Vec<&str> = all.lines().take(PROMPTS).collect();
        std::fs::write(&prompts, first.join("\n") + "\n").unwrap();
        (tmp, out.join("final"), prompts)
    })
}

/// Runs `sft` with the shipped config, `--out out`, `--set` each of `sets`, and no evaluation or
/// checkpoint on the way; returns its stdout.
fn sft(out: &Path, sets: &[String]) -> String {
    let mut args = vec![
        "--config",
        "configs/sft.toml",
        "--out",
        out.to_str().unwrap(),
    ];
    let quiet = [
        "train.eval_every=0".to_string(),
        "train.save_every=0".into(),
    ];
    for s in sets.iter().chain(&quiet) {
        args.extend(["--set", s]);
    }
    run("sft", &args)
}

use e2e::jsonl;

fn best_of_n(out: &Path, samples: &Path) -> String {
    let (_, policy, prompts) = fixture();
    let n = N.to_string();
    run(
        "reward",
        &[
            "best-of-n",
            "--policy",
            policy.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--rule",
            "exact_answer",
            "--n",
            &n,
            "--max-new-tokens",
            "48",
            "--batch-size",
            "8",
            "--seed",
            "1",
            "--out",
            out.to_str().unwrap(),
            "--samples",
            samples.to_str().unwrap(),
        ],
    )
}

#[test]
fn the_best_of_4_beat_their_samples_and_sft_trains_on_them() {
    let (tmp, policy, prompts) = fixture();
    let (out, samples) = (tmp.path().join("demos.jsonl"), tmp.path().join("all.jsonl"));
    let stdout = best_of_n(&out, &samples);

    let demos = jsonl(&out);
    let all = jsonl(&samples);
    let asked = jsonl(prompts);
    assert_eq!(demos.len(), PROMPTS, "one line per prompt");
    assert_eq!(all.len(), PROMPTS * N);
    let rule = datasets::parse_rule("exact_answer")
        .unwrap()
        .compile()
        .unwrap();
    for (i, (d, p)) in demos.iter().zip(&asked).enumerate() {
        assert_eq!(d["prompt"], p["prompt"], "line {}", i + 1);
        assert_eq!(d["n"], N as u64);
        let group = &all[i * N..(i + 1) * N];
        // The chosen line is one of the prompt's samples: its response, score and EOS.
        let k = d["sample"].as_u64().unwrap() as usize;
        let chosen = &group[k];
        assert_eq!(chosen["sample"], k as u64);
        assert_eq!(chosen["response"], d["response"]);
        assert_eq!(chosen["score"], d["score"]);
        assert_eq!(chosen["eos"], d["eos"]);
        assert!(group.iter().all(|s| s["prompt"] == p["prompt"]));
        // Exactly one sample is marked chosen, the recorded one.
        let marked: Vec<usize> = (0..N)
            .filter(|&j| group[j]["chosen"].as_bool().unwrap())
            .collect();
        assert_eq!(marked, vec![k]);
        // The rule gives the recorded score again.
        let answer = p["answer"].as_str().unwrap();
        let rescored = rule
            .score(d["response"].as_str().unwrap(), Some(answer))
            .unwrap();
        assert_eq!(rescored as f64, d["score"].as_f64().unwrap());
        // The best: no finished sample scores higher, and none before it scores as high.
        let score = |s: &Value| s["score"].as_f64().unwrap();
        let finished = |s: &Value| s["eos"].as_bool().unwrap();
        for (j, s) in group.iter().enumerate() {
            if finished(s) && finished(chosen) {
                assert!(
                    score(s) <= score(chosen),
                    "prompt {i}: sample {j} beats the chosen {k}"
                );
                if j < k {
                    assert!(
                        score(s) < score(chosen),
                        "prompt {i}: a tie goes to the first"
                    );
                }
            }
            assert!(
                finished(chosen) || !finished(s),
                "prompt {i}: a finished sample was passed over"
            );
        }
        let mean = group.iter().map(score).sum::<f64>() / N as f64;
        assert!((d["mean_score"].as_f64().unwrap() - mean).abs() < 1e-12);
    }
    let mean_all = all
        .iter()
        .map(|s| s["score"].as_f64().unwrap())
        .sum::<f64>()
        / all.len() as f64;
    let mean_chosen = demos
        .iter()
        .map(|d| d["score"].as_f64().unwrap())
        .sum::<f64>()
        / demos.len() as f64;
    // Best-of-4 beats sampling once on this data: some prompts are answered right by some samples
    // only.
    assert!(
        mean_chosen > mean_all,
        "chosen {mean_chosen} vs all {mean_all}"
    );
    assert!(
        mean_all > 0.0 && mean_chosen < 1.0,
        "{mean_all} {mean_chosen}"
    );
    // The summary line says the same numbers and the KL of best-of-4, ln 4 − 3/4.
    for want in [
        format!("best-of-4: {PROMPTS} prompts, {} samples", PROMPTS * N),
        format!("mean score of all samples {mean_all:.4}, of the chosen {mean_chosen:.4}"),
        "KL(best-of-4 ‖ policy) ≤ log n − (n−1)/n = 0.6363 nats".into(),
        format!("wrote {}", out.display()),
    ] {
        assert!(stdout.contains(&want), "{want:?} not in {stdout}");
    }
    // Seeded: the same flags give the same files.
    let (out2, samples2) = (
        tmp.path().join("demos2.jsonl"),
        tmp.path().join("all2.jsonl"),
    );
    best_of_n(&out2, &samples2);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
    assert_eq!(
        std::fs::read(&samples).unwrap(),
        std::fs::read(&samples2).unwrap()
    );
    // No temporary file beside the outputs.
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // FeedME / expert iteration: sft continues the policy on its own best samples.
    let feedme = tmp.path().join("feedme");
    let stdout = sft(
        &feedme,
        &[
            format!("model.base={}", policy.display()),
            format!("data.path={}", out.display()),
            "train.max_steps=5".into(),
            "train.batch_size=8".into(),
            "train.lr=1e-4".into(),
        ],
    );
    assert!(stdout.contains("done: 5 steps"), "{stdout}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(feedme.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["steps"], 5, "{summary}");
    // Continued from the policy (a loss near its own level, far below a new model's ~ln 1024),
    // on the 90% of the 40 demonstrations not held out.
    let loss = summary["train_loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0 && loss < 3.0, "{summary}");
    assert!(feedme.join("final/model.safetensors").is_file());
}

#[test]
fn bad_input_is_one_clear_error_that_writes_nothing() {
    let (tmp, policy, prompts) = fixture();
    let dir = tmp.path().join("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("demos.jsonl");
    let no_answer = dir.join("no_answer.jsonl");
    std::fs::write(
        &no_answer,
        "{\"prompt\": \"Compute 1 plus 1.\", \"answer\": \"2\"}\n{\"prompt\": \"Say hi.\"}\n",
    )
    .unwrap();
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let (p, pol, o) = (
        prompts.to_str().unwrap(),
        policy.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let (na, em) = (no_answer.to_str().unwrap(), empty.to_str().unwrap());
    let missing = dir.join("missing");
    let m = missing.to_str().unwrap();
    let with = |policy: &str, prompts: &str, rest: &[&str]| -> Vec<String> {
        let head = [
            "best-of-n",
            "--policy",
            policy,
            "--prompts",
            prompts,
            "--out",
            o,
        ];
        head.iter().chain(rest).map(|s| s.to_string()).collect()
    };
    let rule = ["--rule", "exact_answer"];
    // The shared fixture with a rule and `rest`.
    let ruled = |rest: &[&str]| with(pol, p, &[&rule[..], rest].concat());
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (ruled(&["--n", "0"]), vec!["--n must be at least 1"]),
        (with(pol, p, &[]), vec!["--reward-model DIR or --rule RULE"]),
        (
            ruled(&["--reward-model", pol]),
            vec!["--reward-model and --rule both given"],
        ),
        (
            ruled(&["--top-p", "1.5"]),
            vec!["--top-p 1.5: must be in (0, 1]"],
        ),
        // A negative number is read as a value, and its range is the error.
        (
            ruled(&["--temperature", "-1"]),
            vec!["--temperature -1: must be ≥ 0"],
        ),
        (
            ruled(&["--temperature", "0"]),
            vec!["--temperature 0 is greedy: the 8 samples of a prompt would all be the same"],
        ),
        (
            ruled(&["--uncertainty-coef", "-0.5"]),
            vec!["--uncertainty-coef -0.5: must be ≥ 0"],
        ),
        (
            ruled(&["--batch-size", "0", "--max-new-tokens", "0"]),
            vec![
                "--batch-size must be at least 1",
                "--max-new-tokens must be at least 1",
            ],
        ),
        (
            ruled(&["--col", "prompt"]),
            vec!["--col \"prompt\"", "NAME=COLUMN"],
        ),
        (
            ruled(&["--col", "prompt=question"]),
            vec!["prompts.jsonl line 1", "question"],
        ),
        (
            with(pol, p, &["--rule", "fuzzy"]),
            vec!["--rule \"fuzzy\"", "unknown rule"],
        ),
        (with(m, p, &rule), vec!["--policy", "missing"]),
        (with(pol, m, &rule), vec!["--prompts", "missing"]),
        (with(pol, em, &rule), vec!["empty.jsonl", "no prompts"]),
        (
            with(pol, na, &rule),
            vec!["no_answer.jsonl line 2, field `answer`: missing"],
        ),
        // The SFT policy has no scalar head.
        (
            with(pol, p, &["--reward-model", pol]),
            vec!["--reward-model", "no scalar head"],
        ),
        // The output may not replace the prompts file.
        (
            [
                "best-of-n",
                "--policy",
                pol,
                "--prompts",
                p,
                "--out",
                p,
                "--rule",
                "exact_answer",
            ]
            .map(String::from)
            .to_vec(),
            vec!["--out", "is the prompts file"],
        ),
    ];
    for (args, wants) in cases {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = output("reward", &refs);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{refs:?} was accepted");
        for w in wants {
            assert!(err.contains(w), "{refs:?}: {w:?} not in\n{err}");
        }
        assert_eq!(err.trim().lines().count(), 1, "one error line: {err}");
        assert!(!out.exists(), "{refs:?} wrote {}", out.display());
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.ends_with(".tmp")),
            "{refs:?} left {names:?}"
        );
    }
    assert_eq!(jsonl(prompts).len(), PROMPTS, "the prompts file is intact");
    // An unknown aggregate is clap's error (with its usage hint), naming the flag and the names.
    let args = ruled(&["--ensemble", "median"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = output("reward", &refs);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--ensemble") && err.contains("expected mean, mean_minus_std or min"),
        "{err}"
    );
    assert!(!out.exists());
}
