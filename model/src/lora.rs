//! LoRA (Hu et al. 2021) on the model's linear layers, in the format PEFT writes and loads.
//!
//! An adapted layer adds `dropout(x) · Aᵀ · Bᵀ · scale` to its output, with A `[r, in]`, B
//! `[out, r]` (PEFT's `lora_A.weight` / `lora_B.weight`), `scale = alpha / r` (or `alpha / √r`
//! with rsLoRA); A starts uniform in ±1/√in (PEFT's Kaiming-uniform bound with a = √5) and B at
//! zero, so a new adapter leaves the model's outputs unchanged. The base weights are frozen: no
//! gradients, no optimizer state.
//!
//! Our q | k | v and gate | up products are fused; an adapter on `q_proj` adds to the q columns
//! of the fused output only, so each HF module keeps its own A and B under its own name, as PEFT
//! names them: `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. GPT-2's
//! `c_attn` is one module in HF as here (PEFT's `fan_in_fan_out`, for its Conv1D layers, changes
//! only how the base weight is stored, not the adapter's shapes).
//!
//! A saved adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`, which
//! `peft.PeftModel.from_pretrained(base, dir)` loads; [`read_adapter`] reads one written by PEFT.

use crate::config::{Family, ModelConfig};
use crate::error::{ModelError, Result};
use crate::fused;
use crate::weights::{Layout, ParamSpec, SafetensorsFiles, stable_id};
use burn::module::{Module, Param, ParamId};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The prefix PEFT puts before the base model's module names in an adapter's tensor names.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// The adapter's configuration file in a saved adapter folder.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The sub-folder of a saved model folder (`final/`, `best/`, a checkpoint) that holds the LoRA
/// adapter of a model trained with one; the folder itself holds the merged weights.
pub const ADAPTER_DIR: &str = "adapter";
/// The adapter's weights file in a saved adapter folder.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The `[lora]` table of a stage config: which layers get an adapter and how large.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank r of each adapter (≥ 1).
    pub r: usize,
    /// The scale's numerator: scale = alpha / r (alpha / √r with `use_rslora`).
    pub alpha: f64,
    /// Dropout on the adapter's input during training, in [0, 1).
    pub dropout: f64,
    /// Module names as PEFT spells them (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
    /// `up_proj`, `down_proj`; GPT-2: `c_attn`, `c_proj`, `c_fc`), or `["all-linear"]` for every
    /// projection of every layer (not the LM head). Empty: PEFT's default for the
    /// architecture (`q_proj`, `v_proj`; GPT-2 `c_attn`).
    pub target_modules: Vec<String>,
    /// rsLoRA's scale alpha / √r (Kalajdzievski 2023) instead of alpha / r.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: Vec::new(),
            use_rslora: false,
        }
    }
}

/// Whether the HF module `module` (full name) is targeted by `target`, as PEFT decides it.
pub(crate) fn targeted(module: &str, target: &str) -> bool {
    module == target
        || module
            .strip_suffix(target)
            .is_some_and(|head| head.ends_with('.'))
}

/// The module names an adapter can target, per family, as PEFT matches them (the last
/// component of the HF module name).
pub(crate) fn module_names(family: Family) -> &'static [&'static str] {
    match family {
        Family::Llama => &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        Family::Gpt2 => &["c_attn", "c_proj", "c_fc"],
    }
}

impl LoraConfig {
    /// The factor the adapter's product is multiplied by.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// The targeted module names for a model of this family: the default resolved,
    /// `all-linear` expanded. Each is matched as PEFT matches it: a module is targeted when its
    /// full name equals the target or ends with `.` + the target (`q_proj`, or
    /// `model.layers.0.self_attn.q_proj` as PEFT saves an expanded `all-linear`).
    pub fn targets(&self, family: Family) -> Vec<String> {
        if self.target_modules.is_empty() {
            match family {
                Family::Llama => vec!["q_proj".into(), "v_proj".into()],
                Family::Gpt2 => vec!["c_attn".into()],
            }
        } else if self.target_modules.iter().any(|t| t == "all-linear") {
            module_names(family).iter().map(|s| s.to_string()).collect()
        } else {
            self.target_modules.clone()
        }
    }

    /// What is wrong with these settings, if anything, in the words of the config key.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.r == 0 {
            out.push(("r", "= 0: the rank must be ≥ 1".to_string()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            out.push(("alpha", format!("= {}: must be > 0", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            out.push(("dropout", format!("= {}: must be in [0, 1)", self.dropout)));
        }
        out
    }
}

/// One adapted linear layer: per output segment of the (possibly fused) base layer, an A and B
/// pair, or none where that segment's module is not targeted.
#[derive(Module, Debug)]
pub(crate) struct Lora {
    pairs: Vec<Option<Pair>>,
    dropout: Dropout,
    /// The width of each output segment.
    #[module(skip)]
    widths: Vec<usize>,
    #[module(skip)]
    scale: f64,
}

/// A `[in, r]` and B `[r, out]` in burn's layout (PEFT's transposed).
#[derive(Module, Debug)]
pub(crate) struct Pair {
    a: Param<Tensor<2>>,
    b: Param<Tensor<2>>,
}

impl Lora {
    /// The adapter's addition to the base layer's output: x [.., in] → [.., Σ widths].
    pub(crate) fn delta<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let x = self.dropout.forward(x);
        let mut outs: Vec<Tensor<D>> = self
            .pairs
            .iter()
            .zip(&self.widths)
            .map(|(pair, &w)| match pair {
                Some(p) => fused::linear(
                    fused::linear(x.clone(), p.a.val(), None).mul_scalar(self.scale),
                    p.b.val(),
                    None,
                ),
                None => {
                    let mut dims = x.dims();
                    dims[D - 1] = w;
                    Tensor::zeros(dims, &x.device())
                }
            })
            .collect();
        if outs.len() == 1 {
            outs.pop().expect("one segment")
        } else {
            Tensor::cat(outs, D - 1)
        }
    }

    /// A · B · scale per segment, side by side: [in, Σ widths] (zero where a segment has no
    /// adapter), what merging adds to the base weight.
    pub(crate) fn merged_delta(&self) -> Tensor<2> {
        let device = self.device();
        let d_in = self.d_in();
        let cols: Vec<Tensor<2>> = self
            .pairs
            .iter()
            .zip(&self.widths)
            .map(|(pair, &w)| match pair {
                Some(p) => p.a.val().matmul(p.b.val()).mul_scalar(self.scale),
                None => Tensor::zeros([d_in, w], &device),
            })
            .collect();
        Tensor::cat(cols, 1)
    }

    fn first(&self) -> &Pair {
        self.pairs
            .iter()
            .flatten()
            .next()
            .expect("an adapter has a pair")
    }

    fn d_in(&self) -> usize {
        self.first().a.val().dims()[0]
    }

    fn device(&self) -> Device {
        self.first().a.val().device()
    }
}

/// Where an adapter's pairs come from.
pub(crate) enum AdapterSource<'a> {
    /// New: A uniform in ±1/√in from a seeded generator, B zero.
    New(Box<StdRng>),
    /// A saved adapter's tensors (PEFT names).
    File(&'a SafetensorsFiles),
}

impl AdapterSource<'_> {
    pub(crate) fn new(seed: u64) -> Self {
        AdapterSource::New(Box::new(StdRng::seed_from_u64(seed)))
    }
}

/// Builds the adapter of one base linear layer whose weight is described by `spec` (its HF
/// parts `<module>.weight` and their widths, input width `d_in`), for the modules in
/// `targets`; None when none of its segments is targeted. The new parameters' specs (PEFT names
/// without [`PEFT_PREFIX`]) are appended to `specs`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build(
    spec: &ParamSpec,
    d_in: usize,
    targets: &[String],
    cfg: &LoraConfig,
    source: &mut AdapterSource,
    device: &Device,
    specs: &mut Vec<ParamSpec>,
) -> Result<Option<Lora>> {
    let mut pairs = Vec::with_capacity(spec.parts.len());
    let mut widths = Vec::with_capacity(spec.parts.len());
    for (name, w) in &spec.parts {
        let module = name.strip_suffix(".weight").unwrap_or(name);
        widths.push(*w);
        if !targets.iter().any(|t| targeted(module, t)) {
            pairs.push(None);
            continue;
        }
        let (a_name, b_name) = (
            format!("{module}.lora_A.weight"),
            format!("{module}.lora_B.weight"),
        );
        let r = cfg.r;
        let (a, b) = match source {
            AdapterSource::New(rng) => {
                let bound = 1.0 / (d_in as f64).sqrt();
                let a: Vec<f32> = (0..d_in * r)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                (a, vec![0f32; r * w])
            }
            AdapterSource::File(files) => {
                let (pa, pb) = (
                    format!("{PEFT_PREFIX}{a_name}"),
                    format!("{PEFT_PREFIX}{b_name}"),
                );
                files.check_shape(&pa, &[r, d_in])?;
                files.check_shape(&pb, &[*w, r])?;
                // HF [r, in] → burn [in, r]; HF [out, r] → burn [r, out].
                (
                    transpose(&files.read(&pa, &[r, d_in])?, r, d_in),
                    transpose(&files.read(&pb, &[*w, r])?, *w, r),
                )
            }
        };
        let a = param(a, [d_in, r], &a_name, r, specs, device);
        let b = param(b, [r, *w], &b_name, *w, specs, device);
        pairs.push(Some(Pair { a, b }));
    }
    if pairs.iter().all(Option::is_none) {
        return Ok(None);
    }
    Ok(Some(Lora {
        pairs,
        dropout: DropoutConfig::new(cfg.dropout).init(),
        widths,
        scale: cfg.scale(),
    }))
}

/// A `[rows, cols]` row-major matrix transposed.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; x.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = x[i * cols + j];
        }
    }
    t
}

/// A trainable parameter `shape` (burn layout [in, out]) saved as the HF tensor `name` [out, in].
fn param(
    data: Vec<f32>,
    shape: [usize; 2],
    name: &str,
    out: usize,
    specs: &mut Vec<ParamSpec>,
    device: &Device,
) -> Param<Tensor<2>> {
    let mut p = Param::from_tensor(Tensor::from_data(TensorData::new(data, shape), device));
    p.id = ParamId::from(stable_id(name));
    specs.push(ParamSpec {
        id: p.id,
        parts: vec![(name.to_string(), out)],
        layout: Layout::OutIn,
    });
    p
}

/// PEFT's `adapter_config.json` for an adapter of `cfg` on a model of `model`, whose base
/// folder is `base` (`base_model_name_or_path`; null when not known).
pub fn adapter_config_json(
    cfg: &LoraConfig,
    model: &ModelConfig,
    has_score: bool,
    base: Option<&str>,
) -> Result<String> {
    let targets = cfg.targets(model.family);
    // A scalar head (reward / value model) trains and is saved with the adapter, as PEFT's
    // sequence classifiers keep `score` whole.
    let task = if has_score { "SEQ_CLS" } else { "CAUSAL_LM" };
    let v = serde_json::json!({
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        "fan_in_fan_out": model.family == Family::Gpt2,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": if has_score { serde_json::json!(["score"]) } else { serde_json::Value::Null },
        "use_dora": false,
        "layers_to_transform": serde_json::Value::Null,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    Ok(serde_json::to_string_pretty(&v).expect("a JSON value serialises"))
}

/// Reads a saved adapter folder's `adapter_config.json` (ours or PEFT's) into a [`LoraConfig`]
/// and its weights; what this implementation does not support (DoRA, per-module ranks, bias
/// training, modules saved whole, a non-LoRA type) is an error naming the key.
pub fn read_adapter(dir: &Path) -> Result<(LoraConfig, SafetensorsFiles)> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let key = |k: &str, msg: String| ModelError::ConfigKey {
        path: path.clone(),
        key: k.into(),
        msg,
    };
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    match get("peft_type").and_then(|x| x.as_str()) {
        Some("LORA") => {}
        other => {
            return Err(key(
                "peft_type",
                format!("= {other:?}: only LoRA adapters (\"LORA\") are supported"),
            ));
        }
    }
    let r = get("r")
        .and_then(|x| x.as_u64())
        .filter(|r| (1..=1 << 16).contains(r))
        .ok_or_else(|| key("r", "must be an integer in 1..=65536".into()))? as usize;
    let alpha = get("lora_alpha")
        .and_then(|x| x.as_f64())
        .filter(|a| a.is_finite() && *a > 0.0)
        .ok_or_else(|| key("lora_alpha", "must be a number > 0".into()))?;
    let dropout = get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0);
    let target_modules = match get("target_modules") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| key("target_modules", "must be a list of names".into()))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        _ => {
            return Err(key(
                "target_modules",
                "is missing: list the adapted module names".into(),
            ));
        }
    };
    for (k, ok) in [
        ("use_dora", get("use_dora").is_none_or(|x| x == false)),
        ("bias", get("bias").is_none_or(|x| x == "none")),
        (
            "modules_to_save",
            get("modules_to_save").is_none_or(|x| {
                x.as_array()
                    .is_some_and(|a| a.is_empty() || a.as_slice() == [serde_json::json!("score")])
            }),
        ),
        (
            "rank_pattern",
            get("rank_pattern").is_none_or(|x| x.as_object().is_some_and(|o| o.is_empty())),
        ),
        (
            "alpha_pattern",
            get("alpha_pattern").is_none_or(|x| x.as_object().is_some_and(|o| o.is_empty())),
        ),
        ("layers_to_transform", get("layers_to_transform").is_none()),
        ("lora_bias", get("lora_bias").is_none_or(|x| x == false)),
        ("target_parameters", get("target_parameters").is_none()),
        (
            "trainable_token_indices",
            get("trainable_token_indices").is_none(),
        ),
    ] {
        if !ok {
            return Err(key(
                k,
                format!(
                    "= {}: not supported here; save the adapter without it (or merge it into the model with PEFT's merge_and_unload)",
                    v[k]
                ),
            ));
        }
    }
    let cfg = LoraConfig {
        r,
        alpha,
        dropout,
        target_modules,
        use_rslora: get("use_rslora").is_some_and(|x| x == true),
    };
    let files = SafetensorsFiles::open_file(&dir.join(ADAPTER_WEIGHTS))?;
    Ok((cfg, files))
}
