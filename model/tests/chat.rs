//! Chat templates against transformers: every fixture folder under `tests/fixtures/chat` (written
//! by `scripts/make_chat_fixtures.py`) rendered over every conversation of `expected.json`, byte
//! for byte as `apply_chat_template(tokenize=False)`, with the template's own error where it
//! raises, token ids as `apply_chat_template(tokenize=True)`, and final-assistant spans; then the
//! template lookup rules and the fuel bound.

use model::Tokenizer;
use model::chat::{ChatTemplate, Message, SpecialTokens};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat")
}

struct Expected {
    conversations: BTreeMap<String, Vec<Message>>,
    cases: Vec<Value>,
    spans: Vec<Value>,
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    Expected {
        conversations: serde_json::from_value(json["conversations"].clone()).unwrap(),
        cases: json["cases"].as_array().unwrap().clone(),
        spans: json["spans"].as_array().unwrap().clone(),
    }
}

fn load(name: &str) -> ChatTemplate {
    ChatTemplate::from_dir(&fixtures().join(name))
        .unwrap()
        .unwrap_or_else(|| panic!("{name} has a template"))
}

#[test]
fn renders_match_transformers() {
    let expected = expected();
    let mut templates: BTreeMap<String, ChatTemplate> = BTreeMap::new();
    let (mut texts, mut errors) = (0, 0);
    for case in &expected.cases {
        let name = case["template"].as_str().unwrap();
        let conversation = &expected.conversations[case["conversation"].as_str().unwrap()];
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let template = templates.entry(name.into()).or_insert_with(|| load(name));
        let label = format!("{case}");
        let rendered = template.render(conversation, add_generation_prompt);
        if let Some(text) = case["text"].as_str() {
            assert_eq!(rendered.unwrap(), text, "{label}");
            texts += 1;
        } else {
            let message = case["error"].as_str().unwrap();
            let err = rendered.expect_err(&label).to_string();
            assert!(
                err.contains(&format!("refused the conversation: {message}")),
                "{label}: {err}"
            );
            errors += 1;
        }
    }
    // 10 templates x 10 conversations x 2 settings; the raises of gemma, mistral and llama2.
    assert_eq!((texts, errors), (190, 10));
    assert_eq!(templates.len(), 10);
}

#[test]
fn rendered_then_encoded_ids_match_transformers() {
    // The shared tokenizer.json has a `<s> $A` post-processor: ids only match when rendering is
    // followed by encoding without special tokens, as apply_chat_template(tokenize=True) does.
    let tokenizer =
        Tokenizer::from_file(&fixtures().join("tokenizer.json"), None, None, None).unwrap();
    let expected = expected();
    let mut checked = 0;
    for case in expected.cases.iter().filter(|c| c.get("ids").is_some()) {
        let name = case["template"].as_str().unwrap();
        let conversation = &expected.conversations[case["conversation"].as_str().unwrap()];
        let text = load(name).render(conversation, true).unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(tokenizer.encode(&text).unwrap(), ids, "{case}");
        checked += 1;
    }
    assert!(checked >= 25, "only {checked} cases carry ids");
}

#[test]
fn final_assistant_spans_match_transformers() {
    let expected = expected();
    for span in &expected.spans {
        let name = span["template"].as_str().unwrap();
        let conversation = &expected.conversations[span["conversation"].as_str().unwrap()];
        let turn = load(name)
            .render_with_final_assistant(conversation)
            .unwrap();
        let (start, end) = (
            span["start"].as_u64().unwrap() as usize,
            span["end"].as_u64().unwrap() as usize,
        );
        assert_eq!(turn.span, start..end, "{span}");
        assert_eq!(turn.text, load(name).render(conversation, false).unwrap());
    }
    assert!(expected.spans.len() >= 30);

    // The span of ChatML holds the reply and its end-of-turn token, nothing of the prompt.
    let qwen = load("qwen2_5");
    let turn = qwen
        .render_with_final_assistant(&[Message::user("Hi"), Message::assistant("Hello there")])
        .unwrap();
    assert_eq!(&turn.text[turn.span.clone()], "Hello there<|im_end|>\n");
    assert!(turn.text[..turn.span.start].ends_with("<|im_start|>assistant\n"));
    // Gemma names the assistant `model`.
    let turn = load("gemma")
        .render_with_final_assistant(&[Message::user("Hi"), Message::assistant(" Yo ")])
        .unwrap();
    assert_eq!(&turn.text[turn.span], "Yo<end_of_turn>\n");
    let err = qwen
        .render_with_final_assistant(&[Message::user("Hi")])
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("must end with an assistant message"),
        "{err}"
    );
}

#[test]
fn prompt_ends_with_the_generation_header() {
    let llama = load("llama3_1");
    let prompt = llama
        .render_prompt(&[Message::system("Be brief."), Message::user("Hi")])
        .unwrap();
    assert_eq!(
        prompt,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\
         Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let err = llama
        .render_prompt(&[Message::user("Hi"), Message::assistant("Hello")])
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("must end with a user message, found `assistant`"),
        "{err}"
    );
}

#[test]
fn template_errors_carry_the_templates_message() {
    let gemma = load("gemma");
    let err = gemma
        .render(&[Message::system("s"), Message::user("u")], true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("gemma/tokenizer_config.json"), "{err}");
    assert!(
        err.contains("refused the conversation: System role not supported"),
        "{err}"
    );
    let err = load("mistral_v0_3")
        .render(&[Message::user("a"), Message::user("b")], false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("conversation roles must alternate user/assistant"),
        "{err}"
    );
    let err = gemma.render(&[], true).unwrap_err().to_string();
    assert!(err.contains("empty conversation"), "{err}");
}

#[test]
fn chat_template_jinja_wins_over_the_config() {
    // zephyr/tokenizer_config.json has its own chat_template; transformers 5 uses the file.
    let dir = fixtures().join("zephyr");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert!(config["chat_template"].is_string());
    let out = load("zephyr").render(&[Message::user("Hi")], true).unwrap();
    assert_eq!(out, "<|user|>\nHi</s>\n<|assistant|>\n");
}

#[test]
fn template_list_uses_default() {
    let hermes = load("hermes_list");
    let out = hermes.render(&[Message::user("Hi")], false).unwrap();
    assert_eq!(out, "<|begin_of_text|><|im_start|>user\nHi<|im_end|>\n");

    let tmp = tempfile::tempdir().unwrap();
    let config = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "x"}]});
    std::fs::write(tmp.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let err = ChatTemplate::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("none named \"default\""), "{err}");
}

#[test]
fn folder_lookup_rules() {
    // No template anywhere: None (a base model), not an error.
    let tmp = tempfile::tempdir().unwrap();
    assert!(ChatTemplate::from_dir(tmp.path()).unwrap().is_none());
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"eos_token": "</s>"}"#,
    )
    .unwrap();
    assert!(ChatTemplate::from_dir(tmp.path()).unwrap().is_none());

    // A chat_template.jinja alone, with the config's tokens.
    std::fs::write(
        tmp.path().join("chat_template.jinja"),
        "{{ messages[0].content }}{{ eos_token }}\n",
    )
    .unwrap();
    let t = ChatTemplate::from_dir(tmp.path()).unwrap().unwrap();
    assert_eq!(t.render(&[Message::user("a")], false).unwrap(), "a</s>");

    // A template that does not compile names its file and says what to do.
    std::fs::write(
        tmp.path().join("chat_template.jinja"),
        "{% for m in messages %}{{ m }}",
    )
    .unwrap();
    let err = ChatTemplate::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(
        err.contains("chat_template.jinja: the chat template is not valid Jinja"),
        "{err}"
    );
    assert!(err.contains("fix the template"), "{err}");

    // Broken JSON in the config is reported with its path.
    std::fs::write(tmp.path().join("tokenizer_config.json"), "{").unwrap();
    let err = ChatTemplate::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer_config.json: not valid JSON"),
        "{err}"
    );
}

#[test]
fn endless_template_runs_out_of_fuel() {
    // range() is capped by the engine, so the loop nests: 10^15 iterations with no output.
    let source = "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}\
                  {% endfor %}{% endfor %}{% endfor %}";
    let template = ChatTemplate::new(source, SpecialTokens::new()).unwrap();
    let start = Instant::now();
    let err = template
        .render(&[Message::user("x")], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("instructions without finishing"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );

    // Unbounded recursion through a macro stops at the recursion limit.
    let source = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
    let err = ChatTemplate::new(source, SpecialTokens::new())
        .unwrap()
        .render(&[Message::user("x")], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("recursion"), "{err}");
}
