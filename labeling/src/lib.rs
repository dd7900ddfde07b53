//! Labeling: importing labelers' rankings of K responses per prompt from CSV (long or wide) into
//! `rankings.parquet`, `pairs.parquet` and `stats.json`, with agreement statistics between
//! labelers; and exporting sheets of sampled responses for labelers to rank, which closes the
//! InstructGPT data loop. Groups and pairs are the `datasets` crate's [`RankedGroup`] and
//! [`Comparison`], and the files written read back with `datasets::load_ranked_groups` and
//! `datasets::load_comparisons` (ties included, as `tie = true`).
//!
//! It is not a labeling UI: labelers fill the sheet in any spreadsheet program.

#![forbid(unsafe_code)]

/// The rankings CSV reader and the labelers' votes live in `datasets` (every stage reads them);
/// re-exported here under their old names.
pub use datasets::preference::{pairs, rankings as import};
pub mod flywheel;
pub mod simulate;
pub mod suite;

use anyhow::{Context, Result};
use datasets::{Comparison, RankedGroup, expand_pairs};
use import::{CsvFormat, read_rankings};
use pairs::{agreement, kendall_w_mean, majority};
use polars::prelude::{Column, DataFrame, NamedFrom, ParquetWriter, Series};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Aggregate {
    /// Every labeler's judgement is a pair of its own.
    None,
    /// One pair per (prompt, response pair), by strict majority of the labelers.
    Majority,
}

pub struct ImportOptions {
    /// Rankings CSVs, read in order (e.g. the first labeling and each flywheel round's); a
    /// prompt id may appear in one file only.
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub format: Option<CsvFormat>,
    pub aggregate: Aggregate,
    pub keep_ties: bool,
    /// Our column name → the file's header.
    pub renames: HashMap<String, String>,
}

/// What `stats.json` holds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Stats {
    pub prompts: usize,
    pub groups: usize,
    pub labelers: usize,
    pub responses: usize,
    pub empty_responses: usize,
    pub pairs: usize,
    pub ties: usize,
    pub groups_by_k: BTreeMap<String, usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pairwise_agreement: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleiss_kappa: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kendall_w_mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub majority_dropped_ties: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub majority_dropped_no_majority: Option<usize>,
}

impl Stats {
    /// The same numbers as a table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = vec![
            ("prompts".into(), self.prompts.to_string()),
            ("groups".into(), self.groups.to_string()),
            ("labelers".into(), self.labelers.to_string()),
            ("responses".into(), self.responses.to_string()),
            ("empty responses".into(), self.empty_responses.to_string()),
            ("pairs".into(), self.pairs.to_string()),
            ("ties".into(), self.ties.to_string()),
        ];
        for (k, n) in &self.groups_by_k {
            rows.push((format!("groups with K={k}"), n.to_string()));
        }
        let opt = |x: Option<f64>| {
            x.map_or("n/a (no item judged twice)".to_string(), |v| {
                format!("{v:.4}")
            })
        };
        rows.push(("pairwise agreement".into(), opt(self.pairwise_agreement)));
        rows.push(("Fleiss' kappa".into(), opt(self.fleiss_kappa)));
        rows.push((
            "Kendall's W (mean)".into(),
            self.kendall_w_mean
                .map_or("n/a (no K≥3 set ranked twice)".to_string(), |v| {
                    format!("{v:.4}")
                }),
        ));
        if let (Some(t), Some(s)) = (
            self.majority_dropped_ties,
            self.majority_dropped_no_majority,
        ) {
            rows.push(("majority: dropped ties".into(), t.to_string()));
            rows.push(("majority: dropped, no majority".into(), s.to_string()));
        }
        let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<w$}  {v}\n"))
            .collect()
    }
}

/// The groups, the pairs to write and the statistics of a rankings file.
pub struct Imported {
    pub groups: Vec<RankedGroup>,
    pub pairs: Vec<Comparison>,
    pub stats: Stats,
}

pub fn import(opts: &ImportOptions) -> Result<Imported> {
    anyhow::ensure!(!opts.inputs.is_empty(), "no rankings file given");
    let mut groups = Vec::new();
    let mut owner: HashMap<String, &Path> = HashMap::new();
    for (i, input) in opts.inputs.iter().enumerate() {
        anyhow::ensure!(
            !opts.inputs[..i].contains(input),
            "{}: given twice",
            input.display()
        );
        let read = read_rankings(input, opts.format, &opts.renames)?;
        for g in &read {
            match owner.get(g.prompt_id.as_str()) {
                Some(&other) if other != input.as_path() => anyhow::bail!(
                    "{} line {}: prompt_id {:?} is also in {}; give each file its own prompt ids (`export-sheet --id-prefix`)",
                    input.display(),
                    g.line,
                    g.prompt_id,
                    other.display()
                ),
                _ => {
                    owner.insert(g.prompt_id.clone(), input.as_path());
                }
            }
        }
        groups.extend(read);
    }
    let (all_pairs, ties) = expand_pairs(&groups, opts.keep_ties);
    let (out_pairs, maj) = match opts.aggregate {
        Aggregate::None => (all_pairs, None),
        Aggregate::Majority => {
            let (p, t, s) = majority(&groups);
            (p, Some((t, s)))
        }
    };
    let (pa, kappa) = match agreement(&groups) {
        Some((a, k)) => (Some(a), Some(k)),
        None => (None, None),
    };
    let mut responses = BTreeSet::new();
    let mut empty = BTreeSet::new();
    let mut by_k: BTreeMap<usize, usize> = BTreeMap::new();
    for g in &groups {
        *by_k.entry(g.ranks.len()).or_default() += 1;
        for (id, t) in g.response_ids.iter().zip(&g.responses) {
            responses.insert((g.prompt_id.clone(), id.clone()));
            if t.is_empty() {
                empty.insert((g.prompt_id.clone(), id.clone()));
            }
        }
    }
    let stats = Stats {
        prompts: groups
            .iter()
            .map(|g| &g.prompt_id)
            .collect::<BTreeSet<_>>()
            .len(),
        groups: groups.len(),
        labelers: groups
            .iter()
            .map(|g| &g.labeler_id)
            .collect::<BTreeSet<_>>()
            .len(),
        responses: responses.len(),
        empty_responses: empty.len(),
        pairs: out_pairs.len(),
        ties,
        groups_by_k: by_k.into_iter().map(|(k, n)| (k.to_string(), n)).collect(),
        pairwise_agreement: pa,
        fleiss_kappa: kappa,
        kendall_w_mean: kendall_w_mean(&groups),
        majority_dropped_ties: maj.map(|m| m.0),
        majority_dropped_no_majority: maj.map(|m| m.1),
    };
    Ok(Imported {
        groups,
        pairs: out_pairs,
        stats,
    })
}

/// Imports and writes `rankings.parquet`, `pairs.parquet` and `stats.json` into `opts.out`
/// atomically: into a temporary sibling folder first, renamed into place when all is written.
pub fn import_to_dir(opts: &ImportOptions) -> Result<Stats> {
    let imported = import(opts)?;
    let out = &opts.out;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "labels".into());
    let tmp = out.with_file_name(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    write_parquet(
        &tmp.join("rankings.parquet"),
        &mut rankings_frame(&imported.groups)?,
    )?;
    write_parquet(
        &tmp.join("pairs.parquet"),
        &mut pairs_frame(&imported.pairs)?,
    )?;
    let stats_path = tmp.join("stats.json");
    std::fs::write(
        &stats_path,
        serde_json::to_string_pretty(&imported.stats)? + "\n",
    )
    .with_context(|| format!("writing {}", stats_path.display()))?;
    model::checkpoint::replace_dir(&tmp, out)?;
    Ok(imported.stats)
}

fn write_parquet(path: &Path, df: &mut DataFrame) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    ParquetWriter::new(file)
        .finish(df)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

fn str_col(name: &str, v: Vec<&str>) -> Column {
    Column::new(name.into(), v)
}

/// One row per ranked group: prompt_id, prompt, labeler_id, k, response_ids, responses, ranks.
/// The datasets crate reads it back as ranked groups.
pub fn rankings_frame(groups: &[RankedGroup]) -> Result<DataFrame> {
    let list = |name: &str, f: &dyn Fn(&RankedGroup) -> Series| -> Column {
        let s: Vec<Series> = groups.iter().map(f).collect();
        Column::new(name.into(), s)
    };
    let cols = vec![
        str_col(
            "prompt_id",
            groups.iter().map(|g| g.prompt_id.as_str()).collect(),
        ),
        str_col("prompt", groups.iter().map(|g| g.prompt.as_str()).collect()),
        str_col(
            "labeler_id",
            groups.iter().map(|g| g.labeler_id.as_str()).collect(),
        ),
        Column::new(
            "k".into(),
            groups
                .iter()
                .map(|g| g.ranks.len() as u32)
                .collect::<Vec<_>>(),
        ),
        list("response_ids", &|g| {
            Series::new("".into(), g.response_ids.clone())
        }),
        list("responses", &|g| {
            Series::new("".into(), g.responses.clone())
        }),
        list("ranks", &|g| Series::new("".into(), g.ranks.clone())),
    ];
    Ok(DataFrame::new(groups.len(), cols)?)
}

/// One row per pairwise judgement: prompt_id, prompt, labeler_id, chosen_id, chosen, rejected_id,
/// rejected, margin, tie. The datasets crate reads it back as comparisons.
pub fn pairs_frame(pairs: &[Comparison]) -> Result<DataFrame> {
    let s = |f: fn(&Comparison) -> &str| pairs.iter().map(f).collect::<Vec<_>>();
    let cols = vec![
        str_col("prompt_id", s(|p| &p.prompt_id)),
        str_col("prompt", s(|p| &p.prompt)),
        str_col("labeler_id", s(|p| &p.labeler_id)),
        str_col("chosen_id", s(|p| &p.chosen_id)),
        str_col("chosen", s(|p| &p.chosen)),
        str_col("rejected_id", s(|p| &p.rejected_id)),
        str_col("rejected", s(|p| &p.rejected)),
        Column::new(
            "margin".into(),
            pairs.iter().map(|p| p.margin).collect::<Vec<_>>(),
        ),
        Column::new(
            "tie".into(),
            pairs.iter().map(|p| p.tie).collect::<Vec<_>>(),
        ),
    ];
    Ok(DataFrame::new(pairs.len(), cols)?)
}

/// Options of `labeling export-sheet`.
pub struct ExportOptions {
    /// The policies to sample from: response k of a prompt comes from policy k mod P (the
    /// current policy beside the SFT model, say, as InstructGPT compared several models' samples).
    pub policies: Vec<PathBuf>,
    /// Prompt ids are this prefix and the prompt's number (1, 2, ...): one prefix per sheet
    /// keeps the ids of several rounds apart.
    pub id_prefix: String,
    pub prompts: datasets::Source,
    pub k: usize,
    /// Leave out a response whose text another response of the prompt already has (a labeler
    /// can only tie them), and a prompt left with fewer than two.
    pub distinct: bool,
    pub out: PathBuf,
    pub sampling: model::generate::SamplingArgs,
    pub device: String,
}

/// What `export_sheet` wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exported {
    pub rows: usize,
    pub prompts: usize,
    /// Responses left out as duplicates (`distinct`).
    pub duplicates: usize,
    /// Prompts left out with fewer than two distinct responses (`distinct`).
    pub prompts_dropped: usize,
}

/// Samples K responses per prompt from the policies and writes a long-format CSV with empty
/// `labeler_id` and `rank` columns for labelers to fill. Each policy's prompts are rendered with
/// its own stored template (its rlhf.json) unless `--template` is given.
pub fn export_sheet(opts: &ExportOptions) -> Result<Exported> {
    anyhow::ensure!(
        opts.k >= 2,
        "--k must be at least 2 (a ranking compares K ≥ 2 responses)"
    );
    anyhow::ensure!(!opts.policies.is_empty(), "give at least one --policy");
    anyhow::ensure!(
        opts.policies.len() <= opts.k,
        "{} policies but --k {}: each policy needs a response per prompt",
        opts.policies.len(),
        opts.k
    );
    let device = model::parse_device(&opts.device)?;
    let prompts = datasets::load_prompts(&opts.prompts)?;
    anyhow::ensure!(
        !prompts.is_empty(),
        "{}: no prompts",
        opts.prompts.path.display()
    );
    // responses[i][k]: prompt i's response k.
    let mut responses: Vec<Vec<String>> = vec![vec![String::new(); opts.k]; prompts.len()];
    for (j, policy) in opts.policies.iter().enumerate() {
        let loaded = model::load(policy, &device)?;
        let tok = loaded.tokenizer.with_context(|| {
            format!(
                "{}: no tokenizer.json in the policy folder",
                policy.display()
            )
        })?;
        anyhow::ensure!(
            loaded.model.has_lm_head(),
            "--policy {}: the model has no LM head: it is a reward or value model; sample from a policy or SFT model folder",
            policy.display()
        );
        let template = opts.sampling.template(policy)?;
        let room =
            model::generate::PromptRoom::new(&loaded.model, policy, opts.sampling.max_new_tokens)?;
        let encoded = prompts
            .iter()
            .map(|p| {
                room.encode(&tok, &template, &p.prompt).with_context(|| {
                    format!(
                        "{}: line {}: field `prompt` (policy {})",
                        opts.prompts.path.display(),
                        p.line,
                        policy.display()
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mine: Vec<usize> = (0..opts.k)
            .filter(|k| k % opts.policies.len() == j)
            .collect();
        for (i, ids) in encoded.into_iter().enumerate() {
            let batch = vec![ids; mine.len()];
            // Each (prompt, policy) gets its own seed, so a sheet's rows do not depend on the
            // prompts before; one policy alone samples as before.
            let mut sampling = opts.sampling.config(tok.eos_id, tok.pad_id);
            sampling.seed = opts
                .sampling
                .seed
                .wrapping_add(i as u64)
                .wrapping_add((j as u64) << 32);
            let g = model::generate(&loaded.model, &batch, &sampling)?;
            for (&k, resp) in mine.iter().zip(g.responses().iter()) {
                let ids: Vec<u32> = resp.iter().copied().filter(|&t| t != tok.eos_id).collect();
                responses[i][k] = tok.decode(&ids)?;
            }
        }
    }
    let tmp = opts.out.with_extension("csv.tmp");
    let mut w =
        csv::Writer::from_path(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    w.write_record(import::LONG_HEADER)?;
    let mut done = Exported::default();
    for (i, (p, rs)) in prompts.iter().zip(&responses).enumerate() {
        let mut keep: Vec<usize> = Vec::new();
        for (k, r) in rs.iter().enumerate() {
            if opts.distinct && keep.iter().any(|&q| rs[q].trim() == r.trim()) {
                done.duplicates += 1;
            } else {
                keep.push(k);
            }
        }
        if keep.len() < 2 {
            done.prompts_dropped += 1;
            continue;
        }
        for k in keep {
            w.write_record([
                format!("{}{}", opts.id_prefix, i + 1),
                p.prompt.clone(),
                format!("r{}", k + 1),
                rs[k].clone(),
                String::new(),
                String::new(),
            ])?;
            done.rows += 1;
        }
        done.prompts += 1;
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, &opts.out).with_context(|| format!("writing {}", opts.out.display()))?;
    Ok(done)
}
