//! `labeling import` on real and hand-written files: counts, statistics, every error case, the
//! export-sheet → rank → import round trip, and arbitrary bytes.

use labeling::import::{CsvFormat, read_rankings};
use labeling::{Aggregate, ImportOptions, import, import_to_dir};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn opts(input: &Path, out: &Path) -> ImportOptions {
    ImportOptions {
        inputs: vec![input.to_path_buf()],
        out: out.to_path_buf(),
        format: None,
        aggregate: Aggregate::None,
        keep_ties: false,
        renames: HashMap::new(),
    }
}

fn errors_of(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.csv");
    std::fs::write(&p, text).unwrap();
    match read_rankings(&p, None, &HashMap::new()) {
        Ok(g) => panic!("imported {} groups but should fail:\n{text}", g.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn oasst_as_long_csv_imports_to_212_groups_and_754_pairs() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/preference/oasst_en_100_tree.jsonl");
    if !src.exists() {
        eprintln!("skipped: {} not found", src.display());
        return;
    }
    let o = datasets::adapters::read_oasst(&src).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let csv_path = dir.path().join("oasst.csv");
    let mut w = csv::Writer::from_path(&csv_path).unwrap();
    w.write_record(["prompt_id", "prompt", "response_id", "response", "rank"])
        .unwrap();
    for g in &o.groups {
        for (i, (r, k)) in g.responses.iter().zip(&g.ranks).enumerate() {
            w.write_record([&g.prompt_id, &g.prompt, &format!("{i}"), r, &k.to_string()])
                .unwrap();
        }
    }
    w.flush().unwrap();
    let out = dir.path().join("labels");
    let stats = import_to_dir(&opts(&csv_path, &out)).unwrap();
    assert_eq!(
        (stats.groups, stats.pairs, stats.ties, stats.labelers),
        (212, 754, 0, 1)
    );
    assert_eq!(stats.groups_by_k.values().sum::<usize>(), 212);
    assert_eq!(stats.pairwise_agreement, None);
    // What was written reads back through the datasets crate.
    let pairs =
        datasets::load_comparisons(&datasets::Source::new(out.join("pairs.parquet"))).unwrap();
    assert_eq!(pairs.len(), 754);
    assert!(pairs.iter().all(|p| p.margin.unwrap() >= 1.0));
    let groups =
        datasets::load_ranked_groups(&datasets::Source::new(out.join("rankings.parquet"))).unwrap();
    assert_eq!(groups.len(), 212);
    assert_eq!(
        groups.iter().map(|g| g.pairs(false).len()).sum::<usize>(),
        754
    );
    let stats_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats_json["pairs"], 754);
    assert_eq!(
        stats_json["groups_by_k"]["2"].as_u64().unwrap() as usize,
        stats.groups_by_k["2"]
    );
}

#[test]
fn wide_file_with_ties_crlf_bom_cjk_and_quotes() {
    let text = "\u{feff}labeler_id,prompt_id,prompt,response_1,response_2,response_3,response_4,ranking,notes\r\n\
        alice,p1,\"東京の天気は？\",\"晴れ, 25°C\",\"雨\",\"He said \"\"cloudy\"\"\nthen left\",,2>1=3,ignored\r\n\
        bob,p1,\"東京の天気は？\",\"晴れ, 25°C\",\"雨\",\"He said \"\"cloudy\"\"\nthen left\",,1>2>3,\r\n\
        alice,p2,\"Say nothing\",\"\",\"ok\",,,1=2,\r\n";
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("wide.csv");
    std::fs::write(&p, text).unwrap();
    let imported = import(&opts(&p, &dir.path().join("out"))).unwrap();
    let g = &imported.groups;
    assert_eq!(g.len(), 3);
    assert_eq!(g[0].prompt, "東京の天気は？");
    assert_eq!(
        g[0].responses,
        vec!["晴れ, 25°C", "雨", "He said \"cloudy\"\nthen left"]
    );
    assert_eq!(g[0].ranks, vec![2, 1, 2]);
    // Each p1 row holds a quoted newline, so records start on lines 2, 4 and 6.
    assert_eq!((g[0].line, g[1].line, g[2].line), (2, 4, 6));
    let s = &imported.stats;
    // alice p1: 2 pairs + 1 tie; bob p1: 3 pairs; alice p2: 1 tie.
    assert_eq!(
        (
            s.pairs,
            s.ties,
            s.prompts,
            s.labelers,
            s.responses,
            s.empty_responses
        ),
        (5, 2, 2, 2, 5, 1)
    );
    // p1's three pairs judged by both: (1,2) 2>1 vs 1>2 disagree; (1,3) tie vs 1>3; (2,3) 2>3 both.
    let (agree, kappa) = (s.pairwise_agreement.unwrap(), s.fleiss_kappa.unwrap());
    assert!((agree - 1.0 / 3.0).abs() < 1e-12, "{agree}");
    assert!(kappa < 0.2, "{kappa}");
    // Kendall's W over p1 (K = 3, two labelers): alice (2.5, 1, 2.5)... fractional ranks of
    // [2,1,2] = (2.5, 1, 2.5); bob (1, 2, 3). Sums 3.5, 3, 5.5; S = 3.5; T_alice = 6;
    // W = 12·3.5 / (4·24 − 2·6) = 0.5.
    assert!((s.kendall_w_mean.unwrap() - 0.5).abs() < 1e-12);
    let keep = import(&ImportOptions {
        keep_ties: true,
        ..opts(&p, &dir.path().join("o"))
    })
    .unwrap();
    assert_eq!(keep.pairs.len(), 7);
    assert_eq!(
        keep.pairs
            .iter()
            .filter(|x| x.tie && x.margin == Some(0.0))
            .count(),
        2
    );
    let maj = import(&ImportOptions {
        aggregate: Aggregate::Majority,
        ..opts(&p, &dir.path().join("o"))
    })
    .unwrap();
    // (2,3) agreed; (1,2) split 1–1; (1,3) split tie/1>3; p2's tie is a tie majority.
    assert_eq!(maj.pairs.len(), 1);
    assert_eq!(
        (
            maj.pairs[0].chosen_id.as_str(),
            maj.pairs[0].rejected_id.as_str()
        ),
        ("2", "3")
    );
    assert_eq!(
        (
            maj.stats.majority_dropped_ties,
            maj.stats.majority_dropped_no_majority
        ),
        (Some(1), Some(2))
    );
}

#[test]
fn long_format_renamed_columns_and_anonymous_labeler() {
    let text = "pid,question,response_id,response,score\nq1,What?,a,x,1\nq1,What?,b,y,3\nq1,What?,c,z,3\nq1,What?,d,w,7\n";
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("long.csv");
    std::fs::write(&p, text).unwrap();
    let renames = HashMap::from([
        ("prompt_id".to_string(), "pid".to_string()),
        ("prompt".to_string(), "question".to_string()),
        ("rank".to_string(), "score".to_string()),
    ]);
    let g = read_rankings(&p, Some(CsvFormat::Long), &renames).unwrap();
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].labeler_id, "");
    assert_eq!(g[0].ranks, vec![1, 3, 3, 7]);
    // Without the renames the error names the missing column and the flag.
    let e = read_rankings(&p, Some(CsvFormat::Long), &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("line 1, column `prompt_id`: required column missing")
            && e.contains("--col prompt_id=HEADER"),
        "{e}"
    );
}

#[test]
fn every_error_names_line_column_and_value() {
    let h = "prompt_id,prompt,response_id,response,labeler_id,rank\n";
    let e = errors_of(&format!("{h}p1,Q,a,x,l1,first\np1,Q,b,y,l1,2\n"));
    assert!(
        e.contains(
            "r.csv line 2, column `rank`: rank must be an integer ≥ 1 (1 = best), found \"first\""
        ),
        "{e}"
    );
    let e = errors_of(&format!("{h}p1,Q,a,x,l1,0\np1,Q,b,y,l1,2\n"));
    assert!(
        e.contains("line 2, column `rank`") && e.contains("found \"0\""),
        "{e}"
    );
    let e = errors_of(&format!("{h}p1,,a,x,l1,1\np1,,b,y,l1,2\n"));
    assert!(
        e.contains("line 2, column `prompt`: prompt is empty")
            && e.contains("line 3, column `prompt`"),
        "{e}"
    );
    let e = errors_of(&format!(
        "{h}p1,Q,a,x,l1,1\np1,Q,b,y,l1,2\np1,Other,c,z,l2,1\np1,Other,d,w,l2,2\n"
    ));
    assert!(
        e.contains(
            "line 4, column `prompt`: prompt_id \"p1\" has a different prompt text than on line 2"
        ),
        "{e}"
    );
    let e = errors_of(&format!(
        "{h}p1,Q,a,x,l1,1\np1,Q,b,y,l1,2\np1,Q,a,CHANGED,l2,1\np1,Q,b,y,l2,2\n"
    ));
    assert!(e.contains("line 4, column `response`: response_id \"a\" of prompt_id \"p1\" has a different text than on line 2"), "{e}");
    let e = errors_of(&format!("{h}p1,Q,a,x,l1,1\np1,Q,a,x,l1,2\np1,Q,b,y,l1,3\n"));
    assert!(
        e.contains("line 3, column `response_id`: response_id \"a\" appears twice")
            && e.contains("first on line 2"),
        "{e}"
    );
    let e = errors_of(&format!("{h}p1,Q,a,x,l1,1\np1,Q,b,y,l1,2\np2,R,a,x,l1,1\n"));
    assert!(e.contains("line 4, column `prompt_id`: the group of prompt_id \"p2\" and labeler \"l1\" has 1 response"), "{e}");
    let e = errors_of("prompt_id,prompt,response_id,response,labeler_id\np1,Q,a,x,l\n");
    assert!(
        e.contains("line 1") && e.contains("neither a `ranking` column"),
        "{e}"
    );
    let e = errors_of("prompt_id,prompt,response_id,labeler_id,rank\np1,Q,a,l,1\n");
    assert!(
        e.contains("line 1, column `response`: required column missing"),
        "{e}"
    );
    let e = errors_of(&format!("{h}p1,Q,a,x,l1,1\np1,Q,b,y,l1\n"));
    assert!(
        e.contains("line 3") && e.contains("5 cells but the header has 6"),
        "{e}"
    );
    // Not UTF-8: the line of the first bad byte.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bin.csv");
    std::fs::write(
        &p,
        b"prompt_id,prompt,response_id,response,rank\np1,Q,a,x,1\np1,\xe9t\xe9,b,y,2\n",
    )
    .unwrap();
    let e = read_rankings(&p, None, &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bin.csv line 3") && e.contains("not UTF-8"),
        "{e}"
    );

    let w = "prompt_id,prompt,labeler_id,response_1,response_2,response_3,ranking\n";
    let e = errors_of(&format!("{w}p1,Q,l,a,b,c,1>>2\n"));
    assert!(
        e.contains("line 2, column `ranking`") && e.contains("\"\" is not a response number"),
        "{e}"
    );
    let e = errors_of(&format!("{w}p1,Q,l,a,b,c,1>2>1\n"));
    assert!(e.contains("names response 1 twice"), "{e}");
    let e = errors_of(&format!("{w}p1,Q,l,a,b,c,1>4\n"));
    assert!(
        e.contains("names response 4, but there is no column response_4"),
        "{e}"
    );
    let e = errors_of(&format!("{w}p1,Q,l,a,b,c,1>2\n"));
    assert!(e.contains("line 2, column `response_3`: response_3 has text but the ranking \"1>2\" does not name it"), "{e}");
    let e = errors_of(&format!("{w}p1,Q,l,a,,,1\n"));
    assert!(
        e.contains("ranks 1 response; a ranking needs at least 2"),
        "{e}"
    );

    // All errors up to 20 are listed, then a count.
    let mut many = h.to_string();
    for i in 0..30 {
        many.push_str(&format!("p{i},Q{i},a,x,l,bad\n"));
    }
    let e = errors_of(&many);
    assert_eq!(e.lines().filter(|l| l.contains("rank must be")).count(), 20);
    assert!(
        e.ends_with("more than 20 error(s); nothing was written"),
        "{e}"
    );
}

#[test]
fn a_failed_import_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.csv");
    std::fs::write(
        &p,
        "prompt_id,prompt,response_id,response,rank\np1,Q,a,x,one\n",
    )
    .unwrap();
    let out = dir.path().join("labels");
    let status = Command::new(env!("CARGO_BIN_EXE_labeling"))
        .args([
            "import",
            p.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!status.status.success());
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(err.contains("bad.csv line 2, column `rank`"), "{err}");
    assert!(!out.exists());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

/// A tiny policy folder for the export round trip.
fn tiny_policy(dir: &Path) -> PathBuf {
    let texts: Vec<String> = (0..40)
        .map(|i| format!("Human: tell me about {i}\n\nAssistant: it is {i}."))
        .collect();
    let tok = model::Tokenizer::train_bpe(texts.iter(), 300).unwrap();
    let mut cfg = model::ModelConfig::preset("tiny", tok.vocab_size()).unwrap();
    cfg.eos_token_id = Some(tok.eos_id);
    let device = model::parse_device("cpu").unwrap();
    let m = model::CausalLm::new(&cfg, false, 1, &device).unwrap();
    let out = dir.join("policy");
    model::save(&m, Some(&tok), &out).unwrap();
    out
}

#[test]
fn export_sheet_then_rank_then_import() {
    let dir = tempfile::tempdir().unwrap();
    let policy = tiny_policy(dir.path());
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"tell me about 3\"}\n{\"prompt\": \"tell me about 7\"}\n",
    )
    .unwrap();
    let sheet = dir.path().join("sheet.csv");
    let out = Command::new(env!("CARGO_BIN_EXE_labeling"))
        .args([
            "export-sheet",
            "--policy",
            policy.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--k",
            "3",
            "--out",
            sheet.to_str().unwrap(),
            "--max-new-tokens",
            "6",
            "--seed",
            "5",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Fill it as two labelers would: alice ranks r1 > r2 > r3, bob r2 > r1 = r3.
    let mut rdr = csv::Reader::from_path(&sheet).unwrap();
    assert_eq!(
        rdr.headers().unwrap().iter().collect::<Vec<_>>(),
        vec![
            "prompt_id",
            "prompt",
            "response_id",
            "response",
            "labeler_id",
            "rank"
        ]
    );
    let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), 6);
    assert!(rows.iter().all(|r| r[5].is_empty() && r[4].is_empty()));
    let filled = dir.path().join("filled.csv");
    let mut w = csv::Writer::from_path(&filled).unwrap();
    w.write_record(labeling::import::LONG_HEADER).unwrap();
    for (labeler, ranks) in [("alice", ["1", "2", "3"]), ("bob", ["2", "1", "2"])] {
        for (i, r) in rows.iter().enumerate() {
            w.write_record([&r[0], &r[1], &r[2], &r[3], labeler, ranks[i % 3]])
                .unwrap();
        }
    }
    w.flush().unwrap();
    let labels = dir.path().join("labels");
    let out = Command::new(env!("CARGO_BIN_EXE_labeling"))
        .args([
            "import",
            filled.to_str().unwrap(),
            "--out",
            labels.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("groups") && table.contains("Fleiss' kappa"),
        "{table}"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(labels.join("stats.json")).unwrap()).unwrap();
    // 2 prompts × 2 labelers; alice 3 pairs each, bob 2 pairs + 1 tie each.
    assert_eq!(stats["groups"], 4);
    assert_eq!(stats["pairs"], 10);
    assert_eq!(stats["ties"], 2);
    assert_eq!(stats["labelers"], 2);
    // Per prompt: (r1,r2) disagree, (r1,r3) 1>3 vs tie disagree, (r2,r3) agree → 1/3.
    assert!((stats["pairwise_agreement"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-12);
    assert!(stats["kendall_w_mean"].as_f64().is_some());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]
    /// Arbitrary bytes give Ok or Err, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
                                   header in 0usize..3) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.csv");
        let mut data = match header {
            0 => b"prompt_id,prompt,response_id,response,labeler_id,rank\n".to_vec(),
            1 => b"prompt_id,prompt,labeler_id,response_1,response_2,ranking\n".to_vec(),
            _ => Vec::new(),
        };
        data.extend(bytes);
        std::fs::write(&p, &data).unwrap();
        let _ = read_rankings(&p, None, &HashMap::new());
    }
}

// Regression: load_comparisons ignored pairs.parquet's tie column, so ties trained as preferences.
#[test]
fn load_comparisons_reads_the_tie_column_that_import_keep_ties_writes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("long.csv");
    // b = c is the one tie.
    std::fs::write(
        &p,
        "prompt_id,prompt,response_id,response,labeler_id,rank\n\
         p1,Q,a,x,l1,1\np1,Q,b,y,l1,2\np1,Q,c,z,l1,2\np1,Q,d,w,l1,4\n",
    )
    .unwrap();
    let out = dir.path().join("labels");
    let o = ImportOptions {
        keep_ties: true,
        ..opts(&p, &out)
    };
    let stats = import_to_dir(&o).unwrap();
    assert_eq!((stats.pairs, stats.ties), (6, 1));
    let read =
        datasets::load_comparisons(&datasets::Source::new(out.join("pairs.parquet"))).unwrap();
    let got: Vec<(&str, &str, Option<f64>, bool)> = read
        .iter()
        .map(|c| {
            (
                c.chosen_id.as_str(),
                c.rejected_id.as_str(),
                c.margin,
                c.tie,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("a", "b", Some(1.0), false),
            ("a", "c", Some(1.0), false),
            ("a", "d", Some(3.0), false),
            ("b", "c", Some(0.0), true),
            ("b", "d", Some(2.0), false),
            ("c", "d", Some(2.0), false),
        ]
    );
    // Everything else round-trips too: what was read is what was imported.
    assert_eq!(read, import(&o).unwrap().pairs);
    assert!(
        read.iter()
            .all(|c| c.prompt_id == "p1" && c.labeler_id == "l1")
    );

    // JSONL: true, 1, "true" are ties; false, 0, "false" and absent are not; "maybe" is an error.
    let j = dir.path().join("ties.jsonl");
    let row =
        |tie: &str| format!("{{\"prompt\":\"q\",\"chosen\":\"a\",\"rejected\":\"b\"{tie}}}\n");
    let text: String = [
        ",\"tie\":true",
        ",\"tie\":1",
        ",\"tie\":\"true\"",
        ",\"tie\":false",
        ",\"tie\":0",
        ",\"tie\":\"false\"",
        "",
    ]
    .map(row)
    .concat();
    std::fs::write(&j, text).unwrap();
    let c = datasets::load_comparisons(&datasets::Source::new(&j)).unwrap();
    assert_eq!(
        c.iter().map(|c| c.tie).collect::<Vec<_>>(),
        vec![true, true, true, false, false, false, false]
    );
    std::fs::write(
        &j,
        [",\"tie\":true", ",\"tie\":false", ",\"tie\":\"maybe\""]
            .map(row)
            .concat(),
    )
    .unwrap();
    let e = datasets::load_comparisons(&datasets::Source::new(&j))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "ties.jsonl line 3, field `tie`: expected true or false (or 1 or 0), found \"maybe\""
        ),
        "{e}"
    );
}

#[test]
fn several_files_import_together_and_a_shared_prompt_id_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("round-0.csv");
    let b = dir.path().join("round-1.csv");
    std::fs::write(
        &a,
        "prompt_id,prompt,response_id,response,labeler_id,rank\n\
         p1,Q,a,x,l1,1\np1,Q,b,y,l1,2\n",
    )
    .unwrap();
    std::fs::write(
        &b,
        "prompt_id,prompt,response_id,response,labeler_id,rank\n\
         r1-1,Q,r1,x2,l1,2\nr1-1,Q,r2,y2,l1,1\nr1-1,Q,r3,z2,l1,3\n",
    )
    .unwrap();
    let out = dir.path().join("labels");
    let stats = import_to_dir(&ImportOptions {
        inputs: vec![a.clone(), b.clone()],
        ..opts(&a, &out)
    })
    .unwrap();
    assert_eq!((stats.prompts, stats.groups, stats.pairs), (2, 2, 1 + 3));
    assert_eq!(stats.groups_by_k.get("2"), Some(&1));
    assert_eq!(stats.groups_by_k.get("3"), Some(&1));
    // The same prompt id in two files: named, and nothing written.
    let out2 = dir.path().join("labels2");
    let e = import_to_dir(&ImportOptions {
        inputs: vec![a.clone(), a.clone()],
        ..opts(&a, &out2)
    });
    let e = e.unwrap_err().to_string();
    assert!(e.contains("round-0.csv") && e.contains("twice"), "{e}");
    assert!(!out2.exists());
    std::fs::write(
        &b,
        "prompt_id,prompt,response_id,response,labeler_id,rank\n\
         p1,Q,r1,x2,l1,2\np1,Q,r2,y2,l1,1\n",
    )
    .unwrap();
    let e = import_to_dir(&ImportOptions {
        inputs: vec![a.clone(), b.clone()],
        ..opts(&a, &out2)
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("round-1.csv line 2") && e.contains("\"p1\"") && e.contains("round-0.csv"),
        "{e}"
    );
    assert!(!out2.exists());
}
