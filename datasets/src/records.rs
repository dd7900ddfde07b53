//! Typed records of the pipeline and their loading from any readable file, with column names
//! mapped by config (our field name → the file's column).

use crate::error::{DataError, Result};
use crate::read::{Format, Record, read_records};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A prompt and a good response (SFT).
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Demonstration {
    pub prompt: String,
    pub response: String,
}

/// A prompt alone (PPO rollouts).
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PromptRecord {
    pub prompt: String,
}

/// One pairwise judgement (reward model).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Comparison {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// How much better `chosen` is (e.g. a rank difference); None when unknown.
    pub margin: Option<f64>,
}

/// K ≥ 2 responses to one prompt ranked by one labeler; rank 1 = best, equal ranks = tie.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RankedGroup {
    pub prompt_id: String,
    pub prompt: String,
    pub labeler_id: String,
    pub responses: Vec<String>,
    pub ranks: Vec<u32>,
}

impl RankedGroup {
    /// Every pair with different ranks, better first, with margin = rank difference (InstructGPT:
    /// each of the K choose 2 comparisons is a training example). Ties are skipped.
    pub fn comparisons(&self) -> Vec<Comparison> {
        let mut out = Vec::new();
        for i in 0..self.responses.len() {
            for j in i + 1..self.responses.len() {
                let (ri, rj) = (self.ranks[i], self.ranks[j]);
                if ri == rj {
                    continue;
                }
                let (c, r) = if ri < rj { (i, j) } else { (j, i) };
                out.push(Comparison {
                    prompt: self.prompt.clone(),
                    chosen: self.responses[c].clone(),
                    rejected: self.responses[r].clone(),
                    margin: Some(ri.abs_diff(rj) as f64),
                });
            }
        }
        out
    }
}

/// Where a data set is and how to read it: the `[data]` tables of the stage configs.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// The file (.jsonl, .jsonl.gz, .csv, .parquet).
    pub path: PathBuf,
    /// jsonl, csv or parquet; by extension when absent.
    #[serde(default)]
    pub format: Option<Format>,
    /// Our field name → the file's column name, e.g. `{ prompt = "question", response = "answer" }`.
    #[serde(default)]
    pub columns: HashMap<String, String>,
}

impl Source {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            ..Default::default()
        }
    }

    fn records(&self) -> Result<Vec<Record>> {
        read_records(&self.path, self.format)
    }

    fn column<'a>(&'a self, field: &'a str) -> &'a str {
        self.columns.get(field).map_or(field, String::as_str)
    }
}

/// Typed access to one record's fields, with errors naming file, line and column.
struct Fields<'a> {
    path: &'a Path,
    src: &'a Source,
    rec: &'a Record,
}

impl Fields<'_> {
    fn value(&self, field: &str) -> Result<&Value> {
        let col = self.src.column(field);
        self.rec.fields.get(col).ok_or_else(|| {
            DataError::at(
                self.path,
                self.rec.line,
                Some(col),
                format!(
                    "column missing; map it with columns.{field} = \"<column name>\" if it is named differently"
                ),
            )
        })
    }

    fn string(&self, field: &str) -> Result<String> {
        match self.value(field)? {
            Value::String(s) => Ok(s.clone()),
            Value::Null => Ok(String::new()),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(self.type_err(field, "a string", other)),
        }
    }

    fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        let col = self.src.column(field);
        match self.rec.fields.get(col) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => s
                .trim()
                .parse::<f64>()
                .map(Some)
                .map_err(|_| self.type_err(field, "a number", &Value::String(s.clone()))),
            Some(other) => Err(self.type_err(field, "a number", other)),
        }
    }

    fn string_list(&self, field: &str) -> Result<Vec<String>> {
        match self.value(field)? {
            Value::Array(a) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Null => Ok(String::new()),
                    other => Err(self.type_err(field, "a list of strings", other)),
                })
                .collect(),
            other => Err(self.type_err(field, "a list of strings", other)),
        }
    }

    fn rank_list(&self, field: &str) -> Result<Vec<u32>> {
        match self.value(field)? {
            Value::Array(a) => a
                .iter()
                .map(|v| match v.as_u64() {
                    Some(r) if r >= 1 => Ok(r as u32),
                    _ => Err(self.type_err(field, "a list of integer ranks ≥ 1", v)),
                })
                .collect(),
            other => Err(self.type_err(field, "a list of integer ranks ≥ 1", other)),
        }
    }

    fn type_err(&self, field: &str, expected: &str, found: &Value) -> DataError {
        let mut shown = found.to_string();
        if shown.len() > 60 {
            shown = format!("{}…", &shown[..shown.floor_char_boundary(60)]);
        }
        DataError::at(
            self.path,
            self.rec.line,
            Some(self.src.column(field)),
            format!("expected {expected}, found {shown}"),
        )
    }
}

fn load<T>(src: &Source, f: impl Fn(&Fields) -> Result<T>) -> Result<Vec<T>> {
    let recs = src.records()?;
    recs.iter()
        .map(|rec| {
            f(&Fields {
                path: &src.path,
                src,
                rec,
            })
        })
        .collect()
}

/// Demonstrations: fields `prompt`, `response`.
pub fn load_demonstrations(src: &Source) -> Result<Vec<Demonstration>> {
    load(src, |f| {
        Ok(Demonstration {
            prompt: f.string("prompt")?,
            response: f.string("response")?,
        })
    })
}

/// Prompts: field `prompt`.
pub fn load_prompts(src: &Source) -> Result<Vec<PromptRecord>> {
    load(src, |f| {
        Ok(PromptRecord {
            prompt: f.string("prompt")?,
        })
    })
}

/// Comparisons: fields `prompt`, `chosen`, `rejected`, optional `margin`.
pub fn load_comparisons(src: &Source) -> Result<Vec<Comparison>> {
    load(src, |f| {
        Ok(Comparison {
            prompt: f.string("prompt")?,
            chosen: f.string("chosen")?,
            rejected: f.string("rejected")?,
            margin: f.opt_f64("margin")?,
        })
    })
}

/// Ranked groups: fields `prompt_id`, `prompt`, `labeler_id` (optional), `responses` (list),
/// `ranks` (list of integers ≥ 1, same length, K ≥ 2).
pub fn load_ranked_groups(src: &Source) -> Result<Vec<RankedGroup>> {
    load(src, |f| {
        let responses = f.string_list("responses")?;
        let ranks = f.rank_list("ranks")?;
        if responses.len() != ranks.len() || responses.len() < 2 {
            return Err(DataError::at(
                f.path,
                f.rec.line,
                Some(f.src.column("ranks")),
                format!(
                    "needs K ≥ 2 responses and one rank each; found {} responses and {} ranks",
                    responses.len(),
                    ranks.len()
                ),
            ));
        }
        let labeler_id = match f.rec.fields.get(f.src.column("labeler_id")) {
            None | Some(Value::Null) => String::new(),
            Some(_) => f.string("labeler_id")?,
        };
        Ok(RankedGroup {
            prompt_id: f.string("prompt_id")?,
            prompt: f.string("prompt")?,
            labeler_id,
            responses,
            ranks,
        })
    })
}
