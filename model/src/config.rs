//! Model configuration: the Hugging Face `config.json` read into one plain runtime struct
//! ([`ModelConfig`]), written back in the same form, and the presets for from-scratch models.
//!
//! Follows `transformers` 4.x / 5.x: `LlamaConfig` (also read for `mistral` and `qwen2`) and
//! `GPT2Config`.

use crate::error::{ModelError, Result, io_err};
use serde_json::{Map, Value, json};
use std::path::Path;

/// The architecture family; decides weight names and the block's layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Llama, Mistral, Qwen2: RMSNorm, RoPE, SwiGLU, grouped-query attention.
    Llama,
    /// GPT-2: LayerNorm, learned positions, gelu_new MLP, fused Conv1D qkv.
    Gpt2,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// SiLU gate of a SwiGLU MLP (`hidden_act = "silu"`).
    Silu,
    /// tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// exact (erf) GELU (`gelu`).
    Gelu,
}

/// `rope_scaling` of type `llama3` (Llama 3.1+).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// The resolved runtime configuration of a causal LM.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// `model_type` as written in config.json (`llama`, `mistral`, `qwen2`, `gpt2`).
    pub model_type: String,
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub norm_eps: f64,
    pub activation: Activation,
    /// RoPE base; unused by GPT-2.
    pub rope_theta: f64,
    pub rope_llama3: Option<Llama3Scaling>,
    /// Bias on the q, k, v projections (`attention_bias` for Llama, always for Qwen2 and GPT-2).
    pub qkv_bias: bool,
    /// Bias on the attention output projection (Llama `attention_bias`, GPT-2).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama `mlp_bias`, GPT-2).
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// Dropout on embeddings and on the residual branches while training; 0 disables it.
    pub dropout: f64,
    /// Std-dev of the normal init for new models (`initializer_range`).
    pub initializer_range: f64,
    /// The config.json this came from, kept so that unknown keys are written back unchanged.
    pub raw: Map<String, Value>,
}

fn key_err(path: &Path, key: &str, msg: impl Into<String>) -> ModelError {
    ModelError::ConfigKey {
        path: path.to_path_buf(),
        key: key.to_string(),
        msg: msg.into(),
    }
}

struct Reader<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                key_err(
                    self.path,
                    key,
                    format!("must be a non-negative integer, found {v}"),
                )
            }),
        }
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| key_err(self.path, key, "is missing"))
    }
    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| key_err(self.path, key, format!("must be a number, found {v}"))),
        }
    }
    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                key_err(self.path, key, format!("must be true or false, found {v}"))
            }),
        }
    }
    fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| key_err(self.path, key, format!("must be a string, found {v}"))),
        }
    }
    /// A token id: an integer, or a list of integers (the first is used).
    fn token_id(&self, key: &str) -> Result<Option<u32>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) if a.is_empty() => Ok(None),
            Some(Value::Array(a)) => a[0]
                .as_u64()
                .map(|x| Some(x as u32))
                .ok_or_else(|| key_err(self.path, key, "must hold integer token ids")),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as u32))
                .ok_or_else(|| key_err(self.path, key, format!("must be a token id, found {v}"))),
        }
    }
}

fn activation(path: &Path, key: &str, name: &str) -> Result<Activation> {
    match name {
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        "gelu" => Ok(Activation::Gelu),
        other => Err(key_err(
            path,
            key,
            format!("activation `{other}` is not supported; use silu, gelu, gelu_new"),
        )),
    }
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(map) = value else {
            return Err(ModelError::Json {
                path: path.to_path_buf(),
                msg: "expected a JSON object".into(),
            });
        };
        Self::from_map(path, map)
    }

    /// Resolves a parsed config.json; `path` is only used in error messages.
    pub fn from_map(path: &Path, map: Map<String, Value>) -> Result<Self> {
        let r = Reader { path, map: &map };
        let model_type = r
            .str_opt("model_type")?
            .ok_or_else(|| key_err(path, "model_type", "is missing"))?
            .to_string();
        let mut cfg = match model_type.as_str() {
            "llama" | "mistral" | "qwen2" => Self::llama_from(&r, &model_type)?,
            "gpt2" => Self::gpt2_from(&r)?,
            _ => {
                return Err(ModelError::UnknownModelType {
                    path: path.to_path_buf(),
                    model_type,
                });
            }
        };
        cfg.bos_token_id = r.token_id("bos_token_id")?;
        cfg.eos_token_id = r.token_id("eos_token_id")?;
        cfg.pad_token_id = r.token_id("pad_token_id")?;
        cfg.initializer_range = r.f64_opt("initializer_range")?.unwrap_or(0.02);
        cfg.raw = map;
        cfg.validate().map_err(|msg| ModelError::Json {
            path: path.to_path_buf(),
            msg,
        })?;
        Ok(cfg)
    }

    fn llama_from(r: &Reader, model_type: &str) -> Result<Self> {
        let hidden_size = r.usize("hidden_size")?;
        let num_heads = r.usize("num_attention_heads")?;
        if num_heads == 0 || hidden_size % num_heads != 0 && r.usize_opt("head_dim")?.is_none() {
            return Err(key_err(
                r.path,
                "num_attention_heads",
                "must divide hidden_size (or give head_dim)",
            ));
        }
        let num_kv_heads = r.usize_opt("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = r.usize_opt("head_dim")?.unwrap_or(hidden_size / num_heads);
        // RoPE: transformers 4.x writes rope_theta / rope_scaling at the top level; 5.x nests both
        // in rope_parameters.
        let nested = match r.map.get("rope_parameters") {
            Some(Value::Object(m)) => Some(m),
            _ => None,
        };
        let rope_theta = match nested.and_then(|m| m.get("rope_theta")) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| key_err(r.path, "rope_parameters.rope_theta", "must be a number"))?,
            None => r.f64_opt("rope_theta")?.unwrap_or(10000.0),
        };
        let scaling = match r.map.get("rope_scaling") {
            Some(Value::Object(m)) => Some((m, "rope_scaling")),
            _ => nested.map(|m| (m, "rope_parameters")),
        };
        let mut rope_llama3 = None;
        if let Some((m, key)) = scaling {
            let kind = m
                .get("rope_type")
                .or_else(|| m.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            match kind {
                "default" => {}
                "llama3" => {
                    let num = |k: &str| {
                        m.get(k).and_then(|v| v.as_f64()).ok_or_else(|| {
                            key_err(r.path, &format!("{key}.{k}"), "is missing or not a number")
                        })
                    };
                    rope_llama3 = Some(Llama3Scaling {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: num("original_max_position_embeddings")?,
                    });
                }
                other => {
                    return Err(key_err(
                        r.path,
                        key,
                        format!("rope type `{other}` is not supported; supported: default, llama3"),
                    ));
                }
            }
        }
        let is_qwen2 = model_type == "qwen2";
        let attention_bias = r.bool_opt("attention_bias")?.unwrap_or(false);
        let act = r.str_opt("hidden_act")?.unwrap_or("silu");
        Ok(Self {
            model_type: model_type.to_string(),
            family: Family::Llama,
            vocab_size: r.usize("vocab_size")?,
            hidden_size,
            intermediate_size: r.usize("intermediate_size")?,
            num_layers: r.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: r.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            norm_eps: r.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            activation: activation(r.path, "hidden_act", act)?,
            rope_theta,
            rope_llama3,
            qkv_bias: is_qwen2 || attention_bias,
            o_bias: !is_qwen2 && attention_bias,
            mlp_bias: r.bool_opt("mlp_bias")?.unwrap_or(false),
            tie_word_embeddings: r.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            dropout: 0.0,
            initializer_range: 0.02,
            raw: Map::new(),
        })
    }

    fn gpt2_from(r: &Reader) -> Result<Self> {
        let hidden_size = r.usize("n_embd")?;
        let num_heads = r.usize("n_head")?;
        if num_heads == 0 || hidden_size % num_heads != 0 {
            return Err(key_err(r.path, "n_head", "must divide n_embd"));
        }
        let act = r.str_opt("activation_function")?.unwrap_or("gelu_new");
        if r.bool_opt("scale_attn_by_inverse_layer_idx")? == Some(true)
            || r.bool_opt("reorder_and_upcast_attn")? == Some(true)
        {
            return Err(key_err(
                r.path,
                "scale_attn_by_inverse_layer_idx",
                "is not supported (only standard GPT-2 attention)",
            ));
        }
        Ok(Self {
            model_type: "gpt2".into(),
            family: Family::Gpt2,
            vocab_size: r.usize("vocab_size")?,
            hidden_size,
            intermediate_size: r.usize_opt("n_inner")?.unwrap_or(4 * hidden_size),
            num_layers: r.usize("n_layer")?,
            num_heads,
            num_kv_heads: num_heads,
            head_dim: hidden_size / num_heads,
            max_position_embeddings: r.usize_opt("n_positions")?.unwrap_or(1024),
            norm_eps: r.f64_opt("layer_norm_epsilon")?.unwrap_or(1e-5),
            activation: activation(r.path, "activation_function", act)?,
            rope_theta: 0.0,
            rope_llama3: None,
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            tie_word_embeddings: r.bool_opt("tie_word_embeddings")?.unwrap_or(true),
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            dropout: 0.0,
            initializer_range: 0.02,
            raw: Map::new(),
        })
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_key_value_heads ({}) must divide num_attention_heads ({})",
                self.num_kv_heads, self.num_heads
            ));
        }
        if self.family == Family::Llama && !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        if self.family == Family::Gpt2 && !self.tie_word_embeddings {
            return Err("GPT-2 with untied embeddings is not supported".into());
        }
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("intermediate_size", self.intermediate_size),
        ] {
            if v == 0 {
                return Err(format!("{k} must be positive"));
            }
        }
        Ok(())
    }

    /// A Llama-architecture config for a from-scratch model.
    ///
    /// | preset | hidden | layers | heads (kv) | intermediate |
    /// |---|---|---|---|---|
    /// | tiny | 64 | 2 | 4 (2) | 172 |
    /// | mini | 128 | 4 | 4 (2) | 344 |
    /// | small | 256 | 4 | 4 (4) | 688 |
    /// | medium | 512 | 8 | 8 (8) | 1376 |
    /// | large | 768 | 12 | 12 (4) | 2048 |
    pub fn preset(name: &str, vocab_size: usize) -> Result<Self> {
        let (hidden, layers, heads, kv, inter) = match name {
            "tiny" => (64, 2, 4, 2, 172),
            "mini" => (128, 4, 4, 2, 344),
            "small" => (256, 4, 4, 4, 688),
            "medium" => (512, 8, 8, 8, 1376),
            "large" => (768, 12, 12, 4, 2048),
            other => return Err(ModelError::UnknownPreset(other.to_string())),
        };
        Ok(Self {
            model_type: "llama".into(),
            family: Family::Llama,
            vocab_size,
            hidden_size: hidden,
            intermediate_size: inter,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: hidden / heads,
            max_position_embeddings: 2048,
            norm_eps: 1e-5,
            activation: Activation::Silu,
            rope_theta: 10000.0,
            rope_llama3: None,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            dropout: 0.0,
            initializer_range: 0.02,
            raw: Map::new(),
        })
    }

    /// Takes the tokenizer's special-token ids (eos, pad, and bos where it has one), so that
    /// config.json and tokenizer agree.
    pub fn set_special_tokens(&mut self, tok: &crate::Tokenizer) {
        self.eos_token_id = Some(tok.eos_id);
        self.pad_token_id = Some(tok.pad_id);
        self.bos_token_id = tok.bos_id.or(self.bos_token_id);
    }

    /// The HF `architectures` entry for a causal LM, or for a scalar-head sequence classifier.
    pub fn architecture_name(&self, scalar_head: bool) -> String {
        let base = match self.model_type.as_str() {
            "mistral" => "Mistral",
            "qwen2" => "Qwen2",
            "gpt2" => "GPT2",
            _ => "Llama",
        };
        match (self.family, scalar_head) {
            (_, true) => format!("{base}ForSequenceClassification"),
            (Family::Gpt2, false) => "GPT2LMHeadModel".into(),
            (Family::Llama, false) => format!("{base}ForCausalLM"),
        }
    }

    /// The config.json to write next to saved weights (f32, or bf16 when `bf16`): the keys read
    /// at load time, refreshed with the values in force, plus any other keys of the original file
    /// unchanged.
    pub fn to_hf_json(&self, scalar_head: bool, bf16: bool) -> Value {
        let dtype = if bf16 { "bfloat16" } else { "float32" };
        let mut m = self.raw.clone();
        let mut set = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        set("model_type", json!(self.model_type));
        set(
            "architectures",
            json!([self.architecture_name(scalar_head)]),
        );
        set("vocab_size", json!(self.vocab_size));
        set("torch_dtype", json!(dtype));
        set("dtype", json!(dtype));
        set("initializer_range", json!(self.initializer_range));
        set("tie_word_embeddings", json!(self.tie_word_embeddings));
        let id = |x: Option<u32>| x.map_or(Value::Null, |v| json!(v));
        set("bos_token_id", id(self.bos_token_id));
        set("eos_token_id", id(self.eos_token_id));
        set("pad_token_id", id(self.pad_token_id));
        let act = match self.activation {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_new",
            Activation::Gelu => "gelu",
        };
        match self.family {
            Family::Llama => {
                set("hidden_size", json!(self.hidden_size));
                set("intermediate_size", json!(self.intermediate_size));
                set("num_hidden_layers", json!(self.num_layers));
                set("num_attention_heads", json!(self.num_heads));
                set("num_key_value_heads", json!(self.num_kv_heads));
                set("head_dim", json!(self.head_dim));
                set(
                    "max_position_embeddings",
                    json!(self.max_position_embeddings),
                );
                set("rms_norm_eps", json!(self.norm_eps));
                set("hidden_act", json!(act));
                if self.model_type != "qwen2" {
                    set("attention_bias", json!(self.qkv_bias));
                }
                if self.model_type == "llama" {
                    set("mlp_bias", json!(self.mlp_bias));
                }
                // Keep the original file's RoPE layout (top level or rope_parameters) when it
                // has one; new models use the 4.x top-level keys, which 5.x also reads.
                if !m.contains_key("rope_parameters") {
                    m.insert("rope_theta".into(), json!(self.rope_theta));
                }
                if self.model_type == "mistral" && !m.contains_key("sliding_window") {
                    m.insert("sliding_window".into(), Value::Null);
                }
            }
            Family::Gpt2 => {
                set("n_embd", json!(self.hidden_size));
                set("n_inner", json!(self.intermediate_size));
                set("n_layer", json!(self.num_layers));
                set("n_head", json!(self.num_heads));
                set("n_positions", json!(self.max_position_embeddings));
                set("layer_norm_epsilon", json!(self.norm_eps));
                set("activation_function", json!(act));
            }
        }
        if scalar_head {
            m.insert("num_labels".into(), json!(1));
            m.insert("id2label".into(), json!({"0": "LABEL_0"}));
            m.insert("label2id".into(), json!({"LABEL_0": 0}));
            m.insert("problem_type".into(), json!("regression"));
        }
        Value::Object(m)
    }

    /// The `config.json` key of the context length (`max_position_embeddings`, GPT-2's
    /// `n_positions`), for messages about it.
    pub fn context_key(&self) -> &'static str {
        match self.family {
            Family::Llama => "max_position_embeddings",
            Family::Gpt2 => "n_positions",
        }
    }

    /// True when config.json asks for a sequence-classification (scalar) head.
    pub fn declares_scalar_head(&self) -> bool {
        self.raw
            .get("architectures")
            .and_then(|a| a.as_array())
            .is_some_and(|a| {
                a.iter().any(|x| {
                    x.as_str()
                        .is_some_and(|s| s.ends_with("ForSequenceClassification"))
                })
            })
    }

    /// Parameter count of a model built from this config (with or without the scalar head).
    pub fn num_params(&self, scalar_head: bool) -> usize {
        let d = self.hidden_size;
        let qkv = d * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim;
        let o = self.num_heads * self.head_dim * d;
        let qkv_b = if self.qkv_bias {
            (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        } else {
            0
        };
        let o_b = if self.o_bias { d } else { 0 };
        let (mlp, norms) = match self.family {
            Family::Llama => (
                3 * d * self.intermediate_size
                    + if self.mlp_bias {
                        2 * self.intermediate_size + d
                    } else {
                        0
                    },
                2 * d,
            ),
            Family::Gpt2 => (
                2 * d * self.intermediate_size + self.intermediate_size + d,
                4 * d,
            ),
        };
        let per_layer = qkv + o + qkv_b + o_b + mlp + norms;
        let mut n = self.vocab_size * d + self.num_layers * per_layer;
        n += match self.family {
            Family::Llama => d,
            Family::Gpt2 => 2 * d + self.max_position_embeddings * d,
        };
        if !self.tie_word_embeddings {
            n += self.vocab_size * d;
        }
        if scalar_head {
            n += d;
        }
        n
    }
}

/// The names of [`ModelConfig::preset`]'s presets, smallest first.
pub const PRESETS: [&str; 5] = ["tiny", "mini", "small", "medium", "large"];
