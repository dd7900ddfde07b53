//! `sft --config configs/sft.toml [--set key=value ...] [--out DIR] [--resume DIR] [--device D] [--seed N]`

#![forbid(unsafe_code)]

model::global_allocator!();

fn main() {
    model::runtime::start();
    let args = trainer::StageArgs::parse(
        "sft",
        "Supervised fine-tuning of a causal LM on demonstrations",
    );
    let s = model::runtime::exit_on_error(model::device::hot(|| {
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
