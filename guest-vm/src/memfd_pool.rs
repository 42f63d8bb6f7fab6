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

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use vmo::{FrameAlloc, Paddr};

use crate::{last_os, Error, Result, PAGE_SIZE};

struct FreeSet {
    /// First frame number of a free run → its length in frames.
    runs: BTreeMap<u64, u64>,
    /// Next-fit cursor (frame number).
    cursor: u64,
    free_frames: u64,
}

impl FreeSet {
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
        true
    }
}

/// Frames as offsets of one memfd; see the module documentation.
pub struct MemfdFrameAlloc {
    fd: OwnedFd,
    base: *mut u8,
    capacity: u64,
    free: Mutex<FreeSet>,
}

// SAFETY: `base` is a shared mapping owned by this value for its whole life; the free set is
// behind a mutex, and frame bytes are the callers' business (as with physical memory).
unsafe impl Send for MemfdFrameAlloc {}
// SAFETY: as above.
unsafe impl Sync for MemfdFrameAlloc {}

impl MemfdFrameAlloc {
    /// A pool of `capacity` bytes (a multiple of 4 KiB, non-zero). Memory is committed lazily:
    /// the memfd is sparse until frames are written.
    pub fn new(capacity: u64) -> Result<Self> {
        if capacity == 0 || !capacity.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidArgs(format!(
                "frame pool capacity {capacity:#x} is not a non-zero multiple of 4 KiB"
            )));
        }
        // SAFETY: the name is a valid C string; flags are valid.
        let raw = unsafe { libc::memfd_create(c"guest-frames".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(last_os("memfd_create"));
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: valid descriptor.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), capacity as libc::off_t) } != 0 {
            return Err(last_os("ftruncate(frame memfd)"));
        }
        // SAFETY: a fresh shared mapping of the whole file; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                capacity as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(last_os("mmap(frame memfd)"));
        }
        let frames = capacity / PAGE_SIZE;
        let mut runs = BTreeMap::new();
        runs.insert(0, frames);
        Ok(MemfdFrameAlloc {
            fd,
            base: base.cast(),
            capacity,
            free: Mutex::new(FreeSet {
                runs,
                cursor: 0,
                free_frames: frames,
            }),
        })
    }

    /// The memfd (for `mmap(MAP_SHARED|MAP_FIXED, fd, pa)` installs).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
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
        // SAFETY: zeroed stat is a valid out-parameter; the descriptor is valid.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) } != 0 {
            return Err(last_os("fstat(frame memfd)"));
        }
        Ok(st.st_blocks as u64 * 512)
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
            // SAFETY: valid descriptor, range inside the file.
            unsafe {
                libc::fallocate(
                    self.fd.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    pa as libc::off_t,
                    PAGE_SIZE as libc::off_t,
                )
            };
        }
    }

    fn frame_ptr(&self, pa: Paddr) -> *mut u8 {
        if pa >= self.capacity {
            return std::ptr::null_mut();
        }
        // SAFETY: `pa` is inside the mapping.
        unsafe { self.base.add(pa as usize) }
    }
}

impl Drop for MemfdFrameAlloc {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `new` with this size and is unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.capacity as usize) };
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
        unsafe { p.write_bytes(0xab, PAGE_SIZE as usize) };
        assert!(a.resident_bytes().unwrap() >= PAGE_SIZE);
        a.free_frame(x);
        assert_eq!(a.alloc_frame_near(x), Some(x));
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
    fn bad_capacity_is_an_error() {
        assert!(MemfdFrameAlloc::new(0).is_err());
        assert!(MemfdFrameAlloc::new(100).is_err());
    }
}
