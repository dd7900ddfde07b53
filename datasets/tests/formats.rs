//! Readers on real data from ../shared/data (skipped, with a message, where it is absent) and on
//! small files written here, errors included.

use datasets::adapters::{read_hh_rlhf, read_oasst};
use datasets::{Source, load_comparisons, load_demonstrations, load_ranked_groups};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

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

#[test]
fn hh_rlhf_pairs_split_at_the_last_assistant_turn() {
    let Some(path) = shared("preference/hh-rlhf_harmless-base_test.jsonl.gz") else {
        return;
    };
    let hh = read_hh_rlhf(&path).unwrap();
    assert_eq!(
        hh.mismatched_prompt_lines.len(),
        5,
        "{:?}",
        hh.mismatched_prompt_lines
    );
    assert_eq!(hh.comparisons.len(), 2312 - 5);
    assert!(
        hh.comparisons
            .iter()
            .all(|c| c.prompt.ends_with("\n\nAssistant:"))
    );
    assert!(
        hh.comparisons
            .iter()
            .all(|c| c.prompt.starts_with("\n\nHuman:"))
    );
    let empty_chosen = hh
        .comparisons
        .iter()
        .filter(|c| c.chosen.is_empty())
        .count();
    assert!(
        (3..=4).contains(&empty_chosen),
        "empty chosen {empty_chosen}"
    );
}

#[test]
fn oasst_trees_give_212_groups_and_754_pairs() {
    let Some(path) = shared("preference/oasst_en_100_tree.jsonl") else {
        return;
    };
    let o = read_oasst(&path).unwrap();
    assert_eq!(o.groups.len(), 212);
    let pairs: usize = o.groups.iter().map(|g| g.pairs(false).len()).sum();
    assert_eq!(pairs, 754);
    let sizes: Vec<usize> = o.groups.iter().map(|g| g.responses.len()).collect();
    assert_eq!(*sizes.iter().min().unwrap(), 2);
    assert_eq!(*sizes.iter().max().unwrap(), 9);
    // One demonstration per group (its rank-0 reply), from the conversation so far.
    assert_eq!(o.demonstrations.len(), 212);
    assert!(
        o.groups
            .iter()
            .all(|g| g.prompt.ends_with("\n\nAssistant:") && g.ranks.contains(&1))
    );
}

#[test]
fn gsm8k_reads_with_column_mapping() {
    let Some(path) = shared("demonstrations/gsm8k_test.jsonl") else {
        return;
    };
    let src = Source {
        path,
        format: None,
        columns: HashMap::from([
            ("prompt".to_string(), "question".to_string()),
            ("response".to_string(), "answer".to_string()),
        ]),
    };
    let demos = load_demonstrations(&src).unwrap();
    assert_eq!(demos.len(), 1319);
    assert!(demos.iter().all(|d| d.response.contains("####")));
    // Without the mapping, the error names the column and says how to map it.
    let e = load_demonstrations(&Source::new(src.path.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("line 1") && e.contains("`prompt`") && e.contains("columns.prompt"),
        "{e}"
    );
}

#[test]
fn jsonl_and_csv_errors_name_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.jsonl");
    std::fs::write(
        &p,
        "{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\",\"margin\":2}\n\n{\"prompt\":\"a\",\"chosen\":\"b\"\n",
    )
    .unwrap();
    let e = load_comparisons(&Source::new(&p)).unwrap_err().to_string();
    assert!(
        e.contains("c.jsonl line 3") && e.contains("not valid JSON"),
        "{e}"
    );

    std::fs::write(&p, "{\"prompt\":\"a\",\"chosen\":[1],\"rejected\":\"c\"}\n").unwrap();
    let e = load_comparisons(&Source::new(&p)).unwrap_err().to_string();
    assert!(
        e.contains("line 1, field `chosen`: expected a string, found [1]"),
        "{e}"
    );

    std::fs::write(
        &p,
        "{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\",\"margin\":\"lots\"}\n",
    )
    .unwrap();
    let e = load_comparisons(&Source::new(&p)).unwrap_err().to_string();
    assert!(e.contains("field `margin`: expected a number"), "{e}");

    let c = dir.path().join("d.csv");
    std::fs::write(
        &c,
        "\u{feff}prompt,response\r\n\"Say \"\"hi\"\", please\",\"line1\nline2, still\"\r\nq,\r\n",
    )
    .unwrap();
    let demos = load_demonstrations(&Source::new(&c)).unwrap();
    assert_eq!(demos.len(), 2);
    assert_eq!(demos[0].prompt, "Say \"hi\", please");
    assert_eq!(demos[0].response, "line1\nline2, still");
    assert_eq!(demos[1].response, "");

    std::fs::write(&c, "prompt,response\na,b\nc,d,e\n").unwrap();
    let e = load_demonstrations(&Source::new(&c))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("d.csv line 3") && e.contains("3 cells but the header has 2"),
        "{e}"
    );

    std::fs::write(&c, b"prompt,response\na,\xff\xfe\n").unwrap();
    let e = load_demonstrations(&Source::new(&c))
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 2") && e.contains("not UTF-8"), "{e}");

    let e = load_demonstrations(&Source::new(dir.path().join("missing.jsonl")))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing.jsonl") && e.contains("cannot read"),
        "{e}"
    );
    let e = load_demonstrations(&Source::new(dir.path().join("data.txt")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("use .jsonl, .csv or .parquet"), "{e}");
}

#[test]
fn ranked_groups_read_from_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.jsonl");
    std::fs::write(
        &p,
        "{\"prompt_id\":\"p1\",\"prompt\":\"q\",\"labeler_id\":\"x\",\"responses\":[\"a\",\"b\",\"c\"],\"ranks\":[2,1,2]}\n\
         {\"prompt_id\":\"p2\",\"prompt\":\"q2\",\"responses\":[\"a\"],\"ranks\":[1]}\n",
    )
    .unwrap();
    let e = load_ranked_groups(&Source::new(&p))
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 2") && e.contains("K ≥ 2"), "{e}");
    std::fs::write(
        &p,
        "{\"prompt_id\":\"p1\",\"prompt\":\"q\",\"responses\":[\"a\",\"b\",\"c\"],\"ranks\":[2,1,2]}\n",
    )
    .unwrap();
    let g = load_ranked_groups(&Source::new(&p)).unwrap();
    assert_eq!(g[0].labeler_id, "");
    let c = g[0].pairs(false);
    // (b > a) and (b > c); a = c is a tie and gives no pair.
    assert_eq!(c.len(), 2);
    assert!(c.iter().all(|x| x.chosen == "b" && x.margin == Some(1.0)));
}

#[test]
fn ranked_groups_get_response_ids_and_lines_and_name_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.jsonl");
    let load = |text: &str| {
        std::fs::write(&p, text).unwrap();
        load_ranked_groups(&Source::new(&p))
    };
    let g = load(
        "{\"prompt_id\":\"p1\",\"prompt\":\"q\",\"responses\":[\"a\",\"b\"],\"ranks\":[1,2]}\n\n\
         {\"prompt_id\":\"p2\",\"prompt\":\"q\",\"response_ids\":[\"x\",7],\"responses\":[\"a\",\"b\"],\"ranks\":[2,1]}\n",
    )
    .unwrap();
    assert_eq!(
        (g[0].response_ids.clone(), g[0].line),
        (vec!["1".to_string(), "2".into()], 1)
    );
    assert_eq!(
        (g[1].response_ids.clone(), g[1].line),
        (vec!["x".to_string(), "7".into()], 3)
    );
    let c = g[1].pairs(false);
    assert_eq!(
        (c[0].chosen_id.as_str(), c[0].rejected_id.as_str()),
        ("7", "x")
    );

    let e = load("{\"prompt_id\":\"p\",\"prompt\":\"q\",\"responses\":[\"a\",\"b\"]}\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("g.jsonl line 1, field `ranks`: column missing") && e.contains("columns.ranks"),
        "{e}"
    );
    let e = load(
        "{\"prompt_id\":\"p\",\"prompt\":\"q\",\"responses\":[\"a\",\"b\"],\"ranks\":[1,2,3]}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(
            "line 1, field `ranks`: found 3 ranks for 2 responses; give one rank per response"
        ),
        "{e}"
    );
    let e = load("{\"prompt_id\":\"p\",\"prompt\":\"q\",\"responses\":[],\"ranks\":[]}\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("line 1, field `responses`: found 0 response(s)") && e.contains("K ≥ 2"),
        "{e}"
    );
    let e = load("{\"prompt_id\":\"p\",\"prompt\":\"q\",\"response_ids\":[\"x\"],\"responses\":[\"a\",\"b\"],\"ranks\":[1,2]}\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("field `response_ids`: found 1 response ids for 2 responses"),
        "{e}"
    );
    let e = load("{\"prompt_id\":\"p\",\"prompt\":\"q\",\"response_ids\":[\"x\",\"x\"],\"responses\":[\"a\",\"b\"],\"ranks\":[1,2]}\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("field `response_ids`: response id \"x\" appears twice"),
        "{e}"
    );
}

#[test]
fn comparisons_read_optional_ids_and_tie_flags_from_csv() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.csv");
    std::fs::write(
        &p,
        "prompt_id,prompt,chosen_id,chosen,rejected_id,rejected,margin,verdict\n\
         p1,q,a,x,b,y,0,1\np1,q,a,x,c,z,2,0\np1,q,b,y,c,z,,TRUE\np1,q,b,y,d,w,1,\n",
    )
    .unwrap();
    let src = Source {
        columns: HashMap::from([("tie".to_string(), "verdict".to_string())]),
        ..Source::new(&p)
    };
    let c = load_comparisons(&src).unwrap();
    assert_eq!(
        c.iter().map(|c| (c.tie, c.margin)).collect::<Vec<_>>(),
        vec![
            (true, Some(0.0)),
            (false, Some(2.0)),
            (true, None),
            (false, Some(1.0))
        ]
    );
    assert!(
        c.iter()
            .all(|c| c.prompt_id == "p1" && c.labeler_id.is_empty())
    );
    assert_eq!(
        (c[1].chosen_id.as_str(), c[1].rejected_id.as_str()),
        ("a", "c")
    );
    std::fs::write(&p, "prompt,chosen,rejected,verdict\nq,x,y,2\n").unwrap();
    let e = load_comparisons(&src).unwrap_err().to_string();
    assert!(
        e.contains("c.csv line 2, field `verdict`: expected true or false"),
        "{e}"
    );
}
