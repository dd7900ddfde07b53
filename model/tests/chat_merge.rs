//! `model chat` (a conversation rendered with the folder's chat template, one reply) and
//! `model merge` (a PEFT adapter merged into its base, saved as a full folder).

mod common;

use common::{run, tiny_model_folder};
use model::{SamplingConfig, generate, load, parse_device};
use serde_json::{Value, json};

#[path = "common/fixtures.rs"]
mod fixtures;
use fixtures::{fixture, logits, max_real_diff, read_json, reference_batch};

/// ChatML without a default system turn.
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + \
                      message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if \
                      add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

#[test]
fn chat_replies_to_the_conversation_rendered_with_the_folder_template() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let tok = tiny_model_folder(&dir);
    let d = dir.to_str().unwrap();
    let messages = tmp.path().join("messages.json");
    let conversation = json!([
        {"role": "user", "content": "say hello."},
        {"role": "assistant", "content": "hello there!"},
        {"role": "user", "content": "name a colour."}
    ]);
    std::fs::write(&messages, conversation.to_string()).unwrap();
    let m = messages.to_str().unwrap();
    let args = [
        "chat",
        d,
        "--messages",
        m,
        "--system",
        "Be brief.",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
    ];

    // Without a chat template: one error line that says so.
    let (code, out, err) = run(&args);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("has no chat template"), "{err}");

    let path = dir.join("tokenizer_config.json");
    let mut config = read_json(&path);
    config["chat_template"] = json!(CHATML);
    std::fs::write(&path, config.to_string()).unwrap();

    let (code, out, err) = run(&[&args[..], &["--json"]].concat());
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    // The prompt is the ChatML render of --system and the file's turns, with the assistant header.
    assert_eq!(
        v["prompt"],
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nsay hello.<|im_end|>\n\
         <|im_start|>assistant\nhello there!<|im_end|>\n<|im_start|>user\nname a colour.<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // The reply is the greedy continuation of that prompt, up to EOS (this tokenizer has no
    // `<|im_end|>` token).
    let device = parse_device("cpu").unwrap();
    let model = load(&dir, &device).unwrap().model;
    let prompt = tok.encode(v["prompt"].as_str().unwrap()).unwrap();
    let cfg = SamplingConfig {
        max_new_tokens: 6,
        temperature: 0.0,
        eos_token_ids: vec![tok.eos_id],
        pad_token_id: tok.pad_id,
        ..SamplingConfig::default()
    };
    let want: Vec<u32> = generate(&model, &[prompt], &cfg).unwrap().responses()[0]
        .iter()
        .copied()
        .filter(|&t| t != tok.eos_id)
        .collect();
    let tokens: Vec<u32> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(tokens, want);
    assert_eq!(v["reply"], tok.decode(&want).unwrap());
    // Without --json: the reply alone.
    let (code, out, err) = run(&args);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, format!("{}\n", tok.decode(&want).unwrap()));

    // The conversation must end with a user turn; --system and a system message conflict.
    let bad = tmp.path().join("bad.json");
    std::fs::write(
        &bad,
        json!([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]).to_string(),
    )
    .unwrap();
    let (code, _, err) = run(&[
        "chat",
        d,
        "--messages",
        bad.to_str().unwrap(),
        "--system",
        "y",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--system and a system message"), "{err}");
    std::fs::write(
        &bad,
        json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
            .to_string(),
    )
    .unwrap();
    let (code, _, err) = run(&["chat", d, "--messages", bad.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("end the list with a user message"), "{err}");
}

#[test]
fn merge_writes_a_folder_with_the_adapted_models_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = (
        fixture("llama_gqa_untied"),
        fixture("lora_llama_gqa_untied"),
    );
    let out = tmp.path().join("merged");
    let (code, stdout, err) = run(&[
        "merge",
        base.to_str().unwrap(),
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(stdout.contains("r = 4"), "{stdout}");
    // A plain folder: no adapter inside, nothing left beside it.
    assert!(out.join("model.safetensors").is_file());
    assert!(!out.join("adapter").exists());
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["merged"]);

    let device = parse_device("cpu").unwrap();
    let plain = load(&base, &device).unwrap().model;
    let adapted = plain.clone().load_lora(&adapter).unwrap();
    let merged = load(&out, &device).unwrap().model;
    assert!(merged.lora_config().is_none());
    let r = read_json(&base.join("reference.json"));
    let batch = reference_batch(&r);
    let v = plain.config().vocab_size;
    let want = logits(&adapted, &batch);
    let diff = max_real_diff(&logits(&merged, &batch), &want, &batch, v);
    assert!(diff < 1e-4, "max |merged - adapted| {diff:e}");
    // The adapter matters: the base alone is far from the adapted logits.
    let off = max_real_diff(&logits(&plain, &batch), &want, &batch, v);
    assert!(off > 0.1, "the adapter changes the logits by only {off}");

    // An adapter that is not one: one error naming it.
    let (code, _, err) = run(&[
        "merge",
        base.to_str().unwrap(),
        base.to_str().unwrap(),
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("llama_gqa_untied"), "{err}");
    assert!(!tmp.path().join("x").exists());
}
