//! The gold scorer: answer extraction, normalisation, rules, and GSM8K's reference solutions from
//! ../shared/data (skipped, with a message, where it is absent).

use datasets::gold::{
    Rule, extract_answer, extract_final_answer, gold_answer, normalize, parse_rule,
};
use std::path::Path;

fn exact(response: &str, answer: &str) -> f32 {
    Rule::ExactAnswer.score(response, Some(answer)).unwrap()
}

#[test]
fn gold_answers_take_what_follows_the_last_hashes() {
    assert_eq!(
        gold_answer("She has 1,000 + 234 apples.\n#### 1,234"),
        "1,234"
    );
    assert_eq!(gold_answer("a #### 1\nb #### 2 "), "2");
    assert_eq!(gold_answer("  8 \n"), "8");
    assert_eq!(gold_answer("c-a-t"), "c-a-t");
}

#[test]
fn answers_are_extracted_after_markers_or_as_the_last_number() {
    assert_eq!(extract_answer("#### 1,234").as_deref(), Some("1,234"));
    assert_eq!(extract_answer("The answer is 8.").as_deref(), Some("8"));
    assert_eq!(
        extract_answer("THE ANSWER IS 3.5. Hope that helps!").as_deref(),
        Some("3.5")
    );
    assert_eq!(
        extract_answer("I think the answer is: 2, 5, 9. Maybe.").as_deref(),
        Some("2, 5, 9")
    );
    assert_eq!(
        extract_answer("First the answer is 4. No, the answer is 5!").as_deref(),
        Some("5")
    );
    assert_eq!(
        extract_answer(" 7加5等于12。答案是12。").as_deref(),
        Some("12")
    );
    assert_eq!(extract_answer("答案：c-a-t。").as_deref(), Some("c-a-t"));
    assert_eq!(
        extract_answer("so the total is 1,234 dollars").as_deref(),
        Some("1234")
    );
    assert_eq!(
        extract_answer("it went from 3 to -7").as_deref(),
        Some("-7")
    );
    assert_eq!(extract_answer("12-5").as_deref(), Some("5"));
    assert_eq!(extract_answer("roughly 2.50 each").as_deref(), Some("2.50"));
    // A marker with nothing after it falls back to the last number.
    assert_eq!(
        extract_answer("5 apples, so the answer is").as_deref(),
        Some("5")
    );
    assert_eq!(extract_answer("no idea, sorry"), None);
    assert_eq!(extract_answer(""), None);
}

#[test]
fn normalisation_compares_numbers_numerically() {
    assert_eq!(normalize(" 8.0 "), "8");
    assert_eq!(normalize("8"), normalize("8.00"));
    assert_eq!(normalize("1,234"), "1234");
    assert_eq!(normalize("1,234,567.5"), "1234567.5");
    assert_eq!(normalize("$18"), "18");
    assert_eq!(normalize("+3"), "3");
    assert_eq!(normalize("-0"), "0");
    assert_eq!(normalize("Hello   World!"), "hello world");
    assert_eq!(normalize("答案。"), "答案");
    // List commas are not thousands separators.
    assert_eq!(normalize("3, 9, 14."), "3, 9, 14");
    assert_eq!(normalize("3,9,14"), "3,9,14");
    assert_ne!(normalize("8.5"), normalize("8"));
}

#[test]
fn exact_answer_matches_gsm8k_english_and_chinese_answers() {
    assert_eq!(
        exact("so the total is 1234.", "Adding up.\n#### 1,234"),
        1.0
    );
    assert_eq!(exact("#### 1234", "1,234"), 1.0);
    assert_eq!(exact("The answer is 8.", "8"), 1.0);
    assert_eq!(exact(" 3 plus 5 is 8. The answer is 8.0", "#### 8"), 1.0);
    assert_eq!(exact("答案是8。", "8"), 1.0);
    assert_eq!(exact("答案：8", "8"), 1.0);
    // Last-number fallback.
    assert_eq!(exact("We get 3 and then 5, so 8", "8"), 1.0);
    assert_eq!(exact(" The answer is c-a-t.", "c-a-t"), 1.0);
    assert_eq!(exact(" The answer is 3, 9, 14.", "3, 9, 14"), 1.0);
}

#[test]
fn exact_answer_rejects_wrong_or_missing_answers() {
    assert_eq!(exact("The answer is 9.", "8"), 0.0);
    // The stated answer wins over a correct number elsewhere.
    assert_eq!(exact("8 is close, but the answer is 9.", "8"), 0.0);
    assert_eq!(exact("The answer is 8 apples.", "9"), 0.0);
    assert_eq!(exact("答案是7。", "8"), 0.0);
    assert_eq!(exact("We get 8, then 9", "8"), 0.0);
    assert_eq!(exact("no number here", "8"), 0.0);
    assert_eq!(exact("", "8"), 0.0);
    assert_eq!(exact(" The answer is 9, 3, 14.", "3, 9, 14"), 0.0);
}

#[test]
fn final_answer_needs_the_stated_form_and_exact_answer_does_not() {
    let fin = |r: &str, a: &str| Rule::FinalAnswer.score(r, Some(a)).unwrap();
    for (response, answer) in [
        (" 3 plus 9 is 12. The answer is 12.", "12"),
        (" 答案是49, 2。", "49, 2"),
        ("so #### 1,234", "1234"),
        (" The answer is s-e-e-d.", "s-e-e-d"),
    ] {
        assert_eq!(fin(response, answer), 1.0, "{response}");
        assert_eq!(exact(response, answer), 1.0, "{response}");
    }
    // The right number without the form: exact_answer falls back to it, final_answer does not.
    for response in [" well, 12 i guess", " 12", " hmm let me see... 12?"] {
        assert_eq!(exact(response, "12"), 1.0, "{response}");
        assert_eq!(fin(response, "12"), 0.0, "{response}");
        assert_eq!(extract_final_answer(response), None);
    }
    assert_eq!(fin(" The answer is 13.", "12"), 0.0);
    assert_eq!(parse_rule("final_answer"), Ok(Rule::FinalAnswer));
    assert_eq!(Rule::FinalAnswer.to_string(), "final_answer");
    assert!(Rule::FinalAnswer.needs_answer());
    let e = Rule::FinalAnswer
        .score("The answer is 8.", None)
        .unwrap_err();
    assert!(e.contains("final_answer"), "{e}");
}

#[test]
fn a_missing_answer_is_an_error_naming_it() {
    let e = Rule::ExactAnswer
        .score("The answer is 8.", None)
        .unwrap_err();
    assert!(e.contains("exact_answer") && e.contains("answer"), "{e}");
    assert!(Rule::ExactAnswer.needs_answer());
}

#[test]
fn regex_rules_match_anywhere_and_need_no_answer() {
    let r = parse_rule("regex:The answer is \\d+\\.$").unwrap();
    assert_eq!(
        r,
        Rule::Regex {
            pattern: "The answer is \\d+\\.$".into()
        }
    );
    assert!(!r.needs_answer());
    let c = r.compile().unwrap();
    assert_eq!(c.score(" 7 plus 5 is 12. The answer is 12.", None), Ok(1.0));
    assert_eq!(c.score("12", Some("12")), Ok(0.0));
    assert_eq!(r.score("The answer is 3.", None), Ok(1.0));
}

#[test]
fn bad_patterns_and_unknown_rules_are_errors_at_load() {
    let e = parse_rule("regex:(unclosed").unwrap_err();
    assert!(e.contains("(unclosed"), "{e}");
    let e = Rule::Regex {
        pattern: "[a-".into(),
    }
    .compile()
    .unwrap_err();
    assert!(e.contains("[a-"), "{e}");
    assert!(parse_rule("regex:").is_err());
    let e = parse_rule("exact").unwrap_err();
    assert!(e.contains("exact_answer") && e.contains("regex:"), "{e}");
    assert_eq!(parse_rule(" exact_answer "), Ok(Rule::ExactAnswer));
}

#[test]
fn rules_round_trip_through_strings_and_serde() {
    for r in [
        Rule::ExactAnswer,
        Rule::Regex {
            pattern: "^ The answer is".into(),
        },
    ] {
        assert_eq!(parse_rule(&r.to_string()).unwrap(), r);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Rule>(&json).unwrap(), r);
    }
    assert_eq!(
        serde_json::to_string(&Rule::ExactAnswer).unwrap(),
        r#"{"kind":"exact_answer"}"#
    );
    let r: Rule = serde_json::from_str(r#"{"kind":"regex","pattern":"a+"}"#).unwrap();
    assert_eq!(
        r,
        Rule::Regex {
            pattern: "a+".into()
        }
    );
}

#[test]
fn every_gsm8k_reference_solution_scores_one_against_its_own_answer() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/demonstrations/gsm8k_test.jsonl");
    if !path.exists() {
        eprintln!(
            "skipped: {} not found (../shared/data is absent)",
            path.display()
        );
        return;
    }
    let rule = Rule::ExactAnswer.compile().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let answer = v["answer"].as_str().unwrap();
        assert!(answer.contains("####"), "line {}: no ####", i + 1);
        assert_eq!(
            rule.score(answer, Some(answer)),
            Ok(1.0),
            "line {}: {answer:?}",
            i + 1
        );
        // And a different final answer does not.
        let wrong = format!("{}\n#### 0.5", answer);
        assert_eq!(rule.score(&wrong, Some(answer)), Ok(0.0), "line {}", i + 1);
        n += 1;
    }
    assert!(n > 1000, "only {n} GSM8K lines");
}
