//! `model bench`: throughput of the two hot paths, on the benchmark shapes: a training step
//! (forward, backward, AdamW, global-norm clip) and KV-cache sampling, next to the PyTorch peer
//! (`scripts/bench_peer.py`) in one run, with the roofs they are measured against (a matmul's
//! GFLOP/s, the memory read rate). Part of the `model` binary, not of the library: it uses only
//! the model crate's public API.

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Tensor};
use model::device::hot;
use model::ops::{clip_coef, grad_norm, matmul, to_f32_vec, token_logprobs, token_tensor};
use model::optim::{adamw, with_grad_scale};
use model::{
    CausalLm, Family, KvCache, MatmulPrecision, ModelConfig, SamplingConfig, TokenBatch,
    backend_name, generate, set_matmul_precision,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::path::Path;
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

pub fn shape_named(name: &str) -> Option<Shape> {
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
    let mut optim = adamw(0.9, 0.999, 1e-8, 0.01);
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
        model = with_grad_scale(coef, || optim.step(3e-4, model, grads));
        // Force the step to finish before stopping the clock.
        let _ = loss.into_scalar::<f32>();
        if step >= warmup {
            timed += start.elapsed().as_secs_f64();
        }
    }
    Ok((b * t * steps) as f64 / timed)
}

/// KV-cache generation on a shape: its speed, and what its decoding steps read from memory.
#[derive(Clone, Copy, Debug)]
pub struct GenerateRate {
    /// Sampled tokens per second: the whole generation, its prompt forward included.
    pub tokens_per_s: f64,
    /// Seconds per decoding step: a generation's time less its prompt forward (with the packing
    /// of the weights before it), over the steps after the first.
    pub decode_step_s: f64,
    /// Bytes of weight matrices a decoding step reads: each once, at the width decoding reads
    /// it (bf16 panels under `matmul = "bf16"` on AMX, f32 otherwise).
    pub weight_bytes: f64,
    /// Bytes of cached keys and values a decoding step reads, on average over the steps.
    pub kv_bytes: f64,
    /// What the last step reads: the weights and the full cache (the working set a step sweeps).
    pub working_set_bytes: f64,
}

impl GenerateRate {
    /// Bytes per decoding step over seconds per step.
    pub fn decode_gbps(&self) -> f64 {
        (self.weight_bytes + self.kv_bytes) / self.decode_step_s / 1e9
    }
}

/// KV-cache generation (temperature 1, no early stop): the mean over `reps` timed runs after
/// one untimed run, and as many timed prompt forwards (the first step of a generation: the
/// weights packed, the prompts through the model, the last position's logits).
pub fn generate_rate(s: &Shape, reps: usize, device: &Device) -> Result<GenerateRate> {
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
    let mut prompt_timed = 0.0;
    let mut bf16_weights = false;
    for rep in 0..=reps {
        let start = Instant::now();
        hot(|| -> Result<()> {
            let packed = model.pack_for_decoding();
            bf16_weights = packed.bf16();
            let batch = TokenBatch::left_padded(&prompts, 0);
            let mut cache =
                KvCache::with_capacity(cfg.num_layers, s.gen_batch, s.gen_prompt + s.gen_new);
            // The first step of a generation: the prompts through the model, the last
            // position's logits to the host.
            let hidden = model.forward_cached(&batch, &mut cache);
            let [b, t, d] = hidden.dims();
            let logits = model.logits(hidden.slice([0..b, t - 1..t, 0..d]))?;
            drop(to_f32_vec(logits));
            Ok(())
        })?;
        if rep > 0 {
            prompt_timed += start.elapsed().as_secs_f64();
        }
    }
    let steps = s.gen_new.saturating_sub(1).max(1);
    // Decoding step j (1-based) attends over the prompt and j new positions, in every layer,
    // keys and values of every key-value head of every sequence.
    let kv_per_position =
        (2 * cfg.num_layers * s.gen_batch * cfg.num_kv_heads * cfg.head_dim * 4) as f64;
    let positions: usize = (1..=steps).map(|j| s.gen_prompt + j).sum();
    let weight_bytes = (params_in_products(&model, &cfg) * if bf16_weights { 2 } else { 4 }) as f64;
    Ok(GenerateRate {
        tokens_per_s: (s.gen_batch * s.gen_new * reps) as f64 / timed,
        decode_step_s: (timed - prompt_timed) / reps as f64 / steps as f64,
        weight_bytes,
        kv_bytes: kv_per_position * positions as f64 / steps as f64,
        working_set_bytes: weight_bytes + kv_per_position * (s.gen_prompt + steps) as f64,
    })
}

/// The machine's memory read rate over a working set of `bytes`: GB/s of sweeps that read a
/// buffer of that size on every core (each thread its share, in order), the best of about
/// 8 GB of sweeps (20 at least): the roof of a decoding step, which sweeps the weights and the
/// cache once per step. Repeated sweeps, as a generation's steps are: a working set that the
/// last-level cache can hold settles there only after several (measured here: 33 MB read at
/// ~21 GB/s over the first 5 sweeps, ~48 GB/s once settled; 185 MB at ~21.5 GB/s either way).
pub fn read_gbps(bytes: usize) -> f64 {
    let reps = (8e9 / bytes.max(1) as f64).clamp(20.0, 2000.0) as usize;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Written, so that every page is backed (fresh zero pages would all read one page).
    let buf: Vec<u64> = (0..(bytes / 8).max(threads)).map(|i| i as u64).collect();
    let share = buf.len().div_ceil(threads);
    let mut best = f64::INFINITY;
    for rep in 0..=reps {
        let start = Instant::now();
        let sum = std::thread::scope(|scope| {
            let parts: Vec<_> = buf
                .chunks(share)
                .map(|part| scope.spawn(move || part.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            parts.into_iter().fold(0u64, |a, p| {
                a.wrapping_add(p.join().expect("a read thread panicked"))
            })
        });
        std::hint::black_box(sum);
        if rep > 0 {
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    (buf.len() * 8) as f64 / best / 1e9
}

/// Parameters that take part in matmuls (all but the token and position embedding tables, which
/// are lookups): the `params` of the 6 · params · tokens estimate of a training step's FLOPs.
pub fn matmul_params(s: &Shape, device: &Device) -> Result<usize> {
    let cfg = shape_config(s)?;
    Ok(params_in_products(
        &CausalLm::new(&cfg, false, 0, device)?,
        &cfg,
    ))
}

fn params_in_products(model: &CausalLm, cfg: &ModelConfig) -> usize {
    let mut embed = cfg.vocab_size * cfg.hidden_size;
    if cfg.family == Family::Gpt2 {
        embed += cfg.max_position_embeddings * cfg.hidden_size;
    }
    model.num_params() - embed
}

/// The machine's matmul roof through our product path (`model::ops::matmul`, at the precision set by
/// `set_matmul_precision`): GFLOP/s of an n × n × n product (the best of `reps` timed runs after
/// one untimed).
pub fn sgemm_gflops(n: usize, reps: usize, device: &Device) -> f64 {
    let a = Tensor::<2>::random([n, n], Distribution::Default, device);
    let b = Tensor::<2>::random([n, n], Distribution::Default, device);
    let mut best = f64::INFINITY;
    for rep in 0..=reps {
        let start = Instant::now();
        let c = matmul(a.clone(), b.clone());
        let _ = c.slice([0..1, 0..1]).into_scalar::<f32>();
        if rep > 0 {
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    2.0 * (n as f64).powi(3) / best / 1e9
}

/// `model bench`: prints each round's rates as JSON lines, then the table of each side's best
/// round, the training step's MFU and decoding's MBU.
pub fn run(
    shape: &str,
    python: Option<&Path>,
    (steps, reps, rounds): (usize, usize, usize),
    matmul: MatmulPrecision,
    device: &Device,
) -> Result<()> {
    let shapes: Vec<_> = if shape == "all" {
        SHAPES.to_vec()
    } else {
        vec![
            shape_named(shape)
                .with_context(|| format!("unknown shape `{shape}`; use small, medium or all"))?,
        ]
    };
    // Model FLOP utilisation of the training step: 6 · matmul params · tokens/s over the matmul
    // roof measured here (a 2048³ matmul through the same backend, at the precision benchmarked).
    let what_runs = set_matmul_precision(matmul);
    let roof = sgemm_gflops(2048, 3, device);
    let bf16 = matmul == MatmulPrecision::Bf16;
    let ours = if bf16 {
        format!("{}-bf16", backend_name())
    } else {
        backend_name().to_string()
    };
    let ours = ours.as_str();
    let peers: &[&str] = if bf16 {
        &["pytorch", "pytorch-bf16"]
    } else {
        &["pytorch"]
    };
    println!("our matrix products: {what_runs}");
    let mut rows = Vec::new();
    // Our generation's best round per shape, for its bandwidth utilisation.
    let mut decoding: Vec<(&str, GenerateRate)> = Vec::new();
    for round in 1..=rounds {
        for s in &shapes {
            let mut line = |what: &str, imp: &str, tps: f64| {
                println!(
                    "{}",
                    serde_json::json!({"shape": s.name, "what": what, "impl": imp, "round": round, "tokens_per_s": (tps * 10.0).round() / 10.0})
                );
                rows.push((s.name, what.to_string(), imp.to_string(), tps));
            };
            // As the stage binaries train (`hot`: the pool's threads poll between regions);
            // `generate` does so itself. The peer runs after, with our threads asleep.
            let train = hot(|| train_tokens_per_s(s, steps, 2, device))?;
            line("train", ours, train);
            let rate = generate_rate(s, reps, device)?;
            line("generate", ours, rate.tokens_per_s);
            match decoding.iter_mut().find(|(name, _)| *name == s.name) {
                Some((_, best)) if best.tokens_per_s >= rate.tokens_per_s => {}
                Some((_, best)) => *best = rate,
                None => decoding.push((s.name, rate)),
            }
            if let Some(py) = python {
                for p in peers {
                    let precision = if p.ends_with("-bf16") { "bf16" } else { "fp32" };
                    for (what, imp, tps) in peer(py, s.name, steps, reps, precision)? {
                        line(&what, &imp, tps);
                    }
                }
            }
        }
    }
    // Each side's best round, and the range over the rounds.
    let best = |shape: &str, what: &str, imp: &str| {
        rows.iter()
            .filter(|r| r.0 == shape && r.1 == what && r.2 == imp)
            .map(|r| r.3)
            .fold(None, |a: Option<(f64, f64)>, x| {
                Some(a.map_or((x, x), |(lo, hi)| (lo.min(x), hi.max(x))))
            })
    };
    println!();
    let mut head = format!("{:<8} {:<9} {:>12}", "shape", "what", ours);
    for p in peers {
        head += &format!(" {p:>12} {:>8}", "ratio");
    }
    println!(
        "{head}   range over {rounds} round(s): {ours} / {}",
        peers.join(" / ")
    );
    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.0}"));
    let range =
        |r: Option<(f64, f64)>| r.map_or("-".to_string(), |(lo, hi)| format!("{lo:.0}-{hi:.0}"));
    for s in &shapes {
        for what in ["train", "generate"] {
            let ours_range = best(s.name, what, ours);
            let a = ours_range.map(|r| r.1);
            let mut line = format!("{:<8} {:<9} {:>12}", s.name, what, fmt(a));
            let mut ranges = vec![range(ours_range)];
            for p in peers {
                let b_range = best(s.name, what, p);
                let b = b_range.map(|r| r.1);
                let ratio = match (a, b) {
                    (Some(a), Some(b)) => format!("{:.2}x", a / b),
                    _ => "-".into(),
                };
                line += &format!(" {:>12} {ratio:>8}", fmt(b));
                ranges.push(range(b_range));
            }
            println!("{line}   {}", ranges.join(" / "));
        }
    }
    println!("(tokens/s, each side's best round; ratio = ours / that peer, above 1 is faster)");
    println!();
    println!(
        "{} matmul roof (2048^3 through {ours}): {roof:.1} GFLOP/s",
        if bf16 { "bf16" } else { "fp32" }
    );
    let mut mfu = Vec::new();
    for s in &shapes {
        let params = matmul_params(s, device)?;
        let train = best(s.name, "train", ours).map_or(0.0, |r| r.1);
        mfu.push((s.name, params, 6.0 * params as f64 * train / 1e9));
    }
    for (name, params, gflops) in &mfu {
        println!(
            "{name:<8} train     MFU {:>5.1}%  (6 x {:.2}M matmul params x tokens/s = {gflops:.1} GFLOP/s)",
            100.0 * gflops / roof,
            *params as f64 / 1e6
        );
    }
    // Memory-bandwidth utilisation of decoding: the bytes a step must read (each weight matrix
    // once, the keys and values cached so far) per second of a step, over the rate at which
    // this machine reads a working set of the same size.
    for (name, rate) in &decoding {
        let read_roof = read_gbps(rate.working_set_bytes as usize);
        let gbps = rate.decode_gbps();
        println!(
            "{name:<8} generate  MBU {:>5.1}%  ({:.1} MB weights + {:.1} MB keys/values per decoding step in {:.2} ms = {gbps:.1} GB/s; read roof over {:.0} MB: {read_roof:.1} GB/s)",
            100.0 * gbps / read_roof,
            rate.weight_bytes / 1e6,
            rate.kv_bytes / 1e6,
            rate.decode_step_s * 1e3,
            rate.working_set_bytes / 1e6,
        );
    }
    Ok(())
}

/// Runs the PyTorch peer script (embedded in this binary) and reads its JSON lines.
fn peer(
    python: &Path,
    shape: &str,
    steps: usize,
    reps: usize,
    matmul: &str,
) -> Result<Vec<(String, String, f64)>> {
    let script = std::env::temp_dir().join(format!("rlhf_bench_peer_{}.py", std::process::id()));
    std::fs::write(&script, include_str!("../../../../scripts/bench_peer.py"))?;
    let out = std::process::Command::new(python)
        .arg(&script)
        .args([
            "--shape",
            shape,
            "--steps",
            &steps.to_string(),
            "--reps",
            &reps.to_string(),
            "--matmul",
            matmul,
        ])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    let _ = std::fs::remove_file(&script);
    if !out.status.success() {
        bail!(
            "the PyTorch peer failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut rows = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(w), Some(i), Some(t)) = (
            v["what"].as_str(),
            v["impl"].as_str(),
            v["tokens_per_s"].as_f64(),
        ) {
            rows.push((w.to_string(), i.to_string(), t));
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoding step of the small shape reads each weight matrix once (4 · 256 · 768 q | k | v,
    /// 256 · 256 o, 256 · 1376 gate | up and 688 · 256 down per layer, the untied 256 · 8192 LM
    /// head, and the norms' weights) and the keys and values of the prompt and the positions
    /// sampled so far: 2 · 4 layers · 16 sequences · 4 heads · 64 · 4 bytes per position, 64
    /// positions on average over steps 1..=63 (33..=95).
    #[test]
    fn decoding_reads_every_weight_once_and_the_cache_so_far() {
        let device = model::parse_device("cpu").unwrap();
        let s = shape_named("small").unwrap();
        let rate = generate_rate(&s, 1, &device).unwrap();
        let linear = 4 * (256 * 768 + 256 * 256 + 256 * 1376 + 688 * 256) + 256 * 8192;
        let norms = 2 * 4 * 256 + 256;
        assert_eq!(rate.weight_bytes, (4 * (linear + norms)) as f64);
        let per_position = (2 * 4 * 16 * 4 * 64 * 4) as f64;
        assert_eq!(rate.kv_bytes, per_position * 64.0);
        assert_eq!(
            rate.working_set_bytes,
            rate.weight_bytes + per_position * 95.0
        );
        assert!(rate.tokens_per_s > 0.0 && rate.decode_step_s > 0.0);
        let expect = (rate.weight_bytes + rate.kv_bytes) / rate.decode_step_s / 1e9;
        assert!((rate.decode_gbps() - expect).abs() < 1e-9 * expect);
    }

    /// The read roof sums a buffer it wrote: a finite, positive rate, also for a size that does
    /// not divide among the threads.
    #[test]
    fn read_roof_is_a_positive_rate() {
        let r = read_gbps((1 << 20) + 12);
        assert!(r.is_finite() && r > 0.0, "{r}");
    }
}
