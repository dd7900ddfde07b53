//! The over-optimisation monitor, without gold (Gao et al. 2022: the proxy reward keeps rising
//! while the true reward peaks and falls). Every iteration records the proxy (the mean score of the
//! reward being optimised) and a held-out signal: the mean score of a reward model trained on
//! prompts the optimised one never saw (`monitor/` of an ensemble, or `monitor.reward_model`), or
//! else an ensemble's lower bound (members' mean − std). A warning is raised when, over the last
//! `window` iterations against the `window` before them, the proxy rose and the held-out signal
//! fell, each by more than twice its standard error (Welch). `best/` is the checkpoint whose
//! held-out signal, averaged over the last `window` iterations, is the highest among those the
//! monitor still trusts ([`Monitor::trusts`]): none after the first warning, and none whose KL
//! from the SFT model (averaged alike) is past `monitor.max_kl` — a policy far from the SFT model
//! can fool the held-out model as well as the proxy (seen on the task suite with β = 0: the gold
//! peaked at 1–8 nats per response and fell to 0 beyond, while the held-out score climbed again).

use serde::{Deserialize, Serialize};

/// The per-iteration history (stored in checkpoints so that a resumed run warns and picks
/// `best/` as the uninterrupted one does).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Monitor {
    pub window: usize,
    pub proxy: Vec<f64>,
    pub heldout: Vec<f64>,
    /// Iterations at which a warning was raised.
    pub warnings: Vec<usize>,
    /// The KL from the reference per response, per iteration.
    #[serde(default)]
    pub kl: Vec<f64>,
}

/// A trend over two consecutive windows: the later mean minus the earlier, and its standard error.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Trend {
    pub change: f64,
    pub se: f64,
}

impl Trend {
    /// The change of the mean of `v`'s last `w` values over the `w` before them; None with fewer
    /// than 2·w values.
    pub fn of(v: &[f64], w: usize) -> Option<Trend> {
        if w < 2 || v.len() < 2 * w {
            return None;
        }
        let (a, b) = (&v[v.len() - 2 * w..v.len() - w], &v[v.len() - w..]);
        let (ma, va) = mean_var(a);
        let (mb, vb) = mean_var(b);
        Some(Trend {
            change: mb - ma,
            se: (va / w as f64 + vb / w as f64).sqrt(),
        })
    }

    pub fn rose(&self) -> bool {
        self.change > 2.0 * self.se
    }

    pub fn fell(&self) -> bool {
        self.change < -2.0 * self.se
    }
}

/// Mean and unbiased variance.
fn mean_var(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (m, var)
}

/// What one iteration's record says.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Verdict {
    pub proxy: Option<Trend>,
    pub heldout: Option<Trend>,
    /// The proxy rose while the held-out signal fell.
    pub warning: bool,
}

impl Monitor {
    pub fn new(window: usize) -> Self {
        Self {
            window,
            ..Self::default()
        }
    }

    /// Records iteration `it` (0-based) and says whether the two trends disagree.
    pub fn record(&mut self, it: usize, proxy: f64, heldout: f64) -> Verdict {
        self.proxy.push(proxy);
        self.heldout.push(heldout);
        let p = Trend::of(&self.proxy, self.window);
        let h = Trend::of(&self.heldout, self.window);
        let warning = matches!((p, h), (Some(p), Some(h)) if p.rose() && h.fell());
        if warning {
            self.warnings.push(it);
        }
        Verdict {
            proxy: p,
            heldout: h,
            warning,
        }
    }

    /// The held-out signal averaged over the last `window` iterations (fewer at the start).
    pub fn smoothed_heldout(&self) -> f64 {
        tail_mean(&self.heldout, self.window)
    }

    /// Records an iteration's KL from the reference (mean per response).
    pub fn record_kl(&mut self, kl: f64) {
        self.kl.push(kl);
    }

    /// The KL averaged over the last `window` iterations.
    pub fn smoothed_kl(&self) -> f64 {
        tail_mean(&self.kl, self.window)
    }

    /// Whether the held-out signal may still pick `best/`: no warning yet, and the smoothed KL
    /// within `max_kl` (0: no limit).
    pub fn trusts(&self, max_kl: f64) -> bool {
        self.warnings.is_empty() && (max_kl <= 0.0 || self.smoothed_kl() <= max_kl)
    }
}

/// The mean of the last `w` values (of all, when fewer; 0 when none).
fn tail_mean(v: &[f64], w: usize) -> f64 {
    let w = w.max(1).min(v.len().max(1));
    let tail = &v[v.len().saturating_sub(w)..];
    tail.iter().sum::<f64>() / tail.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_is_trusted_only_before_a_warning_and_within_the_kl_budget() {
        let mut m = Monitor::new(3);
        for kl in [1.0, 2.0, 3.0] {
            m.record_kl(kl);
        }
        assert_eq!(m.smoothed_kl(), 2.0);
        assert!(m.trusts(6.0));
        // The last three average 7 > 6: not trusted, and trusted again once back within.
        for kl in [6.0, 7.0, 8.0] {
            m.record_kl(kl);
        }
        assert_eq!(m.smoothed_kl(), 7.0);
        assert!(!m.trusts(6.0));
        assert!(m.trusts(0.0), "0 is no limit");
        for kl in [5.0, 5.0, 5.0] {
            m.record_kl(kl);
        }
        assert!(m.trusts(6.0));
        // A warning ends the trust for good.
        m.warnings.push(9);
        assert!(!m.trusts(6.0) && !m.trusts(0.0));
    }

    #[test]
    fn warns_only_when_the_proxy_rises_and_the_heldout_signal_falls() {
        // 10 flat iterations, then the proxy climbs while the held-out signal drops.
        let mut m = Monitor::new(5);
        let mut warned = Vec::new();
        for it in 0..20 {
            let wiggle = if it % 2 == 0 { 0.01 } else { -0.01 };
            let (p, h) = if it < 10 {
                (wiggle, 0.5 + wiggle)
            } else {
                (
                    0.1 * (it - 9) as f64 + wiggle,
                    0.5 - 0.05 * (it - 9) as f64 + wiggle,
                )
            };
            if m.record(it, p, h).warning {
                warned.push(it);
            }
        }
        // The first window pair that straddles the change has both trends clear of 2 s.e.
        assert!(!warned.is_empty());
        assert!(warned.iter().all(|&it| it >= 10), "{warned:?}");
        assert_eq!(m.warnings, warned);
        // Both rising: no warning.
        let mut m = Monitor::new(5);
        for it in 0..20 {
            let v = it as f64 * 0.1;
            assert!(!m.record(it, v, v).warning);
        }
    }

    #[test]
    fn trends_need_two_windows_and_have_welch_errors() {
        assert_eq!(Trend::of(&[1.0, 2.0, 3.0], 2), None);
        let t = Trend::of(&[1.0, 3.0, 5.0, 7.0], 2).unwrap();
        // Means 2 and 6; variances 2 and 2: se = sqrt(2/2 + 2/2).
        assert!((t.change - 4.0).abs() < 1e-12);
        assert!((t.se - 2f64.sqrt()).abs() < 1e-12);
        assert!(t.rose() && !t.fell());
    }

    #[test]
    fn smoothed_heldout_averages_the_last_window() {
        let mut m = Monitor::new(3);
        for (i, v) in [1.0, 2.0, 3.0, 4.0, 5.0].into_iter().enumerate() {
            m.record(i, 0.0, v);
        }
        assert!((m.smoothed_heldout() - 4.0).abs() < 1e-12);
        let mut m = Monitor::new(3);
        m.record(0, 0.0, 7.0);
        assert!((m.smoothed_heldout() - 7.0).abs() < 1e-12);
    }
}
