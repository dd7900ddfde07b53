//! `dpo --config configs/dpo.toml [--set key=value ...] [--out DIR] [--resume DIR] [--device D] [--seed N]`

/// Keeps freed blocks of 16 MiB and more for reuse (see `model::alloc`).
#[global_allocator]
static ALLOCATOR: model::alloc::KeepLarge = model::alloc::KeepLarge;

fn main() {
    model::device::exit_quietly_on_broken_pipe();
    model::device::file_size_limit_as_error();
    let args = trainer::StageArgs::parse(
        "dpo",
        "Direct preference optimisation of an SFT policy on rankings or comparisons",
    );
    let s = trainer::exit_on_error(model::device::hot(|| {
        args.load::<dpo::DpoConfig>()
            .and_then(|(cfg, used)| dpo::run(&cfg, &used, args.resume.as_deref()))
    }));
    let eval = s.run.validation.map_or(String::new(), |v| {
        format!(
            ", validation accuracy {:.3} [{:.3}, {:.3}]",
            v.pairwise.accuracy, v.pairwise.low, v.pairwise.high
        )
    });
    println!(
        "done: {} steps, train loss {:.4}{eval}; policy in {}",
        s.run.steps,
        s.run.train_loss,
        s.final_dir.display()
    );
}
