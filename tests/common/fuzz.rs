//! What the fuzz tests of issue 29 share (`#[path]`-included by `*/tests/fuzz.rs`): the capped
//! allocator, the case count and byte-level edits of a valid file. Each test keeps its own list of
//! hostile insertions, since what is hostile depends on the reader.

use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};

/// The system allocator, refusing any one allocation over 1 GiB: a reader that sizes a buffer by
/// what a hostile file declares aborts the test instead of swapping the machine.
pub struct Capped;

pub const MAX_ALLOCATION: usize = 1 << 30;

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

/// Cases per property: `default`, or `FUZZ_CASES` for a long run.
pub fn cases(default: u32) -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// One change to a file's bytes.
#[derive(Clone, Debug)]
pub enum Edit {
    /// Cut the file at this fraction (of u16::MAX) of its length.
    Truncate(u16),
    /// Replace the byte at this position (mod the length).
    Set(usize, u8),
    /// Insert hostile text at this position.
    Insert(usize, Vec<u8>),
}

/// Truncations, byte flips and insertions of `hostile` text.
pub fn edit(hostile: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<u16>().prop_map(Edit::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<usize>(), hostile).prop_map(|(i, s)| Edit::Insert(i, s)),
    ]
}

pub fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        match e {
            Edit::Truncate(f) => {
                let n = bytes.len() * *f as usize / u16::MAX as usize;
                bytes.truncate(n);
            }
            Edit::Set(i, b) if !bytes.is_empty() => {
                let n = bytes.len();
                bytes[i % n] = *b;
            }
            Edit::Set(..) => {}
            Edit::Insert(i, s) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, s.iter().copied());
            }
        }
    }
    bytes
}
