//! Fuzzing (issue 29) of the readers of users' data files: JSONL, `.jsonl.gz`, CSV and Parquet
//! into records, and the typed loaders on top (demonstrations, prompts, comparisons, ranked
//! groups). On any bytes, random or mutations of valid files (truncation, byte flips, inserted
//! huge numbers, deep nesting, broken quotes and gzip streams), reading returns Ok or an error:
//! no panic, no unbounded allocation (this binary's allocator refuses any one allocation over
//! 1 GiB, which aborts the test), and it finishes.
//!
//! Cases per property: 64 by default; `FUZZ_CASES=N` raises it for a long run.

#[path = "../../tests/common/fuzz.rs"]
mod fuzz;
use fuzz::{Edit, apply};

use datasets::{
    Source, load_comparisons, load_demonstrations, load_prompts, load_ranked_groups, read_records,
};
use proptest::prelude::*;
use std::io::Write;
use std::path::Path;

fn cases() -> u32 {
    fuzz::cases(64)
}

fn hostile() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"1000000000000".to_vec()),
        Just(b"18446744073709551615".to_vec()),
        Just(b"99999999999999999999999999999999999".to_vec()),
        Just(b"-1".to_vec()),
        Just(b"1e999".to_vec()),
        Just(b"NaN".to_vec()),
        Just("[".repeat(5000).into_bytes()),
        Just("{\"a\":".repeat(2000).into_bytes()),
        Just(b"\"".to_vec()),
        Just(b",".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\0".to_vec()),
        Just(b"\xEF\xBB\xBF".to_vec()),
        Just(vec![0xff, 0xfe, 0xc0]),
        Just("\u{202e}\u{4e2d}".as_bytes().to_vec()),
        proptest::collection::vec(any::<u8>(), 0..12),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    fuzz::edit(hostile())
}

/// Every reader and typed loader on `path`; errors are fine, a panic fails the test.
fn read_everything(path: &Path) {
    let _ = read_records(path, None);
    let src = Source::new(path);
    let _ = load_demonstrations(&src);
    let _ = load_prompts(&src);
    let _ = load_comparisons(&src);
    let _ = load_ranked_groups(&src);
}

const JSONL: &str = concat!(
    r#"{"prompt": "What is 2+2?", "response": "4", "answer": 4, "chosen": "4", "rejected": "5", "margin": 1.5, "tie": false, "prompt_id": "p1", "labeler_id": "l1", "response_ids": ["a", "b"], "responses": ["4", "5"], "ranks": [1, 2]}"#,
    "\n",
    r#"{"prompt": "名字?", "response": "x", "answer": "x", "chosen": "x", "rejected": "", "tie": "true", "prompt_id": "p2", "responses": ["x", "y", "z"], "response_ids": ["a", "b", "c"], "ranks": [2, 1, 2]}"#,
    "\n"
);

const CSV: &str = "prompt,response,answer,chosen,rejected,margin,tie,prompt_id\n\
\"What is 2+2?\",\"4, of course\",4,4,5,1.5,0,p1\n\
\"Say \"\"hi\"\"\",hi,hi,hi,,,true,p2\r\n";

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A valid Parquet file with the columns every record type reads.
fn parquet_bytes() -> Vec<u8> {
    use polars::prelude::*;
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("f.parquet");
    let mut df = DataFrame::new(
        2,
        vec![
            Column::new("prompt".into(), ["What is 2+2?", "名字?"]),
            Column::new("response".into(), ["4", "x"]),
            Column::new("chosen".into(), ["4", "x"]),
            Column::new("rejected".into(), ["5", ""]),
            Column::new("answer".into(), ["4", "x"]),
            Column::new("margin".into(), [1.5f64, 0.0]),
            Column::new("tie".into(), [false, true]),
            Column::new("prompt_id".into(), ["p1", "p2"]),
        ],
    )
    .unwrap();
    let f = std::fs::File::create(&p).unwrap();
    ParquetWriter::new(f).finish(&mut df).unwrap();
    std::fs::read(&p).unwrap()
}

fn seed(name: &str) -> Vec<u8> {
    match name {
        "f.jsonl" => JSONL.as_bytes().to_vec(),
        "f.csv" => CSV.as_bytes().to_vec(),
        "f.jsonl.gz" => gzip(JSONL.as_bytes()),
        "f.parquet" => parquet_bytes(),
        _ => unreachable!(),
    }
}

fn file_name() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("f.jsonl"),
        Just("f.csv"),
        Just("f.jsonl.gz"),
        Just("f.parquet")
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    /// Mutations of a valid file of each format.
    #[test]
    fn mutated_files_read_or_fail(name in file_name(), edits in proptest::collection::vec(edit(), 1..4)) {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join(name);
        std::fs::write(&p, apply(seed(name), &edits)).unwrap();
        read_everything(&p);
    }

    /// Random bytes under each format's name.
    #[test]
    fn random_bytes_read_or_fail(name in file_name(), bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join(name);
        std::fs::write(&p, &bytes).unwrap();
        read_everything(&p);
    }

    /// A valid gzip stream of mutated JSONL (the decompressed text is hostile, not the stream).
    #[test]
    fn gzip_of_mutated_jsonl_reads_or_fails(edits in proptest::collection::vec(edit(), 1..4)) {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f.jsonl.gz");
        std::fs::write(&p, gzip(&apply(JSONL.as_bytes().to_vec(), &edits))).unwrap();
        read_everything(&p);
    }
}

/// A valid file reads back whole (the fuzzed seeds are themselves readable, so mutations start
/// from files the readers accept).
#[test]
fn the_seeds_read() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["f.jsonl", "f.csv", "f.jsonl.gz", "f.parquet"] {
        let p = tmp.path().join(name);
        std::fs::write(&p, seed(name)).unwrap();
        assert_eq!(read_records(&p, None).unwrap().len(), 2, "{name}");
        assert_eq!(
            load_demonstrations(&Source::new(&p)).unwrap().len(),
            2,
            "{name}"
        );
    }
}

/// Minimised crasher (FUZZ_CASES=2000): one byte of the Parquet seed set to 147 made polars'
/// thrift metadata decoder panic (`Option::unwrap()` on `None`). It is one clear error now.
#[test]
fn a_parquet_file_with_damaged_metadata_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("f.parquet");
    std::fs::write(
        &p,
        apply(seed("f.parquet"), &[Edit::Set(15056653132256300508, 147)]),
    )
    .unwrap();
    let e = read_records(&p, None).unwrap_err().to_string();
    assert!(
        e.contains("f.parquet") && e.contains("invalid Parquet"),
        "{e}"
    );
}
