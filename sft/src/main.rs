//! `sft --config configs/sft.toml [--set key=value ...] [--out DIR] [--resume DIR] [--device D] [--seed N]`

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "sft",
    version,
    about = "Supervised fine-tuning of a causal LM on demonstrations"
)]
struct Cli {
    #[command(flatten)]
    args: trainer::StageArgs,
}

fn main() {
    model::device::exit_quietly_on_broken_pipe();
    let cli = Cli::parse();
    match sft::run_from_args(&cli.args) {
        Ok(s) => {
            let eval = s.eval.map_or(String::new(), |e| {
                format!(
                    ", eval loss {:.4}, perplexity {:.2}, token accuracy {:.3}",
                    e.loss, e.perplexity, e.token_accuracy
                )
            });
            println!(
                "done: {} steps, train loss {:.4}{eval}; model in {}",
                s.steps,
                s.train_loss,
                s.final_dir.display()
            );
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
