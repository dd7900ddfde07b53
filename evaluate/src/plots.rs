//! PNG plots of training runs, recognised by the keys of their `metrics.jsonl`: SFT loss
//! (`loss`, `eval_loss`), reward-model accuracy (`eval_accuracy` with its Wilson band
//! `eval_accuracy_low/high`), PPO's score (`score_mean`), KL (`kl_per_response`) and response length
//! (`response_length_mean`) per iteration, and score against KL across PPO iterations (the
//! over-optimisation picture of Gao et al. 2022).
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
    let line = |label: String, points: Vec<(f64, f64)>, mark: Mark| Series {
        label,
        points,
        band: Vec::new(),
        mark,
        notes: Vec::new(),
    };
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
            .flat_map(|r| {
                [
                    line(format!("{}: loss", r.name), r.series("loss"), Mark::Line),
                    line(
                        format!("{}: eval_loss", r.name),
                        r.series("eval_loss"),
                        Mark::LineAndPoints,
                    ),
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
                    label: format!("{}: eval_accuracy", r.name),
                    points: r.series("eval_accuracy"),
                    band,
                    mark: Mark::LineAndPoints,
                    notes: Vec::new(),
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
            .map(|r| {
                line(
                    format!("{}: {key}", r.name),
                    r.series(key),
                    Mark::LineAndPoints,
                )
            })
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
            let color = COLORS[i % COLORS.len()];
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
            let drawn = c
                .draw_series(LineSeries::new(line, color.stroke_width(2)))
                .map_err(draw_err)?;
            if family.is_some() {
                drawn.label(&s.label).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
            if s.mark != Mark::Line {
                c.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
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
        let (charts, _) = charts(&sample_runs());
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
}
