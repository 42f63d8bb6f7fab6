//! The kernel heap (`alloc`): a linked-list allocator over a region the frame allocator set
//! aside at boot.
//!
//! Invariant: `init` runs once, before the first allocation, with a region nothing else uses.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Hands `[start, start + size)` to the allocator.
///
/// # Safety
/// Called once, before the first allocation, with identity-mapped RAM that nothing else uses
/// for the kernel's whole life (the region `frames::init` reserved for the heap).
pub unsafe fn init(start: u64, size: u64) {
    // SAFETY: the caller's promise is `LockedHeap::init`'s contract (a valid, unused region,
    // given once).
    unsafe { HEAP.lock().init(start as *mut u8, size as usize) }
}

/// Bytes currently allocated on the heap.
pub fn used() -> usize {
    HEAP.lock().used()
}
