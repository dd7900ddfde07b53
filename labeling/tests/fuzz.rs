//! Fuzzing (issue 29) of the labeler-rankings CSV importer (`labeling import`, long and wide
//! formats, one file or several): on mutations of valid sheets (truncation, byte flips, huge
//! ranks and response numbers, broken quotes, BOMs, NULs) and on hostile headers, the import
//! returns its groups and statistics or errors: no panic, no unbounded allocation (this binary's
//! allocator refuses any one allocation over 1 GiB, which aborts the test), and it finishes.
//! (`tests/import.rs` feeds it random bytes.)
//!
//! Cases per property: 64 by default; `FUZZ_CASES=N` raises it for a long run.

#[path = "../../tests/common/fuzz.rs"]
mod fuzz;
use fuzz::{Edit, apply};

use labeling::{Aggregate, ImportOptions, import};
use proptest::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn cases() -> u32 {
    fuzz::cases(64)
}

fn hostile() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"4294967296".to_vec()),
        Just(b"18446744073709551615".to_vec()),
        Just(b"99999999999999999999999999999".to_vec()),
        Just(b"0".to_vec()),
        Just(b"-1".to_vec()),
        Just(b"1e9".to_vec()),
        Just(b">".to_vec()),
        Just(b"=".to_vec()),
        Just(b"1>1".to_vec()),
        Just(b"\"".to_vec()),
        Just(b",".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\0".to_vec()),
        Just(b"\xEF\xBB\xBF".to_vec()),
        Just(vec![0xff, 0xfe]),
        Just("\u{202e}\u{4e2d}".as_bytes().to_vec()),
        Just(",response_4294967296".as_bytes().to_vec()),
        Just(",response_0".as_bytes().to_vec()),
        proptest::collection::vec(any::<u8>(), 0..12),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    fuzz::edit(hostile())
}

const LONG: &str = "prompt_id,prompt,response_id,response,labeler_id,rank\n\
p1,\"What is 2+2?\",a,4,l1,1\np1,\"What is 2+2?\",b,5,l1,2\np1,\"What is 2+2?\",c,\"4, yes\",l1,2\n\
p1,\"What is 2+2?\",a,4,l2,2\np1,\"What is 2+2?\",b,5,l2,1\np1,\"What is 2+2?\",c,\"4, yes\",l2,3\n\
p2,名字?,a,x,l1,1\r\np2,名字?,b,,l1,2\n";

const WIDE: &str = "prompt_id,prompt,labeler_id,response_1,response_2,response_3,ranking\n\
p1,\"What is 2+2?\",l1,4,5,\"4, yes\",1>3>2\np1,\"What is 2+2?\",l2,4,5,\"4, yes\",1=3>2\n\
p2,名字?,l1,x,y,,2>1\n";

/// Imports `files` in both formats (and the sniffed one) with each aggregation.
fn import_everything(files: &[PathBuf], out: &Path) {
    for format in [
        None,
        Some(datasets::preference::rankings::CsvFormat::Long),
        Some(datasets::preference::rankings::CsvFormat::Wide),
    ] {
        for (aggregate, keep_ties) in [(Aggregate::None, false), (Aggregate::Majority, true)] {
            let o = ImportOptions {
                inputs: files.to_vec(),
                out: out.to_path_buf(),
                format,
                aggregate,
                keep_ties,
                renames: HashMap::new(),
            };
            let _ = import(&o);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    /// Mutations of a valid long or wide sheet, alone and beside the other (untouched) one.
    #[test]
    fn mutated_sheets_import_or_fail(wide in any::<bool>(), edits in proptest::collection::vec(edit(), 1..4)) {
        let tmp = tempfile::tempdir().unwrap();
        let (seed, other) = if wide { (WIDE, LONG) } else { (LONG, WIDE) };
        let p = tmp.path().join("ranked.csv");
        std::fs::write(&p, apply(seed.as_bytes().to_vec(), &edits)).unwrap();
        let q = tmp.path().join("other.csv");
        std::fs::write(&q, other).unwrap();
        import_everything(std::slice::from_ref(&p), &tmp.path().join("out"));
        import_everything(&[q, p], &tmp.path().join("out"));
    }

    /// Wide sheets whose headers and rankings name any response numbers.
    #[test]
    fn wide_sheets_with_any_response_numbers_import_or_fail(
        numbers in proptest::collection::vec(prop_oneof![0usize..6, Just(usize::MAX), Just(1 << 32), Just(1_000_000_000)], 1..5),
        ranking in "[0-9>=]{0,12}",
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let header: Vec<String> = numbers.iter().map(|n| format!("response_{n}")).collect();
        let cells = vec!["x"; numbers.len()].join(",");
        let text = format!(
            "prompt_id,prompt,labeler_id,{},ranking\np1,Q,l1,{cells},{ranking}\n",
            header.join(",")
        );
        let p = tmp.path().join("wide.csv");
        std::fs::write(&p, text).unwrap();
        import_everything(&[p], &tmp.path().join("out"));
    }

    /// Long sheets with any ranks.
    #[test]
    fn long_sheets_with_any_ranks_import_or_fail(ranks in proptest::collection::vec(".{0,22}", 2..5)) {
        let tmp = tempfile::tempdir().unwrap();
        let mut text = String::from("prompt_id,prompt,response_id,response,labeler_id,rank\n");
        for (i, r) in ranks.iter().enumerate() {
            let r = r.replace(['"', '\n', '\r', ','], "");
            text.push_str(&format!("p1,Q,r{i},x{i},l1,{r}\n"));
        }
        let p = tmp.path().join("long.csv");
        std::fs::write(&p, text).unwrap();
        import_everything(&[p], &tmp.path().join("out"));
    }
}

/// The seeds import as they are (so the mutations start from sheets the importer accepts).
#[test]
fn the_seed_sheets_import() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, text, groups) in [("long.csv", LONG, 3), ("wide.csv", WIDE, 3)] {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        let o = ImportOptions {
            inputs: vec![p],
            out: tmp.path().join("out"),
            format: None,
            aggregate: Aggregate::None,
            keep_ties: false,
            renames: HashMap::new(),
        };
        assert_eq!(import(&o).unwrap().groups.len(), groups, "{name}");
    }
}
