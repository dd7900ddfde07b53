//! Helpers shared by the `labeling simulate` tests (the demo's and the task families').

use std::path::Path;

/// A JSON Lines file's values.
pub fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A line's string field `k`.
pub fn field<'a>(v: &'a serde_json::Value, k: &str) -> &'a str {
    v[k].as_str()
        .unwrap_or_else(|| panic!("no string `{k}` in {v}"))
}
