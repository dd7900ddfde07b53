//! f32 products with few rows, C (m × n) = A (m × k) · B (k × n) for m < 32: the products of a
//! decoding step, where each weight matrix multiplies one new position per sequence.
//!
//! The general gemm packs both operands into panels for blocks of many rows; with 16 rows its
//! micro-kernel idles on the packing and its threads do not start below ~7 M multiply-adds,
//! so a decoding step ran at a tenth of the machine's rate. Here A is packed once per call,
//! transposed (16 rows side by side per depth step, zero-padded), and B is read where it lies,
//! each element once, which is what a decoding step is bound by. Two layouts of B are handled:
//! - rows contiguous (a `Linear` weight, [in, out]): the 16 accumulators are 16 rows of C, each
//!   16 columns wide, and every depth step loads one 16-wide row segment of B and broadcasts the
//!   16 values of A;
//! - columns contiguous (the transposed token embedding of a tied LM head): the accumulators are
//!   8 columns of C, each 16 rows tall, and every depth step broadcasts one value from each of 8
//!   columns of B against the 16 values of A (two interleaved sets of accumulators, even and odd
//!   depths, keep the multiply-add units busy).
//!
//! Each element of C is one f32 sum over the depth in a fixed order, so results do not depend on
//! the number of threads. AVX-512 only; [`usable`] says when the caller should come here.

use super::amx::View;

/// Rows of A handled side by side: one AVX-512 register of f32.
const LANES: usize = 16;

/// Multiply-adds below which one thread does the whole product (waking a second costs more).
const SPLIT: usize = 1 << 22;

/// Whether [`gemm`] takes this product: fewer than 32 rows, one of B's strides 1, and a CPU with
/// AVX-512.
pub fn usable(m: usize, n: usize, k: usize, b: &View) -> bool {
    (1..32).contains(&m) && n > 0 && k > 0 && (b.cs == 1 || b.rs == 1) && avx512()
}

fn avx512() -> bool {
    // std caches the CPU's features: these are atomic loads. (BW and VL: the masked 16-bit
    // loads of a bf16 B; every AVX-512 CPU but the Xeon Phi has them.)
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

thread_local! {
    /// This thread's packing buffer, reused across calls.
    static SPARE: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A (m × k) packed transposed in blocks of 16 rows, zero-padded: (i, kk) at
/// (i / 16) · k · 16 + kk · 16 + i % 16, in this thread's reused buffer (hand it back to
/// `SPARE` after the product). Every element is written: rows of A (the common case) go
/// through 16 × 16 register transposes, other layouts element by element.
///
/// # Safety
/// `a` describes an m × k matrix inside a live allocation.
unsafe fn pack_a(m: usize, k: usize, a: View) -> Vec<f32> {
    let mut at = SPARE.with(|s| s.take());
    let len = m.div_ceil(LANES) * k * LANES;
    if at.len() < len {
        at.resize(len, 0.0);
    }
    #[cfg(target_arch = "x86_64")]
    if a.cs == 1 && avx512() {
        // SAFETY: AVX-512F checked; the caller's contract; `at` holds `len` values.
        unsafe { pack_a_rows(m, k, a, &mut at[..len]) };
        return at;
    }
    for blk in 0..m.div_ceil(LANES) {
        for lane in 0..LANES {
            let i = blk * LANES + lane;
            let dst = &mut at[blk * k * LANES + lane..];
            for kk in 0..k {
                // SAFETY: (i, kk) inside A for i < m.
                dst[kk * LANES] = if i < m {
                    unsafe { element(&a, i, kk) }
                } else {
                    0.0
                };
            }
        }
    }
    at
}

/// [`pack_a`] for A with contiguous rows: 16 rows by 16 depths loaded (masked past m and k),
/// transposed in registers, stored as 16 depth steps of 16 rows.
///
/// # Safety
/// AVX-512F; `a` describes an m × k matrix with cs = 1 inside a live allocation; `at` holds
/// m.div_ceil(16) · k · 16 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_a_rows(m: usize, k: usize, a: View, at: &mut [f32]) {
    debug_assert_eq!(at.len(), m.div_ceil(LANES) * k * LANES);
    let dst = at.as_mut_ptr();
    for blk in 0..m.div_ceil(LANES) {
        let rows = (m - blk * LANES).min(LANES);
        let mut kk = 0;
        while kk < k {
            let depth = (k - kk).min(LANES);
            let mask = lanes(depth);
            // SAFETY: rows blk · 16 .. + rows of A, depths kk .. kk + depth (the mask); the
            // block's k · 16 values in `at` hold depth steps kk .. kk + depth.
            unsafe {
                let r: [__m512; LANES] = std::array::from_fn(|i| {
                    if i < rows {
                        let row = a.ptr.offset((blk * LANES + i) as isize * a.rs).add(kk);
                        _mm512_maskz_loadu_ps(mask, row)
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                let t = transpose16(r);
                let out = dst.add(blk * k * LANES + kk * LANES);
                for (d, v) in t.iter().enumerate().take(depth) {
                    _mm512_storeu_ps(out.add(d * LANES), *v);
                }
            }
            kk += depth;
        }
    }
}

/// The transpose of a 16 × 16 block held as 16 rows: element j of row i becomes element i of
/// row j. Pairs of rows interleaved, then pairs of pairs, then the 128-bit quarters regrouped.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512; LANES]) -> [__m512; LANES] {
    // t[2p], t[2p + 1]: rows 2p and 2p + 1 interleaved (low and high pairs of each quarter).
    let t: [__m512; LANES] = std::array::from_fn(|i| {
        let (x, y) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(x, y)
        } else {
            _mm512_unpackhi_ps(x, y)
        }
    });
    // u[4g + c]: in quarter q, column 4q + c of rows 4g .. 4g + 4.
    let u: [__m512; LANES] = std::array::from_fn(|i| {
        let (g, c) = (i / 4, i % 4);
        let (x, y) = (t[4 * g + c / 2], t[4 * g + 2 + c / 2]);
        if c % 2 == 0 {
            _mm512_shuffle_ps::<0x44>(x, y)
        } else {
            _mm512_shuffle_ps::<0xEE>(x, y)
        }
    });
    let mut out = [_mm512_setzero_ps(); LANES];
    for c in 0..4 {
        // Quarters 0 and 2 (even) and 1 and 3 (odd) of rows 0..8 and of rows 8..16.
        let (lo_even, lo_odd) = (
            _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]),
            _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]),
        );
        let (hi_even, hi_odd) = (
            _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]),
            _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]),
        );
        out[c] = _mm512_shuffle_f32x4::<0x88>(lo_even, hi_even);
        out[8 + c] = _mm512_shuffle_f32x4::<0xDD>(lo_even, hi_even);
        out[4 + c] = _mm512_shuffle_f32x4::<0x88>(lo_odd, hi_odd);
        out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(lo_odd, hi_odd);
    }
    out
}

/// One product as the kernels see it: shapes, A packed by [`gemm`], B, and C (row-major, n
/// columns); shared by the two halves of a split product.
#[derive(Clone, Copy)]
struct Product {
    m: usize,
    n: usize,
    k: usize,
    at: *const f32,
    /// B's elements: f32, or bf16 (`bf16`: `b.ptr` then points to u16 values, its strides in
    /// elements).
    b: View,
    bf16: bool,
    c: *mut f32,
}
// SAFETY: A's packed copy and B are only read; each half writes its own columns of C.
unsafe impl Send for Product {}
unsafe impl Sync for Product {}

/// C = A · B, C row-major with n columns, written whole. `threads`: whether a large enough
/// product may use a second rayon thread.
///
/// # Safety
/// [`usable`] returned true for these arguments; `a` and `b` describe m × k and k × n matrices
/// inside live allocations; `c` points to m · n writable f32s that nothing else reads or writes
/// during the call.
pub unsafe fn gemm(m: usize, n: usize, k: usize, c: *mut f32, a: View, b: View, threads: bool) {
    // SAFETY: the caller's contract.
    unsafe { gemm_of(m, n, k, c, a, b, false, threads) }
}

/// [`gemm`] with B in bf16: `b.ptr` points to its u16 values (strides in elements), each widened
/// to f32 exactly as it is loaded: the numbers of [`gemm`] on B's f32 values, reading half the
/// bytes (a decoding step on frozen weights kept in bf16).
///
/// # Safety
/// As [`gemm`], with `b` describing a k × n matrix of bf16 values.
pub unsafe fn gemm_bf16(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    a: View,
    b: View,
    threads: bool,
) {
    // SAFETY: the caller's contract.
    unsafe { gemm_of(m, n, k, c, a, b, true, threads) }
}

/// [`gemm`] for B's elements in f32 or bf16.
///
/// # Safety
/// As [`gemm`] / [`gemm_bf16`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_of(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    a: View,
    b: View,
    bf16: bool,
    threads: bool,
) {
    debug_assert!(usable(m, n, k, &b));
    // SAFETY: `a` describes an m × k matrix (the caller's contract).
    let at = unsafe { pack_a(m, k, a) };
    let p = Product {
        m,
        n,
        k,
        at: at.as_ptr(),
        b,
        bf16,
        c,
    };
    // Split between threads at vectors of C's columns (a 512-column product in halves of 256,
    // not 240 and 272), 8 columns for B's other layout.
    let width = if b.cs == 1 { LANES } else { 8 };
    let col_blocks = n.div_ceil(width);
    let run = move |from: usize, to: usize| {
        let (j0, j1) = (from * width, (to * width).min(n));
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract, and `usable` checked AVX-512 and B's layout.
        unsafe {
            match (p.b.cs == 1, p.bf16) {
                (true, false) => rows_of_b::<false>(p, j0, j1),
                (true, true) => rows_of_b::<true>(p, j0, j1),
                (false, false) => cols_of_b::<false>(p, j0, j1),
                (false, true) => cols_of_b::<true>(p, j0, j1),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("skinny products need AVX-512 ({:?}, {j0}..{j1})", p.c)
    };
    if threads && m * n * k >= SPLIT && col_blocks >= 2 {
        let half = col_blocks / 2;
        rayon::join(|| run(0, half), || run(half, col_blocks));
    } else {
        run(0, col_blocks);
    }
    SPARE.with(|s| s.set(at));
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// The mask of the first `w` lanes (all 16 for w ≥ 16).
#[cfg(target_arch = "x86_64")]
pub(super) fn lanes(w: usize) -> __mmask16 {
    if w >= LANES { !0 } else { (1u16 << w) - 1 }
}

/// The address of B's element `i` (an index in elements: f32, or bf16 when H), for a prefetch
/// (wrapping: it may lie past B, which a prefetch never faults on).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn b_addr<const H: bool>(b: &View, i: isize) -> *const i8 {
    if H {
        b.ptr.cast::<u16>().wrapping_offset(i).cast()
    } else {
        b.ptr.wrapping_offset(i).cast()
    }
}

/// B's elements i..i + 16 (those `mask` selects; zero elsewhere) in f32: bf16 values (H) widened
/// exactly (a bf16 is the upper half of an f32).
///
/// # Safety
/// The selected elements lie inside B.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn load_b<const H: bool>(b: &View, i: isize, mask: __mmask16) -> __m512 {
    // SAFETY: the caller's contract; masked-off lanes are not read.
    unsafe {
        if H {
            let h = _mm256_maskz_loadu_epi16(mask, b.ptr.cast::<u16>().offset(i).cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        } else {
            _mm512_maskz_loadu_ps(mask, b.ptr.offset(i))
        }
    }
}

/// B's element i in f32 (a bf16 value, H, widened exactly).
///
/// # Safety
/// Element i lies inside B.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn b_at<const H: bool>(b: &View, i: isize) -> f32 {
    // SAFETY: the caller's contract.
    unsafe {
        if H {
            f32::from_bits(u32::from(*b.ptr.cast::<u16>().offset(i)) << 16)
        } else {
            *b.ptr.offset(i)
        }
    }
}

/// Rows of B per sweep of [`rows_of_b`] (the accumulators are loaded and stored once per sweep).
const SWEEP: usize = 16;

/// Columns of C one register block of [`rows_of_b`] covers: three AVX-512 vectors.
const GROUP: usize = 3 * LANES;

/// Columns of C per pass of [`rows_of_b`] down all of B's rows: 16 rows of 480 columns of C
/// (30 KB) stay in the level-1 cache.
const CHUNK: usize = 10 * GROUP;

thread_local! {
    /// This thread's block of C for [`rows_of_b`], rows padded to the register block's.
    static CBUF: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Columns j0..j1 of C for B with contiguous rows (cs = 1). B is read row by row, `SWEEP` rows
/// at a time across all the columns (sequential streams that the prefetchers follow, where a
/// column panel would jump a row's length at every step), and the blocks of C are accumulated
/// in a padded buffer that stays in cache. A register block is R rows by 48 columns of C: each
/// depth step loads three vectors of B and R values of A for 3 · R multiply-adds (with one
/// vector of B per 16 rows, the loads outnumbered the multiply-adds and the kernel ran at half
/// the machine's rate).
///
/// # Safety
/// AVX-512F; `p` from [`gemm`], whose contract holds; j0..j1 inside 0..n.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn rows_of_b<const H: bool>(p: Product, j0: usize, j1: usize) {
    let mut j = j0;
    while j < j1 {
        let end = (j + CHUNK).min(j1);
        // SAFETY: the caller's contract, for columns j..end. R divides 16 and fits 3 · R
        // accumulators, 3 vectors of B and one of A in the 32 registers.
        unsafe {
            match p.m {
                1 => rows_of_b_chunk::<1, H>(p, j, end),
                2 => rows_of_b_chunk::<2, H>(p, j, end),
                3 | 4 => rows_of_b_chunk::<4, H>(p, j, end),
                _ => rows_of_b_chunk::<8, H>(p, j, end),
            }
        }
        j = end;
    }
}

/// [`rows_of_b`] for at most `CHUNK` columns, R rows of C per register block.
///
/// # Safety
/// As [`rows_of_b`]; R divides 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn rows_of_b_chunk<const R: usize, const H: bool>(p: Product, j0: usize, j1: usize) {
    let row_blocks = p.m.div_ceil(R);
    let groups = (j1 - j0).div_ceil(GROUP);
    let stride = groups * GROUP;
    // The first sweep starts from zero and the last stores into C: the buffer holds the sums
    // in between, whatever it held before is never read.
    let mut buf = CBUF.with(|s| s.take());
    if buf.len() < row_blocks * R * stride {
        buf.resize(row_blocks * R * stride, 0.0);
    }
    let cb = buf.as_mut_ptr();
    let mut k0 = 0;
    while k0 < p.k {
        let kb = (p.k - k0).min(SWEEP);
        for g in 0..groups {
            let j = j0 + g * GROUP;
            for rb in 0..row_blocks {
                let at = Block {
                    row0: rb * R,
                    j,
                    j1,
                    k0,
                    kb,
                    tile: cb.wrapping_add(rb * R * stride + g * GROUP),
                    stride,
                    prefetch: rb == 0,
                };
                // SAFETY: as `block` asks: the group's columns j..j1 (at most 48 of them), rows
                // k0..k0 + kb of B, a buffer tile of R rows of `stride` columns.
                unsafe {
                    // The last group of a range narrower than 48 columns takes fewer vectors
                    // (a thread's half of a 512-column product ends in one of 16 or 32).
                    match (j1 - j).div_ceil(LANES) {
                        1 => block::<R, 1, H>(p, at),
                        2 => block::<R, 2, H>(p, at),
                        _ => block::<R, 3, H>(p, at),
                    }
                }
            }
        }
        k0 += kb;
    }
    CBUF.with(|s| s.set(buf));
}

/// Where one register block of [`rows_of_b_chunk`] works: rows row0..row0 + R of C, columns
/// j.. (up to 16 · V of them, none past j1), depths k0..k0 + kb, and its place in the buffer.
#[derive(Clone, Copy)]
struct Block {
    row0: usize,
    j: usize,
    j1: usize,
    k0: usize,
    kb: usize,
    tile: *mut f32,
    stride: usize,
    prefetch: bool,
}

/// One register block: R rows by V vectors of C, summed over one sweep of depths, starting from
/// zero on the first sweep and stored into C on the last. Each depth step loads V vectors of B
/// and R values of A for R · V multiply-adds.
///
/// # Safety
/// AVX-512F; `p` from [`gemm`], whose contract holds; R divides 16; the block's columns are
/// inside 0..n and `tile` points to R rows of `stride` writable f32s, 16 · V columns each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn block<const R: usize, const V: usize, const H: bool>(p: Product, at: Block) {
    let Product {
        m,
        n,
        k,
        at: a,
        b,
        c,
        ..
    } = p;
    let Block {
        row0,
        j,
        j1,
        k0,
        kb,
        tile,
        stride,
        prefetch,
    } = at;
    let (first, last) = (k0 == 0, k0 + kb == k);
    let w = j1 - j;
    let mask: [__mmask16; V] = std::array::from_fn(|v| lanes(w.saturating_sub(v * LANES)));
    // SAFETY: rows k0..k0 + kb and columns j..j + 16 · V of B, where the masks cover those past
    // j1; A's packed block of 16 rows holds k · 16 values (zero past m) and R divides 16; the
    // tile holds R rows of `stride` columns.
    unsafe {
        let mut acc: [[__m512; V]; R] = std::array::from_fn(|i| {
            std::array::from_fn(|v| {
                if first {
                    _mm512_setzero_ps()
                } else {
                    _mm512_loadu_ps(tile.add(i * stride + v * LANES))
                }
            })
        });
        // B's element index (in f32 or bf16 elements) of row k0, column j.
        let mut bi = k0 as isize * b.rs + j as isize;
        let mut ap = a.add(((row0 / LANES) * k + k0) * LANES + row0 % LANES);
        for _ in 0..kb {
            if prefetch && !last {
                // The next sweep's row, one line per vector (prefetches do not fault past B).
                let ahead = bi + SWEEP as isize * b.rs;
                for v in 0..V {
                    _mm_prefetch::<_MM_HINT_T1>(b_addr::<H>(&b, ahead + (v * LANES) as isize));
                }
            }
            let bv: [__m512; V] =
                std::array::from_fn(|v| load_b::<H>(&b, bi + (v * LANES) as isize, mask[v]));
            for (i, acc) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(*ap.add(i));
                for v in 0..V {
                    acc[v] = _mm512_fmadd_ps(a, bv[v], acc[v]);
                }
            }
            // After the last row it indexes past B and is not read.
            bi += b.rs;
            ap = ap.add(LANES);
        }
        if last {
            // Rows past m are padding; the masks keep the columns inside j..j1.
            for (i, acc) in acc.iter().enumerate().take(m.saturating_sub(row0)) {
                let dst = c.add((row0 + i) * n + j);
                for v in 0..V {
                    _mm512_mask_storeu_ps(dst.add(v * LANES), mask[v], acc[v]);
                }
            }
        } else {
            for (i, acc) in acc.iter().enumerate() {
                for (v, sums) in acc.iter().enumerate() {
                    _mm512_storeu_ps(tile.add(i * stride + v * LANES), *sums);
                }
            }
        }
    }
}

/// Columns j0..j1 of C for B with contiguous columns (rs = 1), 8 columns at a time.
///
/// # Safety
/// As [`rows_of_b`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn cols_of_b<const H: bool>(p: Product, j0: usize, j1: usize) {
    let Product {
        m, n, k, at, b, c, ..
    } = p;
    const W: usize = 8;
    let mut j = j0;
    while j < j1 {
        let w = (j1 - j).min(W);
        // Past the last column, repeat it (computed, never stored): each column's first
        // element index.
        let col: [isize; W] = std::array::from_fn(|x| (j + x.min(w - 1)) as isize * b.cs);
        for blk in 0..m.div_ceil(LANES) {
            let rows = (m - blk * LANES).min(LANES);
            let mut even = [_mm512_setzero_ps(); W];
            let mut odd = [_mm512_setzero_ps(); W];
            // SAFETY: depths < k inside each column of B; the packed block holds k · 16 values.
            unsafe {
                let ap = at.add(blk * k * LANES);
                let mut kk = 0;
                while kk + 1 < k {
                    if blk == 0 && kk % LANES == 0 && j + W < j1 {
                        // The next 8 columns' lines at this depth: read 8 columns ahead
                        // (wrapping: some may lie past B's last column; a prefetch never faults).
                        for c in &col {
                            let ahead = c + W as isize * b.cs + kk as isize;
                            _mm_prefetch::<_MM_HINT_T0>(b_addr::<H>(&b, ahead));
                        }
                    }
                    let a0 = _mm512_loadu_ps(ap.add(kk * LANES));
                    let a1 = _mm512_loadu_ps(ap.add((kk + 1) * LANES));
                    for x in 0..W {
                        let (b0, b1) = (
                            b_at::<H>(&b, col[x] + kk as isize),
                            b_at::<H>(&b, col[x] + kk as isize + 1),
                        );
                        even[x] = _mm512_fmadd_ps(_mm512_set1_ps(b0), a0, even[x]);
                        odd[x] = _mm512_fmadd_ps(_mm512_set1_ps(b1), a1, odd[x]);
                    }
                    kk += 2;
                }
                if kk < k {
                    let a0 = _mm512_loadu_ps(ap.add(kk * LANES));
                    for x in 0..W {
                        let b0 = b_at::<H>(&b, col[x] + kk as isize);
                        even[x] = _mm512_fmadd_ps(_mm512_set1_ps(b0), a0, even[x]);
                    }
                }
                let mut tile = [[0f32; LANES]; W];
                for x in 0..W {
                    _mm512_storeu_ps(tile[x].as_mut_ptr(), _mm512_add_ps(even[x], odd[x]));
                }
                for i in 0..rows {
                    let dst = c.add((blk * LANES + i) * n + j);
                    for (x, t) in tile.iter().enumerate().take(w) {
                        *dst.add(x) = t[i];
                    }
                }
            }
        }
        j += W;
    }
}

/// B (k × n) packed once for many skinny products, as a generation's weights are: panels of 16
/// columns, each k rows of 16 contiguous f32 (zero beyond n), so that a product reads each panel
/// as one sequential stream and keeps its 16 × 16 block of C in registers for the whole depth.
/// Each element of C is the same f32 sum, in the same order, as [`gemm`] computes for B with
/// contiguous rows.
pub struct PackedF32 {
    buf: Vec<f32>,
    k: usize,
    n: usize,
}

impl PackedF32 {
    /// B packed, or None on a CPU without AVX-512 (where skinny products are not used).
    ///
    /// # Safety
    /// `b` describes a k × n matrix inside a live allocation.
    pub unsafe fn new(b: View, k: usize, n: usize) -> Option<Self> {
        if !avx512() || k == 0 || n == 0 {
            return None;
        }
        let panels = n.div_ceil(LANES);
        let mut buf = vec![0f32; panels * k * LANES];
        let fill = |(q, panel): (usize, &mut [f32])| {
            for p in 0..k {
                for j in 0..LANES.min(n - q * LANES) {
                    // SAFETY: (p, q · 16 + j) inside B.
                    panel[p * LANES + j] = unsafe { element(&b, p, q * LANES + j) };
                }
            }
        };
        use rayon::prelude::*;
        buf.par_chunks_mut(k * LANES).enumerate().for_each(fill);
        Some(Self { buf, k, n })
    }
}

/// Element (i, j) of the matrix `v` views.
///
/// # Safety
/// (i, j) inside that matrix.
unsafe fn element(v: &View, i: usize, j: usize) -> f32 {
    unsafe { *v.ptr.offset(i as isize * v.rs + j as isize * v.cs) }
}

/// C (m × n, row-major, written whole) = A (m × `b.k`) · B, B packed in advance, for m < 32.
///
/// # Safety
/// m < 32; `a` describes an m × `b.k` matrix inside a live allocation; `c` points to m · `b.n`
/// writable f32s that nothing else reads or writes during the call. (A PackedF32 exists only on
/// CPUs with AVX-512.)
pub unsafe fn gemm_packed(m: usize, c: *mut f32, a: View, b: &PackedF32, threads: bool) {
    let (n, k) = (b.n, b.k);
    debug_assert!(m < 32);
    if m == 0 {
        return;
    }
    let blocks = m.div_ceil(LANES);
    // SAFETY: `a` describes an m × k matrix (the caller's contract).
    let at = unsafe { pack_a(m, k, a) };
    let panels = n.div_ceil(LANES);
    let ptrs = Panels {
        at: at.as_ptr(),
        b: b.buf.as_ptr(),
        c,
    };
    let run = move |q0: usize, q1: usize| {
        for q in q0..q1 {
            let cols = LANES.min(n - q * LANES);
            for blk in 0..blocks {
                let rows = LANES.min(m - blk * LANES);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the packed A holds blocks · k · 16 values, the panel k · 16; the block
                // of C written is rows × cols inside m × n.
                unsafe {
                    panel(
                        ptrs.at().add(blk * k * LANES),
                        ptrs.b().add(q * k * LANES),
                        k,
                        ptrs.c().add(blk * LANES * n + q * LANES),
                        n,
                        rows,
                        cols,
                    )
                };
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("no PackedF32 exists without AVX-512 ({rows}, {cols})");
            }
        }
    };
    if threads && m * n * k >= SPLIT && panels >= 2 {
        let half = panels / 2;
        rayon::join(|| run(0, half), || run(half, panels));
    } else {
        run(0, panels);
    }
    SPARE.with(|s| s.set(at));
}

/// [`gemm_packed`]'s operands as its two halves see them: packed A, packed B, C.
#[derive(Clone, Copy)]
struct Panels {
    at: *const f32,
    b: *const f32,
    c: *mut f32,
}
// SAFETY: the packed operands are only read; each half writes its own panels' columns of C.
unsafe impl Send for Panels {}
unsafe impl Sync for Panels {}

impl Panels {
    // Methods, so that closures capture the whole `Panels`, not its pointers.
    fn at(self) -> *const f32 {
        self.at
    }
    fn b(self) -> *const f32 {
        self.b
    }
    fn c(self) -> *mut f32 {
        self.c
    }
}

/// Rows of a packed panel between the one [`panel`] multiplies and the one it prefetches.
const PREFETCH: usize = 32;

/// One 16 × 16 block of C (`rows` × `cols` of it stored) from 16 rows of packed A and one panel
/// of packed B, summed over the whole depth in registers.
///
/// # Safety
/// AVX-512F; `at` holds k · 16 values, `bp` k · 16; `c` has `rows` rows of `cols` writable
/// values at row stride `ldc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn panel(
    at: *const f32,
    bp: *const f32,
    k: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
) {
    let mut acc = [_mm512_setzero_ps(); LANES];
    // SAFETY: as this function's contract.
    unsafe {
        for p in 0..k {
            // The panel streams from memory: ask for it PREFETCH rows ahead. Past the panel's
            // end the address may leave B's buffer: prefetches do not fault.
            _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add((p + PREFETCH) * LANES).cast());
            let bv = _mm512_loadu_ps(bp.add(p * LANES));
            let ap = at.add(p * LANES);
            for (i, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*ap.add(i)), bv, *acc);
            }
        }
        let mask = lanes(cols);
        for (i, acc) in acc.iter().enumerate().take(rows) {
            _mm512_mask_storeu_ps(c.add(i * ldc), mask, *acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// A view of `v` with row stride `rs` and column stride `cs`.
    fn view(v: &[f32], rs: isize, cs: isize) -> View {
        View {
            ptr: v.as_ptr(),
            rs,
            cs,
        }
    }

    /// A packed by the register transposes (rows of A, strided past k) holds exactly what the
    /// element-by-element packing of the transposed operand gives, zero padding included, for
    /// block and depth tails; a buffer left dirty by a larger product is fully overwritten.
    #[test]
    fn packing_rows_of_a_matches_the_element_loop() {
        if !avx512() {
            return;
        }
        for (m, k) in [
            (1, 1),
            (3, 15),
            (16, 16),
            (17, 17),
            (5, 40),
            (31, 515),
            (16, 1376),
        ] {
            let rs = k + 3;
            let a: Vec<f32> = (0..m * rs).map(|x| x as f32 * 0.5 - 7.0).collect();
            // The same matrix, column-major: the element loop packs it.
            let at: Vec<f32> = (0..m * k).map(|x| a[(x % m) * rs + x / m]).collect();
            SPARE.with(|s| s.set(vec![f32::NAN; 32 * 1400 * LANES]));
            // SAFETY: both views describe m × k matrices inside their vectors.
            let fast = unsafe { pack_a(m, k, view(&a, rs as isize, 1)) };
            let slow = unsafe { pack_a(m, k, view(&at, 1, m as isize)) };
            let len = m.div_ceil(LANES) * k * LANES;
            assert_eq!(fast[..len], slow[..len], "m {m} k {k}");
            for blk in 0..m.div_ceil(LANES) {
                for kk in 0..k {
                    for lane in 0..LANES {
                        let (i, got) = (blk * LANES + lane, fast[(blk * k + kk) * LANES + lane]);
                        let want = if i < m { a[i * rs + kk] } else { 0.0 };
                        assert_eq!(got.to_bits(), want.to_bits(), "m {m} k {k} ({i}, {kk})");
                    }
                }
            }
        }
    }

    /// C from `gemm` vs an f64 reference, B stored row-major or column-major, A row-major or
    /// transposed, with and without threads.
    fn check(m: usize, n: usize, k: usize, b_rows: bool, a_rows: bool, threads: bool) {
        let mut rng = StdRng::seed_from_u64((m * 1000 + n * 10 + k) as u64);
        let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let bm: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let av = if a_rows {
            view(&a, k as isize, 1)
        } else {
            view(&a, 1, m as isize)
        };
        let bv = if b_rows {
            view(&bm, n as isize, 1)
        } else {
            view(&bm, 1, k as isize)
        };
        assert!(usable(m, n, k, &bv));
        let mut c = vec![f32::NAN; m * n];
        // SAFETY: the views describe a and bm; c holds m · n values.
        unsafe { gemm(m, n, k, c.as_mut_ptr(), av, bv, threads) };
        for i in 0..m {
            for j in 0..n {
                let mut want = 0f64;
                for kk in 0..k {
                    // SAFETY: inside both matrices.
                    let (x, y) = unsafe {
                        (
                            *av.ptr.offset(i as isize * av.rs + kk as isize * av.cs),
                            *bv.ptr.offset(kk as isize * bv.rs + j as isize * bv.cs),
                        )
                    };
                    want += x as f64 * y as f64;
                }
                let got = c[i * n + j];
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * (k as f64).sqrt(),
                    "{m}x{n}x{k} b_rows={b_rows} a_rows={a_rows}: C[{i},{j}] = {got}, want {want}"
                );
            }
        }
    }

    #[test]
    fn matches_a_reference_in_both_layouts() {
        if !avx512() {
            eprintln!("no AVX-512: skinny products are not used on this CPU");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 17, 5),
            (2, 50, 33),
            (3, 49, 20),
            (4, 96, 17),
            (5, 33, 64),
            (16, 16, 16),
            (16, 100, 257),
            (17, 9, 31),
            (31, 300, 128),
            (16, 512, 512),
        ] {
            for b_rows in [true, false] {
                for a_rows in [true, false] {
                    check(m, n, k, b_rows, a_rows, true);
                }
            }
            check(m, n, k, true, true, false);
        }
    }

    /// B packed in f32 panels gives what the unpacked product gives, bit for bit (the same sums
    /// in the same order), with and without threads, ragged shapes included.
    #[test]
    fn packed_b_gives_the_unpacked_numbers() {
        if !avx512() {
            // SAFETY: a 1 x 1 matrix.
            assert!(unsafe { PackedF32::new(view(&[1.0], 1, 1), 1, 1) }.is_none());
            return;
        }
        for &(m, n, k) in &[
            (1, 17, 5),
            (16, 100, 257),
            (17, 9, 31),
            (31, 300, 128),
            (16, 1024, 512),
        ] {
            let mut rng = StdRng::seed_from_u64((m + n + k) as u64);
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let (av, bv) = (view(&a, k as isize, 1), view(&b, n as isize, 1));
            // SAFETY: the views describe a and b, alive for the test.
            let packed = unsafe { PackedF32::new(bv, k, n) }.expect("AVX-512");
            for threads in [false, true] {
                let mut want = vec![f32::NAN; m * n];
                let mut got = vec![f32::NAN; m * n];
                // SAFETY: as in `check`.
                unsafe {
                    gemm(m, n, k, want.as_mut_ptr(), av, bv, threads);
                    gemm_packed(m, got.as_mut_ptr(), av, &packed, threads);
                }
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{m}x{n}x{k} threads {threads}"
                );
            }
        }
    }

    #[test]
    fn threads_do_not_change_the_result() {
        if !avx512() {
            return;
        }
        let (m, n, k) = (16, 1024, 512);
        let mut rng = StdRng::seed_from_u64(3);
        let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        for b_rows in [true, false] {
            let av = view(&a, k as isize, 1);
            let bv = if b_rows {
                view(&b, n as isize, 1)
            } else {
                view(&b, 1, k as isize)
            };
            let mut one = vec![0f32; m * n];
            let mut two = vec![0f32; m * n];
            // SAFETY: as in `check`.
            unsafe {
                gemm(m, n, k, one.as_mut_ptr(), av, bv, false);
                gemm(m, n, k, two.as_mut_ptr(), av, bv, true);
            }
            assert_eq!(one, two);
        }
    }
}
