//! f32 matrix products computed with bf16 operands and f32 accumulation, on Intel AMX tiles
//! where the CPU has them: the `bf16` setting of [`crate::MatmulPrecision`].
//!
//! Both operands are rounded to bf16 (round to nearest even) while they are packed, the products
//! are summed in f32 by `tdpbf16ps`, and the output is f32: mixed precision as in PyTorch's
//! autocast, except that outputs stay f32. Without AMX, [`gemm`] rounds the operands the same way
//! and multiplies them with the f32 gemm, so the numbers are those of bf16 on every machine
//! (up to the order of f32 additions) and only the speed differs.
//!
//! Layout: A (m × k) is packed to bf16 rows of `kp` (k rounded up to 32) elements, B (k × n) to
//! panels of 16 columns in AMX's pair-interleaved order (for each pair of rows k, k + 1: the 16
//! columns' two values side by side), both zero-padded to whole tiles. The kernel computes a
//! 32 × 32 block of C in four 16 × 16 f32 tiles from two A tiles and two B tiles per 32-deep step.

use rayon::prelude::*;

/// Rows and columns of C per kernel call, and the depth of one tile step.
const BLOCK: usize = 32;

/// Strips of A (panels of B) packed by one task: 128 rows (columns).
const GROUP: usize = 8;

/// Rounds f32 to bf16, to nearest even (NaN stays NaN).
#[inline(always)]
pub fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else {
        (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// x rounded to bf16 and back.
#[inline(always)]
pub fn round(x: f32) -> f32 {
    f32::from_bits((bf16(x) as u32) << 16)
}

/// Whether this process can run AMX bf16 tiles: the CPU has AMX-TILE and AMX-BF16, and Linux
/// granted the tile-data state (asked once; `RLHF_NO_AMX=1` turns the tiles off for testing).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| std::env::var_os("RLHF_NO_AMX").is_none() && request())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: cpuid leaf 7 exists on every x86-64 CPU that reports AVX-512 or AMX, and reading
    // it has no effect; arch_prctl only asks the kernel for a permission (-1 when refused).
    unsafe {
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        let tile = leaf.edx >> 24 & 1 == 1;
        let bf16 = leaf.edx >> 22 & 1 == 1;
        tile && bf16
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bf16")
            && libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request() -> bool {
    false
}

/// An f32 matrix in memory: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct View {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl View {
    /// SAFETY: (i, j) inside the matrix the view describes.
    #[inline(always)]
    unsafe fn at(&self, i: usize, j: usize) -> f32 {
        unsafe { *self.addr(i, j) }
    }

    /// SAFETY: (i, j) inside the matrix the view describes.
    #[inline(always)]
    unsafe fn addr(&self, i: usize, j: usize) -> *const f32 {
        unsafe { self.ptr.offset(i as isize * self.rs + j as isize * self.cs) }
    }
}

/// The output pointer, shared by the threads that write disjoint blocks of it.
#[derive(Clone, Copy)]
struct Out(*mut f32);

impl Out {
    /// SAFETY: i inside the output.
    unsafe fn at(self, i: usize) -> *mut f32 {
        unsafe { self.0.add(i) }
    }
}
// SAFETY: each thread writes only its own blocks of C.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}
// SAFETY: the views are only read, while `gemm` runs.
unsafe impl Send for View {}
unsafe impl Sync for View {}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// C (m × n, row-major, written whole) = A (m × k) · B (k × n) with both operands rounded to
/// bf16 and f32 sums; on AMX when [`available`], else through the f32 gemm on rounded copies.
/// `threads`: whether to split the work across rayon's pool.
///
/// # Safety
/// `a` and `b` describe m × k and k × n matrices inside live allocations; `c` points to m · n
/// writable f32s that nothing else reads or writes during the call.
pub unsafe fn gemm(m: usize, n: usize, k: usize, c: *mut f32, a: View, b: View, threads: bool) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // SAFETY: c holds m · n elements.
        unsafe { std::ptr::write_bytes(c, 0, m * n) };
        return;
    }
    if available() {
        // SAFETY: as this function's contract.
        unsafe { tiles(m, n, k, c, a, b, threads) }
    } else {
        // SAFETY: as this function's contract.
        unsafe { rounded(m, n, k, c, a, b, threads) }
    }
}

/// The same numbers without AMX: rounded copies of A and B through the f32 gemm.
///
/// # Safety
/// As [`gemm`].
pub unsafe fn rounded(m: usize, n: usize, k: usize, c: *mut f32, a: View, b: View, threads: bool) {
    // Row-major rounded copies. SAFETY: (i, j) ranges over the matrices the views describe.
    let copy = |v: View, rows: usize, cols: usize| -> Vec<f32> {
        (0..rows)
            .flat_map(|i| (0..cols).map(move |j| round(unsafe { v.at(i, j) })))
            .collect()
    };
    let (ar, br) = (copy(a, m, k), copy(b, k, n));
    // SAFETY: ar is m × k and br k × n row-major; c holds m · n elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            n as isize,
            false,
            ar.as_ptr(),
            1,
            k as isize,
            br.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            if threads {
                gemm::Parallelism::Rayon(0)
            } else {
                gemm::Parallelism::None
            },
        )
    }
}

/// A bf16 buffer starting on a 64-byte boundary (a tile row that straddles two cache lines
/// costs two loads: unaligned buffers measured ~2x slower). Buffers are kept per thread and
/// reused: a fresh one each call cost a memset and page faults (~7% of a training step). Stale
/// contents are harmless: the packers write every element, zeros included, of the tiles they
/// fill.
struct Packed {
    buf: Vec<u16>,
    start: usize,
    len: usize,
}

thread_local! {
    static SPARE: std::cell::Cell<[Vec<u16>; 2]> = const { std::cell::Cell::new([Vec::new(), Vec::new()]) };
}

impl Packed {
    /// Buffer `which` (0: A, 1: B) of this thread, grown to `len` (it is taken, so a nested
    /// call on the same thread, as rayon can make while a pack waits, gets a new one).
    fn take(which: usize, len: usize) -> Self {
        let mut buf = SPARE.with(|s| {
            let mut pair = s.take();
            let b = std::mem::take(&mut pair[which]);
            s.set(pair);
            b
        });
        if buf.len() < len + 32 {
            buf = vec![0u16; len + 32];
        }
        let start = buf.as_ptr().align_offset(64);
        Self { buf, start, len }
    }

    /// A buffer of its own (not a thread's spare), for an operand packed once and kept.
    fn owned(len: usize) -> Self {
        let buf = vec![0u16; len + 32];
        let start = buf.as_ptr().align_offset(64);
        Self { buf, start, len }
    }

    fn as_mut_slice(&mut self) -> &mut [u16] {
        &mut self.buf[self.start..self.start + self.len]
    }

    fn ptr(&self) -> *const u16 {
        self.buf[self.start..].as_ptr()
    }

    /// Hands the buffer back to this thread for its next call.
    fn give_back(self, which: usize) {
        SPARE.with(|s| {
            let mut pair = s.take();
            if pair[which].len() < self.buf.len() {
                pair[which] = self.buf;
            }
            s.set(pair);
        });
    }
}

/// Calls `f((i, chunk))` for each `len`-long chunk of `out`, on rayon's threads if `threads`.
fn for_chunks(
    out: &mut [u16],
    len: usize,
    threads: bool,
    f: impl Fn((usize, &mut [u16])) + Sync + Send,
) {
    if threads {
        out.par_chunks_mut(len).enumerate().for_each(f);
    } else {
        out.chunks_mut(len).enumerate().for_each(f);
    }
}

/// Zeroes the strips (panels), `len` long, of a packed group that the packers do not fill
/// whole: those with fewer than 16 rows (columns) of data, `extent(q)`, or all when the depth is
/// short of a whole tile (the buffers are reused, so the padding must be written).
fn zero_partial(dst: &mut [u16], len: usize, short_depth: bool, extent: impl Fn(usize) -> usize) {
    for (q, unit) in dst.chunks_mut(len).enumerate() {
        if short_depth || extent(q) < 16 {
            unit.fill(0);
        }
    }
}

/// A packed to bf16 tiles: strips of 16 rows, each `kp / 32` tiles of 16 rows × 32 values
/// stored contiguously (row r, column kk of a strip at (kk / 32) · 512 + r · 32 + kk % 32); `mp`
/// rows (zero beyond m × k).
///
/// # Safety
/// `a` describes an m × k matrix; AMX [`available`] (so AVX-512 BF16 is too).
#[cfg(target_arch = "x86_64")]
unsafe fn pack_a(a: View, m: usize, k: usize, mp: usize, kp: usize, threads: bool) -> Packed {
    let mut buf = Packed::take(0, mp * kp);
    let out = buf.as_mut_slice();
    // Row-major A: each row converted in runs of 16. Column-major A (a transposed operand):
    // strips of 16 rows, two columns at a time read contiguously and scattered as pairs. Any
    // other layout: element by element.
    let strip_len = 16 * kp;
    // Groups of GROUP strips: a transposed A is read along its rows (GROUP · 16 contiguous
    // values) for all the group's strips at once; strip by strip, each read would be 64 bytes
    // from each of k rows, which the prefetchers do not follow.
    let group = |(g, dst): (usize, &mut [u16])| {
        let strips = dst.len() / strip_len;
        let rows_of = |q: usize| 16.min(m.saturating_sub((g * GROUP + q) * 16));
        zero_partial(dst, strip_len, k < kp, rows_of);
        // SAFETY: every address read is (i, kk) with i < m, kk < k; every write lands in `dst`,
        // the group's strips of 16 rows of kp.
        unsafe {
            if a.cs != 1 && a.rs == 1 {
                let d = dst.as_mut_ptr().cast::<u32>();
                for kk in (0..k).step_by(2) {
                    for q in (0..strips).take_while(|&q| rows_of(q) > 0) {
                        let i0 = (g * GROUP + q) * 16;
                        let next = if kk + 1 < k {
                            a.addr(i0, kk + 1)
                        } else {
                            std::ptr::null()
                        };
                        let at = d.add(q * strip_len / 2 + kk / 32 * 256 + kk % 32 / 2);
                        simd::pairs_scatter(a.addr(i0, kk), next, rows_of(q), at, 16);
                    }
                }
                return;
            }
            for q in (0..strips).take_while(|&q| rows_of(q) > 0) {
                let i0 = (g * GROUP + q) * 16;
                let dst = &mut dst[q * strip_len..(q + 1) * strip_len];
                for r in 0..rows_of(q) {
                    for kk in (0..k).step_by(16) {
                        let at = kk / 32 * 512 + r * 32 + kk % 32;
                        if a.cs == 1 {
                            simd::convert(
                                a.addr(i0 + r, kk),
                                16.min(k - kk),
                                dst.as_mut_ptr().add(at),
                            );
                        } else {
                            for x in kk..k.min(kk + 16) {
                                dst[at + x - kk] = bf16(a.at(i0 + r, x));
                            }
                        }
                    }
                }
            }
        }
    };
    for_chunks(out, GROUP * strip_len, threads, group);
    buf
}

/// B packed to panels of 16 columns, `np / 16` of them, each `kp / 2` rows of 16 column pairs
/// (B[2p][j], B[2p + 1][j]) (zero beyond k × n).
///
/// # Safety
/// `b` describes a k × n matrix; AMX [`available`].
#[cfg(target_arch = "x86_64")]
unsafe fn pack_b(b: View, k: usize, n: usize, kp: usize, np: usize, threads: bool) -> Packed {
    let mut buf = Packed::take(1, np * kp);
    // SAFETY: as this function's contract; the buffer holds np · kp values.
    unsafe { fill_b(buf.as_mut_slice(), b, k, n, kp, threads) };
    buf
}

/// [`pack_b`] into `out`, `np · kp` values.
///
/// # Safety
/// As [`pack_b`].
#[cfg(target_arch = "x86_64")]
unsafe fn fill_b(out: &mut [u16], b: View, k: usize, n: usize, kp: usize, threads: bool) {
    let panel_len = kp * 16;
    // Groups of GROUP panels: a row-major B is read along its rows (GROUP · 16 contiguous
    // values) for all the group's panels at once (see pack_a).
    let group = |(g, dst): (usize, &mut [u16])| {
        let panels = dst.len() / panel_len;
        let cols_of = |q: usize| 16.min(n.saturating_sub((g * GROUP + q) * 16));
        zero_partial(dst, panel_len, k < kp, cols_of);
        // SAFETY: reads (kk, j) with kk < k, j < n; writes inside `dst`, the group's panels.
        unsafe {
            if b.cs == 1 {
                // Two rows' 16 columns at a time, interleaved into one tile row.
                for kk in (0..k).step_by(2) {
                    for q in (0..panels).take_while(|&q| cols_of(q) > 0) {
                        let j0 = (g * GROUP + q) * 16;
                        let next = if kk + 1 < k {
                            b.addr(kk + 1, j0)
                        } else {
                            std::ptr::null()
                        };
                        let at = dst.as_mut_ptr().add(q * panel_len + kk / 2 * 32);
                        simd::pairs(b.addr(kk, j0), next, cols_of(q), at);
                    }
                }
                return;
            }
            for q in (0..panels).take_while(|&q| cols_of(q) > 0) {
                let j0 = (g * GROUP + q) * 16;
                let dst = &mut dst[q * panel_len..(q + 1) * panel_len];
                if b.rs == 1 {
                    // Column-major B: each column read down in runs of 32, scattered as pairs.
                    let d = dst.as_mut_ptr().cast::<u32>();
                    for j in 0..cols_of(q) {
                        for kk in (0..k).step_by(32) {
                            let at = d.add(kk / 2 * 16 + j);
                            simd::run_scatter(b.addr(kk, j0 + j), 32.min(k - kk), at);
                        }
                    }
                } else {
                    for j in 0..cols_of(q) {
                        for kk in 0..k {
                            dst[(kk / 2) * 32 + 2 * j + (kk & 1)] = bf16(b.at(kk, j0 + j));
                        }
                    }
                }
            }
        }
    };
    for_chunks(out, GROUP * panel_len, threads, group);
}

/// Conversions to bf16 with AVX-512 BF16 (round to nearest even, as [`bf16`]), in runs of 16
/// with masked loads and stores for the tails.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    fn mask(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as u16
        }
    }

    /// [x0, .., x15, y0, .., y15] → [x0, y0, x1, y1, ..].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    fn interleave(z: __m512bh) -> __m512i {
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        // SAFETY: __m512bh and __m512i are both 512 bits.
        _mm512_permutexvar_epi16(idx, unsafe { std::mem::transmute::<__m512bh, __m512i>(z) })
    }

    /// Up to 16 values at `p` (zero beyond n; none if `p` is null).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const f32, n: usize) -> __m512 {
        if p.is_null() || n == 0 {
            _mm512_setzero_ps()
        } else {
            // SAFETY: the caller's n values at p; masked-off lanes are not read.
            unsafe { _mm512_maskz_loadu_ps(mask(n), p) }
        }
    }

    /// `n` contiguous values at `src` to bf16 at `dst`.
    ///
    /// # Safety
    /// n readable f32 at src, n writable u16 at dst; AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn convert(src: *const f32, n: usize, dst: *mut u16) {
        for i in (0..n).step_by(16) {
            let k = mask(n - i);
            // SAFETY: as the function's contract; lanes beyond n are masked off.
            unsafe {
                let h = _mm512_cvtneps_pbh(load(src.add(i), n - i));
                _mm256_mask_storeu_epi16(
                    dst.add(i).cast(),
                    k,
                    std::mem::transmute::<__m256bh, __m256i>(h),
                );
            }
        }
    }

    /// Pairs (r0[j], r1[j]) for j < n ≤ 16 as n u32 at `dst` (r1 null: zeros).
    ///
    /// # Safety
    /// n readable f32 at r0 (and r1), 2n writable u16 at dst; AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn pairs(r0: *const f32, r1: *const f32, n: usize, dst: *mut u16) {
        // SAFETY: as the function's contract.
        unsafe {
            let w = interleave(_mm512_cvtne2ps_pbh(load(r1, n), load(r0, n)));
            _mm512_mask_storeu_epi32(dst.cast(), mask(n), w);
        }
    }

    /// Pairs (r0[j], r1[j]) for j < n ≤ 16 to `dst[j · stride]` (u32 each; r1 null: zeros).
    ///
    /// # Safety
    /// n readable f32 at r0 (and r1); dst[j · stride] writable for j < n; AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn pairs_scatter(
        r0: *const f32,
        r1: *const f32,
        n: usize,
        dst: *mut u32,
        stride: usize,
    ) {
        // SAFETY: as the function's contract; lanes beyond n are masked off.
        unsafe {
            let w = interleave(_mm512_cvtne2ps_pbh(load(r1, n), load(r0, n)));
            let idx = _mm512_mullo_epi32(
                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                _mm512_set1_epi32(stride as i32),
            );
            _mm512_mask_i32scatter_epi32::<4>(dst.cast(), mask(n), idx, w);
        }
    }

    /// n ≤ 32 contiguous values as ⌈n / 2⌉ consecutive pairs, pair p to `dst[p · 16]`.
    ///
    /// # Safety
    /// n readable f32 at src; dst[p · 16] writable for p < ⌈n / 2⌉; AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn run_scatter(src: *const f32, n: usize, dst: *mut u32) {
        // SAFETY: as the function's contract; lanes beyond n are masked off.
        unsafe {
            let hi = if n > 16 {
                load(src.add(16), n - 16)
            } else {
                _mm512_setzero_ps()
            };
            let z = _mm512_cvtne2ps_pbh(hi, load(src, n.min(16)));
            let idx = _mm512_mullo_epi32(
                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                _mm512_set1_epi32(16),
            );
            _mm512_mask_i32scatter_epi32::<4>(
                dst.cast(),
                mask(n.div_ceil(2)),
                idx,
                std::mem::transmute::<__m512bh, __m512i>(z),
            );
        }
    }
}

/// AMX's tile configuration: palette 1, tiles 0-7 of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = {
    let mut colsb = [0u16; 16];
    let mut rows = [0u8; 16];
    let mut t = 0;
    while t < 8 {
        colsb[t] = 64;
        rows[t] = 16;
        t += 1;
    }
    TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb,
        rows,
    }
};

#[cfg(target_arch = "x86_64")]
mod tile {
    use std::arch::asm;

    /// SAFETY (all): AMX is [`super::available`] on this thread's process, and the pointers
    /// cover the 16 rows × 64 bytes the tile reads or writes at the given byte stride.
    #[inline(always)]
    pub unsafe fn configure(cfg: &super::TileConfig) {
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg as *const super::TileConfig, options(nostack)) }
    }

    #[inline(always)]
    pub unsafe fn release() {
        unsafe { asm!("tilerelease", options(nostack, nomem)) }
    }

    #[inline(always)]
    pub unsafe fn zero<const T: u8>() {
        unsafe { asm!("tilezero tmm{t}", t = const T, options(nostack, nomem)) }
    }

    #[inline(always)]
    pub unsafe fn load<const T: u8>(ptr: *const u16, stride: usize) {
        unsafe {
            asm!("tileloadd tmm{t}, [{p} + {s} * 1]", t = const T, p = in(reg) ptr,
                 s = in(reg) stride, options(nostack, readonly))
        }
    }

    #[inline(always)]
    pub unsafe fn store<const T: u8>(ptr: *mut f32, stride: usize) {
        unsafe {
            asm!("tilestored [{p} + {s} * 1], tmm{t}", t = const T, p = in(reg) ptr,
                 s = in(reg) stride, options(nostack))
        }
    }

    /// tmm C += tmm A · tmm B (bf16 pairs, f32 sums).
    #[inline(always)]
    pub unsafe fn dot<const C: u8, const A: u8, const B: u8>() {
        unsafe {
            asm!("tdpbf16ps tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A, b = const B,
                 options(nostack, nomem))
        }
    }
}

/// One 32 × 32 block of C from two packed strips of A (`a`, 16 rows × `kp` each) and two panels
/// of B.
///
/// # Safety
/// Tiles configured on this thread; `a` holds 32 rows of `kp`, `b0` and `b1` one panel each of
/// `kp / 2` × 32, `c` a 32 × 32 block at row stride `ldc` f32s.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block(a: *const u16, kp: usize, b0: *const u16, b1: *const u16, c: *mut f32, ldc: usize) {
    unsafe {
        tile::zero::<0>();
        tile::zero::<1>();
        tile::zero::<2>();
        tile::zero::<3>();
        let a1 = a.add(16 * kp);
        for s in 0..kp / BLOCK {
            // The next step's A tiles (from L2: they stream, while B's panels stay in L1);
            // +8-10% per product. Past the last step these addresses may leave the buffer:
            // prefetches do not fault, and wrapping_add makes no claim about them.
            for l in 0..16 {
                use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
                _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add((s + 1) * 512 + l * 32).cast());
                _mm_prefetch::<_MM_HINT_T0>(a1.wrapping_add((s + 1) * 512 + l * 32).cast());
            }
            tile::load::<4>(a.add(s * 512), 64);
            tile::load::<6>(b0.add(s * 512), 64);
            tile::dot::<0, 4, 6>();
            tile::load::<7>(b1.add(s * 512), 64);
            tile::dot::<1, 4, 7>();
            tile::load::<5>(a1.add(s * 512), 64);
            tile::dot::<2, 5, 6>();
            tile::dot::<3, 5, 7>();
        }
        let ldc_bytes = ldc * 4;
        tile::store::<0>(c, ldc_bytes);
        tile::store::<1>(c.add(16), ldc_bytes);
        tile::store::<2>(c.add(16 * ldc), ldc_bytes);
        tile::store::<3>(c.add(16 * ldc + 16), ldc_bytes);
    }
}

/// [`gemm`] on AMX tiles.
///
/// # Safety
/// As [`gemm`], and AMX [`available`].
#[cfg(target_arch = "x86_64")]
unsafe fn tiles(m: usize, n: usize, k: usize, c: *mut f32, a: View, b: View, threads: bool) {
    let (np, kp) = (round_up(n, BLOCK), round_up(k, BLOCK));
    // SAFETY: the view describes a k × n matrix; the packed B is np × kp, as `with_b` reads it.
    unsafe {
        let pb = pack_b(b, k, n, kp, np, threads);
        let p = Prepacked {
            m,
            n,
            k,
            c,
            a,
            pb: pb.ptr(),
            kp,
        };
        with_b(p, threads);
        pb.give_back(1);
    }
}

/// A product whose B is packed already: C (m × n, row-major) = A (m × k) · B, B in
/// [`pack_b`]'s layout with depth padded to `kp`.
#[derive(Clone, Copy)]
struct Prepacked {
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    a: View,
    pb: *const u16,
    kp: usize,
}

/// Computes `p`, on rayon's threads if `threads`.
///
/// # Safety
/// As [`gemm`] for `p.c` and `p.a`; `p.pb` holds B packed for k × n with depth `kp`; AMX
/// [`available`].
#[cfg(target_arch = "x86_64")]
unsafe fn with_b(p: Prepacked, threads: bool) {
    let Prepacked {
        m,
        n,
        k,
        c,
        a,
        pb,
        kp,
    } = p;
    let np = round_up(n, BLOCK);
    if m <= 16 {
        // SAFETY: as this function's contract.
        unsafe { narrow(p, threads) };
        return;
    }
    let mp = round_up(m, BLOCK);
    // SAFETY: the view describes an m × k matrix.
    let pa = unsafe { pack_a(a, m, k, mp, kp, threads) };
    let (mb, nb) = (mp / BLOCK, np / BLOCK);
    let out = Out(c);
    let pb = Shared(pb);
    // Column blocks [j0, j1) × row blocks [i0, i1): the two B panels of a column block stay in
    // L1 while the row blocks of A stream through it.
    let run = |j0: usize, j1: usize, i0: usize, i1: usize| {
        let mut edge = [0f32; BLOCK * BLOCK];
        // SAFETY: AMX is available (caller); the packed buffers hold whole tiles; each block of
        // C written is inside m × n, or goes through `edge` and is copied in part.
        unsafe {
            tile::configure(&CONFIG);
            for jb in j0..j1 {
                let b0 = pb.get().add(jb * 2 * kp * 16);
                let b1 = b0.add(kp * 16);
                for ib in i0..i1 {
                    let (i, j) = (ib * BLOCK, jb * BLOCK);
                    let ap = pa.ptr().add(i * kp);
                    if i + BLOCK <= m && j + BLOCK <= n {
                        block(ap, kp, b0, b1, out.at(i * n + j), n);
                    } else {
                        block(ap, kp, b0, b1, edge.as_mut_ptr(), BLOCK);
                        for r in 0..BLOCK.min(m - i) {
                            let cols = BLOCK.min(n - j);
                            std::ptr::copy_nonoverlapping(
                                edge.as_ptr().add(r * BLOCK),
                                out.at((i + r) * n + j),
                                cols,
                            );
                        }
                    }
                }
            }
            tile::release();
        }
    };
    // Threads take row blocks of C (each streams its own part of A, the panels of B are shared):
    // measured 1.3-1.35x faster than taking column blocks (1024x512x512: 1050 vs 777 GFLOP/s on
    // two threads); column blocks only when there are fewer row blocks than threads.
    let workers = if threads {
        rayon::current_num_threads()
    } else {
        1
    };
    let split_rows = mb >= workers;
    let parts = workers.min(if split_rows { mb } else { nb });
    if parts > 1 {
        (0..parts).into_par_iter().for_each(|p| {
            if split_rows {
                run(0, nb, p * mb / parts, (p + 1) * mb / parts)
            } else {
                run(p * nb / parts, (p + 1) * nb / parts, 0, mb)
            }
        });
    } else {
        run(0, nb, 0, mb);
    }
    pa.give_back(0);
}

/// A packed operand's address, read by several threads.
#[derive(Clone, Copy)]
struct Shared(*const u16);

impl Shared {
    /// The address (a method, so that closures capture the whole `Shared`, not the pointer).
    fn get(self) -> *const u16 {
        self.0
    }
}
// SAFETY: the packed buffers are only read while the threads run.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// Multiply-adds below which [`narrow`] runs on one thread.
const NARROW_SPLIT: usize = 1 << 20;

/// [`with_b`] for at most 16 rows (a decoding step: one new position per sequence): one strip of
/// A, read from L1 at every depth step, against B's panels four at a time (64 columns, the last
/// two panels of an odd count as one call of two), so that B, the part that comes from memory,
/// is read once and the tile unit does no work on padding rows beyond the strip's 16.
///
/// # Safety
/// As [`with_b`], and m ≤ 16.
#[cfg(target_arch = "x86_64")]
unsafe fn narrow(p: Prepacked, threads: bool) {
    let Prepacked {
        m,
        n,
        k,
        c,
        a,
        pb,
        kp,
    } = p;
    debug_assert!(m <= 16);
    // SAFETY: the view describes an m × k matrix.
    let pa = unsafe { pack_a(a, m, k, 16, kp, false) };
    let (pa_ptr, pb) = (Shared(pa.ptr()), Shared(pb));
    let out = Out(c);
    // Units of 32 columns (two panels); a kernel call takes two units, or the last one alone.
    let units = round_up(n, BLOCK) / BLOCK;
    let run = |u0: usize, u1: usize| {
        let mut edge = [0f32; 16 * 64];
        // SAFETY: AMX is available (caller); the packed buffers hold whole tiles; each block of
        // C written is inside m × n, or goes through `edge` and is copied in part.
        unsafe {
            tile::configure(&CONFIG);
            let mut u = u0;
            while u < u1 {
                let wide = u + 2 <= u1;
                let (j, cols) = (u * BLOCK, if wide { 64 } else { 32 });
                let b = pb.get().add(j * kp);
                let whole = m == 16 && j + cols <= n;
                let (dst, ldc) = if whole {
                    (out.at(j), n)
                } else {
                    (edge.as_mut_ptr(), 64)
                };
                if wide {
                    strip::<4>(pa_ptr.get(), kp, b, dst, ldc);
                } else {
                    strip::<2>(pa_ptr.get(), kp, b, dst, ldc);
                }
                if !whole {
                    for r in 0..m {
                        std::ptr::copy_nonoverlapping(
                            edge.as_ptr().add(r * 64),
                            out.at(r * n + j),
                            cols.min(n - j),
                        );
                    }
                }
                u += if wide { 2 } else { 1 };
            }
            tile::release();
        }
    };
    if threads && m * n * k >= NARROW_SPLIT && units >= 4 {
        // An even split point keeps both halves in calls of four panels.
        let half = units / 4 * 2;
        rayon::join(|| run(0, half), || run(half, units));
    } else {
        run(0, units);
    }
    pa.give_back(0);
}

/// 16 rows × `P` panels (P = 2 or 4) of C from one packed strip of A and P consecutive panels of
/// B (`kp / 2` × 32 each).
///
/// # Safety
/// Tiles configured on this thread; `a` holds 16 rows of `kp`, `b` P panels; `c` a 16 × 16·P
/// block at row stride `ldc` f32s.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn strip<const P: usize>(a: *const u16, kp: usize, b: *const u16, c: *mut f32, ldc: usize) {
    let panel = kp * 16;
    unsafe {
        tile::zero::<0>();
        tile::zero::<1>();
        if P == 4 {
            tile::zero::<2>();
            tile::zero::<3>();
        }
        for s in 0..kp / BLOCK {
            let at = s * 512;
            tile::load::<4>(a.add(at), 64);
            tile::load::<5>(b.add(at), 64);
            tile::dot::<0, 4, 5>();
            tile::load::<6>(b.add(panel + at), 64);
            tile::dot::<1, 4, 6>();
            if P == 4 {
                tile::load::<7>(b.add(2 * panel + at), 64);
                tile::dot::<2, 4, 7>();
                tile::load::<5>(b.add(3 * panel + at), 64);
                tile::dot::<3, 4, 5>();
            }
        }
        let ldc_bytes = ldc * 4;
        tile::store::<0>(c, ldc_bytes);
        tile::store::<1>(c.add(16), ldc_bytes);
        if P == 4 {
            tile::store::<2>(c.add(32), ldc_bytes);
            tile::store::<3>(c.add(48), ldc_bytes);
        }
    }
}

/// B (k × n) packed once for many products: a weight matrix that every step of a generation
/// reads. Packing costs about what one product reads (B in f32, written in bf16), so a matrix
/// used for many steps is read at half the bytes from then on.
pub struct PackedB {
    data: Packed,
    k: usize,
    n: usize,
}

impl PackedB {
    /// B packed, or None without AMX (the products then pack B themselves, or run in f32).
    ///
    /// # Safety
    /// `b` describes a k × n matrix inside a live allocation.
    pub unsafe fn new(b: View, k: usize, n: usize) -> Option<Self> {
        if !available() {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let (kp, np) = (round_up(k, BLOCK), round_up(n, BLOCK));
            let mut data = Packed::owned(np * kp);
            // SAFETY: as this function's contract; the buffer holds np · kp values.
            unsafe { fill_b(data.as_mut_slice(), b, k, n, kp, true) };
            Some(Self { data, k, n })
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }
}

/// [`gemm`] with B packed in advance: the same numbers as [`gemm`] on the matrix B was packed
/// from (the same rounding, the same tile sums).
///
/// # Safety
/// `a` describes an m × `b.k` matrix inside a live allocation; `c` points to m · `b.n` writable
/// f32s that nothing else reads or writes during the call.
pub unsafe fn gemm_packed(m: usize, c: *mut f32, a: View, b: &PackedB, threads: bool) {
    let (n, k) = (b.n, b.k);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // SAFETY: c holds m · n elements.
        unsafe { std::ptr::write_bytes(c, 0, m * n) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as this function's contract; a PackedB exists only where AMX is available.
    unsafe {
        let p = Prepacked {
            m,
            n,
            k,
            c,
            a,
            pb: b.data.ptr(),
            kp: round_up(k, BLOCK),
        };
        with_b(p, threads)
    };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no PackedB exists without AMX ({:?}, {threads})", a.ptr);
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tiles(m: usize, n: usize, k: usize, c: *mut f32, a: View, b: View, threads: bool) {
    unsafe { rounded(m, n, k, c, a, b, threads) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                (x >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up to the even one.
        assert_eq!(bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(round(-2.5), -2.5);
        assert_eq!(round(1.0 + 1.0 / 128.0 + 1.0 / 1024.0), 1.0 + 1.0 / 128.0);
        assert!(round(f32::NAN).is_nan());
        assert_eq!(round(f32::INFINITY), f32::INFINITY);
    }

    /// Every shape class (whole blocks, ragged edges in m, n and k, a single row), row-major and
    /// transposed and strided operands, one thread and many: the tiles, and the emulation used
    /// without AMX, give the product of the rounded operands, to f32 summation order. Without AMX
    /// the tile path is not exercised (the test says so on stderr).
    #[test]
    fn tiles_equal_the_product_of_rounded_operands() {
        if !available() {
            eprintln!("no AMX on this machine: the tile kernel is not tested here");
        }
        for &(m, n, k) in &[
            (32, 32, 32),
            (64, 96, 128),
            (37, 53, 71),
            (1, 40, 33),
            (130, 17, 300),
            (40, 290, 64),
            (16, 64, 32),
            (5, 100, 70),
            (16, 300, 256),
        ] {
            let a = matrix(m, k, 1);
            let b = matrix(k, n, 2);
            // Exact reference: f64 sums of the rounded operands.
            let expected: Vec<f64> = (0..m * n)
                .map(|x| {
                    let (i, j) = (x / n, x % n);
                    (0..k)
                        .map(|p| round(a[i * k + p]) as f64 * round(b[p * n + j]) as f64)
                        .sum()
                })
                .collect();
            let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect(); // column-major A
            let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect(); // column-major B
            let a2: Vec<f32> = a.iter().flat_map(|&x| [x, f32::NAN]).collect();
            let b2: Vec<f32> = b.iter().flat_map(|&x| [x, f32::NAN]).collect();
            let views = [
                (
                    View {
                        ptr: a.as_ptr(),
                        rs: k as isize,
                        cs: 1,
                    },
                    View {
                        ptr: b.as_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                ),
                (
                    View {
                        ptr: at.as_ptr(),
                        rs: 1,
                        cs: m as isize,
                    },
                    View {
                        ptr: bt.as_ptr(),
                        rs: 1,
                        cs: k as isize,
                    },
                ),
                // Every other element of a doubled copy: neither rows nor columns contiguous
                // (the element-by-element packers).
                (
                    View {
                        ptr: a2.as_ptr(),
                        rs: 2 * k as isize,
                        cs: 2,
                    },
                    View {
                        ptr: b2.as_ptr(),
                        rs: 2 * n as isize,
                        cs: 2,
                    },
                ),
            ];
            for (va, vb) in views {
                // The dispatcher (tiles where AMX is) and the emulation used without AMX.
                for (threads, emulated) in [(false, false), (true, false), (true, true)] {
                    let mut c = vec![f32::NAN; m * n];
                    // SAFETY: the views describe the vectors above; c holds m · n.
                    unsafe {
                        if emulated {
                            rounded(m, n, k, c.as_mut_ptr(), va, vb, threads)
                        } else {
                            gemm(m, n, k, c.as_mut_ptr(), va, vb, threads)
                        }
                    };
                    for (x, (&got, &want)) in c.iter().zip(&expected).enumerate() {
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{m}x{n}x{k} ({}, {}) threads {threads} emulated {emulated}: {got} vs {want}",
                            x / n,
                            x % n
                        );
                    }
                }
            }
        }
    }

    /// B packed in advance gives the numbers of B packed by each product, bit for bit: decoding
    /// rows (one strip, with and without the second thread), many rows, both layouts of B.
    #[test]
    fn packed_b_gives_the_numbers_of_packing_per_product() {
        if !available() {
            eprintln!("no AMX on this machine: nothing is packed in advance here");
            // SAFETY: a 1 x 1 matrix.
            assert!(
                unsafe {
                    PackedB::new(
                        View {
                            ptr: [1f32].as_ptr(),
                            rs: 1,
                            cs: 1,
                        },
                        1,
                        1,
                    )
                }
                .is_none()
            );
            return;
        }
        for &(m, n, k) in &[(1, 40, 33), (16, 300, 256), (7, 96, 64), (70, 130, 100)] {
            let a = matrix(m, k, 5);
            let b = matrix(k, n, 6);
            let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
            let va = View {
                ptr: a.as_ptr(),
                rs: k as isize,
                cs: 1,
            };
            let layouts = [
                View {
                    ptr: b.as_ptr(),
                    rs: n as isize,
                    cs: 1,
                },
                View {
                    ptr: bt.as_ptr(),
                    rs: 1,
                    cs: k as isize,
                },
            ];
            for vb in layouts {
                // SAFETY: the views describe the vectors above, alive for the whole test.
                let packed = unsafe { PackedB::new(vb, k, n) }.expect("AMX is available");
                for threads in [false, true] {
                    let mut want = vec![f32::NAN; m * n];
                    let mut got = vec![f32::NAN; m * n];
                    // SAFETY: as above; the outputs hold m · n.
                    unsafe {
                        gemm(m, n, k, want.as_mut_ptr(), va, vb, threads);
                        gemm_packed(m, got.as_mut_ptr(), va, &packed, threads);
                    }
                    assert!(want.iter().all(|x| x.is_finite()));
                    assert_eq!(
                        got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        "{m}x{n}x{k} threads {threads} rs {}",
                        vb.rs
                    );
                }
            }
        }
    }

    /// The rounding costs what bf16 costs: against the f32 product the error is about 2^-8 of the
    /// operands' scale, not more (a packing mistake would be of order 1).
    #[test]
    fn error_against_f32_is_bf16_sized() {
        let (m, n, k) = (48, 48, 256);
        let a = matrix(m, k, 3);
        let b = matrix(k, n, 4);
        let mut c = vec![0f32; m * n];
        let va = View {
            ptr: a.as_ptr(),
            rs: k as isize,
            cs: 1,
        };
        let vb = View {
            ptr: b.as_ptr(),
            rs: n as isize,
            cs: 1,
        };
        // SAFETY: as above.
        unsafe { gemm(m, n, k, c.as_mut_ptr(), va, vb, false) };
        let mut worst = 0f64;
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum();
                worst = worst.max((c[i * n + j] as f64 - exact).abs());
            }
        }
        // Operands in [-1, 1], k = 256: the sum's scale is sqrt(k / 9) ≈ 5.3; bf16's relative
        // step is 2^-8, so errors of ~0.01-0.05 are expected, and never near 1.
        assert!(worst > 1e-4 && worst < 0.1, "worst error {worst}");
    }
}
