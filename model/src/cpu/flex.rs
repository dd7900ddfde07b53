//! The fused kernels on the `flex` backend: loops over contiguous `f32` rows, each row written
//! once, rows split across rayon's threads when a tensor is large enough for that to pay. Other
//! dtypes take the composed kernels.

use super::{amx, kept, skinny};
use crate::cpu::simd::{exp, max_of, multiversion, sum_map, sum_map2};
use crate::fused::{Kernels, generic};
use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::{Bytes, DType, Shape};
use rayon::prelude::*;

pub(crate) mod attention;

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

/// An int tensor's values as in-range indices (None for a dtype other than i64 / i32).
fn indices(t: &FlexTensor) -> Option<Vec<usize>> {
    let t = t.to_contiguous();
    match t.dtype() {
        DType::I64 => t
            .as_slice::<i64>()
            .map(|s| s.iter().map(|&i| i as usize).collect()),
        DType::I32 => t
            .as_slice::<i32>()
            .map(|s| s.iter().map(|&i| i as usize).collect()),
        _ => None,
    }
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

/// A weight matrix held packed ([`kept::keep`]) and the tensor whose memory the
/// packed copy was made from, kept alive and unchanged (a tensor is copied on write while
/// another handle shares its memory) until this is dropped.
pub(crate) struct KeptWeight {
    kept: kept::Kept,
    _tensor: FlexTensor,
}

impl KeptWeight {
    /// Whether it is packed as bf16.
    pub(crate) fn bf16(&self) -> bool {
        self.kept.bf16()
    }
}

/// Packs the 2-D weight `w` (f32, or bf16: a frozen weight kept in bf16, widened to f32 for the
/// packing) for the products that read it through this same view: for bf16 products (`bf16`,
/// on AMX) or for f32 products of fewer than 32 rows (on AVX-512, and only a weight stored by
/// rows: a transposed view, the tied LM head, is read by the skinny kernel along its contiguous
/// columns already); None otherwise.
pub(crate) fn keep(w: FlexTensor, bf16: bool) -> Option<KeptWeight> {
    let shape = w.shape();
    let stored = w.dtype();
    if !matches!(stored, DType::F32 | DType::BF16)
        || shape.num_dims() != 2
        || shape[0] < 32
        || shape[1] < 32
    {
        return None;
    }
    let st = w.layout().strides().to_vec();
    if !bf16 && st[1] != 1 {
        return None;
    }
    let view_of = |t: &FlexTensor| amx::View {
        ptr: match t.dtype() {
            DType::BF16 => t.storage::<burn::tensor::bf16>()[t.layout().start_offset()..]
                .as_ptr()
                .cast(),
            _ => t.storage::<f32>()[t.layout().start_offset()..].as_ptr(),
        },
        rs: st[0],
        cs: st[1],
    };
    let widened = (stored == DType::BF16).then(|| widen(&w));
    let source = widened.as_ref().unwrap_or(&w);
    // SAFETY: the views are burn's layouts of `w` (whose memory the returned value keeps
    // alive; its products find the packed copy by this address) and of its f32 copy, alive
    // during the packing; nothing writes to memory that another handle (ours) shares.
    let kept = unsafe { kept::keep(view_of(&w), view_of(source), shape[0], shape[1], bf16) }?;
    Some(KeptWeight { kept, _tensor: w })
}

/// The bf16 tensor `t` in f32, element for element in the same layout (a transposed or sliced
/// view stays one): the operand a product reads in place of a frozen weight kept in bf16.
fn widen(t: &FlexTensor) -> FlexTensor {
    let src = t.storage::<burn::tensor::bf16>();
    let mut out: Vec<f32> = Vec::with_capacity(src.len());
    let spare = &mut out.spare_capacity_mut()[..src.len()];
    // bf16 is the upper half of an f32: the conversion is exact.
    let widen_chunk = |(d, s): (&mut [std::mem::MaybeUninit<f32>], &[burn::tensor::bf16])| {
        for (d, &s) in d.iter_mut().zip(s) {
            d.write(f32::from_bits(u32::from(s.to_bits()) << 16));
        }
    };
    if src.len() >= PARALLEL_MIN {
        spare
            .par_chunks_mut(PARALLEL_MIN)
            .zip(src.par_chunks(PARALLEL_MIN))
            .for_each(widen_chunk);
    } else {
        widen_chunk((spare, src));
    }
    // SAFETY: every element was written above.
    unsafe { out.set_len(src.len()) };
    FlexTensor::new(Bytes::from_elems(out), t.layout().clone(), DType::F32)
}

type Uninit = std::mem::MaybeUninit<f32>;

/// Rows of A up to which a batched product (attention heads) takes [`rows_times_b`] /
/// [`rows_dot_cols`] instead of a gemm call per head.
const FEW_ROWS: usize = 4;

/// Multiply-adds of such a batch above which its heads are split across threads.
const FEW_ROWS_PARALLEL: usize = 1 << 16;

multiversion! {
    /// c (m × n) = a (m × k) · b (k × n), all three row-major: each row of C a sum of B's rows
    /// scaled by A's row (a step's attention weights times the values). The sums are those of
    /// [`rows_times_b_avx512`], which takes this on AVX-512.
    fn rows_times_b_portable(c: &mut [Uninit], a: &[f32], b: &[f32], k: usize) {
        let n = b.len() / k;
        for (ci, ai) in c.chunks_mut(n).zip(a.chunks(k)) {
            for (x, &y) in ci.iter_mut().zip(&b[..n]) {
                x.write(ai[0] * y);
            }
            // SAFETY: every element of the row was written just above; f32 has no invalid
            // values.
            let ci = unsafe { &mut *(ci as *mut [Uninit] as *mut [f32]) };
            for (p, &s) in ai.iter().enumerate().skip(1) {
                for (x, &y) in ci.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                    *x += s * y;
                }
            }
        }
    }
}

/// [`rows_times_b_portable`]: on AVX-512 each 64-column block of a row of C is summed in
/// registers over all of B's rows (the portable loop loads and stores C at every row of B).
fn rows_times_b(c: &mut [Uninit], a: &[f32], b: &[f32], k: usize, next: *const f32) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        unsafe { rows_times_b_avx512(c, a, b, k, next) };
        return;
    }
    rows_times_b_portable(c, a, b, k)
}

/// [`rows_times_b_portable`]'s sums, in its order and roundings (a product, then one add per
/// row of B: no fused multiply-add), four vectors of C at a time. Rows of B are prefetched 8
/// ahead, past B's last row into the next product's B at `next` (the next head's values; any
/// address: a prefetch never faults).
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_times_b_avx512(c: &mut [Uninit], a: &[f32], b: &[f32], k: usize, next: *const f32) {
    use std::arch::x86_64::*;
    const V: usize = 4;
    let n = b.len() / k;
    for (ci, ai) in c.chunks_mut(n).zip(a.chunks(k)) {
        let mut j = 0;
        while j < n {
            let mask: [__mmask16; V] =
                std::array::from_fn(|v| skinny::lanes((n - j).saturating_sub(v * 16)));
            // SAFETY: the masks keep every load inside row p of B and every store inside C's
            // row (j + 16 · v + lane < n).
            unsafe {
                let row = |p: usize| b.as_ptr().wrapping_add(p * n + j);
                let ahead = |p: usize| {
                    if p + 8 < k {
                        row(p + 8)
                    } else {
                        next.wrapping_add((p + 8 - k) * n + j)
                    }
                };
                let s = _mm512_set1_ps(ai[0]);
                let mut acc: [__m512; V] = std::array::from_fn(|v| {
                    _mm512_mul_ps(s, _mm512_maskz_loadu_ps(mask[v], row(0).add(v * 16)))
                });
                for (p, &x) in ai.iter().enumerate().skip(1) {
                    for v in 0..V {
                        _mm_prefetch::<_MM_HINT_T0>(ahead(p).wrapping_add(v * 16).cast());
                    }
                    let s = _mm512_set1_ps(x);
                    for v in 0..V {
                        let y = _mm512_maskz_loadu_ps(mask[v], row(p).add(v * 16));
                        acc[v] = _mm512_add_ps(acc[v], _mm512_mul_ps(s, y));
                    }
                }
                let out = ci.as_mut_ptr().add(j).cast::<f32>();
                for v in 0..V {
                    _mm512_mask_storeu_ps(out.add(v * 16), mask[v], acc[v]);
                }
            }
            j += V * 16;
        }
    }
}

/// c (m × n) = a (m × k) · B with B's columns contiguous, given as `bt` (n × k, row-major):
/// each element of C one dot product (a step's queries against the keys).
fn rows_dot_cols(c: &mut [Uninit], a: &[f32], bt: &[f32], k: usize, next: *const f32) {
    let n = bt.len() / k;
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        for (ci, ai) in c.chunks_mut(n).zip(a.chunks(k)) {
            // SAFETY: the CPU has AVX-512F; ai holds k values, bt n rows of k, ci n.
            unsafe { dots_avx512(ci, ai, bt, k, next) };
        }
        return;
    }
    for (ci, ai) in c.chunks_mut(n).zip(a.chunks(k)) {
        for (x, bj) in ci.iter_mut().zip(bt.chunks(k)) {
            x.write(sum_map2(ai, bj, |p, q| p * q));
        }
    }
}

/// c[j] = a · bt[j] for the n rows of `bt` (n × k): [`dot_avx512`] of each, bit for bit, 16 rows
/// at a time. Each row's 16 lanes of partial sums are formed as there; the 16 vectors are then
/// reduced together by a tree that transposes as it adds, pairing lanes as
/// `_mm512_reduce_add_ps` does ((i, i + 8), then (i, i + 4), (i, i + 2), (0, 1)), with 4 adds
/// and 8 shuffles per 16 sums instead of a reduction per sum.
///
/// The next 16 rows are prefetched during each block, the first 16 of the next product's `bt`
/// at `next` during the last (the next head's keys; any address: a prefetch never faults).
///
/// # Safety
/// AVX-512F; `a` holds k values, `bt` n · k, `c` n with n = bt.len() / k.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512(c: &mut [Uninit], a: &[f32], bt: &[f32], k: usize, next: *const f32) {
    use std::arch::x86_64::*;
    let n = bt.len() / k;
    // Where sum j sits after the tree (see below).
    let order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
    let tail = skinny::lanes(k % 16);
    let mut j0 = 0;
    while j0 < n {
        let rows = (n - j0).min(16);
        // SAFETY: rows past n repeat the last one (computed, not stored); loads stay inside
        // a and the rows of bt (the depth tail is masked); the store is masked to `rows`.
        unsafe {
            let row: [*const f32; 16] =
                std::array::from_fn(|r| bt.as_ptr().add((j0 + r.min(rows - 1)) * k));
            // The next 16 rows, a line at a time.
            let ahead = if j0 + 16 < n {
                bt.as_ptr().wrapping_add((j0 + 16) * k)
            } else {
                next
            };
            let mut line = 0;
            while line < 16 * k {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
                line += 16;
            }
            let mut v = [_mm512_setzero_ps(); 16];
            let mut i = 0;
            while i + 16 <= k {
                let x = _mm512_loadu_ps(a.as_ptr().add(i));
                for r in 0..16 {
                    v[r] = _mm512_fmadd_ps(x, _mm512_loadu_ps(row[r].add(i)), v[r]);
                }
                i += 16;
            }
            if i < k {
                let x = _mm512_maskz_loadu_ps(tail, a.as_ptr().add(i));
                for r in 0..16 {
                    let y = _mm512_maskz_loadu_ps(tail, row[r].add(i));
                    v[r] = _mm512_fmadd_ps(x, y, v[r]);
                }
            }
            // Lanes i and i + 8: w[p] holds row p's eight sums in its low half, row p + 8's
            // in its high half.
            let w: [__m512; 8] = std::array::from_fn(|p| {
                _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0x44>(v[p], v[p + 8]),
                    _mm512_shuffle_f32x4::<0xEE>(v[p], v[p + 8]),
                )
            });
            // Lanes i and i + 4: x[p]'s 128-bit lanes hold rows p, p + 8, p + 4, p + 12.
            let x: [__m512; 4] = std::array::from_fn(|p| {
                _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0x88>(w[p], w[p + 4]),
                    _mm512_shuffle_f32x4::<0xDD>(w[p], w[p + 4]),
                )
            });
            // Lanes i and i + 2 within each 128-bit lane: y[p] pairs rows of x[p] and x[p + 2].
            let y: [__m512; 2] = std::array::from_fn(|p| {
                _mm512_add_ps(
                    _mm512_shuffle_ps::<0x44>(x[p], x[p + 2]),
                    _mm512_shuffle_ps::<0xEE>(x[p], x[p + 2]),
                )
            });
            // Lanes 0 and 1: each 128-bit lane L holds the sums of rows (0, 2, 1, 3) + (0, 8,
            // 4, 12)[L].
            let z = _mm512_add_ps(
                _mm512_shuffle_ps::<0x88>(y[0], y[1]),
                _mm512_shuffle_ps::<0xDD>(y[0], y[1]),
            );
            let sums = _mm512_permutexvar_ps(order, z);
            _mm512_mask_storeu_ps(c.as_mut_ptr().add(j0).cast(), skinny::lanes(rows), sums);
        }
        j0 += 16;
    }
}

/// Σ a·b over two slices of one length, 16 lanes at a time (LLVM vectorised the portable loop
/// two lanes wide here).
///
/// # Safety
/// AVX-512F.
#[cfg(all(target_arch = "x86_64", test))]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    // SAFETY: every load is inside both slices (the tail's lanes beyond n are masked off).
    unsafe {
        while i + 16 <= n {
            let x = _mm512_loadu_ps(a.as_ptr().add(i));
            let y = _mm512_loadu_ps(b.as_ptr().add(i));
            acc = _mm512_fmadd_ps(x, y, acc);
            i += 16;
        }
        if i < n {
            let mask = skinny::lanes(n - i);
            let x = _mm512_maskz_loadu_ps(mask, a.as_ptr().add(i));
            let y = _mm512_maskz_loadu_ps(mask, b.as_ptr().add(i));
            acc = _mm512_fmadd_ps(x, y, acc);
        }
    }
    _mm512_reduce_add_ps(acc)
}

/// N outputs of n elements each, written by `fill`, given the uninitialised buffers: no
/// zero-fill first (for the activations of a training step that was a memset of every output,
/// ~4% of the step).
///
/// # Safety
/// `fill` writes every one of the n elements of every output.
unsafe fn written<const N: usize>(
    n: usize,
    fill: impl FnOnce([&mut [Uninit]; N]),
) -> [Vec<f32>; N] {
    let mut out: [Vec<f32>; N] = std::array::from_fn(|_| Vec::with_capacity(n));
    fill(out.each_mut().map(|v| &mut v.spare_capacity_mut()[..n]));
    for v in &mut out {
        // SAFETY: `fill` wrote every element (the caller's promise).
        unsafe { v.set_len(n) };
    }
    out
}

/// Calls `f(row_index, out_row)` for each `row_len`-long row of `out`, in parallel when large.
fn for_rows<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    for_rows_from(out, row_len, PARALLEL_MIN, f)
}

/// [`for_rows`], split across threads from `min` elements on (rows of costly elements, an exp
/// each, split earlier: a decoding step's 16 rows of SwiGLU are ~20 us on one thread): below
/// `PARALLEL_MIN`, in two halves.
fn for_rows_from<T: Send>(
    out: &mut [T],
    row_len: usize,
    min: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let rows = out.len() / row_len.max(1);
    if out.len() >= PARALLEL_MIN {
        let rows_per_task = (PARALLEL_MIN / row_len).max(1);
        out.par_chunks_mut(rows_per_task * row_len)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (i, row) in chunk.chunks_mut(row_len).enumerate() {
                    f(c * rows_per_task + i, row);
                }
            });
    } else if out.len() >= min && rows >= 2 {
        let half = rows / 2;
        let (a, z) = out.split_at_mut(half * row_len);
        let run = |first: usize, part: &mut [T]| {
            for (i, row) in part.chunks_mut(row_len).enumerate() {
                f(first + i, row);
            }
        };
        rayon::join(|| run(0, a), || run(half, z));
    } else {
        for (i, row) in out.chunks_mut(row_len).enumerate() {
            f(i, row);
        }
    }
}

multiversion! {
    /// out = softmax(s · scale + bias)
    fn softmax_row(out: &mut [Uninit], s: &[f32], bias: &[f32], scale: f32) {
        for ((o, &s), &b) in out.iter_mut().zip(s).zip(bias) {
            o.write(s * scale + b);
        }
        // SAFETY: every element was written just above; MaybeUninit<f32> is laid out as f32.
        let out = unsafe { &mut *(out as *mut [Uninit] as *mut [f32]) };
        let max = max_of(out);
        for o in out.iter_mut() {
            *o = exp(*o - max);
        }
        let sum = sum_map(out, |x| x);
        let inv = 1.0 / sum;
        for o in out.iter_mut() {
            *o *= inv;
        }
    }
}

multiversion! {
    /// out = scale · p · (g − Σ p · g)
    fn softmax_backward_row(out: &mut [Uninit], p: &[f32], g: &[f32], scale: f32) {
        let dot = sum_map2(p, g, |p, g| p * g);
        for ((o, &p), &g) in out.iter_mut().zip(p).zip(g) {
            o.write(scale * p * (g - dot));
        }
    }
}

multiversion! {
    /// out = silu(g) · u
    fn swiglu_row(out: &mut [Uninit], g: &[f32], u: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            o.write(g * u / (1.0 + exp(-g)));
        }
    }
}

multiversion! {
    fn swiglu_backward_row(og: &mut [Uninit], ou: &mut [Uninit], g: &[f32], u: &[f32], dy: &[f32]) {
        for i in 0..og.len() {
            let (g, u, dy) = (g[i], u[i], dy[i]);
            let s = 1.0 / (1.0 + exp(-g));
            let silu = g * s;
            ou[i].write(dy * silu);
            og[i].write(dy * u * (s + silu - silu * s));
        }
    }
}

multiversion! {
    /// log Σ exp(l)
    fn logsumexp_row(l: &[f32]) -> f32 {
        let max = max_of(l);
        max + sum_map(l, |x| exp(x - max)).ln()
    }
}

multiversion! {
    /// out = −g · exp(l − lse), then out[target] += g
    fn token_grad_row(out: &mut [Uninit], l: &[f32], lse: f32, g: f32, target: usize) {
        for (o, &l) in out.iter_mut().zip(l) {
            o.write(-g * exp(l - lse));
        }
        out[target].write(-g * exp(l[target] - lse) + g);
    }
}

multiversion! {
    /// Σ x²
    fn sum_squares(x: &[f32]) -> f32 {
        sum_map(x, |x| x * x)
    }
}

multiversion! {
    /// x ← x · c
    fn scale_run(x: &mut [f32], c: f32) {
        for x in x {
            *x *= c;
        }
    }
}

multiversion! {
    /// Σ g · w · x, with gw = g · w written to `scratch`
    fn dot3(scratch: &mut [f32], g: &[f32], w: &[f32], x: &[f32]) -> f32 {
        for ((s, &g), &w) in scratch.iter_mut().zip(g).zip(w) {
            *s = g * w;
        }
        sum_map2(scratch, x, |gw, x| gw * x)
    }
}

multiversion! {
    /// AdamW's first step over a run of parameters: [p, g] → [p', m, v] (see `AdamWStep`).
    fn adamw_first(out: [&mut [Uninit]; 3], input: [&[f32]; 2], step: &crate::fused::AdamWStep) {
        let [po, mo, vo] = out;
        let [p, g] = input;
        for i in 0..po.len() {
            let [p1, m1, v1] = step.apply(p[i], g[i], None, None);
            po[i].write(p1);
            mo[i].write(m1);
            vo[i].write(v1);
        }
    }
}

multiversion! {
    /// AdamW's later steps over a run of parameters: [p, g, m, v] → [p', m', v'].
    fn adamw_next(out: [&mut [Uninit]; 3], input: [&[f32]; 4], step: &crate::fused::AdamWStep) {
        let [po, mo, vo] = out;
        let [p, g, m, v] = input;
        let n = po.len();
        let (p, g, m, v) = (&p[..n], &g[..n], &m[..n], &v[..n]);
        for i in 0..n {
            let [p1, m1, v1] = step.apply(p[i], g[i], Some(m[i]), Some(v[i]));
            po[i].write(p1);
            mo[i].write(m1);
            vo[i].write(v1);
        }
    }
}

/// AdamW's later steps over a run, w, m, v ← (p', m', v'), with (p, g) = `order(w, r)`: one
/// loop body for both orders, each compiled without a branch in the loop (which keeps it from
/// vectorising).
#[inline(always)]
fn adamw_runs(
    [w, m, v]: [&mut [f32]; 3],
    r: &[f32],
    step: &crate::fused::AdamWStep,
    order: impl Fn(f32, f32) -> (f32, f32),
) {
    let n = w.len();
    let (m, v, r) = (&mut m[..n], &mut v[..n], &r[..n]);
    for i in 0..n {
        let (p, g) = order(w[i], r[i]);
        [w[i], m[i], v[i]] = step.apply(p, g, Some(m[i]), Some(v[i]));
    }
}

multiversion! {
    /// AdamW's later steps over a run of parameters, written over the inputs: `w` holds the
    /// parameter (`w_is_param`) or else the gradient, `r` the other; w, m, v ← (p', m', v').
    fn adamw_over(wmv: [&mut [f32]; 3], r: &[f32], w_is_param: bool, step: &crate::fused::AdamWStep) {
        if w_is_param {
            adamw_runs(wmv, r, step, |w, r| (w, r));
        } else {
            adamw_runs(wmv, r, step, |w, r| (r, w));
        }
    }
}

/// The whole of a tensor's memory as f32 to write in place: None unless the tensor owns it
/// alone and is exactly its contiguous f32 elements.
fn whole_mut(t: &mut FlexTensor) -> Option<&mut [f32]> {
    let n = t.shape().num_elements();
    if t.dtype() != DType::F32 || !t.layout().is_contiguous() || t.layout().start_offset() != 0 {
        return None;
    }
    t.try_storage_mut::<f32>().filter(|s| s.len() == n)
}

/// The rotate-half rotation of one head's row x (hd values, hd even) by the position's cos and
/// sin rows, each value handed to `put` with its place in `out`: [`Kernels::rope`]'s rows (into
/// fresh memory) and [`rope_qkv_into_cache`]'s (into the cache) are this one loop.
#[inline(always)]
fn rope_row<T>(out: &mut [T], x: &[f32], c: &[f32], s: &[f32], put: impl Fn(&mut T, f32)) {
    let half = x.len() / 2;
    let (lo, hi) = out.split_at_mut(half);
    let (x, c, s) = (&x[..2 * half], &c[..2 * half], &s[..2 * half]);
    for i in 0..half {
        put(&mut lo[i], x[i] * c[i] - x[i + half] * s[i]);
        put(&mut hi[i], x[i + half] * c[i + half] + x[i] * s[i + half]);
    }
}

/// A decoding step's (or a prompt's) queries, keys and values from the fused projection
/// qkv [b, t, (h + 2 · kv) · hd] with RoPE tables cos, sin [b, t, 1, hd]: the keys rotated and
/// the values written straight into the cache buffers k, v [b, kv, room, hd] at positions
/// past..past + t, and the rotated queries returned as [b, h, t, hd]. Replaces the split, two
/// reshape copies, two RoPE passes, a transposing copy and two slice assignments. None, with
/// nothing written, unless every tensor is f32, the buffers are owned alone, contiguous and
/// have the room, and the shapes agree.
pub(crate) fn rope_qkv_into_cache(
    qkv: &FlexTensor,
    cos: &FlexTensor,
    sin: &FlexTensor,
    [k, v]: [&mut FlexTensor; 2],
    [h, kv, hd]: [usize; 3],
    past: usize,
) -> Option<FlexTensor> {
    let [b, t, w] = qkv.shape().dims::<3>();
    let room = k.shape()[2];
    let fits = w == (h + 2 * kv) * hd
        && hd % 2 == 0
        && cos.shape().dims::<4>() == [b, t, 1, hd]
        && sin.shape().dims::<4>() == [b, t, 1, hd]
        && k.shape().dims::<4>() == [b, kv, room, hd]
        && v.shape().dims::<4>() == [b, kv, room, hd]
        && past + t <= room;
    if !fits {
        return None;
    }
    let (xv, cv, sv) = (values(qkv)?, values(cos)?, values(sin)?);
    let (xs, cs, sn) = (slice(&xv), slice(&cv), slice(&sv));
    let (ks, vs) = (whole_mut(k)?, whole_mut(v)?);
    let mut q = vec![0f32; b * h * t * hd];
    // One sequence: its queries [h, t, hd] and its keys and values [kv, room, hd].
    let sequence = |r: usize, (q, (ks, vs)): (&mut [f32], (&mut [f32], &mut [f32]))| {
        for j in 0..t {
            let p = r * t + j;
            let (x, c, s) = (
                &xs[p * w..(p + 1) * w],
                &cs[p * hd..(p + 1) * hd],
                &sn[p * hd..(p + 1) * hd],
            );
            for head in 0..h {
                let at = (head * t + j) * hd;
                let qx = &x[head * hd..(head + 1) * hd];
                rope_row(&mut q[at..at + hd], qx, c, s, |o, v| *o = v);
            }
            for g in 0..kv {
                let at = (g * room + past + j) * hd;
                let kx = &x[(h + g) * hd..(h + g + 1) * hd];
                rope_row(&mut ks[at..at + hd], kx, c, s, |o, v| *o = v);
                let vx = &x[(h + kv + g) * hd..(h + kv + g + 1) * hd];
                vs[at..at + hd].copy_from_slice(vx);
            }
        }
    };
    let (qn, kn) = (h * t * hd, kv * room * hd);
    // From a decoding step's 16 sequences on: the writes into the cache land on lines that are
    // not in the cache (a new position of every head), and two threads wait on half as many.
    if b >= 2 && b * t * w >= 1 << 13 {
        q.par_chunks_mut(qn)
            .zip(ks.par_chunks_mut(kn).zip(vs.par_chunks_mut(kn)))
            .enumerate()
            .for_each(|(r, parts)| sequence(r, parts));
    } else {
        q.chunks_mut(qn)
            .zip(ks.chunks_mut(kn).zip(vs.chunks_mut(kn)))
            .enumerate()
            .for_each(|(r, parts)| sequence(r, parts));
    }
    Some(tensor(q, Shape::new([b, h, t, hd])))
}

/// `each(i, out_i, scratch)` for the outputs of `len` values each in `outs` (one per attention
/// head), in order, or in chunks on both halves of the pool when `parallel` (each chunk with its
/// own scratch, made by `S::default`).
fn per_head<S: Default>(
    outs: &mut [Uninit],
    len: usize,
    parallel: bool,
    each: impl Fn(usize, &mut [Uninit], &mut S) + Sync,
) {
    if parallel {
        let per = (outs.len() / len).div_ceil(2 * rayon::current_num_threads());
        outs.par_chunks_mut(per * len)
            .enumerate()
            .for_each(|(g, chunk)| {
                let mut scratch = S::default();
                for (j, out) in chunk.chunks_mut(len).enumerate() {
                    each(g * per + j, out, &mut scratch);
                }
            });
    } else {
        let mut scratch = S::default();
        for (i, out) in outs.chunks_mut(len).enumerate() {
            each(i, out, &mut scratch);
        }
    }
}

/// A contiguous f32 block of `len` elements of `t` starting at element offset `at` from the
/// tensor's start: None past its storage.
fn block(t: &FlexTensor, at: usize, len: usize) -> Option<&[f32]> {
    let store = t.storage::<f32>();
    store.get(t.layout().start_offset() + at..t.layout().start_offset() + at + len)
}

/// Attention at a decoding step, per head in one pass: q [b, h, 1, hd] against the cached keys
/// k [b, kv, n, hd] (views of the cache buffers: each head's n rows contiguous), the softmax
/// with the bias row [b, 1, 1, n] at `scale`, and the weighted values v [b, kv, n, hd]; heads
/// h / kv at a time share a key-value head (grouped-query attention, read in place instead of
/// expanded). Returns the context [b, 1, h · hd]. The same kernels in the same order as the
/// three-step path (scores, `masked_softmax`, weighted values), so bit for bit its numbers;
/// one parallel region instead of three, and each head's scores stay in the level-1 cache.
/// None where the layouts do not fit (the caller then takes the three steps).
pub(crate) fn decode_attention(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    bias: &FlexTensor,
    scale: f32,
) -> Option<FlexTensor> {
    let (qs, ks, vs, bs) = (q.shape(), k.shape(), v.shape(), bias.shape());
    if [q, k, v, bias].iter().any(|t| t.dtype() != DType::F32)
        || qs.num_dims() != 4
        || ks.num_dims() != 4
        || vs != ks
    {
        return None;
    }
    let [b, h, t, hd] = qs.dims::<4>();
    let [_, kv, n, _] = ks.dims::<4>();
    let fits = t == 1
        && ks.dims::<4>() == [b, kv, n, hd]
        && bs.dims::<4>() == [b, 1, 1, n]
        && kv > 0
        && h % kv == 0
        && n > 0
        && hd > 0;
    if !fits {
        return None;
    }
    // Rows of each head contiguous; whatever the strides of the batch and head dimensions.
    let rows_ok = |t: &FlexTensor| {
        let st = t.layout().strides();
        st[3] == 1 && (n == 1 || st[2] == hd as isize) && st[0] >= 0 && st[1] >= 0
    };
    if !rows_ok(k) || !rows_ok(v) {
        return None;
    }
    let (qv, bv) = (values(q)?, values(bias)?);
    let (qx, bx) = (slice(&qv), slice(&bv));
    // Where head (r, g) of a [b, kv, n, hd] view starts, from the view's start.
    fn head_at(t: &FlexTensor, r: usize, g: usize) -> usize {
        let st = t.layout().strides();
        r * st[0] as usize + g * st[1] as usize
    }
    let head_block = |t, r, g| block(t, head_at(t, r, g), n * hd);
    // Every head's blocks exist (checked once, so the loop below cannot fail half-way).
    for r in 0..b {
        for g in 0..kv {
            head_block(k, r, g)?;
            head_block(v, r, g)?;
        }
    }
    let group = h / kv;
    let heads = b * h;
    let mut out: Vec<f32> = Vec::with_capacity(heads * hd);
    type Scratch = (Vec<Uninit>, Vec<Uninit>);
    let each = |i: usize, ctx: &mut [Uninit], (scores, weights): &mut Scratch| {
        let (r, g) = (i / h, i % h / group);
        let kb = head_block(k, r, g).expect("checked above");
        let vb = head_block(v, r, g).expect("checked above");
        // The next head's blocks, for the kernels to prefetch as they finish this one (any
        // address: a prefetch never faults).
        let (r1, g1) = ((i + 1) / h, (i + 1) % h / group);
        let next = |t: &FlexTensor| {
            t.storage::<f32>()
                .as_ptr()
                .wrapping_add(t.layout().start_offset() + head_at(t, r1, g1))
        };
        scores.resize(n, Uninit::uninit());
        weights.resize(n, Uninit::uninit());
        rows_dot_cols(scores, &qx[i * hd..(i + 1) * hd], kb, hd, next(k));
        // SAFETY: rows_dot_cols wrote all n scores; f32 has no invalid values.
        let sc = unsafe { &*(scores.as_slice() as *const [Uninit] as *const [f32]) };
        softmax_row(weights, sc, &bx[r * n..(r + 1) * n], scale);
        // SAFETY: softmax_row wrote all n weights.
        let w = unsafe { &*(weights.as_slice() as *const [Uninit] as *const [f32]) };
        rows_times_b(ctx, w, vb, n, next(v));
    };
    let outs = &mut out.spare_capacity_mut()[..heads * hd];
    per_head(outs, hd, heads * n * hd * 2 >= FEW_ROWS_PARALLEL, each);
    // SAFETY: every head wrote its hd context values.
    unsafe { out.set_len(heads * hd) };
    Some(tensor(out, Shape::new([b, 1, h * hd])))
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
            let ss = sum_squares(&xs[r * d..(r + 1) * d]);
            *out = 1.0 / (ss / d as f32 + eps).sqrt();
        }
        // SAFETY: each row is written whole.
        let [y] = unsafe {
            written(rows * d, |[y]| {
                for_rows(y, d, |r, out| {
                    let row = &xs[r * d..(r + 1) * d];
                    let k = rstd[r];
                    for ((o, &v), &g) in out.iter_mut().zip(row).zip(ws) {
                        o.write(v * k * g);
                    }
                })
            })
        };
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
        // SAFETY: each row is written whole.
        let [gx] = unsafe {
            written(rows * d, |[gx]| {
                for_rows(gx, d, |r, out| {
                    let (xr, gr, k) = (&xs[r * d..(r + 1) * d], &gs[r * d..(r + 1) * d], rs[r]);
                    // x̂ · mean(g·w · x̂) = x · k · (k / d · Σ g·w·x)
                    let mut scratch = vec![0f32; d];
                    let dot = dot3(&mut scratch, gr, ws, xr);
                    let c = dot * k / d as f32;
                    for (((o, &x), &g), &w) in out.iter_mut().zip(xr).zip(gr).zip(ws) {
                        o.write(k * (g * w - x * k * c));
                    }
                })
            })
        };
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

    fn swiglu_joined(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let Some(xv) = values(&x) else {
            return generic::swiglu_joined::<Self>(x);
        };
        let mut shape = x.shape();
        let last = shape.num_dims() - 1;
        let i = shape[last] / 2;
        shape[last] = i;
        let xs = slice(&xv);
        // SAFETY: swiglu_row writes its whole row.
        let [y] = unsafe {
            written(xs.len() / 2, |[y]| {
                for_rows_from(y, i, 1 << 13, |r, out| {
                    let row = &xs[2 * r * i..2 * (r + 1) * i];
                    swiglu_row(out, &row[..i], &row[i..]);
                })
            })
        };
        tensor(y, shape)
    }

    fn swiglu_joined_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let (Some(xv), Some(dv)) = (values(&x), values(&grad)) else {
            return generic::swiglu_joined_backward::<Self>(x, grad);
        };
        let shape = x.shape();
        let i = shape[shape.num_dims() - 1] / 2;
        let (xs, ds) = (slice(&xv), slice(&dv));
        // SAFETY: swiglu_backward_row writes both halves of each row whole.
        let [gx] = unsafe {
            written(xs.len(), |[gx]| {
                for_rows(gx, 2 * i, |r, out| {
                    let row = &xs[2 * r * i..2 * (r + 1) * i];
                    let (og, ou) = out.split_at_mut(i);
                    swiglu_backward_row(og, ou, &row[..i], &row[i..], &ds[r * i..(r + 1) * i]);
                })
            })
        };
        tensor(gx, shape)
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
        // SAFETY: softmax_row writes its whole row.
        let [p] = unsafe {
            written(ss.len(), |[p]| {
                for_rows(p, k, |r, out| {
                    // row r = ((b · h) + head) · t + i; its bias row is b · t + i
                    let (b, i) = (r / (h * t), r % t);
                    let (sr, br) = (
                        &ss[r * k..(r + 1) * k],
                        &bs[(b * t + i) * k..(b * t + i + 1) * k],
                    );
                    softmax_row(out, sr, br, scale);
                })
            })
        };
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
        // SAFETY: softmax_backward_row writes its whole row.
        let [out] = unsafe {
            written(ps.len(), |[out]| {
                for_rows(out, k, |r, o| {
                    let (pr, gr) = (&ps[r * k..(r + 1) * k], &gs[r * k..(r + 1) * k]);
                    softmax_backward_row(o, pr, gr, scale);
                })
            })
        };
        tensor(out, shape)
    }

    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let (ls, rs) = (lhs.shape(), rhs.shape());
        let nd = ls.num_dims();
        if lhs.dtype() == DType::F32 && rhs.dtype() == DType::BF16 {
            // A frozen weight kept in bf16: its packed copy when a generation made one, else
            // the product of its exact f32 widening (the same numbers as an f32 weight of the
            // same values).
            if nd == 2 && rs.num_dims() == 2 {
                let in_bf16 =
                    crate::fused::matmul_precision() == crate::fused::MatmulPrecision::Bf16;
                let (m, k, n) = (ls[0], ls[1], rs[1]);
                let st = rhs.layout().strides();
                let key = amx::View {
                    ptr: rhs.storage::<burn::tensor::bf16>()[rhs.layout().start_offset()..]
                        .as_ptr()
                        .cast(),
                    rs: st[0],
                    cs: st[1],
                };
                if (in_bf16 || m < 32)
                    && let Some(packed) = kept::find(&key, k, n, in_bf16)
                {
                    let lhs = if lhs.layout().strides()[1] == 1 {
                        lhs
                    } else {
                        lhs.to_contiguous()
                    };
                    let l = &lhs.storage::<f32>()[lhs.layout().start_offset()..];
                    let a = amx::View {
                        ptr: l.as_ptr(),
                        rs: lhs.layout().strides()[0],
                        cs: lhs.layout().strides()[1],
                    };
                    let mut out: Vec<f32> = Vec::with_capacity(m * n);
                    // SAFETY: `a` is burn's layout of lhs (m x k, alive for the call); the
                    // packed products write all m x n elements of `out`'s capacity.
                    unsafe {
                        match &*packed {
                            kept::PackedWeight::Bf16(b) => {
                                amx::gemm_packed(m, out.as_mut_ptr(), a, b, true)
                            }
                            kept::PackedWeight::F32(b) => {
                                skinny::gemm_packed(m, out.as_mut_ptr(), a, b, true)
                            }
                        }
                        out.set_len(m * n);
                    }
                    return tensor(out, Shape::new([m, n]));
                }
                // A decoding step's few rows (the weights not packed): the skinny kernel reads
                // the bf16 weight where it lies, widening each value as it loads it.
                if !crate::fused::bf16_product(m, n, k) && skinny::usable(m, n, k, &key) {
                    let l = &lhs.storage::<f32>()[lhs.layout().start_offset()..];
                    let lst = lhs.layout().strides();
                    let a = amx::View {
                        ptr: l.as_ptr(),
                        rs: lst[0],
                        cs: lst[1],
                    };
                    let mut out: Vec<f32> = Vec::with_capacity(m * n);
                    // SAFETY: `a` and `key` are burn's layouts of lhs (m x k) and of rhs's bf16
                    // values (k x n), alive for the call; the kernel writes all m x n elements.
                    unsafe {
                        skinny::gemm_bf16(m, n, k, out.as_mut_ptr(), a, key, true);
                        out.set_len(m * n);
                    }
                    return tensor(out, Shape::new([m, n]));
                }
            }
            return Self::matmul(lhs, widen(&rhs));
        }
        if lhs.dtype() != DType::F32
            || rhs.dtype() != DType::F32
            || rs.num_dims() != nd
            || ls[..nd - 2] != rs[..nd - 2]
        {
            return <Self as burn::backend::ops::FloatTensorOps<Self>>::float_matmul(lhs, rhs);
        }
        let (m, k, n) = (ls[nd - 2], ls[nd - 1], rs[nd - 1]);
        assert_eq!(
            rs[nd - 2],
            k,
            "matmul: inner dimensions {k} and {}",
            rs[nd - 2]
        );
        let batch_dims = &ls[..nd - 2];
        let batch: usize = batch_dims.iter().product();
        let (lst, rst) = (lhs.layout().strides(), rhs.layout().strides());
        // Element offset of batch element `i` in an operand with strides `st`.
        let offset = |i: usize, st: &[isize]| -> isize {
            let mut rem = i;
            let mut off = 0isize;
            for d in (0..nd - 2).rev() {
                off += (rem % batch_dims[d]) as isize * st[d];
                rem /= batch_dims[d];
            }
            off
        };
        let l = &lhs.storage::<f32>()[lhs.layout().start_offset()..];
        let r = &rhs.storage::<f32>()[rhs.layout().start_offset()..];
        let mut out: Vec<f32> = Vec::with_capacity(batch * m * n);
        // A weight packed for this generation ([`keep`]): bf16 whatever the rows, so a decoding
        // step reads the weights at half the bytes, and nothing is packed per product.
        // In f32, a weight packed in f32 panels serves the products of fewer than 32 rows.
        let in_bf16 = crate::fused::matmul_precision() == crate::fused::MatmulPrecision::Bf16;
        // B of a single product (a weight times the rows of a step).
        let weight = amx::View {
            ptr: r.as_ptr(),
            rs: rst[nd - 2],
            cs: rst[nd - 1],
        };
        let packed = if batch == 1 && (in_bf16 || m < 32) {
            kept::find(&weight, k, n, in_bf16)
        } else {
            None
        };
        let bf16 = packed.is_some() && in_bf16 || crate::fused::bf16_product(m, n, k);
        // A few rows times a weight matrix (a decoding step): the skinny kernel.
        let skinny = !bf16 && packed.is_none() && batch == 1 && skinny::usable(m, n, k, &weight);
        let product = |i: usize, dst: *mut f32, parallelism: gemm::Parallelism| {
            // SAFETY: the operands' offsets, shapes and strides describe views inside their
            // buffers (burn's layout); gemm with read_dst = false, amx::gemm and skinny::gemm
            // write all m x n elements of `dst`, a distinct part of `out`'s allocation for each i.
            unsafe {
                let view = |p: &[f32], st: &[isize]| amx::View {
                    ptr: p.as_ptr().offset(offset(i, st)),
                    rs: st[nd - 2],
                    cs: st[nd - 1],
                };
                if let Some(b) = &packed {
                    let threads = !matches!(parallelism, gemm::Parallelism::None);
                    match &**b {
                        kept::PackedWeight::Bf16(b) => {
                            amx::gemm_packed(m, dst, view(l, lst), b, threads)
                        }
                        kept::PackedWeight::F32(b) => {
                            skinny::gemm_packed(m, dst, view(l, lst), b, threads)
                        }
                    }
                    return;
                }
                if bf16 || skinny {
                    let threads = !matches!(parallelism, gemm::Parallelism::None);
                    let run = if bf16 { amx::gemm } else { skinny::gemm };
                    run(m, n, k, dst, view(l, lst), view(r, rst), threads);
                    return;
                }
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst,
                    1,
                    n as isize,
                    false,
                    l.as_ptr().offset(offset(i, lst)),
                    lst[nd - 1],
                    lst[nd - 2],
                    r.as_ptr().offset(offset(i, rst)),
                    rst[nd - 1],
                    rst[nd - 2],
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        };
        let work = m * n * k;
        // Attention at a decoding step: one query row per head against that head's keys, then
        // its values; a general product per head costs more to set up than to compute.
        let compact_a = lst[nd - 1] == 1 && (m == 1 || lst[nd - 2] == k as isize);
        let b_rows = rst[nd - 1] == 1 && (k == 1 || rst[nd - 2] == n as isize);
        let b_cols = rst[nd - 2] == 1 && (n == 1 || rst[nd - 1] == k as isize);
        if batch > 1 && m <= FEW_ROWS && m * n * k > 0 && compact_a && (b_rows || b_cols) && !bf16 {
            let each = |i: usize, c: &mut [Uninit], _: &mut ()| {
                let (oa, ob) = (offset(i, lst) as usize, offset(i, rst) as usize);
                let (a, b) = (&l[oa..oa + m * k], &r[ob..ob + k * n]);
                // The next head's operand, for the kernels to prefetch as they finish this one.
                let next = r.as_ptr().wrapping_offset(offset(i + 1, rst));
                if b_rows {
                    rows_times_b(c, a, b, k, next);
                } else {
                    rows_dot_cols(c, a, b, k, next);
                }
            };
            let outs = &mut out.spare_capacity_mut()[..batch * m * n];
            per_head(outs, m * n, batch * work >= FEW_ROWS_PARALLEL, each);
        } else if batch > 1 && batch * work >= 128 * 128 * 128 && m * n > 0 {
            // Small products, many of them (attention heads): one thread per product.
            out.spare_capacity_mut()[..batch * m * n]
                .par_chunks_mut(m * n)
                .enumerate()
                .for_each(|(i, chunk)| {
                    product(i, chunk.as_mut_ptr().cast(), gemm::Parallelism::None)
                });
        } else {
            let parallelism = if work >= 192 * 192 * 192 || skinny || packed.is_some() {
                gemm::Parallelism::Rayon(0)
            } else {
                gemm::Parallelism::None
            };
            for i in 0..batch {
                // SAFETY: within the capacity reserved above.
                product(i, unsafe { out.as_mut_ptr().add(i * m * n) }, parallelism);
            }
        }
        // SAFETY: every element was written by one of the products above.
        unsafe { out.set_len(batch * m * n) };
        let mut shape = ls.clone();
        shape[nd - 1] = n;
        tensor(out, shape)
    }

    fn token_logprobs(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        let (Some(lv), Some(ts)) = (values(&logits), indices(&targets)) else {
            return generic::token_logprobs::<Self>(logits, targets);
        };
        let shape = logits.shape();
        let (b, t, v) = (shape[0], shape[1], shape[2]);
        let ls = slice(&lv);
        let rows = |r: usize| {
            let row = &ls[r * v..(r + 1) * v];
            let lse = logsumexp_row(row);
            (row[ts[r]] - lse, lse)
        };
        let (lp, lse): (Vec<f32>, Vec<f32>) = if b * t * v >= PARALLEL_MIN {
            (0..b * t).into_par_iter().map(rows).unzip()
        } else {
            (0..b * t).map(rows).unzip()
        };
        [
            tensor(lp, Shape::new([b, t])),
            tensor(lse, Shape::new([b, t])),
        ]
    }

    fn token_logprobs_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (Some(lv), Some(ts), Some(ev), Some(gv)) = (
            values(&logits),
            indices(&targets),
            values(&lse),
            values(&grad),
        ) else {
            return generic::token_logprobs_backward::<Self>(logits, targets, lse, grad);
        };
        let shape = logits.shape();
        let v = shape[2];
        let (ls, es, gs) = (slice(&lv), slice(&ev), slice(&gv));
        // SAFETY: token_grad_row writes its whole row.
        let [out] = unsafe {
            written(ls.len(), |[out]| {
                for_rows(out, v, |r, o| {
                    token_grad_row(o, &ls[r * v..(r + 1) * v], es[r], gs[r], ts[r]);
                })
            })
        };
        tensor(out, shape)
    }

    fn scatter_rows(
        x: FloatTensor<Self>,
        idx: &crate::fused::RowIndex<Self>,
        rows: usize,
    ) -> FloatTensor<Self> {
        let Some(xv) = values(&x) else {
            return generic::scatter_rows::<Self>(x, idx, rows);
        };
        let d = x.shape()[1];
        let xs = slice(&xv);
        // The rows of x that go to each output row, in their order (counting sort):
        // starts[r]..starts[r + 1] of `order`.
        let mut starts = vec![0usize; rows + 1];
        for &r in idx.host.iter() {
            starts[r + 1] += 1;
        }
        for r in 0..rows {
            starts[r + 1] += starts[r];
        }
        let mut next = starts.clone();
        let mut order = vec![0usize; idx.host.len()];
        for (j, &r) in idx.host.iter().enumerate() {
            order[next[r]] = j;
            next[r] += 1;
        }
        // SAFETY: every row is written whole (zeros, or its first row of x, then the others added
        // in order).
        let [y] = unsafe {
            written(rows * d, |[y]| {
                for_rows(y, d, |r, out| {
                    let (first, rest) = match &order[starts[r]..starts[r + 1]] {
                        [] => {
                            out.iter_mut().for_each(|o| {
                                o.write(0.0);
                            });
                            return;
                        }
                        [first, rest @ ..] => (*first, rest),
                    };
                    // 0 + x as the zeroed start plus the first row would give (−0 becomes +0).
                    for (o, &v) in out.iter_mut().zip(&xs[first * d..(first + 1) * d]) {
                        o.write(0.0 + v);
                    }
                    // SAFETY (the enclosing block's): every element was just written.
                    let out = &mut *(out as *mut [Uninit] as *mut [f32]);
                    for &j in rest {
                        for (o, &v) in out.iter_mut().zip(&xs[j * d..(j + 1) * d]) {
                            *o += v;
                        }
                    }
                })
            })
        };
        tensor(y, Shape::new([rows, d]))
    }

    fn gather_rows(x: FloatTensor<Self>, idx: &crate::fused::RowIndex<Self>) -> FloatTensor<Self> {
        let Some(xv) = values(&x) else {
            return <Self as burn::backend::ops::FloatTensorOps<Self>>::float_select(
                x,
                0,
                idx.tensor.clone(),
            );
        };
        let c = x.shape()[1];
        let xs = slice(&xv);
        let n = idx.host.len();
        // SAFETY: every row is copied whole.
        let [y] = unsafe {
            written(n * c, |[y]| {
                for_rows(y, c, |j, out| {
                    let r = idx.host[j];
                    for (o, &v) in out.iter_mut().zip(&xs[r * c..(r + 1) * c]) {
                        o.write(v);
                    }
                })
            })
        };
        tensor(y, Shape::new([n, c]))
    }

    fn sum_squares(x: &FloatTensor<Self>) -> Option<f64> {
        let xv = values(x)?;
        let xs = slice(&xv);
        // f32 sums over runs of PARALLEL_MIN elements (several lanes each), then the runs' sums
        // in f64 in their order: no dependence on how the threads split the work.
        let runs: Vec<f64> = if xs.len() >= 2 * PARALLEL_MIN {
            xs.par_chunks(PARALLEL_MIN)
                .map(|c| sum_squares(c) as f64)
                .collect()
        } else {
            xs.chunks(PARALLEL_MIN)
                .map(|c| sum_squares(c) as f64)
                .collect()
        };
        Some(runs.iter().sum())
    }

    fn scale(mut x: FloatTensor<Self>, c: f32) -> FloatTensor<Self> {
        let Some(xs) = whole_mut(&mut x) else {
            return generic::scale::<Self>(x, c);
        };
        for_rows(xs, PARALLEL_MIN, |_, run| scale_run(run, c));
        x
    }

    fn adamw(
        mut param: FloatTensor<Self>,
        mut grad: FloatTensor<Self>,
        moments: Option<[FloatTensor<Self>; 2]>,
        step: &crate::fused::AdamWStep,
    ) -> Result<[FloatTensor<Self>; 3], crate::fused::AdamWInputs<Self>> {
        let n = param.shape().num_elements();
        let fits = |t: &FlexTensor| t.dtype() == DType::F32 && t.shape().num_elements() == n;
        if !fits(&param)
            || !fits(&grad)
            || moments.as_ref().is_some_and(|[m, v]| !fits(m) || !fits(v))
        {
            return Err((param, grad, moments));
        }
        // The moments are written over where this owns them (the optimizer hands them over by
        // value), and the new parameter over the old one, or else over the gradient, which is
        // used up here: no fresh buffers to fault in, fill and free. (The parameter can still be
        // shared, as on a stage's first step with moments.)
        let moments = match moments {
            Some([mut m, mut v]) => {
                if let (Some(ms), Some(vs)) = (whole_mut(&mut m), whole_mut(&mut v)) {
                    let over_param = whole_mut(&mut param).is_some();
                    let (w, r) = if over_param {
                        (whole_mut(&mut param), values(&grad))
                    } else {
                        (whole_mut(&mut grad), values(&param))
                    };
                    if let (Some(w), Some(r)) = (w, r) {
                        let (r, chunk) = (slice(&r), PARALLEL_MIN);
                        if n >= chunk {
                            w.par_chunks_mut(chunk)
                                .zip(ms.par_chunks_mut(chunk))
                                .zip(vs.par_chunks_mut(chunk))
                                .zip(r.par_chunks(chunk))
                                .for_each(|(((w, m), v), r)| {
                                    adamw_over([w, m, v], r, over_param, step)
                                });
                        } else {
                            adamw_over([w, ms, vs], r, over_param, step);
                        }
                        return Ok([if over_param { param } else { grad }, m, v]);
                    }
                }
                Some([m, v])
            }
            None => None,
        };
        let g = values(&grad).expect("an f32 tensor");
        let gs = slice(&g);
        let p = values(&param).expect("an f32 tensor");
        let mv = moments.map(|[m, v]| [m, v].map(|t| values(&t).expect("an f32 tensor")));
        let ps = slice(&p);
        let (ms, vs) = match &mv {
            Some([m, v]) => (Some(slice(m)), Some(slice(v))),
            None => (None, None),
        };
        // SAFETY: adamw_first / adamw_next write every element of their three runs, and the
        // runs cover the outputs.
        let out = unsafe {
            written(n, |[po, mo, vo]| {
                type Part<'a> = &'a mut [Uninit];
                let chunk = PARALLEL_MIN;
                let work = |(c, ((po, mo), vo)): (usize, ((Part, Part), Part))| {
                    let r = c * chunk..c * chunk + po.len();
                    match (ms, vs) {
                        (Some(m), Some(v)) => adamw_next(
                            [po, mo, vo],
                            [&ps[r.clone()], &gs[r.clone()], &m[r.clone()], &v[r]],
                            step,
                        ),
                        _ => adamw_first([po, mo, vo], [&ps[r.clone()], &gs[r]], step),
                    }
                };
                if n >= PARALLEL_MIN {
                    po.par_chunks_mut(chunk)
                        .zip(mo.par_chunks_mut(chunk))
                        .zip(vo.par_chunks_mut(chunk))
                        .enumerate()
                        .for_each(work);
                } else {
                    work((0, ((po, mo), vo)));
                }
            })
        };
        let shape = p.shape();
        Ok(out.map(|o| tensor(o, shape.clone())))
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
        let (xs, cs, sn) = (slice(&xv), slice(&cv), slice(&sv));
        assert_eq!(hd % 2, 0, "rope: head dimension {hd} is odd");
        // SAFETY: each row's two halves (hd even) are written whole.
        let [y] = unsafe {
            written(xs.len(), |[y]| {
                for_rows(y, hd, |r, out| {
                    // row r = (b · t + position) · h + head; the tables have one row per
                    // b · t + position
                    let p = r / h;
                    let (xr, cr, sr) = (
                        &xs[r * hd..(r + 1) * hd],
                        &cs[p * hd..(p + 1) * hd],
                        &sn[p * hd..(p + 1) * hd],
                    );
                    rope_row(out, xr, cr, sr, |o, v| {
                        o.write(v);
                    });
                })
            })
        };
        tensor(y, shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AdamW with moments writes over the parameter's and the moments' memory when it owns
    /// them (over the gradient's when the parameter is shared), and gives the same values as
    /// when shared tensors make it write fresh buffers.
    #[test]
    fn adamw_writes_in_place_when_it_owns_the_memory() {
        let step = crate::fused::AdamWStep {
            grad_scale: 1.0,
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            decay: 0.999,
            c1: 0.19,
            c2: 0.002,
        };
        let n = PARALLEL_MIN + 77; // the threaded path, with a short last chunk
        let make = |k: f32| {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0 * k)
                .collect();
            tensor(v, Shape::new([n]))
        };
        let second_moment: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 1e-4).collect();
        let addr = |t: &FlexTensor| t.as_slice::<f32>().unwrap().as_ptr();
        let (p, g, m, v) = (
            make(1.0),
            make(0.1),
            make(0.01),
            tensor(second_moment, Shape::new([n])),
        );
        let kept = p.clone(); // shares p's memory: this call cannot write over it
        let Ok(copied) = Flex::adamw(kept.clone(), g.clone(), Some([m.clone(), v.clone()]), &step)
        else {
            panic!("fused")
        };
        assert_ne!(addr(&copied[0]), addr(&kept));
        // The parameter shared, the rest owned: the new parameter is written over the gradient.
        let own = |t: &FlexTensor| tensor(t.as_slice::<f32>().unwrap().to_vec(), Shape::new([n]));
        let (g2, m2, v2) = (own(&g), own(&m), own(&v));
        let (ga, ma, va) = (addr(&g2), addr(&m2), addr(&v2));
        let Ok(over_grad) = Flex::adamw(kept.clone(), g2, Some([m2, v2]), &step) else {
            panic!("fused")
        };
        assert_eq!([ga, ma, va], over_grad.each_ref().map(addr));
        for (a, b) in copied.iter().zip(&over_grad) {
            assert_eq!(a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
        }
        drop(kept);
        let (pa, ma, va) = (addr(&p), addr(&m), addr(&v));
        let Ok(in_place) = Flex::adamw(p, g, Some([m, v]), &step) else {
            panic!("fused")
        };
        assert_eq!([pa, ma, va], in_place.each_ref().map(addr));
        for (a, b) in copied.iter().zip(&in_place) {
            assert_eq!(a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
        }
    }

    /// The decoding step's attention products on AVX-512 give the numbers of the kernels they
    /// replaced bit for bit: the scores each key's `dot_avx512`, the weighted values the portable
    /// loop's (ragged key counts and depths included).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn attention_decode_kernels_match_their_references_bit_for_bit() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let vals = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i * 2654435761 + seed * 97) % 2001) as f32 - 1000.0) / 777.0)
                .collect()
        };
        let read = |c: Vec<Uninit>| -> Vec<f32> {
            // SAFETY: the kernels wrote every element.
            c.into_iter().map(|x| unsafe { x.assume_init() }).collect()
        };
        for (m, n, k) in [
            (1, 1, 64),
            (1, 17, 64),
            (2, 33, 16),
            (1, 64, 40),
            (3, 100, 7),
            (1, 5, 130),
        ] {
            let (a, b) = (vals(m * k, 1), vals(n * k, 2));
            let mut c = vec![Uninit::uninit(); m * n];
            rows_dot_cols(&mut c, &a, &b, k, std::ptr::null());
            let got = read(c);
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: AVX-512F checked above.
                    let want =
                        unsafe { dot_avx512(&a[i * k..(i + 1) * k], &b[j * k..(j + 1) * k]) };
                    assert_eq!(
                        got[i * n + j].to_bits(),
                        want.to_bits(),
                        "scores {m}x{n}x{k} ({i}, {j})"
                    );
                }
            }
            // Weights (m × n) times values (n × k).
            let (w, v) = (vals(m * n, 3), vals(n * k, 4));
            let (mut c, mut want) = (vec![Uninit::uninit(); m * k], vec![Uninit::uninit(); m * k]);
            rows_times_b(&mut c, &w, &v, n, std::ptr::null());
            rows_times_b_portable(&mut want, &w, &v, n);
            let (got, want) = (read(c), read(want));
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "values {m}x{k}x{n}"
            );
        }
    }

    /// The vectorised exp against libm over f32's normal range of results (up to ln(f32::MAX),
    /// where a single 2^n scale would overflow from x ≈ 88.38), and its limits.
    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.72 * i as f32 / 200_000.0;
            let (ours, libm) = (exp(x), x.exp());
            worst = worst.max(((ours - libm) / libm).abs());
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp(-1e9), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        for x in [88.5f32, 88.7, 88.72] {
            let (ours, libm) = (exp(x), x.exp());
            assert!(
                ours.is_finite() && ((ours - libm) / libm).abs() < 5e-7,
                "{x}: {ours}"
            );
        }
        assert_eq!(exp(88.75), f32::INFINITY);
        assert_eq!(exp(1e9), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    /// The 16-lane sums against plain sums, on lengths with and without a remainder.
    #[test]
    fn lane_sums_match_sequential_sums() {
        for n in [0, 5, 16, 37, 4096 + 3] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 2.0).collect();
            let plain: f32 = a.iter().map(|x| x * x).sum();
            assert!((sum_map(&a, |x| x * x) - plain).abs() <= 1e-4 * plain.abs().max(1.0));
            let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((sum_map2(&a, &b, |x, y| x * y) - dot).abs() <= 1e-4 * dot.abs().max(1.0));
            if n > 0 {
                assert_eq!(max_of(&a), a.iter().cloned().fold(f32::MIN, f32::max));
            }
        }
    }
}
