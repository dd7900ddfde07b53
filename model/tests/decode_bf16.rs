//! Weights packed for decoding: under `matmul = "bf16"` a generation packs the model's weights
//! once and the decoding steps' few-row products run in bf16 from the packed copies; in f32 the
//! row-stored weights are packed in f32 panels with unchanged numbers. Its own test binary (one
//! test): the precision is process-wide, and the other tests compare f32 numbers.

#![cfg(feature = "flex")]

use model::ops::to_f32_vec;
use model::{CausalLm, KvCache, ModelConfig, SamplingConfig, TokenBatch, generate, parse_device};
use model::{MatmulPrecision, amx_available, matmul_precision, set_matmul_precision};

/// One decoding step's logits ([rows, vocab]) after `prompts`, with the weights packed or not.
fn step_logits(model: &CausalLm, prompts: &[Vec<u32>], next: &[u32], pack: bool) -> Vec<f32> {
    let _packed = pack.then(|| model.pack_for_decoding());
    let batch = TokenBatch::left_padded(prompts, 0);
    let mut cache = KvCache::new(model.config().num_layers, prompts.len());
    model.forward_cached(&batch, &mut cache);
    let step = TokenBatch {
        tokens: next.to_vec(),
        mask: vec![true; next.len()],
        batch: next.len(),
        seq: 1,
    };
    to_f32_vec(
        model
            .logits(model.forward_cached(&step, &mut cache))
            .unwrap(),
    )
}

#[test]
fn bf16_decoding_reads_the_packed_weights() {
    let device = parse_device("cpu").unwrap();
    let cfg = ModelConfig::preset("mini", 300).unwrap();
    let model = CausalLm::new(&cfg, false, 7, &device).unwrap();
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|r| {
            (0..5 + r)
                .map(|i| ((i * 37 + r * 11) % 300) as u32)
                .collect()
        })
        .collect();
    let next: Vec<u32> = (0..6).map(|r| (r * 41 + 3) as u32).collect();

    // f32: the projections (stored by rows) are packed in f32 panels where the CPU has AVX-512,
    // not the tied LM head (a transposed view); packed, a step gives the same numbers bit for
    // bit (the same sums in the same order).
    assert_eq!(matmul_precision(), MatmulPrecision::Fp32);
    let f32_packed = model.pack_for_decoding();
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    assert_eq!(
        f32_packed.len(),
        if avx512 { 4 * cfg.num_layers } else { 0 }
    );
    drop(f32_packed);
    let f32_logits = step_logits(&model, &prompts, &next, true);
    assert!(step_logits(&model, &prompts, &next, false) == f32_logits);

    set_matmul_precision(MatmulPrecision::Bf16);
    let packed = model.pack_for_decoding();
    if !amx_available() {
        // Without AMX nothing is packed: asking for it changes no number.
        assert!(packed.is_empty());
        assert!(
            step_logits(&model, &prompts, &next, true)
                == step_logits(&model, &prompts, &next, false)
        );
        eprintln!("no AMX on this machine: the packed decoding path is not exercised");
        return;
    }
    // Four projections per layer and the tied LM head.
    assert_eq!(packed.len(), 4 * cfg.num_layers + 1);
    drop(packed);

    // The prompts' forward (60 rows) is bf16 either way; the 6-row decoding step is f32 unless
    // the weights are packed, and bf16 from the packed copies when they are.
    let unpacked = step_logits(&model, &prompts, &next, false);
    let packed = step_logits(&model, &prompts, &next, true);
    let worst = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let scale = f32_logits.iter().map(|x| x.abs()).fold(0f32, f32::max);
    for (what, logits) in [("unpacked", &unpacked), ("packed", &packed)] {
        let w = worst(logits, &f32_logits);
        assert!(
            w > 0.0 && w < 0.05 * scale.max(1.0),
            "{what} bf16 vs f32 logits: worst {w}, scale {scale}"
        );
    }
    assert!(
        worst(&packed, &unpacked) > 0.0,
        "packing changed nothing: the decoding step did not read the packed weights"
    );
    // The handles are gone with the step: unpacked again, the same numbers bit for bit.
    assert!(step_logits(&model, &prompts, &next, false) == unpacked);

    // A whole generation: same seed, same tokens twice (the packed path is deterministic), and
    // log-probs that are finite and negative.
    let cfg = SamplingConfig {
        max_new_tokens: 12,
        temperature: 1.0,
        seed: 3,
        ..Default::default()
    };
    let a = generate(&model, &prompts, &cfg).unwrap();
    let b = generate(&model, &prompts, &cfg).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert!(
        a.logprobs
            .iter()
            .flatten()
            .zip(a.mask.iter().flatten())
            .all(|(&lp, &m)| !m || (lp.is_finite() && lp <= 0.0))
    );

    // A frozen model kept in bf16 (`dtype = "bf16"`): packed from its bf16 memory, the same
    // panels as from the f32 weights of the same values, so the same step and generation.
    let rounded = model.clone().keep_frozen(model::WeightDtype::Bf16);
    let values = {
        let mut m = model.clone().keep_frozen(model::WeightDtype::Bf16);
        // The f32 model of the bf16 values: its weights written back and read as f32.
        let dir = std::env::temp_dir().join(format!("decode-bf16-{}", std::process::id()));
        model::save(&m, None, &dir).unwrap();
        let files = model::SafetensorsFiles::open(&dir).unwrap();
        m = CausalLm::from_safetensors(model.config(), &files, model::Heads::LM, &device).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        m
    };
    assert!(rounded.keeps_bf16() && !values.keeps_bf16());
    assert!(
        step_logits(&rounded, &prompts, &next, true) == step_logits(&values, &prompts, &next, true)
    );
    assert!(
        step_logits(&rounded, &prompts, &next, false)
            == step_logits(&values, &prompts, &next, false)
    );
    let (a, b) = (
        generate(&rounded, &prompts, &cfg).unwrap(),
        generate(&values, &prompts, &cfg).unwrap(),
    );
    assert_eq!(a.tokens, b.tokens);
    assert!(a.logprobs == b.logprobs);
    set_matmul_precision(MatmulPrecision::Fp32);
}
