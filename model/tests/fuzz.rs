//! Fuzzing (issue 29) of what a model folder's reader takes from users: the safetensors header
//! (`SafetensorsFiles::open`, `weights::tensor_shapes`), `config.json`, the shard index and
//! `rlhf.json`. On any bytes, and on mutations of the fixtures (truncation, byte flips, huge
//! numbers, deep nesting, huge declared shapes and offsets), loading returns Ok or an error: it
//! never panics, never asks for an unbounded allocation (this binary's allocator refuses any
//! single allocation over 1 GiB, which aborts the test) and finishes.
//!
//! Cases per property: 48 by default (the whole file runs in a few seconds in release);
//! `FUZZ_CASES=N` raises it for a long run.

#[path = "../../tests/common/fuzz.rs"]
mod fuzz;
use fuzz::{Edit, apply};

use model::checkpoint::{META_FILE, ModelMeta};
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn cases() -> u32 {
    fuzz::cases(48)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn hostile() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"1000000000000".to_vec()),
        Just(b"18446744073709551615".to_vec()),
        Just(b"99999999999999999999999999999".to_vec()),
        Just(b"-1".to_vec()),
        Just(b"1e999".to_vec()),
        Just(b"NaN".to_vec()),
        Just("[".repeat(5000).into_bytes()),
        Just("{\"a\":".repeat(2000).into_bytes()),
        Just(b"\"".to_vec()),
        Just(b"\0".to_vec()),
        Just(vec![0xff, 0xfe, 0xc0]),
        proptest::collection::vec(any::<u8>(), 0..12),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    fuzz::edit(hostile())
}

/// A copy of the fixture folder `name` in a new temporary folder.
fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    (tmp, dir)
}

/// Everything a stage does with a model folder it is given: the headers, then the whole load.
/// Errors are fine; a panic or an abort fails the test.
fn load_everything(dir: &Path) {
    let _ = model::weights::tensor_shapes(dir);
    let _ = ModelMeta::read(dir);
    let _ = model::checkpoint::declared_heads(dir);
    let device = model::parse_device("cpu").unwrap();
    if let Ok(loaded) = model::checkpoint::load(dir, &device) {
        // What loaded is usable: its parameters are all finite (the NaN check).
        for (name, _, values) in loaded.model.hf_tensors() {
            assert!(values.iter().all(|x| x.is_finite()), "{name}");
        }
    }
}

/// A safetensors file with the given header JSON and `data` bytes after it.
fn safetensors_bytes(header: &str, declared_len: Option<u64>, data: &[u8]) -> Vec<u8> {
    let n = declared_len.unwrap_or(header.len() as u64);
    let mut out = n.to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn dim() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..80,
        Just(1_000_000_000_000),
        Just(u64::MAX),
        Just(1 << 32),
        Just(4_294_967_297),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    /// Mutations of a whole safetensors file (header and data) of a real model folder.
    #[test]
    fn mutated_safetensors_files_load_or_fail(edits in proptest::collection::vec(edit(), 1..4)) {
        let (_tmp, dir) = copy_fixture("mistral");
        let p = dir.join("model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        // Edits anywhere land mostly in the data; the odd ones are aimed at the 8-byte length
        // and the JSON header (its first ~4 KB).
        let edits: Vec<Edit> = edits
            .into_iter()
            .enumerate()
            .map(|(k, e)| match e {
                Edit::Set(i, b) if k % 2 == 1 => Edit::Set(i % 4096, b),
                Edit::Insert(i, s) if k % 2 == 1 => Edit::Insert(i % 4096, s),
                e => e,
            })
            .collect();
        std::fs::write(&p, apply(bytes, &edits)).unwrap();
        load_everything(&dir);
    }

    /// Headers that declare anything: huge shapes, offsets past the end, wrong dtypes, a
    /// declared header length that is not the header's.
    #[test]
    fn hostile_safetensors_headers_are_refused(
        shape in proptest::collection::vec(dim(), 0..4),
        offsets in (dim(), dim()),
        dtype in prop_oneof![Just("F32"), Just("BF16"), Just("F16"), Just("I64"), Just("Q4"), Just("")],
        declared in prop_oneof![Just(None), Just(Some(0u64)), Just(Some(u64::MAX)), Just(Some(7)), (0u64..2000).prop_map(Some)],
        data_len in 0usize..256,
    ) {
        let (_tmp, dir) = copy_fixture("mistral");
        let shape: Vec<String> = shape.iter().map(u64::to_string).collect();
        let header = format!(
            r#"{{"model.embed_tokens.weight":{{"dtype":"{dtype}","shape":[{}],"data_offsets":[{},{}]}}}}"#,
            shape.join(","),
            offsets.0,
            offsets.1
        );
        std::fs::write(
            dir.join("model.safetensors"),
            safetensors_bytes(&header, declared, &vec![0u8; data_len]),
        )
        .unwrap();
        load_everything(&dir);
    }

    /// Random bytes as model.safetensors.
    #[test]
    fn random_bytes_as_safetensors_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let (_tmp, dir) = copy_fixture("mistral");
        std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
        load_everything(&dir);
    }

    /// A config.json key set to a hostile value (zero, negative, huge, wrong type, nested).
    #[test]
    fn hostile_config_values_load_or_fail(
        fixture_name in prop_oneof![Just("mistral"), Just("gpt2"), Just("llama_score")],
        key in prop_oneof![
            Just("hidden_size"), Just("n_embd"), Just("intermediate_size"), Just("n_inner"),
            Just("num_hidden_layers"), Just("n_layer"), Just("num_attention_heads"), Just("n_head"),
            Just("num_key_value_heads"), Just("head_dim"), Just("vocab_size"),
            Just("max_position_embeddings"), Just("n_positions"), Just("rms_norm_eps"),
            Just("layer_norm_epsilon"), Just("rope_theta"), Just("rope_parameters"), Just("rope_scaling"),
            Just("model_type"), Just("hidden_act"), Just("activation_function"), Just("tie_word_embeddings"),
            Just("eos_token_id"), Just("bos_token_id"), Just("pad_token_id"), Just("architectures"),
            Just("num_labels"), Just("torch_dtype"),
        ],
        value in prop_oneof![
            Just(serde_json::json!(0)), Just(serde_json::json!(-1)), Just(serde_json::json!(1)),
            Just(serde_json::json!(3)), Just(serde_json::json!(1_000_000_000_000u64)),
            Just(serde_json::json!(u64::MAX)), Just(serde_json::json!(1e300)),
            Just(serde_json::json!(-1e300)), Just(serde_json::json!(0.5)), Just(serde_json::json!("x")),
            Just(serde_json::json!(null)), Just(serde_json::json!([])), Just(serde_json::json!({})),
            Just(serde_json::json!([1, 2])), Just(serde_json::json!(true)),
            Just(serde_json::json!({"rope_type": "llama3", "factor": 0, "rope_theta": -1})),
            Just(serde_json::json!({"type": "llama3", "factor": 1e308, "low_freq_factor": 0, "high_freq_factor": 0, "original_max_position_embeddings": 0})),
        ],
    ) {
        let (_tmp, dir) = copy_fixture(fixture_name);
        let p = dir.join("config.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        cfg[key] = value;
        std::fs::write(&p, cfg.to_string()).unwrap();
        load_everything(&dir);
    }

    /// Byte-level mutations of config.json.
    #[test]
    fn mutated_config_json_loads_or_fails(edits in proptest::collection::vec(edit(), 1..4)) {
        let (_tmp, dir) = copy_fixture("gpt2");
        let p = dir.join("config.json");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, apply(bytes, &edits)).unwrap();
        load_everything(&dir);
    }

    /// Mutations of the shard index of a sharded folder.
    #[test]
    fn mutated_shard_index_loads_or_fails(edits in proptest::collection::vec(edit(), 1..4)) {
        let (_tmp, dir) = copy_fixture("qwen2_bias_sharded");
        let p = dir.join("model.safetensors.index.json");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, apply(bytes, &edits)).unwrap();
        load_everything(&dir);
    }

    /// `rlhf.json`: mutations of a valid one, and random bytes.
    #[test]
    fn mutated_rlhf_json_reads_or_fails(
        edits in proptest::collection::vec(edit(), 1..4),
        random in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let valid = br#"{"stage": "reward", "prompt_template": "Human: {prompt}\n\nAssistant:", "reward_normalization": {"offset": 0.5, "mean": 0.0, "std": 1.0, "reference": "sft demonstrations (400)"}}"#;
        std::fs::write(tmp.path().join(META_FILE), apply(valid.to_vec(), &edits)).unwrap();
        let _ = ModelMeta::read(tmp.path());
        let _ = model::checkpoint::resolve_template(None, Some(tmp.path()));
        std::fs::write(tmp.path().join(META_FILE), &random).unwrap();
        let _ = ModelMeta::read(tmp.path());
    }
}

/// A header of 10^12 elements (4 TB of f32) in a file of a few bytes is refused from the header,
/// before anything of its size is allocated.
#[test]
fn a_header_declaring_a_trillion_values_is_refused_before_allocating() {
    let (_tmp, dir) = copy_fixture("mistral");
    let header = r#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,4000000000000]}}"#;
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors_bytes(header, None, &[0u8; 16]),
    )
    .unwrap();
    let device = model::parse_device("cpu").unwrap();
    let e = model::checkpoint::load(&dir, &device)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("model.safetensors") || e.contains("mistral"),
        "{e}"
    );
}

/// A shard index whose `weight_map` names a file outside the model folder is refused, naming
/// the key.
#[test]
fn a_shard_outside_the_model_folder_is_refused() {
    let (_tmp, dir) = copy_fixture("qwen2_bias_sharded");
    let p = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&p).unwrap().replacen(
        "model-00003-of-00003.safetensors",
        "../../etc/passwd",
        1,
    );
    std::fs::write(&p, text).unwrap();
    let device = model::parse_device("cpu").unwrap();
    let e = model::checkpoint::load(&dir, &device)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("model.safetensors.index.json")
            && e.contains("\"../../etc/passwd\": expected the name of a safetensors file"),
        "{e}"
    );
}
