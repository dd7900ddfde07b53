//! What the tests on the HF fixtures share (`#[path]`-included by parity.rs, lora.rs, dtype.rs and
//! chat_merge.rs): the fixture folders, their reference batch, and logits compared over its real
//! positions. Not every test uses every function.
#![allow(dead_code)]

use burn::tensor::{Device, Int, Tensor, TensorData};
use model::ops::to_f32_vec;
use model::{CausalLm, TokenBatch};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// `model/tests/fixtures/NAME`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A JSON list of lists of token ids.
pub fn rows_u32(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

/// A reference.json's padded input batch (`input_ids`, `attention_mask`).
pub fn reference_batch(r: &Value) -> TokenBatch {
    let ids = rows_u32(&r["input_ids"]);
    let mask = rows_u32(&r["attention_mask"]);
    TokenBatch {
        batch: ids.len(),
        seq: ids[0].len(),
        tokens: ids.concat(),
        mask: mask.concat().iter().map(|&m| m == 1).collect(),
    }
}

/// LM logits of the batch, [b · t · v] flat.
pub fn logits(model: &CausalLm, batch: &TokenBatch) -> Vec<f32> {
    to_f32_vec(model.logits(model.forward(batch)).unwrap())
}

/// Max |a - b| over the batch's real positions (`v` logits each).
pub fn max_real_diff(a: &[f32], b: &[f32], batch: &TokenBatch, v: usize) -> f32 {
    let mut worst = 0f32;
    for (p, &real) in batch.mask.iter().enumerate() {
        if real {
            for k in 0..v {
                worst = worst.max((a[p * v + k] - b[p * v + k]).abs());
            }
        }
    }
    worst
}

/// Next-token targets of `batch` ([b, t]: each position's following token, 0 after the last),
/// for the tests that train a few steps of next-token loss.
pub fn next_tokens(batch: &TokenBatch, device: &Device) -> Tensor<2, Int> {
    let (b, t) = (batch.batch, batch.seq);
    let targets: Vec<i64> = (0..b * t)
        .map(|p| {
            if p % t + 1 < t {
                batch.tokens[p + 1] as i64
            } else {
                0
            }
        })
        .collect();
    Tensor::from_data(TensorData::new(targets, [b, t]), device)
}
