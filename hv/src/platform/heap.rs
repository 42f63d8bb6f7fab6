//! The kernel heap (`alloc`): a linked-list allocator over a region the frame allocator set
//! aside at boot. Invariant: `init` runs once, before the first allocation.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

pub fn init(start: u64, size: u64) {
    unsafe { HEAP.lock().init(start as *mut u8, size as usize) }
}

/// Bytes currently allocated on the heap.
pub fn used() -> usize {
    HEAP.lock().used()
}
