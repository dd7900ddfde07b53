//! What the `model` binary's test files share: a tiny saved model folder and running the binary.

use model::{CausalLm, ModelConfig, Tokenizer, parse_device, save};
use std::path::Path;
use std::process::Command;

/// A tiny from-scratch model with a trained tokenizer, saved as a model folder.
pub fn tiny_model_folder(dir: &Path) -> Tokenizer {
    let texts: Vec<String> = [
        "Human: what is two plus two?\n\nAssistant: four.",
        "Human: name a colour.\n\nAssistant: blue.",
        "Human: say hello.\n\nAssistant: hello there!",
    ]
    .iter()
    .cycle()
    .take(30)
    .map(|s| s.to_string())
    .collect();
    let tok = Tokenizer::train_bpe(texts.iter(), 320).unwrap();
    let mut cfg = ModelConfig::preset("tiny", tok.vocab_size()).unwrap();
    cfg.eos_token_id = Some(tok.eos_id);
    let device = parse_device("cpu").unwrap();
    let m = CausalLm::new(&cfg, false, 3, &device).unwrap();
    save(&m, Some(&tok), dir).unwrap();
    tok
}

/// Runs the `model` binary with `args`: (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_model"))
        .args(args)
        .output()
        .expect("running model");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
