//! The compute device from a `--device` string: `cpu`, or `cuda:N` (LibTorch builds only).
//!
//! Backend choice is a build feature: `flex` (default, pure Rust) or `tch` (LibTorch). When both are
//! compiled in, LibTorch is used.

use crate::error::{ModelError, Result};
use burn::tensor::Device;

/// Which backend this binary computes with.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "tch") { "tch" } else { "flex" }
}

/// Parses `cpu` or `cuda:N` (`cuda` = `cuda:0`).
#[allow(deprecated)] // burn marks its LibTorch devices deprecated; the tch feature keeps them in use.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec == "cpu" {
        #[cfg(feature = "tch")]
        return Ok(Device::libtorch());
        #[cfg(all(feature = "flex", not(feature = "tch")))]
        return Ok(Device::flex());
        #[cfg(not(any(feature = "flex", feature = "tch")))]
        return Err(ModelError::Device(
            spec.into(),
            "no backend compiled in; build with --features flex or tch".into(),
        ));
    }
    if let Some(rest) = spec.strip_prefix("cuda") {
        let index = match rest.strip_prefix(':') {
            Some(n) => n.parse::<usize>().map_err(|_| {
                ModelError::Device(spec.into(), "expected cuda:N with N a GPU index".into())
            })?,
            None if rest.is_empty() => 0,
            None => {
                return Err(ModelError::Device(
                    spec.into(),
                    "expected `cpu` or `cuda:N`".into(),
                ));
            }
        };
        #[cfg(feature = "tch")]
        return Ok(Device::libtorch_cuda(index));
        #[cfg(not(feature = "tch"))]
        {
            let _ = index;
            return Err(ModelError::Device(
                spec.into(),
                "CUDA needs the LibTorch backend: rebuild with `--no-default-features --features tch`"
                    .into(),
            ));
        }
    }
    Err(ModelError::Device(
        spec.into(),
        "expected `cpu` or `cuda:N`".into(),
    ))
}

/// Runs `f` on a thread of the compute pool (rayon's, on flex) and returns its result; on other
/// backends, and when already on a pool thread, runs it here.
///
/// Every CPU operation that splits its work starts a parallel region. Started from a thread
/// outside the pool, a region hands its job over and the caller sleeps until it ends: two
/// wake-ups per region, which for a decoding step's many small regions cost more than the work
/// (generation ran ~15-25% faster inside the pool, a training step ~3%). Started from a pool
/// thread, the job goes on that thread's own queue, where the other thread steals it.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    #[cfg(feature = "flex")]
    return crate::cpu::pool::in_pool(f);
    #[cfg(not(feature = "flex"))]
    f()
}

/// Runs `f` on a pool thread (as [`in_pool`]) while the pool's other threads stay awake, polling
/// for work instead of going to sleep between parallel regions; on other backends, runs `f`.
///
/// For a loop of many short parallel regions (a decoding step has dozens): a sleeping thread
/// is woken through the kernel at each region (a futex wake, and on a virtual machine an
/// inter-processor interrupt), which took ~15% of a small decoding profile. PyTorch's OpenMP
/// threads likewise spin for a while after each region. The cost is that the other threads
/// keep their cores busy while `f` runs. A thread that finds this task queued on itself (the
/// thread running `f`) returns at once. After a few microseconds without work, each poll also
/// yields the core to the operating system, so a serial phase or a second process gets it.
/// `RLHF_NO_SPIN=1` turns this off (plain [`in_pool`]), for a machine shared with other work.
pub fn hot<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    #[cfg(feature = "flex")]
    return crate::cpu::pool::hot(f);
    #[cfg(not(feature = "flex"))]
    f()
}

/// Runs `a` and `b`, side by side on the compute pool's threads (flex), or one after the other
/// (other backends, which thread their own operations); returns both results.
///
/// For two independent pieces of work that are each too small to keep both cores busy on their
/// own (the policy's and the critic's update on one PPO minibatch): each piece still splits its
/// operations across the pool, and an idle thread takes work from either.
pub fn join<RA: Send, RB: Send>(
    a: impl FnOnce() -> RA + Send,
    b: impl FnOnce() -> RB + Send,
) -> (RA, RB) {
    #[cfg(feature = "flex")]
    return rayon::join(a, b);
    #[cfg(not(feature = "flex"))]
    (a(), b())
}

/// Makes glibc's allocator keep freed memory for reuse instead of handing it back to the kernel.
///
/// The CPU backend allocates a fresh buffer for nearly every tensor op, many of them megabytes
/// (logits, activations, gradients). With glibc's defaults each such buffer is its own `mmap`,
/// which the kernel faults in and zeroes page by page on first touch and unmaps on free; on the
/// training step that was about a fifth of the time. Serving all sizes from the heap and never
/// trimming it makes a step reuse the previous step's pages, as PyTorch's caching allocator does;
/// the cost is that the process keeps its peak heap. Called once when a model is built; a no-op
/// elsewhere than glibc Linux, and when `RLHF_KEEP_MALLOC` is set.
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RLHF_KEEP_MALLOC").is_some() {
            return;
        }
        // Blocks glibc would still map and unmap on every step (see `alloc`), in binaries that
        // declare `alloc::KeepLarge` their allocator.
        #[cfg(feature = "flex")]
        crate::cpu::alloc::enable();
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes glibc's allocation policy; it is thread-safe and affects
        // no existing allocation.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `hot` gives f's result from outside the pool and inside it, nested (a generation inside a
    /// training run), and from several threads at once, each with parallel work inside, and
    /// every call returns (its helpers stop).
    #[cfg(feature = "flex")]
    #[test]
    fn hot_runs_nested_and_concurrent_calls_to_the_end() {
        use rayon::prelude::*;
        let work = |n: u64| (0..n).into_par_iter().map(|x| x % 7).sum::<u64>();
        let expect = |n: u64| (0..n).map(|x| x % 7).sum::<u64>();
        assert_eq!(hot(|| work(10_000)), expect(10_000));
        assert_eq!(
            hot(|| hot(|| work(5_000)) + work(100)),
            expect(5_000) + expect(100)
        );
        let handles: Vec<_> = (0..4u64)
            .map(|i| {
                std::thread::spawn(move || {
                    (0..20)
                        .map(|_| hot(|| work(1_000 * (i + 1)) + hot(|| work(300))))
                        .sum::<u64>()
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let n = 1_000 * (i as u64 + 1);
            assert_eq!(h.join().unwrap(), 20 * (expect(n) + expect(300)));
        }
        let (a, b) = join(|| hot(|| work(2_000)), || work(3_000));
        assert_eq!((a, b), (expect(2_000), expect(3_000)));
    }

    #[test]
    fn parses_cpu_and_rejects_nonsense() {
        assert!(parse_device("cpu").is_ok());
        let e = parse_device("gpu0").unwrap_err().to_string();
        assert!(e.contains("expected `cpu` or `cuda:N`"), "{e}");
        let e = parse_device("cuda:x").unwrap_err().to_string();
        assert!(e.contains("cuda:N"), "{e}");
        #[cfg(not(feature = "tch"))]
        {
            let e = parse_device("cuda:0").unwrap_err().to_string();
            assert!(e.contains("--features tch"), "{e}");
        }
    }
}
