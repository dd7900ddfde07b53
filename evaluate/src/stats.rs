//! The statistics of an evaluation, each with a 95% interval: means (Student's t interval,
//! mean ± t·sd/√n), rates (Wilson score interval), paired differences, win rates with ties
//! counted as half a win, and Pearson correlations (Fisher z interval).

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, Normal, StudentsT};
use std::cmp::Ordering;

/// The confidence level of every interval in the report.
pub const LEVEL: f64 = 0.95;

/// A mean with its t interval, and the sample standard deviation it came from.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub mean: f64,
    pub low: f64,
    pub high: f64,
    /// Sample standard deviation (n − 1); 0 for a single value.
    pub sd: f64,
    pub n: usize,
}

/// The mean of `x` with its `level` t interval (n − 1 degrees of freedom); None for no values. A
/// single value has sd 0 and the interval [x, x].
pub fn mean_interval(x: &[f64], level: f64) -> Option<Estimate> {
    let n = x.len();
    if n == 0 {
        return None;
    }
    let mean = x.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return Some(Estimate {
            mean,
            low: mean,
            high: mean,
            sd: 0.0,
            n,
        });
    }
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let sd = var.sqrt();
    let t = StudentsT::new(0.0, 1.0, (n - 1) as f64)
        .expect("n − 1 ≥ 1 degrees of freedom")
        .inverse_cdf(0.5 + level / 2.0);
    let half = t * sd / (n as f64).sqrt();
    Some(Estimate {
        mean,
        low: mean - half,
        high: mean + half,
        sd,
        n,
    })
}

/// The paired differences a_i − b_i with their t interval; None when empty. Panics when the two
/// differ in length (a pairing bug).
pub fn paired_difference(a: &[f64], b: &[f64], level: f64) -> Option<Estimate> {
    assert_eq!(a.len(), b.len(), "paired values");
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    mean_interval(&d, level)
}

/// The standard normal quantile of a two-sided `level` interval (1.96 for 0.95).
pub fn z(level: f64) -> f64 {
    Normal::new(0.0, 1.0)
        .expect("standard normal")
        .inverse_cdf(0.5 + level / 2.0)
}

/// The Wilson score interval (fractional `k` allowed: ties count half), from the reward crate.
pub use reward::eval::wilson;

/// A rate (of EOS, of gold successes) with its Wilson interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    /// Sum of the 0/1 outcomes.
    pub successes: f64,
    pub n: usize,
    pub rate: f64,
    pub low: f64,
    pub high: f64,
}

/// The rate of 0/1 outcomes with its Wilson interval; None for no outcomes.
pub fn rate(outcomes: &[f64], level: f64) -> Option<Rate> {
    if outcomes.is_empty() {
        return None;
    }
    let k: f64 = outcomes.iter().sum();
    let (low, high) = wilson(k, outcomes.len(), level);
    Some(Rate {
        successes: k,
        n: outcomes.len(),
        rate: k / outcomes.len() as f64,
        low,
        high,
    })
}

/// How often A beat B over paired comparisons, ties counting half, with the Wilson interval of
/// (wins + ties/2) out of n.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WinRate {
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    pub n: usize,
    pub rate: f64,
    pub low: f64,
    pub high: f64,
}

/// The win rate of paired outcomes (Greater = A won); None for no pairs.
pub fn win_rate(outcomes: &[Ordering], level: f64) -> Option<WinRate> {
    if outcomes.is_empty() {
        return None;
    }
    let count = |o: Ordering| outcomes.iter().filter(|&&x| x == o).count();
    let (wins, ties, losses) = (
        count(Ordering::Greater),
        count(Ordering::Equal),
        count(Ordering::Less),
    );
    let n = outcomes.len();
    let k = wins as f64 + 0.5 * ties as f64;
    let (low, high) = wilson(k, n, level);
    Some(WinRate {
        wins,
        ties,
        losses,
        n,
        rate: k / n as f64,
        low,
        high,
    })
}

/// A Pearson correlation with its Fisher z interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Correlation {
    pub r: f64,
    pub low: f64,
    pub high: f64,
    pub n: usize,
}

/// The Pearson correlation of `x` and `y` (paired, the same length) with its `level` interval
/// tanh(atanh r ± z/√(n − 3)) (Fisher 1921; what scipy's `pearsonr(...).confidence_interval()`
/// gives); the interval is [−1, 1] below 4 pairs. None below 2 pairs or when either side is
/// constant (e.g. every response cut at the same length): there is no correlation to report.
pub fn pearson(x: &[f64], y: &[f64], level: f64) -> Option<Correlation> {
    assert_eq!(x.len(), y.len(), "paired values");
    let n = x.len();
    if n < 2 {
        return None;
    }
    let (mx, my) = (
        x.iter().sum::<f64>() / n as f64,
        y.iter().sum::<f64>() / n as f64,
    );
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    if !(sxx > 0.0 && syy > 0.0) {
        return None;
    }
    let r = (sxy / (sxx * syy).sqrt()).clamp(-1.0, 1.0);
    let (low, high) = if n > 3 {
        let (centre, half) = (r.atanh(), z(level) / ((n - 3) as f64).sqrt());
        ((centre - half).tanh(), (centre + half).tanh())
    } else {
        (-1.0, 1.0)
    };
    Some(Correlation { r, low, high, n })
}

/// Compares two scores, calling them tied when they differ by at most `tol` (rewards of the same
/// text scored in different batches differ by float noise).
pub fn compare(a: f64, b: f64, tol: f64) -> Ordering {
    if (a - b).abs() <= tol {
        Ordering::Equal
    } else if a > b {
        Ordering::Greater
    } else {
        Ordering::Less
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn t_interval_matches_reference_values() {
        // x = 1..=5: mean 3, sd √2.5; t(0.975, 4) = 2.776445; half = 2.776445·1.581139/√5.
        let e = mean_interval(&[1.0, 2.0, 3.0, 4.0, 5.0], LEVEL).unwrap();
        assert_eq!(e.n, 5);
        assert!(close(e.mean, 3.0, 1e-12));
        assert!(close(e.sd, 2.5f64.sqrt(), 1e-12));
        let half = 2.776445 * 2.5f64.sqrt() / 5f64.sqrt();
        assert!(close(e.low, 3.0 - half, 1e-5), "{e:?}");
        assert!(close(e.high, 3.0 + half, 1e-5), "{e:?}");
        // Large n: the t interval approaches mean ± 1.96·sd/√n.
        let x: Vec<f64> = (0..10_000).map(|i| (i % 7) as f64).collect();
        let e = mean_interval(&x, LEVEL).unwrap();
        let normal = 1.959964 * e.sd / (x.len() as f64).sqrt();
        assert!(close(e.high - e.mean, normal, 1e-3 * normal), "{e:?}");
        assert!(close(z(LEVEL), 1.959964, 1e-6));
    }

    #[test]
    fn degenerate_means() {
        assert!(mean_interval(&[], LEVEL).is_none());
        let e = mean_interval(&[2.5], LEVEL).unwrap();
        assert_eq!((e.mean, e.low, e.high, e.sd), (2.5, 2.5, 2.5, 0.0));
        let e = mean_interval(&[4.0; 10], LEVEL).unwrap();
        assert_eq!((e.low, e.high, e.sd), (4.0, 4.0, 0.0));
    }

    #[test]
    fn paired_differences_cancel_the_shared_part() {
        let a = [10.0, 20.0, 30.0, 40.0];
        let b = [9.0, 19.0, 29.0, 39.0];
        let d = paired_difference(&a, &b, LEVEL).unwrap();
        assert!(close(d.mean, 1.0, 1e-12) && close(d.low, 1.0, 1e-12));
        assert!(close(d.high, 1.0, 1e-12) && d.sd < 1e-12);
    }

    #[test]
    fn wilson_agrees_with_the_reward_crate_and_reference_values() {
        for (k, n) in [(0, 10), (3, 10), (10, 10), (57, 100), (1, 1)] {
            let ours = wilson(k as f64, n, LEVEL);
            let theirs = reward::eval::wilson(k as f64, n, LEVEL);
            assert!(close(ours.0, theirs.0, 1e-12) && close(ours.1, theirs.1, 1e-12));
        }
        // statsmodels proportion_confint(3, 10, method="wilson"): (0.10779, 0.60322).
        let (lo, hi) = wilson(3.0, 10, LEVEL);
        assert!(
            close(lo, 0.10779, 1e-5) && close(hi, 0.60322, 1e-5),
            "{lo} {hi}"
        );
        assert_eq!(wilson(0.0, 0, LEVEL), (0.0, 1.0));
    }

    #[test]
    fn win_rate_counts_ties_as_half() {
        use Ordering::*;
        // 2 wins, 2 ties, 1 loss: (2 + 1) / 5.
        let w = win_rate(&[Greater, Equal, Less, Greater, Equal], LEVEL).unwrap();
        assert_eq!((w.wins, w.ties, w.losses, w.n), (2, 2, 1, 5));
        assert!(close(w.rate, 0.6, 1e-12));
        let (lo, hi) = wilson(3.0, 5, LEVEL);
        assert_eq!((w.low, w.high), (lo, hi));
        assert!(w.low <= w.rate && w.rate <= w.high);
        // All ties: exactly one half, with a symmetric interval.
        let w = win_rate(&[Equal; 8], LEVEL).unwrap();
        assert_eq!(w.rate, 0.5);
        assert!(close(w.low, 1.0 - w.high, 1e-12));
        // Fractional successes sit between the neighbouring whole ones.
        let (a, _) = wilson(2.0, 5, LEVEL);
        let (b, _) = wilson(3.0, 5, LEVEL);
        let (m, _) = wilson(2.5, 5, LEVEL);
        assert!(a < m && m < b);
        assert!(win_rate(&[], LEVEL).is_none());
        assert_eq!(compare(1.0, 1.0 + 1e-7, 1e-6), Equal);
        assert_eq!(compare(1.1, 1.0, 1e-6), Greater);
        assert_eq!(compare(0.9, 1.0, 1e-6), Less);
    }

    #[test]
    fn pearson_matches_hand_computed_values() {
        // x = 1..=5, y = 2 1 4 3 5: deviations (−2 −1 0 1 2) and (−1 −2 1 0 2), Σdxdy = 8,
        // Σdx² = Σdy² = 10, r = 0.8. Fisher, n = 5:
        // math.tanh(math.atanh(0.8) ∓ 1.959964 / math.sqrt(2)) = −0.279640, 0.986196.
        let c = pearson(
            &[1.0, 2.0, 3.0, 4.0, 5.0],
            &[2.0, 1.0, 4.0, 3.0, 5.0],
            LEVEL,
        )
        .unwrap();
        assert_eq!(c.n, 5);
        assert!(close(c.r, 0.8, 1e-12), "{c:?}");
        assert!(
            close(c.low, -0.279640, 1e-6) && close(c.high, 0.986196, 1e-6),
            "{c:?}"
        );
        // A perfect negative line; exact ±1 keeps a degenerate interval.
        let c = pearson(&[1.0, 2.0, 3.0, 4.0], &[8.0, 6.0, 4.0, 2.0], LEVEL).unwrap();
        assert!(close(c.r, -1.0, 1e-12), "{c:?}");
        assert!(
            close(c.low, -1.0, 1e-12) && close(c.high, -1.0, 1e-12),
            "{c:?}"
        );
        // Three pairs: r = 0.5 ((−1 0 1)·(0 −1 1) = 1 over √2·√2), no interval yet.
        let c = pearson(&[1.0, 2.0, 3.0], &[1.0, 0.0, 2.0], LEVEL).unwrap();
        assert!(
            close(c.r, 0.5, 1e-12) && (c.low, c.high) == (-1.0, 1.0),
            "{c:?}"
        );
        // Constant lengths, or one pair: none.
        assert!(pearson(&[12.0; 4], &[1.0, 2.0, 3.0, 4.0], LEVEL).is_none());
        assert!(pearson(&[1.0], &[2.0], LEVEL).is_none());
    }

    #[test]
    fn rates_use_wilson() {
        let r = rate(&[1.0, 0.0, 1.0, 1.0], LEVEL).unwrap();
        assert_eq!((r.successes, r.n, r.rate), (3.0, 4, 0.75));
        assert_eq!((r.low, r.high), wilson(3.0, 4, LEVEL));
        let r = rate(&[0.0; 6], LEVEL).unwrap();
        assert_eq!((r.rate, r.low), (0.0, 0.0));
        assert!(r.high > 0.0);
        assert!(rate(&[], LEVEL).is_none());
    }
}
