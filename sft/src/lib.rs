//! Stage 1 of InstructGPT (Ouyang et al. 2022, §3.5): supervised fine-tuning of a causal LM on
//! demonstrations (prompt → good response), with the loss on the response tokens and EOS only.
//!
//! The loop reads top to bottom: load model and tokenizer → load, de-duplicate, split and tokenise
//! the demonstrations → for each optimizer step: micro-batches, backward, global-norm clip, AdamW
//! with warmup + decay → log, evaluate, checkpoint. The shared plumbing is in the `trainer` crate.
//! It is not a chat-template engine: one prompt template string formats every prompt.

pub mod loss;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams};
use burn::tensor::Device;
use datasets::split::{dedup, split_by_prompt};
use datasets::tokenize::{SftExample, lm_batch, pack, sft_example};
use datasets::{Demonstration, Format, Source, load_demonstrations};
use model::ops::{clip_grad_norm, mask_tensor, token_tensor};
use model::{CausalLm, ModelConfig, PromptTemplate, Tokenizer};
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde::{Deserialize, Serialize};
use serde_json::{Map, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use trainer::schedule::{Decay, Schedule};
use trainer::state::{
    TrainerState, load_optimizer, load_state, prune_checkpoints, save_best, save_checkpoint,
};

fn default_device() -> String {
    "cpu".into()
}

/// The `sft` config (configs/sft.toml documents every key).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// Output folder: config.toml, metrics.jsonl, checkpoint-*/, best/, final/.
    pub out: PathBuf,
    /// Seed of the model init, the data order, the split and dropout.
    #[serde(default)]
    pub seed: u64,
    /// `cpu` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// An HF model folder to fine-tune; when absent, a new model from `preset`.
    #[serde(default)]
    pub base: Option<PathBuf>,
    /// tiny, small, medium or large: a new Llama-architecture model.
    #[serde(default)]
    pub preset: Option<String>,
    /// A tokenizer.json to use instead of the base model's; for a new model, instead of training
    /// a BPE on the training texts.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of the BPE trained for a new model.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Dropout on embeddings and residual branches; 0 as most fine-tuning recipes.
    #[serde(default)]
    pub dropout: f64,
}

fn default_vocab() -> usize {
    4096
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Demonstrations file: .jsonl, .jsonl.gz, .csv or .parquet.
    pub path: PathBuf,
    #[serde(default)]
    pub format: Option<Format>,
    /// Our field → the file's column, e.g. { prompt = "question", response = "answer" }.
    #[serde(default)]
    pub columns: HashMap<String, String>,
    /// How a prompt is shown to the model; `{prompt}` is replaced.
    #[serde(default = "default_template")]
    pub template: String,
    /// Share of prompts held out for validation (by prompt, never split across sides).
    #[serde(default = "default_val")]
    pub validation_fraction: f64,
    /// Longest example in tokens (prompt + response + EOS); longer ones are dropped and counted.
    #[serde(default = "default_max_len")]
    pub max_length: usize,
    /// Concatenate short training examples into rows of up to max_length tokens.
    #[serde(default)]
    pub packing: bool,
    /// Use only the first N demonstrations (0 = all).
    #[serde(default)]
    pub max_examples: usize,
}

fn default_template() -> String {
    "Human: {prompt}\n\nAssistant:".into()
}
fn default_val() -> f64 {
    0.05
}
fn default_max_len() -> usize {
    512
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Examples per micro-batch.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    /// Passes over the training split (when max_steps is 0).
    #[serde(default = "d_one")]
    pub epochs: usize,
    /// Optimizer steps; 0 means `epochs` decide.
    #[serde(default)]
    pub max_steps: usize,
    /// Peak learning rate.
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    /// cosine, linear or constant after warmup.
    #[serde(default = "d_decay")]
    pub decay: Decay,
    /// The decay ends at min_lr_ratio · lr.
    #[serde(default = "d_min_lr")]
    pub min_lr_ratio: f64,
    /// AdamW (decoupled) weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_beta1")]
    pub beta1: f64,
    #[serde(default = "d_beta2")]
    pub beta2: f64,
    #[serde(default = "d_eps")]
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables.
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    /// Write metrics every N steps.
    #[serde(default = "d_one")]
    pub log_every: usize,
    /// Evaluate every N steps (0: only at the end).
    #[serde(default)]
    pub eval_every: usize,
    /// Examples per validation batch.
    #[serde(default = "d_eval_batch")]
    pub eval_batch_size: usize,
    /// Save a checkpoint every N steps (0: only at the end).
    #[serde(default)]
    pub save_every: usize,
    /// Checkpoints kept (the newest).
    #[serde(default = "d_keep")]
    pub keep_last: usize,
}

fn d_batch() -> usize {
    8
}
fn d_one() -> usize {
    1
}
fn d_lr() -> f64 {
    1e-4
}
fn d_decay() -> Decay {
    Decay::Cosine
}
fn d_min_lr() -> f64 {
    0.1
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_clip() -> f64 {
    1.0
}
fn d_eval_batch() -> usize {
    16
}
fn d_keep() -> usize {
    2
}

/// What a run ends with.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub steps: usize,
    pub train_loss: f64,
    pub eval: Option<EvalMetrics>,
    pub final_dir: PathBuf,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct EvalMetrics {
    pub loss: f64,
    pub perplexity: f64,
    pub token_accuracy: f64,
}

impl EvalMetrics {
    /// Adds `eval_loss`, `eval_perplexity` and `eval_token_accuracy` to a metrics line.
    pub fn record(&self, fields: &mut Map<String, serde_json::Value>) {
        fields.insert("eval_loss".into(), json!(self.loss));
        fields.insert("eval_perplexity".into(), json!(self.perplexity));
        fields.insert("eval_token_accuracy".into(), json!(self.token_accuracy));
    }
}

/// The tokenized data of a run.
pub struct Prepared {
    pub train: Vec<SftExample>,
    pub valid: Vec<SftExample>,
}

/// Loads model and tokenizer: from `resume`, from `model.base`, or new from `model.preset`.
fn load_model(
    cfg: &SftConfig,
    demos: &[Demonstration],
    template: &PromptTemplate,
    resume: Option<&Path>,
    device: &Device,
) -> Result<(CausalLm, Tokenizer)> {
    let from_folder = |dir: &Path| -> Result<(CausalLm, Tokenizer)> {
        let loaded = model::load(dir, device)?;
        let tok = match (&cfg.model.tokenizer, loaded.tokenizer) {
            (Some(p), _) => load_tokenizer(p, loaded.model.config())?,
            (None, Some(t)) => t,
            (None, None) => bail!("{}: no tokenizer.json; set model.tokenizer", dir.display()),
        };
        Ok((loaded.model, tok))
    };
    let (m, tok) = if let Some(dir) = resume {
        from_folder(dir)?
    } else if let Some(base) = &cfg.model.base {
        from_folder(base)?
    } else {
        let preset = cfg.model.preset.as_deref().context(
            "set model.base (an HF model folder) or model.preset (tiny, small, medium, large)",
        )?;
        let tok = match &cfg.model.tokenizer {
            Some(p) => Tokenizer::from_file(p, None, None, None)?,
            None => {
                let texts = demos
                    .iter()
                    .flat_map(|d| [template.render(&d.prompt), d.response.clone()]);
                Tokenizer::train_bpe(texts, cfg.model.vocab_size)?
            }
        };
        let mut mc = ModelConfig::preset(preset, tok.vocab_size())?;
        mc.set_special_tokens(&tok);
        (CausalLm::new(&mc, false, cfg.seed, device)?, tok)
    };
    if tok.vocab_size() > m.config().vocab_size {
        bail!(
            "the tokenizer has {} tokens but the model's vocab_size is {}; use the tokenizer the model was trained with (model.tokenizer), or a model with a larger vocabulary",
            tok.vocab_size(),
            m.config().vocab_size
        );
    }
    Ok((m.with_dropout(cfg.model.dropout), tok))
}

fn load_tokenizer(path: &Path, cfg: &ModelConfig) -> Result<Tokenizer> {
    Ok(Tokenizer::from_file(
        path,
        cfg.bos_token_id,
        cfg.eos_token_id,
        cfg.pad_token_id,
    )?)
}

/// De-duplicates, splits by prompt and tokenizes; prints what was dropped.
pub fn prepare(
    cfg: &SftConfig,
    demos: &[Demonstration],
    tok: &Tokenizer,
    template: &PromptTemplate,
) -> Result<Prepared> {
    let (demos, dups) = dedup(demos);
    let (train_d, valid_d) = split_by_prompt(
        &demos,
        |d| &d.prompt,
        cfg.data.validation_fraction,
        cfg.seed,
    );
    let mut too_long = 0;
    let mut tokenize = |ds: &[Demonstration]| -> Result<Vec<SftExample>> {
        let mut out = Vec::with_capacity(ds.len());
        for d in ds {
            match sft_example(tok, template, d, cfg.data.max_length)? {
                Some(e) => out.push(e),
                None => too_long += 1,
            }
        }
        Ok(out)
    };
    let mut train = tokenize(&train_d)?;
    let valid = tokenize(&valid_d)?;
    println!(
        "data: {} demonstrations, {} duplicates removed, {} longer than {} tokens dropped; {} train, {} validation",
        demos.len() + dups,
        dups,
        too_long,
        cfg.data.max_length,
        train.len(),
        valid.len()
    );
    if cfg.data.packing {
        train = pack(&train, cfg.data.max_length);
        println!("packing: {} training rows", train.len());
    }
    if train.is_empty() {
        bail!("{}: no training examples left", cfg.data.path.display());
    }
    Ok(Prepared { train, valid })
}

/// The training example at position `k` of the seeded order (a new shuffle each epoch).
struct Order {
    n: usize,
    seed: u64,
    epoch: usize,
    perm: Vec<usize>,
}

impl Order {
    fn new(n: usize, seed: u64) -> Self {
        let mut o = Self {
            n,
            seed,
            epoch: usize::MAX,
            perm: Vec::new(),
        };
        o.shuffle(0);
        o
    }

    fn shuffle(&mut self, epoch: usize) {
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ (epoch as u64).wrapping_mul(0x9E3779B97F4A7C15));
        self.perm = (0..self.n).collect();
        self.perm.shuffle(&mut rng);
        self.epoch = epoch;
    }

    fn at(&mut self, k: usize) -> usize {
        let epoch = k / self.n;
        if epoch != self.epoch {
            self.shuffle(epoch);
        }
        self.perm[k % self.n]
    }
}

/// Validation loss, perplexity and token accuracy of `model` (evaluated without autodiff).
pub fn evaluate(
    model: &CausalLm,
    examples: &[SftExample],
    batch_size: usize,
    pad: u32,
) -> Option<EvalMetrics> {
    if examples.is_empty() {
        return None;
    }
    let device = model.device();
    let (mut nll, mut correct, mut total) = (0.0f64, 0usize, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let b = lm_batch(chunk, pad);
        let logits = model.logits(model.forward(&b.inputs));
        let (bs, t) = (b.inputs.batch, b.inputs.seq);
        let targets = token_tensor(&b.targets, bs, t, &device);
        let mask = mask_tensor(&b.target_mask, bs, t, &device);
        nll += loss::nll_sum(logits.clone(), targets.clone(), mask.clone()).into_scalar::<f32>()
            as f64;
        correct += loss::correct_count(logits, targets, mask);
        total += b.num_targets();
    }
    let loss = nll / total.max(1) as f64;
    Some(EvalMetrics {
        loss,
        perplexity: loss.exp(),
        token_accuracy: correct as f64 / total.max(1) as f64,
    })
}

/// Runs SFT with the config and its TOML text as used; `resume` continues from a checkpoint.
pub fn run(cfg: &SftConfig, config_used: &str, resume: Option<&Path>) -> Result<Summary> {
    let base_device = model::parse_device(&cfg.device)?;
    let device = base_device.clone().autodiff();
    let t = &cfg.train;
    if t.batch_size == 0 || t.grad_accum == 0 {
        bail!("train.batch_size and train.grad_accum must be at least 1");
    }
    trainer::prepare_out(&cfg.out, config_used)?;
    let template = PromptTemplate::new(&cfg.data.template)?;
    let source = Source {
        path: cfg.data.path.clone(),
        format: cfg.data.format,
        columns: cfg.data.columns.clone(),
    };
    let mut demos = load_demonstrations(&source)?;
    if cfg.data.max_examples > 0 {
        demos.truncate(cfg.data.max_examples);
    }
    let (mut model, tok) = load_model(cfg, &demos, &template, resume, &device)?;
    let data = prepare(cfg, &demos, &tok, &template)?;

    // Derived values, computed once.
    let per_step = t.batch_size * t.grad_accum;
    let steps_per_epoch = data.train.len().div_ceil(per_step);
    let total_steps = if t.max_steps > 0 {
        t.max_steps
    } else {
        t.epochs * steps_per_epoch
    };
    let schedule = Schedule {
        lr: t.lr,
        warmup_steps: t.warmup_steps,
        total_steps,
        decay: t.decay,
        min_lr_ratio: t.min_lr_ratio,
    };
    let mut optim = AdamWConfig::new()
        .with_beta_1(t.beta1 as f32)
        .with_beta_2(t.beta2 as f32)
        .with_epsilon(t.eps as f32)
        .with_weight_decay(t.weight_decay as f32)
        .init();
    let mut state = TrainerState {
        step: 0,
        examples_seen: 0,
        seed: cfg.seed,
        best_val_loss: None,
        best_step: None,
    };
    if let Some(dir) = resume {
        state = load_state(dir)?;
        optim = load_optimizer(dir, optim)?;
        println!("resumed from {} at step {}", dir.display(), state.step);
    }
    let mut order = Order::new(data.train.len(), cfg.seed);
    let mut metrics = trainer::metrics::Metrics::open(&cfg.out, total_steps, state.step)?;
    // Checkpoints this run can fall back to: (step, folder).
    let mut saved: Vec<(usize, PathBuf)> = resume
        .map(|d| (state.step, d.to_path_buf()))
        .into_iter()
        .collect();
    let mut last_eval = None;
    let mut last_loss = f64::NAN;
    let mut window = (0usize, 0.0f64); // (tokens, seconds) since the last log line

    if state.step == 0
        && let Some(m) = evaluate(&model.valid(), &data.valid, t.eval_batch_size, tok.pad_id)
    {
        // The baseline every later evaluation is compared with.
        let mut fields = Map::new();
        m.record(&mut fields);
        metrics.log(0, fields)?;
    }
    while state.step < total_steps {
        let started = Instant::now();
        // Dropout masks are a function of (seed, step), so a resumed run draws the same ones.
        device.seed(
            cfg.seed
                .wrapping_mul(1_000_003)
                .wrapping_add(state.step as u64),
        );
        let micro: Vec<Vec<SftExample>> = (0..t.grad_accum)
            .map(|m| {
                (0..t.batch_size)
                    .map(|i| {
                        data.train[order.at(state.examples_seen + m * t.batch_size + i)].clone()
                    })
                    .collect()
            })
            .collect();
        let batches: Vec<_> = micro.iter().map(|ex| lm_batch(ex, tok.pad_id)).collect();
        // The loss is the mean over all target tokens of the step, whatever the micro-batching.
        let step_targets: usize = batches
            .iter()
            .map(|b| b.num_targets())
            .sum::<usize>()
            .max(1);
        let mut accumulator = GradientsAccumulator::new();
        let mut step_loss = 0.0;
        let mut step_tokens = 0;
        for b in &batches {
            let (bs, tl) = (b.inputs.batch, b.inputs.seq);
            let logits = model.logits(model.forward(&b.inputs));
            let targets = token_tensor(&b.targets, bs, tl, &device);
            let mask = mask_tensor(&b.target_mask, bs, tl, &device);
            let loss = loss::nll_sum(logits, targets, mask).div_scalar(step_targets as f64);
            step_loss += loss.clone().into_scalar::<f32>() as f64;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            accumulator.accumulate(&model, grads);
            step_tokens += b.inputs.real_tokens();
        }
        // This loss was computed with the weights of step `state.step`: the newest checkpoint
        // known good is one from before that.
        let good = saved
            .iter()
            .rev()
            .find(|(s, p)| *s < state.step && p.exists())
            .map(|(_, p)| p.as_path());
        trainer::check_finite(step_loss, state.step + 1, good)?;
        let mut grads = accumulator.grads();
        let grad_norm = if t.max_grad_norm > 0.0 {
            clip_grad_norm(&model, &mut grads, t.max_grad_norm as f32)
        } else {
            model::ops::grad_norm(&model, &grads)
        };
        let lr = schedule.at(state.step);
        model = optim.step(lr, model, grads);
        state.step += 1;
        state.examples_seen += per_step;
        last_loss = step_loss;
        window.0 += step_tokens;
        window.1 += started.elapsed().as_secs_f64();

        let eval_now = (t.eval_every > 0 && state.step.is_multiple_of(t.eval_every))
            || state.step == total_steps;
        let mut fields = Map::new();
        // One inference copy of the weights serves the evaluation and the best-model save.
        let frozen = eval_now.then(|| model.valid());
        if let Some(frozen) = &frozen
            && let Some(m) = evaluate(frozen, &data.valid, t.eval_batch_size, tok.pad_id)
        {
            m.record(&mut fields);
            if state.best_val_loss.is_none_or(|b| m.loss < b) {
                state.best_val_loss = Some(m.loss);
                state.best_step = Some(state.step);
                save_best(&cfg.out, frozen, Some(&tok))?;
            }
            last_eval = Some(m);
        }
        if state.step.is_multiple_of(t.log_every.max(1))
            || !fields.is_empty()
            || state.step == total_steps
        {
            fields.insert(
                "epoch".into(),
                json!(state.examples_seen as f64 / data.train.len() as f64),
            );
            fields.insert("loss".into(), json!(step_loss));
            fields.insert("lr".into(), json!(lr));
            fields.insert("grad_norm".into(), json!(grad_norm));
            fields.insert(
                "tokens_per_s".into(),
                json!(window.0 as f64 / window.1.max(1e-9)),
            );
            metrics.log(state.step, fields)?;
            window = (0, 0.0);
        }
        if (t.save_every > 0 && state.step.is_multiple_of(t.save_every))
            || state.step == total_steps
        {
            let dir = save_checkpoint(&cfg.out, &model.valid(), Some(&tok), &optim, &state)?;
            prune_checkpoints(&cfg.out, t.keep_last)?;
            saved.push((state.step, dir));
        }
    }
    metrics.finish();
    let final_dir = cfg.out.join("final");
    model::save(&model.valid(), Some(&tok), &final_dir)?;
    let summary = Summary {
        steps: state.step,
        train_loss: last_loss,
        eval: last_eval,
        final_dir,
    };
    std::fs::write(
        cfg.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    Ok(summary)
}

/// Reads the config (with overrides) and runs; what `main` calls.
pub fn run_from_args(args: &trainer::StageArgs) -> Result<Summary> {
    let (cfg, used): (SftConfig, String) =
        trainer::config::load_config(&args.config, &args.all_sets())?;
    run(&cfg, &used, args.resume.as_deref())
}
