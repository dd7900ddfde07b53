//! `labeling import`, `labeling export-sheet`, `labeling simulate` and `labeling
//! simulate-labelers`.

#![forbid(unsafe_code)]

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
    /// Read rankings from CSV (one file, or several: e.g. the first labeling and each flywheel
    /// round's); write rankings.parquet, pairs.parquet and stats.json into --out.
    Import {
        #[arg(required = true)]
        files: Vec<PathBuf>,
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
    /// Sample K responses per prompt from a policy (or several: response k from policy k mod P)
    /// and write a long CSV with empty labeler_id and rank columns.
    ExportSheet {
        /// A policy folder; repeat to compare several (e.g. the current policy and the SFT model).
        #[arg(long = "policy", required = true)]
        policies: Vec<PathBuf>,
        /// Prompts file (.jsonl, .csv, .parquet) with a `prompt` column.
        #[arg(long)]
        prompts: PathBuf,
        #[arg(long, default_value_t = 4, allow_negative_numbers = true,
              value_parser = model::flags::at_least::<usize>(2))]
        k: usize,
        #[arg(long)]
        out: PathBuf,
        /// Prompt ids are PREFIX1, PREFIX2, ...: give each round's sheet its own prefix so that
        /// `labeling import` can read several rounds together.
        #[arg(long, default_value = "p")]
        id_prefix: String,
        /// Leave out responses whose text another response of the prompt already has, and
        /// prompts left with fewer than two (rows a labeler could only tie).
        #[arg(long)]
        distinct: bool,
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
    /// Rank a sheet (`export-sheet`'s CSV) as simulated labelers would, by a gold rule with
    /// noise and ties: the data flywheel's labelers for tests, the demo and studies. Writes the
    /// ranked long CSV for `labeling import` and prints what the labeling cost.
    SimulateLabelers(labeling::flywheel::LabelerOptions),
}

model::global_allocator!();

fn main() {
    model::runtime::start();
    let cli = Cli::parse();
    model::runtime::exit_on_error(model::device::in_pool(|| run(cli)));
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Import {
            files,
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
                inputs: files,
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
            policies,
            prompts,
            k,
            out,
            id_prefix,
            distinct,
            sampling,
            device,
        } => {
            sampling.check()?;
            let e = export_sheet(&ExportOptions {
                policies,
                id_prefix,
                prompts: datasets::Source::new(prompts),
                k,
                distinct,
                out: out.clone(),
                sampling,
                device,
            })?;
            let left = if distinct {
                format!(
                    " ({} duplicate responses and {} prompts with fewer than two distinct ones left out)",
                    e.duplicates, e.prompts_dropped
                )
            } else {
                String::new()
            };
            println!(
                "wrote {} rows of {} prompts to {}{left}; fill labeler_id and rank (1 = best), then run `labeling import`",
                e.rows,
                e.prompts,
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
        Command::SimulateLabelers(opts) => {
            let c = labeling::flywheel::simulate_labelers(&opts)?;
            println!(
                "labeling cost: {} prompts, {} responses, {} labelers, {} rows ranked",
                c.prompts, c.responses, c.labelers, c.rows_ranked
            );
            println!(
                "gold mean of the sheet's responses {:.3}; right {}, partly right {}, wrong {}, degenerate {}; {} groups of one tier",
                c.gold_mean,
                c.by_tier[0],
                c.by_tier[1],
                c.by_tier[2],
                c.by_tier[3],
                c.single_tier_groups
            );
            println!("wrote {}", opts.out.display());
            Ok(())
        }
    }
}
