//! The PPO math of `ppo::core` against reference numbers computed with PyTorch 2.9 (float64) on
//! the same literal inputs; the Python that produced each number is quoted above its test.
//!
//! Shared inputs of the Python snippets (B = 2, T = 4, the second row padded after 2 tokens):
//! ```python
//! import torch
//! f64 = torch.float64
//! mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
//! m = mask.to(f64)
//! ```

use burn::tensor::{Device, Tensor, TensorData};
use model::ops::{mask_tensor, to_f32_vec};
use ppo::core::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOL: f64 = 1e-5;
const B: usize = 2;
const T: usize = 4;
const MASK: [bool; 8] = [true, true, true, true, true, true, false, false];

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= TOL,
            "{what}[{i}]: got {g}, want {w}\n got:  {got:?}\n want: {want:?}"
        );
    }
}

fn assert_scalar(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= TOL, "{what}: got {got}, want {want}");
}

fn cpu() -> Device {
    model::parse_device("cpu").unwrap()
}

fn t2(v: &[f32], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v.to_vec(), [B, T]), device)
}

fn scalar(x: Tensor<1>) -> f64 {
    x.into_scalar::<f32>() as f64
}

// Inputs of the KL tests (padding holds garbage that must be ignored).
const LOGP: [f32; 8] = [-1.2, -0.3, -2.5, -0.8, -0.5, -1.7, -0.9, -3.0];
const REF: [f32; 8] = [-1.0, -0.6, -2.0, -1.1, -0.9, -1.2, -0.4, -2.0];

/// ```python
/// logp = torch.tensor([[-1.2, -0.3, -2.5, -0.8], [-0.5, -1.7, -0.9, -3.0]], dtype=f64)
/// ref = torch.tensor([[-1.0, -0.6, -2.0, -1.1], [-0.9, -1.2, -0.4, -2.0]], dtype=f64)
/// k1 = (logp - ref) * m
/// r = ref - logp
/// k3 = (torch.exp(r) - r - 1) * m
/// # k1 [-0.2, 0.3, -0.5, 0.3, 0.4, -0.5, 0, 0]
/// # k3 [0.02140276, 0.04081822, 0.14872127, 0.04081822, 0.07032005, 0.14872127, 0, 0]
/// ```
#[test]
fn kl_per_token_k1_and_k3_match_pytorch() {
    let k1 = kl_per_token(&LOGP, &REF, &MASK, KlEstimator::K1);
    assert_close(&k1, &[-0.2, 0.3, -0.5, 0.3, 0.4, -0.5, 0.0, 0.0], "k1");
    let k3 = kl_per_token(&LOGP, &REF, &MASK, KlEstimator::K3);
    assert_close(
        &k3,
        &[
            0.02140276, 0.04081822, 0.14872127, 0.04081822, 0.07032005, 0.14872127, 0.0, 0.0,
        ],
        "k3",
    );
    assert!(k3.iter().all(|&x| x >= 0.0), "k3 is never negative");
}

/// ```python
/// scores = torch.tensor([1.5, -0.7], dtype=f64)
/// kl_coef = 0.1
/// rew = -kl_coef * k1                      # k1 from the test above
/// last = mask.long().sum(1) - 1
/// rew[torch.arange(2), last] += scores
/// rew = rew * m
/// # [0.02, -0.03, 0.05, 1.47, -0.04, -0.65, 0, 0]
/// ```
#[test]
fn per_token_rewards_match_pytorch() {
    let k1 = kl_per_token(&LOGP, &REF, &MASK, KlEstimator::K1);
    let r = per_token_rewards(&k1, &[1.5, -0.7], &MASK, B, T, 0.1);
    assert_close(
        &r,
        &[0.02, -0.03, 0.05, 1.47, -0.04, -0.65, 0.0, 0.0],
        "rewards",
    );
}

#[test]
fn per_token_rewards_skip_empty_rows() {
    let mask = [true, false, false, false];
    let r = per_token_rewards(&[0.5, 9.0, 0.0, 0.0], &[2.0, 3.0], &mask, 2, 2, 1.0);
    assert_eq!(r, vec![1.5, 0.0, 0.0, 0.0]);
    assert_eq!(
        last_token_index(&mask, 2, 2),
        vec![Some(0), None],
        "last real token per row"
    );
}

/// TRL's old `compute_advantages` loop:
/// ```python
/// rewards = torch.tensor([[0.02, -0.03, 0.05, 1.47], [-0.04, -0.65, 5.0, 5.0]], dtype=f64)
/// values = torch.tensor([[0.3, -0.2, 0.8, 0.5], [0.1, 0.4, 9.0, 9.0]], dtype=f64)
/// gamma, lam = 0.99, 0.95
/// v, rw = values * m, rewards * m
/// lastgaelam, rev = 0.0, []
/// T = 4
/// for t in reversed(range(T)):
///     nextv = v[:, t + 1] if t < T - 1 else 0.0
///     delta = rw[:, t] + gamma * nextv - v[:, t]
///     lastgaelam = delta + gamma * lam * lastgaelam
///     rev.append(lastgaelam)
/// adv = torch.stack(rev[::-1], 1) * m
/// ret = (adv + v) * m
/// # adv [1.00815604, 1.58017654, 0.65728500, 0.97, -0.73152500, -1.05, 0, 0]
/// # ret [1.30815604, 1.38017654, 1.45728500, 1.47, -0.63152500, -0.65, 0, 0]
/// ```
#[test]
fn gae_with_mask_matches_pytorch() {
    let rewards = [0.02, -0.03, 0.05, 1.47, -0.04, -0.65, 5.0, 5.0];
    let values = [0.3, -0.2, 0.8, 0.5, 0.1, 0.4, 9.0, 9.0];
    let (adv, ret) = gae(&rewards, &values, &MASK, B, T, 0.99, 0.95);
    assert_close(
        &adv,
        &[
            1.00815604,
            1.58017654,
            0.65728500,
            0.97,
            -0.73152500,
            -1.05,
            0.0,
            0.0,
        ],
        "advantages",
    );
    assert_close(
        &ret,
        &[
            1.30815604,
            1.38017654,
            1.45728500,
            1.47,
            -0.63152500,
            -0.65,
            0.0,
            0.0,
        ],
        "returns",
    );
}

/// A deliberately naive GAE: `A_j = Σ_{l=0}^{L−1−j} (γλ)^l δ_{j+l}` with
/// `δ_k = r_k + γ·V_{k+1} − V_k` and `V_L = 0`, for each row of real length `L`.
fn naive_gae(
    rewards: &[f32],
    values: &[f32],
    lens: &[usize],
    t: usize,
    gamma: f64,
    lam: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut adv = vec![0.0; lens.len() * t];
    let mut ret = vec![0.0; lens.len() * t];
    for (i, &len) in lens.iter().enumerate() {
        let r = |k: usize| rewards[i * t + k] as f64;
        let v = |k: usize| {
            if k < len {
                values[i * t + k] as f64
            } else {
                0.0
            }
        };
        for j in 0..len {
            let mut a = 0.0;
            for l in 0..len - j {
                let delta = r(j + l) + gamma * v(j + l + 1) - v(j + l);
                a += (gamma * lam).powi(l as i32) * delta;
            }
            adv[i * t + j] = a;
            ret[i * t + j] = a + v(j);
        }
    }
    (adv, ret)
}

#[test]
fn gae_matches_naive_oracle_on_random_data() {
    let mut rng = StdRng::seed_from_u64(17);
    for &(gamma, lam) in &[(0.99, 0.95), (1.0, 0.95), (1.0, 1.0), (0.9, 0.0)] {
        let (b, t) = (8, 9);
        // Lengths 1 and t (a full row) always, the rest random.
        let mut lens = vec![1, t];
        lens.extend((2..b).map(|_| rng.random_range(1..=t)));
        let mask: Vec<bool> = lens
            .iter()
            .flat_map(|&l| (0..t).map(move |j| j < l))
            .collect();
        // Garbage in the padding too: it must be ignored.
        let rewards: Vec<f32> = (0..b * t).map(|_| rng.random_range(-2.0..2.0)).collect();
        let values: Vec<f32> = (0..b * t).map(|_| rng.random_range(-3.0..3.0)).collect();
        let (adv, ret) = gae(&rewards, &values, &mask, b, t, gamma, lam);
        let (want_adv, want_ret) = naive_gae(&rewards, &values, &lens, t, gamma, lam);
        assert_close(&adv, &want_adv, &format!("advantages γ={gamma} λ={lam}"));
        assert_close(&ret, &want_ret, &format!("returns γ={gamma} λ={lam}"));
    }
}

/// TRL/OpenRLHF `masked_whiten`:
/// ```python
/// def masked_whiten(x, mk, shift_mean):
///     mean = (x * mk).sum() / mk.sum()
///     var = ((x - mean) ** 2 * mk).sum() / mk.sum()
///     var = var * mk.sum() / (mk.sum() - 1)
///     w = (x - mean) * torch.rsqrt(var + 1e-8)
///     if not shift_mean:
///         w = w + mean
///     return w * mk
/// xw = torch.tensor([[0.5, -1.0, 2.0, 0.25], [3.0, -0.75, 100.0, -100.0]], dtype=f64)
/// masked_whiten(xw, m, True)
/// # [-0.10666098, -1.06660978, 0.85328782, -0.26665245, 1.49325369, -0.90661831, 0, 0]
/// masked_whiten(xw, m, False)
/// # [0.56000569, -0.39994311, 1.51995449, 0.40001422, 2.15992036, -0.23995165, 0, 0]
/// ```
#[test]
fn whiten_matches_pytorch_both_ways() {
    let x = [0.5, -1.0, 2.0, 0.25, 3.0, -0.75, 100.0, -100.0];
    assert_close(
        &whiten(&x, &MASK, true),
        &[
            -0.10666098,
            -1.06660978,
            0.85328782,
            -0.26665245,
            1.49325369,
            -0.90661831,
            0.0,
            0.0,
        ],
        "whiten shift_mean=true",
    );
    assert_close(
        &whiten(&x, &MASK, false),
        &[
            0.56000569,
            -0.39994311,
            1.51995449,
            0.40001422,
            2.15992036,
            -0.23995165,
            0.0,
            0.0,
        ],
        "whiten shift_mean=false",
    );
}

#[test]
fn whiten_degenerate_masks() {
    assert_eq!(whiten(&[1.0, 2.0], &[false, false], true), vec![0.0, 0.0]);
    assert_eq!(whiten(&[5.0, 2.0], &[true, false], true), vec![0.0, 0.0]);
    assert_eq!(whiten(&[5.0, 2.0], &[true, false], false), vec![5.0, 0.0]);
}

/// cleanrl's `explained_var` (population variances) over the masked positions:
/// ```python
/// yt = torch.tensor([1.0, 0.2, 0.9, -0.5, 0.0, 0.3], dtype=f64)   # returns
/// yp = torch.tensor([0.7, -0.5, 0.85, 0.1, 0.15, 0.9], dtype=f64)  # values
/// 1 - torch.var(yt - yp, unbiased=False) / torch.var(yt, unbiased=False)
/// # 0.17523610
/// ```
#[test]
fn explained_variance_matches_pytorch() {
    let values = [0.7, -0.5, 0.85, 0.1, 0.15, 0.9, 50.0, -50.0];
    let returns = [1.0, 0.2, 0.9, -0.5, 0.0, 0.3, 7.0, 7.0];
    assert_scalar(
        explained_variance(&values, &returns, &MASK),
        0.17523610,
        "explained variance",
    );
    assert_scalar(
        explained_variance(&returns, &returns, &MASK),
        1.0,
        "perfect value head",
    );
    let constant = [2.0; 8];
    assert!(explained_variance(&values, &constant, &MASK).is_nan());
    assert!(explained_variance(&values, &returns, &[false; 8]).is_nan());
}

/// Ziegler et al. 2019 / TRL `AdaptiveKLController`:
/// ```python
/// value, target, horizon = 0.1, 6.0, 10000.0
/// for kl, n in [(7.0, 256), (20.0, 512), (1.0, 128), (5.5, 64)]:
///     err = min(max(kl / target - 1, -0.2), 0.2)
///     value *= 1 + err * n / horizon
///     print(value)
/// # 0.1004266667, 0.1014550357, 0.1011953108, 0.1011413400
/// ```
#[test]
fn adaptive_kl_controller_matches_reference() {
    let mut c = KlController::Adaptive(AdaptiveKlController::new(0.1, 6.0, 10000.0));
    let steps = [
        (7.0, 256, 0.1004266667),  // error 1/6, inside the clip
        (20.0, 512, 0.1014550357), // error 2.33, clipped to 0.2
        (1.0, 128, 0.1011953108),  // error −0.83, clipped to −0.2
        (5.5, 64, 0.1011413400),   // error −1/12
    ];
    for (kl, n, want) in steps {
        c.update(kl, n);
        assert!(
            (c.value() - want).abs() <= 1e-9,
            "after kl={kl}: {} vs {want}",
            c.value()
        );
    }
    let before = c.value();
    c.update(f64::NAN, 64);
    assert_eq!(c.value(), before, "a NaN KL leaves the coefficient alone");

    let mut fixed = KlController::Fixed(0.05);
    fixed.update(100.0, 512);
    assert_eq!(fixed.value(), 0.05);
}

#[test]
fn controllers_and_estimators_round_trip_through_serde() {
    let c = KlController::Adaptive(AdaptiveKlController::new(0.2, 6.0, 10000.0));
    let json = serde_json::to_string(&c).unwrap();
    assert_eq!(
        json,
        r#"{"adaptive":{"value":0.2,"target":6.0,"horizon":10000.0}}"#
    );
    assert_eq!(serde_json::from_str::<KlController>(&json).unwrap(), c);
    let f: KlController = serde_json::from_str(r#"{"fixed":0.05}"#).unwrap();
    assert_eq!(f, KlController::Fixed(0.05));
    assert_eq!(serde_json::to_string(&KlEstimator::K3).unwrap(), r#""k3""#);
    assert_eq!(
        serde_json::from_str::<KlEstimator>(r#""k1""#).unwrap(),
        KlEstimator::K1
    );
}

// Inputs of the policy-loss tests. Log-ratios (logp − old) of the real tokens are
// [0.5, −0.4, 0.1, 0.3 | −0.5, 0.05]: with ε = 0.2, token (0,0) (A > 0, ratio 1.65) and token
// (1,0) (A < 0, ratio 0.61) are clipped; (0,1) (A > 0, ratio 0.67) and (0,3) (A < 0, ratio 1.35)
// are outside the range but keep the unclipped (pessimistic) term; (0,2) and (1,1) are inside.
const PL_LOGP: [f32; 8] = [-1.0, -2.0, -0.5, -1.5, -0.7, -1.1, -0.3, -2.2];
const PL_OLD: [f32; 8] = [-1.5, -1.6, -0.6, -1.8, -0.2, -1.15, -3.3, 4.8];
const PL_ADV: [f32; 8] = [1.0, 0.8, -0.5, -1.3, -0.6, 0.4, 5.0, -5.0];

/// ```python
/// logp = torch.tensor([[-1.0, -2.0, -0.5, -1.5], [-0.7, -1.1, -0.3, -2.2]], dtype=f64,
///                     requires_grad=True)
/// log_ratio_in = torch.tensor([[0.5, -0.4, 0.1, 0.3], [-0.5, 0.05, 3.0, -7.0]], dtype=f64)
/// old = (logp - log_ratio_in).detach()
/// # old [-1.5, -1.6, -0.6, -1.8, -0.2, -1.15, -3.3, 4.8]
/// A = torch.tensor([[1.0, 0.8, -0.5, -1.3], [-0.6, 0.4, 5.0, -5.0]], dtype=f64)
/// eps = 0.2
/// lr = (logp - old) * m
/// ratio = torch.exp(lr)
/// l1 = -A * ratio
/// l2 = -A * torch.clamp(ratio, 1 - eps, 1 + eps)
/// loss = (torch.max(l1, l2) * m).sum() / m.sum()
/// loss.backward()
/// loss.item()                                                 # 0.1051062389
/// ((l2 > l1).to(f64) * m).sum() / m.sum()                     # 0.3333333333
/// ((0.5 * lr ** 2) * m).sum() / m.sum()                       # 0.0635416667
/// (((ratio - 1) - lr) * m).sum() / m.sum()                    # 0.0636454664
/// logp.grad  # [0, -0.08937601, 0.09209758, 0.29246941, 0, -0.07008474, 0, 0]
/// ```
#[test]
fn policy_loss_matches_pytorch() {
    let device = cpu();
    let out = policy_loss(
        t2(&PL_LOGP, &device),
        t2(&PL_OLD, &device),
        t2(&PL_ADV, &device),
        mask_tensor(&MASK, B, T, &device),
        (0.2, 0.2),
        LossAgg::TokenMean,
        T,
    );
    assert_scalar(scalar(out.loss), 0.1051062389, "policy loss");
    assert_scalar(out.clip_fraction as f64, 1.0 / 3.0, "clip fraction");
    assert_scalar(out.approx_kl as f64, 0.0635416667, "approx kl (k2)");
    assert_scalar(out.approx_kl_k3 as f64, 0.0636454664, "approx kl (k3)");
}

/// The policy loss of the policy-loss inputs with `clip` and `agg`, its value, clip fraction and
/// gradient w.r.t. the log-probabilities.
fn policy_loss_with_gradient(clip: (f64, f64), agg: LossAgg) -> (f64, f32, Vec<f32>) {
    let device = cpu().autodiff();
    let logp = t2(&PL_LOGP, &device).require_grad();
    let out = policy_loss(
        logp.clone(),
        t2(&PL_OLD, &device),
        t2(&PL_ADV, &device),
        mask_tensor(&MASK, B, T, &device),
        clip,
        agg,
        T,
    );
    let loss = scalar(out.loss.clone());
    let grads = out.loss.backward();
    let g = to_f32_vec(logp.grad(&grads).expect("logprobs have a gradient"));
    (loss, out.clip_fraction, g)
}

#[test]
fn policy_loss_gradient_matches_pytorch() {
    let (loss, _, g) = policy_loss_with_gradient((0.2, 0.2), LossAgg::TokenMean);
    assert_scalar(loss, 0.1051062389, "policy loss");
    assert_close(
        &g,
        &[
            0.0,
            -0.08937601,
            0.09209758,
            0.29246941,
            0.0,
            -0.07008474,
            0.0,
            0.0,
        ],
        "d loss / d logprobs",
    );
    // Exactly zero where the clipped term is active, and on the padding.
    for i in [0, 4, 6, 7] {
        assert_eq!(g[i], 0.0, "gradient at {i}");
    }
}

/// ```python
/// vals = torch.tensor([[0.7, -0.5, 0.625, 0.1], [0.375, 0.9, 3.0, -3.0]], dtype=f64)
/// old_vals = torch.tensor([[0.3, -0.2, 0.5, 0.5], [0.25, 0.4, 0.0, 0.0]], dtype=f64)
/// rets = torch.tensor([[1.0, 0.2, 0.75, -0.5], [0.0, 0.3, 7.0, 7.0]], dtype=f64)
/// vclip = 0.2
/// vc = old_vals + torch.clamp(vals - old_vals, -vclip, vclip)
/// u, c = (vals - rets) ** 2, (vc - rets) ** 2
/// 0.5 * ((torch.max(u, c) * m).sum() / m.sum())               # 0.1580208333
/// ((c > u).to(f64) * m).sum() / m.sum()                       # 0.3333333333
/// ```
#[test]
fn value_loss_matches_pytorch() {
    let device = cpu();
    let out = value_loss(
        t2(&[0.7, -0.5, 0.625, 0.1, 0.375, 0.9, 3.0, -3.0], &device),
        t2(&[0.3, -0.2, 0.5, 0.5, 0.25, 0.4, 0.0, 0.0], &device),
        t2(&[1.0, 0.2, 0.75, -0.5, 0.0, 0.3, 7.0, 7.0], &device),
        mask_tensor(&MASK, B, T, &device),
        0.2,
    );
    assert_scalar(scalar(out.loss), 0.1580208333, "value loss");
    assert_scalar(out.clip_fraction as f64, 1.0 / 3.0, "value clip fraction");
}

/// ```python
/// d = ref - logp                      # the KL-test inputs
/// ((-d * m).sum() / m.sum())                          # k1: -0.0333333333
/// (((torch.exp(d) - d - 1) * m).sum() / m.sum())      # k3: 0.0784669645
/// ```
#[test]
fn kl_loss_matches_pytorch() {
    let device = cpu();
    let mask = mask_tensor(&MASK, B, T, &device);
    let kl = |est| {
        kl_loss(
            t2(&LOGP, &device),
            t2(&REF, &device),
            mask.clone(),
            est,
            LossAgg::TokenMean,
            T,
        )
    };
    assert_scalar(scalar(kl(KlEstimator::K1)), -0.0333333333, "kl loss k1");
    let k3 = kl(KlEstimator::K3);
    assert_scalar(scalar(k3), 0.0784669645, "kl loss k3");
}

/// ```python
/// logits = torch.tensor([[[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0]],
///                        [[1000.0, 999.0, -1000.0, 998.5], [3.0, -2.0, 0.25, 1.5]]], dtype=f64)
/// torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
/// # [1.01440278, 1.38629436, 0.90595926, 0.67819288]
/// ```
#[test]
fn entropy_matches_pytorch_and_is_stable() {
    let device = cpu();
    let logits = Tensor::<3>::from_data(
        TensorData::new(
            vec![
                1.0f32, 2.0, 0.5, -1.0, 0.0, 0.0, 0.0, 0.0, 1000.0, 999.0, -1000.0, 998.5, 3.0,
                -2.0, 0.25, 1.5,
            ],
            [2, 2, 4],
        ),
        &device,
    );
    let h = entropy_from_logits(logits);
    assert_eq!(h.dims(), [2, 2]);
    assert_close(
        &to_f32_vec(h),
        &[1.01440278, 1.38629436, 0.90595926, 0.67819288],
        "entropy",
    );
}

/// verl's outcome estimators (`compute_grpo_outcome_advantage`,
/// `compute_rloo_outcome_advantage`), three groups of three returns:
/// ```python
/// R = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, -1.0, 0.25, 3.0], dtype=f64)
/// g = R.view(3, 3)
/// mean, std = g.mean(-1, keepdim=True), g.std(-1, keepdim=True)  # std: Bessel-corrected
/// ((g - mean) / (std + 1e-6)).flatten()   # grpo
/// (g - mean).flatten()                    # dr_grpo
/// n = 3
/// (g * n / (n - 1) - mean * n / (n - 1)).flatten()   # rloo (verl)
/// torch.stack([g[:, i] - (g.sum(-1) - g[:, i]) / (n - 1) for i in range(n)], -1)  # the same
/// ```
#[test]
fn group_advantages_match_pytorch() {
    let r = [1.0, 0.0, 0.5, 2.0, 2.0, 2.0, -1.0, 0.25, 3.0];
    let (grpo, uniform) = group_advantages(&r, 3, Estimator::Grpo);
    assert_close(
        &grpo,
        &[
            0.999998000004,
            -0.999998000004,
            0.0,
            0.0,
            0.0,
            0.0,
            -0.8551856925838929,
            -0.2443387693096837,
            1.0995244618935767,
        ],
        "grpo",
    );
    assert_eq!(uniform, 1, "the middle group scored 2 three times");
    let (dr, _) = group_advantages(&r, 3, Estimator::DrGrpo);
    assert_close(
        &dr,
        &[0.5, -0.5, 0.0, 0.0, 0.0, 0.0, -1.75, -0.5, 2.25],
        "dr_grpo",
    );
    let (rloo, _) = group_advantages(&r, 3, Estimator::Rloo);
    assert_close(
        &rloo,
        &[0.75, -0.75, 0.0, 0.0, 0.0, 0.0, -2.625, -0.75, 3.375],
        "rloo",
    );
    // Each group's advantages sum to 0 (all three are baselines from the same group).
    for a in [&grpo, &dr, &rloo] {
        for g in a.chunks(3) {
            assert!(g.iter().sum::<f32>().abs() < 1e-5, "{g:?}");
        }
    }
    let row = row_sums(&[0.1, -0.2, 0.3, 1.0, 0.5, 0.5, 0.0, 0.0], B, T);
    assert_close(&row, &[1.2, 1.0], "row sums");
    assert_close(
        &broadcast_rows(&[0.5, -2.0], &MASK, B, T),
        &[0.5, 0.5, 0.5, 0.5, -2.0, -2.0, 0.0, 0.0],
        "broadcast",
    );
}

/// verl's `compute_reinforce_plus_plus_outcome_advantage` (discounted returns, `masked_whiten`):
/// ```python
/// r = torch.tensor([[0.1, -0.2, 0.05, 1.5], [-0.3, 0.7, 9.0, -9.0]], dtype=f64)
/// ret = torch.zeros_like(r); run = torch.zeros(2, dtype=f64)
/// for t in reversed(range(4)):
///     run = r[:, t] + gamma * run
///     ret[:, t] = run
///     run = run * m[:, t]
/// mu = (ret * m).sum() / m.sum()
/// var = (((ret - mu) ** 2) * m).sum() / m.sum() * m.sum() / (m.sum() - 1)
/// (ret - mu) * torch.rsqrt(var + 1e-8) * m
/// # gamma 1.0: [0.60112970, 0.39502809, 0.80723131, 0.70418051, -1.56293722, -0.94463239, 0, 0]
/// # gamma 0.9: [0.10677482, 0.12050302, 0.89843388, 1.12723707, -1.54976031, -0.70318848, 0, 0]
/// ```
#[test]
fn reinforce_pp_advantages_match_pytorch() {
    let r = [0.1, -0.2, 0.05, 1.5, -0.3, 0.7, 9.0, -9.0];
    assert_close(
        &reinforce_pp_advantages(&r, &MASK, B, T, 1.0),
        &[
            0.6011297004837791,
            0.39502808888934043,
            0.8072313120782174,
            0.704180506280998,
            -1.5629372212578259,
            -0.9446323864745102,
            0.0,
            0.0,
        ],
        "reinforce++ γ = 1",
    );
    assert_close(
        &reinforce_pp_advantages(&r, &MASK, B, T, 0.9),
        &[
            0.10677482417098864,
            0.1205030158501157,
            0.8984338776673152,
            1.1272370723194325,
            -1.549760305110343,
            -0.7031884848975083,
            0.0,
            0.0,
        ],
        "reinforce++ γ = 0.9",
    );
}

/// verl's `agg_loss` modes (Dr. GRPO's constant: the longest response, here 6):
/// ```python
/// x = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.5, 3.0, 100.0, -100.0]], dtype=f64)
/// (x * m).sum() / m.sum()          # token-mean              1.0416666667
/// s = (x * m).sum(-1)
/// s.mean()                         # seq-mean-token-sum      3.125
/// (s / m.sum(-1)).mean()           # seq-mean-token-mean     1.34375
/// (s / 6).mean()                   # seq-mean-token-sum-norm 0.5208333333
/// ```
#[test]
fn loss_aggregations_match_pytorch() {
    let device = cpu();
    let x = [0.5, -1.0, 2.0, 0.25, 1.5, 3.0, 100.0, -100.0];
    let agg = |a| {
        scalar(aggregate(
            t2(&x, &device),
            mask_tensor(&MASK, B, T, &device),
            a,
            6,
        ))
    };
    assert_scalar(agg(LossAgg::TokenMean), 1.0416666667, "token-mean");
    assert_scalar(agg(LossAgg::SeqMeanTokenSum), 3.125, "seq-mean-token-sum");
    assert_scalar(
        agg(LossAgg::SeqMeanTokenMean),
        1.34375,
        "seq-mean-token-mean",
    );
    assert_scalar(
        agg(LossAgg::SeqMeanTokenSumNorm),
        0.5208333333,
        "seq-mean-token-sum-norm",
    );
    for (a, name) in [
        (LossAgg::TokenMean, "\"token-mean\""),
        (LossAgg::SeqMeanTokenSumNorm, "\"seq-mean-token-sum-norm\""),
    ] {
        assert_eq!(serde_json::to_string(&a).unwrap(), name);
    }
    assert_eq!(
        serde_json::from_str::<Estimator>("\"reinforce_pp\"").unwrap(),
        Estimator::ReinforcePp
    );
}

/// DAPO's clip-higher (ε_low 0.2, ε_high 0.7) with the per-sequence mean of token means:
/// ```python
/// lo, hi = 0.2, 0.7
/// lr = (logp - old) * m; ratio = torch.exp(lr)       # logp, old, A: the policy-loss inputs
/// l1, l2 = -A * ratio, -A * torch.clamp(ratio, 1 - lo, 1 + hi)
/// loss = ((torch.max(l1, l2) * m).sum(-1) / m.sum(-1)).mean()
/// loss.backward()
/// loss.item()                                      # 0.0301759655
/// ((l2 > l1).to(f64) * m).sum() / m.sum()          # 0.1666666667: (0,0) is no longer clipped
/// logp.grad  # [-0.20609016, -0.06703200, 0.06907318, 0.21935206, 0, -0.10512711, 0, 0]
/// ```
#[test]
fn asymmetric_clip_and_sequence_mean_match_pytorch() {
    let (loss, clip_fraction, g) = policy_loss_with_gradient((0.2, 0.7), LossAgg::SeqMeanTokenMean);
    assert_scalar(loss, 0.030175965532146118, "loss");
    assert_scalar(clip_fraction as f64, 1.0 / 6.0, "clip fraction");
    assert_close(
        &g,
        &[
            -0.20609015883751602,
            -0.06703200460356394,
            0.06907318237972797,
            0.21935205623110052,
            0.0,
            -0.1051271096376024,
            0.0,
            0.0,
        ],
        "d loss / d logprobs",
    );
}
