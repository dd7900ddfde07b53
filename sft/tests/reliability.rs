//! Regression tests of issue 29 for `sft`: hostile input costs bounded time and is counted, an
//! empty training set says why, `--resume` of a folder that is not one of this stage's
//! checkpoints says so, and a negative `--seed` is a range error.

mod common;

use common::{root, sft};

/// The first `n` lines of the demo task's demonstrations.
fn demo_lines(n: usize) -> Vec<String> {
    std::fs::read_to_string(root().join("datasets/demo/task/demonstrations.jsonl"))
        .unwrap()
        .lines()
        .take(n)
        .map(str::to_string)
        .collect()
}

/// Regression (issue 29): one 10 MB record (a pasted document: 10 MB of letters, one "word" to
/// the BPE) made `sft` on a preset model train its BPE for over ten minutes without a word. The
/// record is now counted as too long without being tokenized, and the BPE sees at most its first
/// 16 KiB, in runs of at most 128 letters. (No timing assertion: the test runner's timeout is the
/// guard.)
#[test]
fn a_ten_megabyte_record_is_dropped_before_tokenizing_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("demos.jsonl");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let document: String = (0..10_000_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (b'a' + (state % 26) as u8) as char
        })
        .collect();
    let mut text = demo_lines(200).join("\n");
    text.push('\n');
    text.push_str(
        &serde_json::json!({"prompt": "Summarise this document.", "response": document})
            .to_string(),
    );
    text.push('\n');
    std::fs::write(&data, text).unwrap();
    let out = tmp.path().join("run");
    let (ok, stdout, err) = sft(
        &[
            &format!("data.path={}", data.display()),
            "train.max_steps=2",
            "train.eval_every=0",
            "train.save_every=0",
        ],
        &["--out", out.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    // 128 tokens of a BPE whose longest entry is a few bytes long (13 for `<|endoftext|>`) cover
    // a few kilobytes of text at most; the record has over 10 MB.
    assert!(
        stdout.contains("data: 201 demonstrations, 0 duplicates removed, 1 longer than 128 tokens dropped (1 of them over")
            && stdout.contains("bytes, not tokenized); 185 train, 15 validation"),
        "{stdout}"
    );
    assert!(
        stdout.contains("tokenizer: a BPE of")
            && stdout.contains(
                "(1 text cut to its first 16384 bytes, 1 text split inside runs of over 128 characters)"
            ),
        "{stdout}"
    );
    assert!(stdout.contains("done: 2 steps"), "{stdout}");
}

/// Regression (issue 29): "no training examples left" did not say why (all 3,000 were longer
/// than data.max_length = 4). It now counts each reason and says what to change; nothing is
/// written.
#[test]
fn no_training_examples_left_says_how_many_were_dropped_and_why() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (ok, _, err) = sft(&["data.max_length=4"], &["--out", out.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("datasets/demo/task/demonstrations.jsonl: no training examples left")
            && err.contains("all 3000 demonstrations were dropped: ")
            && err.contains("3000 longer than data.max_length = 4 tokens"),
        "{err}"
    );
    // The message names a max_length that keeps at least one demonstration (the demo task's
    // shortest with its template is more than 4 tokens).
    let shortest: usize = err
        .split("raise data.max_length (data.max_length = ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no suggested max_length in: {err}"));
    assert!(
        shortest > 4 && err.contains(&format!("= {shortest} keeps at least one)")),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written for bad input");
    // With that max_length, the shortest demonstration (at least) is kept.
    let (ok, stdout, err) = sft(
        &[
            &format!("data.max_length={shortest}"),
            "data.validation_fraction=0",
            "train.max_steps=1",
            "train.save_every=0",
        ],
        &["--out", out.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert!(!stdout.contains("; 0 train"), "{stdout}");
}

/// Regression (issue 29): `--resume` of a folder that is not a checkpoint of this stage (a
/// `final/` folder; another stage's checkpoint) names the folder, why, and what to resume from.
#[test]
fn resume_from_a_folder_that_is_not_an_sft_checkpoint_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (ok, _, err) = sft(
        &["train.max_steps=2", "train.eval_every=0"],
        &["--out", out.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    let final_dir = out.join("final");
    let (ok, _, err) = sft(
        &["train.max_steps=4"],
        &[
            "--out",
            tmp.path().join("again").to_str().unwrap(),
            "--resume",
            final_dir.to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{} is not a checkpoint of an sft run: it has no trainer_state/",
            final_dir.display()
        )) && err.contains("resume from one of its checkpoint-NNNNNN folders")
            && err.contains(&format!("{}", out.join("checkpoint-000002").display())),
        "{err}"
    );
    assert!(!tmp.path().join("again").exists());

    // A checkpoint another stage wrote (its rlhf.json names the stage).
    let other = tmp.path().join("checkpoint-000002");
    std::fs::create_dir_all(other.join("trainer_state")).unwrap();
    for e in std::fs::read_dir(out.join("checkpoint-000002")).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), other.join(e.file_name())).unwrap();
        }
    }
    std::fs::copy(
        out.join("checkpoint-000002/trainer_state/state.json"),
        other.join("trainer_state/state.json"),
    )
    .unwrap();
    std::fs::write(
        other.join("rlhf.json"),
        r#"{"stage": "dpo", "prompt_template": "Human: {prompt}\n\nAssistant:"}"#,
    )
    .unwrap();
    let (ok, _, err) = sft(
        &["train.max_steps=4"],
        &[
            "--out",
            tmp.path().join("again").to_str().unwrap(),
            "--resume",
            other.to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{} is not a checkpoint of an sft run: it is a checkpoint of a dpo run (rlhf.json",
            other.display()
        )),
        "{err}"
    );
}

/// Regression (issue 29): `--seed -1` was clap's "unexpected argument"; it is a range error.
#[test]
fn a_negative_seed_is_a_range_error() {
    let (ok, _, err) = sft(&[], &["--seed", "-1"]);
    assert!(!ok);
    assert!(
        err.contains("'-1'") && err.contains("--seed") && err.contains("it must be an integer ≥ 0"),
        "{err}"
    );
    assert!(!err.contains("unexpected argument"), "{err}");
}
