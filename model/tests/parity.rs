//! Parity with Hugging Face transformers on tiny random models of each supported architecture
//! (fixtures written by `scripts/make_parity_fixtures.py`), and the invariants generation and
//! padding rely on.

use model::ops::to_f32_vec;
use model::{CausalLm, KvCache, SamplingConfig, TokenBatch, generate, load, parse_device, save};
use serde_json::Value;
use std::path::Path;

#[path = "common/fixtures.rs"]
mod fixtures;
use fixtures::{fixture, reference_batch, rows_u32};

const CAUSAL: &[&str] = &[
    "llama_gqa_untied",
    "llama_tied_llama3_bf16",
    "qwen2_bias_sharded",
    "mistral",
    "gpt2",
];

fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load_fixture(name: &str) -> CausalLm {
    let device = parse_device("cpu").unwrap();
    load(&fixture(name), &device)
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
        .model
}

/// Max |ours - reference| over the real positions of the reference batch.
fn max_logit_diff(model: &CausalLm, r: &Value) -> f32 {
    let batch = reference_batch(r);
    let logits = to_f32_vec(model.logits(model.forward(&batch)).unwrap());
    let v = model.config().vocab_size;
    let want = &r["logits"];
    let mut worst = 0f32;
    for b in 0..batch.batch {
        for t in 0..batch.seq {
            if !batch.mask[b * batch.seq + t] {
                continue;
            }
            for k in 0..v {
                let w = want[b][t][k].as_f64().unwrap() as f32;
                let got = logits[(b * batch.seq + t) * v + k];
                worst = worst.max((got - w).abs());
            }
        }
    }
    worst
}

fn greedy(max_new_tokens: usize) -> SamplingConfig {
    SamplingConfig {
        max_new_tokens,
        temperature: 0.0,
        ..Default::default()
    }
}

#[test]
fn logits_match_transformers_within_1e4() {
    for name in CAUSAL {
        let model = load_fixture(name);
        let diff = max_logit_diff(&model, &reference(name));
        assert!(diff < 1e-4, "{name}: max |logit diff| {diff:e}");
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    for name in CAUSAL {
        let model = load_fixture(name);
        let r = reference(name);
        let batch = reference_batch(&r);
        let prompts: Vec<Vec<u32>> = (0..batch.batch)
            .map(|b| {
                batch
                    .row(b)
                    .iter()
                    .zip(batch.row_mask(b))
                    .filter(|(_, m)| **m)
                    .map(|(t, _)| *t)
                    .collect()
            })
            .collect();
        let want = rows_u32(&r["greedy"]);
        // One row at a time and both rows left-padded together give the reference tokens.
        for (p, w) in prompts.iter().zip(&want) {
            let g = generate(&model, std::slice::from_ref(p), &greedy(w.len())).unwrap();
            assert_eq!(&g.tokens[0], w, "{name}: single-row greedy");
        }
        let g = generate(&model, &prompts, &greedy(want[0].len())).unwrap();
        assert_eq!(g.tokens, want, "{name}: batched left-padded greedy");
    }
}

#[test]
fn scalar_head_matches_sequence_classifier() {
    let model = load_fixture("llama_score");
    assert!(model.has_scalar_head());
    let r = reference("llama_score");
    let batch = reference_batch(&r);
    let got = to_f32_vec(model.scalar_last(&batch, model.forward(&batch)).unwrap());
    for (g, w) in got.iter().zip(r["scores"].as_array().unwrap()) {
        let w = w.as_f64().unwrap() as f32;
        assert!((g - w).abs() < 1e-4, "score {g} vs transformers {w}");
    }
}

#[test]
fn save_then_reload_is_identical() {
    let device = parse_device("cpu").unwrap();
    for name in CAUSAL.iter().chain(&["llama_score"]) {
        let model = load_fixture(name);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("saved");
        save(&model, None, &out).unwrap();
        let again = load(&out, &device).unwrap().model;
        assert_eq!(
            model.hf_tensors(),
            again.hf_tensors(),
            "{name}: tensors differ"
        );
        let batch = reference_batch(&reference(name));
        let a = to_f32_vec(model.forward(&batch));
        let b = to_f32_vec(again.forward(&batch));
        assert_eq!(a, b, "{name}: hidden states differ after reload");
        // Sharded input becomes one file; nothing half-written is left beside it.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["saved".to_string()], "{name}");
    }
}

/// Runs scripts/check_hf_load.py on what we save, when RLHF_PYTHON names a Python with torch and
/// transformers (CI sets it); otherwise says that it is skipped.
#[test]
fn transformers_loads_what_we_save() {
    let Ok(python) = std::env::var("RLHF_PYTHON") else {
        eprintln!(
            "skipped: set RLHF_PYTHON to a python with torch + transformers to run this check"
        );
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for name in CAUSAL.iter().chain(&["llama_score"]) {
        let model = load_fixture(name);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join(name);
        save(&model, None, &out).unwrap();
        let status = std::process::Command::new(&python)
            .arg(root.join("scripts/check_hf_load.py"))
            .arg(&out)
            .arg(fixture(name).join("reference.json"))
            .status()
            .expect("running python");
        assert!(
            status.success(),
            "{name}: transformers disagrees with what we saved"
        );
    }
}

#[test]
fn kv_cache_generation_equals_full_recompute() {
    for name in ["llama_gqa_untied", "gpt2"] {
        let model = load_fixture(name);
        let batch = reference_batch(&reference(name));
        let prompts: Vec<Vec<u32>> = (0..batch.batch)
            .map(|b| {
                batch
                    .row(b)
                    .iter()
                    .zip(batch.row_mask(b))
                    .filter(|(_, m)| **m)
                    .map(|(t, _)| *t)
                    .collect()
            })
            .collect();
        let n = 12;
        let cached = generate(&model, &prompts, &greedy(n)).unwrap();
        // Full recomputation: re-run the whole left-padded sequence for every new token.
        let v = model.config().vocab_size;
        let mut seqs = prompts.clone();
        for _ in 0..n {
            let b = TokenBatch::left_padded(&seqs, 0);
            let logits = to_f32_vec(model.logits(model.forward(&b)).unwrap());
            for (r, s) in seqs.iter_mut().enumerate() {
                let last = &logits[((r + 1) * b.seq - 1) * v..((r + 1) * b.seq) * v];
                let best = (0..v).fold(0, |a, k| if last[k] > last[a] { k } else { a });
                s.push(best as u32);
            }
        }
        let full: Vec<Vec<u32>> = seqs
            .iter()
            .zip(&prompts)
            .map(|(s, p)| s[p.len()..].to_vec())
            .collect();
        assert_eq!(cached.tokens, full, "{name}");
    }
}

#[test]
fn kv_cache_that_grows_gives_the_full_forward() {
    // Token-by-token decoding through a cache with no room asked for (appends by concatenation)
    // and one with too little room (written in place, regrown once), against one full forward.
    let model = load_fixture("llama_gqa_untied");
    let tokens = vec![7u32, 3, 55, 21, 9, 14, 2, 40];
    let d = model.config().hidden_size;
    let full = to_f32_vec(model.forward(&TokenBatch::dense(tokens.clone(), 1, tokens.len())));
    for capacity in [0, 4] {
        let mut cache = KvCache::with_capacity(model.config().num_layers, 1, capacity);
        let prompt = 3;
        let mut got = to_f32_vec(model.forward_cached(
            &TokenBatch::dense(tokens[..prompt].to_vec(), 1, prompt),
            &mut cache,
        ));
        for &t in &tokens[prompt..] {
            got.extend(to_f32_vec(
                model.forward_cached(&TokenBatch::dense(vec![t], 1, 1), &mut cache),
            ));
        }
        assert_eq!(cache.len(), tokens.len());
        for (i, (x, y)) in got.iter().zip(&full).enumerate() {
            assert!(
                (x - y).abs() < 1e-5,
                "capacity {capacity}: hidden differs at position {}, dim {}: {x} vs {y}",
                i / d,
                i % d
            );
        }
    }
}

#[test]
fn left_padding_does_not_change_logits_or_scalar_value() {
    for name in ["llama_gqa_untied", "gpt2", "llama_score"] {
        let model = load_fixture(name);
        let row = vec![7u32, 3, 55, 21, 9];
        let alone = TokenBatch::left_padded(std::slice::from_ref(&row), 0);
        let padded = TokenBatch::left_padded(&[row.clone(), vec![1; 9]], 0);
        let h_alone = model.forward(&alone);
        let h_pad = model.forward(&padded);
        let d = model.config().hidden_size;
        let a = to_f32_vec(h_alone.clone());
        let p = to_f32_vec(h_pad.clone());
        // Row 0 of the padded batch has 4 pads first.
        for t in 0..row.len() {
            for k in 0..d {
                let x = a[t * d + k];
                let y = p[(4 + t) * d + k];
                assert!(
                    (x - y).abs() < 1e-5,
                    "{name}: hidden differs at {t},{k}: {x} vs {y}"
                );
            }
        }
        if model.has_scalar_head() {
            let va = to_f32_vec(model.scalar_last(&alone, h_alone).unwrap())[0];
            let vp = to_f32_vec(model.scalar_last(&padded, h_pad).unwrap())[0];
            assert!((va - vp).abs() < 1e-5, "{name}: value {va} vs {vp}");
        }
    }
}

#[test]
fn sampling_is_seeded_and_stops_rows_at_eos() {
    let model = load_fixture("llama_gqa_untied");
    let prompts = vec![vec![5u32, 17, 33], vec![44, 3]];
    let cfg = SamplingConfig {
        max_new_tokens: 16,
        temperature: 1.0,
        top_k: 20,
        top_p: 0.9,
        seed: 11,
        ..Default::default()
    };
    let a = generate(&model, &prompts, &cfg).unwrap();
    let b = generate(&model, &prompts, &cfg).unwrap();
    assert_eq!(a, b, "same seed, same samples");
    let c = generate(
        &model,
        &prompts,
        &SamplingConfig {
            seed: 12,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert_ne!(a.tokens, c.tokens, "another seed, other samples");
    // Make the 3rd sampled token of row 0 the EOS: that row stops there, the other goes on.
    let eos = a.tokens[0][2];
    let stop = SamplingConfig {
        eos_token_ids: vec![eos],
        pad_token_id: 0,
        ..cfg
    };
    let s = generate(&model, &prompts, &stop).unwrap();
    let first_eos = s.tokens[0].iter().position(|&t| t == eos).unwrap();
    assert!(first_eos <= 2);
    assert!(s.mask[0][..=first_eos].iter().all(|&m| m));
    assert!(s.mask[0][first_eos + 1..].iter().all(|&m| !m));
    assert!(s.tokens[0][first_eos + 1..].iter().all(|&t| t == 0));
    assert!(s.logprobs[0][first_eos + 1..].iter().all(|&l| l == 0.0));
    // Log-probs are real log-probabilities of the sampled tokens.
    for (l, m) in s.logprobs.iter().flatten().zip(s.mask.iter().flatten()) {
        if *m {
            assert!(*l <= 0.0 && *l > -20.0, "logprob {l}");
        }
    }
    assert_eq!(s.tokens[0].len(), s.tokens[1].len());
}

#[test]
fn heads_are_explicit_and_missing_ones_are_errors() {
    let device = parse_device("cpu").unwrap();
    // A sequence classifier loads with its scalar head and no LM head.
    let rm = load_fixture("llama_score");
    assert_eq!(rm.heads(), model::Heads::SCALAR);
    let batch = TokenBatch::dense(vec![3, 4, 5], 1, 3);
    let e = rm.logits(rm.forward(&batch)).unwrap_err().to_string();
    assert!(e.contains("has no LM head"), "{e}");
    assert!(!rm.hf_tensors().iter().any(|t| t.0 == "lm_head.weight"));
    // Asking a reward model for an LM head, or a causal LM for a scalar head, names the folder.
    let e = model::load_with(&fixture("llama_score"), Some(model::Heads::LM), &device)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("llama_score") && e.contains("reward or value model"),
        "{e}"
    );
    let e = model::load_with(&fixture("gpt2"), Some(model::Heads::SCALAR), &device)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("gpt2") && e.contains("scalar head"), "{e}");
    // scalar() on a causal LM is an error, not a panic.
    let lm = load_fixture("gpt2");
    assert!(lm.scalar(lm.forward(&batch)).is_err());
    // A trunk with a fresh scalar head and no LM head: what a new reward model starts as.
    let trunk = model::load_with(&fixture("gpt2"), Some(model::Heads::NONE), &device)
        .unwrap()
        .model
        .with_scalar_head(1);
    assert_eq!(trunk.heads(), model::Heads::SCALAR);
    assert!(trunk.scalar_last(&batch, trunk.forward(&batch)).is_ok());
}
