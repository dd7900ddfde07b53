//! AdamW as one pass over each parameter (burn-optim's `AdamW` is a dozen tensor ops, each a
//! pass over the parameter and a fresh buffer: ~15% of a training step on flex). Same formula,
//! same order of f32 operations, same optimizer state (`AdamWState`, so checkpoints' optimizer
//! records are unchanged); on backends without the fused kernel it runs burn-optim's `AdamW`.
//!
//! The stages build their optimizer through `trainer::optim::adamw`, which calls [`adamw`]; the
//! benchmark uses it directly.
//!
//! Global-norm clipping multiplies every gradient by one coefficient before the step. Done as a
//! pass of its own, that reads and writes all gradients once more; [`with_grad_scale`] hands the
//! coefficient to this optimizer instead, which multiplies each gradient as it reads it (the
//! same f32 product, so the same results).

use crate::fused::{self, AdamWStep};
use burn::optim::{
    AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer,
};
use burn::tensor::{Device, Tensor};

/// AdamW with decoupled weight decay; see the module docs.
#[derive(Clone)]
pub struct FusedAdamW {
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    composed: burn::optim::AdamW,
}

impl FusedAdamW {
    pub fn new(beta1: f32, beta2: f32, eps: f32, weight_decay: f32) -> Self {
        let composed = AdamWConfig::new()
            .with_beta_1(beta1)
            .with_beta_2(beta2)
            .with_epsilon(eps)
            .with_weight_decay(weight_decay)
            .build();
        Self {
            beta1,
            beta2,
            eps,
            weight_decay,
            composed,
        }
    }
}

thread_local! {
    /// The gradient scale of the optimizer step running on this thread ([`with_grad_scale`]),
    /// and how many parameters' steps have applied it.
    static GRAD_SCALE: std::cell::Cell<(f32, usize)> = const { std::cell::Cell::new((1.0, 0)) };
}

/// Runs `f`, an optimizer step of a [`FusedAdamW`] (`ModuleOptimizer::step`), with every gradient
/// multiplied by `scale` as the step reads it: the global-norm clip's coefficient, applied without
/// a pass over the gradients of its own.
///
/// The scale is this thread's while `f` runs (a step updates its parameters one after another on
/// the calling thread), and the previous one is restored afterwards, so that a step that runs
/// nested inside another on the same thread (a pool thread that picks up the other model's
/// update while waiting, as with PPO's policy and critic) applies its own, provided it runs
/// under its own `with_grad_scale`: every step of the stages does (`trainer::optim::
/// optimizer_step`), and so should any step that may run beside a clipped one.
///
/// # Panics
/// When `scale` is not 1 and `f` stepped no parameter through a [`FusedAdamW`] (another
/// optimizer would have ignored the scale: a programming error, caught before it trains on).
pub fn with_grad_scale<R>(scale: f32, f: impl FnOnce() -> R) -> R {
    struct Restore((f32, usize));
    impl Drop for Restore {
        fn drop(&mut self) {
            GRAD_SCALE.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(GRAD_SCALE.with(|s| s.replace((scale, 0))));
    let out = f();
    let (_, applied) = GRAD_SCALE.with(|s| s.get());
    assert!(
        scale == 1.0 || applied > 0,
        "with_grad_scale({scale}): the step did not go through model::optim::FusedAdamW"
    );
    out
}

/// [`FusedAdamW`] as a whole-module optimizer.
pub fn adamw(beta1: f32, beta2: f32, eps: f32, weight_decay: f32) -> ModuleOptimizer {
    ModuleOptimizer::from(FusedAdamW::new(beta1, beta2, eps, weight_decay))
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let time = state.as_ref().map_or(1, |s| s.momentum.time + 1);
        let grad_scale = GRAD_SCALE.with(|s| {
            let (scale, applied) = s.get();
            s.set((scale, applied + 1));
            scale
        });
        // As burn-optim: the decay factor and lr reach f32 as scalars of f64 expressions.
        let step = AdamWStep {
            grad_scale,
            lr: lr as f32,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            decay: (1.0 - lr * self.weight_decay as f64) as f32,
            c1: 1.0 - self.beta1.powi(time as i32),
            c2: 1.0 - self.beta2.powi(time as i32),
        };
        // (No AMSGrad: this optimizer never creates a max_moment_2.) The moments are handed over
        // by value, so that the fused pass can write over them.
        let moments = state.map(|s| [s.momentum.moment_1, s.momentum.moment_2]);
        match fused::adamw(tensor, grad, moments, &step) {
            Ok([p, m, v]) => {
                let momentum = AdaptiveMomentumState::new(time, m, v);
                (p, Some(AdamWState::new(momentum)))
            }
            Err(inputs) => {
                let (tensor, grad, moments) = *inputs;
                let grad = if grad_scale == 1.0 {
                    grad
                } else {
                    fused::scale(grad, grad_scale)
                };
                let state = moments
                    .map(|[m, v]| AdamWState::new(AdaptiveMomentumState::new(time - 1, m, v)));
                self.composed.step(lr, tensor, grad, state)
            }
        }
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::GradientsParams;
    use burn::tensor::Distribution;

    const STEP: AdamWStep = AdamWStep {
        grad_scale: 1.0,
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        decay: 1.0,
        c1: 0.1,
        c2: 0.05,
    };

    fn start_t(device: &Device) -> Tensor<2> {
        Tensor::<2>::ones([3, 4], &device.clone().inner())
    }

    fn weights(l: &Linear) -> Vec<f32> {
        let mut v = l.weight.val().into_data().try_to_vec::<f32>().unwrap();
        v.extend(
            l.bias
                .as_ref()
                .unwrap()
                .val()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap(),
        );
        v
    }

    /// Ten steps of ours and of burn-optim's AdamW from the same weights and gradients, with
    /// weight decay, on a layer large enough for the threaded path (40k weights) and its bias
    /// (the single-thread path): bit-identical weights, moments and step counts.
    #[test]
    fn matches_burn_optims_adamw_bit_for_bit() {
        let device = crate::parse_device("cpu").unwrap().autodiff();
        let mut ours_l: Linear = LinearConfig::new(200, 200).init(&device);
        let mut burn_l = ours_l.clone();
        let mut ours = adamw(0.9, 0.95, 1e-8, 0.1);
        let mut theirs = AdamWConfig::new()
            .with_beta_1(0.9)
            .with_beta_2(0.95)
            .with_epsilon(1e-8)
            .with_weight_decay(0.1)
            .init();
        let start = weights(&ours_l);
        for step in 0..10 {
            let x = Tensor::<2>::random([8, 200], Distribution::Normal(0.0, 1.0), &device);
            let grads_of = |l: &Linear| {
                let loss = l.forward(x.clone()).powi_scalar(2).mean();
                GradientsParams::from_grads(loss.backward(), l)
            };
            let (g1, g2) = (grads_of(&ours_l), grads_of(&burn_l));
            let lr = 1e-2 / (1.0 + step as f64);
            ours_l = ours.step(lr, ours_l, g1);
            burn_l = theirs.step(lr, burn_l, g2);
            let (a, b) = (weights(&ours_l), weights(&burn_l));
            assert_eq!(a, b, "step {step}");
        }
        assert_ne!(weights(&ours_l), start, "the weights moved");
        // On flex the fused pass is what ran (not the composed fallback): it applies to these
        // tensors. (LibTorch has no fused kernel: the loop above compared the fallback.)
        if cfg!(any(feature = "tch", not(feature = "flex"))) {
            assert!(fused::adamw(start_t(&device), start_t(&device), None, &STEP).is_err());
            return;
        }
        let p = Tensor::<2>::ones([3, 4], &device.clone().inner());
        let Ok([p1, m, v]) = fused::adamw(p.clone(), p, None, &STEP) else {
            panic!("fused on flex")
        };
        // g = 1: m = 0.1, v = 0.05, u = 1 / (1 + 1e-8), p = 1 - 0.1 · u.
        assert_eq!(m.into_data().try_to_vec::<f32>().unwrap()[0], 1.0 - 0.9f32);
        assert_eq!(v.into_data().try_to_vec::<f32>().unwrap()[0], 1.0 - 0.95f32);
        assert!((p1.into_data().try_to_vec::<f32>().unwrap()[0] - 0.9).abs() < 1e-6);
    }
    /// A step under `with_grad_scale(c)` equals scaling the gradients by c in a pass of their own
    /// (`ops::clip_grad_norm`) and then stepping, bit for bit (a layer large enough for the
    /// threaded path, and its bias); a step nested inside it on the same thread (another model's,
    /// as a pool thread may pick up) applies its own scale, here 1, which equals a plain step.
    #[test]
    fn grad_scale_in_the_step_equals_scaling_the_gradients_first() {
        let device = crate::parse_device("cpu").unwrap().autodiff();
        let init: Linear = LinearConfig::new(200, 200).init(&device);
        let other: Linear = LinearConfig::new(200, 200).init(&device);
        let (mut folded_l, mut scaled_l) = (init.clone(), init);
        let (mut nested_l, mut plain_l) = (other.clone(), other);
        let [mut o_folded, mut o_scaled, mut o_nested, mut o_plain]: [ModuleOptimizer; 4] =
            std::array::from_fn(|_| adamw(0.9, 0.95, 1e-8, 0.1));
        for step in 0..4 {
            let x = Tensor::<2>::random([8, 200], Distribution::Normal(0.0, 3.0), &device);
            let grads_of = |l: &Linear| {
                let loss = l.forward(x.clone()).powi_scalar(2).mean();
                GradientsParams::from_grads(loss.backward(), l)
            };
            let (g_folded, mut g_scaled) = (grads_of(&folded_l), grads_of(&scaled_l));
            let (g_nested, g_plain) = (grads_of(&nested_l), grads_of(&plain_l));
            let norm = crate::ops::clip_grad_norm(&scaled_l, &mut g_scaled, 0.5);
            let coef = crate::ops::clip_coef(norm, 0.5);
            assert!(coef < 1.0, "step {step}: the norm {norm} is clipped");
            folded_l = with_grad_scale(coef, || {
                nested_l = with_grad_scale(1.0, || o_nested.step(1e-2, nested_l.clone(), g_nested));
                o_folded.step(1e-2, folded_l.clone(), g_folded)
            });
            scaled_l = o_scaled.step(1e-2, scaled_l, g_scaled);
            plain_l = o_plain.step(1e-2, plain_l, g_plain);
            assert_eq!(weights(&folded_l), weights(&scaled_l), "step {step}");
            assert_eq!(weights(&nested_l), weights(&plain_l), "step {step}");
        }
        assert_ne!(weights(&folded_l), weights(&plain_l));
    }

    /// A scale that no fused step applied (another optimizer ran) is a programming error.
    #[test]
    #[should_panic(expected = "did not go through model::optim::FusedAdamW")]
    fn a_scale_no_step_applied_panics() {
        with_grad_scale(0.5, || ());
    }
}
