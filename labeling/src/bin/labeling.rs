//! `labeling import`, `labeling export-sheet` and `labeling simulate`.

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use labeling::import::CsvFormat;
use labeling::simulate::SimulateParams;
use labeling::suite::{FamilyArgs, simulate_family_to_dir};
use labeling::{Aggregate, ExportOptions, ImportOptions, export_sheet, import_to_dir};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "labeling",
    version,
    about = "Import labelers' rankings; export sheets to rank; simulate the demo task and a suite of others"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read rankings from CSV; write rankings.parquet, pairs.parquet and stats.json into --out.
    Import {
        file: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// long or wide; detected from the header (`rank` or `ranking` column) when absent.
        #[arg(long, value_enum)]
        format: Option<CsvFormat>,
        #[arg(long, value_enum, default_value = "none")]
        aggregate: Aggregate,
        /// Keep tied pairs (tie = true, margin 0) instead of dropping them.
        #[arg(long)]
        keep_ties: bool,
        /// Read column NAME from header HEADER, e.g. --col rank=score.
        #[arg(long = "col", value_name = "NAME=HEADER")]
        cols: Vec<String>,
    },
    /// Sample K responses per prompt from a policy and write a long CSV with an empty rank column.
    ExportSheet {
        #[arg(long)]
        policy: PathBuf,
        /// Prompts file (.jsonl, .csv, .parquet) with a `prompt` column.
        #[arg(long)]
        prompts: PathBuf,
        #[arg(long, default_value_t = 4)]
        k: usize,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        sampling: model::generate::SamplingArgs,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Generate a task deterministically (the demo, or --family words, choice, zh, json):
    /// demonstrations.jsonl, prompts.jsonl, eval_prompts.jsonl (with gold answers), rankings.csv
    /// from simulated labelers, task.json, and with --heldout-candidates N (150 by default for
    /// the families besides the demo) heldout_candidates.jsonl.
    Simulate {
        /// Output folder (replaced atomically).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        family: FamilyArgs,
        #[command(flatten)]
        params: SimulateParams,
    },
}

/// Keeps freed blocks of 16 MiB and more for reuse (see `model::alloc`).
#[global_allocator]
static ALLOCATOR: model::alloc::KeepLarge = model::alloc::KeepLarge;

fn main() {
    model::device::exit_quietly_on_broken_pipe();
    let cli = Cli::parse();
    if let Err(e) = model::device::in_pool(|| run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Import {
            file,
            out,
            format,
            aggregate,
            keep_ties,
            cols,
        } => {
            let mut renames = HashMap::new();
            for c in cols {
                let Some((name, header)) = c.split_once('=') else {
                    bail!("--col {c:?}: expected NAME=HEADER, e.g. --col rank=score");
                };
                renames.insert(name.trim().to_string(), header.trim().to_string());
            }
            let stats = import_to_dir(&ImportOptions {
                input: file,
                out: out.clone(),
                format,
                aggregate,
                keep_ties,
                renames,
            })?;
            print!("{}", stats.table());
            println!(
                "wrote {}/{{rankings.parquet, pairs.parquet, stats.json}}",
                out.display()
            );
            Ok(())
        }
        Command::ExportSheet {
            policy,
            prompts,
            k,
            out,
            sampling,
            device,
        } => {
            let rows = export_sheet(&ExportOptions {
                policy,
                prompts: datasets::Source::new(prompts),
                k,
                out: out.clone(),
                sampling,
                device,
            })?;
            println!(
                "wrote {rows} rows to {}; fill labeler_id and rank (1 = best), then run `labeling import`",
                out.display()
            );
            Ok(())
        }
        Command::Simulate {
            out,
            family,
            params,
        } => {
            let params = family.resolve(params);
            let info = simulate_family_to_dir(family.family, &params, &out)?;
            for (file, n) in &info.files {
                println!("{file:<26} {n} lines");
            }
            let l = &info.labels;
            let opt = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.4}"));
            println!(
                "labels: {} groups, {} with ties, correct ranked first {:.3}, pairwise agreement {}, Fleiss' kappa {}",
                l.groups,
                l.groups_with_ties,
                l.correct_ranked_first,
                opt(l.pairwise_agreement),
                opt(l.fleiss_kappa)
            );
            let files: Vec<&str> = info.files.keys().map(String::as_str).collect();
            println!(
                "gold rule: {}\nwrote {}/{{{}, task.json}}",
                info.gold_rule,
                out.display(),
                files.join(", ")
            );
            Ok(())
        }
    }
}
