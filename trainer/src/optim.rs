//! The optimizer settings every gradient-trained stage shares (`[train]` of sft and reward), the
//! AdamW built from them, and one optimizer step: global-norm clipping, a stop on a non-finite
//! gradient norm (as on a non-finite loss), then AdamW at the scheduled learning rate.

use crate::schedule::{Decay, Schedule};
use anyhow::{Result, bail};
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `[train]` of the stages trained by gradient steps over a data set (sft, reward).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Examples (sft) or ranked groups (reward) per micro-batch.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    /// Passes over the training split (when max_steps is 0).
    #[serde(default = "d_one")]
    pub epochs: usize,
    /// Optimizer steps; 0 means `epochs` decide.
    #[serde(default)]
    pub max_steps: usize,
    /// Peak learning rate.
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    /// cosine, linear or constant after warmup.
    #[serde(default = "d_decay")]
    pub decay: Decay,
    /// The decay ends at min_lr_ratio · lr.
    #[serde(default = "d_min_lr")]
    pub min_lr_ratio: f64,
    /// AdamW (decoupled) weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_beta1")]
    pub beta1: f64,
    #[serde(default = "d_beta2")]
    pub beta2: f64,
    #[serde(default = "d_eps")]
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables.
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    /// Write metrics every N steps.
    #[serde(default = "d_one")]
    pub log_every: usize,
    /// Evaluate every N steps (0: only at the end).
    #[serde(default)]
    pub eval_every: usize,
    /// Examples per validation batch.
    #[serde(default = "d_eval_batch")]
    pub eval_batch_size: usize,
    /// Save a checkpoint every N steps (0: only at the end).
    #[serde(default)]
    pub save_every: usize,
    /// Checkpoints kept (the newest).
    #[serde(default = "d_keep")]
    pub keep_last: usize,
}

fn d_batch() -> usize {
    8
}
pub fn d_one() -> usize {
    1
}
fn d_lr() -> f64 {
    1e-4
}
fn d_decay() -> Decay {
    Decay::Cosine
}
fn d_min_lr() -> f64 {
    0.1
}
pub fn d_beta1() -> f64 {
    0.9
}
pub fn d_beta2() -> f64 {
    0.999
}
pub fn d_eps() -> f64 {
    1e-8
}
/// Serde defaults shared with other stages' configs.
pub fn d_clip() -> f64 {
    1.0
}
fn d_eval_batch() -> usize {
    16
}
pub fn d_keep() -> usize {
    2
}

/// Range checks of config values, each error naming the key, the value, the file and the range.
pub struct Check<'a> {
    pub file: &'a Path,
    pub errors: Vec<String>,
}

impl<'a> Check<'a> {
    pub fn new(file: &'a Path) -> Self {
        Self {
            file,
            errors: Vec::new(),
        }
    }

    /// `key` must satisfy `ok`; `range` says what is allowed, e.g. "> 0".
    pub fn that(&mut self, key: &str, value: impl std::fmt::Display, ok: bool, range: &str) {
        if !ok {
            self.errors.push(format!(
                "{}: key `{key}` = {value} is out of range; it must be {range}",
                self.file.display()
            ));
        }
    }

    /// A finite number in [lo, hi].
    pub fn within(&mut self, key: &str, v: f64, lo: f64, hi: f64) {
        self.that(
            key,
            v,
            v.is_finite() && v >= lo && v <= hi,
            &format!("in [{lo}, {hi}]"),
        );
    }

    /// A finite number > 0.
    pub fn positive(&mut self, key: &str, v: f64) {
        self.that(key, v, v.is_finite() && v > 0.0, "a finite number > 0");
    }

    /// An integer ≥ 1.
    pub fn at_least_one(&mut self, key: &str, v: usize) {
        self.at_least(key, v, 1);
    }

    /// An integer ≥ `min`.
    pub fn at_least(&mut self, key: &str, v: usize, min: usize) {
        self.that(key, v, v >= min, &format!("at least {min}"));
    }

    /// A fraction in [0, 1).
    pub fn fraction(&mut self, key: &str, v: f64) {
        self.that(key, v, (0.0..1.0).contains(&v), "in [0, 1)");
    }

    /// The `[lora]` table, when there is one: r ≥ 1, alpha > 0, dropout in [0, 1), and a base
    /// model to adapt (`base_key`, e.g. `model.base`, set: `has_base`).
    pub fn lora(&mut self, lora: Option<&model::LoraConfig>, base_key: &str, has_base: bool) {
        let Some(l) = lora else { return };
        self.at_least_one("lora.r", l.r);
        self.positive("lora.alpha", l.alpha);
        self.fraction("lora.dropout", l.dropout);
        if !has_base {
            self.errors.push(format!(
                "{}: [lora] is set without {base_key}: LoRA adapts a trained model; set {base_key} to its HF folder, or remove [lora] to train every weight",
                self.file.display()
            ));
        }
    }

    pub fn finish(self) -> Result<()> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            bail!("{}", self.errors.join("\n"))
        }
    }
}

impl TrainSection {
    /// Adds the range errors of `[train]` to `check`.
    pub fn check(&self, c: &mut Check) {
        c.at_least_one("train.batch_size", self.batch_size);
        c.at_least_one("train.grad_accum", self.grad_accum);
        c.that(
            "train.epochs",
            self.epochs,
            self.epochs >= 1 || self.max_steps >= 1,
            "at least 1 (or set train.max_steps)",
        );
        c.positive("train.lr", self.lr);
        c.within("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0);
        self.adamw_keys().check("train", c);
        c.at_least_one("train.eval_batch_size", self.eval_batch_size);
    }

    /// The learning-rate schedule over `total_steps`.
    pub fn schedule(&self, total_steps: usize) -> Schedule {
        Schedule {
            lr: self.lr,
            warmup_steps: self.warmup_steps,
            total_steps,
            decay: self.decay,
            min_lr_ratio: self.min_lr_ratio,
        }
    }

    /// AdamW with these betas, eps and weight decay (clipping is done by [`optimizer_step`]).
    pub fn adamw(&self) -> ModuleOptimizer {
        self.adamw_keys().build()
    }

    /// The optimizer keys as the shared [`AdamW`].
    pub fn adamw_keys(&self) -> AdamW {
        AdamW {
            weight_decay: self.weight_decay,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            max_grad_norm: self.max_grad_norm,
        }
    }

    /// Examples (or groups) per optimizer step.
    pub fn examples_per_step(&self) -> usize {
        self.batch_size * self.grad_accum
    }

    /// Optimizer steps of the run: `max_steps`, or `epochs` passes of `examples` examples.
    pub fn total_steps(&self, examples: usize) -> usize {
        if self.max_steps > 0 {
            self.max_steps
        } else {
            self.epochs * examples.div_ceil(self.batch_size * self.grad_accum)
        }
    }
}

/// The optimizer keys every gradient-trained stage has in its `[train]`, with the shared
/// defaults (weight decay 0, β 0.9 / 0.999, ε 1e-8, global-norm clip 1.0), their range checks and
/// the optimizer they build.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables.
    pub max_grad_norm: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        Self {
            weight_decay: 0.0,
            beta1: d_beta1(),
            beta2: d_beta2(),
            eps: d_eps(),
            max_grad_norm: d_clip(),
        }
    }
}

impl AdamW {
    /// Adds the range errors of the keys, named `section.key`, to `c`.
    pub fn check(&self, section: &str, c: &mut Check) {
        let k = |name: &str| format!("{section}.{name}");
        c.within(&k("weight_decay"), self.weight_decay, 0.0, 1.0);
        let beta = |c: &mut Check, name: &str, v: f64| {
            c.that(&k(name), v, (0.0..1.0).contains(&v), "in [0, 1)")
        };
        beta(c, "beta1", self.beta1);
        beta(c, "beta2", self.beta2);
        c.positive(&k("eps"), self.eps);
        c.that(
            &k("max_grad_norm"),
            self.max_grad_norm,
            self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0,
            "≥ 0 (0 disables clipping)",
        );
    }

    /// The optimizer (clipping is done by [`optimizer_step`] with `max_grad_norm`).
    pub fn build(&self) -> ModuleOptimizer {
        adamw(self.beta1, self.beta2, self.eps, self.weight_decay)
    }
}

/// AdamW (decoupled weight decay, Loshchilov & Hutter) with the given settings: one fused pass
/// per parameter (`model::optim`; burn-optim's AdamW state and numbers).
pub fn adamw(beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> ModuleOptimizer {
    model::optim::adamw(beta1 as f32, beta2 as f32, eps as f32, weight_decay as f32)
}

/// Clips the gradients to global norm `max_grad_norm` (0: no clipping), stops on a non-finite
/// norm (the update would poison the weights; `last_good` is named as by the NaN guard), and
/// steps. Returns the updated module and the norm before clipping.
pub fn optimizer_step<M: Module>(
    optim: &mut ModuleOptimizer,
    module: M,
    grads: GradientsParams,
    lr: f64,
    max_grad_norm: f64,
    step: usize,
    last_good: Option<&Path>,
) -> Result<(M, f32)> {
    let norm = model::ops::grad_norm(&module, &grads);
    crate::check_finite("gradient norm", norm as f64, step, last_good)?;
    // The clip's coefficient goes to the optimizer, which scales each gradient as it reads it.
    let coef = if max_grad_norm > 0.0 {
        model::ops::clip_coef(norm, max_grad_norm as f32)
    } else {
        1.0
    };
    let module = model::optim::with_grad_scale(coef, || optim.step(lr, module, grads));
    Ok((module, norm))
}
