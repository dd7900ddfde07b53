//! The reward model's data: preferences read directly from any of the sources a labeling team or
//! a public data set provides, turned into ranked groups, split by prompt and tokenized.
//!
//! Sources: a `labeling import` folder (its K-way groups from `rankings.parquet`, or its pairs),
//! a rankings CSV (long or wide, through the importer and its errors), flat comparisons
//! (`prompt, chosen, rejected[, margin][, tie]` in JSONL / CSV / Parquet; each becomes a K = 2
//! group), ranked groups (`prompt_id, prompt, responses, ranks`), HH-RLHF and OpenAssistant.
//!
//! A sequence is template(prompt) ++ response ++ EOS. An over-long prompt is cut from the left
//! (the response is kept whole); a response too long by itself is dropped and counted, and a
//! group left with fewer than two responses is dropped and counted.

use anyhow::{Context, Result, bail};
use datasets::adapters::{read_hh_rlhf, read_oasst};
use datasets::preference::rankings::{CsvFormat, read_rankings};
use datasets::split::split_by_prompt;
use datasets::{Comparison, Format, RankedGroup, Source, load_comparisons, load_ranked_groups};
use model::{PromptTemplate, Tokenizer};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What `data.path` holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataKind {
    /// A folder with rankings.parquet → `import`; a .csv with a `rank` or `ranking` column →
    /// `rankings_csv`; a file with a `responses` column → `ranked_groups`; else `comparisons`.
    #[default]
    Auto,
    /// A `labeling import` output folder.
    Import,
    /// A long or wide rankings CSV as labelers deliver it.
    RankingsCsv,
    /// `prompt, chosen, rejected[, margin][, tie]`.
    Comparisons,
    /// `prompt_id, prompt, [labeler_id,] responses, ranks`.
    RankedGroups,
    /// Anthropic HH-RLHF `{"chosen", "rejected"}` transcripts (.jsonl or .jsonl.gz).
    HhRlhf,
    /// OpenAssistant message trees (ranked sibling replies).
    Oasst,
}

/// Several labelers' rankings of one prompt: separate groups, or one pair per response pair by
/// the labelers' strict majority (the importer's `majority`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    #[default]
    None,
    Majority,
}

/// Ties: dropped, or kept as a term that pulls the two rewards together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ties {
    #[default]
    Drop,
    Keep,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// The preferences: a `labeling import` folder, a rankings CSV, comparisons, ranked groups,
    /// HH-RLHF or OpenAssistant (see `kind`).
    pub path: PathBuf,
    /// auto, import, rankings_csv, comparisons, ranked_groups, hh_rlhf or oasst.
    #[serde(default)]
    pub kind: DataKind,
    /// jsonl, csv or parquet for comparisons / ranked groups; by extension when absent.
    #[serde(default)]
    pub format: Option<Format>,
    /// Our field → the file's column, e.g. { chosen = "preferred" }.
    #[serde(default)]
    pub columns: HashMap<String, String>,
    /// For an import folder: train on its K-way groups (true, InstructGPT) or its pairs.
    #[serde(default = "yes")]
    pub use_groups: bool,
    /// Rankings CSV layout: long or wide; from the header when absent.
    #[serde(default)]
    pub csv_format: Option<CsvFormat>,
    /// none (each labeler's ranking is a group) or majority.
    #[serde(default)]
    pub aggregate: Aggregate,
    /// drop or keep.
    #[serde(default)]
    pub ties: Ties,
    /// How a prompt is shown; default: the template stored with the base model, else
    /// `Human: {prompt}\n\nAssistant:`.
    #[serde(default)]
    pub template: Option<String>,
    /// Share of prompts held out for validation (by prompt; all labelers' groups of a prompt go
    /// to one side).
    #[serde(default = "d_val")]
    pub validation_fraction: f64,
    /// Longest sequence in tokens (prompt + response + EOS).
    #[serde(default = "d_max_len")]
    pub max_length: usize,
    /// Use only the first N groups (0 = all).
    #[serde(default)]
    pub max_groups: usize,
    /// Seed of the train/validation split; default: `seed` (an ensemble's members share the
    /// ensemble's split).
    #[serde(default)]
    pub split_seed: Option<u64>,
    /// SFT demonstrations (`prompt`, `response`) whose mean reward is shifted to 0 after
    /// training (InstructGPT); without them (absent or ""), the training responses are used.
    #[serde(default)]
    pub demonstrations: Option<PathBuf>,
}

impl DataSection {
    /// Adds the range errors of `[data]` to `c`.
    pub fn check(&self, c: &mut trainer::Check) {
        c.fraction("data.validation_fraction", self.validation_fraction);
        c.at_least("data.max_length", self.max_length, 2);
    }
}

fn yes() -> bool {
    true
}
fn d_val() -> f64 {
    0.1
}
fn d_max_len() -> usize {
    512
}

/// Reads `data.path` into ranked groups (a comparison is a K = 2 group whose ranks are [1, 2], or
/// [1, 1] for a tie, and whose `margin` is kept aside).
pub fn read_groups(d: &DataSection) -> Result<Vec<(RankedGroup, Option<f64>)>> {
    let kind = match d.kind {
        DataKind::Auto => detect(d)?,
        k => k,
    };
    let from_comparisons = |cs: Vec<Comparison>| -> Vec<(RankedGroup, Option<f64>)> {
        cs.into_iter().map(comparison_group).collect()
    };
    let groups = match kind {
        DataKind::Auto => unreachable!("detected above"),
        DataKind::Import => {
            let (file, groups) = if d.use_groups {
                ("rankings.parquet", true)
            } else {
                ("pairs.parquet", false)
            };
            let p = d.path.join(file);
            if !p.exists() {
                bail!(
                    "{}: not a `labeling import` folder (no {file}); run `labeling import FILE.csv --out DIR` first",
                    d.path.display()
                );
            }
            if groups {
                no_margin(load_ranked_groups(&Source::new(p))?)
            } else {
                from_comparisons(load_comparisons(&Source::new(p))?)
            }
        }
        DataKind::RankingsCsv => {
            let groups = read_rankings(&d.path, d.csv_format, &HashMap::new())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            no_margin(groups)
        }
        DataKind::Comparisons => from_comparisons(load_comparisons(&source(d))?),
        DataKind::RankedGroups => no_margin(load_ranked_groups(&source(d))?),
        DataKind::HhRlhf => {
            let hh = read_hh_rlhf(&d.path)?;
            if !hh.mismatched_prompt_lines.is_empty() {
                println!(
                    "data: {} HH-RLHF lines left out (chosen and rejected differ before the last reply)",
                    hh.mismatched_prompt_lines.len()
                );
            }
            from_comparisons(hh.comparisons)
        }
        DataKind::Oasst => no_margin(read_oasst(&d.path)?.groups),
    };
    Ok(groups)
}

fn no_margin(gs: Vec<RankedGroup>) -> Vec<(RankedGroup, Option<f64>)> {
    gs.into_iter().map(|g| (g, None)).collect()
}

fn source(d: &DataSection) -> Source {
    Source {
        path: d.path.clone(),
        format: d.format,
        columns: d.columns.clone(),
    }
}

/// A comparison as a K = 2 group; ids default to the response texts' roles.
pub fn comparison_group(c: Comparison) -> (RankedGroup, Option<f64>) {
    let id = |id: &str, fallback: &str| {
        if id.is_empty() {
            fallback.to_string()
        } else {
            id.to_string()
        }
    };
    let prompt_id = if c.prompt_id.is_empty() {
        c.prompt.clone()
    } else {
        c.prompt_id
    };
    let g = RankedGroup {
        prompt_id,
        labeler_id: c.labeler_id,
        response_ids: vec![id(&c.chosen_id, &c.chosen), id(&c.rejected_id, &c.rejected)],
        responses: vec![c.chosen, c.rejected],
        ranks: if c.tie { vec![1, 1] } else { vec![1, 2] },
        prompt: c.prompt,
        line: 0,
    };
    (g, c.margin)
}

fn detect(d: &DataSection) -> Result<DataKind> {
    let p = &d.path;
    if p.is_dir() {
        return Ok(DataKind::Import);
    }
    if !p.exists() {
        bail!(
            "{}: cannot read the data: no such file or folder",
            p.display()
        );
    }
    let name = p.to_string_lossy().to_lowercase();
    if name.ends_with(".csv") {
        // The header, read by the CSV reader the importer uses (BOM, quoting).
        let bytes = std::fs::read(p).with_context(|| format!("{}: cannot read", p.display()))?;
        let (header, _) = datasets::read::csv_rows(p, datasets::read::utf8_text(p, &bytes)?)?;
        if header.iter().any(|c| {
            c.trim().eq_ignore_ascii_case("rank") || c.trim().eq_ignore_ascii_case("ranking")
        }) {
            return Ok(DataKind::RankingsCsv);
        }
        return Ok(DataKind::Comparisons);
    }
    let recs = datasets::read_records(p, d.format)?;
    let col = |f: &str| d.columns.get(f).map_or(f, String::as_str).to_string();
    Ok(match recs.first() {
        Some(r) if r.fields.contains_key(&col("responses")) => DataKind::RankedGroups,
        Some(r) if r.fields.contains_key("replies") => DataKind::Oasst,
        Some(r)
            if !r.fields.contains_key(&col("prompt"))
                && r.fields.contains_key("chosen")
                && r.fields.contains_key("rejected") =>
        {
            DataKind::HhRlhf
        }
        _ => DataKind::Comparisons,
    })
}

/// One ranked group, tokenized: each response's full sequence once.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub prompt_id: String,
    pub labeler_id: String,
    /// Where the group came from, for error messages ("line 12" or "group 3").
    pub origin: String,
    pub response_ids: Vec<String>,
    /// template(prompt) ++ response ++ EOS, per response.
    pub sequences: Vec<Vec<u32>>,
    /// The prompt's tokens at the start of each sequence (after any cut).
    pub prompt_lens: Vec<usize>,
    pub ranks: Vec<u32>,
    /// The data's margin of a comparison (K = 2); None otherwise.
    pub data_margin: Option<f64>,
    /// The likelihood term of each response's reward ([`crate::likelihood`]); empty without one.
    pub prior: Vec<f32>,
}

impl Group {
    pub fn k(&self) -> usize {
        self.ranks.len()
    }
}

/// What tokenizing dropped.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Dropped {
    /// Responses longer than max_length by themselves.
    pub long_responses: usize,
    /// Groups left with fewer than two responses.
    pub groups: usize,
    /// Prompts cut from the left.
    pub truncated_prompts: usize,
    /// Groups whose responses are all tied, when ties are dropped (nothing to learn).
    pub all_tied: usize,
}

/// What to do with a response that does not fit the context by itself (with EOS and one prompt
/// token).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Long {
    /// Training: drop it (the caller counts it).
    Drop,
    /// Scoring: cut its end, keeping EOS (the caller counts it).
    Cut,
}

/// One encoded (prompt, response) sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// template(prompt) ++ response ++ EOS.
    pub tokens: Vec<u32>,
    /// The prompt's tokens at the start of `tokens`.
    pub prompt_len: usize,
    /// The prompt was cut from the left.
    pub prompt_cut: bool,
    /// The response was cut at its end.
    pub response_cut: bool,
}

/// template(prompt) ++ response ++ EOS, the prompt cut from the left to fit `max_len` (at least
/// one prompt token kept); a response that does not fit by itself is dropped (None) or cut.
/// Training and every scorer encode with this one function.
pub fn fit(
    tok: &Tokenizer,
    template: &PromptTemplate,
    prompt: &str,
    response: &str,
    max_len: usize,
    long: Long,
) -> Result<Option<Encoded>> {
    let p = tok.encode(&template.render(prompt))?;
    let mut r = tok.encode(response)?;
    let mut response_cut = false;
    if r.len() + 1 >= max_len {
        match long {
            Long::Drop => return Ok(None),
            Long::Cut => {
                r.truncate(max_len.saturating_sub(2));
                response_cut = true;
            }
        }
    }
    r.push(tok.eos_id);
    let keep = (max_len - r.len()).min(p.len());
    let prompt_cut = keep < p.len();
    let mut tokens = p[p.len() - keep..].to_vec();
    tokens.extend(r);
    Ok(Some(Encoded {
        tokens,
        prompt_len: keep,
        prompt_cut,
        response_cut,
    }))
}

/// Tokenizes groups; drops what does not fit and counts it.
pub fn tokenize(
    groups: &[(RankedGroup, Option<f64>)],
    tok: &Tokenizer,
    template: &PromptTemplate,
    max_len: usize,
    ties: Ties,
) -> Result<(Vec<Group>, Dropped)> {
    let mut out = Vec::with_capacity(groups.len());
    let mut dropped = Dropped::default();
    for (i, (g, margin)) in groups.iter().enumerate() {
        let mut ids = Vec::new();
        let mut seqs = Vec::new();
        let mut prompt_lens = Vec::new();
        let mut ranks = Vec::new();
        let mut truncated = false;
        for ((id, resp), &rank) in g.response_ids.iter().zip(&g.responses).zip(&g.ranks) {
            match fit(tok, template, &g.prompt, resp, max_len, Long::Drop)? {
                Some(e) => {
                    truncated |= e.prompt_cut;
                    ids.push(id.clone());
                    seqs.push(e.tokens);
                    prompt_lens.push(e.prompt_len);
                    ranks.push(rank);
                }
                None => dropped.long_responses += 1,
            }
        }
        if seqs.len() < 2 {
            dropped.groups += 1;
            continue;
        }
        if ties == Ties::Drop && ranks.iter().all(|&r| r == ranks[0]) {
            dropped.all_tied += 1;
            continue;
        }
        dropped.truncated_prompts += truncated as usize;
        out.push(Group {
            prompt_id: g.prompt_id.clone(),
            labeler_id: g.labeler_id.clone(),
            origin: if g.line > 0 {
                format!("line {}", g.line)
            } else {
                format!("group {}", i + 1)
            },
            response_ids: ids,
            sequences: seqs,
            prompt_lens,
            ranks,
            data_margin: *margin,
            prior: Vec::new(),
        });
    }
    Ok((out, dropped))
}

/// A ranked group with the data's margin (comparisons only).
pub type Read = (RankedGroup, Option<f64>);

/// Tokenizes the training and validation groups ([`tokenize`]), prints what was kept and
/// dropped, and stops when no training group is left. → (train, validation, what training dropped)
pub fn tokenize_split(
    (train, valid): (&[Read], &[Read]),
    tok: &Tokenizer,
    template: &PromptTemplate,
    d: &DataSection,
) -> Result<(Vec<Group>, Vec<Group>, Dropped)> {
    let (train, dropped) = tokenize(train, tok, template, d.max_length, d.ties)?;
    let (valid, _) = tokenize(valid, tok, template, d.max_length, d.ties)?;
    println!(
        "data: {} train groups, {} validation groups; dropped {} responses longer than {} tokens, {} groups left with < 2 responses, {} all-tied groups; {} prompts cut from the left",
        train.len(),
        valid.len(),
        dropped.long_responses,
        d.max_length,
        dropped.groups,
        dropped.all_tied,
        dropped.truncated_prompts
    );
    if train.is_empty() {
        bail!(
            "{}: no training group has two responses that fit data.max_length = {}; raise it",
            d.path.display(),
            d.max_length
        );
    }
    Ok((train, valid, dropped))
}

/// Splits groups by prompt; every error names the file and says what to change.
pub fn split(
    groups: Vec<Read>,
    path: &Path,
    validation_fraction: f64,
    seed: u64,
) -> Result<(Vec<Read>, Vec<Read>)> {
    let prompts = groups
        .iter()
        .map(|(g, _)| g.prompt.as_str())
        .collect::<std::collections::HashSet<_>>()
        .len();
    let (train, valid) = split_by_prompt(&groups, |(g, _)| &g.prompt, validation_fraction, seed);
    if train.is_empty() {
        bail!(
            "{}: every one of the {prompts} prompts fell on the validation side (validation_fraction = {validation_fraction}); lower data.validation_fraction or add prompts",
            path.display()
        );
    }
    if valid.is_empty() && validation_fraction > 0.0 {
        bail!(
            "{}: every one of the {prompts} prompts fell on the training side (validation_fraction = {validation_fraction}); raise data.validation_fraction, add prompts, or set it to 0 to train without validation",
            path.display()
        );
    }
    Ok((train, valid))
}
