//! `model`: inspect checkpoints, sample from them, score texts, and benchmark against PyTorch.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use model::ops::{to_f32_vec, token_logprobs, token_tensor};
use model::{TokenBatch, backend_name, generate, generate::SamplingArgs, load, parse_device};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "model",
    version,
    about = "Inspect, sample from, score and benchmark causal LM checkpoints"
)]
struct Cli {
    /// Compute device: `cpu`, or `cuda:N` with the tch backend.
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Architecture, parameter count, vocabulary and file dtype of a model folder.
    Info { dir: PathBuf },
    /// Sample a completion of one prompt.
    Generate {
        dir: PathBuf,
        #[arg(long)]
        prompt: String,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Print {"prompt", "completion", "tokens"} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Sum of token log-probabilities of each `{"text": ...}` line of a JSONL file.
    Score {
        dir: PathBuf,
        #[arg(long)]
        input: PathBuf,
        /// Texts scored per forward pass.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
    },
    /// Create a new model folder from a preset, with a byte-level BPE trained on text files.
    Init {
        /// tiny, small, medium or large.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Text files (each line a text) to train the tokenizer on.
        #[arg(long, required = true, num_args = 1..)]
        texts: Vec<PathBuf>,
        /// Tokenizer vocabulary size, special tokens included.
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Training and generation tokens/s of this build and of HF transformers on PyTorch.
    Bench {
        /// small, medium, or all.
        #[arg(long, default_value = "small")]
        shape: String,
        /// Python with torch and transformers for the peer; without it only ours is measured.
        #[arg(long)]
        python: Option<PathBuf>,
        /// Timed training steps (after 2 untimed).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Timed generation runs (after 1 untimed).
        #[arg(long, default_value_t = 2)]
        reps: usize,
    },
}

fn main() {
    model::device::exit_quietly_on_broken_pipe();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let device = parse_device(&cli.device)?;
    match cli.command {
        Command::Info { dir } => info(&dir, &device),
        Command::Generate {
            dir,
            prompt,
            sampling,
            json,
        } => {
            let loaded = load(&dir, &device)?;
            let tok = loaded.tokenizer.with_context(|| {
                format!("{}: no tokenizer.json in the model folder", dir.display())
            })?;
            let ids = tok.encode(&sampling.template()?.render(&prompt))?;
            if ids.is_empty() {
                bail!("the prompt is empty after tokenization");
            }
            let cfg = sampling.config(tok.eos_id, tok.pad_id);
            let g = generate(&loaded.model, &[ids], &cfg)?;
            let tokens: Vec<u32> = g.responses()[0]
                .iter()
                .copied()
                .filter(|&t| t != tok.eos_id)
                .collect();
            let completion = tok.decode(&tokens)?;
            if json {
                let v = serde_json::json!({"prompt": prompt, "completion": completion, "tokens": tokens});
                println!("{v}");
            } else {
                println!("{completion}");
            }
            Ok(())
        }
        Command::Init {
            preset,
            texts,
            vocab_size,
            seed,
            out,
        } => {
            let mut lines = Vec::new();
            for path in &texts {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("{}: cannot read", path.display()))?;
                lines.extend(
                    text.lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(str::to_string),
                );
            }
            if lines.is_empty() {
                bail!("no text to train the tokenizer on in {:?}", texts);
            }
            let tok = model::Tokenizer::train_bpe(lines.iter(), vocab_size)?;
            let mut cfg = model::ModelConfig::preset(&preset, tok.vocab_size())?;
            cfg.set_special_tokens(&tok);
            let m = model::CausalLm::new(&cfg, false, seed, &device)?;
            model::save(&m, Some(&tok), &out)?;
            println!(
                "wrote {} ({} preset, {} parameters, {} tokens)",
                out.display(),
                preset,
                cfg.num_params(false),
                tok.vocab_size()
            );
            Ok(())
        }
        Command::Score {
            dir,
            input,
            batch_size,
        } => score(&dir, &input, batch_size.max(1), &device),
        Command::Bench {
            shape,
            python,
            steps,
            reps,
        } => bench(
            &shape,
            python.as_deref(),
            steps.max(1),
            reps.max(1),
            &device,
        ),
    }
}

fn info(dir: &Path, device: &burn::tensor::Device) -> Result<()> {
    let loaded = load(dir, device)?;
    let cfg = loaded.model.config();
    let head = loaded.model.has_scalar_head();
    println!("folder          {}", dir.display());
    println!("architecture    {}", cfg.architecture_name(head));
    println!("model_type      {}", cfg.model_type);
    println!("parameters      {}", cfg.num_params(head));
    println!("vocab_size      {}", cfg.vocab_size);
    println!("hidden_size     {}", cfg.hidden_size);
    println!("layers          {}", cfg.num_layers);
    println!("heads (kv)      {} ({})", cfg.num_heads, cfg.num_kv_heads);
    println!("head_dim        {}", cfg.head_dim);
    println!("intermediate    {}", cfg.intermediate_size);
    println!("tied embeddings {}", cfg.tie_word_embeddings);
    println!("scalar head     {head}");
    println!("file dtype      {}", loaded.file_dtypes.join(", "));
    match &loaded.tokenizer {
        Some(t) => println!(
            "tokenizer       {} tokens, eos {}, pad {}",
            t.vocab_size(),
            t.eos_id,
            t.pad_id
        ),
        None => println!("tokenizer       none"),
    }
    println!("backend         {}", backend_name());
    Ok(())
}

fn score(dir: &Path, input: &Path, batch_size: usize, device: &burn::tensor::Device) -> Result<()> {
    let loaded = load(dir, device)?;
    let tok = loaded
        .tokenizer
        .with_context(|| format!("{}: no tokenizer.json in the model folder", dir.display()))?;
    let file =
        std::fs::File::open(input).with_context(|| format!("{}: cannot open", input.display()))?;
    let mut texts = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line =
            line.with_context(|| format!("{}: line {}: cannot read", input.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}: line {}: not valid JSON", input.display(), i + 1))?;
        let text = v.get("text").and_then(|t| t.as_str()).with_context(|| {
            format!(
                "{}: line {}: field `text` is missing or not a string",
                input.display(),
                i + 1
            )
        })?;
        texts.push(tok.encode(text)?);
    }
    let model = &loaded.model;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for chunk in texts.chunks(batch_size) {
        // log p(token_i | tokens_<i) for i ≥ 1: inputs are tokens[..n-1], targets tokens[1..].
        let inputs: Vec<Vec<u32>> = chunk
            .iter()
            .map(|t| {
                if t.len() > 1 {
                    t[..t.len() - 1].to_vec()
                } else {
                    Vec::new()
                }
            })
            .collect();
        let targets: Vec<Vec<u32>> = chunk
            .iter()
            .map(|t| {
                if t.len() > 1 {
                    t[1..].to_vec()
                } else {
                    Vec::new()
                }
            })
            .collect();
        let sums = if inputs.iter().all(Vec::is_empty) {
            vec![0.0; chunk.len()]
        } else {
            let batch = TokenBatch::right_padded(&inputs, tok.pad_id);
            let tgt = TokenBatch::right_padded(&targets, tok.pad_id);
            let logits = model.logits(model.forward(&batch))?;
            let lp = to_f32_vec(token_logprobs(
                logits,
                token_tensor(&tgt.tokens, tgt.batch, tgt.seq, device),
            ));
            (0..batch.batch)
                .map(|r| {
                    (0..batch.seq)
                        .filter(|&j| batch.mask[r * batch.seq + j])
                        .map(|j| lp[r * batch.seq + j] as f64)
                        .sum::<f64>()
                })
                .collect()
        };
        for (t, s) in chunk.iter().zip(sums) {
            writeln!(
                out,
                "{}",
                serde_json::json!({"tokens": t.len(), "logprob_sum": s})
            )?;
        }
    }
    Ok(())
}

fn bench(
    shape: &str,
    python: Option<&Path>,
    steps: usize,
    reps: usize,
    device: &burn::tensor::Device,
) -> Result<()> {
    use model::bench::{SHAPES, generate_tokens_per_s, train_tokens_per_s};
    let shapes: Vec<_> = if shape == "all" {
        SHAPES.to_vec()
    } else {
        vec![
            model::bench::shape(shape)
                .with_context(|| format!("unknown shape `{shape}`; use small, medium or all"))?,
        ]
    };
    let ours = backend_name();
    let mut rows = Vec::new();
    for s in &shapes {
        let mut line = |what: &str, imp: &str, tps: f64| {
            println!(
                "{}",
                serde_json::json!({"shape": s.name, "what": what, "impl": imp, "tokens_per_s": (tps * 10.0).round() / 10.0})
            );
            rows.push((s.name, what.to_string(), imp.to_string(), tps));
        };
        let train = train_tokens_per_s(s, steps, 2, device)?;
        line("train", ours, train);
        let gen_tps = generate_tokens_per_s(s, reps, device)?;
        line("generate", ours, gen_tps);
        if let Some(py) = python {
            for (what, imp, tps) in peer(py, s.name, steps, reps)? {
                line(&what, &imp, tps);
            }
        }
    }
    println!();
    println!(
        "{:<8} {:<9} {:>12} {:>12} {:>8}",
        "shape", "what", ours, "pytorch", "ratio"
    );
    for s in &shapes {
        for what in ["train", "generate"] {
            let get = |imp: &str| {
                rows.iter()
                    .find(|r| r.0 == s.name && r.1 == what && r.2 == imp)
                    .map(|r| r.3)
            };
            let (a, b) = (get(ours), get("pytorch"));
            let fmt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.0}"));
            let ratio = match (a, b) {
                (Some(a), Some(b)) => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            println!(
                "{:<8} {:<9} {:>12} {:>12} {:>8}",
                s.name,
                what,
                fmt(a),
                fmt(b),
                ratio
            );
        }
    }
    println!("(tokens/s; ratio = ours / pytorch, above 1 is faster)");
    Ok(())
}

/// Runs the PyTorch peer script (embedded in this binary) and reads its JSON lines.
fn peer(
    python: &Path,
    shape: &str,
    steps: usize,
    reps: usize,
) -> Result<Vec<(String, String, f64)>> {
    let script = std::env::temp_dir().join(format!("rlhf_bench_peer_{}.py", std::process::id()));
    std::fs::write(&script, include_str!("../../../scripts/bench_peer.py"))?;
    let out = std::process::Command::new(python)
        .arg(&script)
        .args([
            "--shape",
            shape,
            "--steps",
            &steps.to_string(),
            "--reps",
            &reps.to_string(),
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
