//! Attention of a forward without a KV cache (training, scoring) as one autodiff node: from the
//! fused projection qkv to the context, RoPE, the scores, the masked softmax and the weighted
//! values in one parallel pass, and in its backward the gradient of qkv in one pass.
//!
//! The composed path is a dozen nodes: three products by slices of the q | k | v weight, three
//! row scatters into the padded layout, two RoPE passes, transposed views that the batched
//! products read strided, two batched products, the softmax, a transposing copy of the context
//! and a row gather, each with its backward (the weight slices' backward a zeroed [d, 3d] tensor
//! per slice, then sums). Here one product computes qkv, and each (sequence, key-value head)
//! task writes its rotated queries, keys and values once into head-major rows, runs the scores,
//! the softmax and the weighted values on them, and writes its columns of the context; its
//! backward writes its columns of the gradient of qkv.
//!
//! The products run in blocks of [`BLOCK`] query rows, each against the keys `[0, end)` that
//! some of its rows see: under a causal mask the blocks of a 128-position sequence read 32, 64,
//! 96 and 128 keys (62.5% of the full products). The skipped keys are masked for every row of
//! the block (bias [`MASKED`](crate::fused::MASKED)), whose softmax weight is exactly zero, so
//! the results are those of the full products up to the order of float sums. A row that sees no
//! key at all (a padding query) sees all of them, as the composed softmax does.

use super::{Uninit, rope_row, slice, softmax_backward_row, softmax_row, tensor, values};
use crate::fused::MASKED;
use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use burn::tensor::Shape;
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Arc;

/// Query rows per block of the products.
const BLOCK: usize = 32;

/// The position of a padded layout that holds no input row.
pub(crate) const PADDING: usize = usize::MAX;

/// The attention's sizes: b sequences of t positions, h query heads sharing kv key-value heads
/// (h / kv each), head dimension hd, softmax scale.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub kv: usize,
    pub hd: usize,
    pub scale: f32,
}

impl Dims {
    /// Columns of qkv.
    fn width(&self) -> usize {
        (self.h + 2 * self.kv) * self.hd
    }

    fn blocks(&self) -> usize {
        self.t.div_ceil(BLOCK)
    }

    fn block(&self, c: usize) -> Range<usize> {
        c * BLOCK..((c + 1) * BLOCK).min(self.t)
    }
}

/// What the backward reads: the forward's rotated heads and softmax weights, and the layout.
#[derive(Clone, Debug)]
pub(crate) struct Saved {
    dims: Dims,
    layout: Layout,
    /// [b, h + 2 · kv, t, hd]: each sequence's rotated queries, rotated keys and values, by head.
    heads: FlexTensor,
    /// The blocks' softmax weights, [rows × end] each, at [`Layout::probs`].
    probs: FlexTensor,
    /// cos, sin [b, t, 1, hd].
    rope: Option<[FlexTensor; 2]>,
}

/// Where the rows and the blocks are.
#[derive(Clone, Debug)]
struct Layout {
    /// Padded position (sequence · t + position) → row of qkv, [`PADDING`] for none; None: the
    /// identity (qkv is the padded layout).
    src: Option<Arc<[usize]>>,
    /// [b, blocks]: the keys `[0, end)` each block's products run over.
    ends: Arc<[usize]>,
    /// [b + 1]: where each sequence's softmax weights start (h heads of `area` each).
    starts: Arc<[usize]>,
}

impl Layout {
    fn new(dims: &Dims, src: Option<Arc<[usize]>>, bias: &[f32]) -> Self {
        let (b, t, nb) = (dims.b, dims.t, dims.blocks());
        let mut ends = vec![0; b * nb];
        for r in 0..b {
            for i in 0..t {
                let row = &bias[(r * t + i) * t..(r * t + i + 1) * t];
                let end = row
                    .iter()
                    .rposition(|&x| x > MASKED / 2.0)
                    .map_or(t, |j| j + 1);
                let e = &mut ends[r * nb + i / BLOCK];
                *e = (*e).max(end);
            }
        }
        let mut starts = vec![0; b + 1];
        for r in 0..b {
            let area: usize = (0..nb)
                .map(|c| dims.block(c).len() * ends[r * nb + c])
                .sum();
            starts[r + 1] = starts[r] + dims.h * area;
        }
        Self {
            src,
            ends: ends.into(),
            starts: starts.into(),
        }
    }

    fn row(&self, dims: &Dims, r: usize, i: usize) -> usize {
        let p = r * dims.t + i;
        self.src.as_ref().map_or(p, |s| s[p])
    }

    fn end(&self, dims: &Dims, r: usize, c: usize) -> usize {
        self.ends[r * dims.blocks() + c]
    }

    /// Offset of the softmax weights of sequence r, head `head`, block c.
    fn probs(&self, dims: &Dims, r: usize, head: usize, c: usize) -> usize {
        let area = (self.starts[r + 1] - self.starts[r]) / dims.h;
        let before: usize = (0..c)
            .map(|c| dims.block(c).len() * self.end(dims, r, c))
            .sum();
        self.starts[r] + head * area + before
    }
}

/// A buffer that the tasks write disjoint parts of.
#[derive(Clone, Copy)]
struct Shared(*mut f32);

// SAFETY: each task writes only its own (sequence, key-value head) parts of the buffers, and
// nothing reads them until the parallel loop has ended.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The `len` elements at `at`, to write.
    ///
    /// # Safety
    /// In bounds, and no other task touches them while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part(&self, at: usize, len: usize) -> &mut [Uninit] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at).cast(), len) }
    }
}

/// Writes a head's row x into dst: rotated by the position's cos and sin rows when given.
fn put_row(dst: &mut [Uninit], x: &[f32], rotation: Option<(&[f32], &[f32])>) {
    match rotation {
        Some((c, s)) => rope_row(dst, x, c, s, |o, v| {
            o.write(v);
        }),
        None => {
            for (o, &v) in dst.iter_mut().zip(x) {
                o.write(v);
            }
        }
    }
}

/// dst (m × n, rows `dst_rs` apart) = a · b (+ dst when `acc`), with a's element (i, p) at
/// a[i · ars + p · acs] and b's (p, j) at b[p · brs + j · bcs]: one gemm call on this thread.
///
/// # Safety
/// The pointers and strides describe buffers of those shapes; dst is not read unless `acc`.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    [m, n, k]: [usize; 3],
    dst: *mut f32,
    dst_rs: usize,
    acc: bool,
    (a, ars, acs): (*const f32, usize, usize),
    (b, brs, bcs): (*const f32, usize, usize),
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            acc,
            a,
            acs as isize,
            ars as isize,
            b,
            bcs as isize,
            brs as isize,
            if acc { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Runs `task(r, g)` for every sequence r and key-value head g, on both halves of the pool.
fn per_task(dims: &Dims, task: impl Fn(usize, usize) + Sync) {
    (0..dims.b * dims.kv)
        .into_par_iter()
        .for_each(|i| task(i / dims.kv, i % dims.kv));
}

/// The attention of qkv ([.., w] rows, w = (h + 2 · kv) · hd; the rows `src` names in the padded
/// layout, or the padded layout itself) with the bias [b, 1, t, t] and RoPE tables cos, sin
/// [b, t, 1, hd] (none: no rotation, GPT-2): the context [.., h · hd] in qkv's rows, and with
/// `save` what the backward needs. None where the shapes or dtypes do not fit.
pub(crate) fn forward(
    qkv: &FlexTensor,
    src: Option<Arc<[usize]>>,
    bias: &FlexTensor,
    rope: Option<[&FlexTensor; 2]>,
    dims: Dims,
    save: bool,
) -> Option<(FlexTensor, Option<Saved>)> {
    let Dims {
        b, t, h, kv, hd, ..
    } = dims;
    let shape = qkv.shape();
    let (w, n) = (dims.width(), shape.num_elements() / dims.width().max(1));
    let fits = shape.num_dims() == 3
        && shape[2] == w
        && kv > 0
        && h % kv == 0
        && bias.shape().dims::<4>() == [b, 1, t, t]
        && rope.is_none_or(|[c, s]| {
            hd % 2 == 0
                && c.shape().dims::<4>() == [b, t, 1, hd]
                && s.shape().dims::<4>() == [b, t, 1, hd]
        })
        && match &src {
            None => n == b * t,
            Some(s) => s.len() == b * t && s.iter().filter(|&&j| j != PADDING).count() == n,
        };
    if !fits || t == 0 || hd == 0 {
        return None;
    }
    let (xv, bv) = (values(qkv)?, values(bias)?);
    let tables = match rope {
        Some([c, s]) => Some([values(c)?, values(s)?]),
        None => None,
    };
    let (xs, bs) = (slice(&xv), slice(&bv));
    let table_rows = tables.as_ref().map(|[c, s]| (slice(c), slice(s)));
    let layout = Layout::new(&dims, src, bs);
    let rep = h / kv;
    let heads_len = b * (h + 2 * kv) * t * hd;
    let mut heads: Vec<f32> = Vec::with_capacity(heads_len);
    let mut probs: Vec<f32> = Vec::with_capacity(layout.starts[b]);
    let mut ctx: Vec<f32> = Vec::with_capacity(n * h * hd);
    let (hp, pp, cp) = (
        Shared(heads.as_mut_ptr()),
        Shared(probs.as_mut_ptr()),
        Shared(ctx.as_mut_ptr()),
    );
    let slot = |r: usize, s: usize| (r * (h + 2 * kv) + s) * t * hd;
    per_task(&dims, |r, g| {
        let mut scores = vec![0f32; BLOCK * t];
        let mut out = vec![0f32; BLOCK * hd];
        // This task's heads: queries g · rep.., keys h + g, values h + kv + g. Rows of padding
        // positions are zero (as the composed path's scatter into the padded layout).
        let qs: Vec<usize> = (g * rep..(g + 1) * rep).collect();
        for i in 0..t {
            let row = layout.row(&dims, r, i);
            let at = (r * t + i) * hd..(r * t + i + 1) * hd;
            let rotation = table_rows.map(|(c, s)| (&c[at.clone()], &s[at.clone()]));
            let put = |s: usize, col: usize, rotate: bool| {
                // SAFETY: row i of head slot s of sequence r: this task's alone.
                let dst = unsafe { hp.part(slot(r, s) + i * hd, hd) };
                if row == PADDING {
                    dst.iter_mut().for_each(|o| {
                        o.write(0.0);
                    });
                    return;
                }
                let x = &xs[row * w + col * hd..row * w + (col + 1) * hd];
                put_row(dst, x, rotation.filter(|_| rotate));
            };
            for &q in &qs {
                put(q, q, true);
            }
            put(h + g, h + g, true);
            put(h + kv + g, h + kv + g, false);
        }
        // SAFETY: all rows of this task's slots were written just above; the other tasks
        // never write them.
        let (keys, vals) = unsafe {
            (
                hp.0.add(slot(r, h + g)).cast_const(),
                hp.0.add(slot(r, h + kv + g)).cast_const(),
            )
        };
        for &q in &qs {
            let qh = unsafe { hp.0.add(slot(r, q)).cast_const() };
            for c in 0..dims.blocks() {
                let rows = dims.block(c);
                let (m, end) = (rows.len(), layout.end(&dims, r, c));
                // SAFETY: the block's queries and the keys [0, end) are written rows of this
                // task's slots; `scores` holds m × end.
                unsafe {
                    product(
                        [m, end, hd],
                        scores.as_mut_ptr(),
                        end,
                        false,
                        (qh.add(rows.start * hd), hd, 1),
                        (keys, 1, hd),
                    );
                }
                let at = layout.probs(&dims, r, q, c);
                // SAFETY: this head's block of softmax weights: this task's alone.
                let pr = unsafe { pp.part(at, m * end) };
                for (j, i) in rows.clone().enumerate() {
                    let bias = &bs[(r * t + i) * t..(r * t + i) * t + end];
                    let s = &scores[j * end..(j + 1) * end];
                    softmax_row(&mut pr[j * end..(j + 1) * end], s, bias, dims.scale);
                }
                // SAFETY: the weights were written just above, the values [0, end) are written
                // rows; `out` holds m × hd.
                unsafe {
                    product(
                        [m, hd, end],
                        out.as_mut_ptr(),
                        hd,
                        false,
                        (pp.0.add(at).cast_const(), end, 1),
                        (vals, hd, 1),
                    );
                }
                for (j, i) in rows.enumerate() {
                    let row = layout.row(&dims, r, i);
                    if row == PADDING {
                        continue;
                    }
                    // SAFETY: head q's columns of the context row of position (r, i).
                    let dst = unsafe { cp.part(row * h * hd + q * hd, hd) };
                    for (o, &v) in dst.iter_mut().zip(&out[j * hd..(j + 1) * hd]) {
                        o.write(v);
                    }
                }
            }
        }
    });
    // SAFETY: every task wrote all rows of its head slots, every block of its heads' softmax
    // weights, and its heads' columns of the context rows of its sequence's positions; every
    // row of qkv is one position's (src is one-to-one onto qkv's rows, checked above), so each
    // buffer is written whole.
    unsafe {
        heads.set_len(heads_len);
        probs.set_len(layout.starts[b]);
        ctx.set_len(n * h * hd);
    }
    let mut out_shape = shape.clone();
    out_shape[2] = h * hd;
    let ctx = tensor(ctx, out_shape);
    let probs_len = probs.len();
    let saved = save.then(|| Saved {
        dims,
        layout,
        heads: tensor(heads, Shape::new([b, h + 2 * kv, t, hd])),
        probs: tensor(probs, Shape::new([probs_len])),
        rope: tables,
    });
    Some((ctx, saved))
}

/// The gradient of qkv from the context's gradient `grad` (qkv's rows, [.., h · hd]).
pub(crate) fn backward(saved: &Saved, grad: &FlexTensor) -> FlexTensor {
    let dims = saved.dims;
    let Dims { t, h, kv, hd, .. } = dims;
    let layout = &saved.layout;
    let w = dims.width();
    let gv = values(grad).expect("f32 gradient");
    let gs = slice(&gv);
    let n = gs.len() / (h * hd);
    let (hs, ps) = (slice(&saved.heads), slice(&saved.probs));
    // RoPE's backward is the rotation by −sin.
    let tables = saved
        .rope
        .as_ref()
        .map(|[c, s]| (slice(c), slice(s).iter().map(|x| -x).collect::<Vec<f32>>()));
    let rep = h / kv;
    let mut dqkv: Vec<f32> = Vec::with_capacity(n * w);
    let dp = Shared(dqkv.as_mut_ptr());
    let slot = |r: usize, s: usize| (r * (h + 2 * kv) + s) * t * hd;
    per_task(&dims, |r, g| {
        let (keys, vals) = (&hs[slot(r, h + g)..], &hs[slot(r, h + kv + g)..]);
        let mut dk = vec![0f32; t * hd];
        let mut dv = vec![0f32; t * hd];
        let mut d_o = vec![0f32; t * hd];
        let mut dq = vec![0f32; t * hd];
        let mut d_p = vec![0f32; BLOCK * t];
        let mut d_s = vec![0f32; BLOCK * t];
        // Writes row i of a head's gradient into its columns `col` of qkv's row, rotated back.
        let write = |i: usize, col: usize, x: &[f32], rotate: bool| {
            let row = layout.row(&dims, r, i);
            if row == PADDING {
                return;
            }
            // SAFETY: columns `col` of the row of position (r, i): this task's alone.
            let dst = unsafe { dp.part(row * w + col * hd, hd) };
            let at = (r * t + i) * hd..(r * t + i + 1) * hd;
            let rotation = tables
                .as_ref()
                .map(|(c, s)| (&c[at.clone()], &s[at.clone()]));
            put_row(dst, x, rotation.filter(|_| rotate));
        };
        for q in g * rep..(g + 1) * rep {
            let qh = &hs[slot(r, q)..];
            for i in 0..t {
                let row = layout.row(&dims, r, i);
                let d = &mut d_o[i * hd..(i + 1) * hd];
                if row == PADDING {
                    d.fill(0.0);
                } else {
                    d.copy_from_slice(&gs[row * h * hd + q * hd..row * h * hd + (q + 1) * hd]);
                }
            }
            for c in 0..dims.blocks() {
                let rows = dims.block(c);
                let (m, end) = (rows.len(), layout.end(&dims, r, c));
                let pr = &ps[layout.probs(&dims, r, q, c)..][..m * end];
                let d_ob = d_o[rows.start * hd..].as_ptr();
                // SAFETY (the products): the operands are the buffers above, of the shapes
                // and strides given; dv and dk hold t × hd, d_p and d_s m × end.
                unsafe {
                    // dV[0..end] += Pᵀ · dO
                    product(
                        [end, hd, m],
                        dv.as_mut_ptr(),
                        hd,
                        true,
                        (pr.as_ptr(), 1, end),
                        (d_ob, hd, 1),
                    );
                    // dP = dO · V[0..end]ᵀ
                    product(
                        [m, end, hd],
                        d_p.as_mut_ptr(),
                        end,
                        false,
                        (d_ob, hd, 1),
                        (vals.as_ptr(), 1, hd),
                    );
                }
                for j in 0..m {
                    let span = j * end..(j + 1) * end;
                    // SAFETY: f32 and MaybeUninit<f32> share their layout; the row is written
                    // whole.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(
                            d_s[span.clone()].as_mut_ptr().cast::<Uninit>(),
                            end,
                        )
                    };
                    softmax_backward_row(out, &pr[span.clone()], &d_p[span], dims.scale);
                }
                unsafe {
                    // dQ = dS · K[0..end]
                    product(
                        [m, hd, end],
                        dq[rows.start * hd..].as_mut_ptr(),
                        hd,
                        false,
                        (d_s.as_ptr(), end, 1),
                        (keys.as_ptr(), hd, 1),
                    );
                    // dK[0..end] += dSᵀ · Q
                    product(
                        [end, hd, m],
                        dk.as_mut_ptr(),
                        hd,
                        true,
                        (d_s.as_ptr(), 1, end),
                        (qh[rows.start * hd..].as_ptr(), hd, 1),
                    );
                }
            }
            for i in 0..t {
                write(i, q, &dq[i * hd..(i + 1) * hd], true);
            }
        }
        for i in 0..t {
            write(i, h + g, &dk[i * hd..(i + 1) * hd], true);
            write(i, h + kv + g, &dv[i * hd..(i + 1) * hd], false);
        }
    });
    // SAFETY: every row of qkv is one position's; its task for each key-value head wrote the
    // columns of that head's queries, key and value.
    unsafe { dqkv.set_len(n * w) };
    let mut shape = grad.shape();
    shape[2] = w;
    tensor(dqkv, shape)
}
