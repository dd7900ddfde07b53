//! `metrics.jsonl` (one JSON object per logged step) and progress: an indicatif bar on a
//! terminal, plain lines otherwise.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};
use std::io::{IsTerminal, Write};
use std::path::Path;

pub struct Metrics {
    file: std::fs::File,
    bar: Option<ProgressBar>,
    total_steps: usize,
}

impl Metrics {
    /// Opens `out/metrics.jsonl` for appending (a resumed run continues the file).
    pub fn open(out: &Path, total_steps: usize, start_step: usize) -> Result<Self> {
        let path = out.join("metrics.jsonl");
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
            bar,
            total_steps,
        })
    }

    /// Writes one line; shows loss and tokens/s on the bar or prints a plain line.
    pub fn log(&mut self, step: usize, fields: Map<String, Value>) -> Result<()> {
        let mut obj = Map::new();
        obj.insert("step".into(), step.into());
        obj.extend(fields);
        writeln!(self.file, "{}", Value::Object(obj.clone()))?;
        let num = |k: &str| obj.get(k).and_then(Value::as_f64);
        let mut msg = String::new();
        for (k, label, digits) in [
            ("loss", "loss", 4),
            ("eval_loss", "eval loss", 4),
            ("tokens_per_s", "tok/s", 0),
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
