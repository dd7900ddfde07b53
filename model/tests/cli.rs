//! The `model` binary end to end, and the errors a user sees for broken model folders.

mod common;

use common::tiny_model_folder;
use model::weights::write_safetensors;
use model::{CausalLm, ModelConfig, SafetensorsFiles, Tokenizer, load, parse_device};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    let device = parse_device("cpu").unwrap();
    match load(dir, &device) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// A tiny from-scratch model with a trained tokenizer, saved as a model folder.
/// Runs the `model` binary: (succeeded, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let (code, out, err) = common::run(args);
    (code == Some(0), out, err)
}

#[test]
fn info_generate_and_score_on_a_saved_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let tok = tiny_model_folder(&dir);
    let d = dir.to_str().unwrap();

    let (ok, out, err) = run(&["info", d]);
    assert!(ok, "{err}");
    assert!(out.contains("LlamaForCausalLM"), "{out}");
    let cfg = ModelConfig::preset("tiny", tok.vocab_size()).unwrap();
    assert!(
        out.contains(&format!("parameters      {}", cfg.num_params(false))),
        "{out}"
    );
    assert!(out.contains("file dtype      F32"), "{out}");
    // The parameter count agrees with the tensors actually saved.
    let files = SafetensorsFiles::open(&dir).unwrap();
    let device = parse_device("cpu").unwrap();
    let loaded = CausalLm::from_safetensors(&cfg, &files, model::Heads::LM, &device).unwrap();
    let saved: usize = loaded.hf_tensors().iter().map(|t| t.2.len()).sum();
    assert_eq!(saved, cfg.num_params(false));

    let args = [
        "generate",
        d,
        "--prompt",
        "name a colour.",
        "--template",
        "Human: {prompt}\n\nAssistant:",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0.8",
        "--top-k",
        "50",
        "--seed",
        "4",
        "--json",
    ];
    let (ok, out, err) = run(&args);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["prompt"], "name a colour.");
    let tokens: Vec<u32> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    assert!(!tokens.is_empty() && tokens.len() <= 8);
    assert_eq!(
        v["completion"].as_str().unwrap(),
        tok.decode(&tokens).unwrap()
    );
    // Seeded: the same command gives the same completion.
    let (_, again, _) = run(&args);
    assert_eq!(out, again);
    // Greedy ignores the seed.
    let greedy = |seed: &str| {
        run(&[
            "generate",
            d,
            "--prompt",
            "hi",
            "--temperature",
            "0",
            "--max-new-tokens",
            "5",
            "--seed",
            seed,
            "--json",
        ])
        .1
    };
    assert_eq!(greedy("1"), greedy("2"));

    let input = tmp.path().join("texts.jsonl");
    std::fs::write(
        &input,
        "{\"text\": \"hello there!\"}\n\n{\"text\": \"x\"}\n{\"text\": \"name a colour.\"}\n",
    )
    .unwrap();
    let (ok, out, err) = run(&[
        "score",
        d,
        "--input",
        input.to_str().unwrap(),
        "--batch-size",
        "2",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (line, text) in lines.iter().zip(["hello there!", "x", "name a colour."]) {
        let n = tok.encode(text).unwrap().len();
        assert_eq!(line["tokens"].as_u64().unwrap() as usize, n);
        let s = line["logprob_sum"].as_f64().unwrap();
        if n == 1 {
            assert_eq!(s, 0.0);
        } else {
            // An untrained model is near uniform: about -(n-1)·ln(vocab).
            let uniform = -((n - 1) as f64) * (tok.vocab_size() as f64).ln();
            assert!(
                s < 0.0 && (s - uniform).abs() < 0.2 * uniform.abs(),
                "{s} vs {uniform}"
            );
        }
    }
    // Batch size does not change the numbers beyond float noise.
    let (_, one, _) = run(&[
        "score",
        d,
        "--input",
        input.to_str().unwrap(),
        "--batch-size",
        "1",
    ]);
    for (a, b) in out.lines().zip(one.lines()) {
        let a: serde_json::Value = serde_json::from_str(a).unwrap();
        let b: serde_json::Value = serde_json::from_str(b).unwrap();
        let (a, b) = (
            a["logprob_sum"].as_f64().unwrap(),
            b["logprob_sum"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    }

    std::fs::write(&input, "{\"text\": \"ok\"}\n{\"txt\": \"typo\"}\n").unwrap();
    let (ok, _, err) = run(&["score", d, "--input", input.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("line 2") && err.contains("`text`"), "{err}");
}

#[test]
fn missing_folder_and_cuda_without_tch_are_clear_errors() {
    let (ok, _, err) = run(&["info", "/nonexistent/model"]);
    assert!(!ok);
    assert!(
        err.contains("/nonexistent/model") && err.contains("model folder not found"),
        "{err}"
    );
    #[cfg(not(feature = "tch"))]
    {
        let (ok, _, err) = run(&["--device", "cuda:0", "info", "/nonexistent/model"]);
        assert!(!ok);
        assert!(err.contains("--features tch"), "{err}");
    }
}

#[test]
fn broken_checkpoints_name_the_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();

    let dir = tmp.path().join("unknown_type");
    copy_dir(&fixture("mistral"), &dir);
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"mistral\"", "\"mamba\""),
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("config.json") && e.contains("unknown model_type `mamba`"),
        "{e}"
    );

    let dir = tmp.path().join("no_hidden");
    copy_dir(&fixture("mistral"), &dir);
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"hidden_size\"", "\"hidden_sz\""),
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("config.json") && e.contains("key `hidden_size` is missing"),
        "{e}"
    );

    let dir = tmp.path().join("no_weights");
    copy_dir(&fixture("mistral"), &dir);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors"), "{e}");

    // Rewrite the weights without one tensor, then with one of the wrong shape.
    let device = parse_device("cpu").unwrap();
    let m = load(&fixture("mistral"), &device).unwrap().model;
    let tensors = m.hf_tensors();
    let dir = tmp.path().join("missing_tensor");
    copy_dir(&fixture("mistral"), &dir);
    let without: Vec<_> = tensors
        .iter()
        .filter(|t| t.0 != "model.layers.1.mlp.up_proj.weight")
        .cloned()
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &without).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors")
            && e.contains("`model.layers.1.mlp.up_proj.weight` is missing"),
        "{e}"
    );

    let dir = tmp.path().join("bad_shape");
    copy_dir(&fixture("mistral"), &dir);
    let mut bad = tensors.clone();
    let t = bad.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
    t.1 = vec![16];
    t.2.truncate(16);
    write_safetensors(&dir.join("model.safetensors"), &bad).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("`model.norm.weight` has shape [16], expected [32]"),
        "{e}"
    );

    // A tokenizer with more tokens than the model's vocab_size (96).
    let dir = tmp.path().join("vocab");
    copy_dir(&fixture("mistral"), &dir);
    let texts: Vec<String> = (0..50).map(|i| format!("word{i} other{i} thing")).collect();
    let tok = Tokenizer::train_bpe(texts.iter(), 400).unwrap();
    tok.save(&dir).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("tokenizer.json")
            && e.contains(&format!("{} tokens", tok.vocab_size()))
            && e.contains("vocab_size is 96"),
        "{e}"
    );
}

#[test]
fn rope_parameters_and_top_level_rope_keys_resolve_the_same() {
    let base = serde_json::json!({
        "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2
    });
    let mut v4 = base.clone();
    v4["rope_theta"] = 500000.0.into();
    v4["rope_scaling"] = serde_json::json!({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let mut v5 = base.clone();
    v5["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "rope_theta": 500000.0,
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192});
    let p = Path::new("config.json");
    let a = ModelConfig::from_map(p, v4.as_object().unwrap().clone()).unwrap();
    let b = ModelConfig::from_map(p, v5.as_object().unwrap().clone()).unwrap();
    assert_eq!(a.rope_theta, 500000.0);
    assert_eq!(a.rope_theta, b.rope_theta);
    assert_eq!(a.rope_llama3, b.rope_llama3);
    assert_eq!(a.rope_llama3.unwrap().factor, 8.0);
    // Defaults: kv heads = heads, head_dim = hidden / heads, untied.
    assert_eq!(
        (a.num_kv_heads, a.head_dim, a.tie_word_embeddings),
        (2, 4, false)
    );
    let mut bad = base.clone();
    bad["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    let e = ModelConfig::from_map(p, bad.as_object().unwrap().clone())
        .unwrap_err()
        .to_string();
    assert!(e.contains("rope type `yarn` is not supported"), "{e}");
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn generate_input_samples_a_file_in_batches_in_input_order() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let tok = tiny_model_folder(&dir);
    let d = dir.to_str().unwrap();
    let input = tmp.path().join("prompts.jsonl");
    let prompts = [
        "name a colour.",
        "say hello.",
        "what is two plus two? and then what is two plus three?",
        "hi",
        "name a colour and say hello.",
    ];
    let mut text = String::new();
    for (i, p) in prompts.iter().enumerate() {
        text.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": p, "id": i, "meta": {"k": [i]}})
        ));
        if i == 1 {
            text.push('\n'); // blank lines are skipped
        }
    }
    std::fs::write(&input, text).unwrap();
    let inp = input.to_str().unwrap();
    let out = tmp.path().join("out.jsonl");
    let o = out.to_str().unwrap();
    let sample = |extra: &[&str]| {
        let mut args = vec!["generate", d, "--input", inp, "--max-new-tokens", "6"];
        if !extra.contains(&"--temperature") {
            args.extend_from_slice(&["--temperature", "0.9", "--seed", "5"]);
        }
        args.extend_from_slice(extra);
        let (ok, stdout, err) = run(&args);
        assert!(ok, "{err}");
        stdout
    };
    let stdout = sample(&["--out", o, "--batch-size", "2"]);
    assert!(stdout.is_empty(), "{stdout}");
    let written = std::fs::read_to_string(&out).unwrap();
    let lines = json_lines(&written);
    assert_eq!(lines.len(), prompts.len());
    for (i, (v, p)) in lines.iter().zip(prompts).enumerate() {
        assert_eq!(v["prompt"], p);
        assert_eq!(v["id"], i);
        assert_eq!(v["meta"]["k"][0], i);
        let tokens: Vec<u32> = v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        assert!(tokens.len() <= 6 && !tokens.contains(&tok.eos_id));
        assert_eq!(v["completion"], tok.decode(&tokens).unwrap());
    }
    // No temporary file is left beside the output.
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    // Seeded: again, and to stdout, the same lines.
    assert_eq!(sample(&["--batch-size", "2"]), written);

    // Greedy: the batch size (and so the padding) does not change the completions.
    let greedy = |bs: &str| {
        json_lines(&sample(&["--temperature", "0", "--batch-size", bs]))
            .iter()
            .map(|v| v["tokens"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(greedy("1"), greedy("3"));

    // A one-line file gives what --prompt gives with the same seed.
    let one = tmp.path().join("one.jsonl");
    std::fs::write(&one, "{\"prompt\": \"say hello.\"}\n").unwrap();
    let args = |src: &[&str]| {
        let mut a = vec!["generate", d];
        a.extend_from_slice(src);
        a.extend_from_slice(&["--max-new-tokens", "6", "--seed", "9", "--json"]);
        let (ok, out, err) = run(&a);
        assert!(ok, "{err}");
        out
    };
    assert_eq!(
        args(&["--input", one.to_str().unwrap()]),
        args(&["--prompt", "say hello."])
    );
}

#[test]
fn generate_template_defaults_to_the_model_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    tiny_model_folder(&dir);
    let d = dir.to_str().unwrap();
    let input = tmp.path().join("p.jsonl");
    std::fs::write(&input, "{\"prompt\": \"name a colour.\"}\n").unwrap();
    let gen_with = |template: Option<&str>| {
        let mut a = vec![
            "generate",
            d,
            "--input",
            input.to_str().unwrap(),
            "--max-new-tokens",
            "8",
            "--seed",
            "2",
        ];
        if let Some(t) = template {
            a.extend_from_slice(&["--template", t]);
        }
        let (ok, out, err) = run(&a);
        assert!(ok, "{err}");
        out
    };
    // Without rlhf.json: the default template.
    assert_eq!(
        gen_with(None),
        gen_with(Some("Human: {prompt}\\n\\nAssistant:"))
    );
    // With one: its template; an explicit --template still wins.
    std::fs::write(
        dir.join("rlhf.json"),
        r#"{"stage": "sft", "prompt_template": "Q: {prompt}\nA:"}"#,
    )
    .unwrap();
    let stored = gen_with(None);
    assert_eq!(stored, gen_with(Some("Q: {prompt}\\nA:")));
    assert_ne!(stored, gen_with(Some("{prompt}")));
}

#[test]
fn generate_input_errors_name_file_line_and_field_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    tiny_model_folder(&dir);
    let d = dir.to_str().unwrap();
    let out = tmp.path().join("out.jsonl");
    let o = out.to_str().unwrap();
    let input = tmp.path().join("bad.jsonl");
    let i = input.to_str().unwrap();
    for (text, want) in [
        (
            "{\"prompt\": \"ok\"}\n{\"promt\": \"typo\"}\n",
            "field `prompt` is missing",
        ),
        (
            "{\"prompt\": \"ok\"}\n\n{\"prompt\": 3}\n",
            "field `prompt` must be a string",
        ),
        (
            "{\"prompt\": \"ok\"}\n{\"prompt\": \"ok\"\n",
            "not valid JSON",
        ),
        ("[1, 2]\n", "expected a JSON object"),
    ] {
        std::fs::write(&input, text).unwrap();
        let (ok, stdout, err) = run(&["generate", d, "--input", i, "--out", o]);
        assert!(!ok, "{text:?} was accepted");
        let line = if text.starts_with('[') {
            "line 1"
        } else if text.contains("\n\n") {
            "line 3"
        } else {
            "line 2"
        };
        assert!(
            err.contains("bad.jsonl") && err.contains(line) && err.contains(want),
            "{text:?}: {err}"
        );
        assert!(stdout.is_empty() && !out.exists());
    }
    std::fs::write(&input, "\n").unwrap();
    let (ok, _, err) = run(&["generate", d, "--input", i]);
    assert!(!ok && err.contains("no prompts"), "{err}");
    // --prompt and --input exclude each other; one of them is required.
    let (ok, _, err) = run(&["generate", d, "--prompt", "x", "--input", i]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    let (ok, _, err) = run(&["generate", d]);
    assert!(
        !ok && err.contains("--prompt") && err.contains("--input"),
        "{err}"
    );
}
