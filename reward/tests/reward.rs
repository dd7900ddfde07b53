//! The `reward` binary end to end on tiny models: a learnable preference is learned, K forwards
//! per group, exact resume after kill -9, transformers scores what we save the same, real data,
//! and bad input.

use e2e::root;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `reward` with the repo's config and overrides; returns (success, stdout, stderr).
fn reward(sets: &[String], extra: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reward"));
    cmd.current_dir(root())
        .args(["--config", "configs/reward.toml"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.args(extra).output().expect("running reward");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sets(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A tiny from-scratch base model (random weights, BPE on `texts`), via `model init`.
fn base_model(dir: &Path, texts: &Path) -> PathBuf {
    let out = dir.join("base");
    let st = Command::new(root().join("target/release/model"))
        .args([
            "init",
            "--preset",
            "tiny",
            "--vocab-size",
            "300",
            "--seed",
            "0",
        ])
        .arg("--texts")
        .arg(texts)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("running model init (built by cargo test --workspace)");
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    out
}

/// A deterministic generator (xorshift) for the synthetic data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Ranked groups with a learnable preference: K = 4 responses of random words, ranked by how
/// many times they say "apple" (3, 2, 1, 0 times: ranks 1..4).
fn synthetic_groups(path: &Path, n: usize) {
    let words = ["pear", "plum", "fig", "kiwi", "lime", "date"];
    let mut rng = Rng(0x2545F4914F6CDD1D);
    let mut lines = String::new();
    for i in 0..n {
        let mut responses = Vec::new();
        let mut ranks = Vec::new();
        for (rank, apples) in [(1u32, 3usize), (2, 2), (3, 1), (4, 0)] {
            let mut w: Vec<&str> = (0..5).map(|_| words[rng.below(words.len())]).collect();
            for _ in 0..apples {
                let at = rng.below(w.len() + 1);
                w.insert(at, "apple");
            }
            responses.push(w.join(" "));
            ranks.push(rank);
        }
        // Shuffle the order of the responses within the group.
        for j in (1..4).rev() {
            let k = rng.below(j + 1);
            responses.swap(j, k);
            ranks.swap(j, k);
        }
        lines.push_str(
            &json!({
                "prompt_id": format!("p{i}"),
                "prompt": format!("List some fruit, number {i}."),
                "responses": responses,
                "ranks": ranks,
            })
            .to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(path, lines).unwrap();
}

fn texts_of(groups: &Path, out: &Path) {
    let mut t = String::new();
    for l in std::fs::read_to_string(groups).unwrap().lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        t.push_str(v["prompt"].as_str().unwrap());
        t.push('\n');
        for r in v["responses"].as_array().unwrap() {
            t.push_str(r.as_str().unwrap());
            t.push('\n');
        }
    }
    std::fs::write(out, t).unwrap();
}

/// The rewards `reward score DIR --input INPUT [--raw]` prints, in order.
fn scores(dir: &Path, input: &Path, raw: bool) -> Vec<f64> {
    let mut c = Command::new(env!("CARGO_BIN_EXE_reward"));
    c.arg("score").arg(dir).arg("--input").arg(input);
    if raw {
        c.arg("--raw");
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["reward"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

fn summary(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    data: PathBuf,
    base: PathBuf,
}

fn fixture(groups: usize) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let data = dir.join("groups.jsonl");
    synthetic_groups(&data, groups);
    texts_of(&data, &dir.join("texts.txt"));
    let base = base_model(&dir, &dir.join("texts.txt"));
    Fixture {
        _tmp: tmp,
        dir,
        data,
        base,
    }
}

fn common(f: &Fixture, out: &str) -> Vec<String> {
    vec![
        format!("model.base={}", f.base.display()),
        format!("data.path={}", f.data.display()),
        format!("out={}", f.dir.join(out).display()),
        "data.demonstrations=\"\"".into(),
        "ensemble.members=1".into(),
    ]
}

#[test]
fn a_learnable_preference_is_learned_and_transformers_scores_the_same() {
    let f = fixture(240);
    let mut s = common(&f, "rm");
    s.retain(|x| !x.starts_with("data.demonstrations"));
    s.extend(sets(&[
        "train.max_steps=120",
        "train.lr=2e-3",
        "train.eval_every=60",
        "data.validation_fraction=0.2",
    ]));
    // No demonstrations file: normalise on the training responses.
    let cfg = f.dir.join("rm.toml");
    let text = std::fs::read_to_string(root().join("configs/reward.toml")).unwrap();
    assert!(
        !text
            .lines()
            .any(|l| l.trim_start().starts_with("demonstrations")),
        "configs/reward.toml must leave data.demonstrations off"
    );
    std::fs::write(&cfg, text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reward"));
    cmd.current_dir(root()).arg("--config").arg(&cfg);
    for x in &s {
        cmd.args(["--set", x]);
    }
    let o = cmd.output().unwrap();
    let (stdout, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{err}");
    let out = f.dir.join("rm");
    let sum = summary(&out);
    let acc = sum["validation"]["pairwise"]["accuracy"].as_f64().unwrap();
    let (lo, hi) = (
        sum["validation"]["pairwise"]["low"].as_f64().unwrap(),
        sum["validation"]["pairwise"]["high"].as_f64().unwrap(),
    );
    println!("synthetic held-out accuracy {acc:.3} [{lo:.3}, {hi:.3}]\n{stdout}");
    assert!(acc > 0.95, "held-out pairwise accuracy {acc}");
    assert!(lo < acc && acc <= hi);
    // K = 4 groups: all six pairs of each judged, by gap 1, 2 and 3+.
    assert_eq!(
        sum["validation"]["by_k"]["4"]["total"],
        sum["validation"]["pairwise"]["total"]
    );
    assert!(
        sum["validation"]["by_rank_gap"]["3+"]["total"]
            .as_u64()
            .unwrap()
            > 0
    );
    // The final folder is a sequence classifier with our normalisation beside it.
    let final_dir = out.join("final");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(final_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(config["num_labels"], 1);
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(final_dir.join("rlhf.json")).unwrap())
            .unwrap();
    assert_eq!(meta["stage"], "reward");
    let offset = meta["reward_normalization"]["offset"].as_f64().unwrap();
    assert!(
        meta["reward_normalization"]["reference"]
            .as_str()
            .unwrap()
            .starts_with("training responses")
    );
    // Metrics carry the validation accuracy and the throughput.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("eval_accuracy") && metrics.contains("responses_per_s"));

    // `reward score`: raw = normalised + offset; more apples, more reward.
    let input = f.dir.join("score.jsonl");
    std::fs::write(
        &input,
        [
            json!({"prompt": "List some fruit, number 1.", "response": "apple pear apple fig apple kiwi"}),
            json!({"prompt": "List some fruit, number 1.", "response": "pear fig kiwi lime date"}),
        ]
        .iter()
        .map(|v| v.to_string() + "\n")
        .collect::<String>(),
    )
    .unwrap();
    let (norm, raw) = (
        scores(&final_dir, &input, false),
        scores(&final_dir, &input, true),
    );
    assert_eq!(norm.len(), 2);
    assert!(norm[0] > norm[1], "three apples beat none: {norm:?}");
    for (n, r) in norm.iter().zip(&raw) {
        assert!((n + offset - r).abs() < 1e-4, "{n} + {offset} vs {r}");
    }

    // transformers loads the folder and gives the same raw scores (RLHF_PYTHON set in CI).
    let Ok(python) = std::env::var("RLHF_PYTHON") else {
        eprintln!("skipped the transformers check: set RLHF_PYTHON");
        return;
    };
    let device = model::parse_device("cpu").unwrap();
    let (m, tok, _) =
        model::checkpoint::load_with_tokenizer(&final_dir, None, None, &device).unwrap();
    let template = model::checkpoint::resolve_template(None, Some(&final_dir)).unwrap();
    let rows: Vec<Vec<u32>> = ["apple pear apple", "fig kiwi", "date date apple lime plum"]
        .iter()
        .map(|r| {
            reward::data::fit(
                &tok,
                &template,
                "List some fruit.",
                r,
                64,
                reward::data::Long::Drop,
            )
            .unwrap()
            .unwrap()
            .tokens
        })
        .collect();
    let batch = model::TokenBatch::right_padded(&rows, tok.pad_id);
    let ours = model::ops::to_f32_vec(m.scalar_last(&batch, m.forward(&batch)).unwrap());
    let positions: Vec<Vec<usize>> = (0..batch.batch)
        .map(|r| (0..batch.seq).map(|j| j.min(rows[r].len() - 1)).collect())
        .collect();
    let reference = json!({
        "input_ids": (0..batch.batch).map(|r| batch.row(r).to_vec()).collect::<Vec<_>>(),
        "attention_mask": (0..batch.batch)
            .map(|r| batch.row_mask(r).iter().map(|&b| b as u8).collect::<Vec<_>>())
            .collect::<Vec<_>>(),
        "position_ids": positions,
        "scores": ours,
    });
    let ref_path = f.dir.join("reference.json");
    std::fs::write(&ref_path, reference.to_string()).unwrap();
    let st = Command::new(python)
        .arg(root().join("scripts/check_hf_load.py"))
        .arg(&final_dir)
        .arg(&ref_path)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "transformers disagrees:\n{}{}",
        String::from_utf8_lossy(&st.stdout),
        String::from_utf8_lossy(&st.stderr)
    );
}

/// Ties train as ties: two responses with the same number of apples ranked equal, one without
/// ranked worse; with `ties = "keep"` the tied pair ends much closer than the preferred pair.
#[test]
fn ties_train_as_ties() {
    let f = fixture(8);
    let words = ["pear", "plum", "fig", "kiwi", "lime", "date"];
    let mut rng = Rng(99);
    let mut lines = String::new();
    let mut phrase = |apples: usize| {
        let mut w: Vec<&str> = (0..4).map(|_| words[rng.below(6)]).collect();
        for _ in 0..apples {
            let at = rng.below(w.len() + 1);
            w.insert(at, "apple");
        }
        w.join(" ")
    };
    for i in 0..160 {
        let (a, b, c) = (phrase(2), phrase(2), phrase(0));
        lines.push_str(
            &json!({"prompt_id": format!("t{i}"), "prompt": format!("Fruit {i}?"),
                    "responses": [a, b, c], "ranks": [1, 1, 2]})
            .to_string(),
        );
        lines.push('\n');
    }
    let data = f.dir.join("ties.jsonl");
    std::fs::write(&data, lines).unwrap();
    let out = f.dir.join("ties");
    let (ok, _, err) = reward(
        &[
            format!("model.base={}", f.base.display()),
            format!("data.path={}", data.display()),
            format!("out={}", out.display()),
            "data.ties=\"keep\"".into(),
            "train.max_steps=80".into(),
            "train.lr=2e-3".into(),
            "train.eval_every=0".into(),
        ],
        &[],
    );
    assert!(ok, "{err}");
    let input = f.dir.join("tie_score.jsonl");
    let mut l = String::new();
    for _ in 0..20 {
        for p in [phrase(2), phrase(2), phrase(0)] {
            l.push_str(&json!({"prompt": "Fruit 1000?", "response": p}).to_string());
            l.push('\n');
        }
    }
    std::fs::write(&input, l).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_reward"))
        .arg("score")
        .arg(out.join("final"))
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Vec<f64> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["reward"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let (mut tied, mut preferred) = (0.0, 0.0);
    for c in r.chunks(3) {
        tied += (c[0] - c[1]).abs() / 20.0;
        preferred += ((c[0] + c[1]) / 2.0 - c[2]) / 20.0;
    }
    println!(
        "ties: mean |r_tied_a - r_tied_b| {tied:.3}, mean r_preferred - r_worse {preferred:.3}"
    );
    assert!(preferred > 1.0, "the preference is learned: {preferred}");
    assert!(
        tied < 0.25 * preferred,
        "tied {tied} vs preferred {preferred}"
    );
}

#[test]
fn rewards_do_not_depend_on_pad_side_or_amount() {
    let f = fixture(8);
    let device = model::parse_device("cpu").unwrap();
    let (m, tok, _) =
        model::checkpoint::load_with_tokenizer(&f.base, Some(model::Heads::NONE), None, &device)
            .unwrap();
    let m = m.with_scalar_head(3);
    let row = tok.encode("pear apple fig").unwrap();
    let long = tok
        .encode("kiwi lime date plum pear apple fig kiwi lime")
        .unwrap();
    let alone = model::ops::to_f32_vec(
        reward::rewards_of(&m, std::slice::from_ref(&row), tok.pad_id).unwrap(),
    )[0];
    let right = model::ops::to_f32_vec(
        reward::rewards_of(&m, &[row.clone(), long.clone()], tok.pad_id).unwrap(),
    )[0];
    let left_batch = model::TokenBatch::left_padded(&[row.clone(), long], tok.pad_id);
    let left =
        model::ops::to_f32_vec(m.scalar_last(&left_batch, m.forward(&left_batch)).unwrap())[0];
    assert!(
        (alone - right).abs() < 1e-5,
        "right padding: {alone} vs {right}"
    );
    assert!(
        (alone - left).abs() < 1e-5,
        "left padding: {alone} vs {left}"
    );
}

#[test]
fn killed_and_resumed_run_ends_bit_identical() {
    let f = fixture(64);
    let mut s = common(&f, "full");
    s.extend(sets(&[
        "train.max_steps=16",
        "train.save_every=4",
        "train.keep_last=10",
        "train.eval_every=0",
        "train.log_every=1",
    ]));
    s.retain(|x| !x.starts_with("data.demonstrations"));
    let (ok, _, err) = reward(&s, &[]);
    assert!(ok, "{err}");
    // The same run, killed with SIGKILL once its step-8 checkpoint exists, then resumed.
    let killed = f.dir.join("killed");
    let mut s2: Vec<String> = s
        .iter()
        .filter(|x| !x.starts_with("out="))
        .cloned()
        .collect();
    s2.push(format!("out={}", killed.display()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reward"));
    cmd.current_dir(root())
        .args(["--config", "configs/reward.toml"]);
    for x in &s2 {
        cmd.args(["--set", x]);
    }
    let newest = e2e::kill_once_written(&mut cmd, &killed.join("checkpoint-000008"), &killed);
    let (ok, stdout, err) = reward(&s2, &["--resume", newest.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(stdout.contains("resumed from"), "{stdout}");
    assert_eq!(
        weights(&f.dir.join("full/final")),
        weights(&killed.join("final")),
        "bit-identical weights after kill -9 and resume (from {})",
        newest.display()
    );
    // Metrics of the steps after the resume point are the same too.
    let lines = |d: &Path| -> Vec<Value> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("responses_per_s");
                v
            })
            .collect()
    };
    assert_eq!(lines(&f.dir.join("full")), lines(&killed));
    // Resuming with another seed is refused, saying why.
    let (ok, _, err) = reward(&s2, &["--resume", newest.to_str().unwrap(), "--seed", "5"]);
    assert!(!ok);
    assert!(err.contains("seed 0") && err.contains("seed 5"), "{err}");
}

#[test]
fn bad_input_is_one_clear_error_and_writes_nothing() {
    let f = fixture(12);
    let out = f.dir.join("never");
    let o = format!("out={}", out.display());
    let base = format!("model.base={}", f.base.display());
    let run = |extra: &[String]| {
        let mut s = vec![o.clone(), base.clone()];
        s.extend(extra.iter().cloned());
        reward(&s, &[])
    };
    // A group with one response.
    let one = f.dir.join("one.jsonl");
    std::fs::write(
        &one,
        "{\"prompt_id\":\"a\",\"prompt\":\"x\",\"responses\":[\"r\",\"s\"],\"ranks\":[1,2]}\n{\"prompt_id\":\"b\",\"prompt\":\"y\",\"responses\":[\"r\"],\"ranks\":[1]}\n",
    )
    .unwrap();
    let (ok, _, err) = run(&[format!("data.path={}", one.display())]);
    assert!(!ok);
    assert!(err.contains("one.jsonl") && err.contains("line 2"), "{err}");
    // Ranks missing.
    let noranks = f.dir.join("noranks.jsonl");
    std::fs::write(
        &noranks,
        "{\"prompt_id\":\"a\",\"prompt\":\"x\",\"responses\":[\"r\",\"s\"]}\n",
    )
    .unwrap();
    let (ok, _, err) = run(&[format!("data.path={}", noranks.display())]);
    assert!(!ok);
    assert!(
        err.contains("noranks.jsonl") && err.contains("ranks"),
        "{err}"
    );
    // Every prompt on one side of the split.
    let (ok, _, err) = run(&[
        format!("data.path={}", f.data.display()),
        "data.validation_fraction=0.0001".into(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("training side") && err.contains("validation_fraction"),
        "{err}"
    );
    // A base without a tokenizer.
    let bare = f.dir.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for n in ["config.json", "model.safetensors"] {
        std::fs::copy(f.base.join(n), bare.join(n)).unwrap();
    }
    let (ok, _, err) = reward(
        &[
            o.clone(),
            format!("model.base={}", bare.display()),
            format!("data.path={}", f.data.display()),
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("no tokenizer.json") && err.contains("model.tokenizer"),
        "{err}"
    );
    // A value out of range.
    let (ok, _, err) = run(&[
        format!("data.path={}", f.data.display()),
        "train.lr=-1".into(),
    ]);
    assert!(!ok);
    assert!(err.contains("`train.lr` = -1 is out of range"), "{err}");
    assert!(!out.exists(), "bad input left {}", out.display());
    // `reward score` on a policy (no scalar head) names the folder and what is needed.
    let input = f.dir.join("in.jsonl");
    std::fs::write(&input, "{\"prompt\":\"x\",\"response\":\"y\"}\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_reward"))
        .arg("score")
        .arg(&f.base)
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("base") && err.contains("scalar head"), "{err}");
}

/// Real data from ../shared/data: OpenAssistant ranked groups and HH-RLHF harmless pairs, a short
/// run from a tiny model; the held-out accuracy and its interval are printed, whatever they are.
#[test]
fn real_preference_data_trains_and_reports_an_interval() {
    let shared = root().join("../shared/data/preference");
    let oasst = shared.join("oasst_en_100_tree.jsonl");
    let hh = shared.join("hh-rlhf_harmless-base_test.jsonl.gz");
    if !oasst.exists() || !hh.exists() {
        eprintln!("skipped: ../shared/data is absent");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // A tiny base with a BPE trained on a slice of both sources.
    let texts = tmp.path().join("texts.txt");
    let mut t = std::fs::read_to_string(&oasst).unwrap();
    t.truncate(t.floor_char_boundary(400_000));
    std::fs::write(&texts, t).unwrap();
    let base = base_model(tmp.path(), &texts);
    for (name, path, kind, steps) in [("oasst", &oasst, "oasst", 60), ("hh", &hh, "hh_rlhf", 60)] {
        let out = tmp.path().join(name);
        let (ok, stdout, err) = reward(
            &[
                format!("model.base={}", base.display()),
                format!("data.path={}", path.display()),
                format!("data.kind=\"{kind}\""),
                format!("out={}", out.display()),
                "data.max_length=256".into(),
                "data.max_groups=600".into(),
                format!("train.max_steps={steps}"),
                "train.eval_every=0".into(),
                "train.save_every=0".into(),
            ],
            &[],
        );
        assert!(ok, "{name}: {err}");
        let v = &summary(&out)["validation"]["pairwise"];
        let (acc, lo, hi) = (
            v["accuracy"].as_f64().unwrap(),
            v["low"].as_f64().unwrap(),
            v["high"].as_f64().unwrap(),
        );
        println!(
            "{name}: held-out pairwise accuracy {acc:.3} [{lo:.3}, {hi:.3}] on {} pairs\n{stdout}",
            v["total"]
        );
        assert!(v["total"].as_u64().unwrap() > 20, "{name}: {v}");
        assert!(lo <= acc && acc <= hi && acc.is_finite());
    }
}

/// The labelers' majority as pairs, and the listwise loss, both train through the binary on the
/// demo task's rankings (3 labelers per prompt).
#[test]
fn majority_pairs_and_the_listwise_loss_train() {
    let f = fixture(8);
    for (name, extra) in [
        ("majority", "data.aggregate=\"majority\""),
        ("listwise", "loss.kind=\"listwise\""),
    ] {
        let out = f.dir.join(name);
        let (ok, stdout, err) = reward(
            &[
                format!("model.base={}", f.base.display()),
                "data.path=datasets/demo/task/rankings.csv".into(),
                format!("out={}", out.display()),
                "data.demonstrations=\"\"".into(),
                "ensemble.members=1".into(),
                "train.max_steps=5".into(),
                extra.into(),
            ],
            &[],
        );
        assert!(ok, "{name}: {err}");
        let s = summary(&out);
        let v = &s["validation"];
        if name == "majority" {
            assert!(stdout.contains("majority of labelers"), "{stdout}");
            // Merged pairs are K = 2 groups of the labeler "majority"; no human ceiling is left.
            assert_eq!(
                v["by_k"].as_object().unwrap().keys().collect::<Vec<_>>(),
                ["2"]
            );
            assert!(v["by_labeler"].get("majority").is_some(), "{v}");
            assert!(v["human_ceiling"].is_null());
        } else {
            assert!(v["by_k"]["4"]["total"].as_u64().unwrap() > 0, "{v}");
            assert!(s["train_loss"].as_f64().unwrap().is_finite());
        }
    }
}

/// `ensemble.members = 2`: two whole runs (seeds 0 and 1, bootstrap resamples) under member-i/,
/// final/ with the manifest, `reward score` giving mean − std of the members per line; a rerun of
/// the same command keeps the finished members; an over-long response is cut and counted.
#[test]
fn an_ensemble_trains_members_scores_as_one_and_keeps_finished_members() {
    let f = fixture(120);
    let mut s: Vec<String> = common(&f, "ens")
        .into_iter()
        .filter(|x| !x.starts_with("ensemble."))
        .collect();
    s.extend(sets(&[
        "ensemble.members=2",
        "ensemble.monitor=false",
        "train.max_steps=6",
        "train.eval_every=0",
        "train.save_every=0",
    ]));
    let (ok, stdout, err) = reward(&s, &[]);
    assert!(ok, "{err}\n{stdout}");
    let out = f.dir.join("ens");
    let sum = summary(&out);
    let e = &sum["ensemble"];
    assert_eq!(e["members"].as_array().unwrap().len(), 2);
    assert_eq!(e["members"][0]["seed"], 0);
    assert_eq!(e["members"][1]["seed"], 1);
    assert!(e["monitor"].is_null());
    for i in 0..2 {
        let m = out.join(format!("member-{i}"));
        let cfg = std::fs::read_to_string(m.join("config.toml")).unwrap();
        assert!(cfg.contains(&format!("member = {i}")), "{cfg}");
        // Members share the ensemble's split.
        assert!(cfg.contains("split_seed = 0"), "{cfg}");
        assert!(m.join("final/model.safetensors").is_file());
    }
    // Different seeds and resamples: different weights.
    assert_ne!(
        weights(&out.join("final/member-0")),
        weights(&out.join("final/member-1"))
    );

    // Scoring: the aggregate of the members' normalised rewards, with an over-long response.
    let input = f.dir.join("ens_inputs.jsonl");
    let long = "apple ".repeat(6000);
    std::fs::write(
        &input,
        format!(
            "{}\n{}\n{}\n",
            json!({"prompt": "Say something.", "response": " apple apple apple"}),
            json!({"prompt": "Say something.", "response": " pear"}),
            json!({"prompt": "Say something.", "response": long}),
        ),
    )
    .unwrap();
    let score = |agg: &str| -> (Vec<Value>, String) {
        let o = Command::new(env!("CARGO_BIN_EXE_reward"))
            .arg("score")
            .arg(out.join("final"))
            .arg("--input")
            .arg(&input)
            .args(["--aggregate", agg])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (lines, stderr) = score("mean-minus-std");
    assert_eq!(lines.len(), 3);
    assert!(stderr.contains("with 2 model(s)"), "{stderr}");
    // The long response is cut to the context by each of the two members, and said.
    assert!(stderr.contains("2 responses cut at the end"), "{stderr}");
    let (min_lines, _) = score("min");
    for (l, lm) in lines.iter().zip(&min_lines) {
        let m: Vec<f64> = l["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(m.len(), 2);
        let mean = (m[0] + m[1]) / 2.0;
        let std = ((m[0] - mean).powi(2) + (m[1] - mean).powi(2)) / 2.0;
        let std = std.sqrt();
        assert!((l["std"].as_f64().unwrap() - std).abs() < 1e-5, "{l}");
        assert!(
            (l["reward"].as_f64().unwrap() - (mean - std)).abs() < 1e-5,
            "{l}"
        );
        assert!(
            (lm["reward"].as_f64().unwrap() - m[0].min(m[1])).abs() < 1e-5,
            "{lm}"
        );
    }

    // The same command again: both members are kept, final/ rebuilt identically.
    let before = weights(&out.join("final/member-1"));
    let (ok, stdout, err) = reward(&s, &[]);
    assert!(ok, "{err}");
    assert_eq!(
        stdout.matches("finished earlier; kept").count(),
        2,
        "{stdout}"
    );
    assert_eq!(weights(&out.join("final/member-1")), before);
    // --resume is refused with what to do instead.
    let (ok, _, err) = reward(&s, &["--resume", out.join("member-0").to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("rerun the same command"), "{err}");
}

/// The mean log-probability per token of `response` and EOS after template(`prompt`) under the
/// causal LM in `dir`, computed here on the host from the full logits (log-softmax in f64), as
/// an independent check of `reward::likelihood`.
fn mean_logprob(dir: &Path, prompt: &str, response: &str) -> f64 {
    let device = model::parse_device("cpu").unwrap();
    let loaded = model::checkpoint::load(dir, &device).unwrap();
    let tok = loaded.tokenizer.unwrap();
    let template = model::checkpoint::resolve_template(None, Some(dir)).unwrap();
    let e = reward::data::fit(
        &tok,
        &template,
        prompt,
        response,
        128,
        reward::data::Long::Cut,
    )
    .unwrap()
    .unwrap();
    let batch = model::TokenBatch::right_padded(std::slice::from_ref(&e.tokens), tok.pad_id);
    let m = &loaded.model;
    let logits = model::ops::to_f32_vec(
        m.logits(m.forward(&batch))
            .unwrap()
            .reshape([e.tokens.len() * m.config().vocab_size]),
    );
    let v = m.config().vocab_size;
    let mut sum = 0.0;
    let targets = e.prompt_len.max(1)..e.tokens.len();
    for t in targets.clone() {
        let row = &logits[(t - 1) * v..t * v];
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        sum += row[e.tokens[t] as usize] as f64 - lse;
    }
    sum / targets.len() as f64
}

#[test]
fn the_likelihood_term_is_the_base_models_mean_logprob_and_travels_with_the_model() {
    let f = fixture(120);
    let mut s = common(&f, "lik");
    s.extend(sets(&[
        "model.likelihood_coef=0.5",
        "train.max_steps=6",
        "train.eval_every=0",
        "train.save_every=0",
    ]));
    let (ok, stdout, err) = reward(&s, &[]);
    assert!(ok, "{err}\n{stdout}");
    assert!(stdout.contains("likelihood term: 0.5"), "{stdout}");
    let fin = f.dir.join("lik/final");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(fin.join("likelihood.json")).unwrap())
            .unwrap();
    assert_eq!(manifest, json!({"coef": 0.5, "model": "likelihood"}));
    // The base is stored with the reward model, byte for byte.
    assert_eq!(weights(&fin.join("likelihood")), weights(&f.base));

    // `reward score --raw` is the head's raw output plus 0.5 × the base's mean log-probability:
    // the same folder without likelihood.json gives the head alone.
    let head_only = f.dir.join("head_only");
    std::fs::create_dir_all(&head_only).unwrap();
    for e in std::fs::read_dir(&fin).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() && e.file_name() != "likelihood.json" {
            std::fs::copy(e.path(), head_only.join(e.file_name())).unwrap();
        }
    }
    let items = [
        ("Say something.", " apple apple apple"),
        ("Say something.", " pear fig"),
        ("Name a fruit.", ""),
    ];
    let input = f.dir.join("lik_inputs.jsonl");
    let lines: Vec<String> = items
        .iter()
        .map(|(p, r)| json!({"prompt": p, "response": r}).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let with_term = scores(&fin, &input, true);
    let head = scores(&head_only, &input, true);
    for (i, (p, r)) in items.iter().enumerate() {
        let expected = head[i] + 0.5 * mean_logprob(&f.base, p, r);
        assert!(
            (with_term[i] - expected).abs() < 1e-4,
            "item {i}: {} vs {expected} (head {})",
            with_term[i],
            head[i]
        );
    }
    // The normalisation covers the sum: the training responses score 0 on average.
    let norm: Value =
        serde_json::from_str(&std::fs::read_to_string(fin.join("rlhf.json")).unwrap()).unwrap();
    assert!(
        norm["reward_normalization"]["offset"].as_f64().unwrap() < 0.0,
        "{norm}"
    );

    // An ensemble carries the term in every member (and the monitor).
    let mut e: Vec<String> = s
        .iter()
        .filter(|x| !x.starts_with("ensemble.") && !x.starts_with("out="))
        .cloned()
        .collect();
    e.extend(sets(&["ensemble.members=2", "ensemble.monitor=true"]));
    e.push(format!("out={}", f.dir.join("lik_ens").display()));
    let (ok, stdout, err) = reward(&e, &[]);
    assert!(ok, "{err}\n{stdout}");
    for m in ["member-0", "member-1", "monitor"] {
        let d = f.dir.join("lik_ens/final").join(m);
        assert!(d.join("likelihood.json").is_file(), "{}", d.display());
        assert_eq!(weights(&d.join("likelihood")), weights(&f.base));
    }

    // A reward-model base without a stored likelihood model is refused, naming the key.
    let mut bad = common(&f, "lik_bad");
    bad.retain(|x| !x.starts_with("model.base="));
    bad.push(format!("model.base={}", head_only.display()));
    bad.extend(sets(&["model.likelihood_coef=1", "train.max_steps=2"]));
    let (ok, _, err) = reward(&bad, &[]);
    assert!(!ok);
    assert!(
        err.contains("model.likelihood_coef") && err.contains("likelihood.json"),
        "{err}"
    );
    // Out of range.
    let mut neg = common(&f, "lik_neg");
    neg.push("model.likelihood_coef=-1".into());
    let (ok, _, err) = reward(&neg, &[]);
    assert!(!ok);
    assert!(err.contains("model.likelihood_coef"), "{err}");
}

/// `[lora]`: a frozen trunk with adapters and a trained head, saved as PEFT's sequence-
/// classifier adapter (`modules_to_save = ["score"]`, the head's `score.weight` in it); the
/// merged final/ scores as the adapter does; a resumed run (LoRA dropout on) ends bit for bit.
#[test]
fn lora_trains_adapters_and_the_head_and_resumes_bit_identical() {
    let f = fixture(64);
    let mut s = common(&f, "full");
    s.extend(sets(&[
        "train.max_steps=12",
        "train.save_every=6",
        "train.keep_last=10",
        "train.eval_every=0",
        "train.log_every=1",
        "train.lr=1e-3",
        "lora.r=4",
        "lora.dropout=0.1",
        "lora.target_modules=[\"q_proj\", \"v_proj\", \"down_proj\"]",
    ]));
    let (ok, _, err) = reward(&s, &[]);
    assert!(ok, "{err}");
    let full = f.dir.join("full");
    let adapter = full.join("final/adapter");
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["modules_to_save"], json!(["score"]));
    let names: Vec<String> =
        model::weights::file_tensor_shapes(&adapter.join("adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
    assert!(
        names.contains(&"base_model.model.score.weight".to_string()),
        "{names:?}"
    );
    assert!(
        names
            .iter()
            .all(|n| n.contains("lora_") || n.ends_with("score.weight"))
    );
    let state = std::fs::metadata(full.join("checkpoint-000012/trainer_state/optimizer.bpk"))
        .unwrap()
        .len();
    assert!(
        state * 4 < weights(&full.join("final")).len() as u64,
        "adapter state only"
    );
    let mut s2: Vec<String> = s
        .iter()
        .filter(|x| !x.starts_with("out="))
        .cloned()
        .collect();
    let resumed = f.dir.join("resumed");
    s2.push(format!("out={}", resumed.display()));
    let ckpt = full.join("checkpoint-000006");
    let (ok, stdout, err) = reward(&s2, &["--resume", ckpt.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(stdout.contains("resumed from"), "{stdout}");
    for file in ["model.safetensors", "adapter/adapter_model.safetensors"] {
        assert!(
            std::fs::read(full.join("final").join(file)).unwrap()
                == std::fs::read(resumed.join("final").join(file)).unwrap(),
            "{file} differs after resume"
        );
    }
}
