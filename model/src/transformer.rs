//! The decoder-only transformer: Llama family (RMSNorm, RoPE, SwiGLU, grouped-query attention;
//! Touvron et al. 2023, `transformers` `modeling_llama.py`) and GPT-2 (LayerNorm, learned
//! positions, gelu_new; Radford et al. 2019, `modeling_gpt2.py`), with an LM head and an optional
//! scalar head (reward / value).
//!
//! Two forward paths share one implementation: [`CausalLm::forward`] over a whole padded batch (for
//! training and scoring), and [`CausalLm::forward_cached`], which appends to a [`KvCache`] passed in
//! from outside (for generation). Position ids are derived from the attention mask, so a left-padded
//! row gives the same outputs as the same row unpadded.

use crate::batch::TokenBatch;
use crate::config::{Activation, Family, ModelConfig};
use crate::error::{ModelError, Result};
use crate::fused;
use crate::lora::{self, AdapterSource, Lora, LoraConfig};
use crate::weights::{Builder, Layout, ParamSpec, SafetensorsFiles, WeightDtype, hf_tensors};
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Embedding, Linear};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::fused::MASKED;

/// RMSNorm (Llama) or LayerNorm (GPT-2), computed in f32.
#[derive(Module, Debug)]
struct Norm {
    weight: Param<Tensor<1>>,
    bias: Option<Param<Tensor<1>>>,
    #[module(skip)]
    eps: f64,
    #[module(skip)]
    rms: bool,
}

impl Norm {
    /// x: [b, t, d]
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        if self.rms && self.bias.is_none() {
            return crate::fused::rms_norm(x, self.weight.val(), self.eps);
        }
        let x = if self.rms {
            let inv = x
                .clone()
                .powi_scalar(2)
                .mean_dim(2)
                .add_scalar(self.eps)
                .sqrt()
                .recip();
            x * inv
        } else {
            let mean = x.clone().mean_dim(2);
            let centered = x - mean;
            let var = centered.clone().powi_scalar(2).mean_dim(2);
            centered * var.add_scalar(self.eps).sqrt().recip()
        };
        let x = x * self.weight.val().unsqueeze::<3>();
        match &self.bias {
            Some(b) => x + b.val().unsqueeze::<3>(),
            None => x,
        }
    }
}

#[derive(Module, Debug)]
struct Attention {
    /// q | k | v fused: [d, (heads + 2·kv_heads)·head_dim].
    qkv: Linear,
    o: Linear,
    /// LoRA adapters of `qkv` (per q, k, v module) and `o` ([`crate::lora`]).
    qkv_lora: Option<Lora>,
    o_lora: Option<Lora>,
}

#[derive(Module, Debug)]
struct Mlp {
    /// gate | up fused for SwiGLU ([d, 2·inter]); `c_fc` for GPT-2 ([d, inter]).
    up: Linear,
    down: Linear,
    /// LoRA adapters of `up` (per gate, up module) and `down` ([`crate::lora`]).
    up_lora: Option<Lora>,
    down_lora: Option<Lora>,
}

#[derive(Module, Debug)]
struct Block {
    norm1: Norm,
    attn: Attention,
    norm2: Norm,
    mlp: Mlp,
}

impl Norm {
    /// `{prefix}.weight` (and `{prefix}.bias` for GPT-2's LayerNorm).
    fn load(b: &mut Builder, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let rms = cfg.family == Family::Llama;
        let (weight, bias) = b.norm_params(prefix, cfg.hidden_size, !rms)?;
        Ok(Norm {
            weight,
            bias,
            eps: cfg.norm_eps,
            rms,
        })
    }
}

/// The standard deviation of new residual projections (`o_proj`, `down_proj`, GPT-2's
/// `c_proj`): GPT-2's scaled init, std / sqrt(2 · layers).
fn residual_std(cfg: &ModelConfig) -> f64 {
    cfg.initializer_range / (2.0 * cfg.num_layers as f64).sqrt()
}

impl Attention {
    /// Llama's `{prefix}.{q,k,v,o}_proj` (q | k | v fused) or GPT-2's `{prefix}.c_attn`,
    /// `{prefix}.c_proj`.
    fn load(b: &mut Builder, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let (d, std) = (cfg.hidden_size, cfg.initializer_range);
        let (h, kv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        Ok(match cfg.family {
            Family::Llama => Attention {
                qkv: b.linear(
                    &[
                        (&format!("{prefix}.q_proj"), h * hd),
                        (&format!("{prefix}.k_proj"), kv * hd),
                        (&format!("{prefix}.v_proj"), kv * hd),
                    ],
                    d,
                    cfg.qkv_bias,
                    Layout::OutIn,
                    std,
                )?,
                o: b.linear(
                    &[(&format!("{prefix}.o_proj"), d)],
                    h * hd,
                    cfg.o_bias,
                    Layout::OutIn,
                    residual_std(cfg),
                )?,
                qkv_lora: None,
                o_lora: None,
            },
            Family::Gpt2 => Attention {
                qkv: b.linear(
                    &[(&format!("{prefix}.c_attn"), 3 * d)],
                    d,
                    true,
                    Layout::InOut,
                    std,
                )?,
                o: b.linear(
                    &[(&format!("{prefix}.c_proj"), d)],
                    d,
                    true,
                    Layout::InOut,
                    residual_std(cfg),
                )?,
                qkv_lora: None,
                o_lora: None,
            },
        })
    }
}

impl Mlp {
    /// Llama's `{prefix}.{gate,up,down}_proj` (gate | up fused) or GPT-2's `{prefix}.c_fc`,
    /// `{prefix}.c_proj`.
    fn load(b: &mut Builder, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let (d, inter, std) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.initializer_range,
        );
        Ok(match cfg.family {
            Family::Llama => Mlp {
                up: b.linear(
                    &[
                        (&format!("{prefix}.gate_proj"), inter),
                        (&format!("{prefix}.up_proj"), inter),
                    ],
                    d,
                    cfg.mlp_bias,
                    Layout::OutIn,
                    std,
                )?,
                down: b.linear(
                    &[(&format!("{prefix}.down_proj"), d)],
                    inter,
                    cfg.mlp_bias,
                    Layout::OutIn,
                    residual_std(cfg),
                )?,
                up_lora: None,
                down_lora: None,
            },
            Family::Gpt2 => Mlp {
                up: b.linear(
                    &[(&format!("{prefix}.c_fc"), inter)],
                    d,
                    true,
                    Layout::InOut,
                    std,
                )?,
                down: b.linear(
                    &[(&format!("{prefix}.c_proj"), d)],
                    inter,
                    true,
                    Layout::InOut,
                    residual_std(cfg),
                )?,
                up_lora: None,
                down_lora: None,
            },
        })
    }
}

impl Block {
    /// Layer `l`: Llama's `model.layers.{l}` (`input_layernorm`, `self_attn`,
    /// `post_attention_layernorm`, `mlp`) or GPT-2's `transformer.h.{l}` (`ln_1`, `attn`, `ln_2`,
    /// `mlp`).
    fn load(b: &mut Builder, cfg: &ModelConfig, l: usize) -> Result<Self> {
        let [norm1, attn, norm2, mlp] = match cfg.family {
            Family::Llama => [
                "input_layernorm",
                "self_attn",
                "post_attention_layernorm",
                "mlp",
            ]
            .map(|m| format!("model.layers.{l}.{m}")),
            Family::Gpt2 => {
                ["ln_1", "attn", "ln_2", "mlp"].map(|m| format!("transformer.h.{l}.{m}"))
            }
        };
        Ok(Block {
            norm1: Norm::load(b, &norm1, cfg)?,
            attn: Attention::load(b, &attn, cfg)?,
            norm2: Norm::load(b, &norm2, cfg)?,
            mlp: Mlp::load(b, &mlp, cfg)?,
        })
    }
}

/// Keys and values of the tokens seen so far, per layer, plus what each row's next position is.
/// Created empty by [`KvCache::new`] (or [`KvCache::with_capacity`]) and filled by
/// [`CausalLm::forward_cached`].
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// [b][t_past]: whether each cached key is a real token (false for padding).
    key_mask: Vec<Vec<bool>>,
    /// [b]: the position id the next real token of each row gets.
    next_position: Vec<i64>,
    /// Positions to allocate room for when the first tokens arrive (0: exactly those tokens).
    capacity: usize,
}

/// One layer's keys and values: buffers [b, kv_heads, room, head_dim] whose first `len`
/// positions are filled. New positions are written in place while there is room (the buffer is
/// owned by the cache alone between steps), so a decoding step copies one position per layer
/// instead of the whole cache.
#[derive(Clone, Debug)]
struct LayerKv {
    k: Tensor<4>,
    v: Tensor<4>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, batch: usize) -> Self {
        Self::with_capacity(num_layers, batch, 0)
    }

    /// A cache that allocates room for `capacity` positions up front (prompt + new tokens), so
    /// generation never regrows it.
    pub fn with_capacity(num_layers: usize, batch: usize, capacity: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            key_mask: vec![Vec::new(); batch],
            next_position: vec![0; batch],
            capacity,
        }
    }

    /// Number of cached positions (padding included).
    pub fn len(&self) -> usize {
        self.key_mask.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row r of this cache repeated `counts[r]` times, in order: one prompt's keys and values
    /// shared by the several continuations that follow it (the K responses of a reward-model
    /// group). Differentiable: under autodiff the gradients of the copies flow back to the row.
    pub fn repeat_rows(&self, counts: &[usize]) -> KvCache {
        assert_eq!(
            counts.len(),
            self.key_mask.len(),
            "repeat_rows: one count per row"
        );
        let idx: Vec<i64> = counts
            .iter()
            .enumerate()
            .flat_map(|(r, &c)| std::iter::repeat_n(r as i64, c))
            .collect();
        let rep = |v: Tensor<4>| {
            let i =
                Tensor::<1, Int>::from_data(TensorData::new(idx.clone(), [idx.len()]), &v.device());
            v.select(0, i)
        };
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    l.as_ref().map(|l| {
                        // Only the filled positions travel.
                        let [b, kvh, _, hd] = l.k.dims();
                        let filled = [0..b, 0..kvh, 0..l.len, 0..hd];
                        LayerKv {
                            k: rep(l.k.clone().slice(filled.clone())),
                            v: rep(l.v.clone().slice(filled)),
                            len: l.len,
                        }
                    })
                })
                .collect(),
            key_mask: idx
                .iter()
                .map(|&r| self.key_mask[r as usize].clone())
                .collect(),
            next_position: idx
                .iter()
                .map(|&r| self.next_position[r as usize])
                .collect(),
            capacity: 0,
        }
    }
}

/// Appends k, v [b, kv_heads, t, head_dim] to a layer's cache and returns views of all cached
/// keys and values [b, kv_heads, len, head_dim]. A cache created with a capacity keeps buffers
/// with room and writes into them (regrown to the larger of the need and twice their size when
/// full); one created without (training, scoring, a repeated prefix) concatenates.
fn append_kv(
    slot: &mut Option<LayerKv>,
    k: Tensor<4>,
    v: Tensor<4>,
    capacity: usize,
) -> (Tensor<4>, Tensor<4>) {
    let [b, kvh, t, hd] = k.dims();
    let past = slot.as_ref().map_or(0, |c| c.len);
    let total = past + t;
    if slot.is_none() && capacity <= t {
        // Nothing to reuse (a training or scoring forward): keep the tensors as they are.
        *slot = Some(LayerKv {
            k: k.clone(),
            v: v.clone(),
            len: t,
        });
        return (k, v);
    }
    if capacity == 0
        && let Some(c) = slot.take()
    {
        // No room was asked for (training, scoring): append by concatenation, which autodiff
        // differentiates directly.
        let filled = [0..b, 0..kvh, 0..past, 0..hd];
        let k = Tensor::cat(vec![c.k.slice(filled.clone()), k], 2);
        let v = Tensor::cat(vec![c.v.slice(filled), v], 2);
        *slot = Some(LayerKv {
            k: k.clone(),
            v: v.clone(),
            len: total,
        });
        return (k, v);
    }
    let (mut bk, mut bv, _) = buffers_with_room(slot, [b, kvh, hd], total, capacity, &k.device());
    let new = [0..b, 0..kvh, past..total, 0..hd];
    bk = bk.slice_assign(new.clone(), k);
    bv = bv.slice_assign(new, v);
    let all = [0..b, 0..kvh, 0..total, 0..hd];
    let views = (bk.clone().slice(all.clone()), bv.clone().slice(all));
    *slot = Some(LayerKv {
        k: bk,
        v: bv,
        len: total,
    });
    views
}

/// Whether [`append_kv`] writes into buffers with room (a cache created with a capacity, past
/// a first call that needs no more room than its own positions).
fn appends_in_place(slot: &Option<LayerKv>, t: usize, capacity: usize) -> bool {
    capacity > 0 && (slot.is_some() || capacity > t)
}

/// A layer's key and value buffers [b, kv_heads, room, hd] with room for `total` positions,
/// taken out of `slot`, and how many positions they hold: the slot's own while they have the
/// room, else new ones of the larger of `total`, twice the old room and `capacity`, with the old
/// positions copied over.
fn buffers_with_room(
    slot: &mut Option<LayerKv>,
    [b, kvh, hd]: [usize; 3],
    total: usize,
    capacity: usize,
    device: &Device,
) -> (Tensor<4>, Tensor<4>, usize) {
    let (past, room) = slot.as_ref().map_or((0, 0), |c| (c.len, c.k.dims()[2]));
    match slot.take() {
        Some(c) if room >= total => (c.k, c.v, past),
        old => {
            let room = total.max(2 * room).max(capacity);
            let mut bk = Tensor::zeros([b, kvh, room, hd], device);
            let mut bv = Tensor::zeros([b, kvh, room, hd], device);
            if let Some(c) = old {
                let filled = [0..b, 0..kvh, 0..past, 0..hd];
                bk = bk.slice_assign(filled.clone(), c.k.slice(filled.clone()));
                bv = bv.slice_assign(filled.clone(), c.v.slice(filled));
            }
            (bk, bv, past)
        }
    }
}

/// Which heads a model is created or loaded with. A policy has an LM head; a reward or value
/// model has a scalar head and no LM head (HF `*ForSequenceClassification` has none); a trunk
/// alone (`Heads::NONE`) is what a new reward model starts from before its head is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub lm: bool,
    pub scalar: bool,
}

impl Heads {
    pub const LM: Self = Self {
        lm: true,
        scalar: false,
    };
    pub const SCALAR: Self = Self {
        lm: false,
        scalar: true,
    };
    pub const BOTH: Self = Self {
        lm: true,
        scalar: true,
    };
    pub const NONE: Self = Self {
        lm: false,
        scalar: false,
    };
}

/// A causal language model with the heads it was created with: an LM head, a scalar head
/// (reward / value), or both.
#[derive(Module, Debug)]
pub struct CausalLm {
    embed: Embedding,
    /// GPT-2's learned position table; None for RoPE models.
    positions: Option<Embedding>,
    layers: Vec<Block>,
    norm: Norm,
    /// Untied LM head; None when the head is tied to `embed` or there is no LM head.
    lm_head: Option<Linear>,
    /// Whether the model has an LM head (tied to `embed` when `lm_head` is None).
    #[module(skip)]
    has_lm: bool,
    /// Scalar head `[d, 1]` (reward / value), HF `score`.
    score: Option<Linear>,
    dropout: Dropout,
    #[module(skip)]
    config: Arc<ModelConfig>,
    #[module(skip)]
    specs: Arc<Vec<ParamSpec>>,
    /// The LoRA adapters' settings and tensors (PEFT names without `base_model.model.`), when
    /// the model has adapters.
    #[module(skip)]
    lora: Option<Arc<(LoraConfig, Vec<ParamSpec>)>>,
    /// The dtypes of the files the weights were read from (empty for a new model).
    #[module(skip)]
    file_dtypes: Arc<Vec<String>>,
    /// RoPE inverse frequencies [head_dim / 2] (llama3 scaling applied).
    #[module(skip)]
    inv_freq: Arc<Vec<f32>>,
    /// cos and sin of `position · inv_freq` for the positions computed so far, shared by the
    /// model's copies; grown on demand by [`CausalLm::rope_tables`].
    #[module(skip)]
    rope_cache: Arc<Mutex<RopeCache>>,
}

/// Host RoPE tables, [positions, head_dim / 2] each, row p = cos / sin of (p as f32 · inv_freq).
#[derive(Debug, Default)]
struct RopeCache {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeCache {
    /// Makes the tables cover positions 0..len (rounded up to a power of two).
    fn ensure(&mut self, inv_freq: &[f32], len: usize) {
        let half = inv_freq.len();
        let have = self.cos.len().checked_div(half).unwrap_or(0);
        if half == 0 || have >= len {
            return;
        }
        let len = len.next_power_of_two().max(64);
        self.cos.reserve((len - have) * half);
        self.sin.reserve((len - have) * half);
        for p in have..len {
            for &f in inv_freq {
                let a = p as f32 * f;
                self.cos.push(a.cos());
                self.sin.push(a.sin());
            }
        }
    }
}

fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    if cfg.family != Family::Llama {
        return Vec::new();
    }
    let dim = cfg.head_dim;
    // As transformers: base ** (arange(0, dim, 2) / dim) in f32.
    let mut inv: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / dim as f32))
        .collect();
    if let Some(s) = cfg.rope_llama3 {
        let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
        let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
        for f in inv.iter_mut() {
            let freq = *f as f64;
            let wavelen = std::f64::consts::TAU / freq;
            let scaled = if wavelen > low_wavelen {
                freq / s.factor
            } else {
                freq
            };
            let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
            let out = if medium {
                let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * scaled / s.factor + smooth * scaled
            } else {
                scaled
            };
            *f = out as f32;
        }
    }
    inv
}

impl CausalLm {
    fn build(cfg: &ModelConfig, b: &mut Builder, heads: Heads) -> Result<Self> {
        crate::device::tune_allocator();
        let d = cfg.hidden_size;
        let std = cfg.initializer_range;
        // The order of the loads is the order random weights are drawn in (seeded models).
        let (embed, positions) = match cfg.family {
            Family::Llama => (
                b.embedding("model.embed_tokens.weight", cfg.vocab_size, d, std)?,
                None,
            ),
            Family::Gpt2 => (
                b.embedding("transformer.wte.weight", cfg.vocab_size, d, std)?,
                Some(b.embedding(
                    "transformer.wpe.weight",
                    cfg.max_position_embeddings,
                    d,
                    0.01,
                )?),
            ),
        };
        let layers = (0..cfg.num_layers)
            .map(|l| Block::load(b, cfg, l))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = match cfg.family {
            Family::Llama => Norm::load(b, "model.norm", cfg)?,
            Family::Gpt2 => Norm::load(b, "transformer.ln_f", cfg)?,
        };
        let lm_head = if heads.lm && !cfg.tie_word_embeddings {
            if let crate::weights::Source::File(f) = &b.source
                && !f.contains("lm_head.weight")
            {
                return Err(ModelError::MissingHead {
                    path: f.path_of("lm_head.weight").to_path_buf(),
                    head: "LM head (lm_head.weight)",
                    hint: "this looks like a reward or value model (*ForSequenceClassification); give a causal-LM (policy / SFT) folder here".into(),
                });
            }
            Some(b.linear(&[("lm_head", cfg.vocab_size)], d, false, Layout::OutIn, std)?)
        } else {
            None
        };
        let score = if heads.scalar {
            Some(b.linear(
                &[("score", 1)],
                d,
                false,
                Layout::OutIn,
                1.0 / (d as f64 + 1.0).sqrt(),
            )?)
        } else {
            None
        };
        Ok(Self {
            embed,
            positions,
            layers,
            norm: final_norm,
            lm_head,
            has_lm: heads.lm,
            score,
            dropout: DropoutConfig::new(cfg.dropout).init(),
            file_dtypes: Arc::new(match &b.source {
                crate::weights::Source::File(f) => f.dtypes(),
                crate::weights::Source::Random(_) => Vec::new(),
            }),
            inv_freq: Arc::new(rope_inv_freq(cfg)),
            rope_cache: Arc::default(),
            config: Arc::new(cfg.clone()),
            specs: Arc::new(std::mem::take(&mut b.specs)),
            lora: None,
        })
    }

    /// A new causal LM with seeded random weights: an LM head, and a scalar head too when
    /// `scalar_head`.
    pub fn new(cfg: &ModelConfig, scalar_head: bool, seed: u64, device: &Device) -> Result<Self> {
        let heads = Heads {
            lm: true,
            scalar: scalar_head,
        };
        let mut b = Builder::random(seed, device);
        Self::build(cfg, &mut b, heads)
    }

    /// A model with the weights of `files` and the given heads. A head asked for but absent from
    /// the files (`lm_head.weight` of an untied model, `score.weight`) is an error naming it.
    pub fn from_safetensors(
        cfg: &ModelConfig,
        files: &SafetensorsFiles,
        heads: Heads,
        device: &Device,
    ) -> Result<Self> {
        let mut b = Builder::from_files(files, device);
        Self::build(cfg, &mut b, heads)
    }

    /// The same model without its LM head (a reward or value model carries none).
    pub fn without_lm_head(mut self) -> Self {
        self.lm_head = None;
        self.has_lm = false;
        self
    }

    /// The heads this model has.
    pub fn heads(&self) -> Heads {
        Heads {
            lm: self.has_lm,
            scalar: self.score.is_some(),
        }
    }

    pub fn has_lm_head(&self) -> bool {
        self.has_lm
    }

    /// Adds a freshly initialised scalar head (a reward model started from a policy); keeps an
    /// existing one.
    pub fn with_scalar_head(mut self, seed: u64) -> Self {
        if self.score.is_some() {
            return self;
        }
        let device = self.embed.weight.val().device();
        let d = self.config.hidden_size;
        let mut b = Builder::random(seed, &device);
        let score = b
            .linear(
                &[("score", 1)],
                d,
                false,
                Layout::OutIn,
                1.0 / (d as f64 + 1.0).sqrt(),
            )
            .expect("random init cannot fail");
        let mut specs = (*self.specs).clone();
        specs.extend(b.specs);
        self.specs = Arc::new(specs);
        self.score = Some(score);
        self
    }

    /// Sets the dropout probability of the embeddings and residual branches (training only).
    pub fn with_dropout(mut self, prob: f64) -> Self {
        self.dropout = DropoutConfig::new(prob).init();
        let mut cfg = (*self.config).clone();
        cfg.dropout = prob;
        self.config = Arc::new(cfg);
        self
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The model with new LoRA adapters ([`crate::lora`]) on the modules `cfg` targets (A from
    /// `seed`, B zero: the same outputs as without) and every other weight frozen (no gradient,
    /// so no optimizer state) but a scalar head's, which trains with them.
    pub fn with_lora(self, cfg: &LoraConfig, seed: u64) -> Result<Self> {
        self.attach_lora(cfg, &mut AdapterSource::new(seed))
    }

    /// The model as a LoRA run trains it: with the adapters of the run's checkpoint `resume`
    /// (its `adapter/` folder) when resuming, else with new ones ([`Self::with_lora`]).
    pub fn adapt(self, cfg: &LoraConfig, seed: u64, resume: Option<&Path>) -> Result<Self> {
        match resume {
            Some(dir) => self.load_lora(&dir.join(lora::ADAPTER_DIR)),
            None => self.with_lora(cfg, seed),
        }
    }

    /// The model with the saved adapter folder `dir` (ours, or one PEFT wrote) attached, its
    /// base weights frozen. A tensor of the adapter that fits no module is an error naming it.
    pub fn load_lora(self, dir: &Path) -> Result<Self> {
        let (cfg, files) = lora::read_adapter(dir)?;
        let model = self.attach_lora(&cfg, &mut AdapterSource::File(&files))?;
        let used: std::collections::HashSet<String> = model
            .lora
            .as_ref()
            .map(|l| {
                l.1.iter()
                    .map(|s| format!("{}{}", lora::PEFT_PREFIX, s.parts[0].0))
                    .collect()
            })
            .unwrap_or_default();
        let mut extra: Vec<&str> = files.names().filter(|n| !used.contains(*n)).collect();
        extra.sort_unstable();
        if let Some(name) = extra.first() {
            return Err(ModelError::Invalid(format!(
                "{}: tensor `{name}` (and {} more) belongs to no adapted module of this {:?} model of {} layers (adapter_config.json targets {:?}); is the adapter for another base model?",
                dir.join(lora::ADAPTER_WEIGHTS).display(),
                extra.len() - 1,
                model.config.family,
                model.config.num_layers,
                cfg.target_modules,
            )));
        }
        Ok(model)
    }

    fn attach_lora(self, cfg: &LoraConfig, source: &mut AdapterSource) -> Result<Self> {
        if self.lora.is_some() {
            return Err(ModelError::Invalid(
                "the model already has LoRA adapters; merge them first (`model merge`)".into(),
            ));
        }
        if let Some((key, msg)) = cfg.problems().into_iter().next() {
            return Err(ModelError::Invalid(format!("lora.{key} {msg}")));
        }
        let targets = cfg.targets(self.config.family);
        let device = self.device();
        let specs = self.specs.clone();
        let spec_of = |lin: &Linear| {
            specs
                .iter()
                .find(|s| s.id == lin.weight.id)
                .expect("every linear layer has a spec")
        };
        let mut lora_specs = Vec::new();
        let mut modules = Vec::new();
        let mut model = self.no_grad();
        for block in model.layers.iter_mut() {
            let (a, m) = (&mut block.attn, &mut block.mlp);
            for (lin, slot) in [
                (&a.qkv, &mut a.qkv_lora),
                (&a.o, &mut a.o_lora),
                (&m.up, &mut m.up_lora),
                (&m.down, &mut m.down_lora),
            ] {
                let d_in = lin.weight.val().dims()[0];
                modules.extend(spec_of(lin).parts.iter().map(|p| p.0.clone()));
                *slot = lora::build(
                    spec_of(lin),
                    d_in,
                    &targets,
                    cfg,
                    source,
                    &device,
                    &mut lora_specs,
                )?;
            }
        }
        // As PEFT: a target that matches no module is an error, not an adapter that is not there.
        for t in &targets {
            if !modules
                .iter()
                .any(|m| lora::targeted(m.strip_suffix(".weight").unwrap_or(m), t))
            {
                return Err(ModelError::Invalid(format!(
                    "lora.target_modules: `{t}` matches no linear layer of this {:?} model; expected some of {} (as PEFT names them), or \"all-linear\"",
                    model.config.family,
                    lora::module_names(model.config.family).join(", ")
                )));
            }
        }
        // A reward or value model's scalar head trains with the adapters (PEFT's
        // `modules_to_save = ["score"]` of a sequence classifier) and is saved with them.
        if let Some(Linear { weight, bias }) = model.score.take() {
            let mut weight = weight.set_require_grad(true);
            if let AdapterSource::File(files) = source {
                let name = format!("{}score.weight", lora::PEFT_PREFIX);
                if files.contains(&name) {
                    let d = model.config.hidden_size;
                    let w = files.read(&name, &[1, d])?;
                    let id = weight.id;
                    weight =
                        Param::from_tensor(Tensor::from_data(TensorData::new(w, [d, 1]), &device));
                    weight.id = id;
                }
            }
            if let Some(spec) = specs.iter().find(|s| s.id == weight.id) {
                lora_specs.push(spec.clone());
            }
            model.score = Some(Linear {
                weight,
                bias: bias.map(|b| b.set_require_grad(true)),
            });
        }
        model.lora = Some(Arc::new((cfg.clone(), lora_specs)));
        Ok(model)
    }

    /// The LoRA settings of the model's adapters, when it has any.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref().map(|l| &l.0)
    }

    /// The adapters' tensors under PEFT's names (`base_model.model.<module>.lora_A.weight`
    /// [r, in], `lora_B.weight` [out, r]; a scalar head's `score.weight`), f32; empty without
    /// adapters.
    pub fn lora_tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        match &self.lora {
            None => Vec::new(),
            Some(l) => hf_tensors(self, &l.1)
                .into_iter()
                .map(|(n, shape, v)| (format!("{}{n}", lora::PEFT_PREFIX), shape, v))
                .collect(),
        }
    }

    /// The same model without its adapters: the base weights, shared (not copied), what the
    /// adapters were trained from (PPO's reference policy).
    pub fn without_lora(&self) -> Self {
        let mut m = self.clone();
        for block in m.layers.iter_mut() {
            block.attn.qkv_lora = None;
            block.attn.o_lora = None;
            block.mlp.up_lora = None;
            block.mlp.down_lora = None;
        }
        m.lora = None;
        m
    }

    /// The model with its frozen matrices (embeddings, attention and MLP projections, the LM
    /// head) kept in bf16 when `dtype` says so for the files it was read from
    /// ([`WeightDtype::keeps_bf16`]); unchanged otherwise. Only for weights that are not
    /// trained: a model that is not trained at all (a KL reference, a scoring reward model), or
    /// the base under LoRA adapters ([`Self::with_lora`]; the adapters and a scalar head stay f32
    /// and train). Each matrix is converted in turn (one f32 matrix extra at a time).
    pub fn keep_frozen(mut self, dtype: WeightDtype) -> Self {
        if !dtype.keeps_bf16(&self.file_dtypes) {
            return self;
        }
        fn to_bf16<const D: usize>(p: &mut Param<Tensor<D>>) {
            let id = p.id;
            let t = p.val().detach().cast(burn::tensor::FloatDType::BF16);
            *p = Param::from_tensor(t).set_require_grad(false);
            p.id = id;
        }
        to_bf16(&mut self.embed.weight);
        if let Some(pos) = self.positions.as_mut() {
            to_bf16(&mut pos.weight);
        }
        for block in self.layers.iter_mut() {
            for lin in [
                &mut block.attn.qkv,
                &mut block.attn.o,
                &mut block.mlp.up,
                &mut block.mlp.down,
            ] {
                to_bf16(&mut lin.weight);
            }
        }
        if let Some(head) = self.lm_head.as_mut() {
            to_bf16(&mut head.weight);
        }
        self
    }

    /// Whether the token embedding (and with it every frozen matrix, [`Self::keep_frozen`]) is
    /// kept in bf16.
    pub fn keeps_bf16(&self) -> bool {
        self.embed.weight.val().dtype() == burn::tensor::DType::BF16
    }

    /// The dtypes of the weight files the model was read from, e.g. `["BF16"]` (empty for a new
    /// model).
    pub fn file_dtypes(&self) -> &[String] {
        &self.file_dtypes
    }

    /// The model with its adapters merged into the weights (W + A·B·scale) and removed.
    pub fn merge_lora(mut self) -> Self {
        fn merge(lin: &mut Linear, lora: Option<Lora>) {
            if let Some(l) = lora {
                let w = f32_of(lin.weight.val()) + l.merged_delta();
                let id = lin.weight.id;
                lin.weight = Param::from_tensor(w.detach());
                lin.weight.id = id;
            }
        }
        for block in self.layers.iter_mut() {
            let (a, m) = (&mut block.attn, &mut block.mlp);
            merge(&mut a.qkv, a.qkv_lora.take());
            merge(&mut a.o, a.o_lora.take());
            merge(&mut m.up, m.up_lora.take());
            merge(&mut m.down, m.down_lora.take());
        }
        self.lora = None;
        self
    }

    pub fn has_scalar_head(&self) -> bool {
        self.score.is_some()
    }

    pub fn device(&self) -> Device {
        self.embed.weight.val().device()
    }

    /// The model's tensors under their HF names, as saved (f32). A model with a scalar head is
    /// saved as `*ForSequenceClassification`, which has no LM head.
    ///
    /// A model with LoRA adapters gives its merged weights (the adapters' own tensors are
    /// [`Self::lora_tensors`]).
    pub fn hf_tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        if self.lora.is_some() {
            return self.clone().merge_lora().hf_tensors();
        }
        let mut t = hf_tensors(self, &self.specs);
        if self.score.is_some() {
            t.retain(|(n, _, _)| n != "lm_head.weight");
        }
        t
    }

    /// Writes the model's weights, as [`Self::hf_tensors`] gives them (merged with its adapters,
    /// if any), to the safetensors file `path`, computing each tensor as it is written: the same
    /// bytes as `write_safetensors(path, &self.hf_tensors())`, without a copy of the whole model
    /// in memory (for a 0.5B model that copy was ~4 GB on top of the run's own).
    ///
    /// In f32, or in bf16 when the model keeps its frozen matrices in bf16
    /// ([`Self::keep_frozen`]: a LoRA base read from a bf16 file saves as bf16, as PEFT's merge of
    /// a bf16 model does; the merged sums and trained heads rounded to nearest). A fully trained
    /// model holds f32 weights and writes f32 (its checkpoints resume from them bit for bit).
    pub fn write_weights(&self, path: &Path) -> Result<()> {
        use burn::module::{ModuleVisitor, ParamId};
        use std::collections::{HashMap, HashSet};
        /// Each wanted parameter's value as a flat view (no copy) and its shape.
        struct Handles {
            wanted: HashSet<ParamId>,
            found: HashMap<ParamId, (Tensor<1>, Vec<usize>)>,
        }
        impl ModuleVisitor for Handles {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
                if self.wanted.contains(&p.id) {
                    let t = p.val();
                    let dims = t.dims().to_vec();
                    let n = dims.iter().product::<usize>();
                    self.found.insert(p.id, (t.reshape([n]), dims));
                }
            }
        }
        let mut h = Handles {
            wanted: self.specs.iter().map(|s| s.id).collect(),
            found: HashMap::new(),
        };
        self.visit(&mut h);
        // Adapted weights are written merged: W + A·B·scale, computed when written.
        let mut adapted: HashMap<ParamId, (Tensor<2>, &Lora)> = HashMap::new();
        for block in &self.layers {
            let (a, m) = (&block.attn, &block.mlp);
            for (lin, lora) in [
                (&a.qkv, &a.qkv_lora),
                (&a.o, &a.o_lora),
                (&m.up, &m.up_lora),
                (&m.down, &m.down_lora),
            ] {
                if let Some(l) = lora {
                    adapted.insert(lin.weight.id, (lin.weight.val(), l));
                }
            }
        }
        let (found, adapted) = (&h.found, &adapted);
        let bf16 = self.keeps_bf16();
        let mut tensors = Vec::new();
        for spec in self.specs.iter() {
            let Some((flat, dims)) = found.get(&spec.id) else {
                continue;
            };
            for k in 0..spec.parts.len() {
                let (name, w) = (&spec.parts[k].0, spec.parts[k].1);
                if self.score.is_some() && name == "lm_head.weight" {
                    continue;
                }
                let shape = match (dims.len(), spec.layout) {
                    (1, _) => vec![w],
                    (_, Layout::OutIn) => vec![w, dims[0]],
                    _ => vec![dims[0], w],
                };
                tensors.push(crate::weights::LazyTensor {
                    name: name.clone(),
                    shape,
                    values: Box::new(move || {
                        let data = match adapted.get(&spec.id) {
                            Some((w, l)) => (f32_of(w.clone()) + l.merged_delta()).into_data(),
                            None => flat.clone().into_data(),
                        };
                        crate::weights::hf_part(spec, k, dims, &crate::ops::data_f32(data)).2
                    }),
                    bf16,
                });
            }
        }
        crate::weights::write_lazy(path, &tensors)
    }

    /// Hidden states after the final norm. tokens/mask: [b, t] → [b, t, d]; the rows of padding
    /// positions are zero.
    ///
    /// A batch with padding runs unpadded: the embedding, norms, projections and MLP (all the
    /// products but attention's) see only the real tokens, as one row of n tokens, and only
    /// attention works in the padded layout (its queries, keys and values are scattered into
    /// it, and its output gathered back). A real token's result is the same as in the padded
    /// computation, since no real token attends to padding; what is saved is the work on the
    /// padding positions (about 30% of a batch of 16 chat examples padded to the longest).
    pub fn forward(&self, batch: &TokenBatch) -> Tensor<3> {
        let mut cache = KvCache::new(self.layers.len(), batch.batch);
        let real = batch.real_tokens();
        let unpad = real > 0 && real < batch.tokens.len();
        self.run(batch, &mut cache, unpad, false)
    }

    /// Runs `batch` after what `cache` holds and appends its keys and values to the cache.
    /// Padding tokens in `batch` (mask 0) are never attended to. Returns hidden states
    /// [b, t_new, d].
    pub fn forward_cached(&self, batch: &TokenBatch, cache: &mut KvCache) -> Tensor<3> {
        self.run(batch, cache, false, true)
    }

    /// [`Self::forward_cached`], with the position-wise work on the real tokens only when
    /// `unpad` (see [`Self::forward`]); the keys and values are appended to `cache` when `keep`.
    fn run(&self, batch: &TokenBatch, cache: &mut KvCache, unpad: bool, keep: bool) -> Tensor<3> {
        let device = self.device();
        let (bsz, t) = (batch.batch, batch.seq);
        let past = cache.len();
        // Positions: each row continues from its own next position; padding takes the position
        // of the next real token (its value never matters, it is masked as a key).
        let mut pos = Vec::with_capacity(bsz * t);
        for (r, next) in cache.next_position.iter_mut().enumerate() {
            for j in 0..t {
                pos.push(*next);
                if batch.mask[r * t + j] {
                    *next += 1;
                }
            }
            cache.key_mask[r].extend_from_slice(&batch.mask[r * t..(r + 1) * t]);
        }
        // Attention bias [b, 1, t, past + t]: masked keys and the future.
        let total = past + t;
        let mut bias = vec![0f32; bsz * t * total];
        for r in 0..bsz {
            let km = &cache.key_mask[r];
            for i in 0..t {
                let row = &mut bias[(r * t + i) * total..(r * t + i + 1) * total];
                for (j, v) in row.iter_mut().enumerate() {
                    if j > past + i || !km[j] {
                        *v = MASKED;
                    }
                }
            }
        }
        let bias: Tensor<4> = Tensor::from_data(TensorData::new(bias, [bsz, 1, t, total]), &device);
        // The flat indices (row · t + position) of the real tokens, when running unpadded; the
        // position-wise work then runs on [1, n, d].
        let real: Option<Vec<usize>> =
            unpad.then(|| (0..bsz * t).filter(|&i| batch.mask[i]).collect());
        let rows = real.as_ref().map(|idx| Rows {
            idx: fused::Rows::new(idx.clone(), &device),
            bsz,
            t,
        });
        // Token ids and position ids in the layout the position-wise work runs in.
        let (ids, lay): (Vec<usize>, [usize; 2]) = match &real {
            Some(idx) => (
                idx.iter().map(|&i| batch.tokens[i] as usize).collect(),
                [1, idx.len()],
            ),
            None => (batch.tokens.iter().map(|&x| x as usize).collect(), [bsz, t]),
        };
        // Token (and GPT-2's position) embeddings: rows of the table, in that layout.
        let lookup = |table: &Embedding, ids: Vec<usize>| {
            let w = table.weight.val();
            let d = w.dims()[1];
            fused::embedding(w, ids).reshape([lay[0], lay[1], d])
        };
        let mut x = lookup(&self.embed, ids);
        let rope = match &self.positions {
            Some(table) => {
                let max = self.config.max_position_embeddings as i64 - 1;
                let p: Vec<usize> = match &real {
                    Some(idx) => idx.iter().map(|&i| pos[i].min(max) as usize).collect(),
                    None => pos.iter().map(|&p| p.min(max) as usize).collect(),
                };
                x = x + lookup(table, p);
                None
            }
            None => Some(self.rope_tables(&pos, bsz, t, &device)),
        };
        x = self.dropout.forward(x);
        for (l, block) in self.layers.iter().enumerate() {
            let h = block.norm1.forward(x.clone());
            let a = self.attention(
                &block.attn,
                h,
                rows.as_ref(),
                &bias,
                rope.as_ref(),
                &mut cache.layers[l],
                cache.capacity,
                keep,
            );
            x = x + self.dropout.forward(a);
            let h = block.norm2.forward(x.clone());
            let m = self.mlp(&block.mlp, h);
            x = x + self.dropout.forward(m);
        }
        let x = self.norm.forward(x);
        match &rows {
            Some(rows) => rows.pad(x),
            None => x,
        }
    }

    /// cos and sin tables [b, t, 1, head_dim] for RoPE at the given positions.
    fn rope_tables(
        &self,
        pos: &[i64],
        bsz: usize,
        t: usize,
        device: &Device,
    ) -> (Tensor<4>, Tensor<4>) {
        let half = self.inv_freq.len();
        let hd = 2 * half;
        let mut cos = Vec::with_capacity(pos.len() * hd);
        let mut sin = Vec::with_capacity(pos.len() * hd);
        let max = pos.iter().copied().max().unwrap_or(0).max(0) as usize;
        let mut table = self.rope_cache.lock().unwrap_or_else(|e| e.into_inner());
        table.ensure(&self.inv_freq, max + 1);
        for &p in pos {
            let row = p.max(0) as usize * half..(p.max(0) as usize + 1) * half;
            cos.extend_from_slice(&table.cos[row.clone()]);
            cos.extend_from_slice(&table.cos[row.clone()]);
            sin.extend_from_slice(&table.sin[row.clone()]);
            sin.extend_from_slice(&table.sin[row]);
        }
        drop(table);
        (
            Tensor::from_data(TensorData::new(cos, [bsz, t, 1, hd]), device),
            Tensor::from_data(TensorData::new(sin, [bsz, t, 1, hd]), device),
        )
    }

    /// x: [b, t, d] → [b, t, d]; or, with `rows`, the real tokens [1, n, d] → [1, n, d] (the
    /// scores, softmax and weighted values in the padded layout `rows` describes). The keys and
    /// values are appended to `cache` when `keep`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        attn: &Attention,
        x: Tensor<3>,
        rows: Option<&Rows>,
        bias: &Tensor<4>,
        rope: Option<&(Tensor<4>, Tensor<4>)>,
        cache: &mut Option<LayerKv>,
        capacity: usize,
        keep: bool,
    ) -> Tensor<3> {
        let cfg = &*self.config;
        let (h, kv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let parts = [
            0..h * hd,
            h * hd..(h + kv) * hd,
            (h + kv) * hd..(h + 2 * kv) * hd,
        ];
        let scale = 1.0 / (hd as f64).sqrt();
        // No cache to fill (a training or scoring forward): one product by the q | k | v weight,
        // then the attention as one fused node.
        let projected = if !keep && cache.is_none() && fused::attention_fused() {
            let [bsz, t] = match rows {
                Some(rows) => [rows.bsz, rows.t],
                None => [x.dims()[0], x.dims()[1]],
            };
            let y = project(&attn.qkv, &attn.qkv_lora, x.clone());
            let rows_idx = rows.map(|r| &r.idx);
            match fused::attention(&y, rows_idx, [bsz, t], bias, rope, [h, kv, hd], scale) {
                Some(ctx) => return project(&attn.o, &attn.o_lora, ctx),
                None => Some(y),
            }
        } else {
            None
        };
        let (q, k, v) = if let Some(y) = projected {
            let [bsz, t, _] = y.dims();
            let qkv = parts.clone().map(|r| y.clone().slice([0..bsz, 0..t, r]));
            self.split_heads(qkv, rows, rope, cache, capacity)
        } else if x.is_autodiff() {
            self.split_heads(
                split_project(&attn.qkv, &attn.qkv_lora, x, parts),
                rows,
                rope,
                cache,
                capacity,
            )
        } else {
            // Inference: one product, whose column blocks are q, k and v.
            let y = project(&attn.qkv, &attn.qkv_lora, x);
            let fused = match (rows, rope) {
                (None, Some(tables)) => self.rope_into_cache(&y, tables, cache, capacity),
                _ => None,
            };
            fused.unwrap_or_else(|| {
                let [bsz, t, _] = y.dims();
                let qkv = parts.map(|r| y.clone().slice([0..bsz, 0..t, r]));
                self.split_heads(qkv, rows, rope, cache, capacity)
            })
        };
        // The padded layout's sizes (`rows` unpads x).
        let [bsz, _, t, _] = q.dims();
        if t == 1
            && rows.is_none()
            && let Some(ctx) = fused::decode_attention(&q, &k, &v, bias, scale)
        {
            // A decoding step: scores, softmax and weighted values per head in one pass.
            return project(&attn.o, &attn.o_lora, ctx);
        }
        let total = k.dims()[2];
        let (k, v) = if h == kv {
            (k, v)
        } else {
            let rep = h / kv;
            let expand = |x: Tensor<4>| {
                x.reshape([bsz, kv, 1, total, hd])
                    .expand([bsz, kv, rep, total, hd])
                    .reshape([bsz, h, total, hd])
            };
            (expand(k), expand(v))
        };
        let scores = fused::matmul(q, k.swap_dims(2, 3));
        let weights = fused::masked_softmax(scores, bias, scale);
        let ctx = fused::matmul(weights, v);
        let ctx = ctx.swap_dims(1, 2).reshape([bsz, t, h * hd]);
        let ctx = match rows {
            Some(rows) => rows.gather(ctx),
            None => ctx,
        };
        project(&attn.o, &attn.o_lora, ctx)
    }

    /// [`Self::split_heads`] for a cache that appends in place, from the fused projection
    /// y [b, t, (h + 2 · kv) · hd]: the rotated keys and the values written straight into the
    /// cache buffers ([`fused::rope_qkv_into_cache`]). None, the cache as it was (its buffers
    /// grown if they had to be), where that does not apply.
    fn rope_into_cache(
        &self,
        y: &Tensor<3>,
        (cos, sin): &(Tensor<4>, Tensor<4>),
        cache: &mut Option<LayerKv>,
        capacity: usize,
    ) -> Option<(Tensor<4>, Tensor<4>, Tensor<4>)> {
        let cfg = &*self.config;
        let (h, kv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let [bsz, t, _] = y.dims();
        if !appends_in_place(cache, t, capacity) {
            return None;
        }
        let total = cache.as_ref().map_or(0, |c| c.len) + t;
        let (bk, bv, past) = buffers_with_room(cache, [bsz, kv, hd], total, capacity, &y.device());
        let mut bufs = [bk, bv];
        let q = fused::rope_qkv_into_cache(y, cos, sin, &mut bufs, [h, kv, hd], past);
        let all = [0..bsz, 0..kv, 0..total, 0..hd];
        let views = q.map(|q| {
            let [k, v] = bufs.clone().map(|b| b.slice(all.clone()));
            (q, k, v)
        });
        let len = if views.is_some() { total } else { past };
        let [k, v] = bufs;
        *cache = Some(LayerKv { k, v, len });
        views
    }

    /// The q, k, v blocks [b, t, ·] of the projection (or, with `rows`, of the real tokens) as
    /// heads: q [b, h, t, hd] rotated, and all the cached keys and values [b, kv, len, hd] after
    /// this step's are appended.
    fn split_heads(
        &self,
        qkv: [Tensor<3>; 3],
        rows: Option<&Rows>,
        rope: Option<&(Tensor<4>, Tensor<4>)>,
        cache: &mut Option<LayerKv>,
        capacity: usize,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let cfg = &*self.config;
        let (h, kv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let [q, k, v] = match rows {
            Some(rows) => qkv.map(|y| rows.pad(y)),
            None => qkv,
        };
        let [bsz, t, _] = q.dims();
        let (q, k) = (q.reshape([bsz, t, h, hd]), k.reshape([bsz, t, kv, hd]));
        let (q, k) = match rope {
            Some((cos, sin)) => (fused::rope(q, cos, sin), fused::rope(k, cos, sin)),
            None => (q, k),
        };
        let q = q.swap_dims(1, 2);
        let k = k.swap_dims(1, 2);
        let v = v.reshape([bsz, t, kv, hd]).swap_dims(1, 2);
        let (k, v) = append_kv(cache, k, v, capacity);
        (q, k, v)
    }

    fn mlp(&self, mlp: &Mlp, x: Tensor<3>) -> Tensor<3> {
        let hidden = match self.config.activation {
            // One product by the gate | up weight, then the activation on its two halves.
            Activation::Silu => fused::swiglu_joined(project(&mlp.up, &mlp.up_lora, x)),
            Activation::GeluTanh => gelu_tanh(project(&mlp.up, &mlp.up_lora, x)),
            Activation::Gelu => gelu(project(&mlp.up, &mlp.up_lora, x)),
        };
        project(&mlp.down, &mlp.down_lora, hidden)
    }

    /// The weights that every step of a generation multiplies (each layer's projections and the
    /// LM head), packed for the generation's products while the returned value lives (bf16 tile
    /// panels under `matmul = "bf16"` on AMX, f32 panels in f32 on AVX-512 for small enough
    /// models): see [`fused::PackedWeights`].
    pub fn pack_for_decoding(&self) -> fused::PackedWeights {
        let mut weights = Vec::with_capacity(4 * self.layers.len() + 1);
        for block in &self.layers {
            for lin in [
                &block.attn.qkv,
                &block.attn.o,
                &block.mlp.up,
                &block.mlp.down,
            ] {
                weights.push(lin.weight.val());
            }
        }
        if self.has_lm {
            weights.push(match &self.lm_head {
                Some(head) => head.weight.val(),
                // The product in `logits` reads the embedding transposed: the same view.
                None => self.embed.weight.val().transpose(),
            });
        }
        fused::pack_weights(weights)
    }

    /// LM logits. hidden: [b, t, d] → [b, t, vocab]. An error for a model without an LM head.
    pub fn logits(&self, hidden: Tensor<3>) -> Result<Tensor<3>> {
        if !self.has_lm {
            return Err(ModelError::MissingHead {
                path: Default::default(),
                head: "LM head",
                hint: "it is a reward or value model; a policy or SFT model is needed here".into(),
            });
        }
        Ok(match &self.lm_head {
            Some(head) => apply(head, hidden),
            None => {
                let [b, t, d] = hidden.dims();
                let w = self.embed.weight.val();
                let v = w.dims()[0];
                fused::matmul(hidden.reshape([b * t, d]), w.transpose()).reshape([b, t, v])
            }
        })
    }

    /// Scalar head at every position. hidden: [b, t, d] → [b, t]. An error for a model without
    /// a scalar head.
    pub fn scalar(&self, hidden: Tensor<3>) -> Result<Tensor<2>> {
        let head = self.score.as_ref().ok_or_else(|| ModelError::MissingHead {
            path: Default::default(),
            head: "scalar head (score.weight)",
            hint: "it is a causal LM; a reward or value model (*ForSequenceClassification) is needed here".into(),
        })?;
        let [b, t, _] = hidden.dims();
        Ok(apply(head, hidden).reshape([b, t]))
    }

    /// The scalar head's value at each row's last real token (as HF's sequence classifiers pool).
    /// → [b]
    pub fn scalar_last(&self, batch: &TokenBatch, hidden: Tensor<3>) -> Result<Tensor<1>> {
        let values = self.scalar(hidden)?;
        let idx: Vec<i64> = batch.last_real_index().iter().map(|&i| i as i64).collect();
        let n = idx.len();
        let idx: Tensor<2, Int> = Tensor::from_data(TensorData::new(idx, [n, 1]), &values.device());
        Ok(values.gather(1, idx).reshape([n]))
    }
}

/// A linear layer through [`fused::linear`].
/// Where the real tokens of a padded batch [bsz, t] are, for a forward that runs the
/// position-wise work on them alone ([`CausalLm::forward`]).
struct Rows {
    /// Flat indices (row · t + position) of the real tokens, ascending: [n].
    idx: fused::Rows,
    bsz: usize,
    t: usize,
}

impl Rows {
    /// [1, n, c] → [bsz, t, c], zero at padding positions (its backward gathers the gradient's
    /// real rows).
    fn pad(&self, x: Tensor<3>) -> Tensor<3> {
        let [_, n, c] = x.dims();
        fused::scatter_rows(x.reshape([n, c]), &self.idx, self.bsz * self.t)
            .reshape([self.bsz, self.t, c])
    }

    /// [bsz, t, c] → the real tokens' rows [1, n, c] (its backward scatters the gradient back).
    fn gather(&self, x: Tensor<3>) -> Tensor<3> {
        let c = x.dims()[2];
        let n = self.idx.len();
        fused::gather_rows(x.reshape([self.bsz * self.t, c]), &self.idx).reshape([1, n, c])
    }
}

fn apply<const D: usize>(lin: &Linear, x: Tensor<D>) -> Tensor<D> {
    fused::linear(x, lin.weight.val(), lin.bias.as_ref().map(|b| b.val()))
}

/// The column blocks `parts` of a fused projection (q | k | v, gate | up) applied to x [b, t, d].
/// Inference: one matmul, and the blocks are views of its output. Training: one matmul per block
/// of the weight, because the backward of a slice of the output writes the block's gradient into
/// a zeroed tensor of the whole output's size (and then sums those), while slicing the weight
/// moves the same work onto the weight, which is [d, out] instead of [b · t, out]. (q | k | v in
/// training where [`fused::attention`] does not run: LibTorch, `matmul = "bf16"`.)
fn split_linear<const N: usize>(
    lin: &Linear,
    x: Tensor<3>,
    parts: [std::ops::Range<usize>; N],
) -> [Tensor<3>; N] {
    let [b, t, _] = x.dims();
    if !x.is_autodiff() {
        let y = apply(lin, x);
        return parts.map(|r| y.clone().slice([0..b, 0..t, r]));
    }
    let w = lin.weight.val();
    let d = w.dims()[0];
    let bias = lin.bias.as_ref().map(|p| p.val());
    parts.map(|r| {
        fused::linear(
            x.clone(),
            w.clone().slice([0..d, r.clone()]),
            bias.clone().map(|bias| bias.slice([r])),
        )
    })
}

/// `t` in f32 (a matrix kept in bf16, [`CausalLm::keep_frozen`], widened exactly).
fn f32_of<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    if t.dtype() == burn::tensor::DType::F32 {
        t
    } else {
        t.cast(burn::tensor::FloatDType::F32)
    }
}

/// A linear layer and its LoRA adapter, if it has one: x · w + b + the adapter's delta.
fn project<const D: usize>(lin: &Linear, lora: &Option<Lora>, x: Tensor<D>) -> Tensor<D> {
    match lora {
        None => apply(lin, x),
        Some(l) => apply(lin, x.clone()) + l.delta(x),
    }
}

/// [`split_linear`] of a layer with its LoRA adapter: each part plus its columns of the delta.
fn split_project<const N: usize>(
    lin: &Linear,
    lora: &Option<Lora>,
    x: Tensor<3>,
    parts: [std::ops::Range<usize>; N],
) -> [Tensor<3>; N] {
    let Some(l) = lora else {
        return split_linear(lin, x, parts);
    };
    let delta = l.delta(x.clone());
    let [b, t, _] = x.dims();
    let base = split_linear(lin, x, parts.clone());
    let mut i = 0;
    base.map(|y| {
        let r = parts[i].clone();
        i += 1;
        y + delta.clone().slice([0..b, 0..t, r])
    })
}

/// GELU, tanh approximation (`gelu_new`).
fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let c = (2.0f64 / std::f64::consts::PI).sqrt();
    let inner = (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715)).mul_scalar(c);
    x.mul_scalar(0.5) * inner.tanh().add_scalar(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;
    use burn::tensor::Distribution;

    /// A padded batch runs unpadded (position-wise work on the real tokens only): its real
    /// tokens' hidden states and the parameters' gradients are those of each row run alone
    /// (no padding, the dense path), for right- and left-padded rows, with grouped-query
    /// attention (tiny has 4 heads over 2 key/value heads); padding rows come out zero.
    #[test]
    fn unpadded_forward_matches_rows_run_alone() {
        let device = crate::parse_device("cpu").unwrap().autodiff();
        let cfg = ModelConfig::preset("tiny", 50).unwrap();
        let model = CausalLm::new(&cfg, false, 3, &device).unwrap();
        let rows: Vec<Vec<u32>> = vec![
            vec![5, 9, 2, 31, 7, 7, 40],
            vec![11, 3],
            vec![8, 1, 49, 22, 6],
        ];
        let d = cfg.hidden_size;
        // A fixed weighting of each hidden value, so that every position and unit counts.
        let weight = |r: usize, j: usize, k: usize| ((r * 31 + j * 7 + k) % 13) as f32 / 13.0 - 0.4;
        for left in [false, true] {
            let batch = if left {
                TokenBatch::left_padded(&rows, 0)
            } else {
                TokenBatch::right_padded(&rows, 0)
            };
            let t = batch.seq;
            let hidden = model.forward(&batch);
            let h = crate::ops::to_f32_vec(hidden.clone());
            let mut w = vec![0f32; rows.len() * t * d];
            let mut loss_alone = None;
            for (r, row) in rows.iter().enumerate() {
                let pad = t - row.len();
                let start = if left { pad } else { 0 };
                let alone = model.forward(&TokenBatch::dense(row.clone(), 1, row.len()));
                let a = crate::ops::to_f32_vec(alone.clone());
                let mut wa = vec![0f32; row.len() * d];
                for j in 0..row.len() {
                    for k in 0..d {
                        let (x, y) = (a[j * d + k], h[(r * t + start + j) * d + k]);
                        assert!(
                            (x - y).abs() < 1e-5,
                            "left {left} row {r} pos {j}: {x} vs {y}"
                        );
                        w[(r * t + start + j) * d + k] = weight(r, j, k);
                        wa[j * d + k] = weight(r, j, k);
                    }
                }
                for j in (0..t).filter(|&j| j < start || j >= start + row.len()) {
                    assert!(
                        h[(r * t + j) * d..(r * t + j + 1) * d]
                            .iter()
                            .all(|&v| v == 0.0)
                    );
                }
                let wa = Tensor::<3>::from_data(TensorData::new(wa, [1, row.len(), d]), &device);
                let l = (alone * wa).sum();
                loss_alone = Some(match loss_alone {
                    None => l,
                    Some(acc) => acc + l,
                });
            }
            let w = Tensor::<3>::from_data(TensorData::new(w, [rows.len(), t, d]), &device);
            let g_batch = (hidden * w).sum().backward();
            let g_alone = loss_alone.unwrap().backward();
            let block = &model.layers[0];
            let grads = [
                (
                    "embed",
                    model.embed.weight.val().grad(&g_batch),
                    model.embed.weight.val().grad(&g_alone),
                ),
                (
                    "qkv",
                    block.attn.qkv.weight.val().grad(&g_batch),
                    block.attn.qkv.weight.val().grad(&g_alone),
                ),
                (
                    "o",
                    block.attn.o.weight.val().grad(&g_batch),
                    block.attn.o.weight.val().grad(&g_alone),
                ),
                (
                    "down",
                    block.mlp.down.weight.val().grad(&g_batch),
                    block.mlp.down.weight.val().grad(&g_alone),
                ),
            ];
            for (name, a, b) in grads {
                let (a, b) = (
                    crate::ops::to_f32_vec(a.expect("gradient")),
                    crate::ops::to_f32_vec(b.expect("gradient")),
                );
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(scale > 1e-3, "{name}: gradient is all but zero");
                for (p, q) in a.iter().zip(&b) {
                    assert!(
                        (p - q).abs() <= 1e-4 * scale,
                        "left {left} {name}: {p} vs {q}"
                    );
                }
            }
        }
    }

    /// The training path of `split_linear` (one matmul per weight block) gives the values and
    /// the gradients (weight, bias, input) of the fused matmul with its output sliced.
    #[test]
    fn split_linear_matches_slicing_the_fused_output() {
        let device = crate::parse_device("cpu").unwrap().autodiff();
        let lin = LinearConfig::new(6, 10).with_bias(true).init(&device);
        let x =
            Tensor::<3>::random([2, 3, 6], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let parts = [0..4, 4..7, 7..10];
        let coef = [1.0, -2.0, 0.5];
        let loss = |ys: Vec<Tensor<3>>| {
            ys.into_iter()
                .zip(coef)
                .map(|(y, c)| (y.clone() * y).sum().mul_scalar(c))
                .reduce(|a, b| a + b)
                .unwrap()
        };
        let split = split_linear(&lin, x.clone(), parts.clone());
        let fused = lin.forward(x.clone());
        let sliced: Vec<Tensor<3>> = parts
            .iter()
            .map(|r| fused.clone().slice([0..2, 0..3, r.clone()]))
            .collect();
        for (a, b) in split.iter().zip(&sliced) {
            let (a, b) = (
                crate::ops::to_f32_vec(a.clone()),
                crate::ops::to_f32_vec(b.clone()),
            );
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-5, "{p} vs {q}");
            }
        }
        let g1 = loss(split.to_vec()).backward();
        let g2 = loss(sliced).backward();
        let pairs = [
            (lin.weight.val().grad(&g1), lin.weight.val().grad(&g2)),
            (
                lin.bias
                    .as_ref()
                    .unwrap()
                    .val()
                    .grad(&g1)
                    .map(|t| t.reshape([1, 10])),
                lin.bias
                    .as_ref()
                    .unwrap()
                    .val()
                    .grad(&g2)
                    .map(|t| t.reshape([1, 10])),
            ),
            (
                x.grad(&g1).map(|t| t.reshape([6, 6])),
                x.grad(&g2).map(|t| t.reshape([6, 6])),
            ),
        ];
        for (a, b) in pairs {
            let (a, b) = (
                crate::ops::to_f32_vec(a.expect("gradient")),
                crate::ops::to_f32_vec(b.expect("gradient")),
            );
            assert!(a.iter().any(|v| v.abs() > 1e-3));
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-4, "gradient {p} vs {q}");
            }
        }
    }
}
