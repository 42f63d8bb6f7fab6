//! Physical frames: the `FrameAlloc` trait (where 4 KiB frames come from), the `FramePool` that
//! counts every allocation, free and copy, and the reference-counted `Frame` handle.
//!
//! Invariants:
//! - a frame address handed out by a `FrameAlloc` is 4 KiB aligned and stays valid (its bytes
//!   reachable through `frame_ptr`) until it is given back with `free_frame`;
//! - every `Frame` handle owns one reference; the frame goes back to its allocator exactly once,
//!   when the last handle drops, and the pool's `live` counter drops with it;
//! - `FrameStats::live == allocated - freed` at every quiescent point; tests assert `live == 0`
//!   after teardown.
//!
//! A frame's "physical address" is whatever the allocator says: a real physical address in the
//! bare-metal hypervisor, a fake address for heap frames, an offset into one memfd in guest-vm.

extern crate alloc;

use alloc::alloc::{dealloc, Layout};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, PAGE_BYTES, PAGE_SIZE};

/// A frame's physical (or physical-like) address.
pub type Paddr = u64;

/// A source of 4 KiB frames, shared between threads.
///
/// # Safety
/// `Frame` reads, writes, zeroes and copies a frame's bytes through the pointer `frame_ptr`
/// returned when the frame was allocated, without further checks, and devices / second-level
/// backends may reach the frame by its address. Implementations therefore promise, for every
/// address `pa` handed out by `alloc_frame`, and for every `first + i * PAGE_SIZE` (`i < count`)
/// of a run handed out by `alloc_contiguous(count)`, from the moment it is handed out until it is
/// passed to `free_frame`:
/// - `pa` is a multiple of `PAGE_SIZE` and is not handed out again (by either method);
/// - `frame_ptr(pa)` returns the same non-null pointer every time, valid for reads and writes of
///   `PAGE_SIZE` bytes, and those bytes overlap no other live frame's bytes and are not written
///   by the allocator itself;
/// - every method may be called from any thread, concurrently (hence `Send + Sync`).
pub unsafe trait FrameAlloc: Send + Sync {
    /// One frame, or `None` when exhausted. Contents are unspecified (the pool zeroes or
    /// overwrites them before use).
    fn alloc_frame(&self) -> Option<Paddr>;
    /// `count` physically contiguous frames; returns the first address.
    fn alloc_contiguous(&self, count: usize) -> Option<Paddr>;
    /// Gives one frame back (frames of a contiguous run are freed one by one).
    fn free_frame(&self, pa: Paddr);
    /// Host pointer to the 4 KiB at `pa`. Valid while the frame is allocated (see `# Safety`).
    fn frame_ptr(&self, pa: Paddr) -> *mut u8;
    /// A hint that the caller is about to write all of the `count` allocated frames from
    /// `pa` (contiguous): an allocator whose memory the kernel provides on first touch may
    /// provide it now for the whole run in one call. Ignoring it is correct.
    fn populate(&self, _pa: Paddr, _count: usize) {}
}

/// Allocation counters of one pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameStats {
    /// Frames currently allocated.
    pub live: u64,
    /// Frames allocated since the pool was made.
    pub allocated: u64,
    /// Frames freed since the pool was made.
    pub freed: u64,
    /// Frames made by copy-on-write (a copy of a shared frame).
    pub cow_copies: u64,
    /// Shared frames that a writer turned private without copying (it held the last reference).
    pub cow_upgrades: u64,
}

struct PoolShared {
    alloc: Arc<dyn FrameAlloc>,
    live: AtomicU64,
    allocated: AtomicU64,
    freed: AtomicU64,
    cow_copies: AtomicU64,
    cow_upgrades: AtomicU64,
}

/// A counted source of frames; cheap to clone (all clones share the counters).
#[derive(Clone)]
pub struct FramePool {
    shared: Arc<PoolShared>,
}

impl FramePool {
    pub fn new(alloc: Arc<dyn FrameAlloc>) -> Self {
        FramePool {
            shared: Arc::new(PoolShared {
                alloc,
                live: AtomicU64::new(0),
                allocated: AtomicU64::new(0),
                freed: AtomicU64::new(0),
                cow_copies: AtomicU64::new(0),
                cow_upgrades: AtomicU64::new(0),
            }),
        }
    }

    /// A pool over heap frames (host use and tests).
    pub fn heap() -> Self {
        Self::new(Arc::new(HeapFrameAlloc::new()))
    }

    /// The allocator behind this pool.
    pub fn allocator(&self) -> &Arc<dyn FrameAlloc> {
        &self.shared.alloc
    }

    pub fn stats(&self) -> FrameStats {
        let s = &self.shared;
        FrameStats {
            live: s.live.load(Ordering::Acquire),
            allocated: s.allocated.load(Ordering::Acquire),
            freed: s.freed.load(Ordering::Acquire),
            cow_copies: s.cow_copies.load(Ordering::Acquire),
            cow_upgrades: s.cow_upgrades.load(Ordering::Acquire),
        }
    }

    fn wrap(&self, pa: Paddr) -> Frame {
        self.shared.live.fetch_add(1, Ordering::AcqRel);
        self.shared.allocated.fetch_add(1, Ordering::AcqRel);
        let ptr = self.shared.alloc.frame_ptr(pa);
        Frame {
            inner: Arc::new(FrameInner {
                pa,
                ptr,
                pool: self.shared.clone(),
            }),
        }
    }

    /// A zero-filled frame.
    pub fn alloc_zeroed(&self) -> Result<Frame, Error> {
        let frame = self.alloc_uninit()?;
        frame.zero();
        Ok(frame)
    }

    /// A frame whose contents the caller overwrites completely.
    pub fn alloc_uninit(&self) -> Result<Frame, Error> {
        let pa = self.shared.alloc.alloc_frame().ok_or(Error::NoMemory)?;
        Ok(self.wrap(pa))
    }

    /// `count` contiguous zero-filled frames, in address order.
    pub fn alloc_contiguous(&self, count: usize) -> Result<Vec<Frame>, Error> {
        if count == 0 {
            return Err(Error::InvalidArgs);
        }
        let first = self
            .shared
            .alloc
            .alloc_contiguous(count)
            .ok_or(Error::NoMemory)?;
        let frames: Vec<Frame> = (0..count as u64)
            .map(|i| self.wrap(first + i * PAGE_SIZE))
            .collect();
        for f in &frames {
            f.zero();
        }
        Ok(frames)
    }

    /// `count` contiguous frames whose contents the caller overwrites completely, their
    /// memory provided in one go (`FrameAlloc::populate`), in address order; `None` when no
    /// contiguous run of that length is free (the caller allocates frame by frame instead).
    pub fn alloc_run_uninit(&self, count: usize) -> Option<Vec<Frame>> {
        let first = self.shared.alloc.alloc_contiguous(count)?;
        self.shared.alloc.populate(first, count);
        Some(
            (0..count as u64)
                .map(|i| self.wrap(first + i * PAGE_SIZE))
                .collect(),
        )
    }

    /// A private copy of `src` (copy-on-write), counted as a COW copy.
    pub fn copy_of(&self, src: &Frame) -> Result<Frame, Error> {
        let dst = self.alloc_uninit()?;
        // SAFETY: both frames are live (we hold handles) and distinct (`dst` was just handed out
        // while `src` is live); `FrameAlloc`'s contract makes each pointer valid for PAGE_BYTES
        // bytes that overlap no other frame.
        unsafe { core::ptr::copy_nonoverlapping(src.ptr(), dst.ptr(), PAGE_BYTES) };
        self.shared.cow_copies.fetch_add(1, Ordering::AcqRel);
        Ok(dst)
    }

    /// Records that a shared frame became private without a copy.
    pub(crate) fn count_upgrade(&self) {
        self.shared.cow_upgrades.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether two handles name the same pool.
    pub fn same_pool(&self, other: &FramePool) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Whether `frame` came from this pool.
    pub fn owns(&self, frame: &Frame) -> bool {
        Arc::ptr_eq(&self.shared, &frame.inner.pool)
    }
}

struct FrameInner {
    pa: Paddr,
    /// Host pointer to the frame's bytes, asked of the allocator once at allocation.
    ptr: *mut u8,
    pool: Arc<PoolShared>,
}

// SAFETY: `ptr` points at memory owned by the frame for its whole life; access to the bytes is
// the callers' business (the Vmo serialises writers per page), as with a physical address.
unsafe impl Send for FrameInner {}
// SAFETY: as above.
unsafe impl Sync for FrameInner {}

impl Drop for FrameInner {
    fn drop(&mut self) {
        self.pool.alloc.free_frame(self.pa);
        self.pool.live.fetch_sub(1, Ordering::AcqRel);
        self.pool.freed.fetch_add(1, Ordering::AcqRel);
    }
}

/// A reference-counted handle to one allocated frame. Cloning adds a reference; the frame is
/// freed when the last handle drops.
#[derive(Clone)]
pub struct Frame {
    inner: Arc<FrameInner>,
}

impl core::fmt::Debug for Frame {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Frame({:#x}, refs={})", self.inner.pa, self.ref_count())
    }
}

impl PartialEq for Frame {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}
impl Eq for Frame {}

impl Frame {
    pub fn paddr(&self) -> Paddr {
        self.inner.pa
    }

    /// Number of handles to this frame (the copy-on-write decision: 1 means private).
    pub fn ref_count(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// Host pointer to the frame's bytes.
    pub fn ptr(&self) -> *mut u8 {
        self.inner.ptr
    }

    /// Copies `buf.len()` bytes starting at `offset` out of the frame. Errors if the range
    /// leaves the frame.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), Error> {
        check_in_frame(offset, buf.len())?;
        // SAFETY: the range is inside the frame, which is allocated while `self` lives.
        unsafe {
            core::ptr::copy_nonoverlapping(self.ptr().add(offset), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copies `data` into the frame at `offset`. Errors if the range leaves the frame.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), Error> {
        check_in_frame(offset, data.len())?;
        // SAFETY: as in `read`.
        unsafe {
            core::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// Copies the whole of `src` into this frame.
    pub fn copy_from(&self, src: &Frame) {
        if src.ptr() == self.ptr() {
            return;
        }
        // SAFETY: both frames are allocated while the handles live and are PAGE_SIZE bytes;
        // distinct frames never overlap (the `FrameAlloc` contract), checked equal above.
        unsafe { core::ptr::copy_nonoverlapping(src.ptr(), self.ptr(), crate::PAGE_BYTES) };
    }

    /// Fills `len` bytes at `offset` with zeros.
    pub fn fill_zero(&self, offset: usize, len: usize) -> Result<(), Error> {
        check_in_frame(offset, len)?;
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_bytes(self.ptr().add(offset), 0, len) };
        Ok(())
    }

    fn zero(&self) {
        // SAFETY: the frame is live while `self` is; `FrameAlloc` makes the pointer valid for
        // PAGE_BYTES bytes.
        unsafe { core::ptr::write_bytes(self.ptr(), 0, PAGE_BYTES) };
    }

    /// Turns the handle into a raw pointer (for storing in an XArray); see `from_raw`.
    pub(crate) fn into_raw(self) -> *const () {
        Arc::into_raw(self.inner).cast()
    }

    /// # Safety
    /// `raw` came from `into_raw` and is consumed exactly once.
    pub(crate) unsafe fn from_raw(raw: *const ()) -> Self {
        Frame {
            // SAFETY: the caller guarantees `raw` is an `Arc<FrameInner>` pointer from
            // `into_raw` whose ownership has not been taken back yet.
            inner: unsafe { Arc::from_raw(raw.cast()) },
        }
    }
}

fn check_in_frame(offset: usize, len: usize) -> Result<(), Error> {
    match offset.checked_add(len) {
        Some(end) if end <= PAGE_BYTES => Ok(()),
        _ => Err(Error::OutOfRange),
    }
}

/// Frames from the global heap, with fake physical addresses (host builds and tests).
///
/// Single frames come from slabs of `SLAB_FRAMES` frames (one heap block each) and are recycled
/// through a free list; slabs are kept for reuse and released when the allocator drops.
/// Contiguous runs of more than one frame are one heap block of their own, released when all
/// its frames have been freed. Fresh memory is not zeroed here (the pool zeroes or overwrites).
pub struct HeapFrameAlloc {
    state: crate::sync::Mutex<HeapState>,
}

/// Frames per slab (256 KiB): amortises the heap's per-allocation cost and alignment waste.
const SLAB_FRAMES: usize = 64;

struct HeapBlock {
    ptr: *mut u8,
    frames: usize,
    /// Frames of a contiguous run still allocated; unused for slabs.
    live: usize,
    slab: bool,
}

struct HeapState {
    /// Fake physical address of a block's first frame → the block.
    blocks: alloc::collections::BTreeMap<Paddr, HeapBlock>,
    /// Free single-frame slots in slabs.
    free_slots: Vec<Paddr>,
    next_pa: Paddr,
}

// SAFETY: the raw pointers are owned heap blocks, only touched under the mutex.
unsafe impl Send for HeapFrameAlloc {}
// SAFETY: as above.
unsafe impl Sync for HeapFrameAlloc {}

impl Default for HeapFrameAlloc {
    fn default() -> Self {
        Self::new()
    }
}

impl HeapFrameAlloc {
    pub fn new() -> Self {
        HeapFrameAlloc {
            state: crate::sync::Mutex::new(HeapState {
                blocks: alloc::collections::BTreeMap::new(),
                free_slots: Vec::new(),
                // Fake addresses start above 4 GiB so a zero or small value is never a frame.
                next_pa: 1 << 32,
            }),
        }
    }

    fn layout(frames: usize) -> Option<Layout> {
        Layout::from_size_align(frames.checked_mul(PAGE_BYTES)?, PAGE_BYTES).ok()
    }

    fn block_of(state: &HeapState, pa: Paddr) -> Option<(Paddr, &HeapBlock)> {
        let (&start, block) = state.blocks.range(..=pa).next_back()?;
        (pa < start + (block.frames * PAGE_BYTES) as u64).then_some((start, block))
    }

    /// A new heap block of `count` frames at a fresh fake address.
    fn new_block(st: &mut HeapState, count: usize, slab: bool) -> Option<Paddr> {
        let layout = Self::layout(count)?;
        // SAFETY: the layout has non-zero size (count ≥ 1).
        let ptr = unsafe { alloc::alloc::alloc(layout) };
        if ptr.is_null() {
            return None;
        }
        let pa = st.next_pa;
        st.next_pa += (count * PAGE_BYTES) as u64;
        st.blocks.insert(
            pa,
            HeapBlock {
                ptr,
                frames: count,
                live: count,
                slab,
            },
        );
        Some(pa)
    }
}

// SAFETY: addresses are fresh fake addresses of heap blocks (page multiples, starting at 4 GiB
// and advancing by whole blocks) or recycled slab slots that were freed; a slot is on the free
// list at most once (`free_frame` pushes only addresses inside a slab, which the pool frees once
// per allocation). `frame_ptr` is `block.ptr + offset` into a live heap block that is
// PAGE_BYTES-aligned and kept until the allocator drops (slabs) or all its frames are freed
// (contiguous runs), and blocks never overlap. The state is behind a mutex.
unsafe impl FrameAlloc for HeapFrameAlloc {
    fn alloc_frame(&self) -> Option<Paddr> {
        let mut st = self.state.lock();
        if let Some(pa) = st.free_slots.pop() {
            return Some(pa);
        }
        let base = Self::new_block(&mut st, SLAB_FRAMES, true)?;
        st.free_slots
            .extend((1..SLAB_FRAMES as u64).rev().map(|i| base + i * PAGE_SIZE));
        Some(base)
    }

    fn alloc_contiguous(&self, count: usize) -> Option<Paddr> {
        match count {
            0 => None,
            1 => self.alloc_frame(),
            n => Self::new_block(&mut self.state.lock(), n, false),
        }
    }

    fn free_frame(&self, pa: Paddr) {
        let mut st = self.state.lock();
        let Some((start, block)) = Self::block_of(&st, pa) else {
            return;
        };
        if block.slab {
            st.free_slots.push(pa);
            return;
        }
        let block = st.blocks.get_mut(&start).expect("block found above");
        block.live -= 1;
        if block.live == 0 {
            let block = st.blocks.remove(&start).expect("block found above");
            let layout = Self::layout(block.frames).expect("layout was valid at allocation");
            // SAFETY: allocated with this layout in `new_block`, freed once.
            unsafe { dealloc(block.ptr, layout) };
        }
    }

    fn frame_ptr(&self, pa: Paddr) -> *mut u8 {
        let st = self.state.lock();
        match Self::block_of(&st, pa) {
            // SAFETY: `pa` lies inside the block, so the offset is inside its allocation.
            Some((start, block)) => unsafe { block.ptr.add((pa - start) as usize) },
            None => core::ptr::null_mut(),
        }
    }
}

impl Drop for HeapFrameAlloc {
    fn drop(&mut self) {
        for (_, block) in core::mem::take(&mut self.state.get_mut().blocks) {
            if let Some(layout) = Self::layout(block.frames) {
                // SAFETY: allocated with this layout in `new_block`; the allocator is going
                // away, so no frame of it is in use any more (pools hold an Arc to it).
                unsafe { dealloc(block.ptr, layout) };
            }
        }
    }
}

/// A borrowed frame inside an XArray (what `XArray::load` hands out): derefs to `Frame`
/// without touching the reference count.
pub struct FrameRef<'a> {
    frame: core::mem::ManuallyDrop<Frame>,
    _borrow: core::marker::PhantomData<&'a Frame>,
}

impl core::ops::Deref for FrameRef<'_> {
    type Target = Frame;
    fn deref(&self) -> &Frame {
        &self.frame
    }
}

// SAFETY: `into_raw` yields the pointer of an `Arc<FrameInner>`, aligned to at least 8;
// `from_raw` takes that ownership back exactly once; `raw_as_ref` builds a non-owning view that
// never drops the Arc (ManuallyDrop), valid while the array holds the item.
unsafe impl xarray::ItemEntry for Frame {
    type Ref<'a>
        = FrameRef<'a>
    where
        Self: 'a;

    fn into_raw(self) -> *const () {
        Frame::into_raw(self)
    }

    unsafe fn from_raw(raw: *const ()) -> Self {
        // SAFETY: forwarded contract.
        unsafe { Frame::from_raw(raw) }
    }

    unsafe fn raw_as_ref<'a>(raw: *const ()) -> FrameRef<'a> {
        FrameRef {
            // SAFETY: forwarded contract; ManuallyDrop keeps the count untouched.
            frame: core::mem::ManuallyDrop::new(unsafe { Frame::from_raw(raw) }),
            _borrow: core::marker::PhantomData,
        }
    }
}
