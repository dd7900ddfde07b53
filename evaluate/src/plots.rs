//! PNG plots of training runs, recognised by the keys of their `metrics.jsonl`: SFT loss
//! (`loss`, `eval_loss`), reward-model accuracy (`eval_accuracy` with its Wilson band
//! `eval_accuracy_low/high`), PPO's score (`score_mean`), KL (`kl_per_response`) and response length
//! (`response_length_mean`) per iteration, and score against KL across PPO iterations (the
//! over-optimisation picture of Gao et al. 2022). Noisy per-iteration (per-step) curves are drawn
//! as faint points with a centred moving average over them ([`moving_average`], window
//! [`smoothing_window`], where the window fits) as the line.
//!
//! And, on every evaluation, plots of the evaluation itself ([`evaluation_charts`]): the reward
//! distributions of policy and baseline, reward against response length (length hacking is the
//! commonest exploit), the held-out reward model's distributions and gold accuracy by response
//! length when there are such.
//!
//! Drawn with plotters' bitmap backend and written with the `png` crate: no system libraries.
//! Text needs a TrueType font file, looked for at run time ([`FONT_PATHS`], or the file named by
//! `RLHF_PLOT_FONT`); without one the plots are drawn without text (axes and lines only).

use crate::data::RunLog;
use anyhow::{Context, Result};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where a font is looked for, in order. On Debian / Ubuntu the first is in `fonts-dejavu-core`.
pub const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// The font family the plots' text is registered under.
pub const FAMILY: &str = "sans-serif";

const WIDTH: u32 = 800;
const HEIGHT: u32 = 500;

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

static FONT: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Registers the plots' font once and returns its file; None when no font was found (the plots
/// then have no text). `RLHF_PLOT_FONT=FILE` tries only that file (`none`: no text).
pub fn font() -> Option<&'static Path> {
    FONT.get_or_init(|| {
        let candidates: Vec<PathBuf> = match std::env::var_os("RLHF_PLOT_FONT") {
            Some(p) if p == "none" || p.is_empty() => Vec::new(),
            Some(p) => vec![PathBuf::from(p)],
            None => FONT_PATHS.iter().map(PathBuf::from).collect(),
        };
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                // plotters keeps registered fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if register_font(FAMILY, FontStyle::Normal, bytes).is_ok() {
                    return Some(path);
                }
            }
        }
        None
    })
    .as_deref()
}

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mark {
    Line,
    LineAndPoints,
    /// A scatter: iterations are not ordered along x, so no connecting line.
    Points,
    /// A dashed line: a marker such as a mean, not data.
    Dashed,
}

/// One series of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// (x, low, high): a shaded interval band.
    pub band: Vec<(f64, f64, f64)>,
    pub mark: Mark,
    /// Text beside some points (drawn only with a font).
    pub notes: Vec<((f64, f64), String)>,
    /// Small pale points: the raw values under a smoothed line, or a dense scatter (no legend
    /// entry).
    pub faint: bool,
    /// Index into the palette; default the series' position in the chart.
    pub color: Option<usize>,
}

impl Series {
    fn new(label: String, points: Vec<(f64, f64)>, mark: Mark) -> Self {
        Series {
            label,
            points,
            band: Vec::new(),
            mark,
            notes: Vec::new(),
            faint: false,
            color: None,
        }
    }

    fn faint(mut self) -> Self {
        self.faint = true;
        self
    }

    fn tint(mut self, color: usize) -> Self {
        self.color = Some(color);
        self
    }
}

/// The window of [`moving_average`] for a curve of `n` points: max(1, n/20), made odd so that it
/// centres on a point; 1 is no smoothing.
pub fn smoothing_window(n: usize) -> usize {
    (n / 20).max(1) | 1
}

/// A centred moving average of the y values: the mean of points i − k ..= i + k (k = window / 2)
/// at point i's x, for the points with k neighbours on both sides; the first and last k points
/// get none (pandas' `rolling(window, center=True)`). Near the ends a one-sided window would
/// pull a steep curve (an SFT loss's first steps) towards its middle, and a shrinking one would
/// end the line on a single noisy value; the faint dots show the ends instead. `window` 0 or 1
/// returns the points; a window longer than the points returns none.
pub fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let k = window / 2;
    (k..points.len().saturating_sub(k))
        .map(|i| {
            let around = &points[i - k..=i + k];
            let mean = around.iter().map(|p| p.1).sum::<f64>() / around.len() as f64;
            (points[i].0, mean)
        })
        .collect()
}

/// The raw points of a noisy curve (faint dots) and their moving average (the line), for one run.
fn smoothed(label: String, points: Vec<(f64, f64)>, color: usize) -> [Series; 2] {
    let w = smoothing_window(points.len());
    let avg = moving_average(&points, w);
    let legend = if w > 1 {
        format!("{label}: dots, and their centred mean over {w}")
    } else {
        label.clone()
    };
    [
        Series::new(label, points, Mark::Points).faint().tint(color),
        Series::new(legend, avg, Mark::Line).tint(color),
    ]
}

/// Edges of `bins` equal-width bins over the finite `values`; an empty or constant set gets one
/// bin of width 1 around its value.
pub fn equal_bins(values: impl Iterator<Item = f64> + Clone, bins: usize) -> Vec<f64> {
    let finite = values.filter(|x| x.is_finite());
    let lo = finite.clone().fold(f64::INFINITY, f64::min);
    let hi = finite.fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi, bins) = if !lo.is_finite() {
        (0.0, 1.0, 1)
    } else if hi <= lo {
        (lo - 0.5, lo + 0.5, 1)
    } else {
        (lo, hi, bins.max(1))
    };
    let width = (hi - lo) / bins as f64;
    (0..=bins).map(|i| lo + width * i as f64).collect()
}

/// Edges of at most `max_bins` bins over whole-number `values` (token counts), each holding the
/// same number of whole numbers: edges at k − ½, so that no length straddles two bins and every
/// bin spans as many lengths as the next.
pub fn whole_number_bins(values: impl Iterator<Item = f64> + Clone, max_bins: usize) -> Vec<f64> {
    let finite = values.filter(|x| x.is_finite());
    let lo = finite.clone().fold(f64::INFINITY, f64::min);
    let hi = finite.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return vec![-0.5, 0.5];
    }
    let (lo, hi) = (lo.round(), hi.round());
    let span = (hi - lo) as usize + 1;
    let width = span.div_ceil(max_bins.max(1));
    let bins = span.div_ceil(width);
    (0..=bins).map(|i| lo - 0.5 + (i * width) as f64).collect()
}

/// The bin of `x` among increasing `edges`: [e_b, e_b+1), the last bin closed; None outside or
/// not finite.
pub fn bin_of(edges: &[f64], x: f64) -> Option<usize> {
    let bins = edges.len().checked_sub(1).filter(|&b| b > 0)?;
    if !(x >= edges[0] && x <= edges[bins]) {
        return None;
    }
    Some((edges.partition_point(|&e| e <= x) - 1).min(bins - 1))
}

/// Counts per bin of several samples on the same bins.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    /// bins + 1 edges, increasing.
    pub edges: Vec<f64>,
    /// counts[s][b]: finite values of sample s in bin b.
    pub counts: Vec<Vec<usize>>,
}

/// A histogram of `samples` on `bins` shared equal-width bins ([`equal_bins`] over all of them).
pub fn histogram(samples: &[&[f64]], bins: usize) -> Histogram {
    let edges = equal_bins(samples.iter().flat_map(|s| s.iter().copied()), bins);
    let counts = samples
        .iter()
        .map(|s| {
            let mut c = vec![0usize; edges.len() - 1];
            for b in s.iter().filter_map(|&x| bin_of(&edges, x)) {
                c[b] += 1;
            }
            c
        })
        .collect();
    Histogram { edges, counts }
}

/// The finite `ys` grouped by the bin of their `xs`: one list per bin of `edges`.
pub fn binned(xs: &[f64], ys: &[f64], edges: &[f64]) -> Vec<Vec<f64>> {
    let mut out = vec![Vec::new(); edges.len().saturating_sub(1)];
    for (&x, &y) in xs.iter().zip(ys) {
        if let (Some(b), true) = (bin_of(edges, x), y.is_finite()) {
            out[b].push(y);
        }
    }
    out
}

/// The centre of bin `b`.
fn centre(edges: &[f64], b: usize) -> f64 {
    (edges[b] + edges[b + 1]) / 2.0
}

/// One model's evaluated responses, as [`evaluation_charts`] reads them (one value per response).
pub struct Evaluated<'a> {
    /// "policy" or "baseline".
    pub name: &'a str,
    pub rewards: &'a [f64],
    /// Response length in tokens, EOS included.
    pub lengths: &'a [f64],
    pub heldout: Option<&'a [f64]>,
    pub gold: Option<&'a [f64]>,
}

/// Bins of the distribution charts.
pub const DISTRIBUTION_BINS: usize = 24;
/// At most this many length bins in reward and gold against length, shared by the models, and
/// no more than one per `RESPONSES_PER_BIN` responses of the model with fewest.
pub const LENGTH_BINS: usize = 12;
pub const RESPONSES_PER_BIN: usize = 10;
/// A length bin is drawn for a model only with this many of its responses.
pub const MIN_PER_BIN: usize = 5;

/// A distribution chart: each model's share of responses per bin (bins shared by the models) as
/// a step outline, and its mean as a dashed vertical line.
fn distribution(file: &str, title: &str, x_label: &str, models: &[(&str, &[f64])]) -> Chart {
    let samples: Vec<&[f64]> = models.iter().map(|m| m.1).collect();
    let h = histogram(&samples, DISTRIBUTION_BINS);
    let mut series = Vec::new();
    let mut top: f64 = 0.0;
    for (j, (counts, (name, _))) in h.counts.iter().zip(models).enumerate() {
        let total = counts.iter().sum::<usize>().max(1) as f64;
        let mut steps = vec![(h.edges[0], 0.0)];
        for (b, &c) in counts.iter().enumerate() {
            let share = c as f64 / total;
            top = top.max(share);
            steps.push((h.edges[b], share));
            steps.push((h.edges[b + 1], share));
        }
        steps.push((h.edges[counts.len()], 0.0));
        series.push(Series::new((*name).to_string(), steps, Mark::Line).tint(j));
    }
    for (j, (name, values)) in models.iter().enumerate() {
        let finite: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if finite.is_empty() {
            continue;
        }
        let mean = finite.iter().sum::<f64>() / finite.len() as f64;
        series.push(
            Series::new(
                format!("{name} mean {mean:.3}"),
                vec![(mean, 0.0), (mean, top)],
                Mark::Dashed,
            )
            .tint(j),
        );
    }
    Chart {
        file: file.into(),
        title: title.into(),
        x_label: x_label.into(),
        y_label: "share of responses".into(),
        series,
        integer_x: false,
    }
}

/// The evaluation's own charts (see the module docs and [`caption`]); `models` is the policy,
/// then the baseline if any. Cheap: a few passes over the responses.
pub fn evaluation_charts(models: &[Evaluated]) -> Vec<Chart> {
    let mut out = vec![distribution(
        "reward_distribution.png",
        "Reward-model score of each response",
        "reward",
        &models
            .iter()
            .map(|m| (m.name, m.rewards))
            .collect::<Vec<_>>(),
    )];
    let heldout: Option<Vec<(&str, &[f64])>> =
        models.iter().map(|m| Some((m.name, m.heldout?))).collect();
    if let Some(h) = heldout.filter(|h| !h.is_empty()) {
        out.push(distribution(
            "heldout_reward_distribution.png",
            "Held-out reward model's score of each response",
            "held-out reward",
            &h,
        ));
    }
    // Length bins shared by the models, so that their means compare at equal length; fewer for
    // a small evaluation, so that its bins are not all too thin to draw.
    let fewest = models.iter().map(|m| m.lengths.len()).min().unwrap_or(0);
    let edges = whole_number_bins(
        models.iter().flat_map(|m| m.lengths.iter().copied()),
        (fewest / RESPONSES_PER_BIN).clamp(1, LENGTH_BINS),
    );
    let mut vs_length: Vec<Series> = models
        .iter()
        .enumerate()
        .map(|(j, m)| {
            let points = m.lengths.iter().copied().zip(m.rewards.iter().copied());
            Series::new(m.name.to_string(), points.collect(), Mark::Points)
                .faint()
                .tint(j)
        })
        .collect();
    for (j, m) in models.iter().enumerate() {
        let means = binned(m.lengths, m.rewards, &edges)
            .iter()
            .enumerate()
            .filter(|(_, ys)| ys.len() >= MIN_PER_BIN)
            .map(|(b, ys)| (centre(&edges, b), ys.iter().sum::<f64>() / ys.len() as f64))
            .collect();
        vs_length.push(
            Series::new(
                format!("{}: mean reward per length bin (dots: each)", m.name),
                means,
                Mark::LineAndPoints,
            )
            .tint(j),
        );
    }
    out.push(Chart {
        file: "reward_vs_length.png".into(),
        title: "Reward against response length".into(),
        x_label: "response length (tokens)".into(),
        y_label: "reward".into(),
        series: vs_length,
        integer_x: true,
    });
    if !models.is_empty() && models.iter().all(|m| m.gold.is_some()) {
        let series: Vec<Series> = models
            .iter()
            .enumerate()
            .filter_map(|(j, m)| {
                let rates: Vec<(f64, crate::stats::Rate)> = binned(m.lengths, m.gold?, &edges)
                    .iter()
                    .enumerate()
                    .filter(|(_, g)| g.len() >= MIN_PER_BIN)
                    .filter_map(|(b, g)| {
                        Some((
                            centre(&edges, b),
                            crate::stats::rate(g, crate::stats::LEVEL)?,
                        ))
                    })
                    .collect();
                Some(Series {
                    band: rates.iter().map(|(x, r)| (*x, r.low, r.high)).collect(),
                    ..Series::new(
                        format!("{} (95% band)", m.name),
                        rates.iter().map(|(x, r)| (*x, r.rate)).collect(),
                        Mark::LineAndPoints,
                    )
                    .tint(j)
                })
            })
            .collect();
        // Under MIN_PER_BIN responses there is no bin to draw.
        if series.iter().all(|s| s.points.is_empty()) {
            return out;
        }
        out.push(Chart {
            file: "gold_by_length.png".into(),
            title: "Gold accuracy by response length".into(),
            x_label: "response length (tokens)".into(),
            y_label: "gold accuracy".into(),
            series,
            integer_x: true,
        });
    }
    out
}

/// What an evaluation chart shows, in a sentence for report.md; None for other files.
pub fn caption(file: &str) -> Option<String> {
    Some(match file {
        "reward_distribution.png" => format!(
            "The reward model's score of each response: each model's share of responses per bin ({DISTRIBUTION_BINS} bins shared by the models), its mean as a dashed line."
        ),
        "heldout_reward_distribution.png" => format!(
            "The same for the held-out reward model ({DISTRIBUTION_BINS} shared bins, dashed means)."
        ),
        "reward_vs_length.png" => format!(
            "Reward against response length: each response a faint dot, the line the mean reward per length bin (at most {LENGTH_BINS} bins and at most one per {RESPONSES_PER_BIN} responses of the smaller model, each a whole number of tokens wide and shared by the models; a bin is drawn where a model has {MIN_PER_BIN} or more responses in it). A reward that climbs with length whatever the content is the commonest exploit; compare the models at equal length."
        ),
        "gold_by_length.png" => format!(
            "Gold accuracy per length bin (the bins above, {MIN_PER_BIN} or more responses), with its 95% Wilson band: whether longer responses are also more often right."
        ),
        _ => return None,
    })
}

/// A chart: its title, axis names and series.
#[derive(Clone, Debug)]
pub struct Chart {
    /// File name in the output folder, e.g. `sft_loss.png`.
    pub file: String,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// The x axis counts steps or iterations: ticks at whole numbers only.
    pub integer_x: bool,
}

/// The charts the runs support, and a note for each run none of whose keys is recognised.
pub fn charts(runs: &[RunLog]) -> (Vec<Chart>, Vec<String>) {
    let mut notes = Vec::new();
    let (mut sft, mut rm, mut ppo) = (Vec::new(), Vec::new(), Vec::new());
    for r in runs {
        if r.has("score_mean") || r.has("kl_per_response") {
            ppo.push(r);
        } else if r.has("eval_accuracy") || r.has("accuracy") {
            rm.push(r);
        } else if r.has("loss") || r.has("eval_loss") {
            sft.push(r);
        } else {
            notes.push(format!(
                "--runs {}: no key of an sft, reward or ppo metrics.jsonl (loss, eval_accuracy, score_mean); not plotted",
                r.dir.display()
            ));
        }
    }
    let line = Series::new;
    let mut out = Vec::new();
    let mut push = |c: Chart| {
        if c.series.iter().any(|s| !s.points.is_empty()) {
            out.push(c);
        }
    };
    push(Chart {
        file: "sft_loss.png".into(),
        title: "SFT loss".into(),
        x_label: "step".into(),
        integer_x: true,
        y_label: "loss (nats / target token)".into(),
        series: sft
            .iter()
            .enumerate()
            .flat_map(|(k, r)| {
                let [raw, avg] = smoothed(format!("{}: loss", r.name), r.series("loss"), 2 * k);
                [
                    raw,
                    avg,
                    line(
                        format!("{}: eval_loss", r.name),
                        r.series("eval_loss"),
                        Mark::LineAndPoints,
                    )
                    .tint(2 * k + 1),
                ]
            })
            .collect(),
    });
    push(Chart {
        file: "reward_accuracy.png".into(),
        title: "Reward model: validation pairwise accuracy (95% band)".into(),
        x_label: "step".into(),
        integer_x: true,
        y_label: "accuracy".into(),
        series: rm
            .iter()
            .map(|r| {
                let band = r
                    .rows
                    .iter()
                    .filter_map(|row| {
                        let f = |k: &str| row.get(k).and_then(|v| v.as_f64());
                        Some((
                            f("step")?,
                            f("eval_accuracy_low")?,
                            f("eval_accuracy_high")?,
                        ))
                    })
                    .collect();
                Series {
                    band,
                    ..Series::new(
                        format!("{}: eval_accuracy", r.name),
                        r.series("eval_accuracy"),
                        Mark::LineAndPoints,
                    )
                }
            })
            .collect(),
    });
    let per_iteration = |file: &str, title: &str, key: &str, y: &str| Chart {
        file: file.into(),
        title: title.into(),
        x_label: "iteration".into(),
        integer_x: true,
        y_label: y.into(),
        series: ppo
            .iter()
            .enumerate()
            .flat_map(|(k, r)| smoothed(format!("{}: {key}", r.name), r.series(key), k))
            .collect(),
    };
    push(per_iteration(
        "ppo_score.png",
        "PPO: reward-model score per iteration",
        "score_mean",
        "score_mean",
    ));
    push(per_iteration(
        "ppo_kl.png",
        "PPO: KL from the reference per response",
        "kl_per_response",
        "KL (nats / response)",
    ));
    push(per_iteration(
        "ppo_response_length.png",
        "PPO: response length",
        "response_length_mean",
        "tokens",
    ));
    let mut score_vs_kl = Chart {
        file: "ppo_score_vs_kl.png".into(),
        title: "PPO: score against KL (one point per iteration)".into(),
        x_label: "KL from the reference (nats / response)".into(),
        integer_x: false,
        y_label: "score_mean".into(),
        series: ppo
            .iter()
            .map(|r| {
                let mut s = line(
                    r.name.clone(),
                    r.pairs("kl_per_response", "score_mean"),
                    Mark::Points,
                );
                // The first and the last iteration, named beside their points.
                let steps: Vec<f64> = r
                    .rows
                    .iter()
                    .filter(|row| {
                        let f = |k: &str| row.get(k).and_then(|v| v.as_f64());
                        f("kl_per_response").is_some_and(f64::is_finite)
                            && f("score_mean").is_some_and(f64::is_finite)
                    })
                    .map(|row| row.get("step").and_then(|v| v.as_f64()).unwrap_or(f64::NAN))
                    .collect();
                let n = s.points.len();
                if n > 0 && steps.len() == n {
                    let ends = if n > 1 { vec![0, n - 1] } else { vec![0] };
                    for i in ends {
                        s.notes
                            .push((s.points[i], format!("it {}", tick(&steps[i]))));
                    }
                }
                s
            })
            .collect(),
    };
    // The monitor's held-out reward model beside the optimised score (Gao et al. 2022's plot of
    // proxy and gold against KL, with the held-out model standing in for gold).
    for r in ppo.iter().filter(|r| r.has("heldout_score_mean")) {
        score_vs_kl.series.push(line(
            format!("{}: held-out reward model", r.name),
            r.pairs("kl_per_response", "heldout_score_mean"),
            Mark::Points,
        ));
    }
    push(score_vs_kl);
    // With `monitor.gold` the run logged a gold rule's mean: Gao et al.'s gold curve itself.
    let gold: Vec<_> = ppo.iter().filter(|r| r.has("gold_mean")).collect();
    if !gold.is_empty() {
        push(Chart {
            file: "ppo_gold_vs_kl.png".into(),
            title: "PPO: gold (monitor.gold) against KL (one point per iteration)".into(),
            x_label: "KL from the reference (nats / response)".into(),
            integer_x: false,
            y_label: "gold_mean".into(),
            series: gold
                .iter()
                .map(|r| {
                    line(
                        r.name.clone(),
                        r.pairs("kl_per_response", "gold_mean"),
                        Mark::Points,
                    )
                })
                .collect(),
        });
    }
    (out, notes)
}

/// A tick label: integers without a decimal point, others with up to 4 decimals.
fn tick(x: &f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.0}")
    } else {
        let s = format!("{x:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A tick label on an axis of whole numbers: none between them.
fn whole_tick(x: &f64) -> String {
    if x.fract() == 0.0 {
        tick(x)
    } else {
        String::new()
    }
}

fn draw_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing: {e}")
}

/// A range around `v` with a margin, never empty.
fn range(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in v.filter(|x| x.is_finite()) {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo {
        0.05 * (hi - lo)
    } else {
        0.1 * lo.abs().max(1.0)
    };
    (lo - pad, hi + pad)
}

/// Draws `chart` into an RGB buffer of WIDTH × HEIGHT, with text in `family` (None: no text).
pub fn draw(chart: &Chart, family: Option<&str>) -> Result<Vec<u8>> {
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let xs = chart.series.iter().flat_map(|s| {
            s.points
                .iter()
                .map(|p| p.0)
                .chain(s.band.iter().map(|b| b.0))
        });
        let ys = chart.series.iter().flat_map(|s| {
            s.points
                .iter()
                .map(|p| p.1)
                .chain(s.band.iter().flat_map(|b| [b.1, b.2]))
        });
        let (x0, x1) = range(xs);
        let (y0, y1) = range(ys);
        let mut builder = ChartBuilder::on(&root);
        builder.margin(20);
        match family {
            Some(f) => {
                builder
                    .caption(&chart.title, (f, 22))
                    .x_label_area_size(50)
                    .y_label_area_size(70);
            }
            // Label areas only as wide as the axis lines: no tick labels, no text.
            None => {
                builder.x_label_area_size(6).y_label_area_size(6);
            }
        }
        let mut c = builder
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(draw_err)?;
        let mut mesh = c.configure_mesh();
        mesh.light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(215, 215, 215))
            .axis_style(BLACK);
        match family {
            Some(f) => {
                mesh.x_desc(&chart.x_label)
                    .y_desc(&chart.y_label)
                    .x_label_formatter(if chart.integer_x { &whole_tick } else { &tick })
                    .y_label_formatter(&tick)
                    .label_style((f, 14))
                    .axis_desc_style((f, 16));
            }
            None => {
                mesh.x_labels(0).y_labels(0);
            }
        }
        if chart.integer_x && family.is_some() {
            // At most one tick per whole number.
            mesh.x_labels(((x1 - x0).floor() as usize + 1).clamp(2, 10));
        }
        mesh.draw().map_err(draw_err)?;
        for (i, s) in chart.series.iter().enumerate() {
            let color = COLORS[s.color.unwrap_or(i) % COLORS.len()];
            if s.band.len() >= 2 {
                let mut poly: Vec<(f64, f64)> = s.band.iter().map(|b| (b.0, b.1)).collect();
                poly.extend(s.band.iter().rev().map(|b| (b.0, b.2)));
                c.draw_series(std::iter::once(Polygon::new(poly, color.mix(0.2).filled())))
                    .map_err(draw_err)?;
            } else {
                // A single interval: a vertical bar.
                c.draw_series(s.band.iter().map(|b| {
                    PathElement::new(vec![(b.0, b.1), (b.0, b.2)], color.stroke_width(3))
                }))
                .map_err(draw_err)?;
            }
            let line: Vec<(f64, f64)> = if s.mark == Mark::Points {
                Vec::new()
            } else {
                s.points.clone()
            };
            let drawn = if s.mark == Mark::Dashed {
                c.draw_series(DashedLineSeries::new(line, 6, 4, color.stroke_width(2)))
                    .map_err(draw_err)?
            } else {
                c.draw_series(LineSeries::new(line, color.stroke_width(2)))
                    .map_err(draw_err)?
            };
            if family.is_some() && !s.faint {
                let dashed = s.mark == Mark::Dashed;
                drawn.label(&s.label).legend(move |(x, y)| {
                    let style = color.stroke_width(2);
                    // Relative to (x, y): one stroke, or two for a dashed line.
                    let (a, b) = if dashed {
                        (vec![(0, 0), (7, 0)], vec![(13, 0), (20, 0)])
                    } else {
                        (vec![(0, 0), (20, 0)], Vec::new())
                    };
                    EmptyElement::at((x, y))
                        + PathElement::new(a, style)
                        + PathElement::new(b, style)
                });
            }
            if matches!(s.mark, Mark::LineAndPoints | Mark::Points) {
                let (radius, style) = if s.faint {
                    (2, color.mix(0.3).filled())
                } else {
                    (3, color.filled())
                };
                c.draw_series(s.points.iter().map(|&p| Circle::new(p, radius, style)))
                    .map_err(draw_err)?;
            }
            if let Some(f) = family {
                c.draw_series(s.notes.iter().map(|(p, t)| {
                    EmptyElement::at(*p)
                        + Text::new(t.clone(), (6, -16), (f, 13).into_font().color(&color))
                }))
                .map_err(draw_err)?;
            }
        }
        if let Some(f) = family {
            c.configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .label_font((f, 14))
                .draw()
                .map_err(draw_err)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(buf)
}

/// Writes an RGB buffer of WIDTH × HEIGHT as a PNG file.
pub fn write_png(path: &Path, rgb: &[u8]) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), WIDTH, HEIGHT);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc
        .write_header()
        .with_context(|| format!("writing {}", path.display()))?;
    w.write_image_data(rgb)
        .with_context(|| format!("writing {}", path.display()))?;
    w.finish()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Draws every chart the runs support into `dir`, with text when a font was found. Returns the
/// charts written and the notes about runs left out.
pub fn plot_runs(runs: &[RunLog], dir: &Path) -> Result<(Vec<Chart>, Vec<String>)> {
    let (charts, notes) = charts(runs);
    let family = font().map(|_| FAMILY);
    for c in &charts {
        let rgb = draw(c, family).with_context(|| format!("plotting {}", c.file))?;
        write_png(&dir.join(&c.file), &rgb)?;
    }
    Ok((charts, notes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(name: &str, rows: Vec<serde_json::Value>) -> RunLog {
        RunLog {
            name: name.into(),
            dir: PathBuf::from(name),
            rows: rows
                .into_iter()
                .map(|v| v.as_object().unwrap().clone())
                .collect(),
        }
    }

    fn sample_runs() -> Vec<RunLog> {
        vec![
            run(
                "sft",
                vec![
                    json!({"step": 0, "eval_loss": 7.0}),
                    json!({"step": 5, "loss": 6.0}),
                    json!({"step": 10, "loss": 4.0, "eval_loss": 4.5}),
                ],
            ),
            run(
                "reward",
                vec![
                    json!({"step": 0, "eval_accuracy": 0.5, "eval_accuracy_low": 0.45, "eval_accuracy_high": 0.55}),
                    json!({"step": 10, "loss": 0.6, "accuracy": 0.6, "eval_accuracy": 0.6, "eval_accuracy_low": 0.55, "eval_accuracy_high": 0.65}),
                ],
            ),
            run(
                "ppo",
                vec![
                    json!({"step": 1, "score_mean": 0.1, "kl_per_response": 0.0, "response_length_mean": 10.0}),
                    json!({"step": 2, "score_mean": 0.3, "kl_per_response": 0.5, "response_length_mean": 12.0}),
                ],
            ),
            run("other", vec![json!({"step": 1, "foo": 2})]),
        ]
    }

    #[test]
    fn runs_are_recognised_by_their_keys() {
        let (charts, notes) = charts(&sample_runs());
        let files: Vec<&str> = charts.iter().map(|c| c.file.as_str()).collect();
        assert_eq!(
            files,
            [
                "sft_loss.png",
                "reward_accuracy.png",
                "ppo_score.png",
                "ppo_kl.png",
                "ppo_response_length.png",
                "ppo_score_vs_kl.png"
            ]
        );
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("other"));
        assert_eq!(charts[1].series[0].band.len(), 2);
        assert_eq!(charts[5].series[0].points, vec![(0.0, 0.1), (0.5, 0.3)]);
    }

    #[test]
    fn without_a_font_the_plots_have_no_text() {
        let (mut charts, _) = charts(&sample_runs());
        let (lengths, rewards, gold) = ([3.0; 6], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [1.0; 6]);
        charts.extend(evaluation_charts(&[Evaluated {
            name: "policy",
            rewards: &rewards,
            lengths: &lengths,
            heldout: Some(&rewards),
            gold: Some(&gold),
        }]));
        assert_eq!(charts.len(), 6 + 4);
        for c in &charts {
            // No text is drawn: a family that was never registered is never asked for.
            let rgb = draw(c, None).unwrap();
            assert!(rgb.iter().any(|&v| v < 128), "{} is blank", c.file);
        }
        // Whereas drawing text with a family that has no font fails.
        assert!(draw(&charts[0], Some("no-such-family")).is_err());
    }

    #[test]
    fn pngs_are_written_with_text_when_a_font_exists() {
        let tmp = tempfile::tempdir().unwrap();
        let (charts, _) = plot_runs(&sample_runs(), tmp.path()).unwrap();
        for c in &charts {
            let bytes = std::fs::read(tmp.path().join(&c.file)).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
            assert!(bytes.len() > 2000, "{}: {} bytes", c.file, bytes.len());
        }
        // A single point still gets a non-empty range.
        assert!(range([3.0].into_iter()).0 < range([3.0].into_iter()).1);
        assert_eq!(range(std::iter::empty()), (0.0, 1.0));
    }

    #[test]
    fn the_moving_average_is_centred_and_leaves_the_ends_to_the_dots() {
        let p: Vec<(f64, f64)> = [1.0, 2.0, 6.0, 4.0, 5.0]
            .iter()
            .enumerate()
            .map(|(i, &y)| (i as f64, y))
            .collect();
        let close = |a: &[(f64, f64)], b: &[(f64, f64)]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(p, q)| p.0 == q.0 && (p.1 - q.1).abs() < 1e-12)
        };
        assert_eq!(moving_average(&p, 0), p);
        assert_eq!(moving_average(&p, 1), p);
        // Window 3: (1+2+6)/3, (2+6+4)/3, (6+4+5)/3 at x = 1, 2, 3; no point at either end.
        let m = moving_average(&p, 3);
        assert!(close(&m, &[(1.0, 3.0), (2.0, 4.0), (3.0, 5.0)]), "{m:?}");
        // Window 5: only the middle point has two neighbours each side: 18/5.
        let m = moving_average(&p, 5);
        assert!(close(&m, &[(2.0, 3.6)]), "{m:?}");
        // An even window is the odd one above it; one longer than the points leaves none.
        assert_eq!(moving_average(&p, 4), moving_average(&p, 5));
        assert!(moving_average(&p, 7).is_empty());
        assert!(moving_average(&[], 5).is_empty());
        assert_eq!(moving_average(&[(3.0, 2.0)], 1), vec![(3.0, 2.0)]);
        // A straight line (a steep loss at the start of training) stays where it is.
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 7.0 - 0.5 * i as f64)).collect();
        assert!(close(&moving_average(&line, 7), &line[3..7]));
        assert_eq!(smoothing_window(0), 1);
        assert_eq!(smoothing_window(39), 1);
        assert_eq!(smoothing_window(40), 3);
        assert_eq!(smoothing_window(400), 21);
        assert_eq!(smoothing_window(600), 31);
    }

    #[test]
    fn histograms_share_bins() {
        let a = [0.0, 0.5, 1.0, 4.0];
        let b = [2.0, 2.1, f64::NAN];
        let h = histogram(&[&a, &b], 4);
        assert_eq!(h.edges, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
        // A value on an inner edge goes up; the top value falls in the last bin; NaN nowhere.
        assert_eq!(h.counts, vec![vec![2, 1, 0, 1], vec![0, 0, 2, 0]]);
        let c = histogram(&[&[3.0, 3.0]], 5);
        assert_eq!((c.edges, c.counts), (vec![2.5, 3.5], vec![vec![2]]));
        let none = histogram(&[&[], &[f64::NAN]], 5);
        assert_eq!(
            (none.edges, none.counts),
            (vec![0.0, 1.0], vec![vec![0], vec![0]])
        );
        // bin_of: half-open bins, the last one closed.
        let e = [0.0, 1.0, 2.0];
        let bins: Vec<Option<usize>> = [0.0, 0.99, 1.0, 2.0, 2.01, -0.1, f64::NAN]
            .iter()
            .map(|&x| bin_of(&e, x))
            .collect();
        assert_eq!(bins, [Some(0), Some(0), Some(1), Some(1), None, None, None]);
        assert_eq!(bin_of(&[1.0], 1.0), None);
    }

    #[test]
    fn length_bins_hold_whole_numbers_of_tokens() {
        // Lengths 2..=31: 30 lengths in at most 12 bins → 3 lengths a bin, 10 bins.
        let e = whole_number_bins((2..=31).map(f64::from), 12);
        assert_eq!(e.len(), 11);
        assert_eq!((e[0], e[1], e[10]), (1.5, 4.5, 31.5));
        // Few lengths: one bin each.
        assert_eq!(
            whole_number_bins([3.0, 5.0, 4.0].into_iter(), 12),
            vec![2.5, 3.5, 4.5, 5.5]
        );
        // 13 lengths in at most 12 bins: 2 a bin, 7 bins, the last one half used.
        let e = whole_number_bins((0..13).map(f64::from), 12);
        assert_eq!(
            e,
            (0..=7).map(|i| -0.5 + 2.0 * i as f64).collect::<Vec<_>>()
        );
        assert_eq!(whole_number_bins(std::iter::empty(), 12), vec![-0.5, 0.5]);
        // binned: the finite ys by the bin of their x.
        let groups = binned(
            &[3.0, 4.0, 4.0, 9.0, 20.0],
            &[1.0, 2.0, f64::NAN, 5.0, 6.0],
            &[2.5, 5.5, 8.5, 11.5],
        );
        assert_eq!(groups, vec![vec![1.0, 2.0], vec![], vec![5.0]]);
    }

    #[test]
    fn evaluation_charts_follow_what_was_measured() {
        // Lengths 2..=4 over both models, 30 responses each (3 bins at most): one bin per
        // length, 15 responses in each used bin.
        let rep = |a: &[f64], k: usize| -> Vec<f64> {
            a.iter().copied().cycle().take(a.len() * k).collect()
        };
        let cat = |a: Vec<f64>, b: Vec<f64>| -> Vec<f64> { a.into_iter().chain(b).collect() };
        let pl = cat(vec![2.0; 15], vec![4.0; 15]);
        let pr = cat(
            rep(&[0.0, 1.0, 0.0, 1.0, 0.0], 3),
            rep(&[3.0, 3.0, 4.0, 4.0, 4.0], 3),
        );
        let pg = cat(
            rep(&[0.0, 0.0, 0.0, 0.0, 1.0], 3),
            rep(&[1.0, 1.0, 1.0, 1.0, 0.0], 3),
        );
        let bl = cat(vec![2.0; 15], vec![3.0; 15]);
        let br = cat(vec![1.0; 15], vec![2.0; 15]);
        let bg = [0.0; 30];
        let heldout = [0.5; 30];
        let policy = Evaluated {
            name: "policy",
            rewards: &pr,
            lengths: &pl,
            heldout: Some(&heldout),
            gold: Some(&pg),
        };
        let baseline = Evaluated {
            name: "baseline",
            rewards: &br,
            lengths: &bl,
            heldout: None,
            gold: Some(&bg),
        };
        let files = |c: &[Chart]| c.iter().map(|c| c.file.clone()).collect::<Vec<_>>();
        let charts = evaluation_charts(&[policy, baseline]);
        // The held-out chart needs every model scored by it.
        assert_eq!(
            files(&charts),
            [
                "reward_distribution.png",
                "reward_vs_length.png",
                "gold_by_length.png"
            ]
        );
        // The distribution: each model's shares sum to 1; the dashed means at 2.0 and 1.5.
        let d = &charts[0];
        for s in &d.series[..2] {
            let shares: f64 = s.points.iter().skip(1).step_by(2).map(|p| p.1).sum();
            assert!((shares - 1.0).abs() < 1e-12, "{}: {shares}", s.label);
        }
        assert_eq!(d.series[2].label, "policy mean 2.000");
        assert_eq!(
            (d.series[2].points[0].0, d.series[2].mark),
            (2.0, Mark::Dashed)
        );
        assert_eq!(d.series[3].label, "baseline mean 1.500");
        // Reward against length: both scatters, then the means per shared bin:
        // policy (0+1+0+1+0)/5 at 2 and (3+3+4+4+4)/5 at 4; baseline 1 at 2 and 2 at 3.
        let v = &charts[1];
        assert!(v.series[0].faint && v.series[0].points.len() == 30);
        let close = |a: &[(f64, f64)], b: &[(f64, f64)]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(p, q)| p.0 == q.0 && (p.1 - q.1).abs() < 1e-12)
        };
        assert!(
            close(&v.series[2].points, &[(2.0, 0.4), (4.0, 3.6)]),
            "{:?}",
            v.series[2].points
        );
        assert!(
            close(&v.series[3].points, &[(2.0, 1.0), (3.0, 2.0)]),
            "{:?}",
            v.series[3].points
        );
        // Gold by length: 3/15 and 12/15 for the policy, with their Wilson bands.
        let g = &charts[2].series[0];
        assert!(
            close(&g.points, &[(2.0, 0.2), (4.0, 0.8)]),
            "{:?}",
            g.points
        );
        let (lo, hi) = crate::stats::wilson(3.0, 15, crate::stats::LEVEL);
        assert_eq!(g.band[0], (2.0, lo, hi));
        // Every chart draws and writes a PNG.
        let tmp = tempfile::tempdir().unwrap();
        for c in &charts {
            let rgb = draw(c, font().map(|_| FAMILY)).unwrap();
            write_png(&tmp.path().join(&c.file), &rgb).unwrap();
            let bytes = std::fs::read(tmp.path().join(&c.file)).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
            assert!(caption(&c.file).is_some(), "{}", c.file);
        }
        // One model with a held-out score and no gold: its held-out chart, no gold chart.
        let alone = Evaluated {
            name: "policy",
            rewards: &pr,
            lengths: &pl,
            heldout: Some(&heldout),
            gold: None,
        };
        assert_eq!(
            files(&evaluation_charts(&[alone])),
            [
                "reward_distribution.png",
                "heldout_reward_distribution.png",
                "reward_vs_length.png"
            ]
        );
        // Six responses: one length bin (2..=4, centre 3) holding all six, gold 4/6.
        let small = Evaluated {
            name: "policy",
            rewards: &pr[12..18],
            lengths: &pl[12..18],
            heldout: None,
            gold: Some(&pg[12..18]),
        };
        let charts = evaluation_charts(&[small]);
        assert!(
            close(&charts[2].series[0].points, &[(3.0, 4.0 / 6.0)]),
            "{:?}",
            charts[2].series[0].points
        );
        // Four responses: no bin of five, no gold chart.
        let tiny = Evaluated {
            name: "policy",
            rewards: &pr[..4],
            lengths: &pl[..4],
            heldout: None,
            gold: Some(&pg[..4]),
        };
        assert_eq!(
            files(&evaluation_charts(&[tiny])),
            ["reward_distribution.png", "reward_vs_length.png"]
        );
    }

    #[test]
    fn training_curves_are_drawn_smoothed_over_faint_points() {
        let rows = (0..100)
            .map(|i| json!({"step": i, "score_mean": (i % 7) as f64, "kl_per_response": 0.1}))
            .collect();
        let (charts, _) = charts(&[run("ppo", rows)]);
        let score = charts.iter().find(|c| c.file == "ppo_score.png").unwrap();
        let (raw, avg) = (&score.series[0], &score.series[1]);
        assert!(raw.faint && raw.points.len() == 100 && raw.mark == Mark::Points);
        assert!(!avg.faint && avg.mark == Mark::Line);
        assert_eq!(
            avg.label,
            "ppo: score_mean: dots, and their centred mean over 5"
        );
        assert_eq!(avg.points, moving_average(&raw.points, 5));
        // The line starts at iteration 2, the mean of iterations 0..=4 (0 1 2 3 4, i % 7): 2;
        // it ends at 97, the mean of 95..=99 (4 5 6 0 1): 3.2.
        assert_eq!(avg.points.len(), 96);
        assert_eq!(avg.points[0], (2.0, 2.0));
        assert_eq!(avg.points[95].0, 97.0);
        assert!((avg.points[95].1 - 3.2).abs() < 1e-12);
        assert_eq!(raw.color, avg.color);
        // Too few points to smooth: the line is the points, named plainly.
        let rows = (0..10)
            .map(|i| json!({"step": i, "score_mean": i as f64, "kl_per_response": 0.1}))
            .collect();
        let (short, _) = super::charts(&[run("ppo", rows)]);
        let avg = &short[0].series[1];
        assert_eq!(avg.label, "ppo: score_mean");
        assert_eq!(avg.points, short[0].series[0].points);
    }
}
