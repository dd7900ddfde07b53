//! Frozen weights kept in bf16 (the stages' `dtype` key, [`model::WeightDtype`]): a model read from
//! a bf16 file keeps its matrices in bf16 (half the memory) and gives the numbers of the f32 model
//! of the same values bit for bit: its forward, its generations (packed for decoding or not), and,
//! as a LoRA base, the adapters' training.

use burn::optim::GradientsParams;
use model::ops::to_f32_vec;
use model::{
    CausalLm, KvCache, LoraConfig, SamplingConfig, TokenBatch, WeightDtype, generate, load,
    parse_device,
};

#[path = "common/fixtures.rs"]
mod fixtures;
use fixtures::{fixture, logits, next_tokens, read_json, reference_batch};

/// A Llama fixture whose file is bf16 (written by transformers).
const BF16_FIXTURE: &str = "llama_tied_llama3_bf16";

fn batch_of(name: &str) -> TokenBatch {
    reference_batch(&read_json(&fixture(name).join("reference.json")))
}

#[test]
fn frozen_weights_of_a_bf16_file_stay_bf16_with_the_numbers_of_f32() {
    let device = parse_device("cpu").unwrap();
    let plain = load(&fixture(BF16_FIXTURE), &device).unwrap().model;
    assert_eq!(plain.file_dtypes(), ["BF16".to_string()]);
    assert!(!plain.keeps_bf16(), "loaded models compute in f32");
    let frozen = plain.clone().keep_frozen(WeightDtype::Auto);
    assert!(frozen.keeps_bf16(), "auto keeps a bf16 file's dtype");
    assert!(!plain.clone().keep_frozen(WeightDtype::F32).keeps_bf16());

    let batch = batch_of(BF16_FIXTURE);
    assert!(
        logits(&frozen, &batch) == logits(&plain, &batch),
        "bf16 weights widened exactly: the f32 model's logits bit for bit"
    );

    // Decoding steps without packed weights (few-row products that read the bf16 values where
    // they lie) after a 40-row prompt forward: the same logits.
    let step = |m: &CausalLm| {
        let prompts: Vec<Vec<u32>> = (0..5)
            .map(|r| (0..8).map(|i| ((i * 5 + r * 13) % 60 + 3) as u32).collect())
            .collect();
        let mut cache = KvCache::new(m.config().num_layers, 5);
        let mut out = to_f32_vec(
            m.logits(m.forward_cached(&TokenBatch::left_padded(&prompts, 0), &mut cache))
                .unwrap(),
        );
        for t in 0..3u32 {
            let next = TokenBatch {
                tokens: (0..5).map(|r| 4 + r + t).collect(),
                mask: vec![true; 5],
                batch: 5,
                seq: 1,
            };
            out.extend(to_f32_vec(
                m.logits(m.forward_cached(&next, &mut cache)).unwrap(),
            ));
        }
        out
    };
    assert!(step(&frozen) == step(&plain));

    // Sampling (a KV cache, few-row products, the weights packed for decoding where the CPU
    // packs them): the same tokens and log-probabilities.
    let cfg = SamplingConfig {
        max_new_tokens: 12,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed: 5,
        eos_token_ids: vec![],
        pad_token_id: 0,
    };
    let prompts: Vec<Vec<u32>> = (0..5)
        .map(|r| {
            (0..3 + r)
                .map(|i| ((i * 7 + r * 3) % 60 + 3) as u32)
                .collect()
        })
        .collect();
    let a = generate(&plain, &prompts, &cfg).unwrap();
    let b = generate(&frozen, &prompts, &cfg).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert!(a.logprobs == b.logprobs);

    // An f32 file stays f32 under auto; `bf16` rounds it (close to, not equal to, f32).
    let f32_model = load(&fixture("llama_gqa_untied"), &device).unwrap().model;
    assert!(
        !f32_model
            .clone()
            .keep_frozen(WeightDtype::Auto)
            .keeps_bf16()
    );
    let rounded = f32_model.clone().keep_frozen(WeightDtype::Bf16);
    assert!(rounded.keeps_bf16());
    let batch = batch_of("llama_gqa_untied");
    let (x, y) = (logits(&f32_model, &batch), logits(&rounded, &batch));
    let diff = x
        .iter()
        .zip(&y)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        diff > 0.0 && diff < 0.05,
        "bf16 rounding of f32 weights: max |diff| {diff}"
    );
}

/// `steps` AdamW steps of next-token loss; the adapters' tensors after them.
fn train_adapters(mut model: CausalLm, batch: &TokenBatch, steps: usize) -> Vec<Vec<f32>> {
    let mut optim = model::optim::adamw(0.9, 0.999, 1e-8, 0.0);
    let device = model.device();
    let targets = next_tokens(batch, &device);
    for _ in 0..steps {
        let lp = model::ops::token_logprobs(
            model.logits(model.forward(batch)).unwrap(),
            targets.clone(),
        );
        let grads = GradientsParams::from_grads(lp.mean().neg().backward(), &model);
        model = optim.step(5e-2, model, grads);
    }
    model.lora_tensors().into_iter().map(|t| t.2).collect()
}

#[test]
fn a_lora_base_kept_in_bf16_trains_its_adapters_as_in_f32() {
    let device = parse_device("cpu").unwrap().autodiff();
    let base = load(&fixture(BF16_FIXTURE), &device).unwrap().model;
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["all-linear".into()],
        use_rslora: false,
    };
    let f32_base = base.clone().with_lora(&cfg, 3).unwrap();
    let bf16_base = base
        .with_lora(&cfg, 3)
        .unwrap()
        .keep_frozen(WeightDtype::Auto);
    assert!(bf16_base.keeps_bf16());
    let batch = batch_of(BF16_FIXTURE);
    let (a, b) = (
        train_adapters(f32_base.clone(), &batch, 3),
        train_adapters(bf16_base.clone(), &batch, 3),
    );
    assert!(!a.is_empty());
    assert!(
        a == b,
        "the gradients through the frozen bf16 weights are the f32 model's"
    );
    // The merged weights (saved, `model merge`) are f32 sums of the widened base and the delta.
    let (ma, mb) = (f32_base.hf_tensors(), bf16_base.hf_tensors());
    assert_eq!(ma.len(), mb.len());
    assert!(ma.iter().zip(&mb).all(|(x, y)| x.0 == y.0 && x.2 == y.2));

    // Saved, the base's dtype is kept: bf16 weights (the merged sums rounded to nearest) and a
    // config.json that says so; read back, the rounded values.
    let dir = std::env::temp_dir().join(format!("dtype-lora-{}", std::process::id()));
    model::save(&bf16_base, None, &dir).unwrap();
    let files = model::SafetensorsFiles::open(&dir).unwrap();
    assert_eq!(files.dtypes(), ["BF16".to_string()]);
    let config = read_json(&dir.join("config.json"));
    assert_eq!(config["torch_dtype"], "bfloat16");
    let back = load(&dir, &device).unwrap().model.hf_tensors();
    std::fs::remove_dir_all(&dir).unwrap();
    for ((name, _, saved), (_, _, merged)) in back.iter().zip(&mb) {
        let rounded: Vec<f32> = merged
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        assert!(
            saved == &rounded,
            "{name}: the bf16 rounding of the merged weight"
        );
    }
}
