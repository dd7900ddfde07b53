//! The SFT loss: negative log-likelihood of the target tokens (response and EOS), computed on the
//! target positions only: prompt and padding positions never reach the LM head.

use burn::tensor::{Int, Tensor};
use datasets::tokenize::LmBatch;
use model::ops::{select_positions, token_logprobs, token_tensor};

/// The hidden states of the batch's target positions [1, n, d] and their targets [1, n].
/// hidden: [b, t, d]
pub fn target_positions(hidden: Tensor<3>, batch: &LmBatch) -> (Tensor<3>, Tensor<2, Int>) {
    let device = hidden.device();
    let targets = batch.target_tokens();
    let n = targets.len();
    (
        select_positions(hidden, &batch.target_mask),
        token_tensor(&targets, 1, n, &device),
    )
}

/// Σ −log p(target). logits: [b, t, v], targets: [b, t] → [1]
pub fn nll_sum(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    token_logprobs(logits, targets).sum().neg()
}

/// Number of positions where the most likely token is the target.
pub fn correct_count(logits: Tensor<3>, targets: Tensor<2, Int>) -> usize {
    let [b, t, _] = logits.dims();
    let hits = logits.argmax(2).reshape([b, t]).equal(targets).float();
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
        // The logits stand in for hidden states: target_positions picks rows of any width.
        let logits = Tensor::<3>::from_data(
            TensorData::new(
                vec![1.0f32, 2., 0.5, 0.1, -1., 3., 2., 2., 2., 0., 1., -1.],
                [2, 2, 3],
            ),
            &device,
        );
        let batch = |targets: Vec<u32>| LmBatch {
            inputs: model::TokenBatch::dense(vec![0; 4], 2, 2),
            targets,
            target_mask: vec![false, true, true, true],
        };
        let nll = |targets: Vec<u32>| {
            let (l, t) = target_positions(logits.clone(), &batch(targets));
            assert_eq!(l.dims(), [1, 3, 3]);
            (
                nll_sum(l.clone(), t.clone()).into_scalar::<f32>(),
                correct_count(l, t),
            )
        };
        let (a, hits) = nll(vec![1, 2, 0, 1]);
        assert!((a - 1.5770).abs() < 1e-4, "{a}");
        // argmax: [1, 2], [0 (tie → first), 1]: the three target positions all hit.
        assert_eq!(hits, 3);
        // Changing the label of the prompt position changes nothing.
        assert_eq!(nll(vec![0, 2, 0, 1]).0, a);
    }
}
