//! Stage 1 of InstructGPT (Ouyang et al. 2022, §3.5): supervised fine-tuning of a causal LM on
//! demonstrations (prompt → good response), with the loss on the response tokens and EOS only.
//!
//! The loop reads top to bottom: load model and tokenizer → load, de-duplicate, split and tokenise
//! the demonstrations → for each optimizer step: micro-batches, backward, global-norm clip, AdamW
//! with warmup + decay → log, evaluate, checkpoint. The shared plumbing is in the `trainer` crate.
//! It is not a chat-template engine: one prompt template string formats every prompt.

#![forbid(unsafe_code)]

pub mod loss;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Device;
use datasets::split::{dedup, split_by_prompt};
use datasets::tokenize::{SftExample, Tokenized, lm_batch, pack, tokenize_demonstration};
use datasets::{Demonstration, Format, Source, load_demonstrations};
use model::tokenizer::{BPE_MAX_BYTES, BPE_MAX_RUN_CHARS, BPE_MAX_TEXT_BYTES, BpeCorpus};
use model::{CausalLm, Heads, ModelConfig, ModelMeta, PromptTemplate, Tokenizer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, json};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use trainer::run::{Evaluation, Saving};
use trainer::{Best, Check, Fingerprint, Run, TrainSection};

trainer::stage_config! {
    /// The `sft` config (configs/sft.toml documents every key).
    pub struct SftConfig {
        pub model: ModelSection,
        pub data: DataSection,
        pub train: TrainSection,
        /// LoRA adapters instead of full fine-tuning (absent: every weight trains).
        #[serde(default)]
        pub lora: Option<model::LoraConfig>,
    }
}

impl trainer::StageConfig for SftConfig {
    fn check(&self, c: &mut Check) {
        self.train.check(c);
        c.fraction("data.validation_fraction", self.data.validation_fraction);
        c.at_least("data.max_length", self.data.max_length, 2);
        c.fraction("model.dropout", self.model.dropout);
        c.at_least(
            "model.vocab_size",
            self.model.vocab_size,
            model::tokenizer::MIN_BPE_VOCAB,
        );
        c.lora(self.lora.as_ref(), "model.base", self.model.base.is_some());
        if let Some(preset) = &self.model.preset {
            c.that(
                "model.preset",
                format!("{preset:?}"),
                model::config::PRESETS.contains(&preset.as_str()),
                &format!("one of {}", model::config::PRESETS.join(", ")),
            );
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// An HF model folder to fine-tune; when absent, a new model from `preset`.
    #[serde(default)]
    pub base: Option<PathBuf>,
    /// tiny, mini, small, medium or large: a new Llama-architecture model.
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
    /// How a prompt is shown to the model; `{prompt}` is replaced. Default: the template stored
    /// with the base model (`rlhf.json`), else `Human: {prompt}\n\nAssistant:`.
    #[serde(default)]
    pub template: Option<String>,
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

fn default_val() -> f64 {
    0.05
}
fn default_max_len() -> usize {
    512
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

impl Evaluation for EvalMetrics {
    /// Validation loss picks `best/` (lower is better).
    fn metric(&self) -> f64 {
        self.loss
    }

    /// Adds `eval_loss`, `eval_perplexity` and `eval_token_accuracy` to a metrics line.
    fn record(&self, fields: &mut Map<String, serde_json::Value>) {
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
    let tokenizer = cfg.model.tokenizer.as_deref();
    if let (Some(lora), Some(base)) = (&cfg.lora, &cfg.model.base) {
        // The base as given, frozen, with new adapters or (resuming) the checkpoint's.
        let (m, tok, _) =
            model::checkpoint::load_with_tokenizer(base, Some(Heads::LM), tokenizer, device)?;
        let m = match resume {
            Some(dir) => m.load_lora(&dir.join(model::lora::ADAPTER_DIR))?,
            None => m.with_lora(lora, cfg.seed)?,
        };
        return Ok((m.with_dropout(cfg.model.dropout), tok));
    }
    let (m, tok) = if let Some(dir) = resume.or(cfg.model.base.as_deref()) {
        let (m, tok, _) =
            model::checkpoint::load_with_tokenizer(dir, Some(Heads::LM), tokenizer, device)?;
        (m, tok)
    } else {
        let preset = cfg.model.preset.as_deref().context(
            "set model.base (an HF model folder) or model.preset (tiny, mini, small, medium, large)",
        )?;
        let tok = match tokenizer {
            Some(p) => Tokenizer::from_file(p, None, None, None)?,
            None => {
                let corpus = BpeCorpus::new(demos.iter().flat_map(|d| {
                    [
                        Cow::Owned(template.render(&d.prompt)),
                        Cow::Borrowed(d.response.as_str()),
                    ]
                }));
                let tok = Tokenizer::train_bpe_on(&corpus, cfg.model.vocab_size)?;
                println!("{}", bpe_line(&tok, &corpus));
                tok
            }
        };
        let mut mc = ModelConfig::preset(preset, tok.vocab_size())?;
        mc.set_special_tokens(&tok);
        (CausalLm::new(&mc, false, cfg.seed, device)?, tok)
    };
    Ok((m.with_dropout(cfg.model.dropout), tok))
}

/// "tokenizer: a BPE of N tokens trained on B bytes of the demonstrations' text", with what was
/// cut or left out of it to keep its training bounded ([`BpeCorpus`]).
fn bpe_line(tok: &Tokenizer, corpus: &BpeCorpus) -> String {
    let plural = |n: usize| if n == 1 { "text" } else { "texts" };
    let mut bounded = Vec::new();
    if corpus.cut > 0 {
        bounded.push(format!(
            "{} {} cut to its first {BPE_MAX_TEXT_BYTES} bytes",
            corpus.cut,
            plural(corpus.cut)
        ));
    }
    if corpus.left_out > 0 {
        bounded.push(format!(
            "{} {} left out after the first {BPE_MAX_BYTES} bytes",
            corpus.left_out,
            plural(corpus.left_out)
        ));
    }
    if corpus.split > 0 {
        bounded.push(format!(
            "{} {} split inside runs of over {BPE_MAX_RUN_CHARS} characters",
            corpus.split,
            plural(corpus.split)
        ));
    }
    let bounded = if bounded.is_empty() {
        String::new()
    } else {
        format!(" ({})", bounded.join(", "))
    };
    format!(
        "tokenizer: a BPE of {} tokens trained on {} bytes of the demonstrations' text{bounded}",
        tok.vocab_size(),
        corpus.bytes
    )
}

/// Bytes of the largest demonstration [`why_none_left`] tokenizes to suggest a max_length.
const SUGGEST_MAX_BYTES: usize = 1 << 20;

/// Demonstrations dropped while tokenizing, by reason.
#[derive(Default)]
struct Dropped {
    /// Longer than data.max_length tokens...
    too_long: usize,
    /// ...of which these had too many bytes to be tokenized at all.
    untokenized: usize,
    /// The fewest tokens of a dropped one, among those tokenized.
    shortest: Option<usize>,
    /// The untokenized one with the fewest bytes, if it has at most [`SUGGEST_MAX_BYTES`].
    smallest_untokenized: Option<(usize, Demonstration)>,
    /// Prompts that render to no tokens.
    empty_prompt: usize,
}

/// De-duplicates, splits by prompt and tokenizes; prints what was dropped and why.
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
    let max_len = cfg.data.max_length;
    // More bytes than max_length tokens can stand for: dropped before tokenizing.
    let max_bytes = max_len.saturating_mul(tok.max_token_bytes());
    let mut dropped = Dropped::default();
    let mut tokenize = |ds: &[Demonstration]| -> Result<Vec<SftExample>> {
        let mut out = Vec::with_capacity(ds.len());
        for d in ds {
            match tokenize_demonstration(tok, template, d, max_len)? {
                Tokenized::Example(e) => out.push(e),
                Tokenized::TooLong(n) => {
                    dropped.too_long += 1;
                    match n {
                        Some(n) => {
                            dropped.shortest = Some(dropped.shortest.map_or(n, |s| s.min(n)))
                        }
                        None => {
                            dropped.untokenized += 1;
                            let bytes = template.rendered_len(&d.prompt) + d.response.len();
                            if bytes <= SUGGEST_MAX_BYTES
                                && dropped
                                    .smallest_untokenized
                                    .as_ref()
                                    .is_none_or(|(b, _)| bytes < *b)
                            {
                                dropped.smallest_untokenized = Some((bytes, d.clone()));
                            }
                        }
                    }
                }
                Tokenized::EmptyPrompt => dropped.empty_prompt += 1,
            }
        }
        Ok(out)
    };
    let mut train = tokenize(&train_d)?;
    let valid = tokenize(&valid_d)?;
    let untokenized = if dropped.untokenized > 0 {
        format!(
            " ({} of them over {max_bytes} bytes, not tokenized)",
            dropped.untokenized
        )
    } else {
        String::new()
    };
    let empty = if dropped.empty_prompt > 0 {
        format!(
            ", {} with a prompt of no tokens dropped",
            dropped.empty_prompt
        )
    } else {
        String::new()
    };
    let total = demos.len() + dups;
    println!(
        "data: {total} demonstrations, {dups} duplicates removed, {} longer than {max_len} tokens dropped{untokenized}{empty}; {} train, {} validation",
        dropped.too_long,
        train.len(),
        valid.len()
    );
    if cfg.data.packing {
        train = pack(&train, max_len);
        println!("packing: {} training rows", train.len());
    }
    if train.is_empty() {
        bail!(
            "{}: no training examples left: {}",
            cfg.data.path.display(),
            why_none_left(cfg, tok, template, &dropped, (total, dups, valid.len()))
        );
    }
    Ok(Prepared { train, valid })
}

/// Why no training example is left (of `total` demonstrations, `dups` duplicates, `valid` held
/// out), and what to change.
fn why_none_left(
    cfg: &SftConfig,
    tok: &Tokenizer,
    template: &PromptTemplate,
    dropped: &Dropped,
    (total, dups, valid): (usize, usize, usize),
) -> String {
    let max_len = cfg.data.max_length;
    let mut reasons = Vec::new();
    let mut fixes = Vec::new();
    if dups > 0 {
        reasons.push(format!("{dups} duplicates"));
    }
    if dropped.too_long > 0 {
        reasons.push(format!(
            "{} longer than data.max_length = {max_len} tokens (prompt with its template + response + EOS)",
            dropped.too_long
        ));
        // A max_length that keeps one: the fewest tokens of a tokenized one, else the tokens
        // of the untokenized one with the fewest bytes (when it is small enough to tokenize).
        let untokenized = dropped
            .smallest_untokenized
            .as_ref()
            .and_then(|(_, d)| tokenize_demonstration(tok, template, d, usize::MAX).ok())
            .and_then(|t| match t {
                Tokenized::Example(e) => Some(e.len()),
                _ => None,
            });
        match dropped.shortest.into_iter().chain(untokenized).min() {
            Some(n) => fixes.push(format!(
                "raise data.max_length (data.max_length = {n} keeps at least one)"
            )),
            None => fixes.push("raise data.max_length, or shorten the records".into()),
        }
    }
    if dropped.empty_prompt > 0 {
        reasons.push(format!(
            "{} with a prompt of no tokens",
            dropped.empty_prompt
        ));
        fixes.push("check data.template and the file's prompt column".into());
    }
    let reasons = reasons.join(", ");
    let fraction = cfg.data.validation_fraction;
    let what = if valid == 0 {
        format!("all {total} demonstrations were dropped: {reasons}")
    } else if reasons.is_empty() {
        fixes.push("lower data.validation_fraction".into());
        format!(
            "all {total} demonstrations are held out for validation (data.validation_fraction = {fraction})"
        )
    } else {
        fixes.push("lower data.validation_fraction".into());
        format!(
            "of {total} demonstrations {valid} are held out for validation (data.validation_fraction = {fraction}) and the other {} were dropped: {reasons}",
            total - valid
        )
    };
    format!("{what}; {}", fixes.join(", or "))
}

/// Validation loss, perplexity and token accuracy of `model` (evaluated without autodiff).
pub fn evaluate(
    model: &CausalLm,
    examples: &[SftExample],
    batch_size: usize,
    pad: u32,
) -> Result<Option<EvalMetrics>> {
    if examples.is_empty() {
        return Ok(None);
    }
    let (mut nll, mut correct, mut total) = (0.0f64, 0usize, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let b = lm_batch(chunk, pad);
        let (h, targets) = loss::target_positions(model.forward(&b.inputs), &b);
        let logits = model.logits(h)?;
        nll += loss::nll_sum(logits.clone(), targets.clone()).into_scalar::<f32>() as f64;
        correct += loss::correct_count(logits, targets);
        total += b.num_targets();
    }
    let loss = nll / total.max(1) as f64;
    Ok(Some(EvalMetrics {
        loss,
        perplexity: loss.exp(),
        token_accuracy: correct as f64 / total.max(1) as f64,
    }))
}

/// Runs SFT with the config and its TOML text as used; `resume` continues from a checkpoint.
pub fn run(cfg: &SftConfig, config_used: &str, resume: Option<&Path>) -> Result<Summary> {
    trainer::state::check_checkpoint(resume, "sft")?;
    let device = model::parse_device(&cfg.device)?.autodiff();
    println!(
        "matrix products: {}",
        model::set_matmul_precision(cfg.matmul)
    );
    let t = &cfg.train;
    let template = model::checkpoint::resolve_template(
        cfg.data.template.as_deref(),
        resume.or(cfg.model.base.as_deref()),
    )?;
    let meta = ModelMeta {
        stage: Some("sft".into()),
        prompt_template: Some(template.as_str().to_string()),
        reward_normalization: None,
    };
    let source = Source {
        path: cfg.data.path.clone(),
        format: cfg.data.format,
        columns: cfg.data.columns.clone(),
    };
    let mut demos = load_demonstrations(&source)?;
    if demos.is_empty() {
        bail!(
            "{}: no demonstrations: the file has no records; give data.path a file with `prompt` and `response` fields",
            cfg.data.path.display()
        );
    }
    if cfg.data.max_examples > 0 {
        demos.truncate(cfg.data.max_examples);
    }
    let (mut model, tok) = load_model(cfg, &demos, &template, resume, &device)?;
    let data = prepare(cfg, &demos, &tok, &template)?;

    let per_step = t.examples_per_step();
    let mut fingerprint = Fingerprint::default();
    for e in &data.train {
        fingerprint.tokens(&e.tokens);
    }
    let data_id = (data.train.len(), fingerprint.hex());
    let saving = Saving::new(&tok, &meta, "tokens_per_s", Best::lowest("eval_loss"));
    let (mut run, mut optim, mut order) =
        Run::for_training(cfg.setup(config_used, resume), t, data_id, saving)?;
    let mut last_eval = None;
    let mut last_loss = f64::NAN;
    run.baseline(|| evaluate(&model.valid(), &data.valid, t.eval_batch_size, tok.pad_id))?;
    while !run.done() {
        run.begin_step();
        let step = run.state.step;
        // Dropout masks are a function of (seed, step), so a resumed run draws the same ones.
        device.seed(cfg.seed.wrapping_mul(1_000_003).wrapping_add(step as u64));
        let batches: Vec<_> = order
            .take(run.state.examples_seen, per_step)
            .chunks(t.batch_size)
            .map(|idx| {
                let ex: Vec<SftExample> = idx.iter().map(|&i| data.train[i].clone()).collect();
                lm_batch(&ex, tok.pad_id)
            })
            .collect();
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
            let (h, targets) = loss::target_positions(model.forward(&b.inputs), b);
            let logits = model.logits(h)?;
            let loss = loss::nll_sum(logits, targets).div_scalar(step_targets as f64);
            step_loss += loss.clone().into_scalar::<f32>() as f64;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            accumulator.accumulate(&model, grads);
            step_tokens += b.inputs.real_tokens();
        }
        let fields;
        let grads = accumulator.grads();
        (model, fields) = run.optimizer_step(&mut optim, (model, grads), step_loss, step_tokens)?;
        last_loss = step_loss;
        let evaluated = run.after_step(&model, &optim, fields, |frozen| {
            evaluate(frozen, &data.valid, t.eval_batch_size, tok.pad_id)
        })?;
        last_eval = evaluated.or(last_eval);
    }
    let final_dir = cfg.out.join("final");
    model::save_with_meta(&model.valid(), Some(&tok), &meta, &final_dir)?;
    let summary = Summary {
        steps: run.state.step,
        train_loss: last_loss,
        eval: last_eval,
        final_dir,
    };
    run.finish(&summary)?;
    Ok(summary)
}
