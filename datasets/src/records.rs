//! Typed records of the pipeline (demonstrations, prompts; the preference types live in
//! [`crate::preference`]) and their loading from any readable file, with column names mapped by
//! config (our field name → the file's column) and every error naming file, line and column.

use crate::error::{DataError, Result};
use crate::preference::{Comparison, RankedGroup};
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

/// A prompt (PPO rollouts, evaluation), with its reference answer when the file has one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PromptRecord {
    pub prompt: String,
    /// The optional `answer` field (a string or a number), for rule rewards and gold scoring.
    #[serde(default)]
    pub answer: Option<String>,
    /// Line (or Parquet row) of the record in its file.
    #[serde(default)]
    pub line: usize,
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

    pub(crate) fn records(&self) -> Result<Vec<Record>> {
        read_records(&self.path, self.format)
    }

    pub(crate) fn column<'a>(&'a self, field: &'a str) -> &'a str {
        self.columns.get(field).map_or(field, String::as_str)
    }
}

/// Typed access to one record's fields, with errors naming file, line and column.
pub(crate) struct Fields<'a> {
    pub(crate) path: &'a Path,
    pub(crate) src: &'a Source,
    pub(crate) rec: &'a Record,
}

impl Fields<'_> {
    pub(crate) fn value(&self, field: &str) -> Result<&Value> {
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

    /// The field's value, None when the column is absent or the cell null.
    pub(crate) fn present(&self, field: &str) -> Option<&Value> {
        match self.rec.fields.get(self.src.column(field)) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    /// An optional string column: empty when absent or null.
    pub(crate) fn opt_string(&self, field: &str) -> Result<String> {
        match self.present(field) {
            None => Ok(String::new()),
            Some(_) => self.string(field),
        }
    }

    /// An optional flag: a bool, 0 or 1, or the strings "true"/"false"/"1"/"0" (any case); false
    /// when absent, null or an empty cell.
    pub(crate) fn opt_bool(&self, field: &str) -> Result<bool> {
        const EXPECTED: &str = "true or false (or 1 or 0)";
        match self.present(field) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v @ Value::Number(n)) => match n.as_f64() {
                Some(0.0) => Ok(false),
                Some(1.0) => Ok(true),
                _ => Err(self.type_err(field, EXPECTED, v)),
            },
            Some(v @ Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
                "" | "false" | "0" => Ok(false),
                "true" | "1" => Ok(true),
                _ => Err(self.type_err(field, EXPECTED, v)),
            },
            Some(other) => Err(self.type_err(field, EXPECTED, other)),
        }
    }

    pub(crate) fn string(&self, field: &str) -> Result<String> {
        match self.value(field)? {
            Value::String(s) => Ok(s.clone()),
            Value::Null => Ok(String::new()),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(self.type_err(field, "a string", other)),
        }
    }

    pub(crate) fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
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

    pub(crate) fn string_list(&self, field: &str) -> Result<Vec<String>> {
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

    /// A list of ids: strings, or numbers taken as their text.
    pub(crate) fn id_list(&self, field: &str) -> Result<Vec<String>> {
        const EXPECTED: &str = "a list of ids (strings)";
        match self.value(field)? {
            Value::Array(a) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    other => Err(self.type_err(field, EXPECTED, other)),
                })
                .collect(),
            other => Err(self.type_err(field, EXPECTED, other)),
        }
    }

    pub(crate) fn rank_list(&self, field: &str) -> Result<Vec<u32>> {
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

    pub(crate) fn err(&self, field: &str, msg: String) -> DataError {
        DataError::at(self.path, self.rec.line, Some(self.src.column(field)), msg)
    }

    pub(crate) fn type_err(&self, field: &str, expected: &str, found: &Value) -> DataError {
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

pub(crate) fn load<T>(src: &Source, f: impl Fn(&Fields) -> Result<T>) -> Result<Vec<T>> {
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
    load(src, demonstration)
}

/// One plain demonstration record (also read by [`crate::chat::load_sft_records`]).
pub(crate) fn demonstration(f: &Fields) -> Result<Demonstration> {
    Ok(Demonstration {
        prompt: f.string("prompt")?,
        response: f.string("response")?,
    })
}

/// Prompts: field `prompt`, optional `answer`.
pub fn load_prompts(src: &Source) -> Result<Vec<PromptRecord>> {
    load(src, prompt_record)
}

/// The optional `answer` field (a string or a number).
pub(crate) fn answer(f: &Fields) -> Result<Option<String>> {
    match f.present("answer") {
        None => Ok(None),
        Some(_) => Ok(Some(f.string("answer")?)),
    }
}

/// One plain prompt record (also read by [`crate::chat::load_prompt_records`]).
pub(crate) fn prompt_record(f: &Fields) -> Result<PromptRecord> {
    Ok(PromptRecord {
        prompt: f.string("prompt")?,
        answer: answer(f)?,
        line: f.rec.line,
    })
}

/// Comparisons: fields `prompt`, `chosen`, `rejected`; optional `prompt_id`, `labeler_id`,
/// `chosen_id`, `rejected_id` (empty when absent), `margin` (a number) and `tie` (a bool, 0/1 or
/// "true"/"false"; false when absent), as `labeling import` writes them to `pairs.parquet`.
pub fn load_comparisons(src: &Source) -> Result<Vec<Comparison>> {
    load(src, comparison)
}

/// One plain comparison record (also read by [`crate::chat::load_preference_records`]).
pub(crate) fn comparison(f: &Fields) -> Result<Comparison> {
    Ok(Comparison {
        prompt_id: f.opt_string("prompt_id")?,
        prompt: f.string("prompt")?,
        labeler_id: f.opt_string("labeler_id")?,
        chosen_id: f.opt_string("chosen_id")?,
        chosen: f.string("chosen")?,
        rejected_id: f.opt_string("rejected_id")?,
        rejected: f.string("rejected")?,
        margin: f.opt_f64("margin")?,
        tie: f.opt_bool("tie")?,
    })
}

/// Ranked groups: fields `prompt_id`, `prompt`, `responses` (list, K ≥ 2), `ranks` (list of
/// integers ≥ 1, one per response); optional `labeler_id` (empty when absent) and `response_ids`
/// (list, one unique id per response; "1".."K" when absent), as `labeling import` writes them to
/// `rankings.parquet`. Each group's `line` is the line (or Parquet row) of its record.
pub fn load_ranked_groups(src: &Source) -> Result<Vec<RankedGroup>> {
    load(src, |f| {
        let responses = f.string_list("responses")?;
        let k = responses.len();
        if k < 2 {
            return Err(f.err(
                "responses",
                format!(
                    "found {k} response(s); a ranked group needs K ≥ 2 responses to compare (drop the record or add responses)"
                ),
            ));
        }
        let ranks = f.rank_list("ranks")?;
        if ranks.len() != k {
            return Err(f.err(
                "ranks",
                format!(
                    "found {} ranks for {k} responses; give one rank per response, in the order of `responses`",
                    ranks.len()
                ),
            ));
        }
        let response_ids = match f.present("response_ids") {
            None => (1..=k).map(|i| i.to_string()).collect(),
            Some(_) => f.id_list("response_ids")?,
        };
        if response_ids.len() != k {
            return Err(f.err(
                "response_ids",
                format!(
                    "found {} response ids for {k} responses; give one id per response, in the order of `responses`, or leave the column out",
                    response_ids.len()
                ),
            ));
        }
        for (i, id) in response_ids.iter().enumerate() {
            if response_ids[..i].contains(id) {
                return Err(f.err(
                    "response_ids",
                    format!("response id {id:?} appears twice; each response needs its own id"),
                ));
            }
        }
        Ok(RankedGroup {
            prompt_id: f.string("prompt_id")?,
            prompt: f.string("prompt")?,
            labeler_id: f.opt_string("labeler_id")?,
            response_ids,
            responses,
            ranks,
            line: f.rec.line,
        })
    })
}
