//! Checkpoints are Hugging Face model folders: `config.json`, `model.safetensors` (or shards with
//! `model.safetensors.index.json`) and `tokenizer.json`. What we save loads with
//! `transformers.AutoModelForCausalLM.from_pretrained(dir)` (or `AutoModelForSequenceClassification`
//! for a model with a scalar head).

use crate::config::ModelConfig;
use crate::error::{ModelError, Result, io_err};
use crate::tokenizer::{PromptTemplate, Tokenizer, tokenizer_path};
use crate::transformer::{CausalLm, Heads};
use crate::weights::{SafetensorsFiles, write_safetensors};
use burn::tensor::Device;
use std::path::{Path, PathBuf};

/// The file in a model folder that carries what our stages add to an HF folder.
pub const META_FILE: &str = "rlhf.json";

/// What a stage records about a model beyond HF's files (`rlhf.json`): the prompt template it
/// was trained with, which later stages use by default, and a reward model's normalisation.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelMeta {
    /// The stage that wrote the folder: `sft`, `reward`, `ppo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The prompt template (`{prompt}` is replaced) the model was trained with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_template: Option<String>,
    /// Reward models: how raw scores become normalised ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_normalization: Option<RewardNormalization>,
    /// The chat template conversations were trained with: `"model folder"` (the base's), or the
    /// `.jinja` file given as `data.chat_template`. Its text is in the folder's
    /// `tokenizer_config.json` (`chat_template`) either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
}

/// A reward model's normalisation, as InstructGPT: `normalised = raw − offset`, with `offset`
/// the mean raw reward of the reference responses (the SFT demonstrations when given), so they
/// score 0 on average. HF's `*ForSequenceClassification` score layer has no bias, so the shift is
/// kept here rather than in the weights: transformers gives the raw score.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RewardNormalization {
    pub offset: f64,
    /// Mean and standard deviation of the normalised rewards of the reference responses.
    pub mean: f64,
    pub std: f64,
    /// What the offset was measured on, e.g. `"sft demonstrations (400)"`.
    pub reference: String,
}

impl RewardNormalization {
    pub fn apply(&self, raw: f32) -> f32 {
        (raw as f64 - self.offset) as f32
    }
}

impl ModelMeta {
    /// Reads `rlhf.json` of `dir`; an absent file is the default (an HF folder from elsewhere).
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join(META_FILE);
        match std::fs::read_to_string(&p) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| ModelError::Json {
                path: p,
                msg: format!("not a valid {META_FILE}: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ModelError::Io { path: p, source: e }),
        }
    }

    fn write(&self, dir: &Path) -> Result<()> {
        if *self == Self::default() {
            return Ok(());
        }
        let p = dir.join(META_FILE);
        std::fs::write(
            &p,
            serde_json::to_string_pretty(self).expect("JSON value") + "\n",
        )
        .map_err(io_err(&p))
    }
}

/// A loaded model folder.
pub struct Loaded {
    pub model: CausalLm,
    /// None when the folder has no tokenizer.json.
    pub tokenizer: Option<Tokenizer>,
    /// Dtypes of the weight files, e.g. `["BF16"]`.
    pub file_dtypes: Vec<String>,
    /// `rlhf.json` (default when absent).
    pub meta: ModelMeta,
}

/// The heads a folder's config.json declares: a scalar head and no LM head for
/// `*ForSequenceClassification`, an LM head otherwise.
pub fn declared_heads(dir: &Path) -> Result<Heads> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    Ok(if config.declares_scalar_head() {
        Heads::SCALAR
    } else {
        Heads::LM
    })
}

/// Loads the model folder `dir` with the heads its config.json declares: a reward or value model
/// (`*ForSequenceClassification`) with its scalar head only, a causal LM with its LM head.
pub fn load(dir: &Path, device: &Device) -> Result<Loaded> {
    load_with(dir, None, device)
}

/// Loads `dir` with the given heads (None: as declared). A head asked for that the folder does not
/// have is an error naming it.
pub fn load_with(dir: &Path, heads: Option<Heads>, device: &Device) -> Result<Loaded> {
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
    check_layers(dir, &config, &files)?;
    let declared = if config.declares_scalar_head() {
        Heads::SCALAR
    } else {
        Heads::LM
    };
    let heads = heads.unwrap_or(declared);
    if heads.scalar && !declared.scalar {
        return Err(ModelError::MissingHead {
            path: dir.to_path_buf(),
            head: "scalar head (score.weight)",
            hint: format!(
                "it is a causal LM ({}); a reward or value model (*ForSequenceClassification) is needed here",
                config.architecture_name(false)
            ),
        });
    }
    if heads.lm && declared.scalar {
        return Err(ModelError::MissingHead {
            path: dir.to_path_buf(),
            head: "LM head",
            hint: format!(
                "it is a reward or value model ({}); a causal-LM (policy / SFT) folder is needed here",
                config.architecture_name(true)
            ),
        });
    }
    let model = CausalLm::from_safetensors(&config, &files, heads, device)?;
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
        meta: ModelMeta::read(dir)?,
    })
}

/// Refuses a config.json with more layers than the weights hold, before a model of its size is
/// laid out (the sizes of each tensor are checked against the files' headers as it is built).
fn check_layers(dir: &Path, config: &ModelConfig, files: &SafetensorsFiles) -> Result<()> {
    let layers = files.layers();
    if config.num_layers <= layers {
        return Ok(());
    }
    let key = match config.family {
        crate::Family::Llama => "num_hidden_layers",
        crate::Family::Gpt2 => "n_layer",
    };
    Err(ModelError::ConfigKey {
        path: dir.join("config.json"),
        key: key.into(),
        msg: format!(
            "= {}, but {} holds the weights of {layers} layers: the config does not describe these weights; use the config.json saved with them",
            config.num_layers,
            files.describe()
        ),
    })
}

/// The prompt template used when neither the config nor the model folder names one.
pub const DEFAULT_TEMPLATE: &str = "Human: {prompt}\n\nAssistant:";

/// The prompt template of a stage: the config's when set, else the one stored with the model
/// folder it starts from (`rlhf.json`), else [`DEFAULT_TEMPLATE`].
pub fn resolve_template(explicit: Option<&str>, folder: Option<&Path>) -> Result<PromptTemplate> {
    if let Some(t) = explicit {
        return PromptTemplate::new(t);
    }
    if let Some(dir) = folder
        && let Some(t) = ModelMeta::read(dir)?.prompt_template
    {
        return PromptTemplate::new(&t);
    }
    PromptTemplate::new(DEFAULT_TEMPLATE)
}

/// A model folder loaded for a stage: the model with `heads`, its tokenizer (or the one at
/// `tokenizer`, which must fit the model's vocabulary) and its `rlhf.json`. A folder without
/// tokenizer.json and no `tokenizer` given is an error that says what to set.
pub fn load_with_tokenizer(
    dir: &Path,
    heads: Option<Heads>,
    tokenizer: Option<&Path>,
    device: &Device,
) -> Result<(CausalLm, Tokenizer, ModelMeta)> {
    let loaded = load_with(dir, heads, device)?;
    let cfg = loaded.model.config();
    let tok = match (tokenizer, loaded.tokenizer) {
        (Some(p), _) => {
            let t = Tokenizer::from_file(p, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)?;
            if t.vocab_size() > cfg.vocab_size {
                return Err(ModelError::VocabMismatch {
                    path: p.to_path_buf(),
                    tokenizer_vocab: t.vocab_size(),
                    model_vocab: cfg.vocab_size,
                });
            }
            t
        }
        (None, Some(t)) => t,
        (None, None) => {
            return Err(ModelError::Io {
                path: tokenizer_path(dir),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the model folder has no tokenizer.json; set model.tokenizer to a tokenizer.json that fits it",
                ),
            });
        }
    };
    Ok((loaded.model, tok, loaded.meta))
}

/// Saves `model` (and `tokenizer`) as an HF model folder at `dir`, atomically: everything is
/// written to a temporary sibling folder first, which then replaces `dir`.
pub fn save(model: &CausalLm, tokenizer: Option<&Tokenizer>, dir: &Path) -> Result<()> {
    save_with_meta(model, tokenizer, &ModelMeta::default(), dir)
}

/// [`save`] plus `rlhf.json`.
pub fn save_with_meta(
    model: &CausalLm,
    tokenizer: Option<&Tokenizer>,
    meta: &ModelMeta,
    dir: &Path,
) -> Result<()> {
    let tmp = sibling(dir, "tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    // A failed write (a full disk) leaves no temporary folder behind.
    let written =
        write_model_files(model, tokenizer, meta, &tmp).and_then(|()| replace_dir(&tmp, dir));
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

/// Writes config.json, model.safetensors, `rlhf.json` (and the tokenizer files) into the existing
/// folder `tmp`, not atomically: for callers that add files of their own before renaming the
/// folder into place.
pub fn write_model_files(
    model: &CausalLm,
    tokenizer: Option<&Tokenizer>,
    meta: &ModelMeta,
    tmp: &Path,
) -> Result<()> {
    meta.write(tmp)?;
    let mut config = model.config().clone();
    if let Some(t) = tokenizer {
        config.set_special_tokens(t);
    }
    let json = config.to_hf_json(model.has_scalar_head(), model.keeps_bf16());
    let cpath = tmp.join("config.json");
    std::fs::write(
        &cpath,
        serde_json::to_string_pretty(&json).expect("JSON value"),
    )
    .map_err(io_err(&cpath))?;
    // A model with LoRA adapters: the merged weights here (any HF loader reads the folder),
    // and the adapter as PEFT writes it in `adapter/` (what a resumed run continues from).
    model.write_weights(&tmp.join("model.safetensors"))?;
    if let Some(cfg) = model.lora_config() {
        let at = tmp.join(crate::lora::ADAPTER_DIR);
        std::fs::create_dir_all(&at).map_err(io_err(&at))?;
        let json =
            crate::lora::adapter_config_json(cfg, model.config(), model.has_scalar_head(), None)?;
        let cpath = at.join(crate::lora::ADAPTER_CONFIG);
        std::fs::write(&cpath, json).map_err(io_err(&cpath))?;
        write_safetensors(
            &at.join(crate::lora::ADAPTER_WEIGHTS),
            &model.lora_tensors(),
        )?;
    }
    if let Some(t) = tokenizer {
        t.save(tmp)?;
    }
    Ok(())
}

/// Saves the LoRA adapters of `model` as the adapter folder PEFT writes, at `dir`, atomically:
/// `adapter_config.json` (with `base` as `base_model_name_or_path`), `adapter_model.safetensors`,
/// and `rlhf.json` and the tokenizer files. An error for a model without adapters.
pub fn save_adapter(
    model: &CausalLm,
    tokenizer: Option<&Tokenizer>,
    meta: &ModelMeta,
    base: &Path,
    dir: &Path,
) -> Result<()> {
    let Some(cfg) = model.lora_config() else {
        return Err(ModelError::Invalid(
            "the model has no LoRA adapters to save as an adapter folder".into(),
        ));
    };
    let json = crate::lora::adapter_config_json(
        cfg,
        model.config(),
        model.has_scalar_head(),
        Some(&base.to_string_lossy()),
    )?;
    let tmp = sibling(dir, "tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let written = (|| {
        meta.write(&tmp)?;
        let cpath = tmp.join(crate::lora::ADAPTER_CONFIG);
        std::fs::write(&cpath, json).map_err(io_err(&cpath))?;
        write_safetensors(
            &tmp.join(crate::lora::ADAPTER_WEIGHTS),
            &model.lora_tensors(),
        )?;
        if let Some(t) = tokenizer {
            t.save(&tmp)?;
        }
        replace_dir(&tmp, dir)
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
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
