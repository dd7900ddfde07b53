//! The data flywheel's simulated labelers (`labeling simulate-labelers`): they rank a sheet that
//! `export-sheet` sampled from the current policy, by a gold rule the stages never see, with the
//! simulator's noise and ties, so that a reward model can learn the blind spots the policy found
//! (InstructGPT kept collecting comparisons on the current policy's samples).
//!
//! Each response gets a tier from the gold rule's score against the prompt's answer: 0 when it is
//! right (score 1), 1 when partly right (0 < score < 1), 2 when wrong, 3 when wrong and degenerate
//! (empty, or a few words repeated: at least 6 words of which at most a third are distinct, or at least
//! 12 characters without spaces of which at most a quarter are distinct). Each labeler ranks the
//! group as `labeling simulate`'s labelers do ([`crate::simulate::rank_tiers`]): by tier, adjacent
//! responses swapped with the labeler's noise, equal tiers tied half the time, neighbouring tiers
//! at half the noise. Labeler j's noise is `noise` scaled from 0.5× to 1.5×, as in `simulate`.
//! Responses with the same text (a policy often samples one answer several times) are tied at
//! the better of their ranks, as a person would.

use crate::import::LONG_HEADER;
use crate::simulate::{SimulateParams, labeler_noise, rank_tiers};
use anyhow::{Context, Result, bail};
use datasets::read::{csv_rows, utf8_text};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Options of `labeling simulate-labelers` (its flags).
#[derive(Clone, Debug, clap::Args)]
pub struct LabelerOptions {
    /// The sheet (`export-sheet`'s long CSV; `labeler_id` and `rank` empty).
    #[arg(long)]
    pub sheet: PathBuf,
    /// The gold rule, e.g. final_answer, normalized_match, numeric:0.01, choice, json_answer
    /// (a task's task.json names its own).
    #[arg(long)]
    pub gold: String,
    /// Prompts with their `answer` (e.g. the task's prompts.jsonl), matched by prompt text.
    #[arg(long)]
    pub answers: Option<PathBuf>,
    #[arg(long, default_value_t = SimulateParams::default().labelers, allow_negative_numbers = true,
          value_parser = model::flags::at_least::<usize>(1))]
    pub labelers: usize,
    /// The mean labeler's probability of swapping adjacent responses (0.5x to 1.5x of it from
    /// the first labeler to the last).
    #[arg(long, default_value_t = SimulateParams::default().noise, allow_negative_numbers = true)]
    pub noise: f64,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true,
          value_parser = model::flags::at_least::<u64>(0))]
    pub seed: u64,
    /// The ranked sheet (long CSV, written atomically).
    #[arg(long)]
    pub out: PathBuf,
}

impl Default for LabelerOptions {
    fn default() -> Self {
        let d = SimulateParams::default();
        Self {
            sheet: PathBuf::new(),
            gold: String::new(),
            answers: None,
            labelers: d.labelers,
            noise: d.noise,
            seed: 0,
            out: PathBuf::new(),
        }
    }
}

/// What ranking a sheet cost and found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LabelingCost {
    pub prompts: usize,
    pub responses: usize,
    pub labelers: usize,
    /// Rows written: responses × labelers (what labelers are paid for).
    pub rows_ranked: usize,
    /// The gold rule's mean over the sheet's responses (the policy's gold on these prompts).
    pub gold_mean: f64,
    /// Responses of each tier: right, partly right, wrong, degenerate.
    pub by_tier: [usize; 4],
    /// Groups whose responses are all of one tier (the labelers can only tie or guess).
    pub single_tier_groups: usize,
}

/// One sheet row.
struct Row {
    prompt_id: String,
    prompt: String,
    response_id: String,
    response: String,
}

/// Whether a response is degenerate: empty, or a few words (characters) repeated.
pub fn degenerate(response: &str) -> bool {
    let t = response.trim();
    if t.is_empty() {
        return true;
    }
    let words: Vec<&str> = t.split_whitespace().collect();
    if words.len() >= 6 {
        let distinct = words.iter().collect::<BTreeSet<_>>().len();
        return distinct * 3 <= words.len();
    }
    let chars: Vec<char> = t.chars().filter(|c| !c.is_whitespace()).collect();
    if words.len() <= 2 && chars.len() >= 12 {
        let distinct = chars.iter().collect::<BTreeSet<_>>().len();
        return distinct * 4 <= chars.len();
    }
    false
}

/// The tier of a response with gold score `gold` (0 = best). The rule decides what is right
/// ("Repeat stone 6 times." is answered by a repetition); only a response it fails is degenerate.
pub fn tier(gold: f32, response: &str) -> u32 {
    if gold >= 1.0 - 1e-6 {
        0
    } else if gold > 0.0 {
        1
    } else if degenerate(response) {
        3
    } else {
        2
    }
}

fn read_sheet(path: &Path) -> Result<Vec<(usize, Row)>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let text = utf8_text(path, &bytes)?;
    let (header, rows) = csv_rows(path, text)?;
    let col = |name: &str| {
        header.iter().position(|h| h == name).with_context(|| {
            format!(
                "{} line 1: no `{name}` column; a sheet has the columns {} (as `labeling export-sheet` writes it)",
                path.display(),
                LONG_HEADER.join(", ")
            )
        })
    };
    let (pi, pt, ri, rt) = (
        col("prompt_id")?,
        col("prompt")?,
        col("response_id")?,
        col("response")?,
    );
    let mut seen = HashMap::new();
    let mut out = Vec::with_capacity(rows.len());
    for (line, cells) in rows {
        let row = Row {
            prompt_id: cells[pi].clone(),
            prompt: cells[pt].clone(),
            response_id: cells[ri].clone(),
            response: cells[rt].clone(),
        };
        for (field, v) in [
            ("prompt_id", &row.prompt_id),
            ("response_id", &row.response_id),
        ] {
            if v.trim().is_empty() {
                bail!("{} line {line}, column `{field}`: empty", path.display());
            }
        }
        if let Some(first) = seen.insert((row.prompt_id.clone(), row.response_id.clone()), line) {
            bail!(
                "{} line {line}: response {:?} of prompt {:?} is also on line {first}; a sheet has each response once (unranked)",
                path.display(),
                row.response_id,
                row.prompt_id
            );
        }
        out.push((line, row));
    }
    if out.is_empty() {
        bail!("{}: no rows", path.display());
    }
    Ok(out)
}

/// Ranks the sheet by the gold rule with every simulated labeler and writes the ranked long CSV.
pub fn simulate_labelers(opts: &LabelerOptions) -> Result<LabelingCost> {
    anyhow::ensure!(opts.labelers >= 1, "--labelers must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&opts.noise),
        "--noise {}: a probability in [0, 1]",
        opts.noise
    );
    let rule = crate::simulate::gold_rule(&opts.gold)?;
    let rows = read_sheet(&opts.sheet)?;
    let answers: HashMap<String, String> = match &opts.answers {
        Some(p) => datasets::load_prompts(&datasets::Source::new(p.clone()))?
            .into_iter()
            .filter_map(|r| r.answer.map(|a| (r.prompt, a)))
            .collect(),
        None => HashMap::new(),
    };
    let needs_answer = rule.rule().needs_answer();
    if needs_answer && opts.answers.is_none() {
        bail!(
            "the gold rule {:?} compares with each prompt's answer: pass --answers FILE (the prompts with their `answer`)",
            opts.gold
        );
    }
    // Groups in the order of their first rows.
    let mut order: Vec<String> = Vec::new();
    let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, (_, r)) in rows.iter().enumerate() {
        let g = groups.entry(r.prompt_id.clone()).or_default();
        if g.is_empty() {
            order.push(r.prompt_id.clone());
        }
        g.push(i);
    }
    let noise = labeler_noise(&SimulateParams {
        labelers: opts.labelers,
        noise: opts.noise,
        ..SimulateParams::default()
    });
    let mut cost = LabelingCost {
        prompts: order.len(),
        responses: rows.len(),
        labelers: opts.labelers,
        ..LabelingCost::default()
    };
    let mut gold_sum = 0.0;
    let tmp = opts.out.with_extension("csv.tmp");
    let mut w =
        csv::Writer::from_path(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut write = || -> Result<()> {
        w.write_record(LONG_HEADER)?;
        for (gi, id) in order.iter().enumerate() {
            let members = &groups[id];
            let (line, first) = &rows[members[0]];
            let answer = answers.get(&first.prompt);
            if needs_answer && answer.is_none() {
                bail!(
                    "{} line {line}: prompt {:?} is not in {} (its answer is needed by the gold rule)",
                    opts.sheet.display(),
                    first.prompt,
                    opts.answers.as_deref().unwrap_or(Path::new("")).display()
                );
            }
            let mut tiers = Vec::with_capacity(members.len());
            for &m in members {
                let (line, r) = &rows[m];
                let g = rule
                    .score(&r.response, answer.map(String::as_str))
                    .map_err(|e| anyhow::anyhow!("{} line {line}: {e}", opts.sheet.display()))?;
                gold_sum += g as f64;
                let t = tier(g, &r.response);
                cost.by_tier[t as usize] += 1;
                tiers.push(t);
            }
            if tiers.iter().all(|&t| t == tiers[0]) {
                cost.single_tier_groups += 1;
            }
            if members.len() < 2 {
                continue; // nothing to compare
            }
            for (j, (labeler, p)) in noise.iter().enumerate() {
                let mut rng = StdRng::seed_from_u64(
                    opts.seed
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        .wrapping_add((gi as u64) << 8)
                        .wrapping_add(j as u64),
                );
                let mut ranks = rank_tiers(&mut rng, &tiers, *p);
                // The same text twice is one response to a labeler: tied, at the better rank.
                for a in 0..members.len() {
                    for b in 0..members.len() {
                        if rows[members[a]].1.response.trim() == rows[members[b]].1.response.trim()
                        {
                            ranks[a] = ranks[a].min(ranks[b]);
                        }
                    }
                }
                for (&m, rank) in members.iter().zip(ranks) {
                    let r = &rows[m].1;
                    w.write_record([
                        r.prompt_id.as_str(),
                        r.prompt.as_str(),
                        r.response_id.as_str(),
                        r.response.as_str(),
                        labeler.as_str(),
                        &rank.to_string(),
                    ])?;
                    cost.rows_ranked += 1;
                }
            }
        }
        w.flush()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    drop(w);
    std::fs::rename(&tmp, &opts.out).with_context(|| format!("writing {}", opts.out.display()))?;
    cost.gold_mean = gold_sum / rows.len() as f64;
    Ok(cost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degenerate_responses_are_empty_or_repeated() {
        assert!(degenerate(""));
        assert!(degenerate("   "));
        assert!(degenerate(" yes yes yes yes yes yes"));
        assert!(degenerate(" the answer is the answer is the answer is"));
        assert!(degenerate(" 答案是答案是答案是答案是答案是"));
        assert!(!degenerate(" The answer is 42."));
        assert!(!degenerate(" 答案是 42。"));
        assert!(!degenerate(" one two three four five six"));
    }

    #[test]
    fn tiers_follow_gold_and_degeneracy() {
        assert_eq!(tier(1.0, " The answer is 3."), 0);
        assert_eq!(tier(0.5, " 3, 2"), 1);
        assert_eq!(tier(0.0, " The answer is 4."), 2);
        assert_eq!(tier(0.0, ""), 3);
        assert_eq!(tier(0.0, " 3 3 3 3 3 3 3"), 3);
        // What the rule passes is right, repeated or not.
        assert_eq!(tier(1.0, " stone stone stone stone stone stone"), 0);
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn ranks_a_sheet_by_gold_with_labelers_and_costs() {
        let dir = tempfile::tempdir().unwrap();
        let sheet = dir.path().join("sheet.csv");
        write(
            &sheet,
            "prompt_id,prompt,response_id,response,labeler_id,rank\n\
             a,What is 1 + 2?,r1, The answer is 3.,,\n\
             a,What is 1 + 2?,r2, The answer is 4.,,\n\
             a,What is 1 + 2?,r3,,,\n\
             b,What is 2 + 2?,r1, The answer is 4.,,\n\
             b,What is 2 + 2?,r2, The answer is 4.,,\n",
        );
        let answers = dir.path().join("prompts.jsonl");
        write(
            &answers,
            "{\"prompt\": \"What is 1 + 2?\", \"answer\": \"3\"}\n{\"prompt\": \"What is 2 + 2?\", \"answer\": \"4\"}\n",
        );
        let out = dir.path().join("ranked.csv");
        let opts = LabelerOptions {
            sheet: sheet.clone(),
            gold: "final_answer".into(),
            answers: Some(answers),
            labelers: 3,
            noise: 0.0,
            seed: 1,
            out: out.clone(),
        };
        let cost = simulate_labelers(&opts).unwrap();
        assert_eq!(cost.prompts, 2);
        assert_eq!(cost.responses, 5);
        assert_eq!(cost.rows_ranked, 15);
        assert_eq!(cost.by_tier, [3, 0, 1, 1]);
        assert_eq!(cost.single_tier_groups, 1);
        assert!((cost.gold_mean - 0.6).abs() < 1e-9);
        // Without noise every labeler ranks right > wrong > empty; b's two right answers have the
        // same text, so they are tied.
        let groups =
            datasets::preference::rankings::read_rankings(&out, None, &HashMap::new()).unwrap();
        assert_eq!(groups.len(), 6);
        for g in groups.iter().filter(|g| g.prompt_id == "a") {
            assert_eq!(g.ranks, vec![1, 2, 3], "{g:?}");
        }
        for g in groups.iter().filter(|g| g.prompt_id == "b") {
            assert_eq!(g.ranks, vec![1, 1], "{g:?}");
        }
        // Seeded: the same options give the same file.
        let first = std::fs::read_to_string(&out).unwrap();
        simulate_labelers(&opts).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), first);

        // With noise the labelers sometimes disagree; never on the file's shape.
        let mut noisy = opts.clone();
        noisy.noise = 0.9;
        let cost = simulate_labelers(&noisy).unwrap();
        assert_eq!(cost.rows_ranked, 15);
    }

    #[test]
    fn errors_name_the_sheet_line_and_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let sheet = dir.path().join("sheet.csv");
        write(
            &sheet,
            "prompt_id,prompt,response_id,response,labeler_id,rank\n\
             a,What is 1 + 2?,r1, 3,,\n\
             a,What is 1 + 2?,r2, 4,,\n",
        );
        let out = dir.path().join("ranked.csv");
        let mut opts = LabelerOptions {
            sheet: sheet.clone(),
            gold: "final_answer".into(),
            out: out.clone(),
            ..LabelerOptions::default()
        };
        let e = simulate_labelers(&opts).unwrap_err().to_string();
        assert!(e.contains("--answers"), "{e}");
        let answers = dir.path().join("prompts.jsonl");
        write(&answers, "{\"prompt\": \"other\", \"answer\": \"3\"}\n");
        opts.answers = Some(answers);
        let e = simulate_labelers(&opts).unwrap_err().to_string();
        assert!(
            e.contains("sheet.csv line 2") && e.contains("not in"),
            "{e}"
        );
        assert!(!out.exists() && !out.with_extension("csv.tmp").exists());
        write(
            &sheet,
            "prompt_id,prompt,response_id,response,labeler_id,rank\n\
             a,x,r1, 3,,\n\
             a,x,r1, 4,,\n",
        );
        let e = simulate_labelers(&opts).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("also on line 2"), "{e}");
        write(&sheet, "id,prompt\n1,x\n");
        let e = simulate_labelers(&opts).unwrap_err().to_string();
        assert!(e.contains("no `prompt_id` column"), "{e}");
    }
}
