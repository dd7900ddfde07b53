//! Tensor functions every stage needs: per-token log-probabilities, masked means, and global-norm
//! gradient clipping (torch's `clip_grad_norm_`; burn's `GradientClipping::Norm` clips each tensor
//! on its own, which is not what SFT and PPO want).

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};

/// log p(targets) under `logits`. logits: [b, t, v], targets: [b, t] → [b, t]
///
/// The same values as `log_softmax(logits, 2).gather(2, targets)` (x_target − max − logsumexp,
/// the same ops in the same order), without materialising the [b, t, v] log-softmax or sending
/// its gradient back through it.
pub fn token_logprobs(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let [b, t, _] = logits.dims();
    let max = logits.clone().detach().max_dim(2);
    let picked = logits.clone().gather(2, targets.reshape([b, t, 1])) - max.clone();
    let log_sum_exp = (logits - max).exp().sum_dim(2).log();
    (picked - log_sum_exp).reshape([b, t])
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

struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    sum: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let s = g.square().sum();
            self.sum = Some(match self.sum.take() {
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
            self.grads.register::<D>(param.id, g.mul_scalar(self.coef));
        }
    }
}

/// The global L2 norm of all gradients of `module`'s parameters.
pub fn grad_norm<M: Module>(module: &M, grads: &GradientsParams) -> f32 {
    let mut v = SquaredNorm { grads, sum: None };
    module.visit(&mut v);
    v.sum.map_or(0.0, |s| s.sqrt().into_scalar::<f32>())
}

/// Scales all gradients so that their global norm is at most `max_norm` (as torch's
/// `clip_grad_norm_`, coefficient max_norm / (norm + 1e-6)). Returns the norm before clipping.
pub fn clip_grad_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f32) -> f32 {
    let norm = grad_norm(module, grads);
    if norm.is_finite() && norm > max_norm {
        let mut s = Scale {
            grads,
            coef: max_norm / (norm + 1e-6),
        };
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
