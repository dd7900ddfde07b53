//! Weight matrices packed for as long as their [`Kept`] handles live, found by the products that
//! read them through the same view (address, strides, shape) at the same precision: the
//! registry behind [`crate::fused::pack_weights`], for both packed formats.

use super::amx::{PackedB, View};
use super::skinny::PackedF32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// A matrix packed for the products that will read it: bf16 tile panels ([`PackedB`]) for
/// bf16 products, or f32 panels for few-row f32 products ([`PackedF32`]).
pub enum PackedWeight {
    Bf16(PackedB),
    F32(PackedF32),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Key {
    addr: usize,
    rs: isize,
    cs: isize,
    k: usize,
    n: usize,
    bf16: bool,
}

impl Key {
    fn of(b: &View, k: usize, n: usize, bf16: bool) -> Self {
        Self {
            addr: b.ptr as usize,
            rs: b.rs,
            cs: b.cs,
            k,
            n,
            bf16,
        }
    }
}

struct Entry {
    key: Key,
    packed: Arc<PackedWeight>,
    /// Handles that keep it (two generations with one model at once share the entry).
    holders: usize,
}

static ENTRIES: RwLock<Vec<Entry>> = RwLock::new(Vec::new());
/// ENTRIES' length, read without the lock by every product.
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// Keeps B packed until the handle is dropped.
pub struct Kept(Key);

impl Kept {
    /// Whether B is packed for bf16 products.
    pub fn bf16(&self) -> bool {
        self.0.bf16
    }
}

/// Packs B for bf16 products (`bf16`; None without AMX) or for few-row f32 products (None
/// without AVX-512), found by the products that read the matrix through `key` (B's own view,
/// or, for a weight stored in bf16, the view of its bf16 memory that `b` was widened from).
///
/// # Safety
/// `b` describes a k × n matrix inside a live allocation (read during the call only); `key`'s
/// memory stays alive and unchanged until the returned handle is dropped.
pub unsafe fn keep(key: View, b: View, k: usize, n: usize, bf16: bool) -> Option<Kept> {
    let key = Key::of(&key, k, n, bf16);
    let held = |entries: &mut Vec<Entry>| {
        let e = entries.iter_mut().find(|e| e.key == key)?;
        e.holders += 1;
        Some(Kept(key))
    };
    if let Some(kept) = held(&mut ENTRIES.write().unwrap_or_else(|e| e.into_inner())) {
        return Some(kept);
    }
    // Packed without the lock: packing runs parallel work, during which this thread may
    // take other tasks, and none of them may wait on a lock it holds.
    // SAFETY: as this function's contract.
    let packed = unsafe {
        if bf16 {
            PackedWeight::Bf16(PackedB::new(b, k, n)?)
        } else {
            PackedWeight::F32(PackedF32::new(b, k, n)?)
        }
    };
    let mut entries = ENTRIES.write().unwrap_or_else(|e| e.into_inner());
    // Another generation may have packed the same matrix meanwhile: share its copy.
    if let Some(kept) = held(&mut entries) {
        return Some(kept);
    }
    entries.push(Entry {
        key,
        packed: Arc::new(packed),
        holders: 1,
    });
    COUNT.store(entries.len(), Ordering::Release);
    Some(Kept(key))
}

impl Drop for Kept {
    fn drop(&mut self) {
        let mut entries = ENTRIES.write().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = entries.iter().position(|e| e.key == self.0) {
            entries[i].holders -= 1;
            if entries[i].holders == 0 {
                entries.swap_remove(i);
            }
        }
        COUNT.store(entries.len(), Ordering::Release);
    }
}

/// The packed copy of the k × n matrix `b` views, for `bf16` or f32 products, if one is kept.
pub fn find(b: &View, k: usize, n: usize, bf16: bool) -> Option<Arc<PackedWeight>> {
    if COUNT.load(Ordering::Acquire) == 0 {
        return None;
    }
    let key = Key::of(b, k, n, bf16);
    let entries = ENTRIES.read().unwrap_or_else(|e| e.into_inner());
    entries
        .iter()
        .find(|e| e.key == key)
        .map(|e| e.packed.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kept matrix is found through its view, at its precision, until the last of its handles
    /// is dropped; another view of the same memory, or another shape, is another matrix.
    #[test]
    fn kept_matrices_are_found_by_view_until_the_last_handle_goes() {
        let bf16 = super::super::amx::available();
        // SAFETY: a 32 x 32 matrix.
        let probe = unsafe {
            PackedF32::new(
                View {
                    ptr: [0f32; 1024].as_ptr(),
                    rs: 32,
                    cs: 1,
                },
                32,
                32,
            )
        };
        if !bf16 && probe.is_none() {
            eprintln!("neither AMX nor AVX-512: nothing is packed on this machine");
            return;
        }
        let b: Vec<f32> = (0..64 * 48).map(|x| x as f32).collect();
        let vb = View {
            ptr: b.as_ptr(),
            rs: 48,
            cs: 1,
        };
        let transposed = View {
            ptr: b.as_ptr(),
            rs: 1,
            cs: 64,
        };
        // SAFETY: b outlives both handles.
        let (first, second) = unsafe { (keep(vb, vb, 64, 48, bf16), keep(vb, vb, 64, 48, bf16)) };
        assert!(first.is_some() && second.is_some());
        assert!(find(&vb, 64, 48, bf16).is_some());
        assert!(
            find(&vb, 64, 48, !bf16).is_none(),
            "kept at one precision only"
        );
        assert!(find(&transposed, 48, 64, bf16).is_none());
        assert!(find(&vb, 64, 32, bf16).is_none());
        drop(first);
        assert!(
            find(&vb, 64, 48, bf16).is_some(),
            "the second handle still keeps it"
        );
        drop(second);
        assert!(find(&vb, 64, 48, bf16).is_none());
    }
}
