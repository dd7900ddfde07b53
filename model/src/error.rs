//! Errors of the model crate: every variant names the file and the key or tensor at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: cannot read file")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Json { path: PathBuf, msg: String },
    #[error("{path}: key `{key}` {msg}")]
    ConfigKey {
        path: PathBuf,
        key: String,
        msg: String,
    },
    #[error("{path}: unknown model_type `{model_type}`; supported: llama, mistral, qwen2, gpt2")]
    UnknownModelType { path: PathBuf, model_type: String },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {dtype}; supported: F32, BF16, F16")]
    TensorDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{path}: invalid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error(
        "{path}: tensor `{name}` holds {value} (its value {index}, counting from 0, and {count} non-finite in all): \
         the weights are corrupt (a diverged run can save NaN); load an earlier checkpoint of the run, or the model it started from"
    )]
    NonFinite {
        path: PathBuf,
        name: String,
        value: f32,
        index: usize,
        count: usize,
    },
    #[error("{path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error(
        "{path}: tokenizer has {tokenizer_vocab} tokens but the model's vocab_size is {model_vocab}; \
         use the tokenizer the model was trained with, or a model with a larger vocabulary"
    )]
    VocabMismatch {
        path: PathBuf,
        tokenizer_vocab: usize,
        model_vocab: usize,
    },
    #[error("{}the model has no {head}: {hint}", if path.as_os_str().is_empty() { String::new() } else { format!("{}: ", path.display()) })]
    MissingHead {
        path: PathBuf,
        head: &'static str,
        hint: String,
    },
    #[error("unknown model preset `{0}`; available: tiny, mini, small, medium, large")]
    UnknownPreset(String),
    #[error("invalid device `{0}`: {1}")]
    Device(String, String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ModelError {
    let path = path.into();
    move |source| ModelError::Io { path, source }
}
