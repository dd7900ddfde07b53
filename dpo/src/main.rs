//! `dpo --config configs/dpo.toml [--set key=value ...] [--out DIR] [--resume DIR] [--device D] [--seed N]`

#![forbid(unsafe_code)]

model::global_allocator!();

fn main() {
    model::runtime::start();
    let args = trainer::StageArgs::parse(
        "dpo",
        "Direct preference optimisation of an SFT policy on rankings or comparisons",
    );
    let s = model::runtime::exit_on_error(model::device::hot(|| {
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
