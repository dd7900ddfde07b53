//! The fused kernels on the `flex` backend: loops over contiguous `f32` rows, each row written
//! once, rows split across rayon's threads when a tensor is large enough for that to pay. Other
//! dtypes take the composed kernels.

use super::{Kernels, generic};
use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::tensor::FloatTensor;
use burn::tensor::{Bytes, DType, Shape};
use rayon::prelude::*;

/// Below this many elements a kernel runs on the calling thread (rayon's hand-off costs more).
const PARALLEL_MIN: usize = 1 << 15;

/// The tensor's elements in row-major order when it is f32 (copied if it is a strided view).
fn values(t: &FlexTensor) -> Option<FlexTensor> {
    if t.dtype() != DType::F32 {
        return None;
    }
    Some(if t.as_slice::<f32>().is_some() {
        t.clone()
    } else {
        t.to_contiguous()
    })
}

fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 tensor")
}

fn tensor(data: Vec<f32>, shape: Shape) -> FlexTensor {
    debug_assert_eq!(data.len(), shape.num_elements());
    FlexTensor::new(
        Bytes::from_elems(data),
        Layout::contiguous(shape),
        DType::F32,
    )
}

/// Calls `f(row_index, out_row)` for each `row_len`-long row of `out`, in parallel when large.
fn for_rows(out: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if out.len() >= PARALLEL_MIN {
        let rows_per_task = (PARALLEL_MIN / row_len).max(1);
        out.par_chunks_mut(rows_per_task * row_len)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (i, row) in chunk.chunks_mut(row_len).enumerate() {
                    f(c * rows_per_task + i, row);
                }
            });
    } else {
        for (i, row) in out.chunks_mut(row_len).enumerate() {
            f(i, row);
        }
    }
}

/// Two outputs of the same shape, row by row.
fn for_rows2(
    a: &mut [f32],
    b: &mut [f32],
    row_len: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) {
    if a.len() >= PARALLEL_MIN {
        let rows_per_task = (PARALLEL_MIN / row_len).max(1);
        let n = rows_per_task * row_len;
        a.par_chunks_mut(n)
            .zip(b.par_chunks_mut(n))
            .enumerate()
            .for_each(|(c, (ca, cb))| {
                for (i, (ra, rb)) in ca
                    .chunks_mut(row_len)
                    .zip(cb.chunks_mut(row_len))
                    .enumerate()
                {
                    f(c * rows_per_task + i, ra, rb);
                }
            });
    } else {
        for (i, (ra, rb)) in a.chunks_mut(row_len).zip(b.chunks_mut(row_len)).enumerate() {
            f(i, ra, rb);
        }
    }
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl Kernels for Flex {
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f32) -> [FloatTensor<Self>; 2] {
        let (Some(xv), Some(wv)) = (values(&x), values(&w)) else {
            return generic::rms_norm::<Self>(x, w, eps);
        };
        let shape = x.shape();
        let d = shape[shape.num_dims() - 1];
        let rows = shape.num_elements() / d;
        let (xs, ws) = (slice(&xv), slice(&wv));
        let mut rstd = vec![0f32; rows];
        for (r, out) in rstd.iter_mut().enumerate() {
            let row = &xs[r * d..(r + 1) * d];
            let ss: f32 = row.iter().map(|v| v * v).sum();
            *out = 1.0 / (ss / d as f32 + eps).sqrt();
        }
        let mut y = vec![0f32; rows * d];
        for_rows(&mut y, d, |r, out| {
            let row = &xs[r * d..(r + 1) * d];
            let k = rstd[r];
            for ((o, &v), &g) in out.iter_mut().zip(row).zip(ws) {
                *o = v * k * g;
            }
        });
        let mut rshape = shape.clone();
        let n = rshape.num_dims();
        rshape[n - 1] = 1;
        [tensor(y, shape), tensor(rstd, rshape)]
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        let (Some(xv), Some(wv), Some(rv), Some(gv)) =
            (values(&x), values(&w), values(&rstd), values(&grad))
        else {
            return generic::rms_norm_backward::<Self>(x, w, rstd, grad);
        };
        let shape = x.shape();
        let d = shape[shape.num_dims() - 1];
        let rows = shape.num_elements() / d;
        let (xs, ws, rs, gs) = (slice(&xv), slice(&wv), slice(&rv), slice(&gv));
        let mut gx = vec![0f32; rows * d];
        for_rows(&mut gx, d, |r, out| {
            let (xr, gr, k) = (&xs[r * d..(r + 1) * d], &gs[r * d..(r + 1) * d], rs[r]);
            // x̂ · mean(g·w · x̂) = x · k · (k / d · Σ g·w·x)
            let dot: f32 = xr.iter().zip(gr).zip(ws).map(|((x, g), w)| g * w * x).sum();
            let c = dot * k / d as f32;
            for (((o, &x), &g), &w) in out.iter_mut().zip(xr).zip(gr).zip(ws) {
                *o = k * (g * w - x * k * c);
            }
        });
        // gw = Σ_rows g · x · rstd, accumulated per chunk of rows, then summed.
        let chunk_rows = (PARALLEL_MIN / d).max(1);
        let partial = |c: usize| {
            let mut acc = vec![0f32; d];
            for r in c * chunk_rows..((c + 1) * chunk_rows).min(rows) {
                let k = rs[r];
                let (xr, gr) = (&xs[r * d..(r + 1) * d], &gs[r * d..(r + 1) * d]);
                for ((a, &x), &g) in acc.iter_mut().zip(xr).zip(gr) {
                    *a += g * x * k;
                }
            }
            acc
        };
        let chunks = rows.div_ceil(chunk_rows);
        let gw = if chunks > 1 {
            (0..chunks).into_par_iter().map(partial).reduce(
                || vec![0f32; d],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            )
        } else {
            partial(0)
        };
        [tensor(gx, shape), tensor(gw, Shape::new([d]))]
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let (Some(gv), Some(uv)) = (values(&gate), values(&up)) else {
            return generic::swiglu::<Self>(gate, up);
        };
        let shape = gate.shape();
        let (gs, us) = (slice(&gv), slice(&uv));
        let d = shape[shape.num_dims() - 1];
        let mut y = vec![0f32; gs.len()];
        for_rows(&mut y, d, |r, out| {
            let (gr, ur) = (&gs[r * d..(r + 1) * d], &us[r * d..(r + 1) * d]);
            for ((o, &g), &u) in out.iter_mut().zip(gr).zip(ur) {
                *o = g * sigmoid(g) * u;
            }
        });
        tensor(y, shape)
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        let (Some(gv), Some(uv), Some(dv)) = (values(&gate), values(&up), values(&grad)) else {
            return generic::swiglu_backward::<Self>(gate, up, grad);
        };
        let shape = gate.shape();
        let (gs, us, ds) = (slice(&gv), slice(&uv), slice(&dv));
        let d = shape[shape.num_dims() - 1];
        let mut g_gate = vec![0f32; gs.len()];
        let mut g_up = vec![0f32; gs.len()];
        for_rows2(&mut g_gate, &mut g_up, d, |r, og, ou| {
            let span = r * d..(r + 1) * d;
            let (gr, ur, dr) = (&gs[span.clone()], &us[span.clone()], &ds[span]);
            for i in 0..d {
                let (g, u, dy) = (gr[i], ur[i], dr[i]);
                let s = sigmoid(g);
                let silu = g * s;
                ou[i] = dy * silu;
                og[i] = dy * u * (s + silu - silu * s);
            }
        });
        [tensor(g_gate, shape.clone()), tensor(g_up, shape)]
    }

    fn masked_softmax(
        scores: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        let (Some(sv), Some(bv)) = (values(&scores), values(&bias)) else {
            return generic::masked_softmax::<Self>(scores, bias, scale);
        };
        let shape = scores.shape();
        let [_, h, t, k] = [shape[0], shape[1], shape[2], shape[3]];
        let (ss, bs) = (slice(&sv), slice(&bv));
        let mut p = vec![0f32; ss.len()];
        for_rows(&mut p, k, |r, out| {
            // row r = ((b · h) + head) · t + i; its bias row is b · t + i
            let (b, i) = (r / (h * t), r % t);
            let (sr, br) = (
                &ss[r * k..(r + 1) * k],
                &bs[(b * t + i) * k..(b * t + i + 1) * k],
            );
            let mut max = f32::NEG_INFINITY;
            for ((o, &s), &bias) in out.iter_mut().zip(sr).zip(br) {
                *o = s * scale + bias;
                max = max.max(*o);
            }
            let mut sum = 0.0;
            for o in out.iter_mut() {
                *o = (*o - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            for o in out.iter_mut() {
                *o *= inv;
            }
        });
        tensor(p, shape)
    }

    fn masked_softmax_backward(
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        let (Some(pv), Some(gv)) = (values(&probs), values(&grad)) else {
            return generic::masked_softmax_backward::<Self>(probs, grad, scale);
        };
        let shape = probs.shape();
        let k = shape[3];
        let (ps, gs) = (slice(&pv), slice(&gv));
        let mut out = vec![0f32; ps.len()];
        for_rows(&mut out, k, |r, o| {
            let (pr, gr) = (&ps[r * k..(r + 1) * k], &gs[r * k..(r + 1) * k]);
            let dot: f32 = pr.iter().zip(gr).map(|(p, g)| p * g).sum();
            for ((o, &p), &g) in o.iter_mut().zip(pr).zip(gr) {
                *o = scale * p * (g - dot);
            }
        });
        tensor(out, shape)
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (Some(xv), Some(cv), Some(sv)) = (values(&x), values(&cos), values(&sin)) else {
            return generic::rope::<Self>(x, cos, sin);
        };
        let shape = x.shape();
        let [_, _, h, hd] = [shape[0], shape[1], shape[2], shape[3]];
        let half = hd / 2;
        let (xs, cs, sn) = (slice(&xv), slice(&cv), slice(&sv));
        let mut y = vec![0f32; xs.len()];
        for_rows(&mut y, hd, |r, out| {
            // row r = (b · t + position) · h + head; the tables have one row per b · t + position
            let p = r / h;
            let (xr, cr, sr) = (
                &xs[r * hd..(r + 1) * hd],
                &cs[p * hd..(p + 1) * hd],
                &sn[p * hd..(p + 1) * hd],
            );
            let (lo, hi) = out.split_at_mut(half);
            for i in 0..half {
                lo[i] = xr[i] * cr[i] - xr[i + half] * sr[i];
                hi[i] = xr[i + half] * cr[i + half] + xr[i] * sr[i + half];
            }
        });
        tensor(y, shape)
    }
}
