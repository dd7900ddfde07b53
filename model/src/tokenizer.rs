//! Tokenizer: a `tokenizer.json` loaded with the `tokenizers` crate, or a new byte-level BPE trained
//! on the run's texts; the special tokens (bos / eos / pad) the pipeline needs; and the prompt
//! template that turns a user prompt into model input.

use crate::error::{ModelError, Result, io_err};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer, TokenizerImpl};

/// End of text (and start) token of new tokenizers.
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// Padding token of new tokenizers.
pub const PAD_TOKEN: &str = "<|pad|>";

#[derive(Clone)]
pub struct Tokenizer {
    inner: HfTokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: u32,
    pub pad_id: u32,
    /// tokenizer_config.json of the source folder, written back on save.
    config: Option<Value>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

fn tok_err(path: &Path, msg: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// The content of a special-token entry in tokenizer_config.json (a string or `{content: ..}`).
fn special_content(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`. Special ids come from, in order: the arguments (the model's
    /// config.json), `tokenizer_config.json` beside the file, then well-known token strings.
    pub fn from_file(
        path: &Path,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
        pad_id: Option<u32>,
    ) -> Result<Self> {
        if !path.exists() {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let inner = HfTokenizer::from_file(path).map_err(|e| tok_err(path, e))?;
        let config_path = path.with_file_name("tokenizer_config.json");
        let config: Option<Value> = match std::fs::read_to_string(&config_path) {
            Ok(t) => Some(serde_json::from_str(&t).map_err(|e| ModelError::Json {
                path: config_path.clone(),
                msg: format!("not valid JSON: {e}"),
            })?),
            Err(_) => None,
        };
        let from_config = |key: &str| {
            special_content(config.as_ref().and_then(|c| c.get(key)))
                .and_then(|s| inner.token_to_id(&s))
        };
        let known = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let eos_id = eos_id
            .or_else(|| from_config("eos_token"))
            .or_else(|| known(&[EOS_TOKEN, "</s>", "<|im_end|>", "<eos>"]))
            .ok_or_else(|| {
                tok_err(
                    path,
                    "no end-of-sequence token: set eos_token_id in config.json or eos_token in tokenizer_config.json",
                )
            })?;
        let bos_id = bos_id
            .or_else(|| from_config("bos_token"))
            .or_else(|| known(&["<s>", "<|begin_of_text|>", "<bos>"]));
        let pad_id = pad_id
            .or_else(|| from_config("pad_token"))
            .or_else(|| known(&[PAD_TOKEN, "<pad>", "<|pad|>"]))
            .unwrap_or(eos_id);
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            pad_id,
            config,
        })
    }

    /// Trains a byte-level BPE (GPT-2 style) of `vocab_size` tokens (special tokens included) on
    /// `texts`. Token 0 is `<|endoftext|>` (bos and eos), token 1 `<|pad|>`.
    pub fn train_bpe<I, S>(texts: I, vocab_size: usize) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let specials = vec![
            AddedToken::from(EOS_TOKEN, true),
            AddedToken::from(PAD_TOKEN, true),
        ];
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut tk: TokenizerImpl<
            BPE,
            tokenizers::normalizers::Lowercase,
            ByteLevel,
            ByteLevel,
            ByteLevel,
        > = TokenizerImpl::new(BPE::default());
        tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tk.with_decoder(Some(ByteLevel::default()));
        tk.with_post_processor(Some(ByteLevel::new(false, true, true)));
        tk.with_normalizer(None::<tokenizers::normalizers::Lowercase>);
        tk.train(&mut trainer, texts)
            .map_err(|e| ModelError::Invalid(format!("training the BPE tokenizer failed: {e}")))?;
        // Convert to the dynamic tokenizer through its JSON form.
        let json = tk
            .to_string(false)
            .map_err(|e| ModelError::Invalid(format!("serialising the tokenizer failed: {e}")))?;
        let inner: HfTokenizer = json
            .parse()
            .map_err(|e| ModelError::Invalid(format!("re-reading the tokenizer failed: {e}")))?;
        let eos_id = inner.token_to_id(EOS_TOKEN).expect("special token added");
        let pad_id = inner.token_to_id(PAD_TOKEN).expect("special token added");
        Ok(Self {
            inner,
            bos_id: Some(eos_id),
            eos_id,
            pad_id,
            config: None,
        })
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, without special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Invalid(format!("tokenizing failed: {e}")))
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Invalid(format!("decoding failed: {e}")))
    }

    /// Whether `other` gives the same ids (same vocabulary size, special tokens and encoding of
    /// a probe text), so that token-level log-probabilities and values of one apply to the other.
    pub fn same_ids(&self, other: &Tokenizer) -> bool {
        let probe = "The quick brown fox, 12 + 7 = 19. 你好！\n\nHuman: Assistant:";
        self.vocab_size() == other.vocab_size()
            && self.eos_id == other.eos_id
            && self.pad_id == other.pad_id
            && self.encode(probe).ok() == other.encode(probe).ok()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.inner
            .save(&path, false)
            .map_err(|e| tok_err(&path, format!("cannot write: {e}")))?;
        let tok = |id: Option<u32>| {
            id.and_then(|i| self.inner.id_to_token(i))
                .map_or(Value::Null, Value::String)
        };
        let mut cfg = match &self.config {
            Some(Value::Object(m)) => m.clone(),
            _ => serde_json::Map::new(),
        };
        cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        cfg.insert("bos_token".into(), tok(self.bos_id));
        cfg.insert("eos_token".into(), tok(Some(self.eos_id)));
        cfg.insert("pad_token".into(), tok(Some(self.pad_id)));
        cfg.entry("clean_up_tokenization_spaces")
            .or_insert(json!(false));
        let cpath = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&Value::Object(cfg)).expect("JSON value");
        std::fs::write(&cpath, text).map_err(io_err(&cpath))
    }
}

/// Turns a prompt into model input, e.g. `"Human: {prompt}\n\nAssistant:"`. The template must
/// contain `{prompt}` once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptTemplate(String);

impl PromptTemplate {
    pub fn new(template: &str) -> Result<Self> {
        if template.matches("{prompt}").count() != 1 {
            return Err(ModelError::Invalid(format!(
                "prompt template {template:?} must contain `{{prompt}}` exactly once"
            )));
        }
        Ok(Self(template.to_string()))
    }

    /// The template that passes the prompt through unchanged.
    pub fn identity() -> Self {
        Self("{prompt}".into())
    }

    pub fn render(&self, prompt: &str) -> String {
        self.0.replace("{prompt}", prompt)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Path of `tokenizer.json` inside a model folder.
pub fn tokenizer_path(dir: &Path) -> PathBuf {
    dir.join("tokenizer.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_bpe_round_trips_text_and_has_specials() {
        let texts = [
            "the cat sat on the mat",
            "the dog sat on the log",
            "café 東京 ünïcode",
        ];
        let texts: Vec<String> = texts
            .iter()
            .cycle()
            .take(60)
            .map(|s| s.to_string())
            .collect();
        let tk = Tokenizer::train_bpe(texts.iter(), 300).unwrap();
        assert_eq!(tk.eos_id, 0);
        assert_eq!(tk.pad_id, 1);
        assert!(tk.vocab_size() <= 300 && tk.vocab_size() > 256);
        for t in ["the cat sat", "café 東京 ünïcode", "  spaces\nand\ttabs "] {
            let ids = tk.encode(t).unwrap();
            assert_eq!(tk.decode(&ids).unwrap(), t);
        }
        // Merges learned: a frequent word is one token.
        assert_eq!(tk.encode(" the").unwrap().len(), 1);
    }

    #[test]
    fn template_requires_one_placeholder() {
        let t = PromptTemplate::new("Human: {prompt}\n\nAssistant:").unwrap();
        assert_eq!(t.render("hi"), "Human: hi\n\nAssistant:");
        assert!(PromptTemplate::new("no placeholder").is_err());
        assert!(PromptTemplate::new("{prompt}{prompt}").is_err());
    }
}
