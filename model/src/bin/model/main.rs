//! `model`: inspect checkpoints, sample from them (plain prompts, or chat through the folder's chat
//! template), score texts, merge LoRA adapters, and benchmark against PyTorch.

#![forbid(unsafe_code)]

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use model::chat::{ChatTemplate, Message};
use model::ops::{to_f32_vec, token_logprobs, token_tensor};
use model::{
    CausalLm, PromptTemplate, TokenBatch, Tokenizer, backend_name, flags, generate,
    generate::PromptRoom, generate::SamplingArgs, load, parse_device,
};
use serde_json::{Map, Value};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

mod bench;

#[derive(Parser)]
#[command(
    name = "model",
    version,
    about = "Inspect, sample from, chat with, score, merge and benchmark causal LM checkpoints"
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
    /// Sample a completion of one prompt (`--prompt`), or of every line of a JSONL file
    /// (`--input`).
    #[command(group(clap::ArgGroup::new("prompts").required(true).args(["prompt", "input"])))]
    Generate {
        dir: PathBuf,
        /// The prompt to complete.
        #[arg(long)]
        prompt: Option<String>,
        /// A JSONL file of `{"prompt": ...}` lines; each gives one line
        /// `{"prompt", "completion", "tokens", ...the line's other fields}`, in input order.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Where `--input`'s lines go (written to a temporary file, then renamed); default stdout.
        #[arg(long, requires = "input")]
        out: Option<PathBuf>,
        /// Prompts sampled together with `--input` (grouped by length).
        #[arg(long, default_value_t = 16, allow_negative_numbers = true,
              value_parser = flags::at_least::<usize>(1))]
        batch_size: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Print {"prompt", "completion", "tokens"} as JSON (`--input` always writes JSON).
        #[arg(long)]
        json: bool,
    },
    /// Chat through the model folder's chat template: each line of stdin is a user turn, each
    /// reply is printed and kept in the conversation (end of input ends it). With `--messages`,
    /// one reply to the conversation in a file.
    Chat {
        dir: PathBuf,
        /// A system message that opens the conversation.
        #[arg(long)]
        system: Option<String>,
        /// A JSON file holding a list of `{"role", "content"}` messages ending with a user turn:
        /// print one reply and exit.
        #[arg(long)]
        messages: Option<PathBuf>,
        /// With `--messages`: print {"prompt" (the rendered conversation), "reply", "tokens"}.
        #[arg(long, requires = "messages")]
        json: bool,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Merge a LoRA adapter folder (PEFT's format, or `adapter/` of a LoRA run) into the base
    /// model it was trained on, written as a full model folder.
    Merge {
        base: PathBuf,
        adapter: PathBuf,
        /// The model folder to write (atomically).
        #[arg(long)]
        out: PathBuf,
    },
    /// Sum of token log-probabilities of each `{"text": ...}` line of a JSONL file.
    Score {
        dir: PathBuf,
        #[arg(long)]
        input: PathBuf,
        /// Texts scored per forward pass.
        #[arg(long, default_value_t = 8, allow_negative_numbers = true,
              value_parser = flags::at_least::<usize>(1))]
        batch_size: usize,
    },
    /// Create a new model folder from a preset, with a byte-level BPE trained on text files.
    Init {
        /// tiny, mini, small, medium or large.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Text files (each line a text) to train the tokenizer on.
        #[arg(long, required = true, num_args = 1..)]
        texts: Vec<PathBuf>,
        /// Tokenizer vocabulary size, special tokens included.
        #[arg(long, default_value_t = 4096, allow_negative_numbers = true,
              value_parser = flags::at_least::<usize>(model::tokenizer::MIN_BPE_VOCAB))]
        vocab_size: usize,
        #[arg(long, default_value_t = 0, allow_negative_numbers = true,
              value_parser = flags::at_least::<u64>(0))]
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
        #[arg(long, default_value_t = 5, allow_negative_numbers = true,
              value_parser = flags::at_least::<usize>(1))]
        steps: usize,
        /// Timed generation runs (after 1 untimed).
        #[arg(long, default_value_t = 2, allow_negative_numbers = true,
              value_parser = flags::at_least::<usize>(1))]
        reps: usize,
        /// Rounds, each measuring ours then the peer; the table takes each side's best round (a
        /// shared machine's noise only ever slows a run down).
        #[arg(long, default_value_t = 2, allow_negative_numbers = true,
              value_parser = flags::at_least::<usize>(1))]
        rounds: usize,
        /// Our matrix products: fp32, or bf16 (the `matmul` config key). With bf16 the peer runs
        /// twice: fp32 (PyTorch's default) and with oneDNN's bf16 matmuls (the like-for-like).
        #[arg(long, value_enum, default_value_t = model::MatmulPrecision::Fp32)]
        matmul: model::MatmulPrecision,
    },
}

model::global_allocator!();

fn main() {
    model::runtime::start();
    let cli = Cli::parse();
    model::runtime::exit_on_error(model::device::in_pool(|| run(cli)));
}

fn run(cli: Cli) -> Result<()> {
    let device = parse_device(&cli.device)?;
    match cli.command {
        Command::Info { dir } => info(&dir, &device),
        Command::Generate {
            dir,
            prompt,
            input,
            out,
            batch_size,
            sampling,
            json,
        } => {
            sampling.check()?;
            let loaded = load(&dir, &device)?;
            let tok = loaded.tokenizer.with_context(|| {
                format!("{}: no tokenizer.json in the model folder", dir.display())
            })?;
            let template = sampling.template(&dir)?;
            if !loaded.model.has_lm_head() {
                bail!(
                    "{}: the model has no LM head: it is a reward or value model; sample from a policy or SFT model folder",
                    dir.display()
                );
            }
            let room = PromptRoom::new(&loaded.model, &dir, sampling.max_new_tokens)?;
            if let Some(input) = input {
                let lines = read_prompt_lines(&input, &tok, &template, &room)?;
                return generate_file(
                    &loaded.model,
                    &tok,
                    &sampling,
                    lines,
                    batch_size,
                    out.as_deref(),
                );
            }
            let prompt = prompt.context("give --prompt TEXT or --input FILE")?;
            let ids = room
                .encode(&tok, &template, &prompt)
                .map_err(|e| anyhow::anyhow!("--prompt: {e:#}"))?;
            if ids.is_empty() {
                bail!("the prompt is empty after tokenization");
            }
            let cfg = sampling.config(tok.eos_id, tok.pad_id);
            let g = generate(&loaded.model, &[ids], &cfg)?;
            let tokens = without_eos(&g.responses()[0], tok.eos_id);
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
            if !model::config::PRESETS.contains(&preset.as_str()) {
                bail!(
                    "--preset {preset:?}: unknown preset; use one of {}",
                    model::config::PRESETS.join(", ")
                );
            }
            let mut lines = Vec::new();
            for path in &texts {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("{}: cannot read", path.display()))?;
                let text = std::str::from_utf8(&bytes).map_err(|e| {
                    let at = e.valid_up_to();
                    let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
                    anyhow::anyhow!(
                        "{}: line {line}: bytes that are not UTF-8 (at byte {at}); re-save the file as UTF-8",
                        path.display()
                    )
                })?;
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
        } => score(&dir, &input, batch_size, &device),
        Command::Chat {
            dir,
            system,
            messages,
            json,
            sampling,
        } => chat(&dir, system, messages.as_deref(), json, &sampling, &device),
        Command::Merge { base, adapter, out } => merge(&base, &adapter, &out, &device),
        Command::Bench {
            shape,
            python,
            steps,
            reps,
            rounds,
            matmul,
        } => bench::run(
            &shape,
            python.as_deref(),
            (steps, reps, rounds),
            matmul,
            &device,
        ),
    }
}

fn without_eos(response: &[u32], eos: u32) -> Vec<u32> {
    response.iter().copied().filter(|&t| t != eos).collect()
}

/// One line of a `generate --input` file: its prompt, the other fields, the templated tokens.
struct PromptLine {
    prompt: String,
    fields: Map<String, Value>,
    tokens: Vec<u32>,
}

/// Reads every non-blank line of `input` (`{"prompt": ..., ...}`); an error names the file, the
/// line and the field. A prompt that does not fit in `room` is an error too.
fn read_prompt_lines(
    input: &Path,
    tok: &Tokenizer,
    template: &PromptTemplate,
    room: &PromptRoom,
) -> Result<Vec<PromptLine>> {
    let file =
        std::fs::File::open(input).with_context(|| format!("{}: cannot open", input.display()))?;
    let mut lines = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let at = |msg: &str| format!("{}: line {}: {msg}", input.display(), i + 1);
        let line = line.with_context(|| at("cannot read"))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).with_context(|| at("not valid JSON"))?;
        let Value::Object(mut fields) = v else {
            bail!(at("expected a JSON object with a `prompt` field"));
        };
        let prompt = match fields.remove("prompt") {
            Some(Value::String(p)) => p,
            Some(other) => bail!(at(&format!(
                "field `prompt` must be a string, found {other}"
            ))),
            None => bail!(at("field `prompt` is missing")),
        };
        let tokens = room
            .encode(tok, template, &prompt)
            .map_err(|e| anyhow::anyhow!(at(&format!("field `prompt`: {e:#}"))))?;
        if tokens.is_empty() {
            bail!(at("field `prompt` is empty after tokenization"));
        }
        lines.push(PromptLine {
            prompt,
            fields,
            tokens,
        });
    }
    if lines.is_empty() {
        bail!("{}: no prompts", input.display());
    }
    Ok(lines)
}

/// Samples a completion of every line, `batch_size` prompts of similar length at a time (batch k
/// sampled with seed + k), and writes the lines in input order to `out` (atomically) or stdout.
fn generate_file(
    model: &CausalLm,
    tok: &Tokenizer,
    sampling: &SamplingArgs,
    lines: Vec<PromptLine>,
    batch_size: usize,
    out: Option<&Path>,
) -> Result<()> {
    let mut order: Vec<usize> = (0..lines.len()).collect();
    order.sort_by_key(|&i| lines[i].tokens.len());
    let mut completions: Vec<Option<Vec<u32>>> = vec![None; lines.len()];
    for (k, chunk) in order.chunks(batch_size).enumerate() {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| lines[i].tokens.clone()).collect();
        let mut cfg = sampling.config(tok.eos_id, tok.pad_id);
        cfg.seed = sampling.seed.wrapping_add(k as u64);
        let g = generate(model, &prompts, &cfg)?;
        for (&i, r) in chunk.iter().zip(g.responses()) {
            completions[i] = Some(without_eos(&r, tok.eos_id));
        }
    }
    let mut text = String::new();
    for (line, tokens) in lines.into_iter().zip(completions) {
        let tokens = tokens.expect("every line was sampled");
        let mut v = line.fields;
        v.insert("prompt".into(), line.prompt.into());
        v.insert("completion".into(), tok.decode(&tokens)?.into());
        v.insert("tokens".into(), tokens.into());
        text.push_str(&Value::Object(v).to_string());
        text.push('\n');
    }
    match out {
        Some(path) => {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "generations.jsonl".into());
            let tmp = path.with_file_name(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        }
        None => std::io::stdout().lock().write_all(text.as_bytes())?,
    }
    Ok(())
}

/// End-of-turn tokens of common chat templates (ChatML, Llama 3, Gemma): a reply stops at the
/// tokenizer's EOS and at any of these the vocabulary holds.
const END_OF_TURN: [&str; 3] = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>"];

/// A model folder loaded for chat: its model, tokenizer, chat template and what ends a reply.
struct Chat {
    model: CausalLm,
    tok: Tokenizer,
    template: ChatTemplate,
    room: PromptRoom,
    stops: Vec<u32>,
}

impl Chat {
    fn load(dir: &Path, max_new_tokens: usize, device: &burn::tensor::Device) -> Result<Self> {
        let Some(template) = ChatTemplate::from_dir(dir)? else {
            bail!(
                "{}: the model folder has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja); add one, train the model with `sft` on conversations, or sample plain prompts with `model generate`",
                dir.display()
            );
        };
        let loaded = load(dir, device)?;
        let tok = loaded
            .tokenizer
            .with_context(|| format!("{}: no tokenizer.json in the model folder", dir.display()))?;
        if !loaded.model.has_lm_head() {
            bail!(
                "{}: the model has no LM head: it is a reward or value model; chat with a policy or SFT model folder",
                dir.display()
            );
        }
        let room = PromptRoom::new(&loaded.model, dir, max_new_tokens)?;
        let mut stops = vec![tok.eos_id];
        stops.extend(END_OF_TURN.iter().filter_map(|t| tok.token_to_id(t)));
        stops.sort_unstable();
        stops.dedup();
        Ok(Self {
            model: loaded.model,
            tok,
            template,
            room,
            stops,
        })
    }

    /// The rendered prompt, and the reply to `messages` (text and tokens, the stop token left
    /// out), sampled with `seed`.
    fn reply(
        &self,
        messages: &[Message],
        sampling: &SamplingArgs,
        seed: u64,
    ) -> Result<(String, String, Vec<u32>)> {
        let prompt = self.template.render_prompt(messages)?;
        let ids = self.tok.encode(&prompt)?;
        if ids.len() > self.room.tokens {
            bail!(
                "the conversation is {} tokens with its chat template, more than the {} the model's context leaves after --max-new-tokens {}; start a new conversation or lower --max-new-tokens",
                ids.len(),
                self.room.tokens,
                sampling.max_new_tokens
            );
        }
        let mut cfg = sampling.config(self.tok.eos_id, self.tok.pad_id);
        cfg.eos_token_ids = self.stops.clone();
        cfg.seed = seed;
        let g = generate(&self.model, &[ids], &cfg)?;
        let tokens: Vec<u32> = g.responses()[0]
            .iter()
            .copied()
            .filter(|t| !self.stops.contains(t))
            .collect();
        Ok((prompt, self.tok.decode(&tokens)?, tokens))
    }
}

/// Reads a `--messages` file: a JSON list of `{"role", "content"}`.
fn read_messages(path: &Path) -> Result<Vec<Message>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let messages: Vec<Message> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON list of {{\"role\": ..., \"content\": ...}} messages",
            path.display()
        )
    })?;
    match messages.last() {
        Some(m) if m.role == "user" => Ok(messages),
        Some(m) => bail!(
            "{}: the last message is `{}`; end the list with a user message to reply to",
            path.display(),
            m.role
        ),
        None => bail!(
            "{}: no messages; give at least one user message",
            path.display()
        ),
    }
}

fn chat(
    dir: &Path,
    system: Option<String>,
    messages: Option<&Path>,
    json: bool,
    sampling: &SamplingArgs,
    device: &burn::tensor::Device,
) -> Result<()> {
    sampling.check()?;
    if sampling.template.is_some() {
        bail!(
            "--template is for `model generate`'s plain prompts; `model chat` renders the conversation with the folder's chat template"
        );
    }
    let opening: Vec<Message> = system.map(Message::system).into_iter().collect();
    if let Some(path) = messages {
        let mut conversation = read_messages(path)?;
        if !opening.is_empty() && conversation.first().is_some_and(|m| m.role == "system") {
            bail!(
                "--system and a system message in {}: give one of them",
                path.display()
            );
        }
        conversation.splice(0..0, opening);
        let chat = Chat::load(dir, sampling.max_new_tokens, device)?;
        let (prompt, reply, tokens) = chat.reply(&conversation, sampling, sampling.seed)?;
        if json {
            let v = serde_json::json!({"prompt": prompt, "reply": reply, "tokens": tokens});
            println!("{v}");
        } else {
            println!("{reply}");
        }
        return Ok(());
    }
    let chat = Chat::load(dir, sampling.max_new_tokens, device)?;
    let mut conversation = opening;
    let stdin = std::io::stdin();
    // A prompt for a person at a terminal; none when the turns come from a pipe.
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    let mut lines = stdin.lock().lines();
    // Turn k (the k-th user line, blank lines skipped) samples with seed + k, so a replayed
    // conversation gets the same replies.
    let mut turn = 0u64;
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        conversation.push(Message::user(line));
        let (_, reply, _) =
            chat.reply(&conversation, sampling, sampling.seed.wrapping_add(turn))?;
        println!("{reply}");
        conversation.push(Message::assistant(reply));
        turn += 1;
    }
    Ok(())
}

/// `model merge`: BASE with ADAPTER attached and merged (W + B·A·scale), saved with the base's
/// tokenizer (else the adapter folder's) and rlhf.json.
fn merge(base: &Path, adapter: &Path, out: &Path, device: &burn::tensor::Device) -> Result<()> {
    let loaded = load(base, device)?;
    // The base's dtype kept: a bf16 base is merged (in f32) and written in bf16.
    let adapted = loaded
        .model
        .keep_frozen(model::WeightDtype::Auto)
        .load_lora(adapter)
        .with_context(|| {
            format!(
                "attaching the adapter {} to {}",
                adapter.display(),
                base.display()
            )
        })?;
    let lora = adapted
        .lora_config()
        .cloned()
        .context("the adapter attached no modules")?;
    let merged = adapted.merge_lora();
    let tokenizer =
        match loaded.tokenizer {
            Some(t) => Some(t),
            None if model::tokenizer::tokenizer_path(adapter).is_file() => Some(
                Tokenizer::from_file(&model::tokenizer::tokenizer_path(adapter), None, None, None)?,
            ),
            None => None,
        };
    model::save_with_meta(&merged, tokenizer.as_ref(), &loaded.meta, out)?;
    println!(
        "wrote {}: {} with the adapter {} (r = {}, alpha = {}) merged in",
        out.display(),
        base.display(),
        adapter.display(),
        lora.r,
        lora.alpha
    );
    Ok(())
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
    if !loaded.model.has_lm_head() {
        bail!(
            "{}: the model has no LM head: it is a reward or value model; score texts with a causal-LM folder (or use `reward score`)",
            dir.display()
        );
    }
    let context = loaded.model.config().max_position_embeddings;
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
        let ids = tok.encode(text)?;
        if ids.len() > context {
            bail!(
                "{}: line {}: field `text`: {} tokens, more than the model's context of {context} ({} in {}); shorten the text or split it",
                input.display(),
                i + 1,
                ids.len(),
                loaded.model.config().context_key(),
                dir.join("config.json").display()
            );
        }
        texts.push(ids);
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
