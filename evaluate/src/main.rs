//! `evaluate --policy DIR [--baseline DIR [--best-of-n N]] --reward-model DIR --prompts FILE --out DIR [...]`:
//! compares aligned checkpoints and writes metrics.json, samples.jsonl, report.md and plots.

#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;

model::global_allocator!();

fn main() {
    model::runtime::start();
    let opts = evaluate::Options::parse();
    let mut out = std::io::stdout();
    let result = model::device::hot(|| evaluate::run(&opts, &mut out))
        .with_context(|| format!("evaluate: nothing written to {}", opts.out.display()));
    let o = model::runtime::exit_on_error(result);
    let m = &o.metrics;
    println!(
        "policy reward {:.3} [{:.3}, {:.3}]",
        m.policy.reward.mean, m.policy.reward.low, m.policy.reward.high
    );
    if let Some(b) = &m.baseline {
        println!(
            "baseline reward {:.3} [{:.3}, {:.3}]",
            b.reward.mean, b.reward.low, b.reward.high
        );
    }
    if let Some(b) = &m.best_of_n {
        let r = &b.model.reward;
        println!(
            "best-of-{} (baseline) reward {:.3} [{:.3}, {:.3}] at KL <= {:.3} nats (analytic)",
            b.n, r.mean, r.low, r.high, b.kl_analytic
        );
    }
    if let Some(w) = &m.win_rate {
        println!(
            "win rate over baseline {:.3} [{:.3}, {:.3}]",
            w.rate, w.low, w.high
        );
    }
    for f in &m.findings {
        println!("{}", f.replace("**", ""));
    }
    println!("report: {}", o.report.display());
}
