//! Errors of the datasets crate: each names the file, and where known the line and the field.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct DataError {
    pub file: PathBuf,
    /// 1-based line (or Parquet row) where the record starts.
    pub line: Option<usize>,
    pub field: Option<String>,
    pub msg: String,
}

impl DataError {
    pub fn file(file: &Path, msg: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line: None,
            field: None,
            msg: msg.into(),
        }
    }

    pub fn at(file: &Path, line: usize, field: Option<&str>, msg: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line: Some(line),
            field: field.map(str::to_string),
            msg: msg.into(),
        }
    }

    pub fn io(file: &Path, e: std::io::Error) -> Self {
        Self::file(file, format!("cannot read: {e}"))
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, " line {l}")?;
        }
        if let Some(c) = &self.field {
            write!(f, ", field `{c}`")?;
        }
        write!(f, ": {}", self.msg)
    }
}

impl std::error::Error for DataError {}

pub type Result<T> = std::result::Result<T, DataError>;
