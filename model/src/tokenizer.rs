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

/// A new BPE is trained on the texts in order until this many bytes are reached (the rest are
/// left out)...
pub const BPE_MAX_BYTES: usize = 16 << 20;
/// ...and on at most the first this many bytes of each text...
pub const BPE_MAX_TEXT_BYTES: usize = 16 << 10;
/// ...split where a run of one kind of character (letters, digits, spaces, others) would grow
/// longer than this many characters.
pub const BPE_MAX_RUN_CHARS: usize = 128;

/// The texts a new BPE is trained on: each cut to its first [`BPE_MAX_TEXT_BYTES`] (at a
/// character boundary), taken in order until [`BPE_MAX_BYTES`], and split inside runs longer
/// than [`BPE_MAX_RUN_CHARS`]. Byte-pair training rescans every word a merged pair occurs in, at
/// every merge, and a run of letters (or digits) is one word to the pre-tokenizer: one pasted
/// 10 MB document kept it busy for over ten minutes, and 300 blobs of 16 KB of letters for 20 s
/// (6 s split into runs; 16 MiB of such blobs, the worst the bounds let through, 30 s on 2 cores).
/// Texts under the bounds, as ordinary text is, are used whole as they always were.
#[derive(Clone, Debug, Default)]
pub struct BpeCorpus {
    texts: Vec<String>,
    /// Bytes of text kept.
    pub bytes: usize,
    /// Texts cut to their first [`BPE_MAX_TEXT_BYTES`].
    pub cut: usize,
    /// Texts left out once [`BPE_MAX_BYTES`] were reached.
    pub left_out: usize,
    /// Texts split inside a run longer than [`BPE_MAX_RUN_CHARS`].
    pub split: usize,
}

/// The kind of a character, as the byte-level pre-tokenizer groups them into words.
fn char_kind(c: char) -> u8 {
    if c.is_alphabetic() {
        0
    } else if c.is_numeric() {
        1
    } else if c.is_whitespace() {
        2
    } else {
        3
    }
}

/// `text` in pieces, split where a run of one kind of character would grow longer than
/// [`BPE_MAX_RUN_CHARS`]; one piece (the text) when it has no such run.
fn split_long_runs(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let (mut start, mut run, mut kind) = (0, 0, u8::MAX);
    for (i, c) in text.char_indices() {
        let k = char_kind(c);
        if k != kind {
            (kind, run) = (k, 0);
        } else if run == BPE_MAX_RUN_CHARS {
            pieces.push(&text[start..i]);
            (start, run) = (i, 0);
        }
        run += 1;
    }
    pieces.push(&text[start..]);
    pieces
}

impl BpeCorpus {
    pub fn new<I, S>(texts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut corpus = Self::default();
        for t in texts {
            let t = t.as_ref();
            if corpus.bytes >= BPE_MAX_BYTES {
                corpus.left_out += 1;
                continue;
            }
            let mut end = t.len().min(BPE_MAX_TEXT_BYTES);
            while !t.is_char_boundary(end) {
                end -= 1;
            }
            if end < t.len() {
                corpus.cut += 1;
            }
            corpus.bytes += end;
            let pieces = split_long_runs(&t[..end]);
            if pieces.len() > 1 {
                corpus.split += 1;
            }
            corpus.texts.extend(pieces.into_iter().map(str::to_string));
        }
        corpus
    }

    /// Texts kept (cut ones included; a split one counts its pieces).
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }
}

#[derive(Clone)]
pub struct Tokenizer {
    inner: HfTokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: u32,
    pub pad_id: u32,
    /// tokenizer_config.json of the source folder, written back on save.
    config: Option<Value>,
    /// See [`Tokenizer::max_token_bytes`].
    max_token_bytes: usize,
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

/// An upper bound on the bytes of text one token of `inner` stands for: its longest vocabulary
/// entry (special tokens included) in UTF-8 bytes, which is at least the bytes it covers for a
/// byte-level BPE (one character per byte) and for SentencePiece (`▁` for a space, `<0x0A>` for a
/// byte); four times that where a normalizer may shrink the text first (NFKC maps some 4-byte
/// characters to one byte).
fn longest_token_bytes(inner: &HfTokenizer) -> usize {
    let longest = inner
        .get_vocab(true)
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(1)
        .max(1);
    if inner.get_normalizer().is_some() {
        4 * longest
    } else {
        longest
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
            max_token_bytes: longest_token_bytes(&inner),
            inner,
            bos_id,
            eos_id,
            pad_id,
            config,
        })
    }

    /// Trains a byte-level BPE (GPT-2 style) of `vocab_size` tokens (special tokens included) on
    /// `texts`, within the bounds of [`BpeCorpus`]. Token 0 is `<|endoftext|>` (bos and eos),
    /// token 1 `<|pad|>`.
    pub fn train_bpe<I, S>(texts: I, vocab_size: usize) -> Result<Self>
    where
        I: Iterator<Item = S>,
        S: AsRef<str>,
    {
        Self::train_bpe_on(&BpeCorpus::new(texts), vocab_size)
    }

    /// [`Tokenizer::train_bpe`] on a corpus already bounded (whose counts a caller reports).
    pub fn train_bpe_on(corpus: &BpeCorpus, vocab_size: usize) -> Result<Self> {
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
        tk.train(&mut trainer, corpus.texts.iter())
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
            max_token_bytes: longest_token_bytes(&inner),
            inner,
            bos_id: Some(eos_id),
            eos_id,
            pad_id,
            config: None,
        })
    }

    /// At most how many bytes of text one token stands for: a text of more than `n` times this
    /// many bytes has more than `n` tokens, which callers use to drop what cannot fit without
    /// tokenizing it (tokenizing 10 MB takes seconds and gigabytes).
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
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

    /// Sets the `chat_template` that [`Tokenizer::save`] writes into tokenizer_config.json (the
    /// template a model was trained with, so transformers and later stages render the same way).
    pub fn set_chat_template(&mut self, source: &str) {
        let mut cfg = match self.config.take() {
            Some(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        cfg.insert("chat_template".into(), json!(source));
        self.config = Some(Value::Object(cfg));
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

    /// `render(prompt).len()`, without rendering.
    pub fn rendered_len(&self, prompt: &str) -> usize {
        self.0.len() - "{prompt}".len() + prompt.len()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Path of `tokenizer.json` inside a model folder.
pub fn tokenizer_path(dir: &Path) -> PathBuf {
    dir.join("tokenizer.json")
}

/// The smallest vocabulary [`Tokenizer::train_bpe`] can build: the 256 byte-level symbols and the
/// two special tokens (EOS and padding). A smaller `vocab_size` would be silently raised to it.
pub const MIN_BPE_VOCAB: usize = 258;

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
    fn bpe_corpus_cuts_long_texts_and_stops_at_its_budget() {
        // 3 bytes a unit (a 2-byte letter and a comma), so no long runs.
        let long = "é,".repeat(BPE_MAX_TEXT_BYTES);
        let corpus = BpeCorpus::new(["short", long.as_str()]);
        assert_eq!(
            (corpus.len(), corpus.cut, corpus.left_out, corpus.split),
            (2, 1, 0, 0)
        );
        // Cut at the character boundary below the limit: 16384 = 3 · 5461 + 1 is inside an é.
        assert_eq!(corpus.texts[1].len(), BPE_MAX_TEXT_BYTES - 1);
        assert_eq!(corpus.bytes, 5 + BPE_MAX_TEXT_BYTES - 1);
        // Texts are taken until the budget is reached: the one that reaches it is the last.
        let text = "ab ".repeat(BPE_MAX_TEXT_BYTES / 3);
        let kept = BPE_MAX_BYTES.div_ceil(text.len());
        let corpus = BpeCorpus::new(std::iter::repeat_n(text.as_str(), kept + 5));
        assert_eq!((corpus.len(), corpus.left_out), (kept, 5));
        assert_eq!(corpus.bytes, kept * text.len());
        assert_eq!((corpus.cut, corpus.split), (0, 0));
    }

    #[test]
    fn bpe_corpus_splits_runs_longer_than_its_limit_only() {
        let word = "é".repeat(BPE_MAX_RUN_CHARS);
        let text = format!("the {word} 1234 ...");
        assert_eq!(split_long_runs(&text), vec![text.as_str()]);
        let text = format!("a {word}b{word}12");
        let pieces = split_long_runs(&text);
        assert_eq!(pieces.concat(), text);
        // The runs: "a", " ", é x 128 + "b" + é x 128 (257 letters), "12".
        assert_eq!(pieces.len(), 3, "{pieces:?}");
        assert_eq!(pieces[0], format!("a {word}"));
        assert_eq!(
            pieces[1],
            format!("b{}", &word[..2 * (BPE_MAX_RUN_CHARS - 1)])
        );
        let corpus = BpeCorpus::new([text.as_str(), "plain text"]);
        assert_eq!((corpus.split, corpus.cut, corpus.len()), (1, 0, 4));
    }

    #[test]
    fn no_token_stands_for_more_bytes_than_max_token_bytes() {
        let texts: Vec<String> = (0..60)
            .map(|i| format!("the cat sat on the mat {i} café 東京 <|endoftext|>"))
            .collect();
        let tk = Tokenizer::train_bpe(texts.iter(), 300).unwrap();
        // Entries are in the byte-level alphabet, one character per byte (of 1 or 2 UTF-8 bytes):
        // ` 東京` (7 bytes) is an entry of 14, longer than `<|endoftext|>` (13). An overestimate
        // is safe: it only lets more text through to the tokenizer.
        assert_eq!(tk.max_token_bytes(), 14);
        for t in &texts {
            let ids = tk.encode(t).unwrap();
            for id in ids {
                let text = tk.inner.decode(&[id], false).unwrap();
                assert!(text.len() <= tk.max_token_bytes(), "{text:?}");
            }
        }
        let tpl = PromptTemplate::new("Human: {prompt}\n\nAssistant:").unwrap();
        assert_eq!(tpl.rendered_len("hi 東京"), tpl.render("hi 東京").len());
    }

    #[test]
    fn template_requires_one_placeholder() {
        let t = PromptTemplate::new("Human: {prompt}\n\nAssistant:").unwrap();
        assert_eq!(t.render("hi"), "Human: hi\n\nAssistant:");
        assert!(PromptTemplate::new("no placeholder").is_err());
        assert!(PromptTemplate::new("{prompt}{prompt}").is_err());
    }
}
