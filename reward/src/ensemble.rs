//! Reward-model ensembles (Coste et al. 2023, "Reward Model Ensembles Help Mitigate
//! Overoptimization"; Eisenstein et al. 2023): `ensemble.members = N` trains N full reward models
//! from the same base, member i with seed `seed + i` (its new head and its data order) and, with
//! `ensemble.bootstrap`, on a bootstrap resample of the training prompts; all share one validation
//! split. With `ensemble.monitor` one more model trains on the validation prompts (which no member
//! saw): `ppo`'s held-out over-optimisation signal.
//!
//! Layout of `out`: `member-0/` … (each a whole `reward` run: config.toml, metrics.jsonl,
//! checkpoints, final/), `monitor/` likewise, and `final/`: `ensemble.json` with a copy of every
//! member's `final/` (and the monitor's) beside it, which [`crate::Scorer`] loads. Rerunning the
//! same command keeps the members that finished and continues an interrupted one from its newest
//! checkpoint.
//!
//! With `model.base` an ensemble folder (a previous round's `final/`: the data flywheel), member
//! i continues from the base's member i and the monitor from the base's monitor, each on the
//! data given now (old and new groups together).
//!
//! Full models rather than heads on a shared trunk: members that share a trunk disagree little
//! (their features are the same), and disagreement is what the monitor and the uncertainty
//! penalty read. The cost is N trainings and N scoring forwards in `ppo`.

use crate::data::{self, Read};
use crate::eval::Validation;
use crate::scorer::{Aggregate, ENSEMBLE_FILE, Manifest, RewardModel, mean_std};
use crate::{RewardConfig, Summary, read_data, run_one};
use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A bootstrap resample of `groups` by prompt: as many prompts as there are, drawn with
/// replacement (each with all its groups), seeded by (seed, member).
pub fn bootstrap(groups: Vec<Read>, seed: u64, member: usize) -> Vec<Read> {
    let mut prompts: Vec<&str> = Vec::new();
    let mut by_prompt: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, (g, _)) in groups.iter().enumerate() {
        let e = by_prompt.entry(g.prompt_id.as_str()).or_default();
        if e.is_empty() {
            prompts.push(g.prompt_id.as_str());
        }
        e.push(i);
    }
    let mut rng = StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(member as u64 + 1),
    );
    let mut picked = Vec::with_capacity(groups.len());
    for _ in 0..prompts.len() {
        let p = prompts[rng.random_range(0..prompts.len())];
        picked.extend(by_prompt[p].iter().copied());
    }
    picked.into_iter().map(|i| groups[i].clone()).collect()
}

/// One member's (or the monitor's) validation numbers.
#[derive(Clone, Debug, Serialize)]
pub struct MemberSummary {
    pub dir: PathBuf,
    pub seed: u64,
    /// Pairwise accuracy on the shared validation groups (the monitor: on the training groups).
    pub accuracy: f64,
    /// Kept from an earlier run of the same command.
    pub kept: bool,
}

/// What the ensemble says together (`summary.json`'s `ensemble`).
#[derive(Clone, Debug, Serialize)]
pub struct EnsembleSummary {
    pub members: Vec<MemberSummary>,
    pub monitor: Option<MemberSummary>,
    /// Validation pairwise accuracy of the members' mean, of mean − std and of the minimum.
    pub accuracy_mean: f64,
    pub accuracy_mean_minus_std: f64,
    pub accuracy_min: f64,
    /// Diversity: the mean Pearson correlation of two members' rewards over the validation
    /// responses, and the members' mean standard deviation per response.
    pub mean_pairwise_correlation: f64,
    pub mean_std: f64,
}

/// A member's config: its seed, output folder and role.
fn member_config(cfg: &RewardConfig, i: usize, monitor: bool) -> RewardConfig {
    let mut m = cfg.clone();
    m.seed = cfg.seed + i as u64;
    m.data.split_seed = Some(cfg.data.split_seed.unwrap_or(cfg.seed));
    if monitor {
        m.ensemble.is_monitor = true;
        m.out = cfg.out.join("monitor");
    } else {
        m.ensemble.member = Some(i);
        m.out = cfg.out.join(format!("member-{i}"));
    }
    m
}

/// With `model.base` an ensemble folder, each member's base becomes the base's member of the same
/// index (the monitor's its monitor). Counts must match: a member continues one model.
fn continue_from_ensemble(cfg: &RewardConfig, configs: &mut [(RewardConfig, bool)]) -> Result<()> {
    let base = &cfg.model.base;
    let Some(m) =
        Manifest::read(base).with_context(|| format!("model.base = {}", base.display()))?
    else {
        return Ok(());
    };
    if m.members.len() != cfg.ensemble.members {
        bail!(
            "model.base = {} is an ensemble of {} members and ensemble.members = {}: each member continues its own model, so set ensemble.members = {}",
            base.display(),
            m.members.len(),
            cfg.ensemble.members,
            m.members.len()
        );
    }
    for (c, is_monitor) in configs.iter_mut() {
        c.model.base = if *is_monitor {
            base.join(m.monitor.as_deref().with_context(|| {
                format!(
                    "model.base = {} has no monitor model to continue; set ensemble.monitor = false",
                    base.display()
                )
            })?)
        } else {
            base.join(&m.members[c.ensemble.member.unwrap_or(0)])
        };
    }
    Ok(())
}

/// The newest `checkpoint-*` folder of `out`.
fn newest_checkpoint(out: &Path) -> Option<PathBuf> {
    trainer::state::checkpoints(out).ok()?.pop()
}

/// Trains one member unless an earlier run of the same config finished it; continues from its
/// newest checkpoint when one exists. True when it was kept.
fn train_member(m: &RewardConfig) -> Result<bool> {
    let used = toml::to_string(m).context("writing a member's config")?;
    let same = std::fs::read_to_string(m.out.join("config.toml")).is_ok_and(|t| t == used);
    if same && m.out.join("summary.json").is_file() && m.out.join("final").is_dir() {
        println!("ensemble: {} finished earlier; kept", m.out.display());
        return Ok(true);
    }
    let resume = if same {
        newest_checkpoint(&m.out)
    } else {
        None
    };
    if let Some(r) = &resume {
        println!(
            "ensemble: {} continues from {}",
            m.out.display(),
            r.display()
        );
    }
    run_one(m, &used, resume.as_deref())
        .with_context(|| format!("ensemble member {}", m.out.display()))?;
    Ok(false)
}

/// Whether `out` holds nothing but the config.toml and the lock file [`trainer::prepare_out`]
/// wrote.
fn only_config(out: &Path) -> bool {
    std::fs::read_dir(out).is_ok_and(|d| {
        d.filter_map(|e| e.ok())
            .all(|e| e.file_name() == "config.toml" || e.file_name() == trainer::LOCK_FILE)
    })
}

/// Copies a model folder (config, weights, tokenizer, rlhf.json, and a stored likelihood model).
fn copy_model_dir(from: &Path, to: &Path) -> Result<()> {
    crate::likelihood::copy_dir(from, to)
}

/// Trains the ensemble; see the module docs.
pub fn run(cfg: &RewardConfig, config_used: &str, resume: Option<&Path>) -> Result<Summary> {
    if let Some(r) = resume {
        bail!(
            "--resume {}: an ensemble resumes by itself: rerun the same command (members that finished are kept, an interrupted one continues from its newest checkpoint)",
            r.display()
        );
    }
    let n = cfg.ensemble.members;
    let existed = cfg.out.exists();
    // Held until the ensemble's final/ and summary are written; each member locks its own folder.
    let _lock = trainer::prepare_out(&cfg.out, config_used)?;
    let mut configs: Vec<(RewardConfig, bool)> = (0..n)
        .map(|i| (member_config(cfg, i, false), false))
        .collect();
    if cfg.ensemble.monitor {
        configs.push((member_config(cfg, n, true), true));
    }
    if let Err(e) = continue_from_ensemble(cfg, &mut configs) {
        if !existed && only_config(&cfg.out) {
            let _ = std::fs::remove_dir_all(&cfg.out);
        }
        return Err(e);
    }
    let mut kept = Vec::new();
    for (i, (m, _)) in configs.iter().enumerate() {
        println!(
            "ensemble: training {} ({} of {})",
            m.out.display(),
            i + 1,
            configs.len()
        );
        match train_member(m) {
            Ok(k) => kept.push(k),
            Err(e) => {
                // Bad input fails the first member before it writes anything: then leave no
                // folder behind either (a member that trained is kept for the rerun).
                if !existed && only_config(&cfg.out) {
                    let _ = std::fs::remove_dir_all(&cfg.out);
                }
                return Err(e);
            }
        }
    }

    // final/: the manifest and a copy of every member's final/, written beside and renamed.
    let final_dir = cfg.out.join("final");
    let tmp = cfg.out.join(".final.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let mut manifest = Manifest {
        members: Vec::new(),
        monitor: None,
        note: format!(
            "{n} members from {} (seeds {}..{}{}); members share the validation split{}",
            cfg.model.base.display(),
            cfg.seed,
            cfg.seed + n as u64 - 1,
            if cfg.ensemble.bootstrap {
                ", each on a bootstrap resample of the training prompts"
            } else {
                ""
            },
            if cfg.ensemble.monitor {
                "; monitor/ trained on the validation prompts only"
            } else {
                ""
            }
        ),
    };
    let mut build = || -> Result<()> {
        for (m, is_monitor) in &configs {
            let name = if *is_monitor {
                "monitor".to_string()
            } else {
                format!("member-{}", m.ensemble.member.unwrap_or(0))
            };
            copy_model_dir(&m.out.join("final"), &tmp.join(&name))?;
            if *is_monitor {
                manifest.monitor = Some(name);
            } else {
                manifest.members.push(name);
            }
        }
        std::fs::write(
            tmp.join(ENSEMBLE_FILE),
            serde_json::to_string_pretty(&manifest)?,
        )?;
        Ok(())
    };
    if let Err(e) = build() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)?;

    let summary = summarize(cfg, &configs, &kept, &final_dir)?;
    let e = summary.ensemble.as_ref().expect("an ensemble summary");
    println!(
        "ensemble: {n} members, validation accuracy of the mean {:.3}, of mean − std {:.3}, of the min {:.3}; members {}; mean pairwise correlation {:.3}, mean std {:.3}{}",
        e.accuracy_mean,
        e.accuracy_mean_minus_std,
        e.accuracy_min,
        e.members
            .iter()
            .map(|m| format!("{:.3}", m.accuracy))
            .collect::<Vec<_>>()
            .join(" / "),
        e.mean_pairwise_correlation,
        e.mean_std,
        e.monitor.as_ref().map_or(String::new(), |m| format!(
            "; monitor accuracy on the training prompts {:.3}",
            m.accuracy
        ))
    );
    let tmp = cfg.out.join(".summary.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&summary)?)?;
    std::fs::rename(&tmp, cfg.out.join("summary.json"))?;
    Ok(summary)
}

/// Scores the validation groups with every member and the monitor's training groups with the
/// monitor.
fn summarize(
    cfg: &RewardConfig,
    configs: &[(RewardConfig, bool)],
    kept: &[bool],
    final_dir: &Path,
) -> Result<Summary> {
    let device = model::parse_device(&cfg.device)?;
    let manifest = Manifest::read(final_dir)?.context("the ensemble manifest just written")?;
    let first_member = member_config(cfg, 0, false);
    let (train_raw, valid_raw) = read_data(&first_member.data, first_member.seed)?;
    let first = RewardModel::load(
        &final_dir.join(&manifest.members[0]),
        None,
        cfg.dtype,
        &device,
    )?;
    let tok = &first.tokenizer;
    let tokenize = |raw: &[Read]| {
        data::tokenize(
            raw,
            tok,
            &first.template,
            cfg.data.max_length,
            cfg.data.ties,
        )
    };
    let (valid, _) = tokenize(&valid_raw)?;
    let (train, dropped) = tokenize(&train_raw)?;
    let rewards_on = |m: &RewardModel, groups: &[data::Group]| -> Result<Vec<Vec<f32>>> {
        let flat: Vec<Vec<u32>> = groups.iter().flat_map(|g| g.sequences.clone()).collect();
        let lens: Vec<usize> = groups.iter().flat_map(|g| g.prompt_lens.clone()).collect();
        let r = m.score_tokens(&flat, &lens, cfg.train.eval_batch_size, false)?;
        let mut at = 0;
        Ok(groups
            .iter()
            .map(|g| {
                let v = r[at..at + g.k()].to_vec();
                at += g.k();
                v
            })
            .collect())
    };
    let accuracy = |groups: &[data::Group], r: &[Vec<f32>]| -> Option<Validation> {
        (!groups.is_empty()).then(|| crate::eval::validate(groups, r))
    };
    let mut per_member = Vec::new();
    let mut members = Vec::new();
    for (i, name) in manifest.members.iter().enumerate() {
        let m = if i == 0 {
            None
        } else {
            Some(RewardModel::load(
                &final_dir.join(name),
                None,
                cfg.dtype,
                &device,
            )?)
        };
        let m = m.as_ref().unwrap_or(&first);
        let r = rewards_on(m, &valid)?;
        members.push(MemberSummary {
            dir: configs[i].0.out.clone(),
            seed: configs[i].0.seed,
            accuracy: accuracy(&valid, &r).map_or(f64::NAN, |v| v.pairwise.accuracy),
            kept: kept[i],
        });
        per_member.push(r);
    }
    let monitor = match &manifest.monitor {
        Some(name) => {
            let m = RewardModel::load(&final_dir.join(name), None, cfg.dtype, &device)?;
            let r = rewards_on(&m, &train)?;
            let i = configs.len() - 1;
            Some(MemberSummary {
                dir: configs[i].0.out.clone(),
                seed: configs[i].0.seed,
                accuracy: accuracy(&train, &r).map_or(f64::NAN, |v| v.pairwise.accuracy),
                kept: kept[i],
            })
        }
        None => None,
    };
    // Per response: the members' rewards.
    let combine = |f: &dyn Fn(&[f32]) -> f32| -> Vec<Vec<f32>> {
        (0..valid.len())
            .map(|g| {
                (0..valid[g].k())
                    .map(|j| {
                        let col: Vec<f32> = per_member.iter().map(|m| m[g][j]).collect();
                        f(&col)
                    })
                    .collect()
            })
            .collect()
    };
    let mean = combine(&|v| Aggregate::Mean.apply(v, 0.0));
    let lower = combine(&|v| Aggregate::MeanMinusStd.apply(v, 1.0));
    let min = combine(&|v| Aggregate::Min.apply(v, 0.0));
    let std = combine(&|v| mean_std(v).1 as f32);
    let flat = |r: &[Vec<f32>]| -> Vec<f64> { r.iter().flatten().map(|&x| x as f64).collect() };
    let mut corr = Vec::new();
    for a in 0..per_member.len() {
        for b in a + 1..per_member.len() {
            corr.push(pearson(&flat(&per_member[a]), &flat(&per_member[b])));
        }
    }
    let acc = |r: &[Vec<f32>]| accuracy(&valid, r).map_or(f64::NAN, |v| v.pairwise.accuracy);
    let std_flat = flat(&std);
    let ensemble = EnsembleSummary {
        accuracy_mean: acc(&mean),
        accuracy_mean_minus_std: acc(&lower),
        accuracy_min: acc(&min),
        mean_pairwise_correlation: corr.iter().sum::<f64>() / corr.len().max(1) as f64,
        mean_std: std_flat.iter().sum::<f64>() / std_flat.len().max(1) as f64,
        members,
        monitor,
    };
    Ok(Summary {
        run: crate::PreferenceSummary {
            steps: cfg.train.max_steps,
            train_loss: f64::NAN,
            train_groups: train.len(),
            validation_groups: valid.len(),
            dropped,
            validation: accuracy(&valid, &lower),
        },
        normalization: first
            .normalization
            .clone()
            .unwrap_or(model::RewardNormalization {
                offset: 0.0,
                mean: 0.0,
                std: 0.0,
                reference: "none stored".into(),
            }),
        final_dir: final_dir.to_path_buf(),
        ensemble: Some(ensemble),
    })
}

/// Pearson correlation (0 when either side is constant).
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len()) as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma).powi(2);
        sbb += (y - mb).powi(2);
    }
    if saa <= 0.0 || sbb <= 0.0 {
        0.0
    } else {
        sab / (saa * sbb).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datasets::RankedGroup;

    fn g(prompt: &str, labeler: &str) -> Read {
        (
            RankedGroup {
                prompt_id: prompt.into(),
                prompt: prompt.into(),
                labeler_id: labeler.into(),
                response_ids: vec!["a".into(), "b".into()],
                responses: vec!["x".into(), "y".into()],
                ranks: vec![1, 2],
                line: 0,
            },
            None,
        )
    }

    #[test]
    fn bootstrap_resamples_whole_prompts_and_is_seeded() {
        let groups: Vec<Read> = (0..20)
            .flat_map(|p| [g(&format!("p{p}"), "l1"), g(&format!("p{p}"), "l2")])
            .collect();
        let a = bootstrap(groups.clone(), 3, 0);
        // As many prompts drawn as there are, each with both its labelers' groups.
        assert_eq!(a.len(), groups.len());
        let mut counts: HashMap<String, usize> = HashMap::new();
        for (r, _) in &a {
            *counts.entry(r.prompt_id.clone()).or_default() += 1;
        }
        assert!(counts.values().all(|c| c % 2 == 0), "{counts:?}");
        // With replacement: some prompts are missing (P(all 20 distinct) is tiny).
        assert!(counts.len() < 20);
        // Seeded: the same (seed, member) gives the same draw; another member another.
        let ids = |v: &[Read]| {
            v.iter()
                .map(|(r, _)| r.prompt_id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&a), ids(&bootstrap(groups.clone(), 3, 0)));
        assert_ne!(ids(&a), ids(&bootstrap(groups, 3, 1)));
    }

    #[test]
    fn pearson_of_known_series() {
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]) - 1.0).abs() < 1e-12);
        assert!((pearson(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), 0.0);
    }
}
