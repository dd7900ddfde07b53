//! `labeling simulate --family`: every suite family writes its files with the counts asked for,
//! its gold rule agrees with its demonstrations and candidates, K and the Chinese share are as
//! configured, degenerate candidates are offered in a minority of comparisons, the held-out
//! candidates carry the gold rule's own scores, and the same seed gives the same bytes.

use datasets::gold::parse_rule;
use labeling::simulate::{CandidateKind, ProblemKind, SimulateParams, Simulated};
use labeling::suite::{Family, FamilyArgs, SuiteKind, generate, simulate_family_to_dir};
use labeling::{Aggregate, ImportOptions, import};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::Command;

mod common;
use common::{field, jsonl};

const FILES: [&str; 6] = [
    "demonstrations.jsonl",
    "prompts.jsonl",
    "eval_prompts.jsonl",
    "rankings.csv",
    "task.json",
    "heldout_candidates.jsonl",
];

/// Small sizes with the family's own K, noise, sloppy share and held-out count.
fn small(family: Family) -> SimulateParams {
    let args = FamilyArgs {
        family,
        k: None,
        noise: None,
        sloppy: None,
        heldout_candidates: Some(40),
    };
    args.resolve(SimulateParams {
        train_prompts: 60,
        eval_prompts: 50,
        demonstrations: 400,
        comparison_prompts: 120,
        ..SimulateParams::default()
    })
}

/// Every prompt of every file, in the generator's records.
fn all_prompts(sim: &Simulated<SuiteKind>) -> Vec<&str> {
    sim.demonstrations
        .iter()
        .chain(&sim.prompts)
        .chain(&sim.eval_prompts)
        .chain(sim.comparisons.iter().map(|c| &c.task))
        .chain(sim.heldout.iter().map(|h| &h.task))
        .map(|t| t.prompt.as_str())
        .collect()
}

#[test]
fn every_family_writes_its_files_and_its_gold_rule_agrees_with_them() {
    for family in Family::SUITE {
        let params = small(family);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("task");
        let info = simulate_family_to_dir(family, &params, &out).unwrap();
        let sim = generate(family, &params).unwrap();
        let rule = parse_rule(family.gold_rule()).unwrap().compile().unwrap();
        let name = family.name();

        // Files and counts; nothing else in the folder, no temporary folder left.
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), FILES.len());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let demos = jsonl(&out.join("demonstrations.jsonl"));
        assert_eq!(demos.len(), params.demonstrations, "{name}");
        assert_eq!(
            jsonl(&out.join("prompts.jsonl")).len(),
            params.train_prompts
        );
        assert_eq!(
            jsonl(&out.join("eval_prompts.jsonl")).len(),
            params.eval_prompts
        );
        let task: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("task.json")).unwrap()).unwrap();
        assert_eq!(task["family"], name);
        assert_eq!(task["gold_rule"], family.gold_rule());
        assert_eq!(task["params"]["k"], params.k);
        assert_eq!(
            task["files"]["rankings.csv"],
            params.comparison_prompts * params.k * params.labelers
        );
        assert_eq!(info.gold_rule, family.gold_rule());
        // The gold rule string is one `evaluate --gold` and ppo's reward.rule take back.
        assert_eq!(
            parse_rule(family.gold_rule()).unwrap().to_string(),
            family.gold_rule()
        );

        // Careful demonstrations score 1 against their prompt's answer, sloppy ones 0 while
        // still stating the right answer (or, for `choice`, the right option's value).
        let mut sloppy = 0;
        for (d, t) in demos.iter().zip(&sim.demonstrations) {
            assert_eq!(field(d, "prompt"), t.prompt);
            assert_eq!(field(d, "response"), t.response);
            let want = if t.sloppy { 0.0 } else { 1.0 };
            assert_eq!(
                rule.score(&t.response, Some(&t.answer)),
                Ok(want),
                "{name}: {t:?}"
            );
            assert!(t.response.starts_with(' '), "{t:?}");
            if t.sloppy {
                sloppy += 1;
                if family != Family::Choice {
                    assert!(t.response.contains(&t.answer), "{t:?}");
                }
            }
        }
        let share = sloppy as f64 / demos.len() as f64;
        assert!(
            (share - params.sloppy).abs() < 0.07,
            "{name}: sloppy share {share}, asked {}",
            params.sloppy
        );
        assert_eq!(info.sloppy_demonstrations, sloppy);
        // Prompts files: the answer the gold rule checks the correct response against.
        for t in sim.prompts.iter().chain(&sim.eval_prompts) {
            assert_eq!(rule.score(&t.response, Some(&t.answer)), Ok(1.0), "{t:?}");
        }

        // Candidates: K each, distinct; correct and verbose score 1, all the others 0.
        let mut offered = BTreeMap::<CandidateKind, usize>::new();
        for c in &sim.comparisons {
            assert_eq!(c.candidates.len(), params.k, "{name}");
            let texts: HashSet<&str> = c.candidates.iter().map(|x| x.response.as_str()).collect();
            assert_eq!(texts.len(), params.k, "{name}: {c:?}");
            assert_eq!(
                c.candidates
                    .iter()
                    .filter(|x| x.kind == CandidateKind::Correct)
                    .count(),
                1
            );
            for x in &c.candidates {
                *offered.entry(x.kind).or_default() += 1;
                let s = rule.score(&x.response, Some(&c.task.answer)).unwrap();
                let want = match x.kind {
                    CandidateKind::Correct | CandidateKind::Verbose => 1.0,
                    _ => 0.0,
                };
                assert_eq!(s, want, "{name}: {x:?} for {:?}", c.task);
                match x.kind {
                    CandidateKind::Empty => assert_eq!(x.response, ""),
                    CandidateKind::Refusal => assert!(
                        x.response.contains("sorry")
                            || x.response.contains("Sorry")
                            || x.response.contains("not able")
                            || x.response.contains("抱歉")
                            || x.response.contains("对不起"),
                        "{x:?}"
                    ),
                    CandidateKind::Repeated => assert!(x.response.len() > 30, "{x:?}"),
                    _ => {}
                }
            }
        }
        // Each degenerate kind is offered, in a minority of the comparisons (about 15%).
        for kind in CandidateKind::DEGENERATE {
            let share =
                offered.get(&kind).copied().unwrap_or(0) as f64 / sim.comparisons.len() as f64;
            assert!(
                (0.04..0.3).contains(&share),
                "{name}: {kind:?} in {share} of comparisons"
            );
        }
        assert_eq!(
            offered.contains_key(&CandidateKind::Verbose),
            family != Family::Words
        );

        // The rankings import with K per group as configured, and labelers who mostly rank the
        // correct candidate first but do not always agree.
        let imported = import(&ImportOptions {
            inputs: vec![out.join("rankings.csv")],
            out: dir.path().join("labels"),
            format: None,
            aggregate: Aggregate::None,
            keep_ties: false,
            renames: HashMap::new(),
        })
        .unwrap();
        let s = &imported.stats;
        assert_eq!(s.prompts, params.comparison_prompts);
        assert_eq!(
            s.groups_by_k,
            BTreeMap::from([(
                params.k.to_string(),
                params.comparison_prompts * params.labelers
            )])
        );
        assert!(s.empty_responses > 0, "{name}: {s:?}");
        assert_eq!(imported.groups, sim.ranked_groups());
        let first = info.labels.correct_ranked_first;
        assert!(
            first > 0.6 && first < 1.0,
            "{name}: correct ranked first {first}"
        );
        let pa = s.pairwise_agreement.unwrap();
        assert!(pa > 0.5 && pa < 1.0, "{name}: agreement {pa}");

        // No prompt twice, within or across files (held-out candidates included).
        let prompts = all_prompts(&sim);
        let distinct: HashSet<&str> = prompts.iter().copied().collect();
        assert_eq!(distinct.len(), prompts.len(), "{name}");
        // Every kind of problem of the family appears in the evaluation prompts.
        let kinds: HashSet<&str> = sim.eval_prompts.iter().map(|t| t.kind.name()).collect();
        let want = match family {
            Family::Words => 5,
            Family::Choice => 3,
            Family::Zh => 5,
            Family::Json | Family::Demo => 4,
        };
        assert_eq!(kinds.len(), want, "{name}: {kinds:?}");
    }
}

#[test]
fn the_families_have_their_own_forms_and_chinese_shares() {
    for family in Family::SUITE {
        let sim = generate(family, &small(family)).unwrap();
        let tasks: Vec<_> = sim
            .demonstrations
            .iter()
            .chain(&sim.prompts)
            .chain(&sim.eval_prompts)
            .collect();
        let chinese = tasks.iter().filter(|t| t.chinese).count() as f64 / tasks.len() as f64;
        let has_han = |s: &str| s.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c));
        for t in &tasks {
            assert_eq!(has_han(&t.prompt), t.chinese, "{t:?}");
        }
        let careful = tasks.iter().filter(|t| !t.sloppy);
        match family {
            Family::Words => {
                assert_eq!(chinese, 0.0);
                for t in careful {
                    assert_eq!(t.response, format!(" {}", t.answer), "{t:?}");
                }
                let repeat = tasks.iter().find(|t| t.kind == SuiteKind::Repeat).unwrap();
                let n = repeat.answer.split(' ').count();
                assert!(repeat.prompt.contains(&format!("{n} times")), "{repeat:?}");
            }
            Family::Choice => {
                assert!((0.05..0.16).contains(&chinese), "Chinese {chinese}");
                for t in careful {
                    let form = if t.chinese {
                        format!(" 答案是({})。", t.answer)
                    } else {
                        format!(" The answer is ({}).", t.answer)
                    };
                    assert_eq!(t.response, form);
                    assert!(["A", "B", "C", "D"].contains(&t.answer.as_str()), "{t:?}");
                    assert!(t.prompt.contains(&format!("{}) ", t.answer)), "{t:?}");
                }
            }
            Family::Zh => {
                assert_eq!(chinese, 1.0);
                for t in careful {
                    assert!(
                        t.response.ends_with(&format!("答案是{}。", t.answer)),
                        "{t:?}"
                    );
                }
            }
            Family::Json => {
                assert!((0.05..0.16).contains(&chinese), "Chinese {chinese}");
                for t in careful {
                    assert_eq!(t.response, format!(" {{\"answer\": {}}}", t.answer));
                    assert!(t.prompt.contains("JSON"), "{t:?}");
                }
            }
            Family::Demo => unreachable!("not in the suite"),
        }
        // A sloppy demonstration is never in the family's form.
        for t in tasks.iter().filter(|t| t.sloppy) {
            let in_form = match family {
                Family::Words => t.response == format!(" {}", t.answer),
                Family::Choice => t.response.contains("answer is") || t.response.contains("答案是"),
                Family::Zh => t.response.contains("答案是"),
                _ => t.response.trim_start().starts_with('{'),
            };
            assert!(!in_form, "{t:?}");
        }
    }
}

#[test]
fn heldout_candidates_carry_the_gold_rule_score_and_every_degenerate_kind() {
    for family in Family::SUITE {
        let params = small(family);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("task");
        let info = simulate_family_to_dir(family, &params, &out).unwrap();
        let rule = parse_rule(family.gold_rule()).unwrap().compile().unwrap();
        let lines = jsonl(&out.join("heldout_candidates.jsonl"));
        assert_eq!(info.files["heldout_candidates.jsonl"], lines.len());
        let sim = generate(family, &params).unwrap();
        let elsewhere: HashSet<&str> = sim
            .demonstrations
            .iter()
            .chain(&sim.prompts)
            .chain(&sim.eval_prompts)
            .chain(sim.comparisons.iter().map(|c| &c.task))
            .map(|t| t.prompt.as_str())
            .collect();
        let mut kinds = BTreeMap::<String, usize>::new();
        let mut per_prompt = BTreeMap::<String, Vec<&str>>::new();
        for l in &lines {
            let gold = rule
                .score(field(l, "response"), Some(field(l, "answer")))
                .unwrap();
            assert_eq!(l["gold"].as_f64(), Some(f64::from(gold)), "{l}");
            let kind = field(l, "kind");
            // Only the correct candidate passes the gold rule.
            assert_eq!(gold == 1.0, kind == "correct", "{}: {l}", family.name());
            assert!(!elsewhere.contains(field(l, "prompt")), "{l}");
            *kinds.entry(kind.to_string()).or_default() += 1;
            per_prompt
                .entry(field(l, "prompt_id").to_string())
                .or_default()
                .push(kind);
        }
        assert_eq!(per_prompt.len(), params.heldout_candidates);
        for (id, k) in &per_prompt {
            assert!((5..=6).contains(&k.len()), "{id}: {k:?}");
            assert_eq!(
                k.iter().filter(|&&k| k == "correct").count(),
                1,
                "{id}: {k:?}"
            );
        }
        for k in [
            "correct",
            "nearly_right",
            "wrong_format",
            "wrong",
            "empty",
            "repeated",
            "refusal",
        ] {
            assert!(kinds.get(k).is_some_and(|&n| n > 0), "{k}: {kinds:?}");
        }
    }
}

#[test]
fn the_same_seed_gives_byte_identical_files_and_another_seed_others() {
    let dir = tempfile::tempdir().unwrap();
    let read = |d: &Path| -> Vec<Vec<u8>> {
        FILES
            .iter()
            .map(|f| std::fs::read(d.join(f)).unwrap())
            .collect()
    };
    for family in Family::SUITE {
        let params = SimulateParams {
            demonstrations: 80,
            comparison_prompts: 20,
            ..small(family)
        };
        let path = |s: &str| dir.path().join(format!("{}-{s}", family.name()));
        simulate_family_to_dir(family, &params, &path("a")).unwrap();
        simulate_family_to_dir(family, &params, &path("b")).unwrap();
        assert_eq!(read(&path("a")), read(&path("b")), "{}", family.name());
        let other = SimulateParams { seed: 1, ..params };
        simulate_family_to_dir(family, &other, &path("c")).unwrap();
        let (a, c) = (read(&path("a")), read(&path("c")));
        for (i, f) in FILES.iter().enumerate() {
            assert_ne!(
                a[i],
                c[i],
                "{}: {f} is the same for seeds 0 and 1",
                family.name()
            );
        }
    }
}

#[test]
fn family_values_are_defaults_that_explicit_options_override() {
    let base = SimulateParams::default();
    let args = |family, k, noise| FamilyArgs {
        family,
        k,
        noise,
        sloppy: None,
        heldout_candidates: None,
    };
    // The demo's values are SimulateParams' defaults, and the demo writes no held-out file.
    assert_eq!(args(Family::Demo, None, None).resolve(base.clone()), base);
    let words = args(Family::Words, None, None).resolve(base.clone());
    assert_eq!(
        (words.k, words.noise, words.sloppy, words.heldout_candidates),
        (3, 0.10, 0.4, 150)
    );
    let json = args(Family::Json, Some(3), Some(0.05)).resolve(base.clone());
    assert_eq!((json.k, json.noise, json.sloppy), (3, 0.05, 0.6));
    for (family, k, noise, sloppy) in [
        (Family::Choice, 4, 0.30, 0.5),
        (Family::Zh, 5, 0.20, 0.5),
        (Family::Json, 2, 0.15, 0.6),
    ] {
        let d = family.defaults();
        assert_eq!((d.k, d.noise, d.sloppy), (k, noise, sloppy));
    }
    // K beyond a family's candidate kinds is refused, naming the option.
    let e = generate(
        Family::Words,
        &SimulateParams {
            k: 5,
            ..words.clone()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("--k 5"), "{e}");
    assert!(
        generate(
            Family::Zh,
            &SimulateParams {
                k: 5,
                ..base.clone()
            }
        )
        .is_ok()
    );
    assert!(
        generate(
            Family::Zh,
            &SimulateParams {
                k: 6,
                ..base.clone()
            }
        )
        .is_err()
    );
    assert!(generate(Family::Demo, &base).is_err());
}

#[test]
fn the_cli_writes_a_family_and_explicit_options_win() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_labeling"))
            .args(["simulate", "--out"])
            .arg(out)
            .args([
                "--train-prompts",
                "20",
                "--eval-prompts",
                "10",
                "--demonstrations",
                "30",
                "--comparison-prompts",
                "8",
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let out = dir.path().join("words");
    let o = run(&["--family", "words"], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("gold rule: normalized_match"), "{stdout}");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("task.json")).unwrap()).unwrap();
    assert_eq!(info["family"], "words");
    assert_eq!(info["params"]["k"], 3);
    assert_eq!(info["params"]["heldout_candidates"], 150);
    assert_eq!(info["files"]["rankings.csv"], 8 * 3 * 3);
    assert_eq!(jsonl(&out.join("prompts.jsonl")).len(), 20);

    let out = dir.path().join("json");
    let o = run(
        &[
            "--family",
            "json",
            "--k",
            "4",
            "--noise",
            "0.05",
            "--sloppy",
            "0.2",
            "--heldout-candidates",
            "7",
        ],
        &out,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("task.json")).unwrap()).unwrap();
    assert_eq!(info["gold_rule"], "json_answer");
    assert_eq!(info["params"]["k"], 4);
    assert_eq!(info["params"]["noise"], 0.05);
    assert_eq!(info["params"]["sloppy"], 0.2);
    let ids: HashSet<String> = jsonl(&out.join("heldout_candidates.jsonl"))
        .iter()
        .map(|l| field(l, "prompt_id").to_string())
        .collect();
    assert_eq!(ids.len(), 7);

    // --family demo is the default: the same bytes, and no held-out file.
    let (a, b) = (dir.path().join("demo-a"), dir.path().join("demo-b"));
    assert!(run(&["--family", "demo"], &a).status.success());
    assert!(run(&[], &b).status.success());
    for f in &FILES[..5] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f}"
        );
    }
    assert!(!a.join("heldout_candidates.jsonl").exists());

    let o = run(&["--family", "words", "--k", "5"], &dir.path().join("bad"));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--k 5"));
    let o = run(&["--family", "nope"], &dir.path().join("bad"));
    assert!(!o.status.success());
    assert!(!dir.path().join("bad").exists());
}
