//! `reward serve DIR`: an HTTP server for the one [`Scorer`], so that a trainer elsewhere
//! (OpenRLHF's `--remote_rm_url`, verl through a custom reward function) scores against a reward
//! model or ensemble trained here. It is not a general model server: one folder, scoring only,
//! HTTP/1.1 without TLS (put it behind a proxy, or keep `--host 127.0.0.1`, for anything public).
//!
//! Endpoints:
//! - `POST /get_reward`, OpenRLHF's protocol (`openrlhf/cli/serve_rm.py`): the body is
//!   `{"query": [str, ...], "prompts": [str, ...] (optional), "labels": [...] (ignored)}`, the
//!   reply `{"rewards": [r, ...], "scores": [r, ...], "extra_logs": {...}}` with `rewards ==
//!   scores`, in the order of `query`.
//! - `POST /score`: `{"items": [{"prompt": str, "response": str}, ...]}`, encoded exactly as `reward
//!   score` does (the template stored with each model); the reply `{"rewards": [...]}`, and for an
//!   ensemble also `"members"` (each response's member rewards) and `"std"` (their standard
//!   deviation), as `reward score`'s lines.
//! - `GET /health`: `{"status": "ok", "members": N, ...}`.
//!
//! How an OpenRLHF query becomes the (prompt, response) that the scorer encodes as
//! template(prompt) + response + EOS ([`crate::data::fit`]): each query is the client's whole
//! sequence, its prompt already rendered with the client's own template, decoded with special
//! tokens. So:
//! 1. Leading pad strings (left padding) and trailing pad and EOS strings are stripped, with the
//!    token texts of the model's own tokenizer (each member's, for an ensemble).
//! 2. With `prompts[i]` given (its leading pad strings stripped too) and the stripped query
//!    starting with it, the prompt is `prompts[i]` and the response the rest of the query.
//!    Without `prompts`, or when the query does not start with its prompt, the prompt is empty
//!    and the whole query is the response; such queries are counted in the request's log line,
//!    and `extra_logs.prompt_found` says per query whether its prompt was found (only when
//!    `prompts` is sent).
//! 3. The prompt is rendered with the identity template `{prompt}`, since the client rendered
//!    its own; `--template stored` applies each model's stored template instead, and `--template
//!    "..."` any template (as `reward score --template`).
//!
//! Over-long sequences are cut as everywhere else: the prompt from the left, then a response too
//! long by itself at its end. Without `prompts` the whole query is the response, so send
//! `prompts` when queries may exceed the model's context.
//!
//! For an ensemble, `extra_logs` also holds `reward_member_mean` and `reward_member_std`, one
//! number per query (OpenRLHF logs each key's mean).
//!
//! Design: handler threads (one per connection, at most `--max-connections`) parse requests and
//! put them on a channel; one scoring thread owns the scorer, takes whatever requests are
//! pending, up to `--batch-size` responses (a request is never split, so one larger than that is
//! scored alone), scores them together and answers each. Bodies are limited by Content-Length
//! (checked before reading) and every read has a deadline, so a slow client holds its thread for
//! at most `--timeout-s`. SIGINT or SIGTERM stops accepting, lets the requests in flight finish
//! and returns a [`Summary`]; a second signal exits at once.

use crate::{Aggregate, Item, Scorer, ScorerOptions, Scores};
use anyhow::{Context, Result, bail};
use model::PromptTemplate;
use serde_json::{Map, Value, json};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

/// The longest request head (request line and headers) read.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most headers a request may carry.
const MAX_HEADERS: usize = 64;
/// How long an idle keep-alive connection is kept open for its next request.
const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(10);
/// How long unread input is drained after an error reply before closing (so that the client
/// reads the reply instead of a connection reset).
const LINGER: Duration = Duration::from_secs(2);

/// `reward serve DIR [--host H] [--port P] ...`.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// A reward-model folder written by `reward`, or an ensemble folder (ensemble.json).
    pub dir: PathBuf,
    /// Address to listen on; 0.0.0.0 for every interface.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port; 0 picks a free one. The first line on stdout is `listening on http://HOST:PORT`.
    #[arg(long, default_value_t = 5000)]
    pub port: u16,
    /// Responses per forward pass; pending requests are scored together up to this many.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// The largest request body accepted (413 beyond); 8 MiB by default.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// The most responses one request may hold (413 beyond).
    #[arg(long, default_value_t = 4096)]
    pub max_items: usize,
    /// The prompt template of `/get_reward`: `{prompt}` by default (the client rendered its
    /// own), `stored` for each model's stored template, or any template with `{prompt}` once.
    /// `/score` always uses the stored one.
    #[arg(long)]
    pub template: Option<String>,
    /// An ensemble's reward: mean, mean-minus-std (mean − λ·std) or min over the members.
    #[arg(long, value_enum, default_value = "mean-minus-std")]
    pub aggregate: Aggregate,
    /// λ of mean-minus-std.
    #[arg(long, default_value_t = 1.0)]
    pub uncertainty_coef: f64,
    /// How the reward models' matrices are kept: auto (the files' dtype: a bf16 model stays
    /// bf16, half the memory, the same scores), f32 or bf16.
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: model::WeightDtype,
    /// The head's raw output instead of the normalised reward.
    #[arg(long)]
    pub raw: bool,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The longest a client may take to send one request, head and body (408 beyond).
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    /// Connections served at once; one more is answered 503.
    #[arg(long, default_value_t = 64)]
    pub max_connections: usize,
}

/// What a server did before it stopped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub requests: u64,
    /// Requests answered with a status of 400 or more.
    pub errors: u64,
    pub responses: u64,
    pub seconds: f64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stopped: {} requests ({} errors), {} responses scored in {:.1}s",
            self.requests, self.errors, self.responses, self.seconds
        )
    }
}

/// Which template a request's prompts are rendered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    /// `/get_reward`'s (`--template`).
    Query,
    /// Each model's stored template (`/score`).
    Stored,
}

/// One request's responses, for the scoring thread.
struct Job {
    encoding: Encoding,
    /// (prompt, response) pairs.
    items: Vec<(String, String)>,
    reply: mpsc::Sender<Result<Scores, String>>,
}

/// The scorer and `/get_reward`'s template (None: each model's stored one); owned by the
/// scoring thread.
struct Engine {
    scorer: Scorer,
    query: Option<PromptTemplate>,
    batch_size: usize,
}

impl Engine {
    /// Scores `items` with the templates of `encoding`; an error or a panic becomes a message.
    fn score(&self, encoding: Encoding, items: &[(String, String)]) -> Result<Scores, String> {
        let template = match encoding {
            Encoding::Query => self.query.as_ref(),
            Encoding::Stored => None,
        };
        let items = Item::pairs(items);
        let scorer = &self.scorer;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model::device::hot(|| scorer.score_with(&items, template))
        })) {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(format!("scoring failed: {e:#}")),
            Err(panic) => Err(format!(
                "scoring failed: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("panic")
            )),
        }
    }

    /// Scores `jobs` (one encoding) together and answers each; if that fails, each on its own,
    /// so that one bad request fails alone.
    fn answer(&self, encoding: Encoding, jobs: Vec<Job>) {
        let items: Vec<(String, String)> =
            jobs.iter().flat_map(|j| j.items.iter().cloned()).collect();
        match self.score(encoding, &items) {
            Ok(scores) => {
                if scores.cut_prompts + scores.cut_responses > 0 {
                    eprintln!(
                        "batch of {} responses ({} requests): {} prompts cut from the left and {} responses cut at the end to fit the context",
                        items.len(),
                        jobs.len(),
                        scores.cut_prompts,
                        scores.cut_responses
                    );
                }
                let mut at = 0;
                for j in jobs {
                    let range = at..at + j.items.len();
                    at = range.end;
                    let part = Scores {
                        rewards: scores.rewards[range.clone()].to_vec(),
                        members: scores
                            .members
                            .iter()
                            .map(|m| m[range.clone()].to_vec())
                            .collect(),
                        ..Scores::default()
                    };
                    // The handler may have gone (its client closed): nothing to answer.
                    let _ = j.reply.send(Ok(part));
                }
            }
            Err(e) if jobs.len() == 1 => {
                let _ = jobs[0].reply.send(Err(e));
            }
            Err(_) => {
                for j in jobs {
                    let r = self.score(encoding, &j.items);
                    let _ = j.reply.send(r);
                }
            }
        }
    }

    /// The scoring loop: takes what is pending, up to `batch_size` responses without splitting a
    /// request, scores it by encoding, answers; ends when every sender is gone.
    fn run(self, jobs: mpsc::Receiver<Job>) {
        let mut carried: Option<Job> = None;
        loop {
            let first = match carried.take() {
                Some(j) => j,
                None => match jobs.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                },
            };
            let mut n = first.items.len();
            let mut batch = vec![first];
            while n < self.batch_size {
                match jobs.try_recv() {
                    Ok(j) if n + j.items.len() <= self.batch_size => {
                        n += j.items.len();
                        batch.push(j);
                    }
                    Ok(j) => {
                        carried = Some(j);
                        break;
                    }
                    Err(_) => break,
                }
            }
            let (query, stored): (Vec<Job>, Vec<Job>) = batch
                .into_iter()
                .partition(|j| j.encoding == Encoding::Query);
            for (encoding, group) in [(Encoding::Query, query), (Encoding::Stored, stored)] {
                if !group.is_empty() {
                    self.answer(encoding, group);
                }
            }
        }
    }
}

/// The token texts stripped from OpenRLHF queries.
#[derive(Clone, Debug, Default, PartialEq)]
struct Specials {
    /// Stripped from the start (left padding).
    leading: Vec<String>,
    /// Stripped from the end (EOS and right padding).
    trailing: Vec<String>,
}

impl Specials {
    /// The pad and EOS texts of every member's tokenizer.
    fn of(scorer: &Scorer) -> Self {
        let mut s = Specials::default();
        if let Scorer::Models { members, .. } = scorer {
            for m in members {
                let t = &m.tokenizer;
                for (id, lead) in [(t.pad_id, true), (t.eos_id, false)] {
                    let Some(text) = t.id_to_token(id).filter(|x| !x.is_empty()) else {
                        continue;
                    };
                    if lead && !s.leading.contains(&text) {
                        s.leading.push(text.clone());
                    }
                    if !s.trailing.contains(&text) {
                        s.trailing.push(text);
                    }
                }
            }
        }
        s
    }

    fn strip_leading<'a>(&self, mut text: &'a str) -> &'a str {
        while let Some(rest) = self
            .leading
            .iter()
            .find_map(|p| text.strip_prefix(p.as_str()))
        {
            text = rest;
        }
        text
    }

    fn strip<'a>(&self, text: &'a str) -> &'a str {
        let mut text = self.strip_leading(text);
        while let Some(rest) = self
            .trailing
            .iter()
            .find_map(|p| text.strip_suffix(p.as_str()))
        {
            text = rest;
        }
        text
    }
}

/// A reply: status, JSON body, responses it scored, and what the log line adds.
struct Reply {
    status: u16,
    body: Value,
    responses: usize,
    /// Methods allowed, for a 405.
    allow: Option<&'static str>,
    note: String,
}

impl Reply {
    fn ok(body: Value, responses: usize) -> Self {
        Reply {
            status: 200,
            body,
            responses,
            allow: None,
            note: String::new(),
        }
    }

    fn error(status: u16, message: impl Into<String>) -> Self {
        Reply {
            status,
            body: json!({ "error": message.into() }),
            responses: 0,
            allow: None,
            note: String::new(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// What a JSON value is, for error messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The list of strings at `field` (None when absent or null); errors name the field and item.
fn strings<'a>(body: &'a Value, field: &str) -> Result<Option<Vec<&'a str>>, Reply> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().ok_or_else(|| {
                    Reply::error(
                        400,
                        format!(
                            "`{field}` must be a list of strings; {field}[{i}] is {}",
                            kind(v)
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(other) => Err(Reply::error(
            400,
            format!("`{field}` must be a list of strings, found {}", kind(other)),
        )),
    }
}

fn parse_body(body: &[u8]) -> Result<Value, Reply> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Reply::error(400, format!("the body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(Reply::error(
            400,
            format!("the body must be a JSON object, found {}", kind(&v)),
        ));
    }
    Ok(v)
}

/// The responses of an OpenRLHF request.
#[derive(Debug)]
struct Queries {
    /// (prompt, response) of each query.
    items: Vec<(String, String)>,
    /// Whether each query started with its prompt; None without `prompts`.
    prompt_found: Option<Vec<bool>>,
}

/// An OpenRLHF request's queries, stripped and split at their prompts (see the module doc).
fn read_get_reward(body: &Value, specials: &Specials) -> Result<Queries, Reply> {
    let Some(queries) = strings(body, "query")? else {
        return Err(Reply::error(
            400,
            "`query` is missing: send {\"query\": [str, ...], \"prompts\": [str, ...]}",
        ));
    };
    let prompts = strings(body, "prompts")?;
    if let Some(p) = &prompts
        && p.len() != queries.len()
    {
        return Err(Reply::error(
            400,
            format!(
                "`prompts` has {} items but `query` has {}: one prompt per query, or no `prompts`",
                p.len(),
                queries.len()
            ),
        ));
    }
    let mut items = Vec::with_capacity(queries.len());
    let mut found = Vec::with_capacity(queries.len());
    for (i, q) in queries.iter().enumerate() {
        let q = specials.strip(q);
        let prompt = prompts.as_ref().map(|p| specials.strip_leading(p[i]));
        match prompt.and_then(|p| q.strip_prefix(p).map(|rest| (p, rest))) {
            Some((p, rest)) => {
                items.push((p.to_string(), rest.to_string()));
                found.push(true);
            }
            None => {
                items.push((String::new(), q.to_string()));
                found.push(false);
            }
        }
    }
    Ok(Queries {
        items,
        prompt_found: prompts.map(|_| found),
    })
}

/// A `/score` request → (prompt, response) pairs.
fn read_score(body: &Value) -> Result<Vec<(String, String)>, Reply> {
    let items = match body.get("items") {
        Some(Value::Array(a)) => a,
        None => {
            return Err(Reply::error(
                400,
                "`items` is missing: send {\"items\": [{\"prompt\": str, \"response\": str}, ...]}",
            ));
        }
        Some(other) => {
            return Err(Reply::error(
                400,
                format!("`items` must be a list of objects, found {}", kind(other)),
            ));
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, it)| {
            let field = |k: &str| match it.get(k) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(Reply::error(
                    400,
                    format!("items[{i}].{k} must be a string, found {}", kind(other)),
                )),
                None if !it.is_object() => Err(Reply::error(
                    400,
                    format!(
                        "items[{i}] must be an object {{\"prompt\", \"response\"}}, found {}",
                        kind(it)
                    ),
                )),
                None => Err(Reply::error(400, format!("items[{i}].{k} is missing"))),
            };
            Ok((field("prompt")?, field("response")?))
        })
        .collect()
}

/// Requests being answered, and whether new ones are still taken (false once stopping has
/// drained them).
#[derive(Default)]
struct Gate {
    in_flight: usize,
    closed: bool,
}

/// What every handler thread shares.
struct Shared {
    jobs: mpsc::Sender<Job>,
    specials: Specials,
    members: usize,
    health: Value,
    max_body_bytes: usize,
    max_items: usize,
    timeout: Duration,
    max_connections: usize,
    connections: AtomicUsize,
    stopping: AtomicBool,
    requests: AtomicU64,
    errors: AtomicU64,
    responses: AtomicU64,
    gate: Mutex<Gate>,
    drained: Condvar,
}

/// A request in flight, for as long as it lives.
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut g = self.0.gate.lock().unwrap_or_else(|e| e.into_inner());
        g.in_flight -= 1;
        self.0.drained.notify_all();
    }
}

/// An open connection, for as long as it lives.
struct Connection<'a>(&'a Shared);

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    /// Counts a request as in flight, unless the server has drained for shutdown.
    fn enter(&self) -> Option<InFlight<'_>> {
        let mut g = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        if g.closed {
            return None;
        }
        g.in_flight += 1;
        Some(InFlight(self))
    }

    /// Waits until no request is in flight, then takes no more.
    fn drain(&self) {
        let mut g = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        while g.in_flight > 0 {
            g = self.drained.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.closed = true;
    }

    /// Scores `items` on the scoring thread.
    fn submit(&self, encoding: Encoding, items: Vec<(String, String)>) -> Result<Scores, Reply> {
        let (reply, answer) = mpsc::channel();
        self.jobs
            .send(Job {
                encoding,
                items,
                reply,
            })
            .map_err(|_| Reply::error(500, "the scoring thread has stopped"))?;
        let scores = answer
            .recv()
            .map_err(|_| Reply::error(500, "the scoring thread has stopped"))?
            .map_err(|e| Reply::error(500, e))?;
        self.responses
            .fetch_add(scores.rewards.len() as u64, Ordering::Relaxed);
        Ok(scores)
    }

    fn check_items(&self, n: usize) -> Result<(), Reply> {
        if n > self.max_items {
            return Err(Reply::error(
                413,
                format!(
                    "{n} responses in one request, over --max-items {}; split the request",
                    self.max_items
                ),
            ));
        }
        Ok(())
    }

    fn get_reward(&self, body: &[u8]) -> Result<Reply, Reply> {
        let v = parse_body(body)?;
        let Queries {
            items,
            prompt_found: found,
        } = read_get_reward(&v, &self.specials)?;
        self.check_items(items.len())?;
        let n = items.len();
        let scores = if n == 0 {
            Scores::default()
        } else {
            self.submit(Encoding::Query, items)?
        };
        let mut extra = Map::new();
        let mut note = String::new();
        if let Some(found) = found {
            let missed = found.iter().filter(|f| !**f).count();
            if missed > 0 {
                note = format!(" prompt_not_found={missed}");
            }
            let f: Vec<f32> = found.iter().map(|&f| f as u8 as f32).collect();
            extra.insert("prompt_found".into(), json!(f));
        }
        if self.members > 1 {
            extra.insert("reward_member_mean".into(), json!(scores.member_mean()));
            extra.insert("reward_member_std".into(), json!(scores.member_std()));
        }
        let mut reply = Reply::ok(
            json!({ "rewards": scores.rewards, "scores": scores.rewards, "extra_logs": extra }),
            n,
        );
        reply.note = note;
        Ok(reply)
    }

    fn score(&self, body: &[u8]) -> Result<Reply, Reply> {
        let v = parse_body(body)?;
        let items = read_score(&v)?;
        self.check_items(items.len())?;
        let n = items.len();
        let scores = if n == 0 {
            Scores::default()
        } else {
            self.submit(Encoding::Stored, items)?
        };
        let body = if self.members > 1 {
            let members: Vec<Vec<f32>> = (0..n)
                .map(|i| scores.members.iter().map(|m| m[i]).collect())
                .collect();
            json!({ "rewards": scores.rewards, "members": members, "std": scores.member_std() })
        } else {
            json!({ "rewards": scores.rewards })
        };
        Ok(Reply::ok(body, n))
    }

    fn health(&self) -> Reply {
        let mut h = self.health.clone();
        if let Value::Object(m) = &mut h {
            m.insert(
                "requests".into(),
                json!(self.requests.load(Ordering::Relaxed)),
            );
            m.insert(
                "responses".into(),
                json!(self.responses.load(Ordering::Relaxed)),
            );
        }
        Reply::ok(h, 0)
    }
}

enum ReadError {
    /// The client closed the connection, or it failed.
    Closed,
    TimedOut,
}

/// Reads what arrives before `deadline` onto `buf`.
fn read_some(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<(), ReadError> {
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::TimedOut);
        }
        // A zero timeout means "none" to the OS; the deadline is never that close here.
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|_| ReadError::Closed)?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err(ReadError::Closed),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(());
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(ReadError::TimedOut);
            }
            Err(_) => return Err(ReadError::Closed),
        }
    }
}

/// A parsed request head.
struct Head {
    method: String,
    path: String,
    /// Bytes of the head in the buffer.
    len: usize,
    keep_alive: bool,
    content_length: Option<usize>,
    transfer_encoding: bool,
    expect_continue: bool,
}

/// The head at the start of `buf`: None while incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, Reply> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(Reply::error(
                431,
                format!("the request head is over {MAX_HEAD_BYTES} bytes"),
            ));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reply::error(
                431,
                format!("more than {MAX_HEADERS} headers"),
            ));
        }
        Err(e) => return Err(Reply::error(400, format!("malformed HTTP request: {e}"))),
    };
    let mut content_length: Option<usize> = None;
    let (mut close, mut keep, mut transfer_encoding, mut expect_continue) =
        (false, false, false, false);
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = value.parse().map_err(|_| {
                Reply::error(400, format!("Content-Length {value:?} is not a byte count"))
            })?;
            if content_length.is_some_and(|m| m != n) {
                return Err(Reply::error(400, "conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',') {
                close |= token.trim().eq_ignore_ascii_case("close");
                keep |= token.trim().eq_ignore_ascii_case("keep-alive");
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    let http11 = req.version == Some(1);
    Ok(Some(Head {
        method: req.method.unwrap_or("").to_string(),
        path: req.path.unwrap_or("").to_string(),
        len,
        keep_alive: !close && (http11 || keep),
        content_length,
        transfer_encoding,
        expect_continue,
    }))
}

fn write_reply(stream: &mut TcpStream, reply: &Reply, keep_alive: bool) -> std::io::Result<()> {
    let body = reply.body.to_string();
    let allow = reply
        .allow
        .map_or(String::new(), |a| format!("Allow: {a}\r\n"));
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{allow}Connection: {}\r\n\r\n",
        reply.status,
        reason(reply.status),
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    stream.write_all(&out)?;
    stream.flush()
}

/// Closes after an error: the reply is sent, then what the client still sends is read and
/// dropped for a moment, so that closing with unread input does not reset the connection before
/// the client has read the reply.
fn linger(stream: &mut TcpStream, max_bytes: usize) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut sink = Vec::new();
    let mut total = 0;
    while total <= max_bytes && read_some(stream, &mut sink, deadline).is_ok() {
        total += sink.len();
        sink.clear();
    }
}

/// One request on `stream` (its first bytes already in `buf`): read, answered, logged. Returns
/// whether the connection stays open for another; the request's bytes are taken off `buf`.
fn exchange(shared: &Shared, stream: &mut TcpStream, buf: &mut Vec<u8>, peer: SocketAddr) -> bool {
    let started = Instant::now();
    let deadline = started + shared.timeout;
    let mut method = String::from("-");
    let mut path = String::from("-");
    let outcome = (|| -> Option<(Reply, bool, usize)> {
        let head = loop {
            match parse_head(buf) {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(reply) => return Some((reply, false, 0)),
            }
            match read_some(stream, buf, deadline) {
                Ok(()) => {}
                Err(ReadError::TimedOut) => {
                    let t = shared.timeout.as_secs();
                    return Some((
                        Reply::error(408, format!("the request head took over {t}s")),
                        false,
                        0,
                    ));
                }
                Err(ReadError::Closed) => return None,
            }
        };
        method.clone_from(&head.method);
        path.clone_from(&head.path);
        let route = head.path.split('?').next().unwrap_or("");
        let post = match route {
            "/health" => false,
            "/get_reward" | "/score" => true,
            _ => {
                return Some((
                    Reply::error(
                        404,
                        format!(
                            "no endpoint {route}: POST /get_reward, POST /score or GET /health"
                        ),
                    ),
                    false,
                    0,
                ));
            }
        };
        let (want, allow) = if post {
            ("POST", "POST")
        } else {
            ("GET", "GET")
        };
        if head.method != want {
            let mut r = Reply::error(
                405,
                format!("{} {route} is not served: use {want}", head.method),
            );
            r.allow = Some(allow);
            return Some((r, false, 0));
        }
        if !post {
            // A GET with a body is answered, but the body is not read: close after it.
            let bodyless = head.content_length.unwrap_or(0) == 0 && !head.transfer_encoding;
            return Some((shared.health(), head.keep_alive && bodyless, head.len));
        }
        if head.transfer_encoding {
            return Some((
                Reply::error(
                    411,
                    "Transfer-Encoding is not supported: send the body with a Content-Length",
                ),
                false,
                0,
            ));
        }
        let Some(length) = head.content_length else {
            return Some((Reply::error(411, "Content-Length is required"), false, 0));
        };
        if length > shared.max_body_bytes {
            return Some((
                Reply::error(
                    413,
                    format!(
                        "the body is {length} bytes, over --max-body-bytes {}",
                        shared.max_body_bytes
                    ),
                ),
                false,
                0,
            ));
        }
        let end = head.len + length;
        if head.expect_continue
            && buf.len() < end
            && stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
        {
            return None;
        }
        while buf.len() < end {
            match read_some(stream, buf, deadline) {
                Ok(()) => {}
                Err(ReadError::TimedOut) => {
                    let t = shared.timeout.as_secs();
                    return Some((
                        Reply::error(
                            408,
                            format!("the body ({length} bytes) did not arrive within {t}s"),
                        ),
                        false,
                        0,
                    ));
                }
                Err(ReadError::Closed) => return None,
            }
        }
        let body = &buf[head.len..end];
        let reply = match route {
            "/get_reward" => shared.get_reward(body),
            _ => shared.score(body),
        }
        .unwrap_or_else(|e| e);
        let keep = head.keep_alive && reply.status < 400;
        Some((reply, keep, end))
    })();
    let Some((reply, keep, consumed)) = outcome else {
        return false;
    };
    let keep = keep && !shared.stopping.load(Ordering::Acquire);
    let written = write_reply(stream, &reply, keep).is_ok();
    shared.requests.fetch_add(1, Ordering::Relaxed);
    if reply.status >= 400 {
        shared.errors.fetch_add(1, Ordering::Relaxed);
    }
    let error = match &reply.body {
        Value::Object(m) if reply.status >= 400 => m
            .get("error")
            .and_then(Value::as_str)
            .map_or(String::new(), |e| format!(" error={e:?}")),
        _ => String::new(),
    };
    eprintln!(
        "{peer} {method} {path} {} n={} {:.1}ms{}{error}",
        reply.status,
        reply.responses,
        started.elapsed().as_secs_f64() * 1e3,
        reply.note
    );
    if keep && written {
        buf.drain(..consumed.min(buf.len()));
        true
    } else {
        if written {
            linger(stream, shared.max_body_bytes);
        }
        false
    }
}

/// Serves requests on one connection until it closes, idles, errs or the server stops.
fn serve_connection(shared: &Shared, mut stream: TcpStream, peer: SocketAddr) {
    let _open = Connection(shared);
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(shared.timeout));
    let mut buf = Vec::new();
    let mut first = true;
    loop {
        if buf.is_empty() {
            let idle = if first {
                shared.timeout
            } else {
                KEEP_ALIVE_IDLE
            };
            if read_some(&mut stream, &mut buf, Instant::now() + idle).is_err() {
                return;
            }
        }
        first = false;
        let Some(_in_flight) = shared.enter() else {
            return;
        };
        if !exchange(shared, &mut stream, &mut buf, peer) {
            return;
        }
    }
}

/// The address that reaches a listener bound to `addr` from this machine.
fn loopback(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// Loads the scorer, listens, and serves until SIGINT or SIGTERM; prints `listening on
/// http://ADDR` as the first line on stdout once it takes requests.
pub fn run(args: &ServeArgs) -> Result<Summary> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.max_items == 0 || args.max_body_bytes == 0 || args.max_connections == 0 {
        bail!("--max-items, --max-body-bytes and --max-connections must be at least 1");
    }
    if args.timeout_s == 0 {
        bail!("--timeout-s must be at least 1");
    }
    if !(args.uncertainty_coef.is_finite() && args.uncertainty_coef >= 0.0) {
        bail!(
            "--uncertainty-coef {}: a number >= 0",
            args.uncertainty_coef
        );
    }
    let device = model::parse_device(&args.device)?;
    let options = ScorerOptions {
        aggregate: args.aggregate,
        uncertainty_coef: args.uncertainty_coef,
        raw: args.raw,
        template: None,
        batch_size: args.batch_size,
        dtype: args.dtype,
    };
    let scorer = Scorer::load(&args.dir, options, &device)?;
    if !args.raw
        && let Some(d) = scorer.unnormalized().first()
    {
        bail!(
            "{}: no reward normalisation stored (rlhf.json); pass --raw for the head's raw output",
            d.display()
        );
    }
    let query = match args.template.as_deref() {
        None => Some(PromptTemplate::identity()),
        Some("stored") => None,
        Some(t) => Some(PromptTemplate::new(t).with_context(|| format!("--template {t:?}"))?),
    };
    let stored = scorer.template();
    let members = scorer.members();
    let specials = Specials::of(&scorer);
    let health = json!({
        "status": "ok",
        "members": members,
        "dir": args.dir.display().to_string(),
        "get_reward_template": query.as_ref().or(stored).map(PromptTemplate::as_str),
        "score_template": stored.map(PromptTemplate::as_str),
        "aggregate": args.aggregate,
        "uncertainty_coef": args.uncertainty_coef,
        "raw": args.raw,
        "batch_size": args.batch_size,
        "max_items": args.max_items,
        "max_body_bytes": args.max_body_bytes,
        "stripped": specials.trailing,
    });
    let engine = Engine {
        scorer,
        query,
        batch_size: args.batch_size,
    };

    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr().context("the listening address")?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("installing the SIGINT / SIGTERM handlers")?;

    let (jobs, pending) = mpsc::channel();
    std::thread::Builder::new()
        .name("scorer".into())
        .spawn(move || engine.run(pending))
        .context("starting the scoring thread")?;
    let shared = Arc::new(Shared {
        jobs,
        specials,
        members,
        health,
        max_body_bytes: args.max_body_bytes,
        max_items: args.max_items,
        timeout: Duration::from_secs(args.timeout_s),
        max_connections: args.max_connections,
        connections: AtomicUsize::new(0),
        stopping: AtomicBool::new(false),
        requests: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        responses: AtomicU64::new(0),
        gate: Mutex::new(Gate::default()),
        drained: Condvar::new(),
    });
    {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for (i, signal) in signals.forever().enumerate() {
                    if i > 0 {
                        eprintln!("signal {signal} again: exiting without waiting");
                        std::process::exit(1);
                    }
                    eprintln!("signal {signal}: finishing the requests in flight, then exiting");
                    shared.stopping.store(true, Ordering::Release);
                    // Wakes the accept below.
                    let _ = TcpStream::connect_timeout(&loopback(addr), Duration::from_secs(1));
                }
            })
            .context("starting the signal thread")?;
    }

    let start = Instant::now();
    eprintln!(
        "serving {} ({members} model(s)): POST /get_reward (OpenRLHF, template {:?}), POST /score (stored template), GET /health; batch size {}",
        args.dir.display(),
        shared.health["get_reward_template"].as_str().unwrap_or(""),
        args.batch_size
    );
    println!("listening on http://{addr}");
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait a moment rather than spin.
                eprintln!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let peer = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        if shared.connections.fetch_add(1, Ordering::AcqRel) >= shared.max_connections {
            shared.connections.fetch_sub(1, Ordering::AcqRel);
            let mut stream = stream;
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let busy = Reply::error(
                503,
                format!(
                    "{} connections open, the most --max-connections allows; retry",
                    shared.max_connections
                ),
            );
            let _ = write_reply(&mut stream, &busy, false);
            eprintln!("{peer} - - 503 n=0 (--max-connections)");
            continue;
        }
        let worker = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                // The count was taken above; the connection's guard gives it back.
                serve_connection(&worker, stream, peer);
            });
        if let Err(e) = spawned {
            shared.connections.fetch_sub(1, Ordering::AcqRel);
            eprintln!("cannot start a connection thread: {e}");
        }
    }
    drop(listener);
    shared.drain();
    Ok(Summary {
        requests: shared.requests.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        responses: shared.responses.load(Ordering::Relaxed),
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specials() -> Specials {
        Specials {
            leading: vec!["<|pad|>".into()],
            trailing: vec!["<|pad|>".into(), "<|endoftext|>".into()],
        }
    }

    #[test]
    fn queries_lose_left_padding_and_trailing_eos_and_pads_and_split_at_their_prompt() {
        let s = specials();
        let body = json!({
            "query": [
                "<|pad|><|pad|>Human: hi\n\nAssistant: hello<|endoftext|><|pad|>",
                "Human: yo\n\nAssistant: hey",
                "<|endoftext|>x<|pad|>",
            ],
            "prompts": ["Human: hi\n\nAssistant:", "something else", "<|pad|>"],
            "labels": [1, 2, 3],
        });
        let q = read_get_reward(&body, &s).unwrap_or_else(|r| panic!("{}", r.body));
        assert_eq!(
            q.items,
            vec![
                ("Human: hi\n\nAssistant:".to_string(), " hello".to_string()),
                // Not its prompt: the whole query is the response.
                (String::new(), "Human: yo\n\nAssistant: hey".to_string()),
                // A leading EOS is kept (only pads are left padding); the prompt strips to "".
                (String::new(), "<|endoftext|>x".to_string()),
            ]
        );
        assert_eq!(q.prompt_found, Some(vec![true, false, true]));
        let q = read_get_reward(&json!({"query": ["a<|endoftext|>"]}), &s)
            .unwrap_or_else(|r| panic!("{}", r.body));
        assert_eq!(q.items, vec![(String::new(), "a".to_string())]);
        assert_eq!(q.prompt_found, None);
    }

    fn error_of(r: Result<impl std::fmt::Debug, Reply>) -> (u16, String) {
        match r {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => (e.status, e.body["error"].as_str().unwrap_or("").to_string()),
        }
    }

    #[test]
    fn bad_requests_say_which_field_is_wrong() {
        let s = specials();
        let (status, e) = error_of(read_get_reward(&json!({"queries": ["a"]}), &s));
        assert_eq!(status, 400);
        assert!(e.contains("`query` is missing"), "{e}");
        let (_, e) = error_of(read_get_reward(&json!({"query": "a"}), &s));
        assert!(e.contains("found a string"), "{e}");
        let (_, e) = error_of(read_get_reward(&json!({"query": ["a", 3]}), &s));
        assert!(e.contains("query[1] is a number"), "{e}");
        let (_, e) = error_of(read_get_reward(
            &json!({"query": ["a", "b"], "prompts": ["a"]}),
            &s,
        ));
        assert!(e.contains("`prompts` has 1 items but `query` has 2"), "{e}");
        let (_, e) = error_of(read_score(&json!({"items": [{"prompt": "p"}]})));
        assert!(e.contains("items[0].response is missing"), "{e}");
        let (_, e) = error_of(read_score(&json!({"items": ["p"]})));
        assert!(e.contains("items[0] must be an object"), "{e}");
        let (status, e) = error_of(parse_body(b"{\"query\": [\"a\""));
        assert_eq!(status, 400);
        assert!(e.contains("not JSON"), "{e}");
        let (_, e) = error_of(parse_body(b"[1]"));
        assert!(e.contains("must be a JSON object, found a list"), "{e}");
    }

    #[test]
    fn request_heads_parse_lengths_and_connection_options() {
        let raw =
            b"POST /get_reward?x=1 HTTP/1.1\r\nContent-Length: 12\r\nExpect: 100-continue\r\n\r\n{";
        let h = parse_head(raw)
            .unwrap_or_else(|r| panic!("{}", r.body))
            .expect("complete");
        assert_eq!(
            (h.method.as_str(), h.path.as_str()),
            ("POST", "/get_reward?x=1")
        );
        assert_eq!(h.content_length, Some(12));
        assert!(h.keep_alive && h.expect_continue && !h.transfer_encoding);
        // The head ends before the body's first byte.
        assert_eq!(h.len, raw.len() - 1);
        let h = parse_head(b"GET /health HTTP/1.0\r\n\r\n")
            .ok()
            .flatten()
            .expect("complete");
        assert!(!h.keep_alive);
        assert!(matches!(
            parse_head(b"GET /health HTTP/1.1\r\nHost: x"),
            Ok(None)
        ));
        let (status, _) = error_of(
            parse_head(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n").map(|h| h.map(|h| h.len)),
        );
        assert_eq!(status, 400);
        let (status, _) =
            error_of(parse_head(b"\x00\x01garbage\r\n\r\n").map(|h| h.map(|h| h.len)));
        assert_eq!(status, 400);
    }
}
