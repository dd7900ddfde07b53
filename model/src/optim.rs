//! AdamW as one pass over each parameter (burn-optim's `AdamW` is a dozen tensor ops, each a
//! pass over the parameter and a fresh buffer: ~15% of a training step on flex). Same formula,
//! same order of f32 operations, same optimizer state (`AdamWState`, so checkpoints' optimizer
//! records are unchanged); on backends without the fused kernel it runs burn-optim's `AdamW`.
//!
//! The stages build their optimizer through `trainer::optim::adamw`, which calls [`adamw`]; the
//! benchmark uses it directly.

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
        // As burn-optim: the decay factor and lr reach f32 as scalars of f64 expressions.
        let step = AdamWStep {
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
        if crate::backend_name() != "flex" {
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
}
