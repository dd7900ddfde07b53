//! Throughput of the two hot paths, on the benchmark shapes: a training step (forward, backward,
//! AdamW, global-norm clip) and KV-cache sampling. `model bench` runs these and the PyTorch peer
//! (`scripts/bench_peer.py`) in one run and prints both.

use crate::config::ModelConfig;
use crate::generate::{SamplingConfig, generate};
use crate::ops::{clip_coef, grad_norm, token_logprobs, token_tensor};
use crate::transformer::CausalLm;
use crate::{Result, TokenBatch};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::time::Instant;

/// A benchmark shape: the model and the batch sizes.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub name: &'static str,
    pub preset: &'static str,
    pub vocab: usize,
    pub train_batch: usize,
    pub train_seq: usize,
    pub gen_batch: usize,
    pub gen_prompt: usize,
    pub gen_new: usize,
}

pub const SHAPES: &[Shape] = &[
    Shape {
        name: "small",
        preset: "small",
        vocab: 8192,
        train_batch: 8,
        train_seq: 128,
        gen_batch: 16,
        gen_prompt: 32,
        gen_new: 64,
    },
    Shape {
        name: "medium",
        preset: "medium",
        vocab: 16384,
        train_batch: 8,
        train_seq: 128,
        gen_batch: 16,
        gen_prompt: 32,
        gen_new: 64,
    },
];

pub fn shape(name: &str) -> Option<Shape> {
    SHAPES.iter().copied().find(|s| s.name == name)
}

fn random_tokens(rng: &mut StdRng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// The shape's model config: the preset, untied, as the PyTorch peer builds it.
pub fn shape_config(s: &Shape) -> Result<ModelConfig> {
    let mut cfg = ModelConfig::preset(s.preset, s.vocab)?;
    cfg.tie_word_embeddings = false;
    Ok(cfg)
}

/// Training tokens per second: the mean over `steps` timed steps after `warmup` untimed ones.
pub fn train_tokens_per_s(s: &Shape, steps: usize, warmup: usize, device: &Device) -> Result<f64> {
    let cfg = shape_config(s)?;
    let device = device.clone().autodiff();
    let mut model = CausalLm::new(&cfg, false, 0, &device)?;
    let mut optim = crate::optim::adamw(0.9, 0.999, 1e-8, 0.01);
    let mut rng = StdRng::seed_from_u64(0);
    let (b, t) = (s.train_batch, s.train_seq);
    let mut timed = 0.0;
    for step in 0..warmup + steps {
        let ids = random_tokens(&mut rng, b * (t + 1), s.vocab);
        let start = Instant::now();
        let mut inputs = Vec::with_capacity(b * t);
        let mut targets = Vec::with_capacity(b * t);
        for r in 0..b {
            inputs.extend_from_slice(&ids[r * (t + 1)..r * (t + 1) + t]);
            targets.extend_from_slice(&ids[r * (t + 1) + 1..(r + 1) * (t + 1)]);
        }
        let batch = TokenBatch::dense(inputs, b, t);
        let logits = model.logits(model.forward(&batch))?;
        let targets = token_tensor(&targets, b, t, &device);
        let loss = token_logprobs(logits, targets).mean().neg();
        let grads = loss.backward();
        let grads = GradientsParams::from_grads(grads, &model);
        // Global-norm clip as the stages do it: the coefficient applied inside AdamW's pass.
        let coef = clip_coef(grad_norm(&model, &grads), 1.0);
        model = crate::optim::with_grad_scale(coef, || optim.step(3e-4, model, grads));
        // Force the step to finish before stopping the clock.
        let _ = loss.into_scalar::<f32>();
        if step >= warmup {
            timed += start.elapsed().as_secs_f64();
        }
    }
    Ok((b * t * steps) as f64 / timed)
}

/// Sampled tokens per second of KV-cache generation (temperature 1, no early stop), the mean over
/// `reps` timed runs after one untimed run.
pub fn generate_tokens_per_s(s: &Shape, reps: usize, device: &Device) -> Result<f64> {
    let cfg = shape_config(s)?;
    let model = CausalLm::new(&cfg, false, 0, device)?;
    let mut rng = StdRng::seed_from_u64(1);
    let prompts: Vec<Vec<u32>> = (0..s.gen_batch)
        .map(|_| random_tokens(&mut rng, s.gen_prompt, s.vocab))
        .collect();
    let sampling = SamplingConfig {
        max_new_tokens: s.gen_new,
        temperature: 1.0,
        ..Default::default()
    };
    let mut timed = 0.0;
    for rep in 0..=reps {
        let start = Instant::now();
        let g = generate(
            &model,
            &prompts,
            &SamplingConfig {
                seed: rep as u64,
                ..sampling.clone()
            },
        )?;
        assert_eq!(g.tokens[0].len(), s.gen_new);
        if rep > 0 {
            timed += start.elapsed().as_secs_f64();
        }
    }
    Ok((s.gen_batch * s.gen_new * reps) as f64 / timed)
}

/// Parameters that take part in matmuls (all but the token and position embedding tables, which
/// are lookups): the `params` of the 6 · params · tokens estimate of a training step's FLOPs.
pub fn matmul_params(s: &Shape, device: &Device) -> Result<usize> {
    let cfg = shape_config(s)?;
    let model = CausalLm::new(&cfg, false, 0, device)?;
    let mut embed = cfg.vocab_size * cfg.hidden_size;
    if cfg.family == crate::config::Family::Gpt2 {
        embed += cfg.max_position_embeddings * cfg.hidden_size;
    }
    Ok(model.num_params() - embed)
}

/// The machine's matmul roof through our product path (`fused::matmul`, at the precision set by
/// `set_matmul_precision`): GFLOP/s of an n × n × n product (the best of `reps` timed runs after
/// one untimed).
pub fn sgemm_gflops(n: usize, reps: usize, device: &Device) -> f64 {
    let a = Tensor::<2>::random([n, n], Distribution::Default, device);
    let b = Tensor::<2>::random([n, n], Distribution::Default, device);
    let mut best = f64::INFINITY;
    for rep in 0..=reps {
        let start = Instant::now();
        let c = crate::fused::matmul(a.clone(), b.clone());
        let _ = c.slice([0..1, 0..1]).into_scalar::<f32>();
        if rep > 0 {
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    2.0 * (n as f64).powi(3) / best / 1e9
}
