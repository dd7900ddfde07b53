//! `labeling import` and `labeling export-sheet`.

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use labeling::import::CsvFormat;
use labeling::{Aggregate, ExportOptions, ImportOptions, export_sheet, import_to_dir};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "labeling",
    version,
    about = "Import labelers' rankings; export sheets to rank"
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
}

fn main() {
    model::device::exit_quietly_on_broken_pipe();
    if let Err(e) = run(Cli::parse()) {
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
    }
}
