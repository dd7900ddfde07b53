//! `sft` on conversational data (TRL's `messages` and prompt/completion forms) through a model
//! folder's chat template: the tokens the loss covers, the template carried into the checkpoint
//! and named in `rlhf.json`, `data.chat_template` overriding the folder's, and one-line errors.

mod common;

use common::sft;
use model::Tokenizer;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// ChatML without a default system turn (Qwen2.5's without its tool branches).
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + \
                      message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if \
                      add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A base model folder with the ChatML template in its tokenizer_config.json: 3 steps of the
/// demo config, then the template written in.
fn chat_base(tmp: &Path) -> PathBuf {
    let out = tmp.join("base");
    let (ok, _, err) = sft(
        &["train.max_steps=3", "train.eval_every=0"],
        &["--out", out.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let dir = out.join("final");
    let path = dir.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["chat_template"] = json!(CHATML);
    std::fs::write(&path, config.to_string()).unwrap();
    dir
}

/// 24 distinct two-exchange conversations: system, user, assistant, user, assistant.
fn conversations() -> Vec<Vec<(&'static str, String)>> {
    (0..24)
        .map(|i| {
            let (a, b) = (i % 6 + 1, i / 6 + 2);
            vec![
                ("system", "You add numbers.".to_string()),
                ("user", format!("What is {a} plus {b}?")),
                ("assistant", format!("The answer is {}.", a + b)),
                ("user", format!("And {a} times {b}?")),
                ("assistant", format!("That is {}.", a * b)),
            ]
        })
        .collect()
}

fn messages_json(turns: &[(&str, String)]) -> Value {
    turns
        .iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect()
}

/// `(targets, tokens)` of the `loss: T of the N training tokens` line.
fn loss_line(stdout: &str) -> (usize, usize) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("loss: "))
        .unwrap_or_else(|| panic!("no loss line in {stdout}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    (words[1].parse().unwrap(), words[4].parse().unwrap())
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn conversations_train_through_the_chat_template_and_the_checkpoint_carries_it() {
    let tmp = tempfile::tempdir().unwrap();
    let base = chat_base(tmp.path());
    let convs = conversations();
    let data = tmp.path().join("chat.jsonl");
    let lines: Vec<String> = convs
        .iter()
        .map(|c| json!({"messages": messages_json(c)}).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let base_set = format!("model.base={}", base.display());
    let data_set = format!("data.path={}", data.display());
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut sets = vec![
            base_set.as_str(),
            data_set.as_str(),
            "data.validation_fraction=0",
            "data.max_length=256",
            "train.max_steps=2",
            "train.eval_every=0",
        ];
        sets.extend_from_slice(extra);
        let (ok, stdout, err) = sft(&sets, &["--out", out.to_str().unwrap()]);
        assert!(ok, "{err}\n{stdout}");
        (out, stdout)
    };

    // The expected counts from the tokenizer alone, the ChatML render written out by hand.
    let tok = Tokenizer::from_file(&base.join("tokenizer.json"), None, None, None).unwrap();
    let render = |c: &[(&str, String)]| -> String {
        c.iter()
            .map(|(role, content)| format!("<|im_start|>{role}\n{content}<|im_end|>\n"))
            .collect()
    };
    let tokens: usize = convs
        .iter()
        .map(|c| tok.encode(&render(c)).unwrap().len())
        .sum();
    // An assistant turn is its content and `<|im_end|>\n` (the header is the prompt's); each
    // starts with a letter after the header's newline, so its tokens are those of the text alone.
    let assistant: usize = convs
        .iter()
        .flatten()
        .filter(|(role, _)| *role == "assistant")
        .map(|(_, content)| tok.encode(&format!("{content}<|im_end|>\n")).unwrap().len())
        .sum();

    // The `messages` form, TRL's default: every token is a target (but the first of each,
    // which nothing predicts).
    let (whole, stdout) = run("whole", &[]);
    assert!(
        stdout.contains("data: 24 conversations, 0 duplicates removed"),
        "{stdout}"
    );
    assert_eq!(
        loss_line(&stdout),
        (tokens - convs.len(), tokens),
        "{stdout}"
    );
    // assistant_only_loss: the two assistant turns of each conversation only.
    let (_, stdout) = run("assistant", &["data.assistant_only_loss=true"]);
    assert_eq!(loss_line(&stdout), (assistant, tokens), "{stdout}");
    assert!(assistant * 3 < tokens, "{assistant} of {tokens}");

    // rlhf.json names where the template came from; tokenizer_config.json carries it, so the
    // checkpoint is a base with the same template (the same counts from it).
    let final_dir = whole.join("final");
    let meta = read_json(&final_dir.join("rlhf.json"));
    assert_eq!(meta["chat_template"], "model folder", "{meta}");
    assert!(meta.get("prompt_template").is_none(), "{meta}");
    let saved = read_json(&final_dir.join("tokenizer_config.json"));
    assert_eq!(saved["chat_template"], CHATML);
    assert_ne!(
        std::fs::read(final_dir.join("model.safetensors")).unwrap(),
        std::fs::read(base.join("model.safetensors")).unwrap()
    );
    let again = format!("model.base={}", final_dir.display());
    let (_, stdout) = run("again", &[&again]);
    assert_eq!(
        loss_line(&stdout),
        (tokens - convs.len(), tokens),
        "{stdout}"
    );

    // data.chat_template overrides the folder's; rlhf.json records the file, the checkpoint its
    // text. This one writes `role: content` lines, fewer tokens than ChatML's markers.
    let file = tmp.path().join("plain.jinja");
    let plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}\
                 {% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}";
    std::fs::write(&file, plain).unwrap();
    let file_set = format!("data.chat_template={}", file.display());
    let (other, stdout) = run("file", &[&file_set]);
    let other_tokens: usize = convs
        .iter()
        .map(|c| {
            let text: String = c.iter().map(|(r, m)| format!("{r}: {m}\n")).collect();
            tok.encode(&text).unwrap().len()
        })
        .sum();
    assert_eq!(
        loss_line(&stdout),
        (other_tokens - convs.len(), other_tokens),
        "{stdout}"
    );
    let meta = read_json(&other.join("final/rlhf.json"));
    assert_eq!(meta["chat_template"], file.display().to_string(), "{meta}");
    let saved = read_json(&other.join("final/tokenizer_config.json"));
    assert_eq!(saved["chat_template"], plain);
}

#[test]
fn prompt_completion_trains_the_completion() {
    let tmp = tempfile::tempdir().unwrap();
    let base = chat_base(tmp.path());
    let convs = conversations();
    // The prompt: all turns but the last; the completion: the last assistant turn.
    let lines: Vec<String> = convs
        .iter()
        .map(|c| {
            let (prompt, completion) = c.split_at(c.len() - 1);
            json!({"prompt": messages_json(prompt), "completion": messages_json(completion)})
                .to_string()
        })
        .collect();
    let data = tmp.path().join("pc.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let tok = Tokenizer::from_file(&base.join("tokenizer.json"), None, None, None).unwrap();
    let completions: usize = convs
        .iter()
        .map(|c| {
            let content = &c.last().unwrap().1;
            tok.encode(&format!("{content}<|im_end|>\n")).unwrap().len()
        })
        .sum();
    let (ok, stdout, err) = sft(
        &[
            &format!("model.base={}", base.display()),
            &format!("data.path={}", data.display()),
            "data.validation_fraction=0",
            "data.max_length=256",
            "train.max_steps=1",
            "train.eval_every=0",
        ],
        &["--out", tmp.path().join("run").to_str().unwrap()],
    );
    assert!(ok, "{err}\n{stdout}");
    assert!(stdout.contains("(the completions)"), "{stdout}");
    assert_eq!(loss_line(&stdout).0, completions, "{stdout}");
}

/// The mistakes of conversational data are one line on stderr naming the key to change.
#[test]
fn chat_data_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("chat.jsonl");
    let line = json!({"messages": messages_json(&conversations()[0])}).to_string();
    std::fs::write(&data, line).unwrap();
    let data_set = format!("data.path={}", data.display());
    let out = tmp.path().join("x");
    let o = out.to_str().unwrap();
    let one_error = |sets: &[&str], wants: &[&str]| {
        let (ok, _, err) = sft(sets, &["--out", o]);
        assert!(!ok);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        for w in wants {
            assert!(err.contains(w), "{w:?} not in {err}");
        }
    };
    // A new preset model has no chat template.
    one_error(
        &[&data_set],
        &[
            "chat.jsonl",
            "model.preset",
            "model.base",
            "data.chat_template",
        ],
    );
    // A base model folder without a chat template.
    let plain = tmp.path().join("plain");
    let (ok, _, err) = sft(
        &["train.max_steps=1", "train.eval_every=0"],
        &["--out", plain.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let base_set = format!("model.base={}", plain.join("final").display());
    one_error(
        &[&data_set, &base_set],
        &["has none", "model.base", "data.chat_template"],
    );
    // A prompt template with conversations.
    one_error(
        &[&data_set, "data.template=\"Q: {prompt}\\nA:\""],
        &[
            "data.template",
            "holds conversations",
            "remove data.template",
        ],
    );
    // A chat template with plain data.
    one_error(
        &["data.chat_template=\"t.jinja\""],
        &["data.chat_template", "plain", "remove data.chat_template"],
    );
    assert!(!out.exists());
}
