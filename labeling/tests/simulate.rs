//! `labeling simulate`: the generated demo task imports, scores 1.0 by the gold scorer where it
//! should, is diverse, is deterministic, and matches the committed copy in datasets/demo/task.

use datasets::gold::Rule;
use labeling::simulate::{
    CandidateKind, SimulateParams, Simulated, TaskKind, generate, simulate_to_dir,
};
use labeling::{Aggregate, ImportOptions, import};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::Command;

mod common;
use common::{field, jsonl};

const FILES: [&str; 5] = [
    "demonstrations.jsonl",
    "prompts.jsonl",
    "eval_prompts.jsonl",
    "rankings.csv",
    "task.json",
];

/// prompt → gold answer, from the generator's own records.
fn answers(sim: &Simulated) -> HashMap<String, String> {
    let comparisons = sim.comparisons.iter().map(|c| &c.task);
    sim.demonstrations
        .iter()
        .chain(&sim.prompts)
        .chain(&sim.eval_prompts)
        .chain(comparisons)
        .map(|t| (t.prompt.clone(), t.answer.clone()))
        .collect()
}

#[test]
fn the_default_task_imports_and_the_gold_scorer_agrees_with_it() {
    let params = SimulateParams::default();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("task");
    let info = simulate_to_dir(&params, &out).unwrap();
    let sim = generate(&params).unwrap();
    let answer = answers(&sim);
    let rule = Rule::FinalAnswer.compile().unwrap();
    let lenient = Rule::ExactAnswer.compile().unwrap();

    // Sizes: as asked, and modest.
    let demos = jsonl(&out.join("demonstrations.jsonl"));
    let prompts = jsonl(&out.join("prompts.jsonl"));
    let eval = jsonl(&out.join("eval_prompts.jsonl"));
    assert_eq!(demos.len(), params.demonstrations);
    assert_eq!(prompts.len(), params.train_prompts);
    assert_eq!(eval.len(), params.eval_prompts);
    let bytes: u64 = FILES
        .iter()
        .map(|f| std::fs::metadata(out.join(f)).unwrap().len())
        .sum();
    assert!(bytes < 600_000, "{bytes} bytes");
    // Nothing but the five files, and no temporary folder left behind.
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), FILES.len());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    // The pipeline's readers take the files.
    let src = |f: &str| datasets::Source::new(out.join(f));
    assert_eq!(
        datasets::load_demonstrations(&src("demonstrations.jsonl"))
            .unwrap()
            .len(),
        params.demonstrations
    );
    assert_eq!(
        datasets::load_prompts(&src("eval_prompts.jsonl"))
            .unwrap()
            .len(),
        params.eval_prompts
    );

    // Every careful demonstration's response scores 1.0 against its prompt's answer; a sloppy
    // one states the right answer but not in the task's form, so the gold rule gives it 0.
    let mut sloppy = 0;
    for (d, t) in demos.iter().zip(&sim.demonstrations) {
        let a = &answer[field(d, "prompt")];
        assert_eq!(field(d, "response"), t.response);
        let want = if t.sloppy { 0.0 } else { 1.0 };
        assert_eq!(
            rule.score(field(d, "response"), Some(a)),
            Ok(want),
            "{d} vs {a:?}"
        );
        assert!(t.response.contains(a.as_str()), "{t:?}");
        if t.sloppy {
            sloppy += 1;
            assert!(!t.response.contains("answer is") && !t.response.contains("答案是"));
        }
    }
    let share = sloppy as f64 / demos.len() as f64;
    assert!((share - params.sloppy).abs() < 0.03, "sloppy share {share}");
    assert_eq!(info.sloppy_demonstrations, sloppy);
    // Every prompt's answer is what the generator's correct response states.
    for t in sim.prompts.iter().chain(&sim.eval_prompts) {
        assert_eq!(rule.score(&t.response, Some(&t.answer)), Ok(1.0), "{t:?}");
    }
    for (file, recs) in [("prompts", &prompts), ("eval", &eval)] {
        for p in recs {
            assert_eq!(
                field(p, "answer"),
                answer[field(p, "prompt")],
                "{file}: {p}"
            );
        }
    }
    // Candidates: correct and verbose score 1, nearly right and wrong 0.
    for c in &sim.comparisons {
        assert_eq!(c.candidates.len(), params.k);
        for x in &c.candidates {
            let s = rule.score(&x.response, Some(&c.task.answer)).unwrap();
            match x.kind {
                CandidateKind::Correct | CandidateKind::Verbose => assert_eq!(s, 1.0, "{x:?}"),
                CandidateKind::NearlyRight | CandidateKind::Wrong => {
                    assert_eq!(s, 0.0, "{x:?} for {:?}", c.task)
                }
                // The demo's comparisons offer no degenerate candidates.
                CandidateKind::Empty | CandidateKind::Repeated | CandidateKind::Refusal => {
                    panic!("{x:?} in the demo's rankings")
                }
                CandidateKind::WrongFormat => {
                    assert_eq!(s, 0.0, "{x:?}");
                    assert!(!x.response.contains("answer is") && !x.response.contains("答案是"));
                    // The lenient rule finds the right number in it where the answer is one.
                    if c.task.answer.parse::<u32>().is_ok() {
                        let l = lenient.score(&x.response, Some(&c.task.answer)).unwrap();
                        assert_eq!(l, 1.0, "{x:?}");
                    }
                }
            }
        }
        let texts: HashSet<&str> = c.candidates.iter().map(|x| x.response.as_str()).collect();
        assert_eq!(texts.len(), c.candidates.len(), "{c:?}");
    }

    // The rankings import, with K = 4, 3 labelers, ties, and imperfect agreement.
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
    assert_eq!(s.labelers, 3);
    assert_eq!(
        s.groups_by_k,
        BTreeMap::from([("4".to_string(), params.comparison_prompts * 3)])
    );
    assert!(s.ties > 0, "{s:?}");
    let pa = s.pairwise_agreement.unwrap();
    assert!(pa > 0.5 && pa < 1.0, "agreement {pa}");
    assert_eq!(info.labels.pairwise_agreement, Some(pa));
    assert_eq!(imported.groups, sim.ranked_groups());

    // Labelers mostly, but not always, rank the correct candidate first.
    let correct: HashMap<&str, &str> = sim
        .comparisons
        .iter()
        .map(|c| {
            let x = c
                .candidates
                .iter()
                .find(|x| x.kind == CandidateKind::Correct)
                .unwrap();
            (c.prompt_id.as_str(), x.id.as_str())
        })
        .collect();
    let first = imported
        .groups
        .iter()
        .filter(|g| {
            let i = g
                .response_ids
                .iter()
                .position(|id| id == correct[g.prompt_id.as_str()])
                .unwrap();
            g.ranks[i] == 1
        })
        .count() as f64
        / imported.groups.len() as f64;
    assert!(first > 0.7 && first < 1.0, "correct ranked first {first}");
    assert_eq!(info.labels.correct_ranked_first, first);
    let distinct_groups: HashSet<Vec<u32>> =
        imported.groups.iter().map(|g| g.ranks.clone()).collect();
    assert!(distinct_groups.len() > 5);
}

#[test]
fn prompts_are_distinct_within_and_across_files_and_cover_every_task() {
    let sim = generate(&SimulateParams::default()).unwrap();
    let mut seen = HashSet::new();
    let all = sim
        .demonstrations
        .iter()
        .chain(&sim.prompts)
        .chain(&sim.eval_prompts)
        .chain(sim.comparisons.iter().map(|c| &c.task));
    let mut n = 0;
    let mut chinese = 0;
    for t in all {
        assert!(
            seen.insert(t.prompt.clone()),
            "duplicate prompt {:?}",
            t.prompt
        );
        n += 1;
        chinese += usize::from(t.chinese);
    }
    let frac = chinese as f64 / n as f64;
    assert!((0.15..0.25).contains(&frac), "Chinese {frac}");
    let demo_pairs: HashSet<(&str, &str)> = sim
        .demonstrations
        .iter()
        .map(|t| (t.prompt.as_str(), t.response.as_str()))
        .collect();
    assert_eq!(demo_pairs.len(), sim.demonstrations.len());
    for tasks in [&sim.demonstrations, &sim.prompts, &sim.eval_prompts] {
        let kinds: HashSet<TaskKind> = tasks.iter().map(|t| t.kind).collect();
        assert_eq!(kinds.len(), TaskKind::ALL.len(), "{kinds:?}");
    }
    // Chinese prompts use the Chinese answer form, English ones the English form.
    for t in sim.demonstrations.iter().filter(|t| !t.sloppy) {
        if t.chinese {
            assert!(
                t.response.ends_with(&format!("答案是{}。", t.answer)),
                "{t:?}"
            );
        } else {
            assert!(
                t.response
                    .ends_with(&format!("The answer is {}.", t.answer)),
                "{t:?}"
            );
        }
        assert!(t.response.starts_with(' '), "{t:?}");
    }
}

#[test]
fn the_same_seed_gives_byte_identical_files_and_another_seed_others() {
    let params = SimulateParams {
        train_prompts: 50,
        eval_prompts: 20,
        demonstrations: 60,
        comparison_prompts: 15,
        ..SimulateParams::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let read = |d: &Path| -> Vec<Vec<u8>> {
        FILES
            .iter()
            .map(|f| std::fs::read(d.join(f)).unwrap())
            .collect()
    };
    simulate_to_dir(&params, &dir.path().join("a")).unwrap();
    simulate_to_dir(&params, &dir.path().join("b")).unwrap();
    assert_eq!(read(&dir.path().join("a")), read(&dir.path().join("b")));
    // Writing again over an existing folder replaces it.
    simulate_to_dir(&params, &dir.path().join("a")).unwrap();
    assert_eq!(read(&dir.path().join("a")), read(&dir.path().join("b")));
    let other = SimulateParams { seed: 1, ..params };
    simulate_to_dir(&other, &dir.path().join("c")).unwrap();
    let (a, c) = (read(&dir.path().join("a")), read(&dir.path().join("c")));
    for (i, f) in FILES.iter().enumerate() {
        assert_ne!(a[i], c[i], "{f} is the same for seeds 0 and 1");
    }
}

#[test]
fn bad_parameters_are_refused() {
    for p in [
        SimulateParams {
            k: 1,
            ..Default::default()
        },
        SimulateParams {
            k: 6,
            ..Default::default()
        },
        SimulateParams {
            noise: 1.5,
            ..Default::default()
        },
        SimulateParams {
            labelers: 0,
            ..Default::default()
        },
        SimulateParams {
            sloppy: -0.1,
            ..Default::default()
        },
        SimulateParams {
            eval_prompts: 0,
            ..Default::default()
        },
    ] {
        assert!(generate(&p).is_err(), "{p:?}");
    }
    // K = 2, 5 and one labeler work.
    for (k, labelers) in [(2, 1), (5, 2)] {
        let sim = generate(&SimulateParams {
            k,
            labelers,
            comparison_prompts: 10,
            demonstrations: 10,
            train_prompts: 10,
            eval_prompts: 10,
            ..Default::default()
        })
        .unwrap();
        assert!(sim.comparisons.iter().all(|c| c.candidates.len() == k
            && c.rankings.len() == labelers
            && c.rankings.iter().all(|r| r.ranks.contains(&1))));
    }
}

#[test]
fn the_cli_writes_the_task() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let o = Command::new(env!("CARGO_BIN_EXE_labeling"))
        .args(["simulate", "--out"])
        .arg(&out)
        .args([
            "--seed",
            "3",
            "--train-prompts",
            "30",
            "--eval-prompts",
            "10",
            "--demonstrations",
            "40",
            "--comparison-prompts",
            "8",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("pairwise agreement"), "{stdout}");
    assert_eq!(jsonl(&out.join("prompts.jsonl")).len(), 30);
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("task.json")).unwrap()).unwrap();
    assert_eq!(info["params"]["seed"], 3);
    assert_eq!(info["files"]["rankings.csv"], 8 * 4 * 3);

    let o = Command::new(env!("CARGO_BIN_EXE_labeling"))
        .args(["simulate", "--k", "9", "--out"])
        .arg(dir.path().join("bad"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--k 9"));
    assert!(!dir.path().join("bad").exists());
}

#[test]
fn the_committed_demo_task_is_what_seed_0_generates() {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../datasets/demo/task");
    if !committed.exists() {
        eprintln!("skipped: {} not found", committed.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("task");
    simulate_to_dir(&SimulateParams::default(), &out).unwrap();
    for f in FILES {
        assert!(
            std::fs::read(committed.join(f)).unwrap() == std::fs::read(out.join(f)).unwrap(),
            "datasets/demo/task/{f} differs from `labeling simulate --out datasets/demo/task --seed 0`; regenerate it"
        );
    }
}

#[test]
fn heldout_candidates_are_an_extra_file_that_leaves_the_demo_files_as_they_were() {
    let params = SimulateParams {
        train_prompts: 40,
        eval_prompts: 20,
        demonstrations: 60,
        comparison_prompts: 15,
        ..SimulateParams::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let (plain, extra) = (dir.path().join("plain"), dir.path().join("extra"));
    simulate_to_dir(&params, &plain).unwrap();
    let info = simulate_to_dir(
        &SimulateParams {
            heldout_candidates: 30,
            ..params.clone()
        },
        &extra,
    )
    .unwrap();
    assert!(!plain.join("heldout_candidates.jsonl").exists());
    for f in &FILES[..4] {
        assert_eq!(
            std::fs::read(plain.join(f)).unwrap(),
            std::fs::read(extra.join(f)).unwrap(),
            "{f}"
        );
    }
    let lines = jsonl(&extra.join("heldout_candidates.jsonl"));
    assert_eq!(info.files["heldout_candidates.jsonl"], lines.len());
    let rule = Rule::FinalAnswer.compile().unwrap();
    let sim = generate(&params).unwrap();
    let others: HashSet<String> = answers(&sim).into_keys().collect();
    let mut kinds = BTreeMap::<String, usize>::new();
    let mut per_prompt = BTreeMap::<String, usize>::new();
    for l in &lines {
        let gold = rule
            .score(field(l, "response"), Some(field(l, "answer")))
            .unwrap();
        assert_eq!(l["gold"].as_f64(), Some(f64::from(gold)), "{l}");
        let kind = field(l, "kind");
        assert_eq!(gold == 1.0, kind == "correct", "{l}");
        assert!(!others.contains(field(l, "prompt")), "{l}");
        *kinds.entry(kind.to_string()).or_default() += 1;
        *per_prompt
            .entry(field(l, "prompt_id").to_string())
            .or_default() += 1;
    }
    assert_eq!(per_prompt.len(), 30);
    assert!(
        per_prompt.values().all(|n| (5..=6).contains(n)),
        "{per_prompt:?}"
    );
    assert_eq!(kinds["correct"], 30);
    for k in [
        "empty",
        "repeated",
        "refusal",
        "nearly_right",
        "wrong_format",
        "wrong",
    ] {
        assert!(kinds.get(k).is_some_and(|&n| n > 0), "{k}: {kinds:?}");
    }
}
