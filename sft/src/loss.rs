//! The SFT loss: negative log-likelihood of the target tokens, prompt positions masked out.

use burn::tensor::{Int, Tensor};
use model::ops::token_logprobs;

/// Σ −log p(target) over the positions where `mask` is 1.
/// logits: [b, t, v], targets: [b, t], mask: [b, t] → [1]
pub fn nll_sum(logits: Tensor<3>, targets: Tensor<2, Int>, mask: Tensor<2>) -> Tensor<1> {
    (token_logprobs(logits, targets) * mask).sum().neg()
}

/// Number of masked-in positions where the most likely token is the target.
pub fn correct_count(logits: Tensor<3>, targets: Tensor<2, Int>, mask: Tensor<2>) -> usize {
    let [b, t, _] = logits.dims();
    let hits = logits.argmax(2).reshape([b, t]).equal(targets).float() * mask;
    hits.sum().into_scalar::<f32>().round() as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    /// Reference values from PyTorch:
    /// ```python
    /// import torch
    /// logits = torch.tensor([[[1., 2., 0.5], [0.1, -1., 3.]], [[2., 2., 2.], [0., 1., -1.]]])
    /// targets = torch.tensor([[1, 2], [0, 1]]); mask = torch.tensor([[0., 1.], [1., 1.]])
    /// lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    /// print(-(lp * mask).sum())  # tensor(1.5770); -lp = [[0.4644, 0.0708], [1.0986, 0.4076]]
    /// ```
    #[test]
    fn nll_matches_pytorch_and_ignores_prompt_targets() {
        let device = model::parse_device("cpu").unwrap();
        let logits = Tensor::<3>::from_data(
            TensorData::new(
                vec![1.0f32, 2., 0.5, 0.1, -1., 3., 2., 2., 2., 0., 1., -1.],
                [2, 2, 3],
            ),
            &device,
        );
        let mask =
            Tensor::<2>::from_data(TensorData::new(vec![0.0f32, 1., 1., 1.], [2, 2]), &device);
        let targets =
            |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [2, 2]), &device);
        let a =
            nll_sum(logits.clone(), targets(vec![1, 2, 0, 1]), mask.clone()).into_scalar::<f32>();
        assert!((a - 1.5770).abs() < 1e-4, "{a}");
        // Changing the label of the masked (prompt) position changes nothing.
        let b =
            nll_sum(logits.clone(), targets(vec![0, 2, 0, 1]), mask.clone()).into_scalar::<f32>();
        assert_eq!(a, b);
        // argmax: [1, 2], [0 (tie → first), 1]: positions in the mask hit 3 of 3.
        assert_eq!(correct_count(logits, targets(vec![1, 2, 0, 1]), mask), 3);
    }
}
