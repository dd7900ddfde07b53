//! `ppo --config configs/ppo.toml [--set key=value ...] [--out DIR] [--resume DIR] [--device D] [--seed N]`

#![forbid(unsafe_code)]

model::global_allocator!();

fn main() {
    model::runtime::start();
    let args = trainer::StageArgs::parse(
        "ppo",
        "PPO of an SFT policy against a reward model (or a rule reward), with a KL penalty",
    );
    let s = model::runtime::exit_on_error(model::device::hot(|| {
        args.load::<ppo::PpoConfig>()
            .and_then(|(cfg, used)| ppo::run(&cfg, &used, args.resume.as_deref()))
    }));
    let kl = if s.last_kl.is_nan() {
        "not measured (β = 0, no monitor)".to_string()
    } else {
        format!("{:.4}", s.last_kl)
    };
    println!(
        "done: {} iterations, score {:.4} → {:.4}, KL {kl}; policy in {}",
        s.iterations,
        s.first_score_mean,
        s.last_score_mean,
        s.final_dir.display()
    );
}
