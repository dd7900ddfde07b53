//! Regression test of issue 29 for the `labeling` binary: numeric flags out of range, negative
//! numbers included, are range errors that name the flag, the value and the allowed range.

use std::process::Command;

/// `base` followed by `extra`.
fn with(base: &[&str], extra: [&str; 2]) -> Vec<String> {
    base.iter().chain(&extra).map(|s| s.to_string()).collect()
}

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_labeling"))
        .args(args)
        .output()
        .expect("running labeling");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Regression (issue 29): negative values were clap's "unexpected argument" and `--top-p 1.5`
/// was accepted; each is now a range error, before any file is read or written.
#[test]
fn numeric_flags_out_of_range_are_range_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    let sheet = [
        "export-sheet",
        "--policy",
        "p",
        "--prompts",
        "q.jsonl",
        "--out",
        o,
    ];
    let simulate = ["simulate", "--out", o];
    let labelers = [
        "simulate-labelers",
        "--sheet",
        "s.csv",
        "--gold",
        "final_answer",
        "--out",
        o,
    ];
    // Integers, as they are parsed: clap's usage error (exit 2) with the range.
    let parsed = [
        (with(&sheet, ["--k", "1"]), "--k", "1", "an integer ≥ 2"),
        (
            with(&sheet, ["--max-new-tokens", "-4"]),
            "--max-new-tokens",
            "-4",
            "an integer ≥ 0",
        ),
        (
            with(&sheet, ["--seed", "-1"]),
            "--seed",
            "-1",
            "an integer ≥ 0",
        ),
        (
            with(&simulate, ["--k", "-2"]),
            "--k",
            "-2",
            "an integer ≥ 2",
        ),
        (
            with(&simulate, ["--demonstrations", "-5"]),
            "--demonstrations",
            "-5",
            "an integer ≥ 1",
        ),
        (
            with(&simulate, ["--heldout-candidates", "-1"]),
            "--heldout-candidates",
            "-1",
            "an integer ≥ 0",
        ),
        (
            with(&simulate, ["--seed", "-1"]),
            "--seed",
            "-1",
            "an integer ≥ 0",
        ),
        (
            with(&labelers, ["--labelers", "0"]),
            "--labelers",
            "0",
            "an integer ≥ 1",
        ),
    ];
    for (args, flag, value, range) in parsed {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, err) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&format!("invalid value '{value}' for '{flag}"))
                && err.contains(&format!("out of range; it must be {range}")),
            "{args:?}: {err}"
        );
        assert!(stdout.is_empty() && !out.exists(), "{args:?}");
    }
    // Numbers (negative ones parsed as values), checked before anything is read: exit 1.
    let checked = [
        (
            with(&sheet, ["--top-p", "1.5"]),
            "--top-p 1.5: must be in (0, 1] (1 disables)",
        ),
        (
            with(&sheet, ["--temperature", "-1"]),
            "--temperature -1: must be ≥ 0 (0 is greedy)",
        ),
        (
            with(&simulate, ["--noise", "-0.1"]),
            "--noise -0.1: a probability in [0, 1]",
        ),
        (
            with(&simulate, ["--sloppy", "2"]),
            "--sloppy 2: a share in [0, 1]",
        ),
        (
            with(&labelers, ["--noise", "1.5"]),
            "--noise 1.5: a probability in [0, 1]",
        ),
    ];
    for (args, want) in checked {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, err) = run(&args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(stdout.is_empty() && !out.exists(), "{args:?}");
    }
}
