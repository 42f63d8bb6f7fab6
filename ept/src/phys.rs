//! Where page-table frames come from: the `PhysMem` trait, and `HeapPhysMem`, a host
//! implementation backed by heap memory that hands out fake physical addresses.
//!
//! Invariants of `HeapPhysMem`:
//! - every frame it hands out is 4 KiB, zeroed, and has a distinct fake physical address
//!   `HEAP_PHYS_BASE + index * 4096` (never 0, below 2^52);
//! - `live_frames() == allocated_frames() - freed_frames()` at all times; a free of an address it
//!   did not hand out (or already freed) changes nothing and is counted in `bad_frees()`;
//! - a frame's memory stays at the same host address until the `HeapPhysMem` is dropped (chunks
//!   are never moved or released early), so `frame_ptr` needs no lock.

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use crate::PAGE_SIZE;

/// A source of 4 KiB page-table frames and a way to reach them.
///
/// # Safety
/// Implementations guarantee that a frame returned by `alloc_frame` is 4 KiB, 4 KiB-aligned in
/// physical address, zero-filled, not handed out again until freed, and that `frame_ptr` of
/// that address yields a pointer valid for reads and writes of 512 `u64`s (8-byte aligned) until
/// the frame is freed. Tables write entries through that pointer and hardware (or tests) may
/// walk them at the physical address.
pub unsafe trait PhysMem {
    /// A zeroed 4 KiB frame's physical address, or `None` when memory is exhausted.
    fn alloc_frame(&self) -> Option<u64>;
    /// Returns a frame obtained from `alloc_frame`.
    ///
    /// # Safety
    /// `pa` came from `alloc_frame` of this `PhysMem` and is not used (by software or by a
    /// hardware walker) afterwards.
    unsafe fn free_frame(&self, pa: u64);
    /// A pointer to the 512 entries of the frame at `pa` (a frame this `PhysMem` handed out).
    fn frame_ptr(&self, pa: u64) -> *mut u64;
}

// SAFETY: every method forwards to `T`, which keeps the trait's promises.
unsafe impl<T: PhysMem + ?Sized> PhysMem for &T {
    fn alloc_frame(&self) -> Option<u64> {
        (**self).alloc_frame()
    }
    unsafe fn free_frame(&self, pa: u64) {
        (**self).free_frame(pa)
    }
    fn frame_ptr(&self, pa: u64) -> *mut u64 {
        (**self).frame_ptr(pa)
    }
}

// SAFETY: every method forwards to `T`, which keeps the trait's promises.
unsafe impl<T: PhysMem + ?Sized> PhysMem for Arc<T> {
    fn alloc_frame(&self) -> Option<u64> {
        (**self).alloc_frame()
    }
    unsafe fn free_frame(&self, pa: u64) {
        (**self).free_frame(pa)
    }
    fn frame_ptr(&self, pa: u64) -> *mut u64 {
        (**self).frame_ptr(pa)
    }
}

/// Fake physical address of `HeapPhysMem`'s frame 0.
pub const HEAP_PHYS_BASE: u64 = 0x10_0000_0000;
/// Frames per heap chunk (one allocation of 256 KiB).
const CHUNK_FRAMES: usize = 64;
/// End of the freed-frame list.
const NO_FRAME: u64 = u64::MAX;
/// Default capacity of a `HeapPhysMem`: 2^20 frames (4 GiB of page tables).
pub const HEAP_DEFAULT_CAPACITY: usize = 1 << 20;

fn chunk_layout() -> Layout {
    // 256 KiB, 4 KiB-aligned: always a valid layout.
    Layout::from_size_align(CHUNK_FRAMES * PAGE_SIZE as usize, PAGE_SIZE as usize)
        .unwrap_or(Layout::new::<u64>())
}

struct FreeState {
    /// Head of the list of freed frame indices (reused first); each freed frame holds the next
    /// index in its first word. `NO_FRAME` ends the list.
    free_head: u64,
    /// Frames `0..next` have been handed out at least once.
    next: usize,
    /// One bit per frame index: currently handed out.
    live: Vec<u64>,
}

/// Heap-backed `PhysMem` for host tests, benchmarks and the memory model's host builds.
/// `Send + Sync`: share it by reference or `Arc` between several tables.
pub struct HeapPhysMem {
    chunks: Box<[AtomicPtr<u64>]>,
    state: spin::Mutex<FreeState>,
    limit: AtomicUsize,
    live: AtomicUsize,
    allocated: AtomicU64,
    freed: AtomicU64,
    bad_frees: AtomicU64,
}

impl Default for HeapPhysMem {
    fn default() -> Self {
        Self::new()
    }
}

impl HeapPhysMem {
    /// A pool with the default capacity (`HEAP_DEFAULT_CAPACITY` frames).
    pub fn new() -> Self {
        Self::with_capacity(HEAP_DEFAULT_CAPACITY)
    }

    /// A pool that can hand out at most `max_frames` live frames (rounded up to 64).
    pub fn with_capacity(max_frames: usize) -> Self {
        let max_frames = max_frames.clamp(1, u32::MAX as usize);
        let nchunks = max_frames.div_ceil(CHUNK_FRAMES);
        let chunks = (0..nchunks)
            .map(|_| AtomicPtr::new(ptr::null_mut()))
            .collect::<Vec<_>>()
            .into_boxed_slice();
        HeapPhysMem {
            chunks,
            state: spin::Mutex::new(FreeState {
                free_head: NO_FRAME,
                next: 0,
                live: alloc::vec![0; nchunks * CHUNK_FRAMES / 64],
            }),
            limit: AtomicUsize::new(max_frames),
            live: AtomicUsize::new(0),
            allocated: AtomicU64::new(0),
            freed: AtomicU64::new(0),
            bad_frees: AtomicU64::new(0),
        }
    }

    /// Makes `alloc_frame` fail once `max_live` frames are live (fault injection for tests);
    /// never above the capacity.
    pub fn set_limit(&self, max_live: usize) {
        self.limit.store(max_live, Ordering::SeqCst);
    }
    /// Removes a limit set by `set_limit`.
    pub fn clear_limit(&self) {
        self.limit.store(usize::MAX, Ordering::SeqCst);
    }
    /// Frames handed out and not yet freed.
    pub fn live_frames(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }
    /// Frames handed out since creation.
    pub fn allocated_frames(&self) -> u64 {
        self.allocated.load(Ordering::SeqCst)
    }
    /// Frames returned since creation.
    pub fn freed_frames(&self) -> u64 {
        self.freed.load(Ordering::SeqCst)
    }
    /// Frees of addresses that were not live (ignored).
    pub fn bad_frees(&self) -> u64 {
        self.bad_frees.load(Ordering::SeqCst)
    }

    fn index_of(&self, pa: u64) -> Option<usize> {
        let off = pa.checked_sub(HEAP_PHYS_BASE)?;
        if off % PAGE_SIZE != 0 {
            return None;
        }
        let index = usize::try_from(off / PAGE_SIZE).ok()?;
        (index < self.chunks.len() * CHUNK_FRAMES).then_some(index)
    }

    fn slot_ptr(&self, index: usize) -> *mut u64 {
        let chunk = self.chunks[index / CHUNK_FRAMES].load(Ordering::Acquire);
        if chunk.is_null() {
            return ptr::null_mut();
        }
        // In bounds: the chunk holds CHUNK_FRAMES frames of 512 entries.
        chunk.wrapping_add((index % CHUNK_FRAMES) * 512)
    }
}

// SAFETY: (module invariants) a frame is one 512-entry slot of a 64-frame chunk allocated with
// a 4 KiB-aligned layout, so its fake address `HEAP_PHYS_BASE + index * 4096` is 4 KiB aligned
// and its pointer 8-byte aligned and valid for 512 u64s until the pool drops; `alloc_frame`
// zeroes it and marks it live under the state lock, and a live frame is never handed out again
// until `free_frame` clears its bit (double and foreign frees are refused).
unsafe impl PhysMem for HeapPhysMem {
    fn alloc_frame(&self) -> Option<u64> {
        let mut st = self.state.lock();
        if self.live.load(Ordering::SeqCst) >= self.limit.load(Ordering::SeqCst) {
            return None;
        }
        let index = match st.free_head {
            head if head != NO_FRAME => {
                let i = head as usize;
                // SAFETY: a freed frame of ours; its first word links the free list.
                st.free_head = unsafe { self.slot_ptr(i).read() };
                i
            }
            _ => {
                if st.next >= self.chunks.len() * CHUNK_FRAMES {
                    return None;
                }
                let i = st.next;
                let slot = &self.chunks[i / CHUNK_FRAMES];
                if slot.load(Ordering::Acquire).is_null() {
                    // SAFETY: the layout has non-zero size.
                    let mem = unsafe { alloc_zeroed(chunk_layout()) } as *mut u64;
                    if mem.is_null() {
                        return None;
                    }
                    slot.store(mem, Ordering::Release);
                }
                st.next += 1;
                i
            }
        };
        let p = self.slot_ptr(index);
        // SAFETY: the frame is not live, so nobody else references it; 512 u64s in bounds.
        unsafe { ptr::write_bytes(p, 0, 512) };
        st.live[index / 64] |= 1 << (index % 64);
        self.live.fetch_add(1, Ordering::SeqCst);
        self.allocated.fetch_add(1, Ordering::SeqCst);
        Some(HEAP_PHYS_BASE + index as u64 * PAGE_SIZE)
    }

    unsafe fn free_frame(&self, pa: u64) {
        let mut st = self.state.lock();
        let Some(index) = self.index_of(pa) else {
            self.bad_frees.fetch_add(1, Ordering::SeqCst);
            return;
        };
        let bit = 1u64 << (index % 64);
        if st.live[index / 64] & bit == 0 {
            self.bad_frees.fetch_add(1, Ordering::SeqCst);
            return;
        }
        st.live[index / 64] &= !bit;
        // SAFETY: the frame is ours and no longer live; its first word links the free list.
        unsafe { self.slot_ptr(index).write(st.free_head) };
        st.free_head = index as u64;
        self.live.fetch_sub(1, Ordering::SeqCst);
        self.freed.fetch_add(1, Ordering::SeqCst);
    }

    fn frame_ptr(&self, pa: u64) -> *mut u64 {
        match self.index_of(pa) {
            Some(index) => self.slot_ptr(index),
            None => ptr::null_mut(),
        }
    }
}

impl Drop for HeapPhysMem {
    fn drop(&mut self) {
        for slot in self.chunks.iter() {
            let p = slot.load(Ordering::Acquire);
            if !p.is_null() {
                // SAFETY: allocated in `alloc_frame` with this layout, freed once.
                unsafe { dealloc(p as *mut u8, chunk_layout()) };
            }
        }
    }
}

impl core::fmt::Debug for HeapPhysMem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HeapPhysMem")
            .field("live", &self.live_frames())
            .field("allocated", &self.allocated_frames())
            .field("freed", &self.freed_frames())
            .finish()
    }
}
