//! LoRA in PEFT's format: adapters PEFT wrote (fixtures from `scripts/make_lora_fixtures.py`)
//! give PEFT's logits here; a new adapter starts as the identity, trains alone (the base has no
//! gradient), saves and reloads bit for bit, merges into the weights; PEFT loads what we save
//! (when RLHF_PYTHON names a Python with peft); bad adapters are one clear error.

use burn::optim::GradientsParams;
use model::{CausalLm, LoraConfig, ModelMeta, TokenBatch, load, parse_device, save_adapter};
use serde_json::Value;
use std::path::Path;

#[path = "common/fixtures.rs"]
mod fixtures;
use fixtures::{fixture, logits, max_real_diff, next_tokens, read_json as json, reference_batch};

/// (base fixture, its PEFT adapter fixture).
const CASES: &[&str] = &["llama_gqa_untied", "qwen2_bias_sharded", "gpt2"];

/// The base fixture's padded reference batch.
fn batch_of(base: &str) -> TokenBatch {
    reference_batch(&json(&fixture(base).join("reference.json")))
}

fn flat(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        x => vec![x.as_f64().unwrap() as f32],
    }
}

#[test]
fn adapters_peft_wrote_give_peft_logits_and_merge_into_the_weights() {
    let device = parse_device("cpu").unwrap();
    for base in CASES {
        let plain = load(&fixture(base), &device).unwrap().model;
        let batch = batch_of(base);
        let v = plain.config().vocab_size;
        let adapter = fixture(&format!("lora_{base}"));
        let adapted = plain.clone().load_lora(&adapter).unwrap();
        let want = flat(&json(&adapter.join("reference.json"))["logits"]);
        let got = logits(&adapted, &batch);
        let diff = max_real_diff(&got, &want, &batch, v);
        assert!(diff < 1e-4, "{base}: max |ours - peft| {diff:e}");
        // The adapter matters: the base alone is far from PEFT's adapted logits.
        let off = max_real_diff(&logits(&plain, &batch), &want, &batch, v);
        assert!(
            off > 0.1,
            "{base}: the adapter changes the logits by only {off}"
        );
        // Merged: the same function without the adapters, and saved as a plain model.
        let merged = adapted.clone().merge_lora();
        assert!(merged.lora_config().is_none());
        let diff = max_real_diff(&logits(&merged, &batch), &want, &batch, v);
        assert!(diff < 1e-4, "{base}: merged max |ours - peft| {diff:e}");
        let (a, b) = (adapted.hf_tensors(), merged.hf_tensors());
        assert_eq!(a.len(), b.len(), "{base}");
        for ((na, sa, va), (nb, sb, vb)) in a.iter().zip(&b) {
            assert_eq!((na, sa), (nb, sb));
            assert_eq!(
                va, vb,
                "{base}: {na}: hf_tensors of an adapted model are its merged weights"
            );
        }
    }
}

/// Runs `steps` AdamW steps of next-token loss on `model` (on an autodiff device): returns the
/// model and how many parameters had gradients at the first step.
fn train(mut model: CausalLm, batch: &TokenBatch, steps: usize) -> (CausalLm, usize) {
    let mut optim = model::optim::adamw(0.9, 0.999, 1e-8, 0.0);
    let mut with_grads = 0;
    let device = model.device();
    let targets = next_tokens(batch, &device);
    for step in 0..steps {
        let lp = model::ops::token_logprobs(
            model.logits(model.forward(batch)).unwrap(),
            targets.clone(),
        );
        let loss = lp.mean().neg();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        if step == 0 {
            with_grads = grads.len();
        }
        model = optim.step(5e-2, model, grads);
    }
    (model, with_grads)
}

#[test]
fn a_new_adapter_is_the_identity_trains_alone_and_reloads_bit_for_bit() {
    let device = parse_device("cpu").unwrap().autodiff();
    let cfgs = [
        (
            "llama_gqa_untied",
            LoraConfig {
                r: 4,
                alpha: 8.0,
                dropout: 0.0,
                target_modules: vec!["all-linear".into()],
                use_rslora: false,
            },
        ),
        (
            "gpt2",
            LoraConfig {
                r: 2,
                alpha: 4.0,
                dropout: 0.0,
                target_modules: vec!["c_attn".into(), "c_fc".into()],
                use_rslora: true,
            },
        ),
    ];
    for (base, cfg) in cfgs {
        let plain = load(&fixture(base), &device).unwrap().model;
        let batch = batch_of(base);
        let v = plain.config().vocab_size;
        let before = logits(&plain, &batch);
        let adapted = plain.clone().with_lora(&cfg, 7).unwrap();
        assert_eq!(
            logits(&adapted, &batch),
            before,
            "{base}: B = 0 leaves the outputs unchanged"
        );
        let n_lora = adapted.lora_tensors().len();
        let layers = plain.config().num_layers;
        // llama all-linear: q, k, v, o, gate, up, down; gpt2 c_attn + c_fc: two per layer.
        let per_layer = if base == "gpt2" { 2 } else { 7 };
        assert_eq!(
            n_lora,
            2 * per_layer * layers,
            "{base}: A and B per adapted module"
        );
        let (trained, with_grads) = train(adapted, &batch, 3);
        assert_eq!(
            with_grads, n_lora,
            "{base}: only the adapters have gradients"
        );
        let after = logits(&trained, &batch);
        assert!(
            max_real_diff(&after, &before, &batch, v) > 1e-3,
            "{base}: training moved the outputs"
        );
        // Saved as PEFT's folder, reloaded onto a fresh base: the same outputs, bit for bit.
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("adapter");
        save_adapter(&trained, None, &ModelMeta::default(), &fixture(base), &out).unwrap();
        let cfg_json = json(&out.join("adapter_config.json"));
        assert_eq!(cfg_json["peft_type"], "LORA");
        assert_eq!(cfg_json["r"], cfg.r);
        assert_eq!(cfg_json["fan_in_fan_out"], base == "gpt2");
        let reloaded = load(&fixture(base), &device)
            .unwrap()
            .model
            .load_lora(&out)
            .unwrap();
        assert_eq!(logits(&reloaded, &batch), after, "{base}: reloaded adapter");
        let family = plain.config().family;
        let back = reloaded.lora_config().unwrap();
        assert_eq!(
            (back.r, back.alpha, back.use_rslora, back.targets(family)),
            (cfg.r, cfg.alpha, cfg.use_rslora, cfg.targets(family)),
            "{base}"
        );
        let merged = max_real_diff(
            &logits(&trained.clone().merge_lora(), &batch),
            &after,
            &batch,
            v,
        );
        assert!(merged < 1e-4, "{base}: merged vs adapted {merged:e}");
        if let Ok(python) = std::env::var("RLHF_PYTHON") {
            // PEFT loads our adapter onto the base and gives our logits.
            let r = json(&fixture(base).join("reference.json"));
            let ours = serde_json::json!({
                "input_ids": r["input_ids"], "attention_mask": r["attention_mask"],
                "position_ids": r["position_ids"],
                "logits": after.chunks(v).collect::<Vec<_>>(),
            });
            let ours_path = dir.path().join("ours.json");
            std::fs::write(&ours_path, ours.to_string()).unwrap();
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
            let status = std::process::Command::new(&python)
                .arg(root.join("scripts/make_lora_fixtures.py"))
                .args([
                    "verify".as_ref(),
                    fixture(base).as_os_str(),
                    out.as_os_str(),
                    ours_path.as_os_str(),
                ])
                .status()
                .expect("running python");
            assert!(status.success(), "{base}: peft disagrees with our adapter");
        } else {
            eprintln!(
                "skipped the peft check: set RLHF_PYTHON to a python with torch, transformers and peft"
            );
        }
    }
}

#[test]
fn bad_adapters_and_settings_are_one_clear_error() {
    let device = parse_device("cpu").unwrap();
    let llama = load(&fixture("llama_gqa_untied"), &device).unwrap().model;
    // An adapter for another base (GPT-2 names) on a Llama model.
    let e = llama
        .clone()
        .load_lora(&fixture("lora_gpt2"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("c_attn") && e.contains("matches no linear layer"),
        "{e}"
    );
    // A target that names nothing.
    let cfg = LoraConfig {
        target_modules: vec!["qkv".into()],
        ..LoraConfig::default()
    };
    let e = llama.clone().with_lora(&cfg, 0).unwrap_err().to_string();
    assert!(
        e.contains("`qkv` matches no linear layer") && e.contains("q_proj"),
        "{e}"
    );
    let e = llama
        .clone()
        .with_lora(
            &LoraConfig {
                r: 0,
                ..LoraConfig::default()
            },
            0,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora.r"), "{e}");
    // Adapters twice.
    let twice = llama.clone().with_lora(&LoraConfig::default(), 0).unwrap();
    let e = twice
        .with_lora(&LoraConfig::default(), 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already has LoRA adapters"), "{e}");
    // What PEFT can write but this does not implement: named, not silently ignored.
    let dir = tempfile::tempdir().unwrap();
    for (key, value) in [
        ("use_dora", serde_json::json!(true)),
        ("peft_type", serde_json::json!("IA3")),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("rank_pattern", serde_json::json!({"q_proj": 8})),
    ] {
        let out = dir.path().join(key);
        std::fs::create_dir_all(&out).unwrap();
        let src = fixture("lora_llama_gqa_untied");
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            out.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut cfg = json(&src.join("adapter_config.json"));
        cfg[key] = value;
        std::fs::write(out.join("adapter_config.json"), cfg.to_string()).unwrap();
        let e = llama.clone().load_lora(&out).unwrap_err().to_string();
        assert!(
            e.contains("adapter_config.json") && e.contains(key),
            "{key}: {e}"
        );
    }
    // A tensor that fits no module (another layer count).
    let out = dir.path().join("extra");
    std::fs::create_dir_all(&out).unwrap();
    let src = fixture("lora_llama_gqa_untied");
    std::fs::copy(
        src.join("adapter_config.json"),
        out.join("adapter_config.json"),
    )
    .unwrap();
    let files = model::SafetensorsFiles::open_file(&src.join("adapter_model.safetensors")).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = files
        .names()
        .map(|n| {
            let shape = files_shape(&src, n);
            (n.to_string(), shape.clone(), files.read(n, &shape).unwrap())
        })
        .collect();
    tensors.push((
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight".into(),
        vec![4, 32],
        vec![0.0; 128],
    ));
    model::weights::write_safetensors(&out.join("adapter_model.safetensors"), &tensors).unwrap();
    let e = llama.clone().load_lora(&out).unwrap_err().to_string();
    assert!(
        e.contains("layers.9") && e.contains("another base model"),
        "{e}"
    );
}

/// A tensor's shape from the header of the safetensors file `dir/adapter_model.safetensors`.
fn files_shape(dir: &Path, name: &str) -> Vec<usize> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(name).unwrap().shape().to_vec()
}
