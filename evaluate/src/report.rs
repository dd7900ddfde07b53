//! What an evaluation writes: `metrics.json` (every number with its interval), `samples.jsonl`
//! (one line per prompt × sample with both models' responses, rewards and gold scores, and the
//! baseline's best-of-N with its candidates' rewards) and `report.md` (the table a person reads
//! first, what it means, side-by-side samples, the plots).

use crate::models::{Perplexity, Response, Sampling};
use crate::stats::{Correlation, Estimate, Rate, WinRate};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::fmt::Write as _;

/// The settings an evaluation ran with.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    pub prompts_file: String,
    pub prompts: usize,
    /// How the responses were sampled (its keys sit at this level of metrics.json).
    #[serde(flatten)]
    pub sampling: Sampling,
    pub reward_model: String,
    /// The held-out reward model of the over-optimisation check, if any.
    #[serde(default)]
    pub heldout_reward_model: Option<String>,
    /// How the reward model's raw scores were normalised (`rlhf.json`), if at all.
    pub reward_normalization: Option<String>,
    /// The model the KL is measured from.
    pub reference: Option<String>,
    pub gold_rule: Option<String>,
    pub demonstrations: Option<String>,
    pub backend: String,
    pub device: String,
}

/// One model's metrics.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelMetrics {
    pub dir: String,
    pub template: String,
    pub responses: usize,
    /// Reward-model score (normalised as stored with it), mean with a 95% t interval.
    pub reward: Estimate,
    /// Gold reward (0/1 by the rule), rate with a 95% Wilson interval.
    pub gold: Option<Rate>,
    /// Score of the held-out reward model (trained on prompts the reward model never saw), mean
    /// with a 95% t interval.
    #[serde(default)]
    pub heldout_reward: Option<Estimate>,
    /// KL from the reference per response (nats), mean with a 95% t interval.
    pub kl: Option<Estimate>,
    /// Why `kl` is absent, e.g. "is the reference".
    pub kl_note: Option<String>,
    /// Response length in tokens, EOS included.
    pub length: Estimate,
    /// Pearson correlation of the reward with the response length (tokens) over the responses,
    /// with its 95% Fisher interval; None when every response has the same length.
    #[serde(default)]
    pub reward_length_correlation: Option<Correlation>,
    pub eos_rate: Rate,
    pub perplexity: Option<Perplexity>,
}

/// Policy − baseline, paired by prompt and sample, with 95% t intervals.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Differences {
    pub reward: Estimate,
    pub gold: Option<Estimate>,
    #[serde(default)]
    pub heldout_reward: Option<Estimate>,
    pub kl: Option<Estimate>,
    pub length: Estimate,
    pub eos_rate: Estimate,
}

/// The baseline's best-of-N (`--best-of-n`): its metrics as any model's, with the analytic KL in
/// place of a measured one (its `kl` is absent, its `kl_note` says why).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BestOfNMetrics {
    /// N: samples drawn for each response kept.
    pub n: usize,
    /// log N − (N−1)/N nats: the KL of the best-of-N distribution from the baseline (Stiennon et
    /// al. 2020; Gao et al. 2022), an upper bound (Beirami et al. 2024).
    pub kl_analytic: f64,
    /// The reward of all N candidates, mean with a 95% t interval: the baseline sampled once, on
    /// the same prompts.
    pub candidate_reward: Estimate,
    #[serde(flatten)]
    pub model: ModelMetrics,
}

/// Everything in `metrics.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Metrics {
    pub settings: Settings,
    pub policy: ModelMetrics,
    pub baseline: Option<ModelMetrics>,
    /// The baseline's best-of-N, with `--best-of-n`.
    #[serde(default)]
    pub best_of_n: Option<BestOfNMetrics>,
    pub difference: Option<Differences>,
    /// Policy over baseline by reward-model score, ties half.
    pub win_rate: Option<WinRate>,
    /// Policy over baseline by gold reward, ties half.
    pub gold_win_rate: Option<WinRate>,
    /// What the numbers say, in sentences (also in report.md).
    pub findings: Vec<String>,
    /// PNG files of the evaluation itself (distributions, reward against length), beside this one.
    #[serde(default)]
    pub evaluation_plots: Vec<String>,
    /// PNG files of the training runs (`--runs`), beside this one.
    pub plots: Vec<String>,
}

/// One model's side of the evaluation, per response (prompt-major).
pub struct ModelRun<'a> {
    pub responses: &'a [Response],
    pub rewards: &'a [f64],
    pub gold: Option<&'a [f64]>,
    pub kl: Option<&'a [f64]>,
    /// A best-of-N side's candidates: N rewards and EOS flags per response, in order.
    pub candidates: Option<Candidates<'a>>,
}

/// The candidates a best-of-N response was chosen from.
#[derive(Clone, Copy)]
pub struct Candidates<'a> {
    pub n: usize,
    pub rewards: &'a [f64],
    pub eos: &'a [bool],
}

fn sgn(x: f64, digits: usize) -> String {
    if x >= 0.0 {
        format!("+{x:.digits$}")
    } else {
        format!("-{:.digits$}", -x)
    }
}

fn est(e: &Estimate, digits: usize) -> String {
    format!(
        "{:.digits$} [{:.digits$}, {:.digits$}]",
        e.mean, e.low, e.high
    )
}

fn diff(e: &Estimate, digits: usize) -> String {
    format!(
        "{} [{}, {}]",
        sgn(e.mean, digits),
        sgn(e.low, digits),
        sgn(e.high, digits)
    )
}

fn rate(r: &Rate) -> String {
    format!("{:.3} [{:.3}, {:.3}]", r.rate, r.low, r.high)
}

fn win(w: &WinRate) -> String {
    format!(
        "{:.3} [{:.3}, {:.3}] ({} wins, {} ties, {} losses)",
        w.rate, w.low, w.high, w.wins, w.ties, w.losses
    )
}

/// Sentences about what the numbers mean, the first one the verdict on proxy against gold.
pub fn findings(m: &Metrics) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(d) = &m.difference {
        let r = &d.reward;
        let reward_up = r.low > 0.0;
        match &d.gold {
            Some(g) if reward_up && g.low <= 0.0 => out.push(format!(
                "**Warning: the reward model's score rose ({}, 95% [{}, {}]) but the gold reward did {} ({}, 95% [{}, {}]).** The gain is in the proxy, not in the task: this looks like reward over-optimisation (Gao et al. 2022), not a real improvement.",
                sgn(r.mean, 3),
                sgn(r.low, 3),
                sgn(r.high, 3),
                if g.high < 0.0 { "fall" } else { "not rise" },
                sgn(g.mean, 3),
                sgn(g.low, 3),
                sgn(g.high, 3)
            )),
            Some(g) if reward_up => out.push(format!(
                "The reward model's score rose ({}) and so did the gold reward ({}, 95% [{}, {}]).",
                sgn(r.mean, 3),
                sgn(g.mean, 3),
                sgn(g.low, 3),
                sgn(g.high, 3)
            )),
            Some(g) if g.low > 0.0 => out.push(format!(
                "The gold reward rose ({}, 95% [{}, {}]) while the reward model's score did not ({}): the reward model misses part of the improvement.",
                sgn(g.mean, 3),
                sgn(g.low, 3),
                sgn(g.high, 3),
                sgn(r.mean, 3)
            )),
            _ if reward_up => out.push(format!(
                "The reward model's score rose ({}, 95% [{}, {}]); there is no gold reward to check it against (give the prompts an `answer` or pass --gold).",
                sgn(r.mean, 3),
                sgn(r.low, 3),
                sgn(r.high, 3)
            )),
            _ if r.high < 0.0 => out.push(format!(
                "The policy's reward-model score is lower than the baseline's ({}, 95% [{}, {}]).",
                sgn(r.mean, 3),
                sgn(r.low, 3),
                sgn(r.high, 3)
            )),
            _ => out.push(format!(
                "The reward difference ({}, 95% [{}, {}]) is within noise: the interval contains 0.",
                sgn(r.mean, 3),
                sgn(r.low, 3),
                sgn(r.high, 3)
            )),
        }
        if let Some(g) = d.gold.as_ref().filter(|g| !reward_up && g.low <= 0.0) {
            out.push(format!(
                "The gold reward {} ({}, 95% [{}, {}]).",
                if g.high < 0.0 {
                    "fell"
                } else {
                    "did not change beyond noise"
                },
                sgn(g.mean, 3),
                sgn(g.low, 3),
                sgn(g.high, 3)
            ));
        }
        if let Some(h) = &d.heldout_reward {
            out.push(if reward_up && h.high < 0.0 {
                format!(
                    "**Warning: the held-out reward model's score fell ({}, 95% [{}, {}]) while the reward model's rose.** Without gold, this is the sign of over-optimisation: the policy exploits what the optimised reward model alone gets wrong.",
                    sgn(h.mean, 3),
                    sgn(h.low, 3),
                    sgn(h.high, 3)
                )
            } else {
                format!(
                    "The held-out reward model's score changed by {} (95% [{}, {}]).",
                    sgn(h.mean, 3),
                    sgn(h.low, 3),
                    sgn(h.high, 3)
                )
            });
        }
    } else {
        out.push("No --baseline: there are no differences or win rates.".into());
    }
    if let Some(f) = best_of_n_finding(m) {
        out.push(f);
    }
    if let Some(f) = length_finding(m) {
        out.push(f);
    }
    for (name, mm) in [
        ("policy", Some(&m.policy)),
        ("baseline", m.baseline.as_ref()),
    ] {
        let Some(mm) = mm else { continue };
        if mm.eos_rate.rate < 0.9 {
            out.push(format!(
                "{:.0}% of the {name}'s responses have no EOS (cut at --max-new-tokens {}); their rewards are those of truncated text.",
                100.0 * (1.0 - mm.eos_rate.rate),
                m.settings.sampling.max_new_tokens
            ));
        }
    }
    out
}

/// What the baseline's best-of-N buys without training, beside what the policy bought: the
/// comparison at (roughly) equal KL of Gao et al. 2022.
fn best_of_n_finding(m: &Metrics) -> Option<String> {
    let b = m.best_of_n.as_ref()?;
    let gold = |mm: &ModelMetrics| {
        mm.gold
            .as_ref()
            .map_or(String::new(), |g| format!(", gold {}", rate(g)))
    };
    let policy_kl = match &m.policy.kl {
        Some(k) => format!("at a measured KL of {} nats", est(k, 3)),
        None => "(no KL measured)".into(),
    };
    Some(format!(
        "Best-of-{} of the baseline, without training: reward {}{} at KL ≤ {:.3} nats (log N − (N−1)/N; its candidates score {}); the policy: reward {}{} {policy_kl}. RL is worth its cost where it beats best-of-N at the same KL (Gao et al. 2022).",
        b.n,
        est(&b.model.reward, 3),
        gold(&b.model),
        b.kl_analytic,
        est(&b.candidate_reward, 3),
        est(&m.policy.reward, 3),
        gold(&m.policy),
    ))
}

/// The length check flags a policy whose reward follows its response length more than the
/// baseline's does: its Pearson r of reward with length at least `LENGTH_CORRELATION` (a moderate
/// correlation) and at least `LENGTH_CORRELATION_RISE` above the baseline's. Point estimates; the
/// finding prints both intervals so that a reader sees how sure it is.
pub const LENGTH_CORRELATION: f64 = 0.3;
/// See [`LENGTH_CORRELATION`].
pub const LENGTH_CORRELATION_RISE: f64 = 0.2;

fn corr(c: &Correlation) -> String {
    format!("{:.2} [{:.2}, {:.2}]", c.r, c.low, c.high)
}

/// The length-hacking finding (see [`LENGTH_CORRELATION`]): a warning when the policy's responses
/// are also longer than the baseline's beyond noise, a note otherwise.
fn length_finding(m: &Metrics) -> Option<String> {
    let b = m.baseline.as_ref()?;
    let (p, q) = (
        m.policy.reward_length_correlation?,
        b.reward_length_correlation?,
    );
    if p.r < LENGTH_CORRELATION || p.r - q.r < LENGTH_CORRELATION_RISE {
        return None;
    }
    let rs = format!(
        "Pearson r of reward with length {} against the baseline's {}; flagged at r ≥ {LENGTH_CORRELATION} and {LENGTH_CORRELATION_RISE} above the baseline's",
        corr(&p),
        corr(&q)
    );
    let gold = if m.policy.gold.is_some() {
        " and gold_by_length.png"
    } else {
        ""
    };
    Some(match m.difference.as_ref().map(|d| &d.length) {
        Some(l) if l.low > 0.0 => format!(
            "**Warning: the policy's responses are longer ({} tokens, 95% [{}, {}]) and its reward follows length more than the baseline's ({rs}).** The reward model may be paying for length, the commonest exploit. A correlation is not proof: compare the rewards at equal length in reward_vs_length.png{gold}.",
            sgn(l.mean, 1),
            sgn(l.low, 1),
            sgn(l.high, 1),
        ),
        _ => format!(
            "The policy's reward follows response length more than the baseline's ({rs}), though its responses are not longer beyond noise; see reward_vs_length.png{gold}."
        ),
    })
}

/// One line of samples.jsonl; a best-of-N side also lists its candidates' rewards and EOS.
pub fn sample_line(
    prompt: &crate::data::EvalPrompt,
    index: usize,
    policy: &ModelRun,
    baseline: Option<&ModelRun>,
    best_of_n: Option<&ModelRun>,
) -> serde_json::Value {
    let side = |m: &ModelRun| {
        let r = &m.responses[index];
        let mut v = json!({
            "response": r.text,
            "reward": m.rewards[index],
            "gold": m.gold.map(|g| g[index]),
            "eos": r.eos,
            "length": r.tokens.len(),
            "kl": m.kl.map(|k| k[index]),
        });
        if let Some(c) = m.candidates {
            let at = index * c.n..(index + 1) * c.n;
            v["candidate_rewards"] = json!(c.rewards[at.clone()]);
            v["candidate_eos"] = json!(c.eos[at]);
        }
        v
    };
    let r = &policy.responses[index];
    let mut line = json!({
        "prompt": prompt.text,
        "answer": prompt.answer,
        "line": prompt.line,
        "sample": r.sample,
        "policy": side(policy),
        "baseline": baseline.map(side),
    });
    if let Some(b) = best_of_n {
        line["best_of_n"] = side(b);
    }
    line
}

/// The (prompt, sample) pairs shown side by side: up to 8, prompts spread over the file, sample 0
/// of each; with fewer than 8 prompts, further samples of the same prompts.
pub fn shown_samples(prompts: usize, samples_per_prompt: usize) -> Vec<(usize, usize)> {
    const SHOWN: usize = 8;
    if prompts >= SHOWN {
        return (0..SHOWN).map(|j| (j * prompts / SHOWN, 0)).collect();
    }
    (0..samples_per_prompt)
        .flat_map(|s| (0..prompts).map(move |i| (i, s)))
        .take(SHOWN)
        .collect()
}

/// Text for a markdown table cell.
fn cell(s: &str) -> String {
    let t = s.trim();
    if t.is_empty() {
        return "*(empty)*".into();
    }
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('|', "\\|")
        .replace('\n', "<br>")
}

/// The report: the metrics table, the findings, side-by-side samples, the plots. With a best-of-N
/// side, the table and the samples get a column for it, between the baseline and the difference.
pub fn markdown(
    m: &Metrics,
    prompts: &[crate::data::EvalPrompt],
    policy: &ModelRun,
    baseline: Option<&ModelRun>,
    best_of_n: Option<&ModelRun>,
) -> String {
    let s = &m.settings;
    let mut o = String::new();
    let b = m.baseline.as_ref();
    let bon = m.best_of_n.as_ref();
    let _ = writeln!(o, "# Evaluation of `{}`", m.policy.dir);
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{} prompts from `{}` × {} sample(s) = {} responses per model; max_new_tokens {}, temperature {}, top_p {}, top_k {}, seed {}.",
        s.prompts,
        s.prompts_file,
        s.sampling.samples_per_prompt,
        m.policy.responses,
        s.sampling.max_new_tokens,
        s.sampling.temperature,
        s.sampling.top_p,
        s.sampling.top_k,
        s.sampling.seed
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "- policy: `{}`", m.policy.dir);
    if let Some(b) = b {
        let _ = writeln!(o, "- baseline: `{}`", b.dir);
    }
    let _ = writeln!(
        o,
        "- reward model: `{}` ({})",
        s.reward_model,
        s.reward_normalization
            .as_deref()
            .unwrap_or("raw scores: no normalisation stored")
    );
    if let Some(r) = &s.reference {
        let _ = writeln!(o, "- KL reference: `{r}`");
    }
    if let Some(g) = &s.gold_rule {
        let _ = writeln!(o, "- gold reward: rule `{g}`");
    }
    if let Some(x) = bon {
        let _ = writeln!(
            o,
            "- best-of-{}: the baseline's best of {} samples by the reward model, for each prompt and sample",
            x.n, x.n
        );
    }
    let _ = writeln!(o);
    let bon_head = bon.map_or(String::new(), |x| format!(" best-of-{} (baseline) |", x.n));
    let _ = writeln!(
        o,
        "| metric | policy | baseline |{bon_head} difference (policy − baseline) |"
    );
    let _ = writeln!(
        o,
        "|---|---|---|{}---|",
        if bon.is_some() { "---|" } else { "" }
    );
    let dash = || "—".to_string();
    let d = m.difference.as_ref();
    // `bn` is the best-of-N cell, left out without a best-of-N side.
    let mut row = |name: &str, p: String, bl: String, bn: String, df: String| {
        let bn = if bon.is_some() {
            format!(" {bn} |")
        } else {
            String::new()
        };
        let _ = writeln!(o, "| {name} | {p} | {bl} |{bn} {df} |");
    };
    let bon_model = |f: &dyn Fn(&ModelMetrics) -> Option<String>| {
        bon.and_then(|x| f(&x.model)).unwrap_or_else(dash)
    };
    row(
        "reward (reward model)",
        est(&m.policy.reward, 3),
        b.map_or_else(dash, |b| est(&b.reward, 3)),
        bon_model(&|x| Some(est(&x.reward, 3))),
        d.map_or_else(dash, |d| diff(&d.reward, 3)),
    );
    if m.policy.heldout_reward.is_some() {
        row(
            "reward (held-out reward model)",
            m.policy
                .heldout_reward
                .as_ref()
                .map_or_else(dash, |e| est(e, 3)),
            b.and_then(|b| b.heldout_reward.as_ref())
                .map_or_else(dash, |e| est(e, 3)),
            bon_model(&|x| x.heldout_reward.as_ref().map(|e| est(e, 3))),
            d.and_then(|d| d.heldout_reward.as_ref())
                .map_or_else(dash, |e| diff(e, 3)),
        );
    }
    if m.policy.gold.is_some() {
        row(
            &format!("gold reward ({})", s.gold_rule.as_deref().unwrap_or("gold")),
            m.policy.gold.as_ref().map_or_else(dash, rate),
            b.and_then(|b| b.gold.as_ref()).map_or_else(dash, rate),
            bon_model(&|x| x.gold.as_ref().map(rate)),
            d.and_then(|d| d.gold.as_ref())
                .map_or_else(dash, |g| diff(g, 3)),
        );
    }
    if let Some(w) = &m.win_rate {
        row(
            "win rate over baseline (reward)",
            win(w),
            dash(),
            dash(),
            dash(),
        );
    }
    if let Some(w) = &m.gold_win_rate {
        row(
            "win rate over baseline (gold)",
            win(w),
            dash(),
            dash(),
            dash(),
        );
    }
    let kl = |mm: &ModelMetrics| match (&mm.kl, &mm.kl_note) {
        (Some(k), _) => est(k, 3),
        (None, Some(n)) => n.clone(),
        (None, None) => dash(),
    };
    if m.policy.kl.is_some() || m.policy.kl_note.is_some() || bon.is_some() {
        row(
            "KL from reference (nats / response)",
            kl(&m.policy),
            b.map_or_else(dash, kl),
            bon_model(&|x| Some(kl(x))),
            d.and_then(|d| d.kl.as_ref())
                .map_or_else(dash, |k| diff(k, 3)),
        );
    }
    let len = |e: &Estimate| format!("{:.1} ± {:.1} sd", e.mean, e.sd);
    row(
        "response length (tokens, EOS incl.)",
        len(&m.policy.length),
        b.map_or_else(dash, |b| len(&b.length)),
        bon_model(&|x| Some(len(&x.length))),
        d.map_or_else(dash, |d| diff(&d.length, 1)),
    );
    row(
        "EOS rate",
        rate(&m.policy.eos_rate),
        b.map_or_else(dash, |b| rate(&b.eos_rate)),
        bon_model(&|x| Some(rate(&x.eos_rate))),
        d.map_or_else(dash, |d| diff(&d.eos_rate, 3)),
    );
    let ppl = |p: &Perplexity| {
        format!(
            "{:.2} (NLL {:.3}, {} tokens)",
            p.perplexity, p.nll, p.tokens
        )
    };
    if m.policy.perplexity.is_some() {
        row(
            "perplexity on demonstrations",
            m.policy.perplexity.as_ref().map_or_else(dash, ppl),
            b.and_then(|b| b.perplexity.as_ref()).map_or_else(dash, ppl),
            dash(),
            match (&m.policy.perplexity, b.and_then(|b| b.perplexity.as_ref())) {
                (Some(p), Some(q)) => sgn(p.perplexity - q.perplexity, 2),
                _ => dash(),
            },
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "Brackets are 95% intervals: Student's t for means and for the differences (paired by prompt and sample), Wilson for rates and win rates (ties count half). Rewards are the reward model's, normalised as stored with it, without PPO's missing-EOS penalty."
    );
    if bon.is_some() {
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "Best-of-N keeps the highest-reward sample among those that ended with EOS (one cut at max_new_tokens only when none did); its KL from the baseline is the analytic log N − (N−1)/N (Stiennon et al. 2020, Gao et al. 2022), an upper bound (Beirami et al. 2024), not measured."
        );
    }
    let _ = writeln!(o);
    for f in &m.findings {
        let _ = writeln!(o, "{f}");
        let _ = writeln!(o);
    }

    let _ = writeln!(o, "## Samples");
    let _ = writeln!(o);
    let bon_title = bon.map_or(String::new(), |x| format!("best-of-{} (baseline)", x.n));
    for (j, (i, sample)) in shown_samples(prompts.len(), s.sampling.samples_per_prompt)
        .into_iter()
        .enumerate()
    {
        let idx = i * s.sampling.samples_per_prompt + sample;
        let p = &prompts[i];
        let _ = write!(o, "### {}. {}", j + 1, cell(&p.text));
        if s.sampling.samples_per_prompt > 1 {
            let _ = write!(o, " (sample {})", sample + 1);
        }
        let _ = writeln!(o);
        let _ = writeln!(o);
        if let Some(a) = &p.answer {
            let _ = writeln!(o, "answer: `{}`", a.replace('`', "'"));
            let _ = writeln!(o);
        }
        let resp = |m: &ModelRun| {
            let r = &m.responses[idx];
            let mut t = cell(&r.text);
            if !r.eos {
                t.push_str(" *(no EOS)*");
            }
            t
        };
        let score = |m: &ModelRun| {
            let mut t = format!("{:.3}", m.rewards[idx]);
            if let Some(g) = m.gold {
                let _ = write!(t, " (gold {})", g[idx]);
            }
            t
        };
        let extra = |f: &dyn Fn(&ModelRun) -> String| {
            best_of_n.map_or(String::new(), |x| format!(" {} |", f(x)))
        };
        let _ = writeln!(
            o,
            "| | policy | baseline |{}",
            extra(&|_| bon_title.clone())
        );
        let _ = writeln!(o, "|---|---|---|{}", extra(&|_| "---".into()));
        let _ = writeln!(
            o,
            "| response | {} | {} |{}",
            resp(policy),
            baseline.map_or_else(dash, resp),
            extra(&resp)
        );
        let _ = writeln!(
            o,
            "| reward | {} | {} |{}",
            score(policy),
            baseline.map_or_else(dash, score),
            extra(&score)
        );
        let _ = writeln!(o);
    }
    if !m.evaluation_plots.is_empty() {
        let _ = writeln!(o, "## Distributions");
        let _ = writeln!(o);
        let r = |mm: &ModelMetrics| {
            mm.reward_length_correlation
                .as_ref()
                .map_or("n/a (one length)".into(), corr)
        };
        let _ = write!(
            o,
            "Pearson r of reward with response length (95% Fisher interval): policy {}",
            r(&m.policy)
        );
        if let Some(b) = &m.baseline {
            let _ = write!(o, ", baseline {}", r(b));
        }
        let _ = writeln!(o, ".");
        let _ = writeln!(o);
        for p in &m.evaluation_plots {
            let _ = writeln!(o, "![{p}]({p})");
            let _ = writeln!(o);
            if let Some(c) = crate::plots::caption(p) {
                let _ = writeln!(o, "{c}");
                let _ = writeln!(o);
            }
        }
    }
    if !m.plots.is_empty() {
        let _ = writeln!(o, "## Training runs");
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "Per-step and per-iteration curves (SFT loss; PPO score, KL, response length) are drawn as faint dots, one per logged value, under their centred moving average as the line: the mean of the w points around each (w = max(1, n/20) made odd, named in each legend), drawn where the window fits, so the line stops (w − 1)/2 points short of each end."
        );
        let _ = writeln!(o);
        for p in &m.plots {
            let _ = writeln!(o, "![{p}]({p})");
            let _ = writeln!(o);
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(mean: f64, half: f64) -> Estimate {
        Estimate {
            mean,
            low: mean - half,
            high: mean + half,
            sd: 1.0,
            n: 100,
        }
    }

    fn r(rate: f64) -> Rate {
        Rate {
            successes: 100.0 * rate,
            n: 100,
            rate,
            low: rate - 0.05,
            high: rate + 0.05,
        }
    }

    fn c(r: f64) -> Correlation {
        Correlation {
            r,
            low: r - 0.1,
            high: r + 0.1,
            n: 100,
        }
    }

    fn model() -> ModelMetrics {
        ModelMetrics {
            dir: "m".into(),
            template: "{prompt}".into(),
            responses: 100,
            reward: e(0.0, 0.1),
            gold: Some(r(0.5)),
            heldout_reward: None,
            kl: None,
            kl_note: None,
            length: e(10.0, 1.0),
            reward_length_correlation: Some(c(0.1)),
            eos_rate: r(0.95),
            perplexity: None,
        }
    }

    fn metrics(reward: Estimate, gold: Option<Estimate>) -> Metrics {
        Metrics {
            settings: Settings {
                prompts_file: "p.jsonl".into(),
                prompts: 100,
                sampling: Sampling {
                    samples_per_prompt: 1,
                    max_new_tokens: 64,
                    temperature: 1.0,
                    top_k: 0,
                    top_p: 1.0,
                    seed: 0,
                    batch_size: 16,
                },
                reward_model: "rm".into(),
                heldout_reward_model: None,
                reward_normalization: None,
                reference: None,
                gold_rule: gold.map(|_| "exact_answer".into()),
                demonstrations: None,
                backend: "flex".into(),
                device: "cpu".into(),
            },
            policy: model(),
            baseline: Some(model()),
            best_of_n: None,
            difference: Some(Differences {
                reward,
                gold,
                heldout_reward: None,
                kl: None,
                length: e(0.0, 1.0),
                eos_rate: e(0.0, 0.01),
            }),
            win_rate: None,
            gold_win_rate: None,
            findings: Vec::new(),
            evaluation_plots: Vec::new(),
            plots: Vec::new(),
        }
    }

    #[test]
    fn longer_responses_whose_reward_follows_length_are_flagged() {
        let mut m = metrics(e(0.5, 0.1), Some(e(0.1, 0.05)));
        let length_findings = |m: &Metrics| -> Vec<String> {
            findings(m)
                .into_iter()
                .filter(|f| f.contains("follows response length") || f.contains("follows length"))
                .collect()
        };
        // Longer, and the policy's r 0.6 against the baseline's 0.1: a warning naming both
        // correlations, their intervals and the thresholds.
        m.difference.as_mut().unwrap().length = e(4.0, 1.0);
        m.policy.reward_length_correlation = Some(c(0.6));
        let f = length_findings(&m);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(
            f[0].starts_with(
                "**Warning: the policy's responses are longer (+4.0 tokens, 95% [+3.0, +5.0])"
            ),
            "{}",
            f[0]
        );
        assert!(
            f[0].contains("0.60 [0.50, 0.70] against the baseline's 0.10 [0.00, 0.20]"),
            "{}",
            f[0]
        );
        assert!(
            f[0].contains("flagged at r ≥ 0.3 and 0.2 above"),
            "{}",
            f[0]
        );
        assert!(f[0].contains("gold_by_length.png"), "{}", f[0]);
        // Exactly at both thresholds (0.3, and 0.2 above 0.1): still flagged.
        let mut edge = m.clone();
        edge.policy.reward_length_correlation = Some(c(0.3));
        edge.baseline.as_mut().unwrap().reward_length_correlation = Some(c(0.1 - 1e-9));
        assert_eq!(length_findings(&edge).len(), 1);
        // Not longer beyond noise: a note, not a warning.
        let mut same_length = m.clone();
        same_length.difference.as_mut().unwrap().length = e(0.5, 1.0);
        let f = length_findings(&same_length);
        assert!(
            f.len() == 1 && !f[0].contains("Warning") && f[0].contains("not longer beyond noise"),
            "{f:?}"
        );
        // Following length as the baseline did, or weakly, or no correlation (one length): none.
        let mut like_baseline = m.clone();
        like_baseline
            .baseline
            .as_mut()
            .unwrap()
            .reward_length_correlation = Some(c(0.5));
        assert!(length_findings(&like_baseline).is_empty());
        let mut weak = m.clone();
        weak.policy.reward_length_correlation = Some(c(0.25));
        assert!(length_findings(&weak).is_empty());
        let mut one_length = m.clone();
        one_length
            .baseline
            .as_mut()
            .unwrap()
            .reward_length_correlation = None;
        assert!(length_findings(&one_length).is_empty());
    }

    #[test]
    fn the_report_links_the_evaluation_plots_with_captions() {
        let mut m = metrics(e(0.4, 0.1), None);
        m.policy.reward_length_correlation = Some(c(0.45));
        m.baseline.as_mut().unwrap().reward_length_correlation = None;
        m.evaluation_plots = vec![
            "reward_distribution.png".into(),
            "reward_vs_length.png".into(),
        ];
        let md = markdown(&m, &[], &empty_run(), Some(&empty_run()), None);
        assert!(md.contains("## Distributions"), "{md}");
        assert!(
            md.contains("policy 0.45 [0.35, 0.55], baseline n/a (one length)."),
            "{md}"
        );
        for p in &m.evaluation_plots {
            let link = format!("![{p}]({p})\n\n{}", crate::plots::caption(p).unwrap());
            assert!(md.contains(&link), "{md}");
        }
        assert!(!md.contains("## Training runs"), "{md}");
    }

    #[test]
    fn a_heldout_fall_under_a_proxy_gain_is_flagged() {
        let mut m = metrics(e(0.5, 0.1), None);
        m.difference.as_mut().unwrap().heldout_reward = Some(e(-0.3, 0.1));
        let f = findings(&m);
        assert!(
            f.iter()
                .any(|s| s.contains("held-out reward model's score fell")),
            "{f:?}"
        );
        // Held-out up with the proxy: no warning, the change is reported.
        m.difference.as_mut().unwrap().heldout_reward = Some(e(0.3, 0.1));
        let f = findings(&m);
        assert!(
            !f.iter().any(|s| s.contains("Warning: the held-out")),
            "{f:?}"
        );
        assert!(f.iter().any(|s| s.contains("changed by +0.300")), "{f:?}");
    }

    #[test]
    fn a_proxy_gain_without_a_gold_gain_is_flagged() {
        // Reward up beyond noise, gold flat: the over-optimisation warning.
        let f = findings(&metrics(e(0.4, 0.1), Some(e(0.0, 0.05))));
        assert!(
            f[0].contains("Warning") && f[0].contains("did not rise"),
            "{f:?}"
        );
        // Gold down: says it fell.
        let f = findings(&metrics(e(0.4, 0.1), Some(e(-0.2, 0.05))));
        assert!(f[0].contains("Warning") && f[0].contains("fall"), "{f:?}");
        // Both up: no warning.
        let f = findings(&metrics(e(0.4, 0.1), Some(e(0.2, 0.05))));
        assert!(!f.iter().any(|s| s.contains("Warning")), "{f:?}");
        assert!(f[0].contains("so did the gold reward"), "{f:?}");
        // Reward within noise: no warning, and the gold difference is reported.
        let f = findings(&metrics(e(0.05, 0.1), Some(e(0.0, 0.05))));
        assert!(!f.iter().any(|s| s.contains("Warning")), "{f:?}");
        assert!(
            f[0].contains("within noise") && f[1].contains("gold"),
            "{f:?}"
        );
        // No gold: says there is nothing to check the gain against.
        let f = findings(&metrics(e(0.4, 0.1), None));
        assert!(f[0].contains("no gold reward"), "{f:?}");
    }

    #[test]
    fn the_report_shows_the_warning_and_escapes_cells() {
        let mut m = metrics(e(0.4, 0.1), Some(e(0.0, 0.05)));
        m.findings = findings(&m);
        let md = markdown(&m, &[], &empty_run(), Some(&empty_run()), None);
        assert!(
            md.contains("| reward (reward model) | 0.000 [-0.100, 0.100] |"),
            "{md}"
        );
        assert!(md.contains("+0.400 [+0.300, +0.500]"), "{md}");
        assert!(md.contains("**Warning"), "{md}");
        assert_eq!(cell(" a|b\nc<d> "), "a\\|b<br>c&lt;d&gt;");
        assert_eq!(cell("  "), "*(empty)*");
    }

    #[test]
    fn best_of_n_gets_a_column_a_finding_and_its_candidates_in_samples() {
        let mut m = metrics(e(0.4, 0.1), Some(e(0.1, 0.05)));
        let plain = markdown(&m, &[], &empty_run(), Some(&empty_run()), None);
        assert!(
            plain.contains("| metric | policy | baseline | difference (policy − baseline) |"),
            "{plain}"
        );
        m.policy.kl = Some(e(2.0, 0.5));
        m.best_of_n = Some(BestOfNMetrics {
            n: 4,
            kl_analytic: 4f64.ln() - 0.75,
            candidate_reward: e(0.0, 0.1),
            model: ModelMetrics {
                reward: e(0.8, 0.1),
                gold: Some(r(0.6)),
                kl_note: Some("≤ 0.636 (log N − (N−1)/N)".into()),
                ..model()
            },
        });
        m.findings = findings(&m);
        let f: Vec<&String> = m
            .findings
            .iter()
            .filter(|f| f.contains("Best-of-4"))
            .collect();
        assert_eq!(f.len(), 1, "{:?}", m.findings);
        assert!(
            f[0].starts_with("Best-of-4 of the baseline, without training: reward 0.800 [0.700, 0.900], gold 0.600 [0.550, 0.650] at KL ≤ 0.636 nats (log N − (N−1)/N; its candidates score 0.000 [-0.100, 0.100]); the policy: reward 0.000 [-0.100, 0.100], gold 0.500 [0.450, 0.550] at a measured KL of 2.000 [1.500, 2.500] nats."),
            "{}",
            f[0]
        );
        let md = markdown(
            &m,
            &[],
            &empty_run(),
            Some(&empty_run()),
            Some(&empty_run()),
        );
        for want in [
            "| metric | policy | baseline | best-of-4 (baseline) | difference (policy − baseline) |\n|---|---|---|---|---|",
            "| reward (reward model) | 0.000 [-0.100, 0.100] | 0.000 [-0.100, 0.100] | 0.800 [0.700, 0.900] | +0.400 [+0.300, +0.500] |",
            "| gold reward (exact_answer) | 0.500 [0.450, 0.550] | 0.500 [0.450, 0.550] | 0.600 [0.550, 0.650] |",
            "| KL from reference (nats / response) | 2.000 [1.500, 2.500] | — | ≤ 0.636 (log N − (N−1)/N) | — |",
            "Best-of-N keeps the highest-reward sample among those that ended with EOS",
        ] {
            assert!(md.contains(want), "report.md lacks {want:?}:\n{md}");
        }
        // samples.jsonl: the best-of-N side with its candidates; none without one.
        let response = |text: &str| Response {
            prompt: 0,
            sample: 0,
            prompt_tokens: vec![1],
            tokens: vec![5, 2],
            text: text.into(),
            eos: true,
        };
        let (a, b) = ([response("a")], [response("b")]);
        let run = |responses| ModelRun {
            responses,
            rewards: &[0.5],
            gold: None,
            kl: None,
            candidates: None,
        };
        let prompt = crate::data::EvalPrompt {
            text: "p".into(),
            answer: None,
            line: 1,
        };
        let bon = ModelRun {
            candidates: Some(Candidates {
                n: 3,
                rewards: &[0.1, 0.5, 0.2],
                eos: &[true, true, false],
            }),
            ..run(&b)
        };
        let line = sample_line(&prompt, 0, &run(&a), None, Some(&bon));
        assert_eq!(line["best_of_n"]["response"], "b");
        assert_eq!(
            line["best_of_n"]["candidate_rewards"],
            json!([0.1, 0.5, 0.2])
        );
        assert_eq!(
            line["best_of_n"]["candidate_eos"],
            json!([true, true, false])
        );
        assert!(line["policy"].get("candidate_rewards").is_none());
        let line = sample_line(&prompt, 0, &run(&a), None, None);
        assert!(line.get("best_of_n").is_none(), "{line}");
    }

    #[test]
    fn side_by_side_samples_spread_over_prompts() {
        assert_eq!(
            shown_samples(100, 3),
            [0, 12, 25, 37, 50, 62, 75, 87].map(|i| (i, 0))
        );
        assert_eq!(
            shown_samples(3, 2),
            [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
        );
        assert_eq!(shown_samples(5, 4).len(), 8);
        assert!(shown_samples(0, 1).is_empty());
    }

    fn empty_run() -> ModelRun<'static> {
        ModelRun {
            responses: &[],
            rewards: &[],
            gold: None,
            kl: None,
            candidates: None,
        }
    }
}
