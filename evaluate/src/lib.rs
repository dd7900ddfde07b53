//! `evaluate`: compares aligned checkpoints honestly. Samples responses from a policy and a
//! baseline (e.g. the SFT model) on held-out prompts, scores them with the reward model exactly
//! as `ppo` does, and reports, each with a 95% interval: the mean reward, the win rate of the
//! policy over the baseline, the gold reward where the prompts carry answers (so that a proxy gain
//! that is not a real gain shows), the KL from a reference, response length, EOS rate and
//! perplexity on demonstrations, and the correlation of reward with response length; plus plots
//! of the evaluation itself (reward distributions, reward and gold against length), always, and
//! of the training runs given with `--runs`. With `--best-of-n N`, also the baseline's best-of-N
//! (the best of N samples by the reward model, `reward::best_of_n`): the reward that the proxy
//! buys without training, at the analytic KL log N − (N−1)/N, beside what the policy bought.
//!
//! Everything is read and checked before anything is computed, and written into a temporary
//! folder that replaces `--out` at the end: a bad input leaves nothing behind.

#![forbid(unsafe_code)]

pub mod data;
pub mod models;
pub mod plots;
pub mod report;
pub mod stats;

use anyhow::{Context, Result, bail};
use models::{Lm, Response};
use report::{BestOfNMetrics, Candidates, Differences, Metrics, ModelMetrics, ModelRun, Settings};
use stats::LEVEL;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The command line of `evaluate`.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "evaluate",
    version,
    about = "Compare aligned checkpoints: reward, win rate, gold reward, KL and perplexity with 95% intervals; a report and plots",
    allow_negative_numbers = true
)]
pub struct Options {
    /// The policy to evaluate (a causal-LM folder, e.g. ppo's final/).
    #[arg(long)]
    pub policy: PathBuf,
    /// The model to compare with (e.g. the SFT model); also the default KL reference.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// The reward model that scores the responses (a `reward` output folder).
    #[arg(long)]
    pub reward_model: PathBuf,
    /// A reward model trained on prompts the --reward-model never saw, reported beside it (the
    /// over-optimisation check without gold); default: the monitor/ stored with an ensemble.
    #[arg(long)]
    pub heldout_reward_model: Option<PathBuf>,
    /// Held-out prompts (`prompt`, optional `answer`): .jsonl, .csv or .parquet.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Use only the first N prompts.
    #[arg(long, allow_negative_numbers = true, value_parser = model::flags::at_least::<usize>(0))]
    pub max_prompts: Option<usize>,
    /// The model the KL is measured from (default: the baseline).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Responses sampled per prompt and model.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true,
          value_parser = model::flags::at_least::<usize>(0))]
    pub samples_per_prompt: usize,
    /// Also report the baseline's best-of-N: for each prompt and sample, N responses of the
    /// baseline, the one the reward model scores highest kept (a finished one over one cut at
    /// --max-new-tokens), with its KL log N − (N−1)/N from the baseline (analytic, an upper
    /// bound). Needs --baseline.
    #[arg(long, value_name = "N", allow_negative_numbers = true,
          value_parser = model::flags::at_least::<usize>(0))]
    pub best_of_n: Option<usize>,
    /// Demonstrations (`prompt`, `response`) to measure each model's perplexity on.
    #[arg(long)]
    pub demonstrations: Option<PathBuf>,
    /// Gold reward rule: `exact_answer` (the stated answer, else the last number),
    /// `final_answer` (only an answer stated as "The answer is X" / `#### X` counts),
    /// `normalized_match` (the whole response, case and punctuation aside), `contains_answer`,
    /// `numeric:<tolerance>`, `choice` (the letter of "The answer is (B)"), `json_answer`
    /// (`{"answer": …}`) or `regex:<pattern>` (default: exact_answer when the prompts have
    /// answers).
    #[arg(long)]
    pub gold: Option<String>,
    /// Output folder: metrics.json, samples.jsonl, report.md and the plots (replaced whole).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 64, allow_negative_numbers = true,
          value_parser = model::flags::at_least::<usize>(0))]
    pub max_new_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// 1.0 disables.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true,
          value_parser = model::flags::at_least::<usize>(0))]
    pub top_k: usize,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true,
          value_parser = model::flags::at_least::<u64>(0))]
    pub seed: u64,
    /// Sequences per forward pass (sampling, scoring, KL, perplexity).
    #[arg(long, default_value_t = 16, allow_negative_numbers = true,
          value_parser = model::flags::at_least::<usize>(0))]
    pub batch_size: usize,
    /// Training-run folders (sft, reward, ppo outputs) whose metrics.jsonl to plot.
    #[arg(long, num_args = 1..)]
    pub runs: Vec<PathBuf>,
    /// `cpu`, or `cuda:N` with the tch backend.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl Options {
    fn sampling(&self) -> models::Sampling {
        models::Sampling {
            samples_per_prompt: self.samples_per_prompt,
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            batch_size: self.batch_size,
        }
    }

    fn check(&self) -> Result<()> {
        let mut errs = self.sampling().problems();
        let mut err = |e: &str| errs.push(e.to_string());
        if self.samples_per_prompt == 0 {
            err("--samples-per-prompt must be at least 1");
        }
        if self.batch_size == 0 {
            err("--batch-size must be at least 1");
        }
        if self.max_prompts == Some(0) {
            err("--max-prompts must be at least 1");
        }
        if self.best_of_n == Some(0) {
            err("--best-of-n must be at least 1");
        }
        if self.best_of_n.is_some_and(|n| n > 1) && self.temperature == 0.0 {
            err(
                "--best-of-n needs --temperature > 0 (greedy decoding samples one response N times)",
            );
        }
        if self.best_of_n.is_some() && self.baseline.is_none() {
            err("--best-of-n needs --baseline (the model whose best-of-N it reports)");
        }
        if !errs.is_empty() {
            bail!("{}", errs.join("; "));
        }
        Ok(())
    }
}

/// One model's sampled, scored responses.
struct Evaluated {
    lm_dir: PathBuf,
    template: String,
    responses: Vec<Response>,
    rewards: Vec<f64>,
    heldout: Option<Vec<f64>>,
    gold: Option<Vec<f64>>,
    kl: Option<Vec<f64>>,
    kl_note: Option<String>,
    perplexity: Option<models::Perplexity>,
}

impl Evaluated {
    fn run(&self) -> ModelRun<'_> {
        ModelRun {
            responses: &self.responses,
            rewards: &self.rewards,
            gold: self.gold.as_deref(),
            kl: self.kl.as_deref(),
            candidates: None,
        }
    }

    fn lengths(&self) -> Vec<f64> {
        self.responses
            .iter()
            .map(|r| r.tokens.len() as f64)
            .collect()
    }

    fn eos(&self) -> Vec<f64> {
        self.responses
            .iter()
            .map(|r| if r.eos { 1.0 } else { 0.0 })
            .collect()
    }

    fn metrics(&self) -> ModelMetrics {
        let est = |x: &[f64]| stats::mean_interval(x, LEVEL).expect("at least one response");
        ModelMetrics {
            dir: self.lm_dir.display().to_string(),
            template: self.template.clone(),
            responses: self.responses.len(),
            reward: est(&self.rewards),
            gold: self.gold.as_deref().and_then(|g| stats::rate(g, LEVEL)),
            heldout_reward: self.heldout.as_deref().map(est),
            kl: self.kl.as_deref().map(est),
            kl_note: self.kl_note.clone(),
            length: est(&self.lengths()),
            reward_length_correlation: stats::pearson(&self.rewards, &self.lengths(), LEVEL),
            eos_rate: stats::rate(&self.eos(), LEVEL).expect("at least one response"),
            perplexity: self.perplexity.clone(),
        }
    }

    fn plotted<'a>(&'a self, name: &'a str, lengths: &'a [f64]) -> plots::Evaluated<'a> {
        plots::Evaluated {
            name,
            rewards: &self.rewards,
            lengths,
            heldout: self.heldout.as_deref(),
            gold: self.gold.as_deref(),
        }
    }
}

/// The gold rule's score of each response; a rule that cannot score one (its prompt's answer is
/// missing or not of the rule's kind) is an error naming the prompts file and line.
fn gold_scores(
    rule: &datasets::CompiledRule,
    prompts: &[data::EvalPrompt],
    responses: &[Response],
    path: &Path,
) -> Result<Vec<f64>> {
    responses
        .iter()
        .map(|r| {
            let p = &prompts[r.prompt];
            rule.score(&r.text, p.answer.as_deref())
                .map(f64::from)
                .map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), p.line))
        })
        .collect()
}

/// The baseline's best-of-N (`--best-of-n`): the chosen responses evaluated as a model's, and
/// the candidates they were chosen from (N per response, in order).
struct Best {
    n: usize,
    model: Evaluated,
    candidate_rewards: Vec<f64>,
    candidate_eos: Vec<bool>,
}

impl Best {
    /// Best-of-`n` of `baseline` as [`models::best_of_n`] chose it, with the held-out and gold
    /// scores of the chosen; the analytic KL stands in the KL's note.
    fn new(
        n: usize,
        baseline: &Lm,
        bon: models::BestOfN,
        heldout: Option<Vec<f64>>,
        gold: Option<Vec<f64>>,
    ) -> Self {
        let kl = reward::best_of_n::kl_bound(n);
        Self {
            n,
            model: Evaluated {
                lm_dir: baseline.dir.clone(),
                template: baseline.template.as_str().to_string(),
                responses: bon.chosen,
                rewards: bon.rewards,
                heldout,
                gold,
                kl: None,
                kl_note: Some(format!("≤ {kl:.3} (log N − (N−1)/N)")),
                perplexity: None,
            },
            candidate_rewards: bon.candidate_rewards,
            candidate_eos: bon.candidate_eos,
        }
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// What [`run`] returns: where the report is and the metrics in it.
pub struct Outcome {
    pub report: PathBuf,
    pub metrics: Metrics,
}

/// Runs an evaluation; see the crate docs. Progress goes to `log`.
pub fn run(opts: &Options, log: &mut dyn Write) -> Result<Outcome> {
    opts.check()?;
    let device = model::parse_device(&opts.device)?;

    // Read and check every input before computing anything.
    let prompts = data::read_prompts(&opts.prompts, opts.max_prompts)?;
    let gold = data::gold_rule(opts.gold.as_deref(), &prompts, &opts.prompts)?;
    let demos = match &opts.demonstrations {
        Some(p) => Some(data::read_demonstrations(p)?),
        None => None,
    };
    let runs = data::read_runs(&opts.runs)?;
    let policy = Lm::load(&opts.policy, "--policy", &device)?;
    let baseline = match &opts.baseline {
        Some(d) => Some(Lm::load(d, "--baseline", &device)?),
        None => None,
    };
    let scorer = reward::Scorer::load(
        &opts.reward_model,
        reward::ScorerOptions::default(),
        &device,
    )
    .context("--reward-model")?;
    let normalization = match &scorer {
        reward::Scorer::Models { members, .. } => members[0].normalization.as_ref().map(|n| {
            format!(
                "normalised: raw − {:.4}, the mean raw reward of the {}{}",
                n.offset,
                n.reference,
                if members.len() > 1 {
                    format!(
                        " (member 1 of an ensemble of {}; each member has its own offset; the reward is mean − std over the members)",
                        members.len()
                    )
                } else {
                    String::new()
                }
            )
        }),
        reward::Scorer::Rule(_) => None,
    };
    let heldout_dir = match &opts.heldout_reward_model {
        Some(d) => Some(d.clone()),
        None => reward::scorer::monitor_dir(&opts.reward_model)?,
    };
    let heldout = match &heldout_dir {
        Some(d) => Some(
            reward::Scorer::load(d, reward::ScorerOptions::default(), &device)
                .with_context(|| format!("--heldout-reward-model {}", d.display()))?,
        ),
        None => None,
    };
    // The reference: --reference, else the baseline (reused when it is the same folder).
    let explicit_reference = opts.reference.is_some();
    let reference_dir = opts.reference.clone().or_else(|| opts.baseline.clone());
    let separate_reference = match (&opts.reference, &opts.baseline) {
        (Some(r), Some(b)) if same_dir(r, b) => None,
        (Some(r), _) => Some(Lm::load(r, "--reference", &device)?),
        (None, _) => None,
    };
    let reference: Option<&Lm> = separate_reference.as_ref().or(baseline.as_ref());
    let reference = match reference {
        Some(r) if !policy.tokenizer.same_ids(&r.tokenizer) => {
            let msg = format!(
                "the KL reference {} has another tokenizer than the policy ({} vs {} tokens); token-level KL needs the same one",
                r.dir.display(),
                r.tokenizer.vocab_size(),
                policy.tokenizer.vocab_size()
            );
            if explicit_reference {
                bail!("--reference: {msg}");
            }
            writeln!(log, "note: {msg}; no KL is reported")?;
            None
        }
        r => r,
    };
    let sampling = opts.sampling();
    let encode = |lm: &Lm| models::encode_prompts(lm, &prompts, opts.max_new_tokens, &opts.prompts);
    let policy_prompts = encode(&policy)?;
    let baseline_prompts = baseline.as_ref().map(encode).transpose()?;

    let n = prompts.len() * opts.samples_per_prompt;
    // The held-out reward model's and the gold rule's scores of responses.
    let judge = |responses: &[Response]| {
        let heldout = match &heldout {
            Some(h) => Some(models::score(h, &prompts, responses)?),
            None => None,
        };
        let gold = match &gold {
            Some(rule) => Some(gold_scores(rule, &prompts, responses, &opts.prompts)?),
            None => None,
        };
        anyhow::Ok((heldout, gold))
    };
    let evaluate = |lm: &Lm, encoded: &[Vec<u32>], name: &str, log: &mut dyn Write| {
        let t0 = std::time::Instant::now();
        let responses = models::sample(lm, encoded, &sampling)?;
        let rewards = models::score(&scorer, &prompts, &responses)?;
        let (heldout, gold) = judge(&responses)?;
        let is_reference = reference.is_some_and(|r| std::ptr::eq(r, lm));
        let (kl, kl_note) = match reference {
            Some(_) if is_reference => (None, Some("0 (the reference)".to_string())),
            Some(r) => (
                Some(models::kl_per_response(
                    lm,
                    r,
                    &responses,
                    sampling.logprob_temperature(),
                    opts.batch_size,
                )?),
                None,
            ),
            None => (None, None),
        };
        let perplexity = match &demos {
            Some(d) => Some(models::perplexity(lm, d, opts.batch_size)?),
            None => None,
        };
        writeln!(
            log,
            "{name}: {n} responses sampled and scored in {:.1}s",
            t0.elapsed().as_secs_f64()
        )?;
        anyhow::Ok(Evaluated {
            lm_dir: lm.dir.clone(),
            template: lm.template.as_str().to_string(),
            responses,
            rewards,
            heldout,
            gold,
            kl,
            kl_note,
            perplexity,
        })
    };
    let pol = evaluate(&policy, &policy_prompts, "policy", log)?;
    let base = match (&baseline, &baseline_prompts) {
        (Some(b), Some(e)) => Some(evaluate(b, e, "baseline", log)?),
        _ => None,
    };
    // The baseline's best-of-N, its candidates seeded apart from the baseline's own samples.
    let best = match (opts.best_of_n, &baseline, &baseline_prompts) {
        (Some(best_of), Some(b), Some(e)) => {
            let t0 = std::time::Instant::now();
            let candidates = models::Sampling {
                seed: !opts.seed,
                ..sampling.clone()
            };
            let bon = models::best_of_n(b, e, &candidates, best_of, &scorer, &prompts)?;
            let (heldout, gold) = judge(&bon.chosen)?;
            writeln!(
                log,
                "best-of-{best_of} of the baseline: {} responses sampled and scored in {:.1}s",
                bon.candidate_rewards.len(),
                t0.elapsed().as_secs_f64()
            )?;
            Some(Best::new(best_of, b, bon, heldout, gold))
        }
        _ => None,
    };

    // Paired comparisons: the same prompt and sample index.
    let tie = 1e-5;
    let difference = base.as_ref().map(|b| {
        let d = |x: &[f64], y: &[f64]| {
            stats::paired_difference(x, y, LEVEL).expect("at least one response")
        };
        Differences {
            reward: d(&pol.rewards, &b.rewards),
            gold: match (&pol.gold, &b.gold) {
                (Some(x), Some(y)) => Some(d(x, y)),
                _ => None,
            },
            heldout_reward: match (&pol.heldout, &b.heldout) {
                (Some(x), Some(y)) => Some(d(x, y)),
                _ => None,
            },
            kl: match (&pol.kl, &b.kl) {
                (Some(x), Some(y)) => Some(d(x, y)),
                _ => None,
            },
            length: d(&pol.lengths(), &b.lengths()),
            eos_rate: d(&pol.eos(), &b.eos()),
        }
    });
    let win_rate = base.as_ref().and_then(|b| {
        let outcomes: Vec<_> = (0..n)
            .map(|i| {
                if pol.responses[i].text == b.responses[i].text {
                    std::cmp::Ordering::Equal
                } else {
                    stats::compare(pol.rewards[i], b.rewards[i], tie)
                }
            })
            .collect();
        stats::win_rate(&outcomes, LEVEL)
    });
    let gold_win_rate = match (&pol.gold, base.as_ref().and_then(|b| b.gold.as_ref())) {
        (Some(x), Some(y)) => {
            let outcomes: Vec<_> = x
                .iter()
                .zip(y)
                .map(|(a, b)| stats::compare(*a, *b, 0.0))
                .collect();
            stats::win_rate(&outcomes, LEVEL)
        }
        _ => None,
    };
    let (pol_len, base_len) = (pol.lengths(), base.as_ref().map(Evaluated::lengths));
    let best_len = best.as_ref().map(|x| x.model.lengths());
    let best_name = best.as_ref().map(|x| format!("best-of-{}", x.n));
    let mut evaluated = vec![pol.plotted("policy", &pol_len)];
    if let (Some(b), Some(l)) = (&base, &base_len) {
        evaluated.push(b.plotted("baseline", l));
    }
    if let (Some(x), Some(l), Some(name)) = (&best, &best_len, &best_name) {
        evaluated.push(x.model.plotted(name, l));
    }
    let own_charts = plots::evaluation_charts(&evaluated);
    let (charts, notes) = plots::charts(&runs);
    for note in &notes {
        writeln!(log, "note: {note}")?;
    }
    let settings = Settings {
        prompts_file: opts.prompts.display().to_string(),
        prompts: prompts.len(),
        sampling: sampling.clone(),
        reward_model: opts.reward_model.display().to_string(),
        heldout_reward_model: heldout_dir.as_ref().map(|d| d.display().to_string()),
        reward_normalization: normalization,
        reference: reference
            .is_some()
            .then(|| reference_dir.as_ref().map(|d| d.display().to_string()))
            .flatten(),
        gold_rule: gold.as_ref().map(|g| g.rule().to_string()),
        demonstrations: opts
            .demonstrations
            .as_ref()
            .map(|d| d.display().to_string()),
        backend: model::backend_name().to_string(),
        device: opts.device.clone(),
    };
    let mut metrics = Metrics {
        settings,
        policy: pol.metrics(),
        baseline: base.as_ref().map(Evaluated::metrics),
        best_of_n: best.as_ref().map(|x| BestOfNMetrics {
            n: x.n,
            kl_analytic: reward::best_of_n::kl_bound(x.n),
            candidate_reward: stats::mean_interval(&x.candidate_rewards, LEVEL)
                .expect("at least one candidate"),
            model: x.model.metrics(),
        }),
        difference,
        win_rate,
        gold_win_rate,
        findings: Vec::new(),
        evaluation_plots: own_charts.iter().map(|c| c.file.clone()).collect(),
        plots: charts.iter().map(|c| c.file.clone()).collect(),
    };
    metrics.findings = report::findings(&metrics);

    // Write everything into a temporary folder, then put it in place.
    let tmp = model::checkpoint::sibling(&opts.out, "tmp");
    let written = (|| -> Result<()> {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let write = |name: &str, text: String| {
            let p = tmp.join(name);
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
        };
        write(
            "metrics.json",
            serde_json::to_string_pretty(&metrics)? + "\n",
        )?;
        let mut lines = String::new();
        let base_run = base.as_ref().map(Evaluated::run);
        let best_run = best.as_ref().map(|x| ModelRun {
            candidates: Some(Candidates {
                n: x.n,
                rewards: &x.candidate_rewards,
                eos: &x.candidate_eos,
            }),
            ..x.model.run()
        });
        for i in 0..n {
            let p = &prompts[pol.responses[i].prompt];
            let line = report::sample_line(p, i, &pol.run(), base_run.as_ref(), best_run.as_ref());
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        write("samples.jsonl", lines)?;
        write(
            "report.md",
            report::markdown(
                &metrics,
                &prompts,
                &pol.run(),
                base_run.as_ref(),
                best_run.as_ref(),
            ),
        )?;
        let family = plots::font().map(|_| plots::FAMILY);
        if family.is_none() {
            writeln!(
                log,
                "note: no font found (looked for {}); the plots have no text",
                plots::FONT_PATHS[0]
            )?;
        }
        let t0 = std::time::Instant::now();
        for c in own_charts.iter().chain(&charts) {
            let rgb = plots::draw(c, family).with_context(|| format!("plotting {}", c.file))?;
            plots::write_png(&tmp.join(&c.file), &rgb)?;
        }
        writeln!(
            log,
            "{} plots drawn in {:.2}s",
            own_charts.len() + charts.len(),
            t0.elapsed().as_secs_f64()
        )?;
        model::checkpoint::replace_dir(&tmp, &opts.out)?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(Outcome {
        report: opts.out.join("report.md"),
        metrics,
    })
}
