//! Stage 1 of InstructGPT (Ouyang et al. 2022, §3.5): supervised fine-tuning of a causal LM on
//! demonstrations (prompt → good response), with the loss on the response tokens and EOS only; or
//! on conversations in TRL's formats (`messages`, or `prompt`/`completion` message lists) rendered
//! with a chat template, with the loss TRL's `SFTTrainer` takes by default.
//!
//! The loop reads top to bottom: load model and tokenizer → load, de-duplicate, split and tokenise
//! the records → for each optimizer step: micro-batches, backward, global-norm clip, AdamW
//! with warmup + decay → log, evaluate, checkpoint. The shared plumbing is in the `trainer` crate.
//! It renders nothing itself: plain prompts go through one prompt template string, conversations
//! through the model folder's chat template (`model::chat`).

#![forbid(unsafe_code)]

pub mod loss;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Device;
use datasets::split::{dedup, split_by_prompt};
use datasets::tokenize::{
    SftExample, Tokenized, lm_batch, pack, tokenize_conversation, tokenize_demonstration,
};
use datasets::{Conversation, Demonstration, Format, SftRecords, Source, load_sft_records};
use model::chat::{ChatTemplate, SpecialTokens};
use model::tokenizer::{
    BPE_MAX_BYTES, BPE_MAX_RUN_CHARS, BPE_MAX_TEXT_BYTES, BpeCorpus, EOS_TOKEN, PAD_TOKEN,
};
use model::{CausalLm, Heads, ModelConfig, ModelMeta, PromptTemplate, Tokenizer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, json};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
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
    /// Demonstrations file: .jsonl, .jsonl.gz, .csv or .parquet; plain (`prompt`, `response`) or
    /// conversational (`messages`, or `prompt` and `completion` message lists; not CSV).
    pub path: PathBuf,
    #[serde(default)]
    pub format: Option<Format>,
    /// Our field → the file's column, e.g. { prompt = "question", response = "answer" }.
    #[serde(default)]
    pub columns: HashMap<String, String>,
    /// Plain data: how a prompt is shown to the model; `{prompt}` is replaced. Default: the
    /// template stored with the base model (`rlhf.json`), else `Human: {prompt}\n\nAssistant:`.
    /// An error with conversational data (the chat template formats it).
    #[serde(default)]
    pub template: Option<String>,
    /// Conversational data: a `.jinja` chat template to render it with instead of the model
    /// folder's (`model.base`, or the checkpoint resumed from); needed for a new `preset` model.
    #[serde(default)]
    pub chat_template: Option<PathBuf>,
    /// Conversational data: train on the assistant turns only (each with its end-of-turn
    /// token), as TRL's `assistant_only_loss`. Off (TRL's default): the `messages` form trains
    /// every token, the prompt/completion form its completion. Plain data always trains the
    /// response and EOS only.
    #[serde(default)]
    pub assistant_only_loss: bool,
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

/// Loads model and tokenizer: from `resume`, from `model.base`, or new from `model.preset` (with
/// a BPE trained on `corpus` unless `model.tokenizer` is given).
fn load_model(
    cfg: &SftConfig,
    corpus: impl FnOnce() -> Result<BpeCorpus>,
    noun: &str,
    resume: Option<&Path>,
    device: &Device,
) -> Result<(CausalLm, Tokenizer)> {
    let tokenizer = cfg.model.tokenizer.as_deref();
    if let (Some(lora), Some(base)) = (&cfg.lora, &cfg.model.base) {
        // The base as given, frozen, with new adapters or (resuming) the checkpoint's.
        let (m, tok, _) =
            model::checkpoint::load_with_tokenizer(base, Some(Heads::LM), tokenizer, device)?;
        let m = m.adapt(lora, cfg.seed, resume)?.keep_frozen(cfg.dtype);
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
                let corpus = corpus()?;
                let tok = Tokenizer::train_bpe_on(&corpus, cfg.model.vocab_size)?;
                println!("{}", bpe_line(&tok, &corpus, noun));
                tok
            }
        };
        let mut mc = ModelConfig::preset(preset, tok.vocab_size())?;
        mc.set_special_tokens(&tok);
        (CausalLm::new(&mc, false, cfg.seed, device)?, tok)
    };
    Ok((m.with_dropout(cfg.model.dropout), tok))
}

/// "tokenizer: a BPE of N tokens trained on B bytes of the data's text", with what was
/// cut or left out of it to keep its training bounded ([`BpeCorpus`]).
fn bpe_line(tok: &Tokenizer, corpus: &BpeCorpus, noun: &str) -> String {
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
        "tokenizer: a BPE of {} tokens trained on {} bytes of the {noun}' text{bounded}",
        tok.vocab_size(),
        corpus.bytes
    )
}

/// Bytes of the largest record [`why_none_left`] tokenizes to suggest a max_length.
const SUGGEST_MAX_BYTES: usize = 1 << 20;

/// A kind of SFT record and how it becomes tokens: a [`Demonstration`] through a prompt template,
/// a [`KeyedConversation`] through a chat template.
trait SftRecord: Clone {
    /// What formats the records.
    type Format;
    /// What the records are called in messages.
    const NOUN: &'static str;
    /// What an example's length counts, for the `data.max_length` message.
    const LENGTH: &'static str;
    /// What to check when a record renders to no tokens.
    const EMPTY_FIX: &'static str;
    /// What the train/validation split groups by: a prompt goes wholly to one side.
    fn split_key(&self) -> &str;
    fn tokenize(&self, tok: &Tokenizer, format: &Self::Format, max_len: usize)
    -> Result<Tokenized>;
    /// Bytes of the text [`SftRecord::tokenize`] encodes.
    fn text_bytes(&self, format: &Self::Format) -> usize;
}

impl SftRecord for Demonstration {
    type Format = PromptTemplate;
    const NOUN: &'static str = "demonstrations";
    const LENGTH: &'static str = "prompt with its template + response + EOS";
    const EMPTY_FIX: &'static str = "check data.template and the file's prompt column";
    fn split_key(&self) -> &str {
        &self.prompt
    }
    fn tokenize(
        &self,
        tok: &Tokenizer,
        template: &PromptTemplate,
        max_len: usize,
    ) -> Result<Tokenized> {
        Ok(tokenize_demonstration(tok, template, self, max_len)?)
    }
    fn text_bytes(&self, template: &PromptTemplate) -> usize {
        template.rendered_len(&self.prompt) + self.response.len()
    }
}

/// How conversations are tokenized: their chat template, and `data.assistant_only_loss`.
pub struct ChatFormat {
    pub template: ChatTemplate,
    pub assistant_only_loss: bool,
}

/// A conversation with what the split groups it by: the JSON of its turns before the
/// completion (prompt/completion form) or before its first assistant turn (`messages` form), so
/// that conversations opening the same way are never on both sides.
#[derive(Clone, Debug)]
pub struct KeyedConversation {
    key: String,
    conversation: Conversation,
}

impl KeyedConversation {
    pub fn new(conversation: Conversation) -> Self {
        let opening = match conversation.completion_start {
            Some(_) => conversation.prompt(),
            None => {
                let m = &conversation.messages;
                &m[..m
                    .iter()
                    .position(|m| m.role == "assistant")
                    .unwrap_or(m.len())]
            }
        };
        Self {
            key: serde_json::to_string(opening).expect("messages are JSON"),
            conversation,
        }
    }
}

impl SftRecord for KeyedConversation {
    type Format = ChatFormat;
    const NOUN: &'static str = "conversations";
    const LENGTH: &'static str = "the conversation rendered with its chat template";
    const EMPTY_FIX: &'static str = "check the chat template";
    fn split_key(&self) -> &str {
        &self.key
    }
    fn tokenize(&self, tok: &Tokenizer, f: &ChatFormat, max_len: usize) -> Result<Tokenized> {
        let c = &self.conversation;
        tokenize_conversation(tok, &f.template, c, max_len, f.assistant_only_loss).with_context(
            || match f.assistant_only_loss {
                true => format!("line {} (data.assistant_only_loss = true)", c.line),
                false => format!("line {}", c.line),
            },
        )
    }
    fn text_bytes(&self, f: &ChatFormat) -> usize {
        f.template
            .render(&self.conversation.messages, false)
            .map_or(usize::MAX, |t| t.len())
    }
}

/// Conversations without exact repeats (the same turns and the same completion start), the first
/// kept; and how many were removed.
fn dedup_conversations(conversations: Vec<Conversation>) -> (Vec<KeyedConversation>, usize) {
    let total = conversations.len();
    let mut seen = HashSet::new();
    let kept: Vec<KeyedConversation> = conversations
        .into_iter()
        .filter(|c| {
            seen.insert(
                serde_json::to_string(&(&c.messages, c.completion_start))
                    .expect("messages are JSON"),
            )
        })
        .map(KeyedConversation::new)
        .collect();
    let removed = total - kept.len();
    (kept, removed)
}

/// Records dropped while tokenizing, by reason.
struct Dropped<R> {
    /// Longer than data.max_length tokens...
    too_long: usize,
    /// ...of which these had too many bytes to be tokenized at all.
    untokenized: usize,
    /// The fewest tokens of a dropped one, among those tokenized.
    shortest: Option<usize>,
    /// The untokenized one with the fewest bytes, if it has at most [`SUGGEST_MAX_BYTES`].
    smallest_untokenized: Option<(usize, R)>,
    /// Records that render to no tokens.
    empty_prompt: usize,
}

impl<R> Default for Dropped<R> {
    fn default() -> Self {
        Self {
            too_long: 0,
            untokenized: 0,
            shortest: None,
            smallest_untokenized: None,
            empty_prompt: 0,
        }
    }
}

/// De-duplicates, splits by prompt and tokenizes plain demonstrations; prints what was dropped
/// and why.
pub fn prepare(
    cfg: &SftConfig,
    demos: &[Demonstration],
    tok: &Tokenizer,
    template: &PromptTemplate,
) -> Result<Prepared> {
    let (demos, dups) = dedup(demos);
    prepare_records(cfg, &demos, dups, tok, template).map(|(p, _)| p)
}

/// [`prepare`] for conversations; also prints how many training tokens the loss covers.
pub fn prepare_conversations(
    cfg: &SftConfig,
    conversations: Vec<Conversation>,
    tok: &Tokenizer,
    format: &ChatFormat,
) -> Result<Prepared> {
    let (conversations, dups) = dedup_conversations(conversations);
    let (data, (targets, tokens)) = prepare_records(cfg, &conversations, dups, tok, format)?;
    let completions = conversations
        .iter()
        .filter(|c| c.conversation.completion_start.is_some())
        .count();
    let what = if format.assistant_only_loss {
        "the assistant turns"
    } else if completions == conversations.len() {
        "the completions"
    } else if completions == 0 {
        "every token but the first of each conversation"
    } else {
        "the completions of prompt/completion records, every token of `messages` records"
    };
    println!("loss: {targets} of the {tokens} training tokens ({what})");
    Ok(data)
}

/// Splits by prompt and tokenizes `records` (of which `dups` duplicates were removed); prints
/// what was dropped and why. Also returns (tokens the loss covers, tokens) of the training
/// examples before packing.
fn prepare_records<R: SftRecord>(
    cfg: &SftConfig,
    records: &[R],
    dups: usize,
    tok: &Tokenizer,
    format: &R::Format,
) -> Result<(Prepared, (usize, usize))> {
    let noun = R::NOUN;
    let (train_d, valid_d) = split_by_prompt(
        records,
        |d| d.split_key(),
        cfg.data.validation_fraction,
        cfg.seed,
    );
    let max_len = cfg.data.max_length;
    // More bytes than max_length tokens can stand for: dropped before tokenizing.
    let max_bytes = max_len.saturating_mul(tok.max_token_bytes());
    let mut dropped = Dropped::default();
    let mut tokenize = |ds: &[R]| -> Result<Vec<SftExample>> {
        let mut out = Vec::with_capacity(ds.len());
        for d in ds {
            match d.tokenize(tok, format, max_len)? {
                Tokenized::Example(e) => out.push(e),
                Tokenized::TooLong(n) => {
                    dropped.too_long += 1;
                    match n {
                        Some(n) => {
                            dropped.shortest = Some(dropped.shortest.map_or(n, |s| s.min(n)))
                        }
                        None => {
                            dropped.untokenized += 1;
                            let bytes = d.text_bytes(format);
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
    // The loss targets of an example are its target tokens after the first (lm_batch shifts).
    let targets = train
        .iter()
        .map(|e| e.is_target.iter().skip(1).filter(|&&t| t).count())
        .sum::<usize>();
    let tokens = train.iter().map(SftExample::len).sum::<usize>();
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
    let total = records.len() + dups;
    println!(
        "data: {total} {noun}, {dups} duplicates removed, {} longer than {max_len} tokens dropped{untokenized}{empty}; {} train, {} validation",
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
            why_none_left(cfg, tok, format, &dropped, (total, dups, valid.len()))
        );
    }
    Ok((Prepared { train, valid }, (targets, tokens)))
}

/// Why no training example is left (of `total` records, `dups` duplicates, `valid` held
/// out), and what to change.
fn why_none_left<R: SftRecord>(
    cfg: &SftConfig,
    tok: &Tokenizer,
    format: &R::Format,
    dropped: &Dropped<R>,
    (total, dups, valid): (usize, usize, usize),
) -> String {
    let noun = R::NOUN;
    let max_len = cfg.data.max_length;
    let mut reasons = Vec::new();
    let mut fixes = Vec::new();
    if dups > 0 {
        reasons.push(format!("{dups} duplicates"));
    }
    if dropped.too_long > 0 {
        reasons.push(format!(
            "{} longer than data.max_length = {max_len} tokens ({})",
            dropped.too_long,
            R::LENGTH
        ));
        // A max_length that keeps one: the fewest tokens of a tokenized one, else the tokens
        // of the untokenized one with the fewest bytes (when it is small enough to tokenize).
        let untokenized = dropped
            .smallest_untokenized
            .as_ref()
            .and_then(|(_, d)| d.tokenize(tok, format, usize::MAX).ok())
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
        fixes.push(R::EMPTY_FIX.into());
    }
    let reasons = reasons.join(", ");
    let fraction = cfg.data.validation_fraction;
    let what = if valid == 0 {
        format!("all {total} {noun} were dropped: {reasons}")
    } else if reasons.is_empty() {
        fixes.push("lower data.validation_fraction".into());
        format!(
            "all {total} {noun} are held out for validation (data.validation_fraction = {fraction})"
        )
    } else {
        fixes.push("lower data.validation_fraction".into());
        format!(
            "of {total} {noun} {valid} are held out for validation (data.validation_fraction = {fraction}) and the other {} were dropped: {reasons}",
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

/// A run's model, tokenizer and tokenized data, and what `rlhf.json` records of it.
struct Setup {
    model: CausalLm,
    tok: Tokenizer,
    data: Prepared,
    meta: ModelMeta,
}

/// Plain demonstrations: formatted by the prompt template (`data.template`, else the one
/// stored with the model folder, else the default).
fn setup_plain(
    cfg: &SftConfig,
    mut demos: Vec<Demonstration>,
    resume: Option<&Path>,
    device: &Device,
) -> Result<Setup> {
    if let Some(file) = &cfg.data.chat_template {
        bail!(
            "data.chat_template = {:?}: {} holds plain `prompt`/`response` records, which data.template formats; remove data.chat_template, or write the data as conversations (`messages`, or `prompt`/`completion` message lists)",
            file.display(),
            cfg.data.path.display()
        );
    }
    let template = model::checkpoint::resolve_template(
        cfg.data.template.as_deref(),
        resume.or(cfg.model.base.as_deref()),
    )?;
    let meta = ModelMeta {
        stage: Some("sft".into()),
        prompt_template: Some(template.as_str().to_string()),
        ..ModelMeta::default()
    };
    if cfg.data.max_examples > 0 {
        demos.truncate(cfg.data.max_examples);
    }
    let corpus = || {
        Ok(BpeCorpus::new(demos.iter().flat_map(|d| {
            [
                Cow::Owned(template.render(&d.prompt)),
                Cow::Borrowed(d.response.as_str()),
            ]
        })))
    };
    let (model, tok) = load_model(cfg, corpus, "demonstrations", resume, device)?;
    let data = prepare(cfg, &demos, &tok, &template)?;
    Ok(Setup {
        model,
        tok,
        data,
        meta,
    })
}

/// What `rlhf.json` records for a chat template read from the model folder.
const FOLDER_TEMPLATE: &str = "model folder";

/// The source of the chat template `ChatTemplate::from_dir(dir)` compiled, found as it finds it
/// (`chat_template.jinja`, `additional_chat_templates/default.jinja`, tokenizer_config.json's
/// `chat_template`: a string, or the entry named "default" of a list).
fn folder_template_source(dir: &Path) -> Result<String> {
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))
    };
    for file in [
        "chat_template.jinja",
        "additional_chat_templates/default.jinja",
    ] {
        if dir.join(file).is_file() {
            return read(dir.join(file));
        }
    }
    let path = dir.join("tokenizer_config.json");
    let config: serde_json::Value = serde_json::from_str(&read(path.clone())?)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let source = match &config["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|e| e["name"] == "default")
            .and_then(|e| e["template"].as_str().map(str::to_string)),
        _ => None,
    };
    source.with_context(|| format!("{}: no chat_template", path.display()))
}

/// The special tokens a `data.chat_template` file is rendered with: those of the
/// tokenizer_config.json beside the tokenizer the run uses (`model.tokenizer`, else the model
/// folder's), else the tokenizer's bos / eos / pad, else those of the BPE a new model trains.
fn special_tokens(cfg: &SftConfig, folder: Option<&Path>) -> Result<SpecialTokens> {
    let tokenizer = cfg
        .model
        .tokenizer
        .clone()
        .or_else(|| folder.map(model::tokenizer::tokenizer_path));
    let Some(tokenizer) = tokenizer else {
        return Ok(SpecialTokens::new()
            .with("bos_token", EOS_TOKEN)
            .with("eos_token", EOS_TOKEN)
            .with("pad_token", PAD_TOKEN));
    };
    let config = tokenizer.with_file_name("tokenizer_config.json");
    if config.is_file() {
        let text = std::fs::read_to_string(&config)
            .with_context(|| format!("{}: cannot read", config.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", config.display()))?;
        return Ok(SpecialTokens::from_tokenizer_config(&value));
    }
    let tok = Tokenizer::from_file(&tokenizer, None, None, None)?;
    let mut special = SpecialTokens::new();
    let ids = [
        ("bos_token", tok.bos_id),
        ("eos_token", Some(tok.eos_id)),
        ("pad_token", Some(tok.pad_id)),
    ];
    for (name, id) in ids {
        if let Some(token) = id.and_then(|i| tok.id_to_token(i)) {
            special = special.with(name, &token);
        }
    }
    Ok(special)
}

/// The chat template of conversational data, its source, and what `rlhf.json` records:
/// `data.chat_template`'s file, else the model folder's (`resume`, else `model.base`).
fn chat_template(cfg: &SftConfig, folder: Option<&Path>) -> Result<(ChatTemplate, String, String)> {
    if let Some(file) = &cfg.data.chat_template {
        let source = std::fs::read_to_string(file)
            .with_context(|| format!("data.chat_template = {:?}: cannot read", file.display()))?;
        let template = ChatTemplate::new(&source, special_tokens(cfg, folder)?)
            .with_context(|| format!("data.chat_template = {:?}", file.display()))?;
        return Ok((template, source, file.display().to_string()));
    }
    let Some(dir) = folder else {
        bail!(
            "{} holds conversations, which need a chat template, and a new model.preset model has none; set model.base to a model folder with a chat template, or data.chat_template to a .jinja file",
            cfg.data.path.display()
        );
    };
    let Some(template) = ChatTemplate::from_dir(dir)? else {
        bail!(
            "{} holds conversations, which need a chat template, and the model folder {} has none (no chat_template in tokenizer_config.json, no chat_template.jinja); give model.base a model with a chat template, or set data.chat_template to a .jinja file",
            cfg.data.path.display(),
            dir.display()
        );
    };
    Ok((
        template,
        folder_template_source(dir)?,
        FOLDER_TEMPLATE.to_string(),
    ))
}

/// Conversations: rendered with the chat template, which the saved tokenizer_config.json
/// carries (`chat_template`) so that later stages and transformers render the same way.
fn setup_chat(
    cfg: &SftConfig,
    mut conversations: Vec<Conversation>,
    resume: Option<&Path>,
    device: &Device,
) -> Result<Setup> {
    if let Some(t) = &cfg.data.template {
        bail!(
            "data.template = {t:?}: {} holds conversations (message lists), which the chat template formats, not a prompt template; remove data.template (set data.chat_template to a .jinja file to use another chat template)",
            cfg.data.path.display()
        );
    }
    let (template, source, recorded) = chat_template(cfg, resume.or(cfg.model.base.as_deref()))?;
    let meta = ModelMeta {
        stage: Some("sft".into()),
        chat_template: Some(recorded),
        ..ModelMeta::default()
    };
    if cfg.data.max_examples > 0 {
        conversations.truncate(cfg.data.max_examples);
    }
    let corpus = || {
        let texts = conversations
            .iter()
            .map(|c| template.render(&c.messages, false))
            .collect::<model::Result<Vec<String>>>()?;
        Ok(BpeCorpus::new(texts))
    };
    let (model, mut tok) = load_model(cfg, corpus, "conversations", resume, device)?;
    tok.set_chat_template(&source);
    let format = ChatFormat {
        template,
        assistant_only_loss: cfg.data.assistant_only_loss,
    };
    let data = prepare_conversations(cfg, conversations, &tok, &format)?;
    Ok(Setup {
        model,
        tok,
        data,
        meta,
    })
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
    let source = Source {
        path: cfg.data.path.clone(),
        format: cfg.data.format,
        columns: cfg.data.columns.clone(),
    };
    let Setup {
        mut model,
        tok,
        data,
        meta,
    } = match load_sft_records(&source)? {
        SftRecords::Plain(demos) if demos.is_empty() => bail!(
            "{}: no demonstrations: the file has no records; give data.path a file with `prompt` and `response` fields",
            cfg.data.path.display()
        ),
        SftRecords::Plain(demos) => setup_plain(cfg, demos, resume, &device)?,
        SftRecords::Chat(conversations) => setup_chat(cfg, conversations, resume, &device)?,
    };
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
        trainer::seed_step(&device, cfg.seed, step);
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
