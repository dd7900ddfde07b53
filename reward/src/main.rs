//! `reward --config configs/reward.toml [--set key=value ...] [--out DIR] [--resume DIR] [--device D] [--seed N]`
//! `reward score DIR --input FILE.jsonl [--batch-size N] [--raw]`

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Scoring: `reward score ...`.
#[derive(Parser)]
#[command(name = "reward")]
struct ScoreCli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score `{"prompt", "response"}` lines: one `{"reward": r}` line each, in order.
    Score {
        /// A reward-model folder written by `reward` (or any HF *ForSequenceClassification).
        dir: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// The head's raw output instead of the normalised reward.
        #[arg(long)]
        raw: bool,
        /// Prompt template; default: the one stored with the model.
        #[arg(long)]
        template: Option<String>,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

/// Keeps freed blocks of 16 MiB and more for reuse (see `model::alloc`).
#[global_allocator]
static ALLOCATOR: model::alloc::KeepLarge = model::alloc::KeepLarge;

fn main() {
    model::device::exit_quietly_on_broken_pipe();
    let scoring = std::env::args().nth(1).is_some_and(|a| a == "score");
    let result = if scoring {
        let Command::Score {
            dir,
            input,
            batch_size,
            raw,
            template,
            device,
        } = ScoreCli::parse().command;
        model::device::hot(|| score(&dir, &input, batch_size, raw, template.as_deref(), &device))
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
            let v = s.validation.as_ref().map_or(String::new(), |v| {
                format!(
                    ", validation accuracy {:.3} [{:.3}, {:.3}] on {} pairs",
                    v.pairwise.accuracy, v.pairwise.low, v.pairwise.high, v.pairwise.total
                )
            });
            println!(
                "done: {} steps, train loss {:.4}{v}; model in {}",
                s.steps,
                s.train_loss,
                s.final_dir.display()
            );
        })
    };
    trainer::exit_on_error(result);
}

fn score(
    dir: &std::path::Path,
    input: &std::path::Path,
    batch_size: usize,
    raw: bool,
    template: Option<&str>,
    device: &str,
) -> anyhow::Result<()> {
    let device = model::parse_device(device)?;
    let inputs = reward::score::read_inputs(input)?;
    let s = reward::score::score(dir, &inputs, template, batch_size, raw, &device)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    reward::score::write_lines(&mut out, &s.rewards)?;
    eprintln!(
        "scored {} responses in {:.2}s ({:.1} responses/s)",
        s.rewards.len(),
        s.seconds,
        s.rewards.len() as f64 / s.seconds.max(1e-9)
    );
    Ok(())
}
