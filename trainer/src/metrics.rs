//! `metrics.jsonl` (one JSON object per logged step) and progress: an indicatif bar on a
//! terminal, plain lines otherwise.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};
use std::io::{IsTerminal, Write};
use std::path::Path;

/// Drops the lines of a JSONL file whose `key` is greater than `last` (what a run resumed at
/// `last` writes again), atomically. An absent file is left absent.
pub fn drop_lines_after(path: &Path, key: &str, last: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get(key).and_then(Value::as_u64))
                .is_some_and(|s| s as usize <= last)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, kept)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

pub struct Metrics {
    file: std::fs::File,
    path: std::path::PathBuf,
    bar: Option<ProgressBar>,
    total_steps: usize,
}

impl Metrics {
    /// Opens `out/metrics.jsonl` for appending. A run resumed at `start_step` into the same folder
    /// first drops the lines of later steps, which the resumed run writes again; a run from the
    /// start (rerun after one killed before its first checkpoint) drops them all.
    pub fn open(out: &Path, total_steps: usize, start_step: usize) -> Result<Self> {
        let path = out.join("metrics.jsonl");
        if start_step > 0 {
            drop_lines_after(&path, "step", start_step)?;
        } else if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let bar = std::io::stdout().is_terminal().then(|| {
            let b = ProgressBar::new(total_steps as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("valid template"),
            );
            b.set_position(start_step as u64);
            b
        });
        Ok(Self {
            file,
            path,
            bar,
            total_steps,
        })
    }

    /// Writes one line; shows loss and tokens/s on the bar or prints a plain line.
    pub fn log(&mut self, step: usize, fields: Map<String, Value>) -> Result<()> {
        let mut obj = Map::new();
        obj.insert("step".into(), step.into());
        obj.extend(fields);
        writeln!(self.file, "{}", Value::Object(obj.clone()))
            .with_context(|| format!("writing {}", self.path.display()))?;
        let num = |k: &str| obj.get(k).and_then(Value::as_f64);
        let mut msg = String::new();
        for (k, label, digits) in [
            ("loss", "loss", 4),
            ("eval_loss", "eval loss", 4),
            ("eval_accuracy", "eval acc", 3),
            ("score_mean", "score", 3),
            ("kl_per_response", "kl", 3),
            ("tokens_per_s", "tok/s", 0),
            ("responses_per_s", "responses/s", 1),
            ("episodes_per_s", "episodes/s", 1),
        ] {
            if let Some(v) = num(k) {
                msg.push_str(&format!("{label} {v:.digits$}  "));
            }
        }
        match &self.bar {
            Some(b) => {
                b.set_position(step as u64);
                b.set_message(msg);
            }
            None => println!("step {step}/{}  {msg}", self.total_steps),
        }
        Ok(())
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_into_the_same_folder_drops_later_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Metrics::open(dir.path(), 4, 0).unwrap();
        for s in 1..=4 {
            let mut f = Map::new();
            f.insert("loss".into(), (s as f64).into());
            m.log(s, f).unwrap();
        }
        drop(m);
        let mut m = Metrics::open(dir.path(), 4, 2).unwrap();
        let mut f = Map::new();
        f.insert("loss".into(), 30.0.into());
        m.log(3, f).unwrap();
        let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, vec![1, 2, 3]);
        assert!(text.lines().last().unwrap().contains("30.0"));
    }
}
