//! The gold scorer: answer extraction, normalisation, rules, and GSM8K's reference solutions from
//! ../shared/data (skipped, with a message, where it is absent).

use datasets::gold::{
    Rule, contains_on_boundaries, extract_answer, extract_choice, extract_final_answer,
    gold_answer, normalize, normalize_text, parse_rule,
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

fn score(rule: &str, response: &str, answer: &str) -> f32 {
    parse_rule(rule)
        .unwrap()
        .score(response, Some(answer))
        .unwrap()
}

#[test]
fn normalized_match_compares_the_whole_response() {
    let m = |r: &str, a: &str| score("normalized_match", r, a);
    // A string answer with no number: both see it (exact_answer by its whole-response match).
    assert_eq!(m(" stone stone stone", "stone stone stone"), 1.0);
    assert_eq!(exact(" stone stone stone", "stone stone stone"), 1.0);
    assert_eq!(exact(" Stone stone stone.", "stone stone stone"), 1.0);
    assert_eq!(exact(" 石头。", "石头"), 1.0);
    // ... but final_answer needs a marker, and chatter defeats the whole-response match.
    assert_eq!(
        score("final_answer", " stone stone stone", "stone stone stone"),
        0.0
    );
    assert_eq!(exact(" Sure: stone stone stone", "stone stone stone"), 0.0);
    assert_eq!(m("  Stone   STONE stone. ", "stone stone stone"), 1.0);
    assert_eq!(m(" ENOTS!", "enots"), 1.0);
    assert_eq!(m(" c-a-t", "c-a-t"), 1.0);
    // Chatter around the right answer, or a different answer, scores 0.
    assert_eq!(
        m(" Sure! Here it is: stone stone stone", "stone stone stone"),
        0.0
    );
    assert_eq!(m(" stone stone", "stone stone stone"), 0.0);
    assert_eq!(m("", "stone"), 0.0);
    // Numbers are text here: "8.0" is not "8" (numeric: is for that).
    assert_eq!(m(" 8.0", "8"), 0.0);
    // Chinese.
    assert_eq!(m(" 石头石头石头。", "石头石头石头"), 1.0);
    assert_eq!(m("北京！", "北京"), 1.0);
    assert_eq!(m(" 好的：石头石头石头", "石头石头石头"), 0.0);
    assert_eq!(m("南京", "北京"), 0.0);
    assert_eq!(normalize_text("  Hello   World!. "), "hello world");
    assert_eq!(normalize_text("ÉCOLE"), "école");
}

#[test]
fn contains_answer_finds_the_answer_on_word_boundaries() {
    let c = |r: &str, a: &str| score("contains_answer", r, a);
    assert_eq!(c(" I think it is Paris, really.", "paris"), 1.0);
    assert_eq!(c(" the cat.", "cat"), 1.0);
    assert_eq!(c(" so it is 12.", "12"), 1.0);
    assert_eq!(c(" stone stone stone, there", "stone stone stone"), 1.0);
    // Inside a longer word or number it does not count.
    assert_eq!(c(" concatenate", "cat"), 0.0);
    assert_eq!(c(" 112 apples", "12"), 0.0);
    assert_eq!(c(" about 12.5", "12"), 0.0);
    assert_eq!(c(" about 3.5", "5"), 0.0);
    assert_eq!(c(" London", "paris"), 0.0);
    assert_eq!(c(" anything", ""), 0.0);
    // Chinese: a plain substring.
    assert_eq!(c("我觉得是北京吧。", "北京"), 1.0);
    assert_eq!(c(" 答案是12。", "12"), 1.0);
    assert_eq!(c("我觉得是南京。", "北京"), 0.0);
    assert_eq!(c(" 答案是112。", "12"), 0.0);
    assert!(contains_on_boundaries("a-b-c", "b"));
    assert!(!contains_on_boundaries("abc", "b"));
}

#[test]
fn numeric_compares_within_the_tolerance() {
    let n = |r: &str, a: &str| score("numeric:0.01", r, a);
    assert_eq!(n("The answer is 3.141.", "3.14"), 1.0);
    assert_eq!(n(" so 1,234", "1234"), 1.0);
    assert_eq!(n(" The answer is $12.", "#### 12"), 1.0);
    assert_eq!(n(" The answer is -0.5.", "-0.504"), 1.0);
    assert_eq!(n("The answer is 3.2.", "3.14"), 0.0);
    assert_eq!(n("The answer is 3.14 metres.", "3.14"), 0.0);
    assert_eq!(n("no number", "3.14"), 0.0);
    assert_eq!(n("", "3.14"), 0.0);
    // Chinese.
    assert_eq!(n(" 7加5等于12。答案是12。", "12"), 1.0);
    assert_eq!(n(" 答案是12.004。", "12"), 1.0);
    assert_eq!(n("答案是3.2。", "3.14"), 0.0);
    assert_eq!(n("答案是十二。", "12"), 0.0);
    // Tolerance 0 is exact.
    assert_eq!(score("numeric:0", "The answer is 8.0.", "8"), 1.0);
    assert_eq!(score("numeric:0", "The answer is 8.01.", "8"), 0.0);
    // A reference that is no number is the user's mistake, and says so.
    let e = parse_rule("numeric:0.5")
        .unwrap()
        .score("The answer is 3.", Some("cat"))
        .unwrap_err();
    assert!(e.contains("numeric:0.5") && e.contains("cat"), "{e}");
}

#[test]
fn choice_reads_the_chosen_letter() {
    let c = |r: &str, a: &str| score("choice", r, a);
    assert_eq!(c(" The answer is (B).", "B"), 1.0);
    assert_eq!(c(" B) 47", "B"), 1.0);
    assert_eq!(c(" I pick C.", "(C)"), 1.0);
    assert_eq!(c(" D: 5", "d"), 1.0);
    // The letter after "answer is" wins over letters restated before it.
    assert_eq!(c(" A) 12 is small; the answer is B.", "B"), 1.0);
    assert_eq!(c(" The answer is (A).", "B"), 0.0);
    // A value instead of a letter, or no letter, scores 0; capitals inside words are not letters.
    assert_eq!(c(" 47", "B"), 0.0);
    assert_eq!(c(" Because 47 is largest", "B"), 0.0);
    assert_eq!(c("", "B"), 0.0);
    assert_eq!(c(" F) none", "B"), 0.0);
    // Chinese.
    assert_eq!(c(" 答案是B。", "B"), 1.0);
    assert_eq!(c(" 我选(C)。", "C"), 1.0);
    assert_eq!(c(" 答案是A。", "B"), 0.0);
    assert_eq!(c(" 答案是47。", "B"), 0.0);
    assert_eq!(extract_choice(" The answer is (E)."), Some('E'));
    assert_eq!(extract_choice(" ABC"), None);
    let e = parse_rule("choice")
        .unwrap()
        .score(" B", Some("47"))
        .unwrap_err();
    assert!(e.contains("A–E") && e.contains("47"), "{e}");
}

#[test]
fn json_answer_needs_a_json_object_with_the_answer() {
    let j = |r: &str, a: &str| score("json_answer", r, a);
    assert_eq!(j(r#" {"answer": 12}"#, "12"), 1.0);
    assert_eq!(j(r#"{"answer": 12.0, "why": "7 + 5"}"#, "12"), 1.0);
    assert_eq!(j(r#" {"answer": "12"} "#, "12"), 1.0);
    assert_eq!(j(r#" {"answer": "Stone Stone"}"#, "stone stone"), 1.0);
    assert_eq!(j(r#" {"answer": 13}"#, "12"), 0.0);
    // Without JSON, with another field, with text around it, or not an object: 0.
    assert_eq!(j(" the answer is 12", "12"), 0.0);
    assert_eq!(j(r#" {"result": 12}"#, "12"), 0.0);
    assert_eq!(j(r#" Here: {"answer": 12}"#, "12"), 0.0);
    assert_eq!(j(" [12]", "12"), 0.0);
    assert_eq!(j(r#" {"answer": 12"#, "12"), 0.0);
    assert_eq!(j("", "12"), 0.0);
    // Chinese.
    assert_eq!(j(r#" {"answer": "北京"}"#, "北京"), 1.0);
    assert_eq!(j(r#"{"answer": "北京。"}"#, "北京"), 1.0);
    assert_eq!(j(r#" {"answer": "南京"}"#, "北京"), 0.0);
    assert_eq!(j(" 答案是北京。", "北京"), 0.0);
}

#[test]
fn the_new_rules_parse_print_round_trip_and_need_an_answer() {
    let rules = [
        ("normalized_match", Rule::NormalizedMatch),
        ("contains_answer", Rule::ContainsAnswer),
        ("numeric:0.01", Rule::Numeric { tolerance: 0.01 }),
        ("choice", Rule::Choice),
        ("json_answer", Rule::JsonAnswer),
    ];
    for (text, rule) in rules {
        assert_eq!(parse_rule(text), Ok(rule.clone()), "{text}");
        assert_eq!(rule.to_string(), text);
        assert!(rule.needs_answer(), "{text}");
        let json = serde_json::to_string(&rule).unwrap();
        assert_eq!(serde_json::from_str::<Rule>(&json).unwrap(), rule);
        let e = rule.score(" 12", None).unwrap_err();
        assert!(e.contains(text) && e.contains("answer"), "{e}");
    }
    assert_eq!(parse_rule("normalized-match"), Ok(Rule::NormalizedMatch));
    assert_eq!(
        serde_json::to_string(&Rule::Numeric { tolerance: 0.5 }).unwrap(),
        r#"{"kind":"numeric","tolerance":0.5}"#
    );
    assert_eq!(
        serde_json::from_str::<Rule>(r#"{"kind":"json_answer"}"#).unwrap(),
        Rule::JsonAnswer
    );
    for bad in [
        "numeric",
        "numeric:",
        "numeric:abc",
        "numeric:-1",
        "numeric:inf",
    ] {
        let e = parse_rule(bad).unwrap_err();
        assert!(e.contains("numeric:0.01"), "{bad}: {e}");
    }
    let e = Rule::Numeric {
        tolerance: f64::NAN,
    }
    .compile()
    .unwrap_err();
    assert!(e.contains("tolerance"), "{e}");
    let e = parse_rule("json").unwrap_err();
    assert!(
        e.contains("json_answer") && e.contains("numeric:<tolerance>"),
        "{e}"
    );
}
