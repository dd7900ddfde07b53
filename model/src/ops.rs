//! Tensor functions every stage needs: per-token log-probabilities, masked means, and global-norm
//! gradient clipping (torch's `clip_grad_norm_`; burn's `GradientClipping::Norm` clips each tensor
//! on its own, which is not what SFT and PPO want).

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::activation::softmax;
use burn::tensor::{Int, Tensor, TensorData};

/// A batched matrix product, through the backend's fused kernels where there are (burn's
/// `matmul` elsewhere).
pub use crate::fused::matmul;

/// log p(targets) under `logits`. logits: [b, t, v], targets: [b, t] → [b, t]
///
/// The softmax over the vocabulary, the widest tensor of a training step, is computed once,
/// outside the autodiff graph, by the backend's fused softmax; the graph only carries what the
/// gradient needs. With P = softmax(l), m = max(l) and P_max = 1 / Σ exp(l − m) (the largest
/// probability, never below 1/v, so its log cannot underflow):
///
/// - value: log p(y) = l_y − logsumexp(l) = l_y − (m − log P_max);
/// - gradient: ∂ log p(y) / ∂l = onehot(y) − P, carried by l_y − Σ_v (l − stop_grad(l)) · P,
///   whose second term is zero in value and has gradient −P.
///
/// Same values as `log_softmax(logits, 2).gather(2, targets)` up to float rounding (parity
/// tests: 1e-4 against transformers), and the same gradients.
pub fn token_logprobs(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    if let Some(lp) = crate::fused::token_logprobs(&logits, &targets) {
        return lp;
    }
    let [b, t, _] = logits.dims();
    let constant = logits.clone().inner();
    let max = constant.clone().max_dim(2);
    let probs = softmax(constant, 2);
    let log_sum_exp = max - probs.clone().max_dim(2).log();
    let picked = logits.clone().gather(2, targets.reshape([b, t, 1]));
    if !logits.is_autodiff() {
        // Inference (rollouts, scoring, evaluation): no gradient to carry.
        return (picked - log_sum_exp).reshape([b, t]);
    }
    let zero_with_gradient = ((logits.clone() - logits.detach()) * probs).sum_dim(2);
    (picked - zero_with_gradient - log_sum_exp).reshape([b, t])
}

/// The rows of `x` [b, t, d] at the positions where `mask` [b · t] is true, in order, as
/// [1, n, d]. Run before the LM head, the head and its softmax over the vocabulary are computed
/// for those positions only (the response tokens of SFT and PPO-ptx batches) instead of for the
/// prompts and padding too. Its gradient is scattered back to the selected rows.
pub fn select_positions(x: Tensor<3>, mask: &[bool]) -> Tensor<3> {
    let [b, t, d] = x.dims();
    assert_eq!(
        mask.len(),
        b * t,
        "select_positions: mask of {} for [{b}, {t}]",
        mask.len()
    );
    let idx: Vec<i64> = (0..mask.len() as i64)
        .filter(|&i| mask[i as usize])
        .collect();
    let n = idx.len();
    let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [n]), &x.device());
    x.reshape([b * t, d]).select(0, idx).reshape([1, n, d])
}

/// Mean of `x` over the positions where `mask` is 1. x, mask: [b, t] → [1]. A zero mask gives 0.
pub fn masked_mean(x: Tensor<2>, mask: Tensor<2>) -> Tensor<1> {
    let n = mask.clone().sum().clamp_min(1.0);
    (x * mask).sum() / n
}

/// A float mask tensor [b, t] from host booleans.
pub fn mask_tensor(mask: &[bool], b: usize, t: usize, device: &burn::tensor::Device) -> Tensor<2> {
    let v: Vec<f32> = mask.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
    Tensor::from_data(TensorData::new(v, [b, t]), device)
}

/// An int tensor [b, t] from host token ids.
pub fn token_tensor(
    tokens: &[u32],
    b: usize,
    t: usize,
    device: &burn::tensor::Device,
) -> Tensor<2, Int> {
    let v: Vec<i64> = tokens.iter().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(v, [b, t]), device)
}

/// Σ g² over all gradients: on the host where the backend has the fused kernel (one read of each
/// gradient, in f64, parameters in visiting order), else as a tensor on the device (one read back
/// at the end, not one per parameter).
struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    host: f64,
    device: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            if let Some(s) = crate::fused::sum_squares(&g) {
                self.host += s;
                return;
            }
            let s = g.square().sum();
            self.device = Some(match self.device.take() {
                Some(a) => a + s,
                None => s,
            });
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    coef: f32,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads
                .register::<D>(param.id, crate::fused::scale(g, self.coef));
        }
    }
}

/// The global L2 norm of all gradients of `module`'s parameters.
pub fn grad_norm<M: Module>(module: &M, grads: &GradientsParams) -> f32 {
    let mut v = SquaredNorm {
        grads,
        host: 0.0,
        device: None,
    };
    module.visit(&mut v);
    let device = v.device.map_or(0.0, |s| s.into_scalar::<f32>() as f64);
    (v.host + device).sqrt() as f32
}

/// The coefficient that global-norm clipping multiplies every gradient by, given their norm:
/// max_norm / (norm + 1e-6) above max_norm (as torch's `clip_grad_norm_`), else 1 (no change;
/// also for a non-finite norm, which callers stop on).
pub fn clip_coef(norm: f32, max_norm: f32) -> f32 {
    if norm.is_finite() && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Scales all gradients so that their global norm is at most `max_norm` ([`clip_coef`]).
/// Returns the norm before clipping. (A training step hands the coefficient to the optimizer
/// instead: `model::optim::with_grad_scale`.)
pub fn clip_grad_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f32) -> f32 {
    let norm = grad_norm(module, grads);
    let coef = clip_coef(norm, max_norm);
    if coef != 1.0 {
        let mut s = Scale { grads, coef };
        module.visit(&mut s);
    }
    norm
}

/// Multiplies all gradients by `coef` (e.g. 1/accumulation steps).
pub fn scale_grads<M: Module>(module: &M, grads: &mut GradientsParams, coef: f32) {
    let mut s = Scale { grads, coef };
    module.visit(&mut s);
}

/// The values of a float tensor on the host, as f32.
pub fn to_f32_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    data_f32(t.into_data())
}

/// The values of float tensor data as f32.
pub fn data_f32(data: TensorData) -> Vec<f32> {
    data.convert::<f32>()
        .try_into_vec::<f32>()
        .expect("float tensor data converts to f32")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::activation::log_softmax;

    /// Values and gradients of `token_logprobs` against log-softmax + gather, under an arbitrary
    /// weighting of the positions (as PPO's loss weighs them), with logits spread wide enough
    /// that some target probabilities are tiny.
    #[test]
    fn token_logprobs_matches_log_softmax_and_its_gradient() {
        let device = crate::parse_device("cpu").unwrap().autodiff();
        let (b, t, v) = (3, 5, 37);
        let logits =
            Tensor::<3>::random([b, t, v], Distribution::Normal(0.0, 8.0), &device).require_grad();
        let ids: Vec<u32> = (0..b * t).map(|i| (i * 11 % v) as u32).collect();
        let targets = token_tensor(&ids, b, t, &device);
        let weights = Tensor::<2>::random([b, t], Distribution::Normal(0.0, 1.0), &device);
        let ours = token_logprobs(logits.clone(), targets.clone());
        let reference = log_softmax(logits.clone(), 2)
            .gather(2, targets.reshape([b, t, 1]))
            .reshape([b, t]);
        let (a, r) = (to_f32_vec(ours.clone()), to_f32_vec(reference.clone()));
        assert!(
            r.iter().any(|&x| x < -20.0),
            "some targets should be unlikely: {r:?}"
        );
        for (x, y) in a.iter().zip(&r) {
            assert!((x - y).abs() < 1e-4 * y.abs().max(1.0), "{x} vs {y}");
        }
        let g_ours = logits
            .grad(&(ours * weights.clone()).sum().backward())
            .unwrap();
        let g_ref = logits
            .grad(&(reference * weights).sum().backward())
            .unwrap();
        for (x, y) in to_f32_vec(g_ours).iter().zip(&to_f32_vec(g_ref)) {
            assert!((x - y).abs() < 1e-5, "gradient {x} vs {y}");
        }
        // Untracked (rollouts, scoring): the same values.
        let plain = token_logprobs(logits.inner(), token_tensor(&ids, b, t, &device).inner());
        assert!(!plain.is_autodiff());
        for (x, y) in to_f32_vec(plain).iter().zip(&r) {
            assert!(
                (x - y).abs() < 1e-4 * y.abs().max(1.0),
                "untracked {x} vs {y}"
            );
        }
    }

    /// Global-norm clipping: the norm of all gradients together (as torch's `clip_grad_norm_`),
    /// each gradient scaled by max / (norm + 1e-6) when the norm is above max, untouched below.
    #[test]
    fn clip_grad_norm_scales_all_gradients_by_the_global_norm() {
        use burn::nn::{Linear, LinearConfig};
        let device = crate::parse_device("cpu").unwrap().autodiff();
        // Two layers, one large enough for the kernels' parallel split.
        let a: Linear = LinearConfig::new(256, 300).init(&device);
        let b: Linear = LinearConfig::new(300, 3).init(&device);
        let x = Tensor::<2>::random([4, 256], Distribution::Normal(0.0, 1.0), &device);
        let loss = b.forward(a.forward(x)).powi_scalar(2).sum();
        let module = (a, b);
        let host = |grads: &GradientsParams| -> Vec<Vec<f32>> {
            let (a, b) = &module;
            [&a.weight, &b.weight]
                .iter()
                .map(|p| to_f32_vec(grads.get::<2>(p.id).unwrap()))
                .chain(
                    [&a.bias, &b.bias]
                        .iter()
                        .map(|p| to_f32_vec(grads.get::<1>(p.as_ref().unwrap().id).unwrap())),
                )
                .collect()
        };
        let grads = GradientsParams::from_grads(loss.backward(), &module);
        let before = host(&grads);
        let expect = before
            .iter()
            .flatten()
            .map(|&g| g as f64 * g as f64)
            .sum::<f64>()
            .sqrt();
        assert!(expect > 1.0, "the test needs a norm above 1: {expect}");
        assert!(((grad_norm(&module, &grads) as f64) - expect).abs() <= 1e-5 * expect);

        // Above max: every gradient times max / (norm + 1e-6), the same f32 products.
        let mut clipped = grads;
        let norm = clip_grad_norm(&module, &mut clipped, 1.0);
        assert!(((norm as f64) - expect).abs() <= 1e-5 * expect);
        let coef = 1.0 / (norm + 1e-6);
        for (g, c) in before.iter().zip(host(&clipped)) {
            let want: Vec<u32> = g.iter().map(|&v| (v * coef).to_bits()).collect();
            assert_eq!(c.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want);
        }
        let after = grad_norm(&module, &clipped);
        assert!((after - 1.0).abs() < 1e-4, "norm after clipping {after}");

        // Below max: untouched.
        let again = host(&clipped);
        let norm = clip_grad_norm(&module, &mut clipped, 10.0);
        assert!((norm - after).abs() < 1e-6);
        assert_eq!(host(&clipped), again);
    }
}
