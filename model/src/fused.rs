//! Fused element-wise operations of the transformer, each with a hand-written backward pass:
//! RMSNorm, SwiGLU, RoPE and the attention softmax (scale, mask bias and softmax in one).
//!
//! Written with burn's decomposed tensor ops, one RMSNorm is seven forward ops and about twice as
//! many in its backward, each a pass over the activations and a fresh buffer; the attention softmax
//! (scale, bias, max, subtract, exp, sum, divide) is worse. Here each operation is one forward and
//! one backward kernel, registered with burn's autodiff as a single node
//! ([`Backward`]), so the graph holds what the backward needs (inputs, or the softmax output) and
//! nothing else.
//!
//! Kernels are per backend ([`Kernels`]): the default bodies compose the backend's own tensor ops
//! (LibTorch runs them as its kernels); the `flex` backend overrides them with loops over
//! contiguous `f32` rows, split across threads for large tensors. Any other case (another dtype, a
//! mix of tracked and untracked inputs) falls back to the decomposed ops, so results never depend
//! on which path ran beyond float rounding (tests below: values and gradients against the
//! decomposed ops).

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary, unary};
use burn::backend::tensor::{FloatTensor, IndexingUpdateOp, IntTensor};
use burn::backend::{Autodiff, Backend, DispatchKindConversion, DispatchTensor, TensorMetadata};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Int, Shape, Tensor};

/// How matrix products of f32 tensors are computed (the `matmul` config key): `fp32`, or `bf16`:
/// operands rounded to bf16, products summed in f32, f32 outputs (mixed precision with f32
/// master weights; PyTorch's `torch.backends.mkldnn.matmul.fp32_precision = "bf16"`).
///
/// `bf16` applies to the flex backend's products of at least 32 rows, 32 columns and depth 32
/// (linear layers in training and prompt forwards, attention over 32+ positions), and runs on
/// Intel AMX tiles where the CPU has them ([`amx`]); elsewhere the same numbers come from the
/// f32 kernels on rounded operands, without the speed. A generation packs the model's weights
/// once ([`pack_weights`]), and then every product of a packed weight is bf16, token-by-token
/// decoding of fewer than 32 sequences included; without AMX nothing is packed and those few-row
/// products stay f32. The LibTorch backend stays f32.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    #[default]
    Fp32,
    Bf16,
}

/// Additive attention bias of a masked key. Finite, so that a fully masked row (a padding query)
/// gives uniform weights rather than NaN; any score plus this is far enough below a row's maximum
/// that its softmax weight is exactly zero ([`attention`] skips such keys).
pub const MASKED: f32 = -1e9;

static MATMUL_BF16: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets the precision of every later matrix product in this process; returns what will run, in
/// words, for the run's log.
pub fn set_matmul_precision(p: MatmulPrecision) -> &'static str {
    MATMUL_BF16.store(
        p == MatmulPrecision::Bf16,
        std::sync::atomic::Ordering::Relaxed,
    );
    match p {
        MatmulPrecision::Fp32 => "fp32",
        MatmulPrecision::Bf16 if cfg!(feature = "tch") => {
            "fp32 (matmul = bf16 is not implemented on the tch backend)"
        }
        #[cfg(feature = "flex")]
        MatmulPrecision::Bf16 if amx::available() => "bf16 operands, f32 sums, on AMX tiles",
        MatmulPrecision::Bf16 => {
            "bf16 operands, f32 sums, emulated (no AMX on this CPU: same numbers, no speed-up)"
        }
    }
}

/// Whether this CPU multiplies bf16 on AMX tiles, which `matmul = "bf16"` needs to gain speed
/// (flex builds; false on other backends).
pub fn amx_available() -> bool {
    #[cfg(feature = "flex")]
    return amx::available();
    #[cfg(not(feature = "flex"))]
    false
}

/// The precision set by [`set_matmul_precision`] (fp32 until then).
pub fn matmul_precision() -> MatmulPrecision {
    if MATMUL_BF16.load(std::sync::atomic::Ordering::Relaxed) {
        MatmulPrecision::Bf16
    } else {
        MatmulPrecision::Fp32
    }
}

/// Whether an m × k · k × n product runs in bf16 under the current setting.
pub fn bf16_product(m: usize, n: usize, k: usize) -> bool {
    matmul_precision() == MatmulPrecision::Bf16 && m >= 32 && n >= 32 && k >= 32
}

/// An autodiff-tracked tensor of backend B (burn-autodiff's `AutodiffTensor`).
type AutodiffTensor<B> = FloatTensor<Autodiff<B>>;

/// Forward and backward kernels of the fused operations on one backend. Shapes: rows are the
/// leading dimensions flattened, the last dimension is the feature (or key) axis. The default
/// bodies ([`generic`]) compose the backend's own tensor ops.
pub trait Kernels: Backend {
    /// y = x · rstd · w with rstd = 1 / sqrt(mean(x²) + eps) per row. x: [.., d], w: [d] →
    /// (y [.., d], rstd [.., 1]).
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f32) -> [FloatTensor<Self>; 2] {
        generic::rms_norm::<Self>(x, w, eps)
    }

    /// Gradients of [`Kernels::rms_norm`]: x̂ = x · rstd, gw = Σ_rows g · x̂,
    /// gx = rstd · (g·w − x̂ · mean(g·w · x̂)).
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        generic::rms_norm_backward::<Self>(x, w, rstd, grad)
    }

    /// SwiGLU on gate and up side by side in the last axis: x [.., 2i] (the output of one product
    /// by the gate | up weight) → silu(gate) · up [.., i].
    fn swiglu_joined(x: FloatTensor<Self>) -> FloatTensor<Self> {
        generic::swiglu_joined::<Self>(x)
    }

    /// Gradient of [`Kernels::swiglu_joined`]: [.., 2i], the gate's and up's gradients side by
    /// side (no gradient of a slice, which burn's autodiff writes into a zeroed whole). With
    /// s = σ(gate): g_up = g · gate · s and g_gate = g · up · s · (1 + gate · (1 − s)).
    fn swiglu_joined_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        generic::swiglu_joined_backward::<Self>(x, grad)
    }

    /// softmax(scale · scores + bias) over the last axis. scores: [b, h, t, k], bias: [b, 1, t, k]
    /// (the same for every head).
    fn masked_softmax(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        generic::masked_softmax::<Self>(scores, bias, scale)
    }

    /// Gradient of [`Kernels::masked_softmax`] with respect to the scores, from its output p:
    /// scale · p · (g − Σ_k g · p).
    fn masked_softmax_backward(
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        generic::masked_softmax_backward::<Self>(probs, grad, scale)
    }

    /// lhs [.., m, k] · rhs [.., k, n] → [.., m, n] with equal batch dimensions; either operand may
    /// be a strided view (a transpose, a slice). rhs may be a frozen weight kept in bf16
    /// ([`crate::WeightDtype`]) under f32 activations: it is widened to lhs's dtype (exactly).
    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let rhs = match (lhs.dtype(), rhs.dtype()) {
            (l, r) if l == r => rhs,
            (l, _) => Self::float_cast(rhs, l.into()),
        };
        Self::float_matmul(lhs, rhs)
    }

    /// log softmax(logits)[target] per row, and the row's log-sum-exp. logits: [b, t, v],
    /// targets: [b, t] → (log-probabilities [b, t], lse [b, t]).
    fn token_logprobs(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        generic::token_logprobs::<Self>(logits, targets)
    }

    /// Gradient of [`Kernels::token_logprobs`] with respect to the logits:
    /// g · (onehot(target) − exp(logits − lse)).
    fn token_logprobs_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        generic::token_logprobs_backward::<Self>(logits, targets, lse, grad)
    }

    /// Rotary embedding, rotate-half layout: x · cos + rotate_half(x) · sin with
    /// rotate_half([x1, x2]) = [−x2, x1]. x: [b, t, h, hd], cos, sin: [b, t, 1, hd] whose two
    /// halves are equal (as transformers builds them). Its backward is the same map with −sin.
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        generic::rope::<Self>(x, cos, sin)
    }

    /// One AdamW step in one pass (see [`AdamWStep`]): parameter, gradient and moments (none on
    /// the first step) → (parameter, first moment, second moment), written over the inputs'
    /// memory where they own it. The inputs back: not fused on this backend (the caller
    /// composes tensor ops).
    fn adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<[FloatTensor<Self>; 2]>,
        _step: &AdamWStep,
    ) -> Result<[FloatTensor<Self>; 3], AdamWInputs<Self>> {
        Err((param, grad, moments))
    }

    /// x [n, c] scattered into a [rows, c] tensor: row `idx[j]` gets x's row j (the rows of
    /// repeated indices summed, in order), rows not indexed are zero. The backward of
    /// [`Kernels::gather_rows`] (a padded batch from its real tokens; an embedding table's
    /// gradient from its lookups').
    fn scatter_rows(x: FloatTensor<Self>, idx: &RowIndex<Self>, rows: usize) -> FloatTensor<Self> {
        generic::scatter_rows::<Self>(x, idx, rows)
    }

    /// The rows `idx` of x [rows, c] → [n, c] (a padded batch's real tokens; embedding lookups).
    fn gather_rows(x: FloatTensor<Self>, idx: &RowIndex<Self>) -> FloatTensor<Self> {
        Self::float_select(x, 0, idx.tensor.clone())
    }

    /// Σ x² over all of x's elements, summed in a fixed order (the same value on every run),
    /// for the global gradient norm. None: not fused on this backend (the caller composes
    /// tensor ops and keeps the sum on the device).
    fn sum_squares(_x: &FloatTensor<Self>) -> Option<f64> {
        None
    }

    /// x · c (the gradients' clipping coefficient), written over x's memory where it owns it.
    fn scale(x: FloatTensor<Self>, c: f32) -> FloatTensor<Self> {
        generic::scale::<Self>(x, c)
    }
}

/// Row indices for [`Kernels::scatter_rows`] / [`Kernels::gather_rows`]: on the host and as the
/// backend's int tensor.
#[derive(Clone, Debug)]
pub struct RowIndex<B: Backend> {
    /// Read by the flex kernels.
    #[cfg_attr(not(feature = "flex"), allow(dead_code))]
    pub(crate) host: std::sync::Arc<[usize]>,
    pub(crate) tensor: IntTensor<B>,
}

/// What [`Kernels::adamw`] hands back when it does not apply: parameter, gradient, moments.
pub type AdamWInputs<B> = (FloatTensor<B>, FloatTensor<B>, Option<[FloatTensor<B>; 2]>);

/// The scalars of one AdamW step (Loshchilov & Hutter's decoupled weight decay), in the order
/// burn-optim's `AdamW` applies them, so that the fused pass gives the same f32 results:
/// m = β1·m + (1−β1)·g, v = β2·v + (1−β2)·g², u = (m / c1) / (sqrt(v / c2) + eps),
/// p = p·decay − u·lr, with c1 = 1 − β1^t, c2 = 1 − β2^t, decay = 1 − lr·wd (m = (1−β1)·g and
/// v = (1−β2)·g² on the first step), where g is the stored gradient times `grad_scale` (the
/// global-norm clip's coefficient, 1 when not clipping): one f32 product, the same as scaling
/// the gradient in a pass of its own before the step (and exact at 1).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub grad_scale: f32,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub decay: f32,
    pub c1: f32,
    pub c2: f32,
}

impl AdamWStep {
    /// One parameter's update, the formula above (`m`, `v`: None on the first step).
    #[inline(always)]
    pub fn apply(&self, p: f32, g: f32, m: Option<f32>, v: Option<f32>) -> [f32; 3] {
        let g = g * self.grad_scale;
        let m = match m {
            Some(m) => m * self.beta1 + g * (1.0 - self.beta1),
            None => g * (1.0 - self.beta1),
        };
        let v = match v {
            Some(v) => v * self.beta2 + g * g * (1.0 - self.beta2),
            None => g * g * (1.0 - self.beta2),
        };
        let u = (m / self.c1) / ((v / self.c2).sqrt() + self.eps);
        [p * self.decay - u * self.lr, m, v]
    }
}

/// The kernels composed of a backend's tensor ops (see [`Kernels`] for each one's formula).
pub mod generic {
    use super::*;

    pub fn scale<B: Backend>(x: FloatTensor<B>, c: f32) -> FloatTensor<B> {
        B::float_mul_scalar(x, c.into())
    }

    pub fn scatter_rows<B: Backend>(
        x: FloatTensor<B>,
        idx: &RowIndex<B>,
        rows: usize,
    ) -> FloatTensor<B> {
        let c = x.shape()[1];
        let zeros = B::float_zeros(Shape::new([rows, c]), &x.device(), x.dtype().into());
        B::float_select_assign(zeros, 0, idx.tensor.clone(), x, IndexingUpdateOp::Add)
    }

    pub fn rms_norm<B: Backend>(
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        eps: f32,
    ) -> [FloatTensor<B>; 2] {
        let shape = x.shape();
        let last = shape.num_dims() - 1;
        let ms = B::float_mean_dim(B::float_mul(x.clone(), x.clone()), last);
        let rstd = B::float_recip(B::float_sqrt(B::float_add_scalar(ms, eps.into())));
        let y = B::float_mul(B::float_mul(x, rstd.clone()), row_view::<B>(w, &shape));
        [y, rstd]
    }

    pub fn rms_norm_backward<B: Backend>(
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        rstd: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> [FloatTensor<B>; 2] {
        let shape = x.shape();
        let (n, d) = (shape.num_dims(), shape[shape.num_dims() - 1]);
        let rows = shape.num_elements() / d;
        let xhat = B::float_mul(x, rstd.clone());
        let gw = B::float_sum_dim(
            B::float_reshape(
                B::float_mul(grad.clone(), xhat.clone()),
                Shape::new([rows, d]),
            ),
            0,
        );
        let gw = B::float_reshape(gw, Shape::new([d]));
        let gxhat = B::float_mul(grad, row_view::<B>(w, &shape));
        let dot = B::float_mean_dim(B::float_mul(gxhat.clone(), xhat.clone()), n - 1);
        let gx = B::float_mul(B::float_sub(gxhat, B::float_mul(xhat, dot)), rstd);
        [gx, gw]
    }

    fn swiglu<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
        let s = B::sigmoid(gate.clone());
        B::float_mul(B::float_mul(gate, s), up)
    }

    fn swiglu_backward<B: Backend>(
        gate: FloatTensor<B>,
        up: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> [FloatTensor<B>; 2] {
        let s = B::sigmoid(gate.clone());
        let silu = B::float_mul(gate.clone(), s.clone());
        let g_up = B::float_mul(grad.clone(), silu.clone());
        // s · (1 + gate · (1 − s)) = s + silu − silu · s
        let dsilu = B::float_sub(B::float_add(s.clone(), silu.clone()), B::float_mul(silu, s));
        let g_gate = B::float_mul(B::float_mul(grad, up), dsilu);
        [g_gate, g_up]
    }

    /// The gate and up halves of x [.., 2i].
    fn halves<B: Backend>(x: FloatTensor<B>) -> [FloatTensor<B>; 2] {
        let shape = x.shape();
        let n = shape.num_dims();
        let i = shape[n - 1] / 2;
        let part = |r: std::ops::Range<usize>| {
            let ranges: Vec<_> = (0..n)
                .map(|d| {
                    if d + 1 == n {
                        s(r.clone())
                    } else {
                        s(0..shape[d])
                    }
                })
                .collect();
            B::float_slice(x.clone(), &ranges)
        };
        [part(0..i), part(i..2 * i)]
    }

    pub fn swiglu_joined<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
        let [gate, up] = halves::<B>(x);
        swiglu::<B>(gate, up)
    }

    pub fn swiglu_joined_backward<B: Backend>(
        x: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> FloatTensor<B> {
        let n = x.shape().num_dims();
        let [gate, up] = halves::<B>(x);
        let [g_gate, g_up] = swiglu_backward::<B>(gate, up, grad);
        B::float_cat(vec![g_gate, g_up], n - 1)
    }

    pub fn masked_softmax<B: Backend>(
        scores: FloatTensor<B>,
        bias: FloatTensor<B>,
        scale: f32,
    ) -> FloatTensor<B> {
        let z = B::float_add(B::float_mul_scalar(scores, scale.into()), bias);
        B::softmax(z, 3)
    }

    pub fn masked_softmax_backward<B: Backend>(
        probs: FloatTensor<B>,
        grad: FloatTensor<B>,
        scale: f32,
    ) -> FloatTensor<B> {
        let dot = B::float_sum_dim(B::float_mul(grad.clone(), probs.clone()), 3);
        B::float_mul_scalar(B::float_mul(probs, B::float_sub(grad, dot)), scale.into())
    }

    pub fn token_logprobs<B: Backend>(
        logits: FloatTensor<B>,
        targets: IntTensor<B>,
    ) -> [FloatTensor<B>; 2] {
        let shape = logits.shape();
        let (b, t) = (shape[0], shape[1]);
        let idx = B::int_reshape(targets, Shape::new([b, t, 1]));
        let lp = B::float_gather(2, B::log_softmax(logits.clone(), 2), idx.clone());
        let lse = B::float_sub(B::float_gather(2, logits, idx), lp.clone());
        let flat = |x| B::float_reshape(x, Shape::new([b, t]));
        [flat(lp), flat(lse)]
    }

    pub fn token_logprobs_backward<B: Backend>(
        logits: FloatTensor<B>,
        targets: IntTensor<B>,
        lse: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> FloatTensor<B> {
        let shape = logits.shape();
        let (b, t) = (shape[0], shape[1]);
        let column = |x| B::float_reshape(x, Shape::new([b, t, 1]));
        let (lse, grad) = (column(lse), column(grad));
        let probs = B::float_exp(B::float_sub(logits, lse));
        let spread = B::float_mul(probs, B::float_neg(grad.clone()));
        let idx = B::int_reshape(targets, Shape::new([b, t, 1]));
        B::float_scatter(2, spread, idx, grad, IndexingUpdateOp::Add)
    }

    pub fn rope<B: Backend>(
        x: FloatTensor<B>,
        cos: FloatTensor<B>,
        sin: FloatTensor<B>,
    ) -> FloatTensor<B> {
        let shape = x.shape();
        let [b, t, h, hd] = [shape[0], shape[1], shape[2], shape[3]];
        let half = hd / 2;
        let x1 = B::float_slice(x.clone(), &[s(0..b), s(0..t), s(0..h), s(0..half)]);
        let x2 = B::float_slice(x.clone(), &[s(0..b), s(0..t), s(0..h), s(half..hd)]);
        let rotated = B::float_cat(vec![B::float_neg(x2), x1], 3);
        B::float_add(B::float_mul(x, cos), B::float_mul(rotated, sin))
    }
}

fn s(r: std::ops::Range<usize>) -> burn::tensor::Slice {
    burn::tensor::Slice::from(r)
}

/// w [d] viewed as [1, .., 1, d] to broadcast against a tensor of `shape`.
fn row_view<B: Backend>(w: FloatTensor<B>, shape: &Shape) -> FloatTensor<B> {
    let n = shape.num_dims();
    let mut dims = vec![1; n];
    dims[n - 1] = shape[n - 1];
    B::float_reshape(w, Shape::from(dims))
}

#[cfg(feature = "tch")]
#[allow(deprecated)] // burn marks LibTorch deprecated; the tch feature keeps it in use.
impl Kernels for burn::backend::LibTorch {}

// ---------------------------------------------------------------------------------------------
// The autodiff nodes: one per operation, generic over the inner backend's kernels.

/// Runs `forward` on the inputs' values and records `op` as the output's autodiff node, with the
/// state `forward` returns for the backward (dropped when no input needs a gradient).
fn record<B: Kernels, O: Backward<B, N>, const N: usize>(
    op: O,
    inputs: [AutodiffTensor<B>; N],
    forward: impl FnOnce([FloatTensor<B>; N]) -> (FloatTensor<B>, O::State),
) -> AutodiffTensor<B> {
    let prep = op
        .prepare::<NoCheckpointing>(inputs.each_ref().map(|t| t.node()))
        .compute_bound()
        .stateful();
    let (y, state) = forward(inputs.map(|t| t.into_primitive()));
    match prep {
        OpsKind::Tracked(prep) => prep.finish(state, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

/// Hands `grad()` to the parent, computed only when the parent wants a gradient.
fn give<B: Backend>(
    grads: &mut Gradients,
    parent: Option<NodeId>,
    grad: impl FnOnce() -> FloatTensor<B>,
) {
    if let Some(id) = parent {
        grads.register::<B>(id, grad());
    }
}

/// The ids of the parents that want a gradient.
fn parent_ids<S, const N: usize>(ops: &Ops<S, N>) -> [Option<NodeId>; N] {
    ops.parents.each_ref().map(|p| p.as_ref().map(|n| n.id))
}

#[derive(Debug)]
struct RmsNormOp;

impl<B: Kernels> Backward<B, 2> for RmsNormOp {
    /// x, w, rstd
    type State = [FloatTensor<B>; 3];

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [px, pw] = parent_ids(&ops);
        let [x, w, rstd] = ops.state;
        let [gx, gw] = B::rms_norm_backward(x, w, rstd, grads.consume::<B>(&ops.node));
        give::<B>(grads, px, || gx);
        give::<B>(grads, pw, || gw);
    }
}

#[derive(Debug)]
struct SwigluJoinedOp;

impl<B: Kernels> Backward<B, 1> for SwigluJoinedOp {
    /// the joined gate | up input
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::swiglu_joined_backward(x, grad)
        });
    }
}

/// The mask bias is a constant: no gradient flows to it.
#[derive(Debug)]
struct MaskedSoftmaxOp;

impl<B: Kernels> Backward<B, 1> for MaskedSoftmaxOp {
    /// the output probabilities, the scale
    type State = (FloatTensor<B>, f32);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (probs, scale) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::masked_softmax_backward(probs, grad, scale)
        });
    }
}

/// cos and sin are constants (tables of positions): no gradient flows to them.
#[derive(Debug)]
struct RopeOp;

impl<B: Kernels> Backward<B, 1> for RopeOp {
    /// cos, −sin
    type State = [FloatTensor<B>; 2];

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [cos, neg_sin] = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::rope(grad, cos, neg_sin)
        });
    }
}

/// Scattering rows: the gradient is the gradient's rows at the indices.
#[derive(Debug)]
struct ScatterRowsOp;

impl<B: Kernels> Backward<B, 1> for ScatterRowsOp {
    type State = RowIndex<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let idx = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::gather_rows(grad, &idx)
        });
    }
}

/// Gathering rows (a padded batch's real tokens, embedding lookups): the gradient is scattered
/// back, repeats summed, zero elsewhere.
#[derive(Debug)]
struct GatherRowsOp;

impl<B: Kernels> Backward<B, 1> for GatherRowsOp {
    /// the indices, the input's rows
    type State = (RowIndex<B>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (idx, rows) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::scatter_rows(grad, &idx, rows)
        });
    }
}

#[derive(Debug)]
struct MatmulOp;

impl<B: Kernels> Backward<B, 2> for MatmulOp {
    /// lhs, rhs
    type State = [FloatTensor<B>; 2];

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [lhs, rhs] = ops.state;
        let transposed = |t: FloatTensor<B>| {
            let n = t.shape().num_dims();
            B::float_swap_dims(t, n - 2, n - 1)
        };
        binary::<B, _, _>(
            ops.parents,
            ops.node,
            grads,
            |grad| B::matmul(grad, transposed(rhs)),
            |grad| B::matmul(transposed(lhs), grad),
        );
    }
}

#[derive(Debug)]
struct TokenLogprobsOp<B: Backend>(std::marker::PhantomData<B>);

impl<B: Kernels> Backward<B, 1> for TokenLogprobsOp<B> {
    /// logits, targets, lse
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, targets, lse) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::token_logprobs_backward(logits, targets, lse, grad)
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Routing from burn's dispatch tensors to the backend primitives.

/// A float tensor's primitive on backend B: tracked by autodiff, or plain.
enum Prim<B: Backend> {
    Tracked(AutodiffTensor<B>),
    Plain(FloatTensor<B>),
}

impl<B: Backend> Prim<B> {
    /// The value, without autodiff tracking (for constants such as masks and tables).
    fn value(self) -> FloatTensor<B> {
        match self {
            Prim::Tracked(t) => t.into_primitive(),
            Prim::Plain(t) => t,
        }
    }
}

fn prim<B: Backend, const D: usize>(t: &Tensor<D>) -> Option<Prim<B>>
where
    DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B>>,
{
    if t.is_autodiff() {
        t.clone()
            .try_into_primitive::<Autodiff<B>>()
            .ok()
            .map(Prim::Tracked)
    } else {
        t.clone().try_into_primitive::<B>().ok().map(Prim::Plain)
    }
}

/// `t`'s value when it is a plain (untracked) tensor of backend B.
fn plain_prim<B: Backend, const D: usize>(t: &Tensor<D>) -> Option<FloatTensor<B>>
where
    DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B>>,
{
    match prim::<B, D>(t)? {
        Prim::Plain(x) => Some(x),
        Prim::Tracked(_) => None,
    }
}

/// `t`, checked to be a plain tensor of B ([`plain_prim`]), moved into B's tensor: it owns its
/// memory as it did (for kernels that write over their inputs).
fn into_plain<B: Backend, const D: usize>(t: Tensor<D>) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    t.try_into_primitive::<B>()
        .unwrap_or_else(|_| unreachable!("checked to be a plain tensor of this backend"))
}

fn tracked<B: Backend, const D: usize>(p: AutodiffTensor<B>) -> Tensor<D>
where
    DispatchTensor: DispatchKindConversion<Autodiff<B>>,
{
    Tensor::from_primitive::<Autodiff<B>>(p)
}

fn plain<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<D>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    Tensor::from_primitive::<B>(p)
}

/// Runs `$body` with `B` bound to each backend compiled in until one returns `Some`.
macro_rules! on_backends {
    (|$B:ident| $body:expr) => {{
        #[allow(unused_mut, unused_assignments)]
        let mut out = None;
        #[cfg(feature = "flex")]
        if out.is_none() {
            type $B = burn::backend::Flex;
            out = $body;
        }
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        if out.is_none() {
            type $B = burn::backend::LibTorch;
            out = $body;
        }
        out
    }};
}

fn rms_norm_on<B: Kernels, const D: usize>(
    x: &Tensor<D>,
    w: &Tensor<1>,
    eps: f32,
) -> Option<Tensor<D>>
where
    DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B>>,
{
    match (prim::<B, D>(x)?, prim::<B, 1>(w)?) {
        (Prim::Tracked(x), Prim::Tracked(w)) => {
            Some(tracked::<B, D>(record(RmsNormOp, [x, w], |[x, w]| {
                let [y, rstd] = B::rms_norm(x.clone(), w.clone(), eps);
                (y, [x, w, rstd])
            })))
        }
        (Prim::Plain(x), Prim::Plain(w)) => {
            let [y, _] = B::rms_norm(x, w, eps);
            Some(plain::<B, D>(y))
        }
        _ => None,
    }
}

/// RMSNorm over the last axis: x / sqrt(mean(x²) + eps) · w. x: [.., d], w: [d].
pub fn rms_norm<const D: usize>(x: Tensor<D>, w: Tensor<1>, eps: f64) -> Tensor<D> {
    if let Some(y) = on_backends!(|B| rms_norm_on::<B, D>(&x, &w, eps as f32)) {
        return y;
    }
    reference::rms_norm(x, w, eps)
}

/// A two-input kernel as one node that keeps both inputs for its backward (`op`), when both
/// inputs are tracked, or the plain kernel when neither is; None for a mix (the caller's
/// composed path).
fn binary_on<B: Kernels, const D: usize, O>(
    a: &Tensor<D>,
    b: &Tensor<D>,
    op: O,
    kernel: fn(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
) -> Option<Tensor<D>>
where
    O: Backward<B, 2, State = [FloatTensor<B>; 2]>,
    DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B>>,
{
    match (prim::<B, D>(a)?, prim::<B, D>(b)?) {
        (Prim::Tracked(a), Prim::Tracked(b)) => {
            Some(tracked::<B, D>(record(op, [a, b], |[a, b]| {
                (kernel(a.clone(), b.clone()), [a, b])
            })))
        }
        (Prim::Plain(a), Prim::Plain(b)) => Some(plain::<B, D>(kernel(a, b))),
        _ => None,
    }
}

/// SwiGLU's gated activation, silu(gate) · up, on two tensors: [`swiglu_joined`] on the two
/// side by side (the model's MLP calls that directly, on its one gate | up product).
#[cfg(test)]
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    assert_eq!(
        gate.dims(),
        up.dims(),
        "swiglu: gate and up differ in shape"
    );
    swiglu_joined(Tensor::cat(vec![gate, up], D - 1))
}

fn swiglu_joined_on<B: Kernels, const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>>
where
    DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B>>,
{
    match prim::<B, D>(x)? {
        Prim::Tracked(x) => Some(tracked::<B, D>(record(SwigluJoinedOp, [x], |[x]| {
            (B::swiglu_joined(x.clone()), x)
        }))),
        Prim::Plain(x) => Some(plain::<B, D>(B::swiglu_joined(x))),
    }
}

/// SwiGLU's gated activation on the output of one product by the gate | up weight: x [.., 2i]
/// → silu(x[.., :i]) · x[.., i:], [.., i]. Its gradient is written whole, gate and up side by
/// side, where two slices' gradients would each be written into a zeroed [.., 2i] and summed.
pub fn swiglu_joined<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let w = x.dims()[D - 1];
    assert_eq!(w % 2, 0, "swiglu_joined: last axis {w} is odd");
    if let Some(y) = on_backends!(|B| swiglu_joined_on::<B, D>(&x)) {
        return y;
    }
    reference::swiglu(
        x.clone().narrow(D - 1, 0, w / 2),
        x.narrow(D - 1, w / 2, w / 2),
    )
}

fn masked_softmax_on<B: Kernels>(
    scores: &Tensor<4>,
    bias: &Tensor<4>,
    scale: f32,
) -> Option<Tensor<4>>
where
    DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B>>,
{
    let bias = prim::<B, 4>(bias)?.value();
    match prim::<B, 4>(scores)? {
        Prim::Tracked(s) => Some(tracked::<B, 4>(record(MaskedSoftmaxOp, [s], |[s]| {
            let p = B::masked_softmax(s, bias, scale);
            (p.clone(), (p, scale))
        }))),
        Prim::Plain(s) => Some(plain::<B, 4>(B::masked_softmax(s, bias, scale))),
    }
}

/// Attention weights softmax(scale · scores + bias) over the keys. scores: [b, h, t, k],
/// bias: [b, 1, t, k], a constant (the mask); no gradient flows to it.
pub fn masked_softmax(scores: Tensor<4>, bias: &Tensor<4>, scale: f64) -> Tensor<4> {
    let [b, _, t, k] = scores.dims();
    assert_eq!(bias.dims(), [b, 1, t, k], "masked_softmax: bias shape");
    if let Some(p) = on_backends!(|B| masked_softmax_on::<B>(&scores, bias, scale as f32)) {
        return p;
    }
    reference::masked_softmax(scores, bias, scale)
}

fn rope_on<B: Kernels>(x: &Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Option<Tensor<4>>
where
    DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B>>,
{
    let cos = prim::<B, 4>(cos)?.value();
    let sin = prim::<B, 4>(sin)?.value();
    match prim::<B, 4>(x)? {
        Prim::Tracked(x) => Some(tracked::<B, 4>(record(RopeOp, [x], |[x]| {
            let y = B::rope(x, cos.clone(), sin.clone());
            (y, [cos, B::float_neg(sin)])
        }))),
        Prim::Plain(x) => Some(plain::<B, 4>(B::rope(x, cos, sin))),
    }
}

/// Batched matrix product lhs [.., m, k] · rhs [.., k, n] with equal batch dimensions (the
/// attention products); burn's `matmul` for anything else.
pub fn matmul<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
    let (l, r) = (lhs.dims(), rhs.dims());
    if l[..D - 2] == r[..D - 2]
        && let Some(y) = on_backends!(|B| binary_on::<B, D, _>(&lhs, &rhs, MatmulOp, B::matmul))
    {
        return y;
    }
    let rhs = same_dtype(rhs, &lhs);
    lhs.matmul(rhs)
}

/// `t` in `like`'s dtype (a frozen weight kept in bf16 under f32 activations, widened exactly
/// for a backend whose products take one dtype).
fn same_dtype<const D: usize, const E: usize>(t: Tensor<D>, like: &Tensor<E>) -> Tensor<D> {
    let dtype = like.dtype();
    if t.dtype() == dtype {
        t
    } else {
        t.cast(burn::tensor::FloatDType::from(dtype))
    }
}

/// Weight matrices packed once for the many products that read them while this lives (flex
/// backend): under `matmul = "bf16"` on AMX, each weight's bf16 panels ([`amx::PackedB`]), which
/// every product of that weight then uses whatever its rows (a decoding step's 16 included),
/// instead of reading the f32 weight; in f32 on AVX-512, f32 panels of 16 columns
/// ([`crate::cpu::skinny::PackedF32`]) for its products of fewer than 32 rows (the same sums, in the same
/// order, as unpacked; weights stored by rows only), when all the weights together come to at
/// most 2^24 elements (an f32 copy doubles their memory while it lives, and beyond the cache it
/// measured slower). Empty otherwise. Made by [`pack_weights`]; the registry the products look
/// in is [`crate::cpu::kept`].
#[derive(Default)]
pub struct PackedWeights {
    #[cfg(feature = "flex")]
    kept: Vec<flex::KeptWeight>,
}

impl PackedWeights {
    /// How many weights are packed.
    pub fn len(&self) -> usize {
        #[cfg(feature = "flex")]
        return self.kept.len();
        #[cfg(not(feature = "flex"))]
        0
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the weights are packed as bf16 (a decoding step then reads 2 bytes per weight).
    pub fn bf16(&self) -> bool {
        #[cfg(feature = "flex")]
        return self.kept.iter().any(|k| k.bf16());
        #[cfg(not(feature = "flex"))]
        false
    }
}

/// The most weight elements [`pack_weights`] copies in f32 (64 MB). Measured (`model bench`
/// shapes, decoding 16 rows): the small shape's 5.3M elements decoded ~15-20% faster packed,
/// the medium shape's 33.7M slower than the row-sweeping kernel on the unpacked weights (a
/// decoding step ~8.0 vs ~7.1 ms against its 8 × 48 register blocks), whose prefetching reads
/// weights that do not stay in cache faster.
#[cfg(feature = "flex")]
const F32_PACK_LIMIT: usize = 1 << 24;

/// Packs `weights` (each a [d, n] matrix as a product's right operand, transposed views
/// included) for as long as the returned value lives; see [`PackedWeights`]. The products find
/// a packed weight by its memory and layout, so the tensors must not change meanwhile (the
/// value holds a handle to each, and burn copies a shared tensor before writing to it).
pub fn pack_weights(weights: impl IntoIterator<Item = Tensor<2>>) -> PackedWeights {
    #[allow(unused_mut)]
    let mut packed = PackedWeights::default();
    #[cfg(feature = "flex")]
    {
        let weights: Vec<Tensor<2>> = weights.into_iter().collect();
        let bf16 = matmul_precision() == MatmulPrecision::Bf16;
        let elements: usize = weights
            .iter()
            .map(|w| w.dims().iter().product::<usize>())
            .sum();
        // An f32 copy doubles the weights' memory while it lives: only up to a bound.
        if bf16 && !amx::available() || !bf16 && elements > F32_PACK_LIMIT {
            return packed;
        }
        for w in weights {
            let t = if w.is_autodiff() {
                w.try_into_primitive::<Autodiff<burn::backend::Flex>>()
                    .ok()
                    .map(|t| t.into_primitive())
            } else {
                w.try_into_primitive::<burn::backend::Flex>().ok()
            };
            if let Some(kept) = t.and_then(|t| flex::keep(t, bf16)) {
                packed.kept.push(kept);
            }
        }
    }
    #[cfg(not(feature = "flex"))]
    let _ = weights;
    packed
}

/// A linear layer, x · w + b, with x [.., d] flattened to one matrix: w [d, n], b [n].
/// One matrix product forward and one per input backward (burn's own `linear` does the same
/// products; on flex these write their outputs without the zero-fill and copy that burn-flex's
/// matmul makes of every output).
pub fn linear<const D: usize>(x: Tensor<D>, w: Tensor<2>, b: Option<Tensor<1>>) -> Tensor<D> {
    let dims = x.dims();
    let [d, n] = w.dims();
    assert_eq!(
        dims[D - 1],
        d,
        "linear: input width {} for weight [{d}, {n}]",
        dims[D - 1]
    );
    let rows = dims[..D - 1].iter().product::<usize>();
    let x2 = x.clone().reshape([rows, d]);
    let y = match on_backends!(|B| binary_on::<B, 2, _>(&x2, &w, MatmulOp, B::matmul)) {
        Some(y) => y,
        None => return burn::tensor::module::linear(x.clone(), same_dtype(w, &x), b),
    };
    let y = match b {
        Some(b) => y + b.unsqueeze::<2>(),
        None => y,
    };
    let mut out = dims;
    out[D - 1] = n;
    y.reshape(out)
}

fn int_prim<B: Backend, const D: usize>(t: &Tensor<D, Int>) -> Option<IntTensor<B>>
where
    DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B>>,
{
    if t.is_autodiff() {
        t.clone().try_into_primitive::<Autodiff<B>>().ok()
    } else {
        t.clone().try_into_primitive::<B>().ok()
    }
}

/// Row indices for [`scatter_rows`] and [`gather_rows`] (where a padded batch's real tokens are;
/// the ids an embedding looks up), on the host and as an int tensor on the device.
#[derive(Clone, Debug)]
pub struct Rows {
    host: std::sync::Arc<[usize]>,
    tensor: Tensor<1, Int>,
}

impl Rows {
    pub fn new(idx: Vec<usize>, device: &burn::tensor::Device) -> Self {
        let tensor = Tensor::from_data(
            burn::tensor::TensorData::new(idx.iter().map(|&i| i as i64).collect(), [idx.len()]),
            device,
        );
        Self {
            host: idx.into(),
            tensor,
        }
    }

    /// How many rows are picked.
    pub fn len(&self) -> usize {
        self.host.len()
    }

    fn on<B: Backend>(&self) -> Option<RowIndex<B>>
    where
        DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B>>,
    {
        Some(RowIndex {
            host: self.host.clone(),
            tensor: int_prim::<B, 1>(&self.tensor)?,
        })
    }
}

/// Rows `ids` of an embedding table [vocab, d] → [n, d]: [`gather_rows`], whose gradient is each
/// table row's sum of its lookups' gradients (in their order), zero for the others; burn's
/// `select` backward builds the same from a zeroed table on one thread, which on flex also copies
/// the zeros.
///
/// A frozen table kept in bf16 ([`crate::WeightDtype`]) gives its rows in f32 (exactly), with no
/// gradient.
pub fn embedding(table: Tensor<2>, ids: Vec<usize>) -> Tensor<2> {
    let ids = Rows::new(ids, &table.device());
    if table.dtype() != burn::tensor::DType::F32 {
        return table
            .detach()
            .select(0, ids.tensor.clone())
            .cast(burn::tensor::FloatDType::F32);
    }
    gather_rows(table, &ids)
}

fn rows_on<B: Kernels>(x: &Tensor<2>, idx: &Rows, scatter: Option<usize>) -> Option<Tensor<2>>
where
    DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B>>,
{
    let i = idx.on::<B>()?;
    let rows = x.dims()[0];
    match (prim::<B, 2>(x)?, scatter) {
        (Prim::Tracked(x), Some(to)) => Some(tracked::<B, 2>(record(ScatterRowsOp, [x], |[x]| {
            (B::scatter_rows(x, &i, to), i.clone())
        }))),
        (Prim::Tracked(x), None) => Some(tracked::<B, 2>(record(GatherRowsOp, [x], |[x]| {
            (B::gather_rows(x, &i), (i.clone(), rows))
        }))),
        (Prim::Plain(x), Some(to)) => Some(plain::<B, 2>(B::scatter_rows(x, &i, to))),
        (Prim::Plain(x), None) => Some(plain::<B, 2>(B::gather_rows(x, &i))),
    }
}

/// x [n, c] → [rows, c]: x's rows at `idx` (repeats summed in order), zero elsewhere (a padded
/// batch from its real tokens). Its gradient is the gradient's rows at `idx`.
pub fn scatter_rows(x: Tensor<2>, idx: &Rows, rows: usize) -> Tensor<2> {
    assert_eq!(x.dims()[0], idx.len(), "scatter_rows: rows and indices");
    assert!(
        idx.host.iter().all(|&i| i < rows),
        "scatter_rows: index past {rows} rows"
    );
    on_backends!(|B| rows_on::<B>(&x, idx, Some(rows)))
        .unwrap_or_else(|| reference::scatter_rows(x, idx.tensor.clone(), rows))
}

/// x [rows, c] → its rows at `idx`, [n, c] (a padded batch's real tokens; embedding lookups). Its
/// gradient is the gradient scattered back, repeats summed in order, zero elsewhere.
pub fn gather_rows(x: Tensor<2>, idx: &Rows) -> Tensor<2> {
    assert!(
        idx.host.iter().all(|&i| i < x.dims()[0]),
        "gather_rows: index past {} rows",
        x.dims()[0]
    );
    on_backends!(|B| rows_on::<B>(&x, idx, None)).unwrap_or_else(|| x.select(0, idx.tensor.clone()))
}

fn token_logprobs_on<B: Kernels>(logits: &Tensor<3>, targets: &Tensor<2, Int>) -> Option<Tensor<2>>
where
    DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B>>,
{
    let targets = int_prim::<B, 2>(targets)?;
    match prim::<B, 3>(logits)? {
        Prim::Tracked(l) => Some(tracked::<B, 2>(record(
            TokenLogprobsOp(std::marker::PhantomData),
            [l],
            |[l]| {
                let [lp, lse] = B::token_logprobs(l.clone(), targets.clone());
                (lp, (l, targets, lse))
            },
        ))),
        Prim::Plain(l) => {
            let [lp, _] = B::token_logprobs(l, targets);
            Some(plain::<B, 2>(lp))
        }
    }
}

/// log p(targets) under `logits`: log_softmax(logits, 2) gathered at the targets, as one op
/// whose backward writes g · (onehot − softmax) once. logits: [b, t, v], targets: [b, t] →
/// [b, t]. None where no fused kernel applies (the caller has the composed version).
pub fn token_logprobs(logits: &Tensor<3>, targets: &Tensor<2, Int>) -> Option<Tensor<2>> {
    on_backends!(|B| token_logprobs_on::<B>(logits, targets))
}

/// Tensors of an AdamW step: parameter, gradient, moments (none on the first step).
pub type AdamWTensors<const D: usize> = (Tensor<D>, Tensor<D>, Option<[Tensor<D>; 2]>);

fn adamw_on<B: Kernels, const D: usize>(
    args: &mut Option<AdamWTensors<D>>,
    step: &AdamWStep,
) -> Option<[Tensor<D>; 3]>
where
    DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B>>,
{
    // Only plain tensors of this backend are taken (checked on clones, which are dropped, so
    // that the tensors handed over own their memory as they did).
    let plain_here = |t: &Tensor<D>| plain_prim::<B, D>(t).is_some();
    let (p, g, m) = args.as_ref()?;
    if !plain_here(p)
        || !plain_here(g)
        || m.as_ref()
            .is_some_and(|[m, v]| !plain_here(m) || !plain_here(v))
    {
        return None;
    }
    let (p, g, m) = args.take()?;
    let inner = into_plain::<B, D>;
    match B::adamw(inner(p), inner(g), m.map(|m| m.map(inner)), step) {
        Ok(out) => Some(out.map(plain::<B, D>)),
        Err((p, g, m)) => {
            *args = Some((
                plain::<B, D>(p),
                plain::<B, D>(g),
                m.map(|m| m.map(plain::<B, D>)),
            ));
            None
        }
    }
}

/// One AdamW step over a whole parameter in one pass where the backend has the kernel (flex,
/// f32): (parameter, first moment, second moment), in the inputs' memory where they own it.
/// The inputs back otherwise.
pub fn adamw<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moments: Option<[Tensor<D>; 2]>,
    step: &AdamWStep,
) -> Result<[Tensor<D>; 3], Box<AdamWTensors<D>>> {
    let mut args = Some((param, grad, moments));
    match on_backends!(|B| adamw_on::<B, D>(&mut args, step)) {
        Some(out) => Ok(out),
        None => Err(Box::new(args.expect("the inputs, handed back"))),
    }
}

/// Σ x² over a plain (untracked) tensor's elements where the backend has the kernel (flex, f32):
/// one parallel pass that writes nothing (the composed `square().sum()` writes a squared copy),
/// summed in a fixed order. None otherwise.
pub fn sum_squares<const D: usize>(x: &Tensor<D>) -> Option<f64> {
    on_backends!(|B| plain_prim::<B, D>(x).and_then(|p| B::sum_squares(&p)))
}

/// x · c for a plain (untracked) tensor, in x's memory where it owns it (flex, f32; parallel);
/// the same values as `x.mul_scalar(c)`.
pub fn scale<const D: usize>(x: Tensor<D>, c: f32) -> Tensor<D> {
    fn scale_on<B: Kernels, const D: usize>(x: &mut Option<Tensor<D>>, c: f32) -> Option<Tensor<D>>
    where
        DispatchTensor: DispatchKindConversion<B> + DispatchKindConversion<Autodiff<B>>,
    {
        // Checked on a clone, which is dropped, so that the tensor handed over owns its memory.
        plain_prim::<B, D>(x.as_ref()?)?;
        Some(plain::<B, D>(B::scale(into_plain::<B, D>(x.take()?), c)))
    }
    let mut x = Some(x);
    on_backends!(|B| scale_on::<B, D>(&mut x, c))
        .unwrap_or_else(|| x.expect("not taken").mul_scalar(c))
}

/// Rotary position embedding, rotate-half layout (as transformers). x: [b, t, h, hd];
/// cos, sin: [b, t, 1, hd], constants whose two halves are equal.
pub fn rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [b, t, _, hd] = x.dims();
    assert_eq!(cos.dims(), [b, t, 1, hd], "rope: table shape");
    if let Some(y) = on_backends!(|B| rope_on::<B>(&x, cos, sin)) {
        return y;
    }
    reference::rope(x, cos, sin)
}

/// Inference with a KV cache (flex backend): from the fused projection qkv [b, t, (h + 2 · kv) ·
/// hd] and RoPE tables cos, sin [b, t, 1, hd], the rotated keys and the values written into the
/// cache buffers `bufs` = [k, v], each [b, kv, room, hd], at positions past..past + t, in place;
/// returns the rotated queries [b, h, t, hd]. The same numbers as splitting, rotating with
/// [`rope`] and assigning the slices. None, with the buffers left as they were, where this does
/// not apply (autodiff tensors, another backend, buffers shared or too short).
pub fn rope_qkv_into_cache(
    qkv: &Tensor<3>,
    cos: &Tensor<4>,
    sin: &Tensor<4>,
    bufs: &mut [Tensor<4>; 2],
    heads: [usize; 3],
    past: usize,
) -> Option<Tensor<4>> {
    #[cfg(feature = "flex")]
    {
        type B = burn::backend::Flex;
        if bufs.iter().all(|t| plain_prim::<B, 4>(t).is_some())
            && let (Some(x), Some(c), Some(s)) = (
                plain_prim::<B, 3>(qkv),
                plain_prim::<B, 4>(cos),
                plain_prim::<B, 4>(sin),
            )
        {
            // Moved out (an empty placeholder in their place) so that they own their memory.
            let placeholder = || Tensor::<4>::empty([0, 0, 0, 0], &qkv.device());
            let [k, v] = std::mem::replace(bufs, [placeholder(), placeholder()]);
            let (mut k, mut v) = (into_plain::<B, 4>(k), into_plain::<B, 4>(v));
            let q = flex::rope_qkv_into_cache(&x, &c, &s, [&mut k, &mut v], heads, past);
            *bufs = [plain::<B, 4>(k), plain::<B, 4>(v)];
            return q.map(plain::<B, 4>);
        }
    }
    let _ = (qkv, cos, sin, bufs, heads, past);
    None
}

/// Whether [`attention`] runs fused in this build and precision (the flex backend, `matmul =
/// "fp32"`; under bf16 the attention products stay the bf16 products of the composed path).
pub fn attention_fused() -> bool {
    cfg!(all(feature = "flex", not(feature = "tch"))) && matmul_precision() == MatmulPrecision::Fp32
}

/// Attention without a KV cache (a training or scoring forward) as one autodiff node on the flex
/// backend: qkv, the fused projection [.., (h + 2 · kv) · hd] of the real tokens (`rows`, where
/// they are in the padded layout [b, t]) or of the padded layout itself, the bias [b, 1, t, t]
/// (a constant; [`MASKED`] at masked keys), RoPE tables cos, sin [b, t, 1, hd] (constants; none
/// for GPT-2) → the context [.., h · hd] in qkv's rows. The values of the composed path (rows
/// scattered into the padded layout, [`rope`], [`matmul`], [`masked_softmax`], [`matmul`], the
/// context's rows gathered) up to the order of float sums; its backward gives qkv's gradient in
/// one pass. None where it does not apply (see [`attention_fused`]; other dtypes).
pub fn attention(
    qkv: &Tensor<3>,
    rows: Option<&Rows>,
    [b, t]: [usize; 2],
    bias: &Tensor<4>,
    rope: Option<&(Tensor<4>, Tensor<4>)>,
    [h, kv, hd]: [usize; 3],
    scale: f64,
) -> Option<Tensor<3>> {
    #[cfg(feature = "flex")]
    if attention_fused() {
        type B = burn::backend::Flex;
        use flex::attention::{Dims, PADDING};
        let src = match rows {
            None => None,
            Some(rows) => {
                let mut src = vec![PADDING; b * t];
                for (j, &p) in rows.host.iter().enumerate() {
                    match src.get_mut(p) {
                        Some(s) if *s == PADDING => *s = j,
                        _ => return None,
                    }
                }
                Some(std::sync::Arc::<[usize]>::from(src))
            }
        };
        let dims = Dims {
            b,
            t,
            h,
            kv,
            hd,
            scale: scale as f32,
        };
        let bias = prim::<B, 4>(bias)?.value();
        let tables = match rope {
            Some((c, s)) => Some([prim::<B, 4>(c)?.value(), prim::<B, 4>(s)?.value()]),
            None => None,
        };
        let run = |x: &FloatTensor<B>, save: bool| {
            let rope = tables.as_ref().map(|[c, s]| [c, s]);
            flex::attention::forward(x, src.clone(), &bias, rope, dims, save)
        };
        return match prim::<B, 3>(qkv)? {
            Prim::Tracked(x) => match run(&x.clone().into_primitive(), true)? {
                (y, Some(saved)) => Some(tracked::<B, 3>(record(AttentionOp, [x], |_| (y, saved)))),
                (_, None) => None,
            },
            Prim::Plain(x) => run(&x, false).map(|(y, _)| plain::<B, 3>(y)),
        };
    }
    let _ = (qkv, rows, b, t, bias, rope, h, kv, hd, scale);
    None
}

/// The bias and the RoPE tables are constants: no gradient flows to them.
#[cfg(feature = "flex")]
#[derive(Debug)]
struct AttentionOp;

#[cfg(feature = "flex")]
impl Backward<burn::backend::Flex, 1> for AttentionOp {
    type State = flex::attention::Saved;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let saved = ops.state;
        unary::<burn::backend::Flex, _>(ops.parents, ops.node, grads, |grad| {
            flex::attention::backward(&saved, &grad)
        });
    }
}

/// Attention at a decoding step (inference, flex backend), each head in one pass: q [b, h, 1, hd]
/// against the cached keys and values k, v [b, kv, n, hd] (kv dividing h: grouped heads read
/// their shared key-value head in place), softmax with the bias [b, 1, 1, n] at `scale`.
/// Returns the context [b, 1, h · hd]: bit for bit what [`matmul`], [`masked_softmax`] and
/// [`matmul`] give on the expanded heads. None where it does not apply (autodiff tensors,
/// another backend, more than one query position, other layouts).
pub fn decode_attention(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    bias: &Tensor<4>,
    scale: f64,
) -> Option<Tensor<3>> {
    #[cfg(feature = "flex")]
    {
        type B = burn::backend::Flex;
        let [q, k, v, bias] = [q, k, v, bias].map(plain_prim::<B, 4>);
        flex::decode_attention(&q?, &k?, &v?, &bias?, scale as f32).map(plain::<B, 3>)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (q, k, v, bias, scale);
        None
    }
}

/// The operations in burn's tensor ops, differentiated by burn's autodiff: the path for what the
/// fused kernels do not cover, and what the tests hold them to.
pub mod reference {
    use super::*;

    /// x [n, c] → [rows, c]: zeros with x's rows added at `idx`.
    pub fn scatter_rows(x: Tensor<2>, idx: Tensor<1, Int>, rows: usize) -> Tensor<2> {
        let c = x.dims()[1];
        Tensor::zeros([rows, c], &x.device()).select_assign(0, idx, x, IndexingUpdateOp::Add)
    }

    pub fn rms_norm<const D: usize>(x: Tensor<D>, w: Tensor<1>, eps: f64) -> Tensor<D> {
        let inv = x
            .clone()
            .powi_scalar(2)
            .mean_dim(D - 1)
            .add_scalar(eps)
            .sqrt()
            .recip();
        x * inv * w.unsqueeze::<D>()
    }

    pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
        silu(gate) * up
    }

    pub fn masked_softmax(scores: Tensor<4>, bias: &Tensor<4>, scale: f64) -> Tensor<4> {
        softmax(scores.mul_scalar(scale) + bias.clone(), 3)
    }

    pub fn rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
        let [b, t, h, hd] = x.dims();
        let half = hd / 2;
        let x1 = x.clone().slice([0..b, 0..t, 0..h, 0..half]);
        let x2 = x.clone().slice([0..b, 0..t, 0..h, half..hd]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos.clone() + rotated * sin.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// flex: the kernels as loops over contiguous f32 rows.

#[cfg(feature = "flex")]
use crate::cpu::{amx, flex};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::to_f32_vec;
    use burn::tensor::{Distribution, TensorData};

    fn close(ours: &[f32], reference: &[f32], tol: f32, what: &str) {
        assert_eq!(ours.len(), reference.len(), "{what}: lengths");
        for (i, (x, y)) in ours.iter().zip(reference).enumerate() {
            assert!(
                (x - y).abs() <= tol * y.abs().max(1.0),
                "{what}[{i}]: fused {x} vs reference {y}"
            );
        }
    }

    fn random<const D: usize>(shape: [usize; D], device: &burn::tensor::Device) -> Tensor<D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.5), device)
    }

    /// RoPE tables cos, sin [b, t, 1, hd] with equal halves, as `rope_tables` builds them.
    fn rope_tables(
        [b, t, hd]: [usize; 3],
        device: &burn::tensor::Device,
    ) -> (Tensor<4>, Tensor<4>) {
        let half: Tensor<4> = random([b, t, 1, hd / 2], device);
        (
            Tensor::cat(vec![half.clone().cos(), half.clone().cos()], 3),
            Tensor::cat(vec![half.clone().sin(), half.sin()], 3),
        )
    }

    /// A tensor's values as bits, for bit-for-bit comparisons (of the flex-only paths).
    #[cfg(feature = "flex")]
    fn bits<const D: usize>(x: Tensor<D>) -> Vec<u32> {
        to_f32_vec(x).iter().map(|v| v.to_bits()).collect()
    }

    /// The fused op and its reference on the same tracked inputs: values, and the gradients of
    /// Σ out · weights (an arbitrary upstream gradient) for each input. `run` returns the outputs
    /// and the inputs whose gradients are compared. Also checks the untracked (inference) path.
    fn check<const D: usize, const N: usize>(
        shapes: [[usize; D]; N],
        fused_op: impl Fn(&[Tensor<D>; N]) -> Tensor<D>,
        reference_op: impl Fn(&[Tensor<D>; N]) -> Tensor<D>,
        what: &str,
    ) {
        let device = crate::parse_device("cpu").unwrap().autodiff();
        let inputs = shapes.map(|s| random(s, &device).require_grad());
        let ours = fused_op(&inputs);
        let theirs = reference_op(&inputs);
        assert!(
            ours.is_autodiff(),
            "{what}: the fused output should stay tracked"
        );
        let (a, r) = (to_f32_vec(ours.clone()), to_f32_vec(theirs.clone()));
        close(&a, &r, 1e-5, what);
        let weights = random(ours.dims(), &device);
        let g_ours = (ours * weights.clone()).sum().backward();
        let g_ref = (theirs * weights).sum().backward();
        for (i, x) in inputs.iter().enumerate() {
            let (Some(go), Some(gr)) = (x.grad(&g_ours), x.grad(&g_ref)) else {
                panic!("{what}: input {i} has no gradient");
            };
            close(
                &to_f32_vec(go),
                &to_f32_vec(gr),
                1e-4,
                &format!("{what} grad {i}"),
            );
        }
        // Untracked inputs: the inference kernels.
        let plain = inputs.clone().map(|x| x.inner());
        let ours = fused_op(&plain);
        assert!(!ours.is_autodiff());
        close(&to_f32_vec(ours), &r, 1e-5, &format!("{what} (untracked)"));
    }

    /// Scattering a padded batch's real rows into place and gathering them back: values and
    /// gradients as the composed zeros + select_assign and select (small, and large enough for
    /// the threaded path).
    #[test]
    fn scatter_and_gather_rows_match_the_composed_ops() {
        for (rows, c) in [(7, 5), (300, 130)] {
            let idx: Vec<usize> = (0..rows).filter(|i| i % 3 != 1).collect();
            let n = idx.len();
            let index = |x: &Tensor<2>| {
                let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
                Tensor::<1, Int>::from_data(burn::tensor::TensorData::new(v, [n]), &x.device())
            };
            let picked = |x: &Tensor<2>| Rows::new(idx.clone(), &x.device());
            check(
                [[n, c]],
                |[x]| scatter_rows(x.clone(), &picked(x), rows),
                |[x]| reference::scatter_rows(x.clone(), index(x), rows),
                "scatter_rows",
            );
            check(
                [[rows, c]],
                |[x]| gather_rows(x.clone(), &picked(x)),
                |[x]| x.clone().select(0, index(x)),
                "gather_rows",
            );
        }
    }

    /// Embedding lookups (unordered ids with repeats; rows never looked up): values as
    /// `select`, and the table's gradient bit for bit as `select`'s backward (each row's
    /// lookups summed in their order), small and threaded.
    #[test]
    fn embedding_matches_select_and_its_gradient() {
        for (vocab, d, n) in [(11, 6, 9), (700, 96, 1500)] {
            let ids: Vec<usize> = (0..n).map(|i| (i * 7 + i / 3) % (vocab - 2)).collect();
            let index = |x: &Tensor<2>| {
                let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
                Tensor::<1, Int>::from_data(burn::tensor::TensorData::new(v, [n]), &x.device())
            };
            check(
                [[vocab, d]],
                |[w]| embedding(w.clone(), ids.clone()),
                |[w]| w.clone().select(0, index(w)),
                "embedding",
            );
            #[cfg(feature = "flex")]
            {
                let device = crate::parse_device("cpu").unwrap().autodiff();
                let w: Tensor<2> = random([vocab, d], &device).require_grad();
                let up: Tensor<2> = random([n, d], &device);
                let ours = (embedding(w.clone(), ids.clone()) * up.clone())
                    .sum()
                    .backward();
                let theirs = (w.clone().select(0, index(&w)) * up).sum().backward();
                let (g, r) = (w.grad(&ours).unwrap(), w.grad(&theirs).unwrap());
                assert_eq!(bits(g.clone()), bits(r), "{vocab} x {d}: gradient");
                let last = to_f32_vec(g.slice([vocab - 2..vocab, 0..d]));
                assert!(last.iter().all(|&x| x == 0.0), "rows never looked up");
            }
        }
    }

    #[test]
    fn rms_norm_matches_the_decomposed_ops() {
        check(
            [[3, 5, 48], [1, 1, 48]],
            |[x, w]| rms_norm(x.clone(), w.clone().reshape([48]), 1e-5),
            |[x, w]| reference::rms_norm(x.clone(), w.clone().reshape([48]), 1e-5),
            "rms_norm",
        );
        // Large enough to take the threaded path (gw summed over chunks of rows).
        check(
            [[4, 300, 96], [1, 1, 96]],
            |[x, w]| rms_norm(x.clone(), w.clone().reshape([96]), 1e-6),
            |[x, w]| reference::rms_norm(x.clone(), w.clone().reshape([96]), 1e-6),
            "rms_norm (large)",
        );
    }

    #[test]
    fn swiglu_matches_the_decomposed_ops() {
        check(
            [[2, 7, 30], [2, 7, 30]],
            |[g, u]| swiglu(g.clone(), u.clone()),
            |[g, u]| reference::swiglu(g.clone(), u.clone()),
            "swiglu",
        );
        check(
            [[4, 128, 96], [4, 128, 96]],
            |[g, u]| swiglu(g.clone(), u.clone()),
            |[g, u]| reference::swiglu(g.clone(), u.clone()),
            "swiglu (large)",
        );
    }

    #[test]
    fn swiglu_joined_matches_the_decomposed_ops() {
        for (shape, name) in [
            ([2, 7, 60], "swiglu_joined"),
            // A decoding step's rows: the two halves on two threads.
            ([16, 1, 2752], "swiglu_joined (split rows)"),
            ([4, 128, 192], "swiglu_joined (large)"),
        ] {
            let i = shape[2] / 2;
            check(
                [shape],
                |[x]| swiglu_joined(x.clone()),
                |[x]| reference::swiglu(x.clone().narrow(2, 0, i), x.clone().narrow(2, i, i)),
                name,
            );
        }
    }

    /// The linear layer against burn's, with the weight a column slice of a wider matrix (as the
    /// q | k | v blocks are) and a bias: values and the gradients of x, w and b.
    #[test]
    fn linear_matches_burns_linear() {
        let device = crate::parse_device("cpu").unwrap().autodiff();
        for (rows, d, n) in [(3, 5, 4), (300, 96, 200)] {
            let x = random([2, rows, d], &device).require_grad();
            let full = random([d, n + 7], &device).require_grad();
            let b = random([n], &device).require_grad();
            // Each side slices its own view: two backward passes cannot share a graph node.
            let w = || full.clone().slice([0..d, 3..3 + n]);
            let ours = linear(x.clone(), w(), Some(b.clone()));
            let theirs = burn::tensor::module::linear(x.clone(), w(), Some(b.clone()));
            close(
                &to_f32_vec(ours.clone()),
                &to_f32_vec(theirs.clone()),
                1e-5,
                "linear",
            );
            let weights = random(ours.dims(), &device);
            let g_ours = (ours * weights.clone()).sum().backward();
            let g_ref = (theirs * weights).sum().backward();
            let (go, gr) = (x.grad(&g_ours).unwrap(), x.grad(&g_ref).unwrap());
            close(&to_f32_vec(go), &to_f32_vec(gr), 1e-4, "linear grad x");
            let (go, gr) = (full.grad(&g_ours).unwrap(), full.grad(&g_ref).unwrap());
            close(&to_f32_vec(go), &to_f32_vec(gr), 1e-4, "linear grad w");
            let (go, gr) = (b.grad(&g_ours).unwrap(), b.grad(&g_ref).unwrap());
            close(&to_f32_vec(go), &to_f32_vec(gr), 1e-4, "linear grad b");
            // Untracked.
            let plain = linear(
                x.clone().inner(),
                full.clone().inner().slice([0..d, 3..3 + n]),
                Some(b.clone().inner()),
            );
            assert!(!plain.is_autodiff());
            let expected = to_f32_vec(burn::tensor::module::linear(
                x.inner(),
                full.inner().slice([0..d, 3..3 + n]),
                Some(b.inner()),
            ));
            close(&to_f32_vec(plain), &expected, 1e-5, "linear untracked");
        }
    }

    /// Batched products on strided views, as attention makes them: q with swapped head and
    /// position axes (batch strides that are not one stride), k transposed.
    #[test]
    fn batched_matmul_matches_burns_matmul() {
        for (b, h, t, hd) in [(2, 3, 5, 4), (4, 4, 64, 32)] {
            check(
                [[b, t, h, hd], [b, t, h, hd]],
                |[q, k]| {
                    matmul(
                        q.clone().swap_dims(1, 2),
                        k.clone().swap_dims(1, 2).swap_dims(2, 3),
                    )
                },
                |[q, k]| {
                    q.clone()
                        .swap_dims(1, 2)
                        .matmul(k.clone().swap_dims(1, 2).swap_dims(2, 3))
                },
                "q · kᵀ",
            );
        }
        check(
            [[2, 3, 7, 5], [2, 3, 5, 6]],
            |[a, b]| matmul(a.clone(), b.clone()),
            |[a, b]| a.clone().matmul(b.clone()),
            "contiguous",
        );
        // A decoding step's attention (1-4 query rows per head, compact keys and values: the
        // few-row kernels), on one thread and split across threads, depths with and without a
        // tail of fewer than 16.
        for (b, h, m, keys, hd) in [(2, 3, 1, 7, 20), (2, 2, 3, 9, 16), (4, 8, 1, 64, 64)] {
            check(
                [[b, h, m, hd], [b, h, keys, hd]],
                |[q, k]| matmul(q.clone(), k.clone().swap_dims(2, 3)),
                |[q, k]| q.clone().matmul(k.clone().swap_dims(2, 3)),
                "decoding q · kᵀ",
            );
            check(
                [[b, h, m, keys], [b, h, keys, hd]],
                |[w, v]| matmul(w.clone(), v.clone()),
                |[w, v]| w.clone().matmul(v.clone()),
                "decoding weights · v",
            );
        }
    }

    /// A causal mask with padded keys: -1e9 where masked, as the transformer builds it.
    fn mask(b: usize, t: usize, k: usize, device: &burn::tensor::Device) -> Tensor<4> {
        let mut v = vec![0f32; b * t * k];
        for r in 0..b {
            for i in 0..t {
                for j in 0..k {
                    if j > k - t + i || (r == 1 && j == 0) {
                        v[(r * t + i) * k + j] = -1e9;
                    }
                }
            }
        }
        Tensor::from_data(TensorData::new(v, [b, 1, t, k]), device)
    }

    /// The composed attention that [`attention`] fuses, in burn's tensor ops: rows scattered into
    /// the padded layout, q | k | v split, RoPE, heads expanded for grouped keys, scores, masked
    /// softmax, weighted values, the context's real rows gathered.
    #[allow(clippy::too_many_arguments)]
    fn composed_attention(
        y: Tensor<3>,
        rows: Option<&Rows>,
        [b, t]: [usize; 2],
        bias: &Tensor<4>,
        rope: Option<&(Tensor<4>, Tensor<4>)>,
        [h, kv, hd]: [usize; 3],
        scale: f64,
    ) -> Tensor<3> {
        let w = (h + 2 * kv) * hd;
        let y = match rows {
            Some(r) => reference::scatter_rows(y.reshape([r.len(), w]), r.tensor.clone(), b * t)
                .reshape([b, t, w]),
            None => y,
        };
        let part = |at: usize, c: usize| {
            y.clone()
                .slice([0..b, 0..t, at * hd..(at + c) * hd])
                .reshape([b, t, c, hd])
        };
        let (mut q, mut k, v) = (part(0, h), part(h, kv), part(h + kv, kv));
        if let Some((cos, sin)) = rope {
            q = reference::rope(q, cos, sin);
            k = reference::rope(k, cos, sin);
        }
        let expand = |x: Tensor<4>| {
            x.swap_dims(1, 2)
                .reshape([b, kv, 1, t, hd])
                .expand([b, kv, h / kv, t, hd])
                .reshape([b, h, t, hd])
        };
        let scores = q.swap_dims(1, 2).matmul(expand(k).swap_dims(2, 3));
        let weights = reference::masked_softmax(scores, bias, scale);
        let ctx = weights
            .matmul(expand(v))
            .swap_dims(1, 2)
            .reshape([b, t, h * hd]);
        match rows {
            Some(r) => ctx
                .reshape([b * t, h * hd])
                .select(0, r.tensor.clone())
                .reshape([1, r.len(), h * hd]),
            None => ctx,
        }
    }

    /// The fused attention against the composed ops, values and gradients (tracked and
    /// untracked): grouped and plain heads, RoPE and none (GPT-2), sequences longer than a block
    /// and not a multiple of it, a causal mask with a masked key (so one query sees no key at
    /// all: uniform weights, as the composed softmax gives), and a padded batch run on its real
    /// rows (left and right padding). Elsewhere than on flex in fp32 it does not apply.
    #[test]
    fn attention_matches_the_composed_ops() {
        let device = crate::parse_device("cpu").unwrap().autodiff();
        // (b, t, h, kv, hd, rope, padding per sequence (left, right))
        type Case = (
            usize,
            usize,
            usize,
            usize,
            usize,
            bool,
            &'static [(usize, usize)],
        );
        let cases: [Case; 4] = [
            (2, 45, 4, 2, 8, true, &[]),
            (2, 70, 3, 3, 4, false, &[]),
            (3, 37, 2, 2, 16, true, &[(0, 0), (5, 0), (0, 10)]),
            (2, 96, 4, 1, 8, true, &[(33, 0), (0, 3)]),
        ];
        for (b, t, h, kv, hd, with_rope, padding) in cases {
            let what = format!("attention b {b} t {t} h {h} kv {kv} hd {hd}");
            let real = |r: usize, j: usize| {
                padding
                    .get(r)
                    .is_none_or(|&(left, right)| j >= left && j < t - right)
            };
            let mut mask = vec![0f32; b * t * t];
            for r in 0..b {
                for i in 0..t {
                    for j in 0..t {
                        if j > i || !real(r, j) || (padding.is_empty() && r == 1 && j == 0) {
                            mask[(r * t + i) * t + j] = MASKED;
                        }
                    }
                }
            }
            let bias: Tensor<4> = Tensor::from_data(TensorData::new(mask, [b, 1, t, t]), &device);
            let rows = (!padding.is_empty()).then(|| {
                let idx = (0..b * t).filter(|&p| real(p / t, p % t)).collect();
                Rows::new(idx, &device)
            });
            let n = rows.as_ref().map_or(b * t, Rows::len);
            let lead = if rows.is_some() { [1, n] } else { [b, t] };
            let rope = with_rope.then(|| rope_tables([b, t, hd], &device));
            let scale = 1.0 / (hd as f64).sqrt();
            let args = (
                rows.as_ref(),
                [b, t],
                &bias,
                rope.as_ref(),
                [h, kv, hd],
                scale,
            );
            let shape = [lead[0], lead[1], (h + 2 * kv) * hd];
            if !attention_fused() {
                let y = random(shape, &device);
                assert!(attention(&y, args.0, args.1, args.2, args.3, args.4, args.5).is_none());
                continue;
            }
            check(
                [shape],
                |[y]| {
                    attention(y, args.0, args.1, args.2, args.3, args.4, args.5)
                        .unwrap_or_else(|| panic!("{what}: the fused path applies"))
                },
                |[y]| composed_attention(y.clone(), args.0, args.1, args.2, args.3, args.4, args.5),
                &what,
            );
        }
    }

    #[test]
    fn masked_softmax_matches_the_decomposed_ops() {
        let device = crate::parse_device("cpu").unwrap().autodiff();
        for (b, h, t, k) in [(2, 3, 5, 7), (2, 4, 64, 64)] {
            let bias = mask(b, t, k, &device);
            check(
                [[b, h, t, k]],
                |[s]| masked_softmax(s.clone(), &bias, 0.25),
                |[s]| reference::masked_softmax(s.clone(), &bias, 0.25),
                "masked_softmax",
            );
        }
    }

    /// Keys and values written into the cache buffers by `rope_qkv_into_cache` (flex): bit for
    /// bit what splitting the projection, rotating with `rope` and assigning the slices gives,
    /// with grouped heads (kv < h), earlier positions kept and the room past the new ones
    /// untouched; shared buffers are handed back unchanged.
    #[cfg(feature = "flex")]
    #[test]
    fn rope_into_the_cache_matches_split_rotate_and_assign() {
        let device = crate::parse_device("cpu").unwrap();
        // The last: a decoding step of 16 sequences, written on both halves of the pool.
        for (b, h, kv, hd, room, t, past) in [
            (3, 4, 2, 8, 12, 5, 0),
            (3, 4, 2, 8, 12, 1, 5),
            (3, 4, 2, 8, 12, 2, 9),
            (16, 8, 8, 64, 20, 1, 7),
        ] {
            let qkv: Tensor<3> = random([b, t, (h + 2 * kv) * hd], &device);
            let (cos, sin) = rope_tables([b, t, hd], &device);
            let old: [Tensor<4>; 2] = [
                random([b, kv, room, hd], &device),
                random([b, kv, room, hd], &device),
            ];
            let mut bufs = old.clone().map(|t| t.clone() + 0.0); // owned alone
            let q = rope_qkv_into_cache(&qkv, &cos, &sin, &mut bufs, [h, kv, hd], past)
                .expect("flex tensors owned alone: the fused path applies");
            let [k, v] = bufs;
            let block = |r: std::ops::Range<usize>, heads: usize| {
                qkv.clone()
                    .slice([0..b, 0..t, r])
                    .reshape([b, t, heads, hd])
            };
            let want_q = rope(block(0..h * hd, h), &cos, &sin).swap_dims(1, 2);
            let want_k = rope(block(h * hd..(h + kv) * hd, kv), &cos, &sin).swap_dims(1, 2);
            let want_v = block((h + kv) * hd..(h + 2 * kv) * hd, kv).swap_dims(1, 2);
            let new = [0..b, 0..kv, past..past + t, 0..hd];
            let want = [
                old[0].clone().slice_assign(new.clone(), want_k),
                old[1].clone().slice_assign(new, want_v),
            ];
            assert_eq!(bits(q), bits(want_q), "queries, t {t} past {past}");
            assert_eq!(bits(k), bits(want[0].clone()), "keys, t {t} past {past}");
            assert_eq!(bits(v), bits(want[1].clone()), "values, t {t} past {past}");
            // A buffer that something else still holds is not written.
            let mut shared = [old[0].clone(), old[1].clone()];
            let held = shared.clone();
            let none = rope_qkv_into_cache(&qkv, &cos, &sin, &mut shared, [h, kv, hd], past);
            assert!(none.is_none(), "a shared buffer: no fused write");
            let [k, _] = shared;
            assert_eq!(bits(k), bits(held[0].clone()), "shared keys unchanged");
        }
    }

    /// A decoding step's attention in one pass per head: bit for bit the scores, masked softmax
    /// and weighted values of the three-step path on the expanded heads, for keys and values
    /// that are views of longer cache buffers, grouped heads (kv < h) and masked keys.
    #[cfg(feature = "flex")]
    #[test]
    fn decode_attention_matches_the_three_steps() {
        let device = crate::parse_device("cpu").unwrap();
        for (b, h, kv, hd, n, room) in [
            (3, 4, 2, 16, 37, 40),
            (2, 4, 4, 64, 70, 96),
            (1, 6, 1, 8, 1, 4),
        ] {
            let q: Tensor<4> = random([b, h, 1, hd], &device);
            let all = [0..b, 0..kv, 0..n, 0..hd];
            let k = random::<4>([b, kv, room, hd], &device).slice(all.clone());
            let v = random::<4>([b, kv, room, hd], &device).slice(all);
            // Key 0 of row 0 and the odd keys of the last row masked.
            let mut mask = vec![0f32; b * n];
            mask[0] = if n > 1 { -1e30 } else { 0.0 };
            for j in (1..n).step_by(2) {
                mask[(b - 1) * n + j] = -1e30;
            }
            let bias: Tensor<4> = Tensor::from_data(TensorData::new(mask, [b, 1, 1, n]), &device);
            let scale = 1.0 / (hd as f64).sqrt();
            let ctx = decode_attention(&q, &k, &v, &bias, scale)
                .expect("flex tensors, one query position: the fused path applies");
            let expand = |x: Tensor<4>| {
                x.reshape([b, kv, 1, n, hd])
                    .expand([b, kv, h / kv, n, hd])
                    .reshape([b, h, n, hd])
            };
            let scores = matmul(q.clone(), expand(k.clone()).swap_dims(2, 3));
            let weights = masked_softmax(scores, &bias, scale);
            let want = matmul(weights, expand(v.clone()))
                .swap_dims(1, 2)
                .reshape([b, 1, h * hd]);
            assert_eq!(bits(ctx), bits(want), "b {b} h {h} kv {kv} hd {hd} n {n}");
            let two = Tensor::cat(vec![q.clone(), q.clone()], 2);
            let bias2 = Tensor::cat(vec![bias.clone(), bias], 2);
            assert!(
                decode_attention(&two, &k, &v, &bias2, scale).is_none(),
                "two positions"
            );
        }
    }

    #[test]
    fn rope_matches_the_decomposed_ops() {
        let device = crate::parse_device("cpu").unwrap().autodiff();
        for (b, t, h, hd) in [(2, 5, 3, 8), (4, 64, 4, 32)] {
            let (cos, sin) = rope_tables([b, t, hd], &device);
            check(
                [[b, t, h, hd]],
                |[x]| rope(x.clone(), &cos, &sin),
                |[x]| reference::rope(x.clone(), &cos, &sin),
                "rope",
            );
        }
    }

    /// The gradient-norm kernels: Σ x² against an f64 sum on the host (sizes below and above
    /// the parallel split, a strided view), and the scale bit for bit against `mul_scalar`, in
    /// place only where the tensor owns its memory (a clone sharing it keeps its values).
    #[test]
    #[cfg(feature = "flex")]
    fn sum_squares_and_scale_match_the_composed_ops() {
        let device = crate::parse_device("cpu").unwrap();
        for n in [1, 1000, 70_001, 300_000] {
            let x: Tensor<1> = random([n], &device);
            let expect: f64 = to_f32_vec(x.clone())
                .iter()
                .map(|&v| v as f64 * v as f64)
                .sum();
            let got = sum_squares(&x).expect("fused on flex");
            assert!(
                (got - expect).abs() <= 1e-6 * expect,
                "n {n}: {got} vs {expect}"
            );
            let want = bits(x.clone().mul_scalar(0.37));
            let shared = x.clone();
            assert_eq!(bits(scale(x, 0.37)), want, "n {n}");
            let owned = shared.clone().mul_scalar(1.0);
            assert_eq!(bits(scale(owned, 0.37)), want, "n {n}, owned");
            // The clone that shared the scaled tensor's memory is as it was.
            let unscaled: f64 = to_f32_vec(shared)
                .iter()
                .map(|&v| v as f64 * v as f64)
                .sum();
            assert_eq!(
                unscaled, expect,
                "n {n}: the shared tensor was written over"
            );
        }
        let m: Tensor<2> = random([300, 257], &device);
        let t = m.clone().transpose();
        let expect: f64 = to_f32_vec(m).iter().map(|&v| v as f64 * v as f64).sum();
        let got = sum_squares(&t).expect("fused on flex");
        assert!(
            (got - expect).abs() <= 1e-6 * expect,
            "view: {got} vs {expect}"
        );
        // Tracked tensors are not taken.
        let tracked: Tensor<1> = random([10], &device.clone().autodiff()).require_grad();
        assert!(sum_squares(&tracked).is_none());
    }
}
