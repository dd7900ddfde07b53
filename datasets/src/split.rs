//! Deterministic train / validation split by prompt, exact-duplicate removal and length filtering,
//! each reporting what it did.

use std::collections::HashSet;
use std::hash::Hash;

/// FNV-1a of `seed` and `key`: stable across runs, platforms and Rust versions.
fn stable_hash(seed: u64, key: &str) -> u64 {
    let mut h = 0xcbf29ce484222325u64 ^ seed.wrapping_mul(0x9E3779B97F4A7C15);
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    // Final mix so that nearby keys spread over [0, 1).
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^ (h >> 33)
}

/// Splits `items` into (train, validation) by their prompt: a prompt goes wholly to one side, with
/// probability `validation_fraction` to validation, decided by `seed` alone.
pub fn split_by_prompt<T: Clone>(
    items: &[T],
    prompt: impl Fn(&T) -> &str,
    validation_fraction: f64,
    seed: u64,
) -> (Vec<T>, Vec<T>) {
    let mut train = Vec::new();
    let mut valid = Vec::new();
    for it in items {
        let u = (stable_hash(seed, prompt(it)) >> 11) as f64 / (1u64 << 53) as f64;
        if u < validation_fraction {
            valid.push(it.clone());
        } else {
            train.push(it.clone());
        }
    }
    (train, valid)
}

/// Removes exact duplicates, keeping the first; returns (kept, number removed).
pub fn dedup<T: Clone + Eq + Hash>(items: &[T]) -> (Vec<T>, usize) {
    let mut seen = HashSet::new();
    let kept: Vec<T> = items.iter().filter(|x| seen.insert(*x)).cloned().collect();
    let removed = items.len() - kept.len();
    (kept, removed)
}

/// Keeps the items whose length (by `len`) is within [min, max]; returns (kept, too short, too long).
pub fn filter_length<T: Clone>(
    items: &[T],
    len: impl Fn(&T) -> usize,
    min: usize,
    max: usize,
) -> (Vec<T>, usize, usize) {
    let (mut short, mut long) = (0, 0);
    let kept = items
        .iter()
        .filter(|x| {
            let n = len(x);
            if n < min {
                short += 1;
                false
            } else if n > max {
                long += 1;
                false
            } else {
                true
            }
        })
        .cloned()
        .collect();
    (kept, short, long)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_deterministic_disjoint_by_prompt_and_near_the_fraction() {
        let items: Vec<(String, usize)> = (0..4000)
            .map(|i| (format!("prompt {}", i / 2), i))
            .collect();
        let (t1, v1) = split_by_prompt(&items, |x| &x.0, 0.1, 7);
        let (t2, v2) = split_by_prompt(&items, |x| &x.0, 0.1, 7);
        assert_eq!((t1.clone(), v1.clone()), (t2, v2));
        let tp: HashSet<&str> = t1.iter().map(|x| x.0.as_str()).collect();
        assert!(
            v1.iter().all(|x| !tp.contains(x.0.as_str())),
            "a prompt on both sides"
        );
        let frac = v1.len() as f64 / items.len() as f64;
        assert!((frac - 0.1).abs() < 0.02, "validation fraction {frac}");
        let (_, v3) = split_by_prompt(&items, |x| &x.0, 0.1, 8);
        assert_ne!(v1, v3, "another seed, another split");
    }

    #[test]
    fn dedup_and_length_filter_count_what_they_drop() {
        let items = vec!["a", "bb", "a", "cccc", "bb", "dddddd"];
        let (kept, removed) = dedup(&items);
        assert_eq!(kept, vec!["a", "bb", "cccc", "dddddd"]);
        assert_eq!(removed, 2);
        let (kept, short, long) = filter_length(&kept, |s| s.len(), 2, 4);
        assert_eq!(kept, vec!["bb", "cccc"]);
        assert_eq!((short, long), (1, 1));
    }
}
