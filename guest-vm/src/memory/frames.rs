//! `MemfdFrameAlloc`: a `vmo::FrameAlloc` whose frames are 4 KiB offsets into one memfd.
//!
//! The memfd is the "physical memory" of the KVM backend: a frame's `Paddr` is its byte offset
//! in the memfd, `KvmStage2::map` installs it into a guest's memslot with
//! `mmap(MAP_SHARED|MAP_FIXED, memfd, pa)`, and the host reaches its bytes through one full
//! `MAP_SHARED` mapping of the memfd (`frame_ptr`).
//!
//! Invariants:
//! - the free set is a map of disjoint, non-adjacent runs `start → frames` (coalesced on free);
//!   a frame is either in exactly one free run or allocated, never both;
//! - allocation is next-fit from a cursor, so frames allocated one after another (a guest
//!   faulting through adjacent GPAs) get adjacent offsets, which lets the kernel merge the
//!   installed VMAs (KVM-FAULTS.md Q5); `alloc_frame_near` asks for one specific neighbour;
//! - a freed frame's memory is returned to the kernel (`FALLOC_FL_PUNCH_HOLE`), so the memfd's
//!   resident size is the frames in use; a re-allocated frame reads as zeros;
//! - capacity is fixed at construction; exhaustion is `None`, never a panic.
//!
//! `FreeSet::check_invariants` states the free-set invariants as code; it runs after every
//! change of the set in debug builds.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Mutex;

use vmo::{FrameAlloc, Paddr};

use crate::addr::MemfdOffset;
use crate::error::{Error, Result};
use crate::sys::memfd;
use crate::sys::mmap::{Backing, MapFlags, Mmap, Prot};
use ept::PAGE_SIZE;

struct FreeSet {
    /// First frame number of a free run → its length in frames.
    runs: BTreeMap<u64, u64>,
    /// Next-fit cursor (frame number).
    cursor: u64,
    free_frames: u64,
    /// Frames in the pool.
    capacity: u64,
}

impl FreeSet {
    fn new(capacity: u64) -> Self {
        let mut runs = BTreeMap::new();
        runs.insert(0, capacity);
        FreeSet {
            runs,
            cursor: 0,
            free_frames: capacity,
            capacity,
        }
    }

    /// The module invariants: runs are non-empty, inside the pool, disjoint and not adjacent
    /// (coalesced), and `free_frames` is their total.
    fn check_invariants(&self) {
        let mut total = 0;
        let mut prev_end: Option<u64> = None;
        for (&start, &len) in &self.runs {
            assert!(len > 0, "empty free run at frame {start}");
            assert!(
                start + len <= self.capacity,
                "free run {start}+{len} beyond the pool"
            );
            if let Some(end) = prev_end {
                assert!(start > end, "free runs overlap or touch at frame {start}");
            }
            prev_end = Some(start + len);
            total += len;
        }
        assert_eq!(total, self.free_frames, "free frame count");
    }

    fn debug_check(&self) {
        if cfg!(debug_assertions) {
            self.check_invariants();
        }
    }

    /// Takes `count` frames starting exactly at `start` if they are free.
    fn take_at(&mut self, start: u64, count: u64) -> bool {
        let Some((&rs, &rl)) = self.runs.range(..=start).next_back() else {
            return false;
        };
        if start + count > rs + rl {
            return false;
        }
        self.runs.remove(&rs);
        if start > rs {
            self.runs.insert(rs, start - rs);
        }
        let end = start + count;
        if end < rs + rl {
            self.runs.insert(end, rs + rl - end);
        }
        self.free_frames -= count;
        self.cursor = end;
        self.debug_check();
        true
    }

    /// Next-fit: the first run at or after the cursor that holds `count`, wrapping around.
    fn take(&mut self, count: u64) -> Option<u64> {
        // A run that contains the cursor counts from the cursor.
        if let Some((&rs, &rl)) = self.runs.range(..=self.cursor).next_back() {
            if self.cursor < rs + rl && rs + rl - self.cursor >= count {
                let at = self.cursor;
                self.take_at(at, count);
                return Some(at);
            }
        }
        let found = self
            .runs
            .range(self.cursor..)
            .chain(self.runs.range(..self.cursor))
            .find(|(_, &len)| len >= count)
            .map(|(&s, _)| s)?;
        self.take_at(found, count);
        Some(found)
    }

    fn give(&mut self, frame: u64) -> bool {
        // Refuse double frees and frames inside a free run.
        if let Some((&rs, &rl)) = self.runs.range(..=frame).next_back() {
            if frame < rs + rl {
                return false;
            }
        }
        let mut start = frame;
        let mut len = 1;
        if let Some((&rs, &rl)) = self.runs.range(..frame).next_back() {
            if rs + rl == frame {
                self.runs.remove(&rs);
                start = rs;
                len += rl;
            }
        }
        if let Some(&nl) = self.runs.get(&(frame + 1)) {
            self.runs.remove(&(frame + 1));
            len += nl;
        }
        self.runs.insert(start, len);
        self.free_frames += 1;
        self.debug_check();
        true
    }
}

/// Frames as offsets of one memfd; see the module documentation.
pub struct MemfdFrameAlloc {
    /// The whole memfd, `MAP_SHARED`: the host's view of every frame's bytes. Declared before
    /// `fd` (dropped first; either order is sound).
    view: Mmap,
    fd: OwnedFd,
    capacity: u64,
    free: Mutex<FreeSet>,
}

impl MemfdFrameAlloc {
    /// A pool of `capacity` bytes (a multiple of 4 KiB, non-zero). Memory is committed lazily:
    /// the memfd is sparse until frames are written.
    pub fn new(capacity: u64) -> Result<Self> {
        if capacity == 0 || !capacity.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidArgs(format!(
                "frame pool capacity {capacity:#x} is not a non-zero multiple of 4 KiB"
            )));
        }
        let fd = memfd::create(c"guest-frames", capacity)?;
        let view = Mmap::new(
            capacity,
            Prot::ReadWrite,
            Backing::Shared {
                fd: fd.as_fd(),
                offset: 0,
            },
            MapFlags::NORESERVE,
        )?;
        Ok(MemfdFrameAlloc {
            view,
            fd,
            capacity,
            free: Mutex::new(FreeSet::new(capacity / PAGE_SIZE)),
        })
    }

    /// The memfd (for `mmap(MAP_SHARED|MAP_FIXED, fd, pa)` installs).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The memfd, borrowed (for `sys::mmap` installs).
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The memfd offset of frame `pa`, if it is a frame of this pool.
    pub fn offset_of(&self, pa: Paddr) -> Option<MemfdOffset> {
        (pa.is_multiple_of(PAGE_SIZE) && pa < self.capacity).then_some(MemfdOffset(pa))
    }

    /// Checks the free-set invariants of the module documentation (panics on a violation).
    pub fn check_invariants(&self) {
        self.lock().check_invariants();
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Frames not allocated.
    pub fn free_frames(&self) -> u64 {
        self.lock().free_frames
    }

    /// Bytes of the memfd the kernel actually holds (frames written and not freed).
    pub fn resident_bytes(&self) -> Result<u64> {
        memfd::resident_bytes(self.fd.as_fd())
    }

    /// Allocates the frame at `pa` if it is free (e.g. the offset after the frame backing the
    /// neighbouring GPA, so the two installs merge into one VMA); otherwise any frame.
    pub fn alloc_frame_near(&self, pa: Paddr) -> Option<Paddr> {
        let mut free = self.lock();
        if pa.is_multiple_of(PAGE_SIZE) && pa < self.capacity && free.take_at(pa / PAGE_SIZE, 1) {
            return Some(pa);
        }
        free.take(1).map(|f| f * PAGE_SIZE)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FreeSet> {
        // A poisoned lock only means another thread panicked while holding it; the free set is
        // updated atomically with respect to panics (no panicking code runs under the lock).
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }
}

// SAFETY: frames are distinct 4 KiB offsets taken from the free set under its mutex and put
// back only by `free_frame`; `frame_ptr` is `base + pa` inside the one shared mapping of the
// memfd, which lives as long as `self`, so each live frame has its own 4 KiB of valid memory.
unsafe impl FrameAlloc for MemfdFrameAlloc {
    fn alloc_frame(&self) -> Option<Paddr> {
        self.lock().take(1).map(|f| f * PAGE_SIZE)
    }

    fn alloc_contiguous(&self, count: usize) -> Option<Paddr> {
        if count == 0 {
            return None;
        }
        self.lock().take(count as u64).map(|f| f * PAGE_SIZE)
    }

    fn free_frame(&self, pa: Paddr) {
        if !pa.is_multiple_of(PAGE_SIZE) || pa >= self.capacity {
            return;
        }
        if self.lock().give(pa / PAGE_SIZE) {
            // Give the memory back; the frame reads as zeros when handed out again. A failure
            // only means the memory stays committed, which is harmless.
            let _ = memfd::punch_hole(self.fd.as_fd(), pa, PAGE_SIZE);
        }
    }

    fn frame_ptr(&self, pa: Paddr) -> *mut u8 {
        if pa >= self.capacity {
            return std::ptr::null_mut();
        }
        // SAFETY: `pa < capacity`, the length of the view, so the result stays inside it.
        unsafe { self.view.as_ptr().add(pa as usize) }
    }

    /// `MADV_POPULATE_WRITE` over the run's part of the view: the memfd pages are allocated in
    /// one call instead of one page fault each at the first write. A failure (an older
    /// kernel) leaves them to those faults.
    fn populate(&self, pa: Paddr, count: usize) {
        let len = count as u64 * PAGE_SIZE;
        if !pa.is_multiple_of(PAGE_SIZE) || pa.checked_add(len).is_none_or(|e| e > self.capacity) {
            return;
        }
        // SAFETY: `[pa, pa + len)` lies inside the view (checked above), a live `MAP_SHARED`
        // mapping of the memfd owned by `self`; populating only makes the kernel back it with
        // memory (the bytes read as zeros or keep what they hold), it changes no mapping.
        let _ = unsafe {
            libc::madvise(
                self.view.as_ptr().add(pa as usize).cast(),
                len as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
    }
}

/// The frames of this process's guests: the memfd allocator (which `KvmStage2` maps from) and
/// the counted `FramePool` over it (which Vmos allocate from). Cheap to clone.
#[derive(Clone)]
pub struct HostFrames {
    pub alloc: std::sync::Arc<MemfdFrameAlloc>,
    pub pool: vmo::FramePool,
}

impl HostFrames {
    /// A memfd of `capacity` bytes (sparse: memory is used only by frames in use).
    pub fn new(capacity: u64) -> Result<Self> {
        let alloc = std::sync::Arc::new(MemfdFrameAlloc::new(capacity)?);
        let pool = vmo::FramePool::new(alloc.clone());
        Ok(HostFrames { alloc, pool })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vmo::FramePool;

    #[test]
    fn sequential_frames_are_contiguous_and_capacity_is_enforced() {
        let a = MemfdFrameAlloc::new(16 * PAGE_SIZE).unwrap();
        let f: Vec<_> = (0..16).map(|_| a.alloc_frame().unwrap()).collect();
        for (i, pa) in f.iter().enumerate() {
            assert_eq!(*pa, i as u64 * PAGE_SIZE);
        }
        assert_eq!(a.alloc_frame(), None);
        assert_eq!(a.alloc_contiguous(1), None);
        a.free_frame(5 * PAGE_SIZE);
        assert_eq!(a.alloc_frame(), Some(5 * PAGE_SIZE));
    }

    #[test]
    fn runs_coalesce_and_contiguous_allocation_finds_them() {
        let a = MemfdFrameAlloc::new(8 * PAGE_SIZE).unwrap();
        let all = a.alloc_contiguous(8).unwrap();
        assert_eq!(all, 0);
        for i in [2u64, 4, 3] {
            a.free_frame(i * PAGE_SIZE);
        }
        // Double free and out-of-range frees are ignored.
        a.free_frame(3 * PAGE_SIZE);
        a.free_frame(100 * PAGE_SIZE);
        assert_eq!(a.free_frames(), 3);
        assert_eq!(a.alloc_contiguous(4), None);
        assert_eq!(a.alloc_contiguous(3), Some(2 * PAGE_SIZE));
        assert_eq!(a.free_frames(), 0);
    }

    #[test]
    fn near_hint_and_zero_after_free() {
        let a = MemfdFrameAlloc::new(64 * PAGE_SIZE).unwrap();
        let x = a.alloc_frame_near(10 * PAGE_SIZE).unwrap();
        assert_eq!(x, 10 * PAGE_SIZE);
        assert_eq!(a.alloc_frame_near(11 * PAGE_SIZE), Some(11 * PAGE_SIZE));
        // Taken hint falls back to any frame.
        let y = a.alloc_frame_near(10 * PAGE_SIZE).unwrap();
        assert_ne!(y, 10 * PAGE_SIZE);
        let p = a.frame_ptr(x);
        // SAFETY: `x` is an allocated frame of `a`, a page of the live view.
        unsafe { p.write_bytes(0xab, PAGE_SIZE as usize) };
        assert!(a.resident_bytes().unwrap() >= PAGE_SIZE);
        a.free_frame(x);
        assert_eq!(a.alloc_frame_near(x), Some(x));
        // SAFETY: as above.
        assert_eq!(unsafe { *a.frame_ptr(x).add(100) }, 0);
        assert!(a.frame_ptr(64 * PAGE_SIZE).is_null());
    }

    #[test]
    fn framepool_accounting_over_memfd() {
        let a = Arc::new(MemfdFrameAlloc::new(32 * PAGE_SIZE).unwrap());
        let pool = FramePool::new(a.clone());
        {
            let frames = pool.alloc_contiguous(4).unwrap();
            frames[1].write(0, b"hello").unwrap();
            let c = pool.copy_of(&frames[1]).unwrap();
            let mut buf = [0u8; 5];
            c.read(0, &mut buf).unwrap();
            assert_eq!(&buf, b"hello");
            assert_eq!(pool.stats().live, 5);
        }
        assert_eq!(pool.stats().live, 0);
        assert_eq!(a.free_frames(), 32);
        assert_eq!(a.resident_bytes().unwrap(), 0);
    }

    #[test]
    fn free_set_keeps_its_invariants_under_random_traffic() {
        let mut set = FreeSet::new(64);
        let mut held: Vec<u64> = Vec::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..5_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(3) || held.is_empty() {
                if let Some(f) = set.take(1 + x % 4) {
                    held.extend(f..f + 1 + x % 4);
                }
            } else {
                let i = (x as usize / 3) % held.len();
                assert!(set.give(held.swap_remove(i)));
            }
            set.check_invariants();
            assert_eq!(set.free_frames + held.len() as u64, 64);
        }
        for f in held {
            assert!(set.give(f));
            assert!(!set.give(f), "double free refused");
        }
        set.check_invariants();
        assert_eq!(set.runs.len(), 1, "everything coalesced back into one run");
    }

    #[test]
    fn bad_capacity_is_an_error() {
        assert!(MemfdFrameAlloc::new(0).is_err());
        assert!(MemfdFrameAlloc::new(100).is_err());
    }
}
