//! Vectorisable f32 helpers shared by the CPU kernels and by sampling: a polynomial exp,
//! 16-lane sums and maxima, and `multiversion!`, which compiles a loop for AVX-512, AVX2 and
//! the baseline and picks the best at run time.

/// Compiles `fn $name` three times, for AVX-512, AVX2 + FMA and the baseline, and picks the best
/// the CPU has at run time (the crate is built for baseline x86-64, where LLVM vectorises these
/// loops 4 wide; AVX-512 gives 16).
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    inner($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    inner($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features v4 was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above, for v3.
                    return unsafe { v3($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// e^x in straight-line f32 arithmetic that vectorises (libm's `expf` is a scalar call):
/// x = n·ln 2 + f with |f| ≤ ln 2 / 2, e^f by Cephes' degree-7 polynomial, 2^n through the
/// exponent bits. Relative error about 2e-7 (a few ulp) up to ln(f32::MAX) ≈ 88.72 and +inf
/// above it, as libm; exactly 0 below −87.3 (where f32's normal range ends and libm's result is
/// at most 1e-38).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    const MAX_ARG: f32 = 88.722_84; // ln(f32::MAX)
    let xc = x.clamp(-87.3, MAX_ARG);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let f = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4_f32;
    let p = p * f + 1.398_2e-3;
    let p = p * f + 8.333_452e-3;
    let p = p * f + 4.166_579_6e-2;
    let p = p * f + 1.666_666_5e-1;
    let p = p * f + 0.5;
    let y = p * f * f + f + 1.0;
    // n is in t's low mantissa bits (t = 1.5 · 2^23 + n): read it with integer arithmetic, which
    // vectorises; `n as i32` is a saturating conversion that the compiler leaves scalar.
    let n = t.to_bits() as i32 - ROUND.to_bits() as i32;
    // 2^n as two factors: n reaches 128 above x ≈ 88.38, past one f32 exponent (the products by
    // powers of two are exact, so below that this is y · 2^n to the bit).
    let h = n >> 1;
    let s1 = f32::from_bits(((h + 127) << 23) as u32);
    let s2 = f32::from_bits(((n - h + 127) << 23) as u32);
    if x < -87.3 {
        0.0
    } else if x > MAX_ARG {
        f32::INFINITY
    } else {
        y * s1 * s2
    }
}

pub(crate) const LANES: usize = 16;

/// Σ f(x) over `xs` in 16 independent partial sums, so that the loop vectorises (a float sum in
/// order cannot), then summed.
#[inline(always)]
pub(crate) fn sum_map(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        let c: &[f32; LANES] = c.try_into().expect("chunk of LANES");
        for j in 0..LANES {
            acc[j] += f(c[j]);
        }
    }
    let rest: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    acc.iter().sum::<f32>() + rest
}

/// Σ f(a, b) over two slices of one length, as [`sum_map`].
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
#[inline(always)]
pub(crate) fn sum_map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        let x: &[f32; LANES] = x.try_into().expect("chunk of LANES");
        let y: &[f32; LANES] = y.try_into().expect("chunk of LANES");
        for j in 0..LANES {
            acc[j] += f(x[j], y[j]);
        }
    }
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    acc.iter().sum::<f32>() + rest
}

#[inline(always)]
pub(crate) fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    rest.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}
