//! A global allocator that keeps freed blocks of 16 MiB and more for the next allocation of the
//! same size class, as PyTorch's caching allocator does: the binaries declare it through
//! [`crate::runtime`] (`model::global_allocator!()`).
//!
//! [`crate::device::tune_allocator`] makes glibc serve every size from its heaps and never trim
//! them, but one case escapes it: a worker thread's arena holds at most 64 MiB, and glibc maps
//! anything larger that such a thread asks for with its own `mmap`, whatever `M_MMAP_MAX` says,
//! and unmaps it on free. The logits of a training step are such a block ([8, 128, 16384] f32 is
//! 67 MB, and with a 32k vocabulary and 512 positions they pass 500 MB), and so is their
//! gradient: every step faulted them in and zeroed them page by page again (`model bench --shape
//! medium`: ~34k page faults per training step, `perf stat -e minor-faults`).
//!
//! Large requests are rounded up to a size class (eighths of a power of two: at most 12.5% more
//! address space, never touched unless used), so that batches padded to slightly different
//! lengths reuse each other's blocks; at most [`SLOTS`] blocks and [`KEEP_BYTES`] are kept, the
//! oldest handed back first. Keeping is off until [`enable`] (which `tune_allocator` calls);
//! below 16 MiB every call goes straight to the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Blocks at least this large are kept when freed.
pub const LARGE: usize = 16 << 20;
/// Most blocks kept at once.
pub const SLOTS: usize = 16;
/// Most bytes kept at once.
pub const KEEP_BYTES: usize = 2 << 30;

/// The size a request of `size` bytes is served with: itself below [`LARGE`], else rounded up to
/// a multiple of an eighth of its power of two.
pub fn class(size: usize) -> usize {
    if size < LARGE {
        return size;
    }
    let step = 1usize << (usize::BITS - 1 - size.leading_zeros() - 3);
    size.div_ceil(step) * step
}

/// `layout` with its size class (itself where the class would not be a valid layout, near
/// `isize::MAX`: the same answer for the same size, at allocation and at free).
fn classed(layout: Layout) -> Layout {
    Layout::from_size_align(class(layout.size()), layout.align()).unwrap_or(layout)
}

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

// SAFETY: every block of LARGE bytes or more is allocated from `System` with its size class and
// handed back to it with that same layout (a request's class depends on its size alone); a kept
// block is handed out only for a request of its class and alignment, and is owned by no one else.
unsafe impl GlobalAlloc for KeepLarge {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() < LARGE {
            // SAFETY: the caller's contract.
            return unsafe { System.alloc(layout) };
        }
        let layout = classed(layout);
        if ON.load(Ordering::Relaxed)
            && let Some(p) = Self::take(layout)
        {
            return p;
        }
        // SAFETY: the caller's contract, for a larger size.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() < LARGE {
            // SAFETY: the caller's contract.
            return unsafe { System.alloc_zeroed(layout) };
        }
        let size = layout.size();
        let layout = classed(layout);
        if ON.load(Ordering::Relaxed)
            && let Some(p) = Self::take(layout)
        {
            // SAFETY: the block holds at least `size` bytes.
            unsafe { std::ptr::write_bytes(p, 0, size) };
            return p;
        }
        // SAFETY: the caller's contract, for a larger size.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() < LARGE {
            // SAFETY: the caller's contract.
            return unsafe { System.dealloc(ptr, layout) };
        }
        let layout = classed(layout);
        if ON.load(Ordering::Relaxed) {
            // SAFETY: the caller's contract; the block was allocated with its class.
            unsafe { Self::keep(ptr, layout) };
        } else {
            // SAFETY: as above.
            unsafe { System.dealloc(ptr, layout) };
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < LARGE && new_size < LARGE {
            // SAFETY: the caller's contract.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        if class(layout.size()) == class(new_size) {
            // The block already has the room.
            return ptr;
        }
        // SAFETY: the caller's contract: a valid new layout, `ptr` live with `layout`.
        unsafe {
            let new = Layout::from_size_align_unchecked(new_size, layout.align());
            let p = self.alloc(new);
            if !p.is_null() {
                std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            p
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_eighths_of_their_power_of_two() {
        assert_eq!(class(1000), 1000);
        assert_eq!(class(LARGE), LARGE);
        assert_eq!(class(LARGE + 1), LARGE + (2 << 20));
        assert_eq!(class(67_108_864 + 1), 67_108_864 + (8 << 20));
        let big = 537_000_000;
        assert!(class(big) >= big && class(big) <= big + big / 8);
    }

    /// A freed large block is handed out again for a request of its size class (zeroed when
    /// asked), not for another class; growing within the class keeps the block; the cache never
    /// holds more than its slots.
    #[test]
    fn a_freed_large_block_serves_the_next_request_of_its_class() {
        enable();
        let a = KeepLarge;
        let layout = Layout::from_size_align(LARGE + 4096, 64).unwrap();
        // SAFETY: layouts of non-zero size; each block is freed once with the layout it was last
        // allocated or reallocated with.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            p.write_bytes(7, layout.size());
            a.dealloc(p, layout);
            // Another length of the same class (a batch padded a little longer).
            let near = Layout::from_size_align(LARGE + 8192, 64).unwrap();
            let q = a.alloc_zeroed(near);
            assert_eq!(q, p, "the kept block comes back");
            assert!(
                std::slice::from_raw_parts(q, near.size())
                    .iter()
                    .all(|&b| b == 0)
            );
            let grown = a.realloc(q, near, LARGE + (1 << 20));
            assert_eq!(grown, q, "room within the class");
            let other = Layout::from_size_align(2 * LARGE, 64).unwrap();
            let r = a.alloc(other);
            assert_ne!(r, q);
            a.dealloc(r, other);
            a.dealloc(
                grown,
                Layout::from_size_align(LARGE + (1 << 20), 64).unwrap(),
            );
            // More frees than slots, each of its own class (16 + 2i MiB, then 32 + 4i MiB, ...;
            // ~0.8 GiB of address space, never touched): the oldest go back to the system.
            let many: Vec<_> = (0..SLOTS + 3)
                .map(|i| {
                    let (octave, step) = (i / 8, i % 8);
                    let size = (LARGE << octave) + step * ((LARGE << octave) / 8);
                    let l = Layout::from_size_align(size, 64).unwrap();
                    let p = a.alloc(l);
                    assert!(!p.is_null());
                    (p, l)
                })
                .collect();
            let classes: std::collections::HashSet<_> =
                many.iter().map(|(_, l)| class(l.size())).collect();
            assert_eq!(classes.len(), SLOTS + 3);
            for &(p, l) in &many {
                a.dealloc(p, l);
            }
            let kept = KEPT.lock().unwrap();
            assert!(
                kept.len <= SLOTS && kept.bytes <= KEEP_BYTES,
                "{} {}",
                kept.len,
                kept.bytes
            );
        }
    }
}
