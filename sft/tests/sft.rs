//! The `sft` binary end to end on tiny configs: learning, exact resume, errors, and GSM8K.

mod common;

use common::{root, sft};
use std::path::Path;
use std::process::Command;

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn tiny_model_learns_the_demo_data() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (ok, stdout, err) = sft(
        &[
            "train.max_steps=60",
            "train.eval_every=20",
            "train.save_every=20",
        ],
        &["--out", out.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert!(stdout.contains("done: 60 steps"), "{stdout}");
    let m = metrics(&out);
    let first_eval = m.iter().find(|l| l["step"] == 0).unwrap()["eval_loss"]
        .as_f64()
        .unwrap();
    let last = m.last().unwrap();
    let loss = last["loss"].as_f64().unwrap();
    let eval = last["eval_loss"].as_f64().unwrap();
    // An untrained model is near ln(vocab) ≈ 6.9. On the demo task (datasets/demo/task, seed 0)
    // 60 steps measured 6.96 → eval 3.18 (a fall of 3.77; seeds 1 and 2: 3.82, 3.82) and a
    // last train-batch loss of 3.01 (seeds 1 and 2: 3.22, 2.84).
    assert!(first_eval > 5.0, "baseline eval loss {first_eval}");
    assert!(loss < 3.8, "train loss after 60 steps {loss}");
    assert!(
        eval < first_eval - 3.0,
        "eval loss {eval} vs baseline {first_eval}"
    );
    for l in m.iter().filter(|l| l["step"].as_u64().unwrap() > 0) {
        for k in ["loss", "lr", "grad_norm", "tokens_per_s", "epoch"] {
            assert!(l[k].as_f64().is_some_and(f64::is_finite), "{k} in {l}");
        }
    }
    // Outputs: the config used, the final HF folder, the best, the newest checkpoints.
    let used = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(used.contains("max_steps = 60"), "{used}");
    for d in ["final", "best", "checkpoint-000060", "checkpoint-000040"] {
        assert!(out.join(d).join("model.safetensors").exists(), "{d}");
        assert!(out.join(d).join("tokenizer.json").exists(), "{d}");
    }
    assert!(
        out.join("checkpoint-000060/trainer_state/optimizer.bpk")
            .exists()
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoint-000060/trainer_state/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], 60);
    assert_eq!(state["examples_seen"], 60 * 16);
    // The final model has picked up the demonstrations' form: after 60 steps a greedy sample
    // opens the way the task's most common responses do (measured: " The answer is is is …"),
    // which an untrained model does not.
    let sample = Command::new(root().join("target/release/model"))
        .args([
            "generate",
            out.join("final").to_str().unwrap(),
            "--prompt",
            "What is 2 plus 3?",
        ])
        .args([
            "--template",
            "Human: {prompt}\n\nAssistant:",
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
            "--json",
        ])
        .output();
    if let Ok(g) = sample
        && g.status.success()
    {
        let v: serde_json::Value = serde_json::from_slice(&g.stdout).unwrap();
        assert!(
            v["completion"].as_str().unwrap().contains("The answer"),
            "{v}"
        );
    }
}

#[test]
fn resumed_run_ends_with_identical_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    // Dropout on, so that the dropout masks' determinism is tested too.
    let sets = [
        "train.max_steps=20",
        "train.save_every=10",
        "train.keep_last=5",
        "model.dropout=0.1",
        "train.eval_every=0",
        "train.log_every=1",
    ];
    let (ok, _, err) = sft(&sets, &["--out", full.to_str().unwrap()]);
    assert!(ok, "{err}");
    // A second run stopped after 10 steps: its checkpoint-000010, then resumed for 10 more.
    let half = tmp.path().join("half");
    let (ok, _, err) = sft(
        &[
            "train.max_steps=10",
            "train.save_every=10",
            "model.dropout=0.1",
            "train.eval_every=0",
            "train.log_every=1",
        ],
        &["--out", half.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    // The 10-step run has a shorter schedule; resume from the 20-step run's own step-10 state
    // as well, which is what a run stopped at step 10 leaves.
    let resumed = tmp.path().join("resumed");
    let ckpt = full.join("checkpoint-000010");
    let (ok, stdout, err) = sft(
        &sets,
        &[
            "--out",
            resumed.to_str().unwrap(),
            "--resume",
            ckpt.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert!(
        stdout.contains("resumed from") && stdout.contains("at step 10"),
        "{stdout}"
    );
    assert_eq!(
        weights(&full.join("final")),
        weights(&resumed.join("final")),
        "bit-identical weights after resume"
    );
    let (a, b) = (metrics(&full), metrics(&resumed));
    let loss_at = |m: &[serde_json::Value], s: u64| {
        m.iter().find(|l| l["step"] == s).map(|l| l["loss"].clone())
    };
    for s in [15u64, 20] {
        assert_eq!(loss_at(&a, s), loss_at(&b, s), "loss at step {s}");
    }
    // The stopped run's first 10 steps are the full run's first 10 (same data order, same
    // dropout), though its learning-rate schedule is shorter and so its weights differ.
    // (Regression: both runs once logged every 5 steps, so this compared None with None.)
    let first = loss_at(&metrics(&half), 1);
    assert!(
        first.as_ref().is_some_and(|l| l.is_f64()),
        "step 1 is logged"
    );
    assert_eq!(first, loss_at(&a, 1));
}

#[test]
fn config_and_data_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let o = out.to_str().unwrap();
    let (ok, _, err) = sft(&["train.lerning_rate=0.1"], &["--out", o]);
    assert!(!ok);
    assert!(
        err.contains("configs/sft.toml") && err.contains("unknown key `train.lerning_rate`"),
        "{err}"
    );
    let (ok, _, err) = sft(&["data.path=nope/missing.jsonl"], &["--out", o]);
    assert!(!ok);
    assert!(
        err.contains("nope/missing.jsonl") && err.contains("cannot read"),
        "{err}"
    );
    // A tokenizer larger than the base model's vocabulary.
    let (ok, _, err) = sft(
        &["train.max_steps=1", "model.vocab_size=300"],
        &["--out", tmp.path().join("small").to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = sft(
        &["train.max_steps=1", "model.vocab_size=600"],
        &["--out", tmp.path().join("big").to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let base = format!("model.base={}", tmp.path().join("small/final").display());
    let tokz = format!(
        "model.tokenizer={}",
        tmp.path().join("big/final/tokenizer.json").display()
    );
    let (ok, _, err) = sft(&[&base, &tokz, "train.max_steps=1"], &["--out", o]);
    assert!(!ok);
    assert!(
        err.contains("tokenizer has") && err.contains("vocab_size is"),
        "{err}"
    );
    let (ok, _, err) = sft(&["model.preset=huge"], &["--out", o]);
    assert!(!ok);
    assert!(
        err.contains("key `model.preset` = \"huge\" is out of range")
            && err.contains("one of tiny, mini, small, medium, large"),
        "{err}"
    );
    // A value out of range is an error naming the key (it once trained with lr = -1).
    let (ok, _, err) = sft(
        &["train.lr=-1", "data.validation_fraction=1.5"],
        &["--out", o],
    );
    assert!(!ok);
    assert!(
        err.contains("`train.lr` = -1 is out of range")
            && err.contains("`data.validation_fraction` = 1.5"),
        "{err}"
    );
    // `--out` naming a file says so, with the path (it once said only "File exists").
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (ok, _, err) = sft(&["train.max_steps=1"], &["--out", file.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("a-file") && err.contains("existing file"),
        "{err}"
    );
    // None of the failed runs above left an output folder behind.
    assert!(!out.exists(), "bad input wrote {}", out.display());
}

#[test]
fn gsm8k_validation_perplexity_falls() {
    let gsm = root().join("../shared/data/demonstrations/gsm8k_train.jsonl");
    if !gsm.exists() {
        eprintln!(
            "skipped: {} not found (../shared/data is absent)",
            gsm.display()
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("gsm");
    let path = format!("data.path={}", gsm.display());
    let (ok, _, err) = sft(
        &[
            &path,
            "data.columns={ prompt = \"question\", response = \"answer\" }",
            "data.max_examples=300",
            "data.max_length=256",
            "model.vocab_size=1024",
            "train.max_steps=30",
            "train.batch_size=8",
            "train.eval_every=0",
            "train.save_every=0",
        ],
        &["--out", out.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let m = metrics(&out);
    let ppl = |l: &serde_json::Value| l["eval_perplexity"].as_f64();
    let before = m.iter().find(|l| l["step"] == 0).and_then(ppl).unwrap();
    let after = m.iter().rev().find_map(ppl).unwrap();
    assert!(
        after < before * 0.5,
        "validation perplexity {before} → {after}"
    );
}

#[test]
fn non_finite_loss_stops_the_run_and_names_a_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nan");
    // A huge unclipped learning rate blows the weights up within a few steps. (Since the guard
    // also stops on a non-finite gradient norm, 1e8 stops at step 2 with no checkpoint to name
    // yet; 1e5 stops at step 3.)
    let sets = [
        "train.lr=1e5",
        "train.max_grad_norm=0",
        "train.warmup_steps=0",
        "train.decay=\"constant\"",
        "train.save_every=1",
        "train.keep_last=5",
        "train.max_steps=40",
        "train.eval_every=0",
    ];
    let (ok, _, err) = sft(&sets, &["--out", out.to_str().unwrap()]);
    assert!(!ok, "the run should stop");
    let at = err.find("at step ").expect(&err);
    let step: usize = err[at + 8..].split(';').next().unwrap().parse().unwrap();
    assert!(
        [
            "loss is NaN",
            "loss is inf",
            "gradient norm is NaN",
            "gradient norm is inf"
        ]
        .iter()
        .any(|m| err.contains(m)),
        "{err}"
    );
    // The named checkpoint holds weights from before the step whose loss was not finite, and it
    // loads and gives finite logits.
    let good = out.join(format!("checkpoint-{:06}", step - 2));
    assert!(err.contains(&good.display().to_string()), "{err}");
    let device = model::parse_device("cpu").unwrap();
    let m = model::load(&good, &device).unwrap().model;
    let logits = model::ops::to_f32_vec(
        m.logits(m.forward(&model::TokenBatch::dense(vec![5, 6, 7], 1, 3)))
            .unwrap(),
    );
    assert!(logits.iter().all(|x| x.is_finite()));
    assert!(!out.join("final").exists());
}

#[test]
fn same_config_and_seed_give_the_same_weights_and_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let out = tmp.path().join(name);
        let (ok, _, err) = sft(
            &[
                "train.max_steps=8",
                "model.dropout=0.1",
                "train.eval_every=4",
            ],
            &["--out", out.to_str().unwrap()],
        );
        assert!(ok, "{err}");
        out
    };
    let (a, b) = (run("a"), run("b"));
    assert_eq!(weights(&a.join("final")), weights(&b.join("final")));
    let strip = |m: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        m.into_iter()
            .map(|mut l| {
                l.as_object_mut().unwrap().remove("tokens_per_s");
                l
            })
            .collect()
    };
    assert_eq!(strip(metrics(&a)), strip(metrics(&b)));
    // Another seed gives other weights.
    let out = tmp.path().join("c");
    let (ok, _, err) = sft(
        &[
            "train.max_steps=8",
            "model.dropout=0.1",
            "train.eval_every=4",
        ],
        &["--out", out.to_str().unwrap(), "--seed", "1"],
    );
    assert!(ok, "{err}");
    assert_ne!(weights(&a.join("final")), weights(&out.join("final")));
}

/// `[lora]`: only the adapters train (the checkpoint's optimizer state covers them alone), the
/// run resumes bit for bit, `final/` holds the merged model and `final/adapter/` the adapter as
/// PEFT writes it; without model.base it is a config error.
#[test]
fn lora_trains_the_adapters_alone_and_resumes_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let (ok, _, err) = sft(
        &["train.max_steps=5", "train.eval_every=0"],
        &["--out", base.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let base_final = base.join("final");
    let base_set = format!("model.base={}", base_final.display());
    let sets = [
        base_set.as_str(),
        "lora.r=4",
        "lora.alpha=8",
        "lora.dropout=0.1",
        "lora.target_modules=[\"all-linear\"]",
        "train.lr=1e-3",
        "train.max_steps=12",
        "train.save_every=6",
        "train.eval_every=0",
        "train.log_every=1",
    ];
    let full = tmp.path().join("full");
    let (ok, stdout, err) = sft(&sets, &["--out", full.to_str().unwrap()]);
    assert!(ok, "{err}\n{stdout}");
    let adapter = full.join("final/adapter");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert!(adapter.join("adapter_model.safetensors").is_file());
    // The merged model moved away from the base.
    assert_ne!(weights(&full.join("final")), weights(&base_final));
    // The optimizer state is the adapters' only: far smaller than the full model's (two f32
    // moments per weight would be twice model.safetensors).
    let opt = |d: &Path| {
        std::fs::metadata(d.join("trainer_state/optimizer.bpk"))
            .unwrap()
            .len()
    };
    let model_bytes = std::fs::metadata(base_final.join("model.safetensors"))
        .unwrap()
        .len();
    let lora_opt = opt(&full.join("checkpoint-000012"));
    assert!(
        lora_opt * 4 < model_bytes,
        "optimizer state {lora_opt} bytes for a model of {model_bytes}"
    );
    // Resumed from step 6: the same adapter and merged weights, bit for bit.
    let resumed = tmp.path().join("resumed");
    let ckpt = full.join("checkpoint-000006");
    let (ok, stdout, err) = sft(
        &sets,
        &[
            "--out",
            resumed.to_str().unwrap(),
            "--resume",
            ckpt.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert!(stdout.contains("at step 6"), "{stdout}");
    for f in ["model.safetensors", "adapter/adapter_model.safetensors"] {
        assert_eq!(
            std::fs::read(full.join("final").join(f)).unwrap(),
            std::fs::read(resumed.join("final").join(f)).unwrap(),
            "{f} after resume"
        );
    }
    // [lora] on a new model (no model.base) is refused, naming the key.
    let (ok, _, err) = sft(
        &["lora.r=4"],
        &["--out", tmp.path().join("x").to_str().unwrap()],
    );
    assert!(!ok);
    assert!(
        err.contains("[lora]") && err.contains("model.base"),
        "{err}"
    );
}
