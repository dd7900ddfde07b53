//! DPO's losses against reference numbers computed with PyTorch 2.9 (float64, TRL's formulas) on
//! the same literal inputs. Shared inputs: five responses in two groups — group 0 = rows 0, 1, 2
//! ranked 1, 2, 3; group 1 = rows 3, 4 ranked 2, 1 — and β = 0.1:
//! ```python
//! import torch, torch.nn.functional as F
//! f64 = torch.float64
//! pol = torch.tensor([-10.0, -12.5, -9.0, -20.0, -18.0], dtype=f64)
//! ref = torch.tensor([-11.0, -12.0, -9.5, -19.0, -19.5], dtype=f64)
//! lens = torch.tensor([4.0, 5.0, 3.0, 8.0, 6.0], dtype=f64)
//! beta = 0.1
//! pairs = [(0, 1), (0, 2), (1, 2), (4, 3)]              # (better, worse)
//! w = torch.tensor([1 / (2 * 3)] * 3 + [1 / 2], dtype=f64)  # each group weighs the same
//! a, b = torch.tensor([0, 0, 1, 4]), torch.tensor([1, 2, 2, 3])
//! h = (pol[a] - ref[a]) - (pol[b] - ref[b])
//! ```

use burn::tensor::{Device, Tensor, TensorData};
use dpo::loss::*;
use model::ops::to_f32_vec;
use reward::BatchPlan;
use reward::loss::{ListTerm, PairTerm};

const POL: [f32; 5] = [-10.0, -12.5, -9.0, -20.0, -18.0];
const REF: [f32; 5] = [-11.0, -12.0, -9.5, -19.0, -19.5];
const LENS: [f32; 5] = [4.0, 5.0, 3.0, 8.0, 6.0];

fn cpu() -> Device {
    model::parse_device("cpu").unwrap()
}

fn t1(v: &[f32], device: &Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
}

fn scalar(x: Tensor<1>) -> f64 {
    x.into_scalar::<f32>() as f64
}

fn close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() < 1e-5, "{what}: got {got}, want {want}");
}

fn plan() -> BatchPlan {
    let pair = |a, b, group| PairTerm {
        a,
        b,
        margin: 0.0,
        tie: false,
        group,
    };
    let list = |item, candidates: &[usize], group| ListTerm {
        item,
        candidates: candidates.to_vec(),
        group,
    };
    BatchPlan {
        rows: vec![vec![1]; 5],
        pairs: vec![pair(0, 1, 0), pair(0, 2, 0), pair(1, 2, 0), pair(4, 3, 1)],
        lists: vec![
            list(0, &[0, 1, 2], 0),
            list(1, &[1, 2], 0),
            list(4, &[3, 4], 1),
        ],
        groups: vec![0..3, 3..5],
        priors: Vec::new(),
    }
}

/// ```python
/// for eps in (0.0, 0.1):
///     l = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
///     (l * w).sum()
/// # eps 0:   terms [0.62095705, 0.66845965, 0.74439666, 0.57593942], loss 0.6269386026
/// # eps 0.1: terms [0.63595705, 0.67345965, 0.73439666, 0.60093942], loss 0.6411052693
/// ```
#[test]
fn sigmoid_and_conservative_dpo_match_pytorch() {
    let d = cpu();
    let p = plan();
    let h = pair_logits(t1(&POL, &d), t1(&REF, &d), &p.pairs);
    let terms = to_f32_vec(sigmoid_loss(h.clone(), 0.1, 0.0));
    for (g, w) in terms.iter().zip([
        0.6209570477895321,
        0.6684596480132863,
        0.7443966600735709,
        0.5759394198788436,
    ]) {
        close(*g as f64, w, "sigmoid term");
    }
    let smoothed = to_f32_vec(sigmoid_loss(h, 0.1, 0.1));
    for (g, w) in smoothed.iter().zip([
        0.6359570477895321,
        0.6734596480132863,
        0.7343966600735709,
        0.6009394198788436,
    ]) {
        close(*g as f64, w, "cDPO term");
    }
    let loss = |eps| {
        scalar(batch_loss(
            t1(&POL, &d),
            t1(&REF, &d),
            &p,
            LossKind::Sigmoid,
            0.1,
            eps,
        ))
    };
    close(loss(0.0), 0.6269386025854866, "DPO loss");
    close(loss(0.1), 0.6411052692521533, "cDPO loss");
}

/// ```python
/// pa, ra = pol / lens, ref / lens
/// hi = (pa[a] - ra[a]) - (pa[b] - ra[b])
/// li = (hi - 1 / (2 * beta)) ** 2
/// (li * w).sum()   # terms [21.6225, 24.17361111, 27.73777778, 21.390625], loss 22.9509606481
/// ```
#[test]
fn ipo_matches_pytorch() {
    let d = cpu();
    let avg = |v: &[f32]| -> Vec<f32> { v.iter().zip(LENS).map(|(x, l)| x / l).collect() };
    let (pa, ra) = (t1(&avg(&POL), &d), t1(&avg(&REF), &d));
    let terms = to_f32_vec(ipo_loss(
        pair_logits(pa.clone(), ra.clone(), &plan().pairs),
        0.1,
    ));
    for (g, w) in terms.iter().zip([
        21.622500000000002,
        24.173611111111104,
        27.737777777777776,
        21.390625,
    ]) {
        assert!((*g as f64 - w).abs() < 1e-4, "ipo term {g} vs {w}");
    }
    let loss = scalar(batch_loss(pa, ra, &plan(), LossKind::Ipo, 0.1, 0.0));
    assert!((loss - 22.950960648148147).abs() < 1e-4, "{loss}");
}

/// ```python
/// r = beta * (pol - ref)                       # [0.1, -0.05, 0.05, -0.1, 0.15]
/// t0 = -(r[0] - torch.logsumexp(r[[0, 1, 2]], 0))
/// t1 = -(r[1] - torch.logsumexp(r[[1, 2]], 0))
/// t2 = -(r[4] - torch.logsumexp(r[[4, 3]], 0))
/// # terms [1.03387371, 0.74439666, 0.57593942]; each group's mean, then the groups' mean:
/// (t0 + t1) / 2 / 2 + t2 / 2                   # 0.7325373030
/// ```
#[test]
fn listwise_plackett_luce_dpo_matches_pytorch() {
    let d = cpu();
    let r = to_f32_vec(implicit_rewards(t1(&POL, &d), t1(&REF, &d), 0.1));
    for (g, w) in r.iter().zip([0.1, -0.05, 0.05, -0.1, 0.15]) {
        close(*g as f64, w, "implicit reward");
    }
    let loss = scalar(batch_loss(
        t1(&POL, &d),
        t1(&REF, &d),
        &plan(),
        LossKind::Listwise,
        0.1,
        0.0,
    ));
    close(loss, 0.7325373030314226, "listwise loss");
    // For K = 2 the listwise loss is the sigmoid loss: group 1 alone.
    let two = BatchPlan {
        rows: vec![vec![1]; 5],
        pairs: vec![plan().pairs[3]],
        lists: vec![plan().lists[2].clone()],
        groups: std::iter::once(3..5).collect(),
        priors: Vec::new(),
    };
    let (l, s) = (
        scalar(batch_loss(
            t1(&POL, &d),
            t1(&REF, &d),
            &two,
            LossKind::Listwise,
            0.1,
            0.0,
        )),
        scalar(batch_loss(
            t1(&POL, &d),
            t1(&REF, &d),
            &two,
            LossKind::Sigmoid,
            0.1,
            0.0,
        )),
    );
    close(l, s, "K = 2: listwise = sigmoid");
}

#[test]
fn gradients_flow_into_the_policy_only_and_pair_stats_are_trl_s() {
    let d = cpu().autodiff();
    let pol = t1(&POL, &d).require_grad();
    let reference = t1(&REF, &d).require_grad();
    let loss = batch_loss(
        pol.clone(),
        reference.clone(),
        &plan(),
        LossKind::Sigmoid,
        0.1,
        0.0,
    );
    let grads = loss.backward();
    // d loss / d pol_0 = Σ over its pairs of w · β · (σ(β h) − 1).
    let g = to_f32_vec(pol.grad(&grads).unwrap());
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let (h01, h02) = (1.5f64, 0.5f64);
    let want0 = (1.0 / 6.0) * 0.1 * ((sig(0.1 * h01) - 1.0) + (sig(0.1 * h02) - 1.0));
    close(g[0] as f64, want0, "gradient of row 0");
    assert!(
        reference
            .grad(&grads)
            .is_none_or(|r| to_f32_vec(r).iter().all(|&x| x == 0.0))
    );
    let s = PairStats::of(&[(0, 1), (4, 3)], &[0.1, -0.05, 0.05, -0.1, 0.15], &POL);
    close(s.chosen, 0.125, "rewards/chosen");
    close(s.rejected, -0.075, "rewards/rejected");
    close(s.margin, 0.2, "rewards/margins");
    close(s.accuracy, 1.0, "rewards/accuracies");
    close(s.logps_chosen, -14.0, "logps/chosen");
    close(s.logps_rejected, -16.25, "logps/rejected");
}
