//! Failure injection at the seams of the memory model: a `Stage2` wrapper (`FaultyStage2`), a
//! `FrameAlloc` wrapper (`FaultyAlloc`) and a `Pager` (`FaultyPager`, over an in-memory page
//! store), each failing the N-th operation it sees with an error the real implementations
//! return at run time (`ept::Error::NoMemory`, `ept::Error::Backend{..}`, allocation failure,
//! `vmo::Error::Io`).
//!
//! One `Injector` (shared by `Arc`) counts the operations of one seam and decides which fail:
//! `Plan::Nth(n)` fails exactly the n-th (1-based) operation, `Plan::Every(k)` every k-th, and
//! `Plan::Never` none. Invariants:
//! - an operation the injector fails is refused *before* the wrapped implementation runs, except
//!   with `Partial::Half` on `Stage2::unmap` / `protect`, which applies the operation to the first
//!   half of the range (page aligned) and then fails — what a backend that dies part-way does;
//! - `fired()` counts the failures injected so far, so a caller can tell whether a given call
//!   of the system under test met one;
//! - everything else (queries, flushes, `frame_ptr`, `harvest_dirty`'s success path) is
//!   delegated unchanged, so with `Plan::Never` a wrapper behaves exactly like what it wraps.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ept::{
    BackendFailure, FlushScope, MemType, PageSize, S2Perms, Stage2, Translation, WriteTracking,
};
use vmo::{FrameAlloc, Paddr, Pager, PAGE_BYTES, PAGE_SIZE};

/// Which operations of a seam fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    Never,
    /// The n-th operation (1-based) only.
    Nth(u64),
    /// Every k-th operation (k ≥ 1).
    Every(u64),
}

/// Whether a failing range operation changes part of the range first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partial {
    /// Refuse before changing anything.
    Before,
    /// Apply to the first half of the range, then fail.
    Half,
}

/// Counts one seam's operations and decides which fail.
#[derive(Debug)]
pub struct Injector {
    plan: Mutex<Plan>,
    ops: AtomicU64,
    fired: AtomicU64,
    /// While set, operations are neither counted nor failed (the checker's own reads).
    paused: std::sync::atomic::AtomicBool,
}

impl Injector {
    pub fn new(plan: Plan) -> Arc<Self> {
        Arc::new(Injector {
            plan: Mutex::new(plan),
            ops: AtomicU64::new(0),
            fired: AtomicU64::new(0),
            paused: std::sync::atomic::AtomicBool::new(false),
        })
    }
    /// Replaces the plan and restarts the operation count.
    pub fn set_plan(&self, plan: Plan) {
        *self.plan.lock().unwrap() = plan;
        self.ops.store(0, Ordering::SeqCst);
    }
    /// Stops (`true`) or resumes counting and failing.
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }
    /// Counts one operation; whether it must fail.
    pub fn hit(&self) -> bool {
        if self.paused.load(Ordering::SeqCst) {
            return false;
        }
        let n = self.ops.fetch_add(1, Ordering::SeqCst) + 1;
        let fail = match *self.plan.lock().unwrap() {
            Plan::Never => false,
            Plan::Nth(k) => n == k,
            Plan::Every(k) => k > 0 && n.is_multiple_of(k),
        };
        if fail {
            self.fired.fetch_add(1, Ordering::SeqCst);
        }
        fail
    }
    /// Operations counted since the last `set_plan`.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::SeqCst)
    }
    /// Failures injected so far.
    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::SeqCst)
    }
}

/// The run-time errors a real `Stage2` backend returns: the table backends' `NoMemory` (no
/// frame for a table) and the KVM backend's host failures.
pub const STAGE2_ERRORS: [ept::Error; 3] = [
    ept::Error::NoMemory,
    ept::Error::Backend(BackendFailure {
        op: "mmap",
        errno: 12, // ENOMEM
    }),
    ept::Error::Backend(BackendFailure {
        op: "UFFDIO_WRITEPROTECT",
        errno: 11, // EAGAIN
    }),
];

/// A `Stage2` whose `map` / `unmap` / `protect` / `harvest_dirty` / `set_write_tracking` fail
/// as its injector says.
pub struct FaultyStage2<S: Stage2> {
    pub inner: S,
    pub injector: Arc<Injector>,
    pub error: ept::Error,
    pub partial: Partial,
}

impl<S: Stage2> FaultyStage2<S> {
    pub fn new(inner: S, injector: Arc<Injector>, error: ept::Error, partial: Partial) -> Self {
        FaultyStage2 {
            inner,
            injector,
            error,
            partial,
        }
    }

    /// The first half of `[gpa, gpa + len)` in whole pages (empty for a single page).
    fn half(gpa: u64, len: u64) -> Option<(u64, u64)> {
        let pages = len / PAGE_SIZE / 2;
        (pages > 0 && gpa.is_multiple_of(PAGE_SIZE)).then_some((gpa, pages * PAGE_SIZE))
    }
}

impl<S: Stage2> Stage2 for FaultyStage2<S> {
    fn map(
        &mut self,
        gpa: u64,
        pa: u64,
        size: PageSize,
        perms: S2Perms,
        mem_type: MemType,
    ) -> Result<Option<Translation>, ept::Error> {
        if self.injector.hit() {
            return Err(self.error);
        }
        self.inner.map(gpa, pa, size, perms, mem_type)
    }
    fn unmap(&mut self, gpa: u64, len: u64) -> Result<u64, ept::Error> {
        if self.injector.hit() {
            if let (Partial::Half, Some((g, l))) = (self.partial, Self::half(gpa, len)) {
                let _ = self.inner.unmap(g, l);
            }
            return Err(self.error);
        }
        self.inner.unmap(gpa, len)
    }
    fn protect(&mut self, gpa: u64, len: u64, perms: S2Perms) -> Result<u64, ept::Error> {
        if self.injector.hit() {
            if let (Partial::Half, Some((g, l))) = (self.partial, Self::half(gpa, len)) {
                let _ = self.inner.protect(g, l, perms);
            }
            return Err(self.error);
        }
        self.inner.protect(gpa, len, perms)
    }
    fn query(&self, gpa: u64) -> Option<Translation> {
        self.inner.query(gpa)
    }
    fn flush(&mut self, scope: FlushScope) {
        self.inner.flush(scope)
    }
    fn flush_pending(&self) -> bool {
        self.inner.flush_pending()
    }
    fn harvest_dirty(
        &mut self,
        gpa: u64,
        len: u64,
        dirty: &mut Vec<u64>,
    ) -> Result<u64, ept::Error> {
        if self.injector.hit() {
            return Err(self.error);
        }
        self.inner.harvest_dirty(gpa, len, dirty)
    }
    fn set_write_tracking(
        &mut self,
        gpa: u64,
        len: u64,
        tracking: WriteTracking,
    ) -> Result<u64, ept::Error> {
        if self.injector.hit() {
            if let (Partial::Half, Some((g, l))) = (self.partial, Self::half(gpa, len)) {
                let _ = self.inner.set_write_tracking(g, l, tracking);
            }
            return Err(self.error);
        }
        self.inner.set_write_tracking(gpa, len, tracking)
    }
}

/// A `FrameAlloc` whose `alloc_frame` / `alloc_contiguous` fail (return `None`) as its
/// injector says; frees and pointers are delegated.
pub struct FaultyAlloc<A: FrameAlloc> {
    pub inner: A,
    pub injector: Arc<Injector>,
}

// SAFETY: every address handed out comes from `inner`, which keeps the trait's promises; a
// refused allocation hands out nothing; `free_frame` and `frame_ptr` forward unchanged.
unsafe impl<A: FrameAlloc> FrameAlloc for FaultyAlloc<A> {
    fn alloc_frame(&self) -> Option<Paddr> {
        if self.injector.hit() {
            return None;
        }
        self.inner.alloc_frame()
    }
    fn alloc_contiguous(&self, count: usize) -> Option<Paddr> {
        if self.injector.hit() {
            return None;
        }
        self.inner.alloc_contiguous(count)
    }
    fn free_frame(&self, pa: Paddr) {
        self.inner.free_frame(pa)
    }
    fn frame_ptr(&self, pa: Paddr) -> *mut u8 {
        self.inner.frame_ptr(pa)
    }
}

/// The bytes a `FaultyPager` supplies for page `idx` of a never-written page: a pattern that
/// differs per page and per byte, so a page read from the wrong place shows.
pub fn pager_byte(seed: u8, idx: u64, off: usize) -> u8 {
    (idx as u8).wrapping_mul(31) ^ (off as u8).wrapping_mul(7) ^ seed ^ ((off >> 8) as u8)
}

/// An in-memory pager: page `idx` starts as `pager_byte(seed, idx, ..)`; a page handed back by
/// `decommit_page` is stored and supplied again (so a pager Vmo's contents survive decommit,
/// as a file-backed Vmo's written-back pages do). Its calls fail (`Error::Io`) as the injector
/// says; a failed call stores nothing.
pub struct FaultyPager {
    seed: u8,
    store: Mutex<HashMap<u64, Box<[u8; PAGE_BYTES]>>>,
    pub injector: Arc<Injector>,
}

impl FaultyPager {
    pub fn new(seed: u8, injector: Arc<Injector>) -> Self {
        FaultyPager {
            seed,
            store: Mutex::new(HashMap::new()),
            injector,
        }
    }
}

impl Pager for FaultyPager {
    fn commit_page(&self, idx: u64, buf: &mut [u8; PAGE_BYTES]) -> vmo::Result<()> {
        if self.injector.hit() {
            return Err(vmo::Error::Io);
        }
        match self.store.lock().unwrap().get(&idx) {
            Some(page) => buf.copy_from_slice(&page[..]),
            None => {
                for (off, b) in buf.iter_mut().enumerate() {
                    *b = pager_byte(self.seed, idx, off);
                }
            }
        }
        Ok(())
    }
    fn commit_overwrite(&self, _idx: u64) -> vmo::Result<()> {
        if self.injector.hit() {
            return Err(vmo::Error::Io);
        }
        Ok(())
    }
    fn update_page(&self, _idx: u64) -> vmo::Result<()> {
        if self.injector.hit() {
            return Err(vmo::Error::Io);
        }
        Ok(())
    }
    fn decommit_page(&self, idx: u64, data: &[u8; PAGE_BYTES]) -> vmo::Result<()> {
        if self.injector.hit() {
            return Err(vmo::Error::Io);
        }
        self.store.lock().unwrap().insert(idx, Box::new(*data));
        Ok(())
    }
}
