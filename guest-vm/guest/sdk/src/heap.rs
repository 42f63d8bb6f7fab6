//! The global allocator: a bump allocator over the heap the host names at entry (`rsi..rdx`,
//! `ABI.md`). `dealloc` gives memory back only when it is the last allocation; an allocation
//! that does not fit returns null, which Rust turns into a panic ("memory allocation of N
//! bytes failed") and the panic handler into `crash`.
//!
//! Invariant: `next` only grows between `start` and `end` (except the last-allocation rollback)
//! and every block handed out lies inside `[start, end)`.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicU64, Ordering};

/// A bump allocator; see the module documentation.
pub struct Bump {
    next: AtomicU64,
    end: AtomicU64,
}

impl Bump {
    pub const fn new() -> Self {
        Bump {
            next: AtomicU64::new(0),
            end: AtomicU64::new(0),
        }
    }

    /// Serves `[start, end)` from now on.
    pub fn init(&self, start: u64, end: u64) {
        self.next.store(start, Ordering::Relaxed);
        self.end.store(end.max(start), Ordering::Relaxed);
    }

    /// Bytes still free.
    pub fn free(&self) -> u64 {
        self.end.load(Ordering::Relaxed) - self.next.load(Ordering::Relaxed)
    }
}

impl Default for Bump {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every block is a fresh range inside the heap (the compare-exchange hands each byte
// out once), aligned as asked; the heap is guest RAM nothing else uses.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let align = layout.align() as u64;
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let Some(start) = cur.checked_add(align - 1).map(|x| x & !(align - 1)) else {
                return core::ptr::null_mut();
            };
            let Some(end) = start.checked_add(layout.size() as u64) else {
                return core::ptr::null_mut();
            };
            if end > self.end.load(Ordering::Relaxed) {
                return core::ptr::null_mut();
            }
            match self
                .next
                .compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return start as *mut u8,
                Err(now) => cur = now,
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let end = ptr as u64 + layout.size() as u64;
        let _ = self
            .next
            .compare_exchange(end, ptr as u64, Ordering::Relaxed, Ordering::Relaxed);
    }
}

#[global_allocator]
pub static HEAP: Bump = Bump::new();
