//! Reading labelers' rankings from CSV, long or wide, into [`RankedGroup`]s (the preference type
//! of the `datasets` crate; each with its response ids and the line where it starts), with every
//! rule checked and every error (up to [`MAX_ERRORS`]) named by file, line, column and value.

use crate::RankedGroup;
use crate::read::{csv_rows, utf8_text};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Errors listed before giving up.
pub const MAX_ERRORS: usize = 20;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum CsvFormat {
    /// `prompt_id, prompt, response_id, response, labeler_id, rank`: one row per ranked response.
    Long,
    /// `prompt_id, prompt, labeler_id, response_1 … response_K, ranking` (`2>1=3>4`).
    Wide,
}

/// The header of a long rankings CSV, as `export-sheet` writes it.
pub const LONG_HEADER: [&str; 6] = [
    "prompt_id",
    "prompt",
    "response_id",
    "response",
    "labeler_id",
    "rank",
];

/// All errors found in a file (at most [`MAX_ERRORS`]).
#[derive(Debug)]
pub struct ImportErrors {
    pub errors: Vec<String>,
    /// More errors were found than listed.
    pub truncated: bool,
}

impl fmt::Display for ImportErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.errors {
            writeln!(f, "{e}")?;
        }
        write!(
            f,
            "{}{} error(s); nothing was written",
            if self.truncated { "more than " } else { "" },
            self.errors.len()
        )
    }
}

impl std::error::Error for ImportErrors {}

struct Errors {
    path: PathBuf,
    list: Vec<String>,
    truncated: bool,
}

impl Errors {
    fn add(&mut self, line: usize, column: Option<&str>, msg: String) {
        if self.list.len() >= MAX_ERRORS {
            self.truncated = true;
            return;
        }
        let at = match column {
            Some(c) => format!("{} line {line}, column `{c}`", self.path.display()),
            None => format!("{} line {line}", self.path.display()),
        };
        self.list.push(format!("{at}: {msg}"));
    }

    fn full(&self) -> bool {
        self.truncated
    }
}

fn shown(v: &str) -> String {
    let mut s: String = v.chars().take(40).collect();
    if v.chars().count() > 40 {
        s.push('…');
    }
    format!("{s:?}")
}

/// Reads a rankings CSV into one ranked group per (prompt_id, labeler), in the order of their first
/// rows. `renames` maps our column names to the file's headers (`--col`).
pub fn read_rankings(
    path: &Path,
    format: Option<CsvFormat>,
    renames: &HashMap<String, String>,
) -> Result<Vec<RankedGroup>, ImportErrors> {
    let one = |line: usize, col: Option<&str>, msg: String| {
        let mut e = Errors {
            path: path.to_path_buf(),
            list: Vec::new(),
            truncated: false,
        };
        e.add(line, col, msg);
        ImportErrors {
            errors: e.list,
            truncated: false,
        }
    };
    let bytes = std::fs::read(path).map_err(|e| one(0, None, format!("cannot read: {e}")))?;
    let text = utf8_text(path, &bytes).map_err(|e| ImportErrors {
        errors: vec![e.to_string()],
        truncated: false,
    })?;
    let (header, rows) = csv_rows(path, text).map_err(|e| ImportErrors {
        errors: vec![e.to_string()],
        truncated: false,
    })?;
    let col_name = |ours: &str| {
        renames
            .get(ours)
            .cloned()
            .unwrap_or_else(|| ours.to_string())
    };
    let index: HashMap<&str, usize> = header
        .iter()
        .enumerate()
        .map(|(i, h)| (h.as_str(), i))
        .collect();
    let find = |ours: &str| index.get(col_name(ours).as_str()).copied();
    let format = match format {
        Some(f) => f,
        None if find("ranking").is_some() => CsvFormat::Wide,
        None if find("rank").is_some() => CsvFormat::Long,
        None => {
            return Err(one(
                1,
                None,
                format!(
                    "cannot tell the format: the header {header:?} has neither a `ranking` column (wide) nor a `rank` column (long); add one, rename with --col rank=HEADER, or pass --format"
                ),
            ));
        }
    };
    let required: &[&str] = match format {
        CsvFormat::Long => &["prompt_id", "prompt", "response_id", "response", "rank"],
        CsvFormat::Wide => &["prompt_id", "prompt", "ranking"],
    };
    for r in required {
        if find(r).is_none() {
            let hint = if renames.contains_key(*r) {
                String::new()
            } else {
                format!(", or name the column holding it with --col {r}=HEADER")
            };
            return Err(one(
                1,
                Some(&col_name(r)),
                format!("required column missing from the header {header:?}; add it{hint}"),
            ));
        }
    }
    let mut errs = Errors {
        path: path.to_path_buf(),
        list: Vec::new(),
        truncated: false,
    };
    let groups = match format {
        CsvFormat::Long => long(&rows, &find, &col_name, &mut errs),
        CsvFormat::Wide => wide(&header, &rows, &find, &col_name, &mut errs),
    };
    if errs.list.is_empty() {
        Ok(groups)
    } else {
        Err(ImportErrors {
            errors: errs.list,
            truncated: errs.truncated,
        })
    }
}

/// Checks shared by both formats: one prompt text per prompt_id, one text per response_id.
#[derive(Default)]
struct Consistency {
    prompts: HashMap<String, (String, usize)>,
    responses: HashMap<(String, String), (String, usize)>,
}

impl Consistency {
    fn prompt(&mut self, id: &str, text: &str, line: usize, col: &str, errs: &mut Errors) {
        match self.prompts.get(id) {
            Some((t, l)) if t != text => errs.add(
                line,
                Some(col),
                format!(
                    "prompt_id {} has a different prompt text than on line {l}; one prompt_id must have one prompt (give the other prompt its own id)",
                    shown(id)
                ),
            ),
            Some(_) => {}
            None => {
                self.prompts.insert(id.to_string(), (text.to_string(), line));
            }
        }
    }

    fn response(
        &mut self,
        pid: &str,
        rid: &str,
        text: &str,
        line: usize,
        col: &str,
        errs: &mut Errors,
    ) {
        let key = (pid.to_string(), rid.to_string());
        match self.responses.get(&key) {
            Some((t, l)) if t != text => errs.add(
                line,
                Some(col),
                format!(
                    "response_id {} of prompt_id {} has a different text than on line {l}; one response_id must name one response",
                    shown(rid),
                    shown(pid)
                ),
            ),
            Some(_) => {}
            None => {
                self.responses.insert(key, (text.to_string(), line));
            }
        }
    }
}

type Find<'a> = dyn Fn(&str) -> Option<usize> + 'a;
type ColName<'a> = dyn Fn(&str) -> String + 'a;

fn long(
    rows: &[(usize, Vec<String>)],
    find: &Find,
    col_name: &ColName,
    errs: &mut Errors,
) -> Vec<RankedGroup> {
    let [pid_c, prompt_c, rid_c, resp_c, rank_c] =
        ["prompt_id", "prompt", "response_id", "response", "rank"]
            .map(|c| find(c).expect("checked"));
    let labeler_c = find("labeler_id");
    let mut check = Consistency::default();
    let mut order: Vec<(String, String)> = Vec::new();
    let mut groups: HashMap<(String, String), RankedGroup> = HashMap::new();
    // (group, response_id) → line, for duplicates within a group.
    let mut seen: HashMap<(String, String, String), usize> = HashMap::new();
    // Groups with a row already reported: their size is not checked, so that one bad rank is one
    // error, not also "the group has 1 response".
    let mut reported: std::collections::HashSet<(String, String)> = Default::default();
    for (line, cells) in rows {
        if errs.full() {
            break;
        }
        let errors_before = errs.list.len();
        let line = *line;
        let pid = cells[pid_c].trim().to_string();
        let prompt = cells[prompt_c].clone();
        let rid = cells[rid_c].trim().to_string();
        let response = cells[resp_c].clone();
        let labeler = labeler_c.map_or(String::new(), |c| cells[c].trim().to_string());
        let rank_raw = cells[rank_c].trim();
        let mut ok = true;
        if pid.is_empty() {
            errs.add(
                line,
                Some(&col_name("prompt_id")),
                "prompt_id is empty; every row needs one".into(),
            );
            ok = false;
        }
        if prompt.trim().is_empty() {
            errs.add(
                line,
                Some(&col_name("prompt")),
                "prompt is empty; every row needs the prompt text".into(),
            );
            ok = false;
        }
        if rid.is_empty() {
            errs.add(
                line,
                Some(&col_name("response_id")),
                "response_id is empty; every response needs an id".into(),
            );
            ok = false;
        }
        let rank = match rank_raw.parse::<u32>() {
            Ok(r) if r >= 1 => Some(r),
            _ => {
                errs.add(
                    line,
                    Some(&col_name("rank")),
                    format!(
                        "rank must be an integer ≥ 1 (1 = best), found {}",
                        shown(rank_raw)
                    ),
                );
                None
            }
        };
        if errs.list.len() > errors_before {
            reported.insert((pid.clone(), labeler.clone()));
        }
        if !ok {
            continue;
        }
        check.prompt(&pid, &prompt, line, &col_name("prompt"), errs);
        check.response(&pid, &rid, &response, line, &col_name("response"), errs);
        let key = (pid.clone(), labeler.clone());
        if let Some(first) = seen.get(&(pid.clone(), labeler.clone(), rid.clone())) {
            reported.insert(key.clone());
            errs.add(
                line,
                Some(&col_name("response_id")),
                format!(
                    "response_id {} appears twice in the group of prompt_id {} and labeler {} (first on line {first}); each labeler ranks a response once",
                    shown(&rid),
                    shown(&pid),
                    shown(&labeler)
                ),
            );
            continue;
        }
        seen.insert((pid.clone(), labeler.clone(), rid.clone()), line);
        let Some(rank) = rank else { continue };
        let g = groups.entry(key.clone()).or_insert_with(|| {
            order.push(key.clone());
            RankedGroup {
                prompt_id: pid.clone(),
                prompt: prompt.clone(),
                labeler_id: labeler.clone(),
                response_ids: Vec::new(),
                responses: Vec::new(),
                ranks: Vec::new(),
                line,
            }
        });
        g.response_ids.push(rid);
        g.responses.push(response);
        g.ranks.push(rank);
    }
    let mut out = Vec::with_capacity(order.len());
    for key in order {
        let g = groups.remove(&key).expect("ordered key");
        if g.responses.len() < 2 && !errs.full() && !reported.contains(&key) {
            errs.add(
                g.line,
                Some(&col_name("prompt_id")),
                format!(
                    "the group of prompt_id {} and labeler {} has {} response; a ranking needs at least 2",
                    shown(&g.prompt_id),
                    shown(&g.labeler_id),
                    g.responses.len()
                ),
            );
        }
        out.push(g);
    }
    out
}

/// Parses a wide ranking like `2>1=3>4` into (response number, rank) pairs, best first.
pub fn parse_ranking(s: &str) -> Result<Vec<(usize, u32)>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("the ranking is empty; list response numbers best first, e.g. 2>1=3>4".into());
    }
    let mut out = Vec::new();
    for (tier, part) in s.split('>').enumerate() {
        for item in part.split('=') {
            let item = item.trim();
            match item.parse::<usize>() {
                Ok(n) if n >= 1 => out.push((n, tier as u32 + 1)),
                _ => {
                    return Err(format!(
                        "{} is not a response number in the ranking; use numbers with `>` between and `=` inside a tie, e.g. 2>1=3>4",
                        shown(item)
                    ));
                }
            }
        }
    }
    Ok(out)
}

fn wide(
    header: &[String],
    rows: &[(usize, Vec<String>)],
    find: &Find,
    col_name: &ColName,
    errs: &mut Errors,
) -> Vec<RankedGroup> {
    let [pid_c, prompt_c, ranking_c] =
        ["prompt_id", "prompt", "ranking"].map(|c| find(c).expect("checked"));
    let labeler_c = find("labeler_id");
    // response_N columns: N → column index.
    let mut response_cols: HashMap<usize, usize> = HashMap::new();
    for (i, h) in header.iter().enumerate() {
        if let Some(n) = h
            .strip_prefix("response_")
            .and_then(|n| n.parse::<usize>().ok())
        {
            response_cols.insert(n, i);
        }
    }
    let mut check = Consistency::default();
    let mut seen_groups: HashMap<(String, String), usize> = HashMap::new();
    let mut out = Vec::new();
    for (line, cells) in rows {
        if errs.full() {
            break;
        }
        let line = *line;
        let pid = cells[pid_c].trim().to_string();
        let prompt = cells[prompt_c].clone();
        let labeler = labeler_c.map_or(String::new(), |c| cells[c].trim().to_string());
        let ranking_col = col_name("ranking");
        if pid.is_empty() {
            errs.add(
                line,
                Some(&col_name("prompt_id")),
                "prompt_id is empty; every row needs one".into(),
            );
            continue;
        }
        if prompt.trim().is_empty() {
            errs.add(
                line,
                Some(&col_name("prompt")),
                "prompt is empty; every row needs the prompt text".into(),
            );
            continue;
        }
        let parsed = match parse_ranking(&cells[ranking_c]) {
            Ok(p) => p,
            Err(msg) => {
                errs.add(line, Some(&ranking_col), msg);
                continue;
            }
        };
        let mut bad = false;
        let mut named = std::collections::HashSet::new();
        for (n, _) in &parsed {
            if !response_cols.contains_key(n) {
                errs.add(
                    line,
                    Some(&ranking_col),
                    format!(
                        "the ranking {} names response {n}, but there is no column response_{n}",
                        shown(&cells[ranking_c])
                    ),
                );
                bad = true;
            } else if !named.insert(*n) {
                errs.add(
                    line,
                    Some(&ranking_col),
                    format!(
                        "the ranking {} names response {n} twice; name each response exactly once",
                        shown(&cells[ranking_c])
                    ),
                );
                bad = true;
            }
        }
        let mut unnamed: Vec<usize> = response_cols
            .iter()
            .filter(|(n, c)| !named.contains(n) && !cells[**c].is_empty())
            .map(|(n, _)| *n)
            .collect();
        unnamed.sort_unstable();
        for n in unnamed {
            errs.add(
                line,
                Some(&format!("response_{n}")),
                format!("response_{n} has text but the ranking {} does not name it; rank it or leave the cell empty", shown(&cells[ranking_c])),
            );
            bad = true;
        }
        if bad {
            continue;
        }
        if parsed.len() < 2 {
            errs.add(
                line,
                Some(&ranking_col),
                format!(
                    "the group of prompt_id {} and labeler {} ranks {} response; a ranking needs at least 2",
                    shown(&pid),
                    shown(&labeler),
                    parsed.len()
                ),
            );
            continue;
        }
        if let Some(first) = seen_groups.get(&(pid.clone(), labeler.clone())) {
            errs.add(
                line,
                Some(&col_name("prompt_id")),
                format!(
                    "prompt_id {} is ranked twice by labeler {} (first on line {first}); each labeler ranks a prompt's responses once",
                    shown(&pid),
                    shown(&labeler)
                ),
            );
            continue;
        }
        seen_groups.insert((pid.clone(), labeler.clone()), line);
        check.prompt(&pid, &prompt, line, &col_name("prompt"), errs);
        let mut j = RankedGroup {
            prompt_id: pid.clone(),
            prompt,
            labeler_id: labeler,
            response_ids: Vec::new(),
            responses: Vec::new(),
            ranks: Vec::new(),
            line,
        };
        let mut by_number = parsed.clone();
        by_number.sort_unstable();
        for (n, rank) in by_number {
            let text = cells[response_cols[&n]].clone();
            check.response(
                &pid,
                &n.to_string(),
                &text,
                line,
                &format!("response_{n}"),
                errs,
            );
            j.response_ids.push(n.to_string());
            j.responses.push(text);
            j.ranks.push(rank);
        }
        out.push(j);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rankings_parse_with_ties() {
        assert_eq!(
            parse_ranking("2>1=3>4").unwrap(),
            vec![(2, 1), (1, 2), (3, 2), (4, 3)]
        );
        assert_eq!(parse_ranking(" 1 > 2 ").unwrap(), vec![(1, 1), (2, 2)]);
        assert!(parse_ranking("1>>2").is_err());
        assert!(parse_ranking("a>b").is_err());
        assert!(parse_ranking("0>1").is_err());
        assert!(parse_ranking("").is_err());
    }
}
