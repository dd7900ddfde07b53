//! `reward --config configs/reward.toml [--set key=value ...] [--out DIR] [--resume DIR] [--device D] [--seed N]`
//! `reward score DIR --input FILE.jsonl [--batch-size N] [--raw]`
//! `reward serve DIR [--host H] [--port P] [--batch-size N] ...` (HTTP; see `reward::serve`)
//! `reward best-of-n --policy DIR --prompts F (--reward-model DIR | --rule RULE) --n N --out F`
//! (see `reward::best_of_n`)

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Scoring: `reward score ...`, `reward agreement ...`, `reward serve ...`, `reward best-of-n ...`.
#[derive(Parser)]
#[command(name = "reward")]
struct ScoreCli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Agreement with a gold scorer: every pair of candidates of one prompt whose `gold`
    /// differs, judged by the reward (lines {"prompt_id", "prompt", "response", "gold"[, "kind"]}).
    #[command(allow_negative_numbers = true)]
    Agreement {
        /// A reward-model or ensemble folder.
        dir: PathBuf,
        /// Candidates, JSONL: {"prompt_id", "prompt", "response", "gold"[, "kind"]} (`labeling
        /// simulate` writes heldout_candidates.jsonl so).
        #[arg(long)]
        candidates: PathBuf,
        #[arg(long, default_value_t = 32, value_parser = model::flags::at_least::<usize>(1))]
        batch_size: usize,
        /// An ensemble's reward: mean, mean-minus-std or min over the members.
        #[arg(long, value_enum, default_value = "mean-minus-std")]
        aggregate: reward::Aggregate,
        #[arg(long, default_value_t = 1.0)]
        uncertainty_coef: f64,
        /// Write the result as JSON here too.
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Score `{"prompt", "response"}` lines: one `{"reward": r}` line each, in order.
    #[command(allow_negative_numbers = true)]
    Score {
        /// A reward-model folder written by `reward` (or any HF *ForSequenceClassification).
        dir: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value_t = 16, value_parser = model::flags::at_least::<usize>(1))]
        batch_size: usize,
        /// The head's raw output instead of the normalised reward.
        #[arg(long)]
        raw: bool,
        /// Prompt template; default: the one stored with the model.
        #[arg(long)]
        template: Option<String>,
        /// An ensemble's reward: mean, mean-minus-std (mean − λ·std) or min over the members.
        #[arg(long, value_enum, default_value = "mean-minus-std")]
        aggregate: reward::Aggregate,
        /// λ of mean-minus-std.
        #[arg(long, default_value_t = 1.0)]
        uncertainty_coef: f64,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Serve the reward model over HTTP: OpenRLHF's `POST /get_reward`, `POST /score` (as
    /// `reward score`) and `GET /health`, until SIGINT or SIGTERM.
    Serve(reward::serve::ServeArgs),
    /// Sample N responses per prompt from a policy, score them with a reward model or a rule,
    /// and write the best of each prompt as a demonstration for `sft` (expert iteration,
    /// FeedME).
    #[command(allow_negative_numbers = true)]
    BestOfN(reward::best_of_n::BestOfNArgs),
}

model::global_allocator!();

fn main() {
    model::runtime::start();
    let sub = std::env::args().nth(1);
    let scoring = sub
        .as_deref()
        .is_some_and(|a| ["score", "agreement", "serve", "best-of-n"].contains(&a));
    let result = if scoring {
        match ScoreCli::parse().command {
            Command::Agreement {
                dir,
                candidates,
                batch_size,
                aggregate,
                uncertainty_coef,
                json,
                device,
            } => {
                let options = reward::ScorerOptions {
                    aggregate,
                    uncertainty_coef,
                    batch_size: batch_size.max(1),
                    ..reward::ScorerOptions::default()
                };
                model::device::hot(|| {
                    agreement(&dir, &candidates, options, json.as_deref(), &device)
                })
            }
            Command::Score {
                dir,
                input,
                batch_size,
                raw,
                template,
                aggregate,
                uncertainty_coef,
                device,
            } => {
                let options = reward::ScorerOptions {
                    aggregate,
                    uncertainty_coef,
                    raw,
                    template,
                    batch_size,
                    ..reward::ScorerOptions::default()
                };
                model::device::hot(|| score(&dir, &input, options, &device))
            }
            // Not inside `hot`: an idle server must not keep the compute threads polling (the
            // scoring thread runs each batch in `hot`).
            Command::Serve(args) => reward::serve::run(&args).map(|s| println!("{s}")),
            Command::BestOfN(args) => {
                model::device::hot(|| reward::best_of_n::run(&args)).map(|s| println!("{s}"))
            }
        }
    } else {
        let args = trainer::StageArgs::parse(
            "reward",
            "Train a reward model on labelers' K-way rankings (`reward --config ...`), or score responses with one (`reward score DIR --input FILE`)",
        );
        model::device::hot(|| {
            args.load::<reward::RewardConfig>()
                .and_then(|(cfg, used)| reward::run(&cfg, &used, args.resume.as_deref()))
        })
        .map(|s| {
            let v = s.run.validation.as_ref().map_or(String::new(), |v| {
                format!(
                    ", validation accuracy {:.3} [{:.3}, {:.3}] on {} pairs",
                    v.pairwise.accuracy, v.pairwise.low, v.pairwise.high, v.pairwise.total
                )
            });
            // An ensemble has no one training loss: its members' are in their summaries.
            let loss = if s.ensemble.is_some() {
                format!(
                    " per member, {} members",
                    s.ensemble.as_ref().map_or(0, |e| e.members.len())
                )
            } else {
                format!(", train loss {:.4}", s.run.train_loss)
            };
            println!(
                "done: {} steps{loss}{v}; model in {}",
                s.run.steps,
                s.final_dir.display()
            );
        })
    };
    model::runtime::exit_on_error(result);
}

fn score(
    dir: &std::path::Path,
    input: &std::path::Path,
    options: reward::ScorerOptions,
    device: &str,
) -> anyhow::Result<()> {
    let device = model::parse_device(device)?;
    anyhow::ensure!(options.batch_size >= 1, "--batch-size must be at least 1");
    anyhow::ensure!(
        options.uncertainty_coef.is_finite() && options.uncertainty_coef >= 0.0,
        "--uncertainty-coef {}: a number >= 0",
        options.uncertainty_coef
    );
    let inputs = reward::score::read_inputs(input)?;
    let s = reward::score::score(dir, &inputs, options, &device)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    reward::score::write_lines(&mut out, &s.scores)?;
    let n = s.scores.rewards.len();
    let cut = if s.scores.cut_responses + s.scores.cut_prompts > 0 {
        format!(
            "; {} prompts cut from the left and {} responses cut at the end to fit the context",
            s.scores.cut_prompts, s.scores.cut_responses
        )
    } else {
        String::new()
    };
    eprintln!(
        "scored {n} responses with {} model(s) in {:.2}s ({:.1} responses/s){cut}",
        s.members,
        s.seconds,
        n as f64 / s.seconds.max(1e-9)
    );
    Ok(())
}

fn agreement(
    dir: &std::path::Path,
    candidates: &std::path::Path,
    options: reward::ScorerOptions,
    json: Option<&std::path::Path>,
    device: &str,
) -> anyhow::Result<()> {
    let device = model::parse_device(device)?;
    let cands = reward::agreement::read_candidates(candidates)?;
    let scorer = reward::Scorer::load(dir, options, &device)?;
    let a = reward::agreement::run(&scorer, &cands)?;
    println!(
        "agreement with gold: {:.3} [{:.3}, {:.3}] on {} pairs of {} prompts ({} model(s))",
        a.overall.accuracy,
        a.overall.low,
        a.overall.high,
        a.overall.total,
        a.prompts,
        scorer.members()
    );
    for (k, acc) in &a.by_worse_kind {
        println!(
            "  against {k:<14} {:.3} [{:.3}, {:.3}] on {} pairs; its mean reward {:+.3}",
            acc.accuracy,
            acc.low,
            acc.high,
            acc.total,
            a.mean_reward_by_kind.get(k).copied().unwrap_or(f64::NAN)
        );
    }
    if let Some(p) = json {
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&a)?)?;
        std::fs::rename(&tmp, p)?;
    }
    Ok(())
}
