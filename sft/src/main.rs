//! `sft --config configs/sft.toml [--set key=value ...] [--out DIR] [--resume DIR] [--device D] [--seed N]`

/// Keeps freed blocks of 16 MiB and more for reuse (see `model::alloc`).
#[global_allocator]
static ALLOCATOR: model::alloc::KeepLarge = model::alloc::KeepLarge;

fn main() {
    model::device::exit_quietly_on_broken_pipe();
    model::device::file_size_limit_as_error();
    let args = trainer::StageArgs::parse(
        "sft",
        "Supervised fine-tuning of a causal LM on demonstrations",
    );
    let s = trainer::exit_on_error(model::device::hot(|| {
        args.load::<sft::SftConfig>()
            .and_then(|(cfg, used)| sft::run(&cfg, &used, args.resume.as_deref()))
    }));
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
