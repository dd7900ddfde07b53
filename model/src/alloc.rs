//! A global allocator that keeps freed blocks of 16 MiB and more for the next allocation of the
//! same size, as PyTorch's caching allocator does: the binaries declare it
//! (`#[global_allocator] static A: model::alloc::KeepLarge = model::alloc::KeepLarge;`).
//!
//! [`crate::device::tune_allocator`] makes glibc serve every size from its heaps and never trim
//! them, but one case escapes it: a worker thread's arena holds at most 64 MiB, and glibc maps
//! anything larger that such a thread asks for with its own `mmap`, whatever `M_MMAP_MAX` says,
//! and unmaps it on free. The logits of a training step are such a block ([8, 128, 16384] f32 is
//! 67 MB, and with a 32k vocabulary and 512 positions they pass 500 MB), and so is their
//! gradient: every step faulted them in and zeroed them page by page again (`model bench --shape
//! medium`: ~34k page faults per training step, `perf stat -e minor-faults`).
//!
//! Blocks are matched by exact size and alignment (a training loop asks for the same shapes
//! every step); at most [`SLOTS`] blocks and [`KEEP_BYTES`] are kept, the oldest handed back
//! first. Off until [`enable`] (which `tune_allocator` calls): until then, and below 16 MiB,
//! every call goes straight to the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Blocks at least this large are kept when freed.
pub const LARGE: usize = 16 << 20;
/// Most blocks kept at once.
pub const SLOTS: usize = 16;
/// Most bytes kept at once.
pub const KEEP_BYTES: usize = 4 << 30;

static ON: AtomicBool = AtomicBool::new(false);

/// Kept blocks, oldest first: (address, size, alignment). A fixed array, so that the allocator
/// never allocates while holding the lock.
struct Kept {
    blocks: [(usize, usize, usize); SLOTS],
    len: usize,
    bytes: usize,
}

static KEPT: Mutex<Kept> = Mutex::new(Kept {
    blocks: [(0, 0, 0); SLOTS],
    len: 0,
    bytes: 0,
});

/// Turns keeping on for the rest of the process.
pub fn enable() {
    ON.store(true, Ordering::Relaxed);
}

/// The system allocator, keeping freed blocks of [`LARGE`] bytes and more for reuse.
pub struct KeepLarge;

impl KeepLarge {
    /// A kept block of exactly this layout, taken out of the cache.
    fn take(layout: Layout) -> Option<*mut u8> {
        let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
        let len = kept.len;
        let i = kept.blocks[..len]
            .iter()
            .position(|&(_, size, align)| size == layout.size() && align == layout.align())?;
        let (ptr, size, _) = kept.blocks[i];
        kept.blocks.copy_within(i + 1..len, i);
        kept.len -= 1;
        kept.bytes -= size;
        Some(ptr as *mut u8)
    }

    /// Keeps a freed block; hands back to the system what no longer fits (the oldest first, or
    /// this one when it alone is over the limit).
    ///
    /// # Safety
    /// `ptr` was allocated by this allocator with `layout` and is not used after this call.
    unsafe fn keep(ptr: *mut u8, layout: Layout) {
        let mut evicted = [(0usize, 0usize, 0usize); SLOTS];
        let mut n = 0;
        {
            let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
            if layout.size() > KEEP_BYTES {
                drop(kept);
                // SAFETY: the caller's contract.
                unsafe { System.dealloc(ptr, layout) };
                return;
            }
            while kept.len == SLOTS || kept.bytes + layout.size() > KEEP_BYTES {
                evicted[n] = kept.blocks[0];
                n += 1;
                let (_, size, _) = kept.blocks[0];
                let len = kept.len;
                kept.blocks.copy_within(1..len, 0);
                kept.len -= 1;
                kept.bytes -= size;
            }
            let len = kept.len;
            kept.blocks[len] = (ptr as usize, layout.size(), layout.align());
            kept.len += 1;
            kept.bytes += layout.size();
        }
        for &(p, size, align) in &evicted[..n] {
            // SAFETY: a kept block, allocated by the system with this size and alignment, owned
            // by the cache alone until now.
            unsafe { System.dealloc(p as *mut u8, Layout::from_size_align_unchecked(size, align)) };
        }
    }
}

// SAFETY: every block handed out is either fresh from `System` or a block of exactly the same
// size and alignment that was freed to this allocator and is owned by no one else; blocks go
// back to `System` with the layout they were allocated with.
unsafe impl GlobalAlloc for KeepLarge {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= LARGE
            && ON.load(Ordering::Relaxed)
            && let Some(p) = Self::take(layout)
        {
            return p;
        }
        // SAFETY: the caller's contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= LARGE
            && ON.load(Ordering::Relaxed)
            && let Some(p) = Self::take(layout)
        {
            // SAFETY: the block holds layout.size() bytes.
            unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
            return p;
        }
        // SAFETY: the caller's contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= LARGE && ON.load(Ordering::Relaxed) {
            // SAFETY: the caller's contract.
            unsafe { Self::keep(ptr, layout) };
            return;
        }
        // SAFETY: the caller's contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A freed large block is handed out again for the same layout (and zeroed when asked), not
    /// for another; the cache never holds more than its slots.
    #[test]
    fn a_freed_large_block_serves_the_next_request_of_its_size() {
        enable();
        let a = KeepLarge;
        let layout = Layout::from_size_align(LARGE + 4096, 64).unwrap();
        // SAFETY: layouts of non-zero size; each block is freed once with its own layout.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            p.write_bytes(7, layout.size());
            a.dealloc(p, layout);
            let q = a.alloc_zeroed(layout);
            assert_eq!(q, p, "the kept block comes back");
            assert!(
                std::slice::from_raw_parts(q, layout.size())
                    .iter()
                    .all(|&b| b == 0)
            );
            let other = Layout::from_size_align(LARGE + 8192, 64).unwrap();
            let r = a.alloc(other);
            assert_ne!(r, q);
            a.dealloc(r, other);
            a.dealloc(q, layout);
            // More frees than slots: the oldest go back to the system.
            let many: Vec<_> = (0..SLOTS + 3)
                .map(|i| {
                    let l = Layout::from_size_align(LARGE + i * 4096, 64).unwrap();
                    (a.alloc(l), l)
                })
                .collect();
            for &(p, l) in &many {
                a.dealloc(p, l);
            }
            assert_eq!(KEPT.lock().unwrap().len, SLOTS);
        }
    }
}
