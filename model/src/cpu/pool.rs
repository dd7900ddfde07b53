//! The compute thread pool of the flex backend (rayon's, which burn-flex splits its operations
//! across): [`crate::device::in_pool`] and [`crate::device::hot`] on this backend.

/// Idle polls of [`hot`]'s helper threads before each further poll also yields the core to the
/// operating system (a few microseconds of spinning).
const SPINS: u32 = 2000;

/// [`crate::device::in_pool`]: `f` on a pool thread.
pub(crate) fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_none() {
        return rayon::scope(|_| f());
    }
    f()
}

/// [`crate::device::hot`]: `f` on a pool thread while the other pool threads poll for work.
pub(crate) fn hot<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    in_pool(|| {
        use std::sync::atomic::{AtomicBool, Ordering};
        // One `hot` region at a time in the process: a call made while another runs (a
        // generation inside a stage binary, or concurrent callers) runs as `in_pool`. With two
        // regions' helpers, each helper could be stolen by a thread waiting inside the other
        // region's body and spin there until the other region ends, which it never would.
        // With one, the helper task is the oldest on its region's queue and is stolen before
        // any of the region's work, so it never spins on top of work its region waits for.
        static ACTIVE: AtomicBool = AtomicBool::new(false);
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *OFF.get_or_init(|| std::env::var_os("RLHF_NO_SPIN").is_some())
            || ACTIVE
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return f();
        }
        struct Release;
        impl Drop for Release {
            fn drop(&mut self) {
                ACTIVE.store(false, Ordering::Release);
            }
        }
        let _release = Release;
        let runner = rayon::current_thread_index();
        let done = AtomicBool::new(false);
        rayon::scope(|s| {
            for _ in 1..rayon::current_num_threads() {
                s.spawn(|_| {
                    if rayon::current_thread_index() == runner {
                        return;
                    }
                    let mut idle = 0u32;
                    while !done.load(Ordering::Acquire) {
                        if rayon::yield_now() == Some(rayon::Yield::Executed) {
                            idle = 0;
                        } else if idle < SPINS {
                            idle += 1;
                            std::hint::spin_loop();
                        } else {
                            // Long idle (I/O, a serial phase): offer the core to any other
                            // runnable process, which this returns at once without.
                            std::thread::yield_now();
                        }
                    }
                });
            }
            // Stops the helpers when f returns or unwinds (a panic must not leave them spinning
            // and the scope waiting for them).
            struct Stop<'a>(&'a AtomicBool);
            impl Drop for Stop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Release);
                }
            }
            let _stop = Stop(&done);
            f()
        })
    })
}
