//! `reward serve` end to end: the real binary on a tiny trained ensemble, spoken to over plain
//! TCP. OpenRLHF's `/get_reward` (padded, rendered queries with their prompts) and `/score` give
//! exactly `reward score`'s rewards, also for concurrent clients whose requests are batched
//! together; every kind of bad request gets its status and the server goes on serving; SIGTERM
//! ends it with exit status 0 and a summary.

use e2e::root;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const PAD: &str = "<|pad|>";
const EOS: &str = "<|endoftext|>";
/// Responses per forward, of the server and of `reward score` alike.
const BATCH: &str = "8";

/// A deterministic generator (xorshift) for the synthetic data.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

const WORDS: [&str; 7] = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date"];

fn words(rng: &mut Rng, n: usize) -> String {
    (0..n)
        .map(|_| WORDS[rng.below(WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

/// A tiny ensemble of two reward models (random base, BPE on the data, a few steps each) and the
/// (prompt, response) pairs to score with it.
fn tiny_ensemble(dir: &Path) -> (PathBuf, Vec<(String, String)>) {
    let mut rng = Rng(0x2545F4914F6CDD1D);
    let (mut lines, mut texts) = (String::new(), Vec::new());
    for i in 0..48 {
        let prompt = format!("List some fruit, number {i}.");
        // Ranked by how often they say "apple".
        let responses: Vec<String> = (0..4)
            .map(|k| format!("{} {}", "apple ".repeat(3 - k).trim(), words(&mut rng, 4)))
            .collect();
        texts.push(prompt.clone());
        texts.extend(responses.iter().cloned());
        let row = json!({"prompt_id": format!("p{i}"), "prompt": prompt, "responses": responses, "ranks": [1, 2, 3, 4]});
        lines.push_str(&format!("{row}\n"));
    }
    let data = dir.join("groups.jsonl");
    std::fs::write(&data, lines).unwrap();

    let tok = model::Tokenizer::train_bpe(texts.iter(), 300).unwrap();
    let mut cfg = model::ModelConfig::preset("tiny", tok.vocab_size()).unwrap();
    cfg.set_special_tokens(&tok);
    let device = model::parse_device("cpu").unwrap();
    let base_model = model::CausalLm::new(&cfg, false, 0, &device).unwrap();
    let base = dir.join("base");
    model::save(&base_model, Some(&tok), &base).unwrap();

    let out = dir.join("rm");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reward"));
    cmd.current_dir(root())
        .args(["--config", "configs/reward.toml"]);
    for s in [
        format!("model.base={}", base.display()),
        format!("data.path={}", data.display()),
        format!("out={}", out.display()),
        "data.demonstrations=\"\"".into(),
        "ensemble.members=2".into(),
        "ensemble.monitor=false".into(),
        "train.max_steps=6".into(),
        "train.eval_every=6".into(),
        "train.save_every=6".into(),
    ] {
        cmd.args(["--set", &s]);
    }
    let o = cmd.output().expect("running reward");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rm = out.join("final");
    assert!(rm.join("ensemble.json").exists());

    let mut pairs = Vec::new();
    for i in 0..40 {
        let prompt = format!("List some fruit, number {}.", i % 13);
        let n = 1 + rng.below(12);
        pairs.push((prompt, format!(" {}", words(&mut rng, n))));
    }
    // An empty response and a long one, scored like any other.
    pairs.push(("Say nothing.".into(), String::new()));
    pairs.push(("Talk.".into(), words(&mut rng, 120)));
    (rm, pairs)
}

/// `reward score`'s lines for `pairs` (with `extra` flags).
fn reward_score(dir: &Path, rm: &Path, pairs: &[(String, String)], extra: &[&str]) -> Vec<Value> {
    let input = dir.join("pairs.jsonl");
    let text: String = pairs
        .iter()
        .map(|(p, r)| format!("{}\n", json!({"prompt": p, "response": r})))
        .collect();
    std::fs::write(&input, text).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_reward"))
        .arg("score")
        .arg(rm)
        .arg("--input")
        .arg(&input)
        .args(["--batch-size", BATCH])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

struct Server {
    child: Child,
    stdout: BufReader<ChildStdout>,
    addr: String,
    log: PathBuf,
}

impl Server {
    fn start(rm: &Path, log: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_reward"))
            .arg("serve")
            .arg(rm)
            .args(["--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| {
                panic!(
                    "first line {line:?}; stderr: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            })
            .to_string();
        Server {
            child,
            stdout,
            addr,
            log: log.to_path_buf(),
        }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s
    }

    /// Sends `raw` on a new connection and reads one reply (status, headers, body).
    fn raw(&self, raw: &[u8]) -> (u16, String, Value) {
        let mut s = self.connect();
        // The server may answer (413, 400) and stop reading before all is sent.
        let _ = s.write_all(raw);
        read_reply(&mut s)
    }

    fn request(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let (status, _, v) = self.raw(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        (status, v)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.request("POST", path, &body.to_string())
    }

    /// SIGTERM; the exit status and the last line on stdout.
    fn terminate(&mut self) -> (std::process::ExitStatus, String) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "still running 30 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        (status, rest.lines().last().unwrap_or("").to_string())
    }
}

/// One HTTP reply from `s`: (status, head, JSON body), the body by its Content-Length.
/// A failed test leaves no server behind.
impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_reply(s: &mut TcpStream) -> (u16, String, Value) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            other => panic!(
                "connection ended inside a reply head ({other:?}): {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    let head = String::from_utf8(buf).unwrap();
    let status: u16 = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("a Content-Length")
        .parse()
        .unwrap();
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).unwrap();
    (status, head, serde_json::from_slice(&body).unwrap())
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// The same rewards, to the bit: the server scored the same sequences in the same forwards as
/// `reward score` (one request holding all of them, the same `--batch-size`).
fn assert_same(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got, want, "{what}");
}

/// The same rewards up to float rounding: scored in other forwards than `reward score`'s (other
/// requests batched with them, so other padding), which moves a reward by a few f32 ulps (up to
/// 2.3e-6 on the demo ensemble, whose members' rewards are ~5).
fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{what} {i}: {a} vs {b}"
        );
    }
}

/// An OpenRLHF request for `pairs`: each query left-padded and ended with EOS and pads, as a
/// client decodes its sequences with special tokens, and the prompts rendered with `template`.
fn openrlhf_request(pairs: &[(String, String)], template: &str) -> Value {
    let prompts: Vec<String> = pairs
        .iter()
        .map(|(p, _)| template.replace("{prompt}", p))
        .collect();
    let queries: Vec<String> = prompts
        .iter()
        .zip(pairs)
        .enumerate()
        .map(|(i, (p, (_, r)))| format!("{}{p}{r}{EOS}{}", PAD.repeat(i % 3), PAD.repeat(i % 2)))
        .collect();
    json!({"query": queries, "prompts": prompts, "labels": vec![0; pairs.len()]})
}

#[test]
fn openrlhf_and_score_requests_equal_reward_score_bad_requests_fail_alone_and_sigterm_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rm, pairs) = tiny_ensemble(dir);
    let expected = reward_score(dir, &rm, &pairs, &[]);
    let want: Vec<f64> = expected
        .iter()
        .map(|l| l["reward"].as_f64().unwrap())
        .collect();
    let want_std: Vec<f64> = expected
        .iter()
        .map(|l| l["std"].as_f64().unwrap())
        .collect();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(rm.join("member-0/rlhf.json")).unwrap())
            .unwrap();
    let template = meta["prompt_template"].as_str().unwrap().to_string();
    assert!(template.contains("{prompt}") && template != "{prompt}");

    let mut server = Server::start(
        &rm,
        &dir.join("serve.log"),
        &[
            "--max-body-bytes",
            "65536",
            "--batch-size",
            BATCH,
            "--timeout-s",
            "2",
        ],
    );
    let (status, health) = server.request("GET", "/health", "");
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    assert_eq!(health["members"], json!(2));

    // OpenRLHF: rendered, padded queries with their prompts.
    let (status, r) = server.post("/get_reward", &openrlhf_request(&pairs, &template));
    assert_eq!(status, 200, "{r}");
    assert_same(&floats(&r["rewards"]), &want, "/get_reward reward");
    assert_eq!(r["rewards"], r["scores"]);
    assert_eq!(
        floats(&r["extra_logs"]["prompt_found"]),
        vec![1.0; pairs.len()]
    );
    assert_same(
        &floats(&r["extra_logs"]["reward_member_std"]),
        &want_std,
        "member std",
    );

    // Without prompts the whole query is the response, its prompt empty: as `reward score` with
    // the identity template and empty prompts.
    let bare: Vec<(String, String)> = pairs
        .iter()
        .map(|(p, r)| {
            (
                String::new(),
                format!("{}{r}", template.replace("{prompt}", p)),
            )
        })
        .collect();
    let bare_want: Vec<f64> = reward_score(dir, &rm, &bare, &["--template", "{prompt}"])
        .iter()
        .map(|v| v["reward"].as_f64().unwrap())
        .collect();
    let queries: Vec<String> = bare.iter().map(|(_, r)| format!("{PAD}{r}{EOS}")).collect();
    let (status, r) = server.post("/get_reward", &json!({ "query": queries }));
    assert_eq!(status, 200, "{r}");
    assert_same(
        &floats(&r["rewards"]),
        &bare_want,
        "/get_reward without prompts",
    );
    assert!(r["extra_logs"].get("prompt_found").is_none());

    // Our own endpoint: the stored template, members and std as `reward score` writes them.
    let items: Vec<Value> = pairs
        .iter()
        .map(|(p, r)| json!({"prompt": p, "response": r}))
        .collect();
    let (status, r) = server.post("/score", &json!({ "items": items }));
    assert_eq!(status, 200, "{r}");
    assert_same(&floats(&r["rewards"]), &want, "/score reward");
    assert_same(&floats(&r["std"]), &want_std, "/score std");
    for (i, line) in expected.iter().enumerate() {
        assert_same(
            &floats(&r["members"][i]),
            &floats(&line["members"]),
            "/score members",
        );
    }

    // Concurrent clients, batched together by the scoring thread, each get their own rewards.
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|c| {
                let (server, pairs, want, template) = (&server, &pairs, &want, &template);
                s.spawn(move || {
                    for round in 0..3 {
                        let idx: Vec<usize> = (0..pairs.len())
                            .filter(|i| (i + c + round) % 5 == 0)
                            .collect();
                        let sub: Vec<(String, String)> =
                            idx.iter().map(|&i| pairs[i].clone()).collect();
                        let (status, r) =
                            server.post("/get_reward", &openrlhf_request(&sub, template));
                        assert_eq!(status, 200, "{r}");
                        let w: Vec<f64> = idx.iter().map(|&i| want[i]).collect();
                        assert_close(&floats(&r["rewards"]), &w, "concurrent /get_reward");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });

    // Two requests on one keep-alive connection, sent at once.
    let one = |i: usize| {
        let body = openrlhf_request(&pairs[i..i + 1], &template).to_string();
        format!(
            "POST /get_reward HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let mut s = server.connect();
    s.write_all(format!("{}{}", one(3), one(4)).as_bytes())
        .unwrap();
    for i in [3, 4] {
        let (status, head, r) = read_reply(&mut s);
        assert_eq!(status, 200, "{r}");
        assert!(head.contains("Connection: keep-alive"), "{head}");
        assert_close(&floats(&r["rewards"]), &want[i..i + 1], "keep-alive");
    }
    drop(s);

    // Bad requests: each its status and a message naming the problem; then a good one still works.
    let good = openrlhf_request(&pairs[..2], &template);
    let still_serving = |after: &str| {
        let (status, r) = server.post("/get_reward", &good);
        assert_eq!(status, 200, "after {after}: {r}");
        assert_close(&floats(&r["rewards"]), &want[..2], after);
    };
    let big = "x".repeat(70_000);
    let cases: Vec<(&str, u16, &str, Vec<u8>)> = vec![
        (
            "bad JSON",
            400,
            "not JSON",
            post_bytes("/get_reward", "{\"query\": [\"a\""),
        ),
        (
            "query a number",
            400,
            "`query` must be a list of strings",
            post_bytes("/get_reward", r#"{"query": 5}"#),
        ),
        (
            "query item a number",
            400,
            "query[1] is a number",
            post_bytes("/get_reward", r#"{"query": ["a", 1]}"#),
        ),
        (
            "no query",
            400,
            "`query` is missing",
            post_bytes("/get_reward", r#"{"prompts": ["a"]}"#),
        ),
        (
            "prompts too short",
            400,
            "`prompts` has 1 items but `query` has 2",
            post_bytes("/get_reward", r#"{"query": ["a", "b"], "prompts": ["a"]}"#),
        ),
        (
            "items not objects",
            400,
            "items[0] must be an object",
            post_bytes("/score", r#"{"items": ["a"]}"#),
        ),
        (
            "oversized body",
            413,
            "over --max-body-bytes 65536",
            post_bytes("/get_reward", &format!(r#"{{"query": ["{big}"]}}"#)),
        ),
        (
            "unknown path",
            404,
            "no endpoint /reward",
            post_bytes("/reward", "{}"),
        ),
        (
            "wrong method",
            405,
            "use POST",
            b"GET /get_reward HTTP/1.1\r\nHost: test\r\n\r\n".to_vec(),
        ),
        (
            "no Content-Length",
            411,
            "Content-Length is required",
            b"POST /score HTTP/1.1\r\nHost: test\r\n\r\n{}".to_vec(),
        ),
        (
            "chunked body",
            411,
            "Transfer-Encoding is not supported",
            b"POST /score HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
                .to_vec(),
        ),
        (
            "not HTTP",
            400,
            "malformed HTTP request",
            b"\x00\xff\x13 hello\r\n\r\n".to_vec(),
        ),
        (
            "invalid UTF-8",
            400,
            "not JSON",
            [
                b"POST /score HTTP/1.1\r\nContent-Length: 15\r\n\r\n{\"items\": \"".as_slice(),
                b"\xff\xfe\"}",
            ]
            .concat(),
        ),
    ];
    for (what, status, message, raw) in cases {
        let (got, head, r) = server.raw(&raw);
        assert_eq!(got, status, "{what}: {r}");
        let e = r["error"].as_str().unwrap_or_else(|| panic!("{what}: {r}"));
        assert!(e.contains(message), "{what}: {e}");
        if status == 405 {
            assert!(head.contains("Allow: POST"), "{head}");
        }
        still_serving(what);
    }
    // Empty lists are fine.
    let (status, r) = server.post("/get_reward", &json!({"query": []}));
    assert_eq!((status, r["rewards"].clone()), (200, json!([])));

    // A client that stops half-way through its request head gets 408 after --timeout-s, and the
    // server answers others meanwhile.
    let mut slow = server.connect();
    slow.write_all(b"POST /get_reward HTTP/1.1\r\nContent-Le")
        .unwrap();
    still_serving("a stalled client");
    let started = Instant::now();
    let (status, _, r) = read_reply(&mut slow);
    assert_eq!(status, 408, "{r}");
    assert!(started.elapsed() < Duration::from_secs(10));

    let (exit, summary) = server.terminate();
    assert!(exit.success(), "exit {exit:?}");
    assert!(summary.starts_with("stopped: "), "{summary}");
    assert!(summary.contains("errors)"), "{summary}");
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("POST /get_reward 200 n=42 ")),
        "{log}"
    );
}

fn post_bytes(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A single model's `/score` has only rewards, `--template stored` makes `/get_reward` render
/// the prompts itself, and SIGINT stops it as SIGTERM does.
#[test]
fn a_single_model_scores_with_its_stored_template_and_stops_on_sigint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rm, pairs) = tiny_ensemble(dir);
    let member = rm.join("member-1");
    let want: Vec<f64> = reward_score(dir, &member, &pairs, &[])
        .iter()
        .map(|l| l["reward"].as_f64().unwrap())
        .collect();
    let mut server = Server::start(
        &member,
        &dir.join("serve.log"),
        &["--template", "stored", "--batch-size", BATCH],
    );
    let items: Vec<Value> = pairs
        .iter()
        .map(|(p, r)| json!({"prompt": p, "response": r}))
        .collect();
    let (status, r) = server.post("/score", &json!({ "items": items }));
    assert_eq!(status, 200, "{r}");
    assert_same(&floats(&r["rewards"]), &want, "/score");
    assert!(r.get("members").is_none() && r.get("std").is_none(), "{r}");
    // The raw prompts, rendered by the server with the stored template.
    let queries: Vec<String> = pairs.iter().map(|(p, r)| format!("{p}{r}{EOS}")).collect();
    let prompts: Vec<&String> = pairs.iter().map(|(p, _)| p).collect();
    let (status, r) = server.post(
        "/get_reward",
        &json!({"query": queries, "prompts": prompts}),
    );
    assert_eq!(status, 200, "{r}");
    assert_same(
        &floats(&r["rewards"]),
        &want,
        "/get_reward --template stored",
    );
    assert_eq!(
        r["extra_logs"],
        json!({"prompt_found": vec![1.0; pairs.len()]})
    );

    let st = Command::new("kill")
        .args(["-INT", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let exit = server.child.wait().unwrap();
    assert!(exit.success(), "exit {exit:?}");
    let mut rest = String::new();
    server.stdout.read_to_string(&mut rest).unwrap();
    assert!(
        rest.contains("stopped: 2 requests (0 errors), 84 responses scored"),
        "{rest}"
    );
}
