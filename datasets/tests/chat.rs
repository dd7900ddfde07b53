//! Conversational records (TRL's formats) and their tokenization with a chat template: the
//! Qwen2.5 and Llama 3 templates of model/tests/fixtures/chat with its tokenizer.json, HH-RLHF and
//! OpenAssistant rows from ../shared/data (skipped, with a message, where it is absent), and every
//! loader error naming file, line and field.

use datasets::adapters::{read_hh_rlhf, read_hh_rlhf_chat, read_oasst, read_oasst_chat};
use datasets::tokenize::{
    Tokenized, assistant_spans, encode_chat_pair, encode_chat_prompts, tokenize_conversation,
};
use datasets::{
    ChatComparison, Conversation, Message, PreferenceRecords, PromptRecords, SftRecords, Source,
    load_chat_comparisons, load_chat_prompts, load_conversations, load_preference_records,
    load_prompt_records, load_sft_records,
};
use model::Tokenizer;
use model::chat::{ChatTemplate, SpecialTokens};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/chat")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&fixtures().join("tokenizer.json"), None, None, None).unwrap()
}

fn qwen() -> ChatTemplate {
    ChatTemplate::from_dir(&fixtures().join("qwen2_5"))
        .unwrap()
        .unwrap()
}

fn shared(rel: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipped: {} not found (../shared/data is absent)",
            p.display()
        );
        None
    }
}

/// Writes `text` to `name` in `dir` and returns its source.
fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> Source {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    Source::new(path)
}

fn example(t: Tokenized) -> datasets::tokenize::SftExample {
    match t {
        Tokenized::Example(e) => e,
        other => panic!("expected an example, got {other:?}"),
    }
}

/// The runs of consecutive target tokens of an example.
fn target_runs(e: &datasets::tokenize::SftExample) -> Vec<Vec<u32>> {
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut previous = false;
    for (&id, &target) in e.tokens.iter().zip(&e.is_target) {
        if target {
            if !previous {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(id);
        }
        previous = target;
    }
    runs
}

fn multi_turn() -> Vec<Message> {
    vec![
        Message::system("Be brief."),
        Message::user("Name a colour."),
        Message::assistant("Blue."),
        Message::user("Another?"),
        Message::assistant("Green, then red."),
    ]
}

#[test]
fn multi_turn_assistant_only_loss_trains_every_assistant_turn_through_im_end() {
    let (tok, template) = (tokenizer(), qwen());
    let conv = Conversation {
        messages: multi_turn(),
        completion_start: None,
        line: 1,
    };
    let e = example(tokenize_conversation(&tok, &template, &conv, 512, true).unwrap());
    // The tokens are exactly the whole render encoded (no special tokens added, no EOS).
    let text = template.render(&conv.messages, false).unwrap();
    assert_eq!(e.tokens, tok.encode(&text).unwrap());
    // Two runs of targets: each assistant content and the `<|im_end|>\n` the template writes
    // after it; the `<|im_start|>assistant\n` header is the prompt's.
    let runs = target_runs(&e);
    assert_eq!(
        runs,
        vec![
            tok.encode("Blue.<|im_end|>\n").unwrap(),
            tok.encode("Green, then red.<|im_end|>\n").unwrap()
        ]
    );
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    assert!(runs.iter().all(|r| r[r.len() - 2] == im_end));
    // decode skips special tokens: the target text is the contents and their newlines.
    let decoded: Vec<String> = runs.iter().map(|r| tok.decode(r).unwrap()).collect();
    assert_eq!(decoded, ["Blue.\n", "Green, then red.\n"]);
    // The byte spans the token runs come from.
    let spans = assistant_spans(&template, &conv.messages).unwrap();
    let span_texts: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
    assert_eq!(
        span_texts,
        ["Blue.<|im_end|>\n", "Green, then red.<|im_end|>\n"]
    );

    // Without assistant_only_loss the `messages` form trains every token (TRL's default).
    let all = example(tokenize_conversation(&tok, &template, &conv, 512, false).unwrap());
    assert_eq!(all.tokens, e.tokens);
    assert!(all.is_target.iter().all(|&t| t));

    // Too long: counted, or dropped untokenized past the byte bound.
    let n = e.len();
    assert_eq!(
        tokenize_conversation(&tok, &template, &conv, n - 1, true).unwrap(),
        Tokenized::TooLong(Some(n))
    );
    let long = Conversation {
        messages: vec![
            Message::user("x"),
            Message::assistant("y".repeat(4 * tok.max_token_bytes() + 1)),
        ],
        completion_start: None,
        line: 1,
    };
    assert_eq!(
        tokenize_conversation(&tok, &template, &long, 4, true).unwrap(),
        Tokenized::TooLong(None)
    );
}

#[test]
fn assistant_mask_matches_trl_llama3_training_template() {
    // The mask transformers 5.23 gives for TRL 1.16's Llama 3 training template (its
    // `{% generation %}` block holds each assistant content and `<|eot_id|>`), computed with:
    //
    //   from transformers import PreTrainedTokenizerFast
    //   from trl.chat_template_utils import llama3_training_chat_template as tpl
    //   tok = PreTrainedTokenizerFast(tokenizer_file="model/tests/fixtures/chat/tokenizer.json")
    //   messages = [{"role": "system", "content": "Be brief."},
    //               {"role": "user", "content": "Name a colour."},
    //               {"role": "assistant", "content": "Blue."},
    //               {"role": "user", "content": "Another?"},
    //               {"role": "assistant", "content": " Green, then red."}]
    //   out = tok.apply_chat_template(messages, chat_template=tpl, tokenize=True,
    //                                 return_dict=True, return_assistant_tokens_mask=True)
    //   print(out["input_ids"], out["assistant_masks"])
    const IDS: [u32; 94] = [
        5, 101, 107, 286, 87, 95, 6, 217, 217, 52, 87, 239, 84, 100, 91, 87, 88, 32, 4, 5, 103,
        101, 276, 6, 217, 217, 64, 83, 95, 87, 275, 283, 97, 94, 284, 100, 32, 4, 5, 83, 101, 101,
        91, 286, 294, 102, 6, 217, 217, 52, 94, 103, 87, 32, 4, 5, 103, 101, 276, 6, 217, 217, 51,
        96, 97, 277, 276, 49, 4, 5, 83, 101, 101, 91, 286, 294, 102, 6, 217, 217, 57, 100, 87, 279,
        30, 239, 277, 279, 239, 100, 87, 86, 32, 4,
    ];
    let masked = |i: usize| (49..55).contains(&i) || (80..94).contains(&i);
    let source = "{%- for message in messages %}\n\
        {%- if loop.index0 == 0 %}{{- bos_token }}{%- endif %}\n\
        {%- if message['role'] == 'assistant' %}\n\
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n\
        {%- generation %}\n\
        {{- message['content'] | trim + '<|eot_id|>' }}\n\
        {%- endgeneration %}\n\
        {%- else %}\n\
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n\
        {%- endif %}\n\
        {%- endfor %}\n\
        {%- if add_generation_prompt %}\n\
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n\
        {%- endif %}\n";
    let template = ChatTemplate::new(source, SpecialTokens::new()).unwrap();
    let mut messages = multi_turn();
    messages[4].content = " Green, then red.".into();
    let conv = Conversation {
        messages,
        completion_start: None,
        line: 1,
    };
    let e = example(tokenize_conversation(&tokenizer(), &template, &conv, 512, true).unwrap());
    assert_eq!(e.tokens, IDS);
    let expected: Vec<bool> = (0..IDS.len()).map(masked).collect();
    assert_eq!(e.is_target, expected);
}

#[test]
fn prompt_completion_trains_the_completion_only() {
    let dir = tempfile::tempdir().unwrap();
    let src = file(
        &dir,
        "pc.jsonl",
        concat!(
            r#"{"prompt": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}], "#,
            r#""completion": [{"role": "assistant", "content": "Rome."}]}"#,
            "\n"
        ),
    );
    let convs = load_conversations(&src).unwrap();
    assert_eq!(convs.len(), 1);
    let conv = &convs[0];
    assert_eq!(conv.completion_start, Some(3));
    assert_eq!(conv.prompt().len(), 3);
    assert_eq!(conv.completion(), [Message::assistant("Rome.")]);
    let (tok, template) = (tokenizer(), qwen());
    // TRL's default for prompt-completion: completion-only, the earlier assistant turn untrained,
    // with or without assistant_only_loss.
    for assistant_only in [false, true] {
        let e = example(tokenize_conversation(&tok, &template, conv, 512, assistant_only).unwrap());
        assert_eq!(
            target_runs(&e),
            vec![tok.encode("Rome.<|im_end|>\n").unwrap()]
        );
    }
    // Unset completion_start: the conversation trained whole, as the `messages` form.
    let whole = Conversation {
        completion_start: None,
        ..conv.clone()
    };
    let e = example(tokenize_conversation(&tok, &template, &whole, 512, true).unwrap());
    assert_eq!(
        target_runs(&e),
        vec![
            tok.encode("Paris.<|im_end|>\n").unwrap(),
            tok.encode("Rome.<|im_end|>\n").unwrap()
        ]
    );
}

#[test]
fn sft_records_are_plain_or_chat_by_the_first_record() {
    let dir = tempfile::tempdir().unwrap();
    let plain = file(
        &dir,
        "plain.jsonl",
        "{\"prompt\": \"q\", \"response\": \"a\"}\n",
    );
    match load_sft_records(&plain).unwrap() {
        SftRecords::Plain(d) => {
            assert_eq!((d[0].prompt.as_str(), d[0].response.as_str()), ("q", "a"))
        }
        other => panic!("{other:?}"),
    }
    let chat = file(
        &dir,
        "chat.jsonl",
        concat!(
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#,
            "\n",
            r#"{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}"#,
            "\n"
        ),
    );
    match load_sft_records(&chat).unwrap() {
        SftRecords::Chat(c) => {
            assert_eq!(c.len(), 2);
            assert_eq!((c[0].completion_start, c[0].line), (None, 1));
            assert_eq!((c[1].completion_start, c[1].line), (Some(1), 2));
        }
        other => panic!("{other:?}"),
    }
    // Column renames apply to conversational fields too.
    let renamed = file(
        &dir,
        "renamed.jsonl",
        concat!(
            r#"{"conversation": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#,
            "\n"
        ),
    );
    let renamed = Source {
        columns: [("messages".to_string(), "conversation".to_string())].into(),
        ..renamed
    };
    assert_eq!(load_conversations(&renamed).unwrap()[0].messages.len(), 2);

    // A tool turn is accepted (as TRL does) and never trained.
    let tool = file(
        &dir,
        "tool.jsonl",
        concat!(
            r#"{"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "checking"}, {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}"#,
            "\n"
        ),
    );
    let conv = &load_conversations(&tool).unwrap()[0];
    let (tok, template) = (tokenizer(), qwen());
    let e = example(tokenize_conversation(&tok, &template, conv, 512, true).unwrap());
    let decoded: Vec<String> = target_runs(&e)
        .iter()
        .map(|r| tok.decode(r).unwrap())
        .collect();
    assert_eq!(decoded, ["checking\n", "Sunny.\n"]);
}

#[test]
fn chat_prompts_load_and_encode_with_the_generation_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let src = file(
        &dir,
        "p.jsonl",
        concat!(
            r#"{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "answer": 4}"#,
            "\n",
            r#"{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]}"#,
            "\n"
        ),
    );
    let prompts = load_chat_prompts(&src).unwrap();
    assert_eq!(prompts.len(), 2);
    assert_eq!(prompts[0].answer.as_deref(), Some("4"));
    assert_eq!((prompts[1].answer.as_deref(), prompts[1].line), (None, 2));
    assert_eq!(prompts[1].messages.len(), 3);
    match load_prompt_records(&src).unwrap() {
        PromptRecords::Chat(c) => assert_eq!(c, prompts),
        other => panic!("{other:?}"),
    }
    let plain = file(&dir, "plain.jsonl", "{\"prompt\": \"q\"}\n");
    assert!(
        matches!(load_prompt_records(&plain).unwrap(), PromptRecords::Plain(p) if p[0].prompt == "q")
    );

    let (tok, template) = (tokenizer(), qwen());
    let messages: Vec<&[Message]> = prompts.iter().map(|p| p.messages.as_slice()).collect();
    let ids = encode_chat_prompts(&tok, &template, &messages).unwrap();
    let text = template.render(&prompts[0].messages, true).unwrap();
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
    assert_eq!(ids[0], tok.encode(&text).unwrap());

    // A prompt that ends with an assistant turn cannot be answered.
    let bad = file(
        &dir,
        "bad.jsonl",
        concat!(
            r#"{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#,
            "\n"
        ),
    );
    let e = load_chat_prompts(&bad).unwrap_err().to_string();
    assert!(
        e.contains("bad.jsonl line 1, field `prompt`")
            && e.contains("ends with a `assistant` message"),
        "{e}"
    );
}

#[test]
fn preferences_explicit_and_implicit_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let src = file(
        &dir,
        "pref.jsonl",
        concat!(
            // Explicit prompt.
            r#"{"prompt": [{"role": "user", "content": "Sky colour?"}], "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "Green."}], "margin": 2}"#,
            "\n",
            // Implicit prompt: full conversations sharing two turns... and the user's next one.
            r#"{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "joke?"}, {"role": "assistant", "content": "Knock knock."}], "#,
            r#""rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "joke?"}, {"role": "assistant", "content": "No."}]}"#,
            "\n"
        ),
    );
    let pairs = load_chat_comparisons(&src).unwrap();
    assert_eq!(pairs.len(), 2);
    assert_eq!(pairs[0].prompt, [Message::user("Sky colour?")]);
    assert_eq!(pairs[0].chosen, [Message::assistant("Blue.")]);
    assert_eq!(
        (pairs[0].margin, pairs[0].tie, pairs[0].line),
        (Some(2.0), false, 1)
    );
    assert_eq!(
        pairs[1].prompt,
        [
            Message::user("hi"),
            Message::assistant("hello"),
            Message::user("joke?")
        ]
    );
    assert_eq!(pairs[1].chosen, [Message::assistant("Knock knock.")]);
    assert_eq!(pairs[1].rejected, [Message::assistant("No.")]);
    assert!(
        matches!(load_preference_records(&src).unwrap(), PreferenceRecords::Chat(c) if c == pairs)
    );
    let plain = file(&dir, "plain.csv", "prompt,chosen,rejected\nq,good,bad\n");
    assert!(
        matches!(load_preference_records(&plain).unwrap(), PreferenceRecords::Plain(p) if p[0].chosen == "good")
    );

    // Token ids as TRL's DPOTrainer makes them; prompt ++ chosen is the whole chosen render.
    let (tok, template) = (tokenizer(), qwen());
    let ids = encode_chat_pair(&tok, &template, &pairs[1]).unwrap();
    let mut whole = pairs[1].prompt.clone();
    whole.extend(pairs[1].chosen.clone());
    let mut joined = ids.prompt.clone();
    joined.extend(&ids.chosen);
    assert_eq!(
        joined,
        tok.encode(&template.render(&whole, false).unwrap())
            .unwrap()
    );
    assert_eq!(ids.chosen, tok.encode("Knock knock.<|im_end|>\n").unwrap());
    assert_eq!(ids.rejected, tok.encode("No.<|im_end|>\n").unwrap());

    // Chosen and rejected that are the same conversation have no prompt to extract.
    let same = file(
        &dir,
        "same.jsonl",
        concat!(
            r#"{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]}"#,
            "\n"
        ),
    );
    let e = load_chat_comparisons(&same).unwrap_err().to_string();
    assert!(
        e.contains("same.jsonl line 1, field `chosen`") && e.contains("extract_prompt"),
        "{e}"
    );
}

#[test]
fn hh_rlhf_transcripts_become_multi_turn_conversations() {
    let Some(path) = shared("preference/hh-rlhf_harmless-base_test.jsonl.gz") else {
        return;
    };
    let flat = read_hh_rlhf(&path).unwrap();
    let chat = read_hh_rlhf_chat(&path).unwrap();
    // The same pairs kept and left out as the flattening reader.
    assert_eq!(chat.mismatched_prompt_lines, flat.mismatched_prompt_lines);
    assert_eq!(chat.comparisons.len(), 2312 - 5);
    let multi_turn = chat
        .comparisons
        .iter()
        .filter(|c| c.prompt.len() >= 3)
        .count();
    assert!(multi_turn > 1000, "{multi_turn} multi-turn prompts");
    // Turns alternate but in four transcripts, which hold two `\n\nAssistant:` turns in a row
    // (kept as two assistant messages; a template that demands alternation refuses them).
    let alternate = |c: &&ChatComparison| {
        c.prompt
            .iter()
            .enumerate()
            .all(|(i, m)| m.role == if i % 2 == 0 { "user" } else { "assistant" })
    };
    let irregular: Vec<usize> = chat
        .comparisons
        .iter()
        .filter(|c| !alternate(c))
        .map(|c| c.line)
        .collect();
    assert_eq!(irregular, [668, 764, 1320, 1850]);
    for (c, f) in chat.comparisons.iter().zip(&flat.comparisons) {
        // User first and last; the replies are the flattened ones.
        assert_eq!(c.prompt[0].role, "user");
        assert_eq!(c.prompt.last().unwrap().role, "user");
        assert_eq!(c.chosen, [Message::assistant(f.chosen.as_str())]);
        assert_eq!(c.rejected, [Message::assistant(f.rejected.as_str())]);
        // Lossless: the turns written back in the HH format give the flattened prompt.
        let mut text = String::new();
        for m in &c.prompt {
            let who = if m.role == "user" {
                "Human"
            } else {
                "Assistant"
            };
            text.push_str(&format!("\n\n{who}: {}", m.content));
        }
        text.push_str("\n\nAssistant:");
        assert_eq!(text, f.prompt, "line {}", c.line);
    }
    // The first pair is the four-turn transcript of the file's first line.
    let first = &chat.comparisons[0];
    assert_eq!(first.line, 1);
    assert_eq!(
        first.prompt[0],
        Message::user("what are some pranks with a pen i can do?")
    );
    assert_eq!(
        first.prompt[1],
        Message::assistant("Are you looking for practical joke ideas?")
    );
    assert_eq!(first.prompt[2], Message::user("yep"));
}

#[test]
fn oasst_trees_become_multi_turn_conversations() {
    let Some(path) = shared("preference/oasst_en_100_tree.jsonl") else {
        return;
    };
    let flat = read_oasst(&path).unwrap();
    let chat = read_oasst_chat(&path).unwrap();
    assert_eq!(chat.groups.len(), 212);
    let pairs: usize = chat.groups.iter().map(|g| g.pairs(false).len()).sum();
    assert_eq!(pairs, 754);
    assert_eq!(chat.conversations.len(), flat.demonstrations.len());
    let deeper = chat.groups.iter().filter(|g| g.prompt.len() >= 3).count();
    assert!(deeper > 0, "no multi-turn prompt");
    for (g, f) in chat.groups.iter().zip(&flat.groups) {
        assert_eq!(
            (&g.prompt_id, &g.responses, &g.ranks),
            (&f.prompt_id, &f.responses, &f.ranks)
        );
        assert!(
            g.prompt
                .iter()
                .enumerate()
                .all(|(i, m)| m.role == if i % 2 == 0 { "user" } else { "assistant" }),
            "{:?}",
            g.prompt
        );
        assert_eq!(g.prompt.last().unwrap().role, "user");
        let p = &g.pairs(false)[0];
        assert_eq!((p.prompt.len(), p.chosen.len()), (g.prompt.len(), 1));
    }
    for (c, d) in chat.conversations.iter().zip(&flat.demonstrations) {
        assert_eq!(c.completion_start, Some(c.messages.len() - 1));
        assert_eq!(c.completion(), [Message::assistant(d.response.as_str())]);
    }
    // They tokenize with a chat template, the reply trained.
    let (tok, template) = (tokenizer(), qwen());
    let conv = chat
        .conversations
        .iter()
        .find(|c| c.messages.len() >= 3)
        .unwrap();
    let e = example(tokenize_conversation(&tok, &template, conv, 1 << 20, false).unwrap());
    let reply = &conv.messages.last().unwrap().content;
    assert_eq!(
        target_runs(&e),
        vec![tok.encode(&format!("{reply}<|im_end|>\n")).unwrap()]
    );
}

/// Loads `text` as conversations from `name` and returns the error's text.
fn conversation_error(name: &str, text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    load_conversations(&file(&dir, name, text))
        .unwrap_err()
        .to_string()
}

#[test]
fn errors_name_file_line_field_and_message() {
    let ok = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;
    let cases = [
        (
            r#"{"messages": [{"role": "user", "content": "hi"}, {"content": "hello"}]}"#,
            "field `messages[1].role`: missing; each message needs a role",
        ),
        (
            r#"{"messages": [{"role": "prompter", "content": "hi"}, {"role": "assistant", "content": "x"}]}"#,
            "field `messages[0].role`: unknown role \"prompter\"; use system, user, assistant or tool",
        ),
        (
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}"#,
            "field `messages[0].content`: expected a string, found [{\"text\":\"hi\",\"type\":\"text\"}]",
        ),
        (
            r#"{"messages": [{"role": "user"}]}"#,
            "field `messages[0].content`: missing",
        ),
        (
            r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}"#,
            "field `messages`: no assistant message",
        ),
        (
            r#"{"messages": []}"#,
            "field `messages`: the list of messages is empty",
        ),
        (
            r#"{"messages": "hi"}"#,
            "field `messages`: expected a list of messages",
        ),
        (
            r#"{"messages": ["hi"]}"#,
            "field `messages[0]`: expected a message",
        ),
        (
            r#"{"messages": [{"role": "assistant", "content": "", "tool_calls": [{}]}]}"#,
            "field `messages[0].tool_calls`: tool calls are not supported",
        ),
        (
            r#"{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]}"#,
            "field `completion`: no assistant message",
        ),
        (r#"{"text": "hi"}"#, "field `messages`: column missing"),
    ];
    for (record, expected) in cases {
        let e = conversation_error("c.jsonl", &format!("{ok}\n\n{record}\n"));
        assert!(
            e.contains(&format!("c.jsonl line 3, {expected}")),
            "{record}: {e}"
        );
    }

    // CSV cannot hold lists.
    let dir = tempfile::tempdir().unwrap();
    let csv = file(
        &dir,
        "c.csv",
        "messages\n\"[{\"\"role\"\": \"\"user\"\", \"\"content\"\": \"\"hi\"\"}]\"\n",
    );
    for e in [
        load_conversations(&csv).unwrap_err().to_string(),
        load_sft_records(&csv).unwrap_err().to_string(),
    ] {
        assert!(
            e.contains("c.csv line 2, field `messages`: a CSV cell cannot hold a list of messages; write the file as JSONL"),
            "{e}"
        );
    }
    let csv = file(&dir, "p.csv", "prompt\nhi\n");
    let e = load_chat_prompts(&csv).unwrap_err().to_string();
    assert!(
        e.contains("p.csv line 2, field `prompt`: a CSV cell cannot hold"),
        "{e}"
    );

    // A mix of plain and conversational records names the line that differs.
    let mixed = file(
        &dir,
        "mixed.jsonl",
        &format!("{ok}\n{{\"prompt\": \"q\", \"response\": \"a\"}}\n"),
    );
    let e = load_sft_records(&mixed).unwrap_err().to_string();
    assert!(
        e.contains("mixed.jsonl line 2, field `prompt`: this record is plain (`prompt`/`response` strings) but the file's first record (line 1) is conversational"),
        "{e}"
    );
    let mixed = file(
        &dir,
        "mixed2.jsonl",
        &format!("{{\"prompt\": \"q\", \"response\": \"a\"}}\n{ok}\n"),
    );
    let e = load_sft_records(&mixed).unwrap_err().to_string();
    assert!(
        e.contains("mixed2.jsonl line 2, field `prompt`: this record is conversational (message lists) but the file's first record (line 1) is plain"),
        "{e}"
    );

    // assistant_only_loss needs a prompt before each assistant turn.
    let conv = Conversation {
        messages: vec![Message::assistant("hi"), Message::user("yo")],
        completion_start: None,
        line: 7,
    };
    let e = tokenize_conversation(&tokenizer(), &qwen(), &conv, 512, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("opens with an assistant message"), "{e}");
}

#[test]
fn non_prefix_preserving_template_is_refused_for_assistant_only_loss() {
    // Mistral v0.3 moves the system message into the last user turn, so the render up to the
    // first assistant turn is not a prefix of the whole.
    let template = ChatTemplate::from_dir(&fixtures().join("mistral_v0_3"))
        .unwrap()
        .unwrap();
    let conv = Conversation {
        messages: multi_turn(),
        completion_start: None,
        line: 1,
    };
    let e = tokenize_conversation(&tokenizer(), &template, &conv, 512, true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not prefix-preserving") && e.contains("assistant_only_loss = false"),
        "{e}"
    );
    // Whole sequences still train.
    let e = example(tokenize_conversation(&tokenizer(), &template, &conv, 512, false).unwrap());
    assert!(e.is_target.iter().all(|&t| t));
}

#[test]
fn parquet_message_lists_load() {
    // A `list<struct<role, content>>` column, as TRL data sets on the Hub store `messages`.
    use polars::prelude::*;
    let messages = |turns: &[(&str, &str)]| {
        let role = Series::new("role".into(), turns.iter().map(|t| t.0).collect::<Vec<_>>());
        let content = Series::new(
            "content".into(),
            turns.iter().map(|t| t.1).collect::<Vec<_>>(),
        );
        StructChunked::from_series("item".into(), turns.len(), [role, content].iter())
            .unwrap()
            .into_series()
    };
    let column = Series::new(
        "messages".into(),
        [
            messages(&[("user", "hi"), ("assistant", "hello")]),
            messages(&[
                ("user", "q"),
                ("assistant", "a"),
                ("user", "q2"),
                ("bot", "a2"),
            ]),
        ],
    );
    let mut df = DataFrame::new(2, vec![column.into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.parquet");
    ParquetWriter::new(std::fs::File::create(&path).unwrap())
        .finish(&mut df)
        .unwrap();
    // Row 2's last role is refused, named by row and message index.
    let e = load_conversations(&Source::new(&path))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("m.parquet line 2, field `messages[3].role`: unknown role \"bot\""),
        "{e}"
    );
    let mut df = df.head(Some(1));
    ParquetWriter::new(std::fs::File::create(&path).unwrap())
        .finish(&mut df)
        .unwrap();
    let convs = load_conversations(&Source::new(&path)).unwrap();
    assert_eq!(
        convs[0].messages,
        [Message::user("hi"), Message::assistant("hello")]
    );
}
