//! What an evaluation reads besides the models: the held-out prompts (`prompt`, optional `answer`),
//! the gold rule they are checked with, the demonstrations for perplexity, and the `metrics.jsonl`
//! of training runs. Every error names the file, the line and the field.

use anyhow::{Context, Result, bail};
use datasets::{Demonstration, Rule, Source};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// A held-out prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalPrompt {
    /// As in the file, without any template.
    pub text: String,
    /// The reference answer, when the file has one for this prompt.
    pub answer: Option<String>,
    /// 1-based line (row) in the file.
    pub line: usize,
}

/// Reads the prompts file (`.jsonl`, `.csv`, `.parquet`); `max` keeps the first `max` prompts.
/// An empty file, a missing or empty `prompt`, or an `answer` that is not a string or a number is
/// an error naming the file, line and field.
pub fn read_prompts(path: &Path, max: Option<usize>) -> Result<Vec<EvalPrompt>> {
    let records = datasets::read_records(path, None)?;
    let mut out = Vec::with_capacity(records.len());
    for r in &records {
        let at = |field: &str, msg: &str| {
            anyhow::anyhow!("{} line {}, field `{field}`: {msg}", path.display(), r.line)
        };
        let text = match r.fields.get("prompt") {
            Some(Value::String(s)) if s.trim().is_empty() => return Err(at("prompt", "is empty")),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(at("prompt", &format!("expected a string, found {other}")));
            }
            None => return Err(at("prompt", "missing")),
        };
        let answer = match r.fields.get("answer") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(other) => {
                return Err(at(
                    "answer",
                    &format!("expected a string or a number, found {other}"),
                ));
            }
        };
        out.push(EvalPrompt {
            text,
            answer,
            line: r.line,
        });
        if max.is_some_and(|m| out.len() >= m) {
            break;
        }
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

/// The gold rule: `--gold` when given, else `exact_answer` when any prompt has an answer, else
/// none. A rule that needs answers makes a prompt without one an error naming its line.
pub fn gold_rule(
    gold: Option<&str>,
    prompts: &[EvalPrompt],
    path: &Path,
) -> Result<Option<datasets::CompiledRule>> {
    let rule = match gold {
        Some(s) => datasets::parse_rule(s).map_err(|e| anyhow::anyhow!("--gold {s:?}: {e}"))?,
        None if prompts.iter().any(|p| p.answer.is_some()) => Rule::ExactAnswer,
        None => return Ok(None),
    };
    if rule.needs_answer()
        && let Some(p) = prompts.iter().find(|p| p.answer.is_none())
    {
        bail!(
            "{} line {}, field `answer`: missing; the gold rule {rule} needs an answer for every prompt (or pass --gold regex:<pattern>)",
            path.display(),
            p.line
        );
    }
    Ok(Some(rule.compile().map_err(|e| anyhow::anyhow!("{e}"))?))
}

/// Reads the demonstrations (`prompt`, `response`) for perplexity; none is an error.
pub fn read_demonstrations(path: &Path) -> Result<Vec<Demonstration>> {
    let demos = datasets::load_demonstrations(&Source::new(path))?;
    if demos.is_empty() {
        bail!("{}: no demonstrations", path.display());
    }
    Ok(demos)
}

/// The `metrics.jsonl` of a training run (`sft`, `reward` or `ppo` output folder).
#[derive(Clone, Debug)]
pub struct RunLog {
    /// The folder's name, made unique among the runs.
    pub name: String,
    pub dir: PathBuf,
    /// One object per logged line.
    pub rows: Vec<Map<String, Value>>,
}

impl RunLog {
    /// Whether any line has `key`.
    pub fn has(&self, key: &str) -> bool {
        self.rows.iter().any(|r| r.contains_key(key))
    }

    /// (step, value) of every line with a finite numeric `key`, in file order.
    pub fn series(&self, key: &str) -> Vec<(f64, f64)> {
        self.rows
            .iter()
            .filter_map(|r| {
                let step = r.get("step")?.as_f64()?;
                let v = r.get(key)?.as_f64()?;
                v.is_finite().then_some((step, v))
            })
            .collect()
    }

    /// (x, y) of every line with finite numeric `x_key` and `y_key`.
    pub fn pairs(&self, x_key: &str, y_key: &str) -> Vec<(f64, f64)> {
        self.rows
            .iter()
            .filter_map(|r| {
                let x = r.get(x_key)?.as_f64()?;
                let y = r.get(y_key)?.as_f64()?;
                (x.is_finite() && y.is_finite()).then_some((x, y))
            })
            .collect()
    }
}

/// Reads `DIR/metrics.jsonl` of each run folder; a folder without one, or a line that is not a
/// JSON object, is an error naming it.
pub fn read_runs(dirs: &[PathBuf]) -> Result<Vec<RunLog>> {
    // A reward ensemble's folder stands for its members' runs (member-0/, member-1/, ...) and
    // its monitor's.
    let mut expanded = Vec::new();
    for dir in dirs {
        let members: Vec<PathBuf> = (0..)
            .map(|i| dir.join(format!("member-{i}")))
            .take_while(|d| d.join("metrics.jsonl").is_file())
            .chain(Some(dir.join("monitor")).filter(|d| d.join("metrics.jsonl").is_file()))
            .collect();
        if !dir.join("metrics.jsonl").is_file() && !members.is_empty() {
            expanded.extend(members);
        } else {
            expanded.push(dir.clone());
        }
    }
    let mut runs: Vec<RunLog> = Vec::new();
    for dir in &expanded {
        let path = dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "--runs {}: cannot read {} (expected an output folder of sft, reward or ppo)",
                dir.display(),
                path.display()
            )
        })?;
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(m)) => rows.push(m),
                Ok(_) => bail!("{} line {}: not a JSON object", path.display(), i + 1),
                Err(e) => bail!("{} line {}: not valid JSON: {e}", path.display(), i + 1),
            }
        }
        let base = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
        let mut name = base.clone();
        let mut k = 2;
        while runs.iter().any(|r| r.name == name) {
            name = format!("{base}-{k}");
            k += 1;
        }
        runs.push(RunLog {
            name,
            dir: dir.clone(),
            rows,
        });
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_answers_and_gold_rule() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("p.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"a\", \"answer\": 3}\n{\"prompt\": \"b\", \"answer\": \"x\"}\n{\"prompt\": \"c\"}\n",
        )
        .unwrap();
        let all = read_prompts(&p, None).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].answer.as_deref(), Some("3"));
        assert_eq!(all[2].answer, None);
        assert_eq!(all[2].line, 3);
        let two = read_prompts(&p, Some(2)).unwrap();
        assert_eq!(two.len(), 2);
        // Answers exist, so exact_answer is the default, and the first prompt without one fails.
        assert!(gold_rule(None, &two, &p).unwrap().is_some());
        let e = gold_rule(None, &all, &p).unwrap_err().to_string();
        assert!(e.contains("p.jsonl line 3, field `answer`: missing"), "{e}");
        let e = gold_rule(Some("exact_answer"), &all, &p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3"), "{e}");
        // A regex rule needs no answer; a bad rule names itself.
        assert!(
            gold_rule(Some("regex:^ ?[0-9]+"), &all, &p)
                .unwrap()
                .is_some()
        );
        assert!(gold_rule(Some("nope"), &all, &p).is_err());
        std::fs::write(&p, "{\"prompt\": \"c\"}\n").unwrap();
        assert!(
            gold_rule(None, &read_prompts(&p, None).unwrap(), &p)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn bad_prompt_files_name_line_and_field() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("p.jsonl");
        for (text, want) in [
            ("", "no prompts"),
            (
                "{\"prompt\": \"a\"}\n{\"question\": \"b\"}\n",
                "line 2, field `prompt`: missing",
            ),
            ("{\"prompt\": \"  \"}\n", "line 1, field `prompt`: is empty"),
            ("{\"prompt\": 5}\n", "field `prompt`: expected a string"),
            ("{\"prompt\": \"a\", \"answer\": [1]}\n", "field `answer`"),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = format!("{:#}", read_prompts(&p, None).unwrap_err());
            assert!(e.contains("p.jsonl") && e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn run_logs_and_their_series() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("x/ppo");
        let b = tmp.path().join("y/ppo");
        for d in [&a, &b] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(
                d.join("metrics.jsonl"),
                "{\"step\": 1, \"score_mean\": 0.5, \"kl_per_response\": 0.0}\n\n{\"step\": 2, \"score_mean\": 0.7, \"kl_per_response\": 1.5}\n{\"step\": 3, \"score_mean\": null}\n",
            )
            .unwrap();
        }
        let runs = read_runs(&[a.clone(), b]).unwrap();
        assert_eq!(runs[0].name, "ppo");
        assert_eq!(runs[1].name, "ppo-2");
        assert!(runs[0].has("score_mean") && !runs[0].has("loss"));
        assert_eq!(runs[0].series("score_mean"), vec![(1.0, 0.5), (2.0, 0.7)]);
        assert_eq!(
            runs[0].pairs("kl_per_response", "score_mean"),
            vec![(0.0, 0.5), (1.5, 0.7)]
        );
        let e = read_runs(&[tmp.path().join("none")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--runs") && e.contains("metrics.jsonl"), "{e}");
        std::fs::write(a.join("metrics.jsonl"), "{\"step\": 1}\n[1]\n").unwrap();
        let e = read_runs(&[a]).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
