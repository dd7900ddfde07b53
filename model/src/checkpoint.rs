//! Checkpoints are Hugging Face model folders: `config.json`, `model.safetensors` (or shards with
//! `model.safetensors.index.json`) and `tokenizer.json`. What we save loads with
//! `transformers.AutoModelForCausalLM.from_pretrained(dir)` (or `AutoModelForSequenceClassification`
//! for a model with a scalar head).

use crate::config::ModelConfig;
use crate::error::{ModelError, Result, io_err};
use crate::tokenizer::{Tokenizer, tokenizer_path};
use crate::transformer::CausalLm;
use crate::weights::{SafetensorsFiles, write_safetensors};
use burn::tensor::Device;
use std::path::{Path, PathBuf};

/// A loaded model folder.
pub struct Loaded {
    pub model: CausalLm,
    /// None when the folder has no tokenizer.json.
    pub tokenizer: Option<Tokenizer>,
    /// Dtypes of the weight files, e.g. `["BF16"]`.
    pub file_dtypes: Vec<String>,
}

/// Loads the model folder `dir`. The scalar head is read when config.json names a
/// `*ForSequenceClassification` architecture.
pub fn load(dir: &Path, device: &Device) -> Result<Loaded> {
    if !dir.is_dir() {
        return Err(ModelError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "model folder not found (expected config.json, model.safetensors, tokenizer.json)",
            ),
        });
    }
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let files = SafetensorsFiles::open(dir)?;
    let scalar_head = config.declares_scalar_head();
    let model = CausalLm::from_safetensors(&config, &files, scalar_head, device)?;
    let tok_path = tokenizer_path(dir);
    let tokenizer = if tok_path.exists() {
        let t = Tokenizer::from_file(
            &tok_path,
            config.bos_token_id,
            config.eos_token_id,
            config.pad_token_id,
        )?;
        if t.vocab_size() > config.vocab_size {
            return Err(ModelError::VocabMismatch {
                path: tok_path,
                tokenizer_vocab: t.vocab_size(),
                model_vocab: config.vocab_size,
            });
        }
        Some(t)
    } else {
        None
    };
    Ok(Loaded {
        model,
        tokenizer,
        file_dtypes: files.dtypes(),
    })
}

/// Saves `model` (and `tokenizer`) as an HF model folder at `dir`, atomically: everything is
/// written to a temporary sibling folder first, which then replaces `dir`.
pub fn save(model: &CausalLm, tokenizer: Option<&Tokenizer>, dir: &Path) -> Result<()> {
    let tmp = sibling(dir, "tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    write_model_files(model, tokenizer, &tmp)?;
    replace_dir(&tmp, dir)
}

/// Writes config.json, model.safetensors (and the tokenizer files) into the existing folder `tmp`,
/// not atomically: for callers that add files of their own before renaming the folder into place.
pub fn write_model_files(
    model: &CausalLm,
    tokenizer: Option<&Tokenizer>,
    tmp: &Path,
) -> Result<()> {
    let mut config = model.config().clone();
    if let Some(t) = tokenizer {
        config.set_special_tokens(t);
    }
    let json = config.to_hf_json(model.has_scalar_head());
    let cpath = tmp.join("config.json");
    std::fs::write(
        &cpath,
        serde_json::to_string_pretty(&json).expect("JSON value"),
    )
    .map_err(io_err(&cpath))?;
    write_safetensors(&tmp.join("model.safetensors"), &model.hf_tensors())?;
    if let Some(t) = tokenizer {
        t.save(tmp)?;
    }
    Ok(())
}

/// `dir` with a suffix on its last component, e.g. `out/ckpt` → `out/.ckpt.tmp`.
pub fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    dir.with_file_name(format!(".{name}.{suffix}"))
}

/// Moves the finished folder `tmp` to `dir`, replacing what was there.
pub fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    if dir.exists() {
        let old = sibling(dir, "old");
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        std::fs::rename(dir, &old).map_err(io_err(dir))?;
        std::fs::rename(tmp, dir).map_err(io_err(tmp))?;
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    } else {
        std::fs::rename(tmp, dir).map_err(io_err(tmp))?;
    }
    Ok(())
}
