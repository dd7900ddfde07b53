//! Reading JSONL, CSV and Parquet files into records: one JSON object per row, with the line (or
//! row) it came from, so that every later error can name file, line and field.
//!
//! JSONL is parsed line by line with serde_json and CSV with the `csv` crate (UTF-8 with or without
//! BOM, CRLF or LF, quoted fields with commas, quotes and newlines); Parquet is read with polars.

use crate::error::{DataError, Result};
use serde_json::{Map, Value};
use std::io::Read;
use std::path::Path;

/// A file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jsonl,
    Csv,
    Parquet,
}

impl Format {
    /// From the extension: `.jsonl`/`.json`/`.jsonl.gz`, `.csv`, `.parquet`.
    pub fn from_path(path: &Path) -> Result<Self> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        if name.ends_with(".jsonl") || name.ends_with(".json") || name.ends_with(".ndjson") {
            Ok(Format::Jsonl)
        } else if name.ends_with(".csv") {
            Ok(Format::Csv)
        } else if name.ends_with(".parquet") {
            Ok(Format::Parquet)
        } else {
            Err(DataError::file(
                path,
                "cannot tell the format from the extension; use .jsonl, .csv or .parquet, or set `format`",
            ))
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "jsonl" | "json" => Some(Format::Jsonl),
            "csv" => Some(Format::Csv),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }
}

/// One row: its fields and where it starts (1-based line for JSONL and CSV, header = line 1;
/// 1-based row for Parquet).
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub line: usize,
    pub fields: Map<String, Value>,
}

/// Reads every row of `path` (gzip-compressed JSONL and CSV too, by a `.gz` suffix).
pub fn read_records(path: &Path, format: Option<Format>) -> Result<Vec<Record>> {
    let format = match format {
        Some(f) => f,
        None => Format::from_path(path)?,
    };
    match format {
        Format::Jsonl => read_jsonl(path),
        Format::Csv => read_csv(path),
        Format::Parquet => read_parquet(path),
    }
}

fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::file(path, format!("not valid gzip: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// The text of `bytes`, or an error naming the line of the first byte that is not UTF-8.
pub fn utf8_text<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    // A NUL byte is in no text file: a UTF-16 file, or binary data.
    if let Some(at) = bytes.iter().position(|&b| b == 0) {
        let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
        return Err(DataError::at(
            path,
            line,
            None,
            format!(
                "a NUL byte (at byte {at}): this is not a UTF-8 text file (UTF-16, or binary data); re-save it as UTF-8"
            ),
        ));
    }
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
        DataError::at(
            path,
            line,
            None,
            format!("bytes that are not UTF-8 (at byte {at}); re-save the file as UTF-8"),
        )
    })
}

fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    let bytes = read_bytes(path)?;
    let text = utf8_text(path, &bytes)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| DataError::at(path, line_no, None, format!("not valid JSON: {e}")))?;
        match v {
            Value::Object(fields) => out.push(Record {
                line: line_no,
                fields,
            }),
            _ => {
                return Err(DataError::at(
                    path,
                    line_no,
                    None,
                    "expected a JSON object on each line",
                ));
            }
        }
    }
    Ok(out)
}

/// CSV rows as records of strings (empty cells are empty strings).
fn read_csv(path: &Path) -> Result<Vec<Record>> {
    let bytes = read_bytes(path)?;
    let text = utf8_text(path, &bytes)?;
    let (header, rows) = csv_rows(path, text)?;
    Ok(rows
        .into_iter()
        .map(|(line, cells)| {
            let fields = header
                .iter()
                .zip(cells)
                .map(|(h, c)| (h.clone(), Value::String(c)))
                .collect();
            Record { line, fields }
        })
        .collect())
}

/// Header and rows (line where each record starts, cells) of CSV text. A row with a different
/// number of cells than the header is an error naming its line.
/// CSV rows: (line where the record starts, cells).
pub type CsvRows = Vec<(usize, Vec<String>)>;

pub fn csv_rows(path: &Path, text: &str) -> Result<(Vec<String>, CsvRows)> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| csv_err(path, text.as_bytes(), e))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    if header.iter().all(String::is_empty) {
        return Err(DataError::at(path, 1, None, "the header row is empty"));
    }
    let mut rows = Vec::new();
    let mut record = csv::StringRecord::new();
    let bytes = text.as_bytes();
    let (mut line, mut counted) = (1usize, 0usize);
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                // The csv crate's line can lag by one after a CRLF terminator; count newlines up
                // to the record's first byte instead.
                let mut start = record.position().map_or(0, |p| p.byte() as usize);
                while matches!(bytes.get(start), Some(b'\r' | b'\n')) {
                    start += 1;
                }
                line += bytes[counted..start.max(counted)]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count();
                counted = start.max(counted);
                rows.push((line, record.iter().map(str::to_string).collect()));
            }
            Err(e) => return Err(csv_err(path, bytes, e)),
        }
    }
    Ok((header, rows))
}

/// A CSV error at the line where its record starts (counted from the record's first byte, as
/// [`csv_rows`] counts: the csv crate's own line lags after CRLF terminators).
fn csv_err(path: &Path, bytes: &[u8], e: csv::Error) -> DataError {
    let (line, rest) = match e.position() {
        Some(p) => {
            let mut start = (p.byte() as usize).min(bytes.len());
            while matches!(bytes.get(start), Some(b'\r' | b'\n')) {
                start += 1;
            }
            let line = 1 + bytes[..start].iter().filter(|&&b| b == b'\n').count();
            (line, &bytes[start..])
        }
        None => (0, &bytes[..0]),
    };
    let msg = match e.kind() {
        // An odd number of quotes from the record to the end: a quoted cell never closed (a
        // truncated file, or a stray quote) swallowed the rest of the file.
        csv::ErrorKind::UnequalLengths { .. }
            if rest.iter().filter(|&&b| b == b'"').count() % 2 == 1 =>
        {
            "a quoted cell opened on this line is never closed (a truncated file, or a stray `\"`); close it, and write a quote inside a quoted cell as `\"\"`".to_string()
        }
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!(
            "row has {len} cells but the header has {expected_len}; quote cells that contain commas"
        ),
        _ => format!("invalid CSV: {e}"),
    };
    DataError::at(path, line, None, msg)
}

/// Runs `f`, turning a panic into `Err` without printing it (the panic hook is silenced for the
/// call).
fn without_panics<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> std::thread::Result<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(f);
    std::panic::set_hook(hook);
    r
}

fn read_parquet(path: &Path) -> Result<Vec<Record>> {
    use polars::prelude::*;
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    // polars' Parquet reader panics on some damaged files (fuzzing found an unwrap in its thrift
    // metadata decoder on a file with one byte changed): such a panic is this file's error.
    let df = without_panics(move || ParquetReader::new(file).finish())
        .map_err(|_| {
            DataError::file(
                path,
                "invalid Parquet: the file's metadata is damaged (the Parquet reader failed on it); write the file again".to_string(),
            )
        })?
        .map_err(|e| DataError::file(path, format!("invalid Parquet: {e}")))?;
    let columns: Vec<(String, Column)> = df
        .columns()
        .iter()
        .map(|c| (c.name().to_string(), c.clone()))
        .collect();
    let mut out = Vec::with_capacity(df.height());
    for row in 0..df.height() {
        let mut fields = Map::new();
        for (name, col) in &columns {
            let v = col
                .get(row)
                .map_err(|e| DataError::at(path, row + 1, Some(name), e.to_string()))?;
            fields.insert(name.clone(), any_to_json(v));
        }
        out.push(Record {
            line: row + 1,
            fields,
        });
    }
    Ok(out)
}

fn any_to_json(v: polars::prelude::AnyValue) -> Value {
    use polars::prelude::AnyValue as A;
    match v {
        A::Null => Value::Null,
        A::Boolean(b) => Value::Bool(b),
        A::String(s) => Value::String(s.to_string()),
        A::StringOwned(s) => Value::String(s.to_string()),
        A::Int8(x) => x.into(),
        A::Int16(x) => x.into(),
        A::Int32(x) => x.into(),
        A::Int64(x) => x.into(),
        A::UInt8(x) => x.into(),
        A::UInt16(x) => x.into(),
        A::UInt32(x) => x.into(),
        A::UInt64(x) => x.into(),
        A::Float32(x) => serde_json::Number::from_f64(x as f64).map_or(Value::Null, Value::Number),
        A::Float64(x) => serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number),
        A::List(s) => Value::Array(s.iter().map(any_to_json).collect()),
        // A struct (e.g. one {role, content} message of a list) as a JSON object.
        ref s @ A::Struct(_, _, fields) => Value::Object(
            fields
                .iter()
                .zip(s._iter_struct_av())
                .map(|(f, v)| (f.name().to_string(), any_to_json(v)))
                .collect(),
        ),
        A::StructOwned(payload) => {
            let (values, fields) = *payload;
            Value::Object(
                fields
                    .iter()
                    .zip(values)
                    .map(|(f, v)| (f.name().to_string(), any_to_json(v)))
                    .collect(),
            )
        }
        other => Value::String(other.to_string()),
    }
}
