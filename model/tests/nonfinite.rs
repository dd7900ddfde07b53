//! Regression tests of issue 29: a model folder whose weights hold a NaN or an infinity is
//! refused where the weights are read, with an error naming the tensor and the file, instead of
//! loading and training into a run of NaN losses.

mod common;

use common::{run, tiny_model_folder};
use std::path::Path;

/// Writes `value` over element `index` of tensor `name` in `dir/model.safetensors` (f32, as our
/// folders are saved).
fn poison(dir: &Path, name: &str, index: usize, value: f32) {
    let p = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let info = &header[name];
    assert_eq!(info["dtype"], "F32", "{info}");
    let start = 8 + header_len + info["data_offsets"][0].as_u64().unwrap() as usize + 4 * index;
    bytes[start..start + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
}

/// Loading fails on the first non-finite value, naming tensor, file, value and position.
#[test]
fn a_nan_in_the_weights_is_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    tiny_model_folder(&dir);
    let device = model::parse_device("cpu").unwrap();
    assert!(model::checkpoint::load(&dir, &device).is_ok());

    let name = "model.layers.1.mlp.down_proj.weight";
    poison(&dir, name, 7, f32::NAN);
    let e = model::checkpoint::load(&dir, &device)
        .err()
        .expect("a NaN weight must be refused")
        .to_string();
    assert_eq!(
        e,
        format!(
            "{}: tensor `{name}` holds NaN (its value 7, counting from 0, and 1 non-finite in all): the weights are corrupt (a diverged run can save NaN); load an earlier checkpoint of the run, or the model it started from",
            dir.join("model.safetensors").display()
        )
    );

    // An infinity too, and the count covers every non-finite value of the tensor.
    tiny_model_folder(&dir);
    poison(&dir, "model.embed_tokens.weight", 3, f32::NEG_INFINITY);
    poison(&dir, "model.embed_tokens.weight", 40, f32::INFINITY);
    let e = model::checkpoint::load(&dir, &device)
        .err()
        .expect("an infinite weight must be refused")
        .to_string();
    assert!(
        e.contains("tensor `model.embed_tokens.weight` holds -inf (its value 3, counting from 0, and 2 non-finite in all)"),
        "{e}"
    );
}

/// The same through the `model` binary: `generate` on a poisoned folder exits 1 with the one
/// error, and prints no completion.
#[test]
fn model_generate_on_a_nan_weight_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    tiny_model_folder(&dir);
    poison(&dir, "model.norm.weight", 0, f32::NAN);
    let (code, stdout, err) = run(&[
        "generate",
        dir.to_str().unwrap(),
        "--prompt",
        "say hello.",
        "--max-new-tokens",
        "4",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        err.contains("model.safetensors: tensor `model.norm.weight` holds NaN")
            && !err.contains("panicked"),
        "{err}"
    );
}
