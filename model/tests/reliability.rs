//! Regression tests of issue 29 for the `model` binary: a prompt longer than the model's context
//! is refused, numeric flags out of range (negative ones included) are range errors, and a model
//! folder whose config.json disagrees with its weights, or that cannot fit in memory, is refused
//! before anything is allocated.

mod common;

use common::{run, tiny_model_folder};
use std::path::Path;

/// Sets keys of `dir/config.json`.
fn edit_config(dir: &Path, keys: &[(&str, serde_json::Value)]) {
    let p = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    for (k, v) in keys {
        cfg[*k] = v.clone();
    }
    std::fs::write(&p, cfg.to_string()).unwrap();
}

/// Regression (issue 29): a 3,002-token prompt on a model whose context is 2,048 generated
/// garbage with exit 0. A prompt that leaves no room for `--max-new-tokens` in the context is
/// refused, naming the prompt (or the input line), its length, the context and what to change.
#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let tok = tiny_model_folder(&dir);
    edit_config(&dir, &[("max_position_embeddings", serde_json::json!(40))]);
    let d = dir.to_str().unwrap();
    let template = "Human: {prompt}\n\nAssistant:";
    // The shortest repetition longer than the 32 tokens that 40 leave after 8 new ones.
    let (long, n) = (1..)
        .map(|k| {
            let p = "say hello. ".repeat(k);
            let n = tok.encode(&template.replace("{prompt}", &p)).unwrap().len();
            (p, n)
        })
        .find(|(_, n)| *n > 32)
        .unwrap();
    assert!(n <= 40, "{n} tokens");

    let (code, stdout, err) = run(&[
        "generate",
        d,
        "--prompt",
        &long,
        "--template",
        template,
        "--max-new-tokens",
        "8",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        err.contains(&format!(
            "--prompt: the prompt is {n} tokens with its template"
        )) && err.contains("context of 40 tokens (max_position_embeddings in")
            && err.contains("leaves 32 for the prompt after --max-new-tokens 8")
            && err.contains("shorten the prompt or lower --max-new-tokens"),
        "{err}"
    );
    // The same prompt fits when fewer new tokens are asked for.
    let (code, _, err) = run(&[
        "generate",
        d,
        "--prompt",
        &long,
        "--template",
        template,
        "--max-new-tokens",
        &(40 - n).to_string(),
    ]);
    assert_eq!(code, Some(0), "{err}");

    // --input: the error names the file and line; nothing is written.
    let input = tmp.path().join("prompts.jsonl");
    std::fs::write(
        &input,
        format!(
            "{}\n{}\n",
            serde_json::json!({"prompt": "say hello."}),
            serde_json::json!({"prompt": long})
        ),
    )
    .unwrap();
    let out = tmp.path().join("out.jsonl");
    let (code, _, err) = run(&[
        "generate",
        d,
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--template",
        template,
        "--max-new-tokens",
        "8",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("prompts.jsonl: line 2: field `prompt`: the prompt is")
            && err.contains("context of 40 tokens"),
        "{err}"
    );
    assert!(!out.exists());

    // A prompt of far more bytes than the room's tokens can cover is refused untokenized.
    let huge = "hello".repeat(20_000);
    let bytes = template.replace("{prompt}", &huge).len();
    let (code, _, err) = run(&["generate", d, "--prompt", &huge, "--max-new-tokens", "8"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "--prompt: the prompt is {bytes} bytes with its template"
        )),
        "{err}"
    );

    // --max-new-tokens at or above the context leaves no room for any prompt.
    let (code, _, err) = run(&["generate", d, "--prompt", "hi", "--max-new-tokens", "40"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--max-new-tokens 40 leaves no room for a prompt in the context of 40 tokens"),
        "{err}"
    );
}

/// Regression (issue 29): `--top-p 1.5` was accepted and `--temperature -1` was clap's
/// "unexpected argument". Integer flags are range-checked as they are parsed (negative values
/// included), number flags right after, before the model is loaded: each error names the flag,
/// the value and the allowed range, and nothing is printed on stdout.
#[test]
fn numeric_flags_out_of_range_are_range_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    tiny_model_folder(&dir);
    let d = dir.to_str().unwrap();
    let generate = |flag: &'static str, value: &'static str| {
        vec!["generate", d, "--prompt", "hi", flag, value]
    };
    // Parsed: clap's usage error (exit 2) with our range.
    let parsed: Vec<(Vec<&str>, &str, &str, &str)> = vec![
        (generate("--top-k", "-3"), "--top-k", "-3", "an integer ≥ 0"),
        (generate("--seed", "-7"), "--seed", "-7", "an integer ≥ 0"),
        (
            generate("--max-new-tokens", "-5"),
            "--max-new-tokens",
            "-5",
            "an integer ≥ 0",
        ),
        (
            vec!["generate", d, "--input", "x.jsonl", "--batch-size", "0"],
            "--batch-size",
            "0",
            "an integer ≥ 1",
        ),
        (
            vec!["score", d, "--input", "x.jsonl", "--batch-size", "-2"],
            "--batch-size",
            "-2",
            "an integer ≥ 1",
        ),
        (
            vec![
                "init",
                "--texts",
                "t.txt",
                "--out",
                "o",
                "--vocab-size",
                "0",
            ],
            "--vocab-size",
            "0",
            // The byte alphabet (256) plus the special tokens: a smaller BPE cannot exist.
            "an integer ≥ 258",
        ),
        (
            vec!["bench", "--steps", "0"],
            "--steps",
            "0",
            "an integer ≥ 1",
        ),
        (
            vec!["bench", "--rounds", "-1"],
            "--rounds",
            "-1",
            "an integer ≥ 1",
        ),
    ];
    for (args, flag, value, range) in parsed {
        let (code, stdout, err) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&format!("invalid value '{value}' for '{flag}"))
                && err.contains(&format!("out of range; it must be {range}")),
            "{args:?}: {err}"
        );
        assert!(stdout.is_empty());
    }
    // Checked after parsing, all at once: one error line (exit 1).
    let checked: Vec<(Vec<&str>, &str)> = vec![
        (
            generate("--top-p", "1.5"),
            "--top-p 1.5: must be in (0, 1] (1 disables)",
        ),
        (
            generate("--top-p", "0"),
            "--top-p 0: must be in (0, 1] (1 disables)",
        ),
        (
            generate("--temperature", "-1"),
            "--temperature -1: must be ≥ 0 (0 is greedy)",
        ),
        (
            generate("--temperature", "nan"),
            "--temperature NaN: must be ≥ 0 (0 is greedy)",
        ),
        (
            generate("--max-new-tokens", "0"),
            "--max-new-tokens must be at least 1",
        ),
        (
            vec![
                "generate",
                "no-such-folder",
                "--prompt",
                "hi",
                "--temperature",
                "-0.5",
                "--top-p",
                "2",
            ],
            "error: --temperature -0.5: must be ≥ 0 (0 is greedy); --top-p 2: must be in (0, 1] (1 disables)",
        ),
    ];
    for (args, want) in checked {
        let (code, stdout, err) = run(&args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(stdout.is_empty());
    }
    // Values in range still parse.
    let (code, _, err) = run(&[
        "generate",
        d,
        "--prompt",
        "hi",
        "--top-p",
        "0.9",
        "--temperature",
        "0.5",
        "--max-new-tokens",
        "2",
    ]);
    assert_eq!(code, Some(0), "{err}");
}

/// Regression (issue 29): a config.json whose sizes disagree with its weights (1,000 layers,
/// intermediate size 2·10⁹) made `model generate` abort with "memory allocation of
/// 1024000000000 bytes failed". The config is checked against the safetensors header before the
/// tensors are allocated: the error names the key or the tensor, what the config says and what
/// the file holds.
#[test]
fn a_config_that_disagrees_with_its_weights_is_refused_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    tiny_model_folder(&dir);

    let doctored = tmp.path().join("doctored");
    std::fs::create_dir_all(&doctored).unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), doctored.join(e.file_name())).unwrap();
    }
    edit_config(
        &doctored,
        &[
            ("num_hidden_layers", serde_json::json!(1000)),
            ("intermediate_size", serde_json::json!(2_000_000_000u64)),
        ],
    );
    let (code, _, err) = run(&["generate", doctored.to_str().unwrap(), "--prompt", "hi"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("config.json: key `num_hidden_layers` = 1000")
            && err.contains("holds the weights of 2 layers"),
        "{err}"
    );
    assert!(!err.contains("memory allocation"), "{err}");

    // The layers right, the intermediate size not: the tensor it disagrees with is named.
    edit_config(&doctored, &[("num_hidden_layers", serde_json::json!(2))]);
    let (code, _, err) = run(&["generate", doctored.to_str().unwrap(), "--prompt", "hi"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("model.safetensors: tensor `model.layers.0.mlp.gate_proj.weight` has shape [172, 64], expected [2000000000, 64]"),
        "{err}"
    );
    assert!(!err.contains("memory allocation"), "{err}");
}

/// Regression (issue 29): a model that cannot fit in memory is refused with the bytes it needs
/// and the bytes there are, before its weights are read. The weights here are a sparse file
/// whose header declares a 2^20 x 2^20 f32 embedding (4 TiB; no disk is used).
#[cfg(target_os = "linux")]
#[test]
fn a_model_that_cannot_fit_in_memory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("huge");
    std::fs::create_dir_all(&dir).unwrap();
    let (vocab, hidden) = (1u64 << 20, 1u64 << 20);
    let bytes = vocab * hidden * 4;
    let header = serde_json::json!({
        "model.embed_tokens.weight": {"dtype": "F32", "shape": [vocab, hidden], "data_offsets": [0, bytes]},
    })
    .to_string();
    let mut file = Vec::new();
    file.extend((header.len() as u64).to_le_bytes());
    file.extend(header.as_bytes());
    let weights = dir.join("model.safetensors");
    std::fs::write(&weights, &file).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap();
    f.set_len(file.len() as u64 + bytes).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": 4, "num_hidden_layers": 1,
            "num_attention_heads": 1, "tie_word_embeddings": true,
        })
        .to_string(),
    )
    .unwrap();
    let (code, _, err) = run(&["info", dir.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    // The parameters in f32, and the largest tensor's bytes while it is read (the files are
    // read one tensor at a time, not held).
    let need = bytes + bytes;
    assert!(
        err.contains(&format!("needs {need} bytes"))
            && err.contains("bytes available (MemAvailable in /proc/meminfo)"),
        "{err}"
    );
    assert!(!err.contains("memory allocation"), "{err}");
}
