//! `Vmo`: a virtual memory object — a sparse, lazily committed set of pages that backs guest
//! RAM, ROM images, snapshot files and DMA buffers.
//!
//! A `Vmo` is a handle: an `Arc` to the object plus the rights of this handle. Objects are either
//! a page set (`Pages`, see `pages.rs` for the copy-on-write structure) or a slice (a window onto
//! a page set, sharing its pages — slices of slices point at the root page set directly).
//!
//! Files: `child` (snapshot / slice children and the copies a Vmar fork makes), `fault` (the
//! fault path's entry: one page or a run under one lock), `io` (byte access), `observer` (who hears of page changes), `pages` (the page set and the
//! copy-on-write rule), `reset` (reset points).
//!
//! Invariants:
//! - every operation checks the handle's rights first and validates offsets before touching
//!   pages; bad input is an `Error`, never a panic;
//! - all page changes of one page set happen under its lock; observers (Vmar mappings) hear of
//!   removed or newly shared frames under that lock, before frames can be freed;
//! - pinned pages are committed, private, and never decommitted, shared or resized away;
//! - `committed_bytes()` counts the slots this object's page set holds (frames shared with
//!   snapshot relatives are counted in each of them; the pool's `live` frame count is the exact
//!   number of distinct frames).
//!
//! Semantics follow Zircon's VMO calls (CONTRACTS.md). Where this differs it says so on the
//! method: `decommit` is allowed on snapshot children (the page reads as zeros / pager data
//! afterwards), and a snapshot child's window at a non-zero offset is built in O(pages in the
//! window) rather than O(1).

mod child;
mod fault;
mod io;
pub(crate) mod observer;
pub(crate) mod pages;
mod reset;

use alloc::sync::{Arc, Weak};

use crate::pager::Pager;
use crate::{Error, Frame, FramePool, Paddr, Result, PAGE_SIZE};
pub use child::ChildKind;
pub use fault::{FaultAccess, FaultedPage};
use observer::Observers;
pub use observer::{ObserverId, RangeChange, VmoObserver};
pub use pages::PageOrigin;
use pages::Pages;
pub use reset::RestoreStats;

/// Largest Vmo: offsets must stay representable as guest-physical addresses with room to add.
pub const MAX_VMO_SIZE: u64 = 1 << 52;

bitflags::bitflags! {
    /// Creation flags.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct VmoFlags: u32 {
        /// `resize` is allowed.
        const RESIZABLE = 1 << 0;
        /// Frames are physically contiguous, committed at creation, never decommitted.
        const CONTIGUOUS = 1 << 1;
        /// Meant for device DMA (assigned through a DMA domain; pinned while assigned).
        const DMA = 1 << 2;
    }
}

bitflags::bitflags! {
    /// Rights of a handle.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Rights: u32 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const EXEC = 1 << 2;
        /// May be mapped into a Vmar.
        const MAP = 1 << 3;
        /// May be duplicated (`duplicate`, `create_child`).
        const DUPLICATE = 1 << 4;
        const ALL = Self::READ.bits() | Self::WRITE.bits() | Self::EXEC.bits()
            | Self::MAP.bits() | Self::DUPLICATE.bits();
    }
}

// shuttle's locks are large; the size difference exists only in that test-only build.
#[cfg_attr(feature = "shuttle", allow(clippy::large_enum_variant))]
pub(crate) enum Body {
    Pages {
        pages: crate::sync::Mutex<Pages>,
        observers: crate::sync::Mutex<Observers>,
    },
    /// `offset` into `root`, which is always a `Body::Pages`.
    Slice {
        root: Arc<VmoInner>,
        offset: u64,
        size: u64,
    },
}

pub(crate) struct VmoInner {
    pool: FramePool,
    flags: VmoFlags,
    body: Body,
}

/// A handle to a memory object.
#[derive(Clone)]
pub struct Vmo {
    inner: Arc<VmoInner>,
    rights: Rights,
}

impl core::fmt::Debug for Vmo {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Vmo")
            .field("size", &self.size())
            .field("flags", &self.inner.flags)
            .field("rights", &self.rights)
            .finish()
    }
}

/// Rounds `bytes` up to whole pages, or `OutOfRange` past `MAX_VMO_SIZE`.
fn page_round_up(bytes: u64) -> Result<u64> {
    let rounded = bytes.checked_add(PAGE_SIZE - 1).ok_or(Error::OutOfRange)? & !(PAGE_SIZE - 1);
    if rounded > MAX_VMO_SIZE {
        return Err(Error::OutOfRange);
    }
    Ok(rounded)
}

/// `[offset, offset + len)` must lie inside `size`.
fn check_range(offset: u64, len: u64, size: u64) -> Result<u64> {
    let end = offset.checked_add(len).ok_or(Error::OutOfRange)?;
    if end > size {
        return Err(Error::OutOfRange);
    }
    Ok(end)
}

/// Page indices `[first, last)` touched by bytes `[offset, end)`.
fn pages_touched(offset: u64, end: u64) -> (u64, u64) {
    (offset / PAGE_SIZE, end.div_ceil(PAGE_SIZE))
}

impl Vmo {
    fn from_body(pool: &FramePool, flags: VmoFlags, body: Body, rights: Rights) -> Vmo {
        Vmo {
            inner: Arc::new(VmoInner {
                pool: pool.clone(),
                flags,
                body,
            }),
            rights,
        }
    }

    fn new_pages(
        pool: &FramePool,
        size: u64,
        flags: VmoFlags,
        pager: Option<Arc<dyn Pager>>,
    ) -> Result<Vmo> {
        let size = page_round_up(size)?;
        let body = Body::Pages {
            pages: crate::sync::Mutex::new(Pages::new(size, pager)),
            observers: crate::sync::Mutex::new(Observers::default()),
        };
        Ok(Self::from_body(pool, flags, body, Rights::ALL))
    }

    /// An anonymous Vmo of `size` bytes (rounded up to pages); pages read as zeros until written.
    /// `CONTIGUOUS` belongs to `new_contiguous`; `DMA` alone is allowed (a DMA buffer that need
    /// not be contiguous).
    pub fn new(pool: &FramePool, size: u64, flags: VmoFlags) -> Result<Vmo> {
        if flags.contains(VmoFlags::CONTIGUOUS) {
            return Err(Error::InvalidArgs);
        }
        Self::new_pages(pool, size, flags, None)
    }

    /// A Vmo whose pages come from `pager` (snapshot file, ROM image).
    pub fn new_paged(
        pool: &FramePool,
        size: u64,
        flags: VmoFlags,
        pager: Arc<dyn Pager>,
    ) -> Result<Vmo> {
        if flags.intersects(VmoFlags::CONTIGUOUS | VmoFlags::DMA) {
            return Err(Error::InvalidArgs);
        }
        Self::new_pages(pool, size, flags, Some(pager))
    }

    /// A physically contiguous Vmo (flags CONTIGUOUS, plus DMA if `dma`), committed at once.
    pub fn new_contiguous(pool: &FramePool, size: u64, dma: bool) -> Result<Vmo> {
        let size = page_round_up(size)?;
        if size == 0 {
            return Err(Error::InvalidArgs);
        }
        let mut flags = VmoFlags::CONTIGUOUS;
        if dma {
            flags |= VmoFlags::DMA;
        }
        let frames = pool.alloc_contiguous((size / PAGE_SIZE) as usize)?;
        let vmo = Self::new_pages(pool, size, flags, None)?;
        {
            let mut pages = vmo.lock_root_pages();
            for (i, frame) in frames.into_iter().enumerate() {
                pages.adopt(i as u64, frame);
            }
        }
        Ok(vmo)
    }

    pub fn size(&self) -> u64 {
        match &self.inner.body {
            Body::Pages { pages, .. } => pages.lock().size,
            Body::Slice { size, .. } => *size,
        }
    }

    pub fn flags(&self) -> VmoFlags {
        self.inner.flags
    }

    pub fn rights(&self) -> Rights {
        self.rights
    }

    pub fn pool(&self) -> &FramePool {
        &self.inner.pool
    }

    pub fn is_pager_backed(&self) -> bool {
        self.lock_root_pages().source.pager.is_some()
    }

    pub fn is_slice(&self) -> bool {
        matches!(self.inner.body, Body::Slice { .. })
    }

    /// Whether two handles name the same object.
    pub fn same_object(&self, other: &Vmo) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// A new handle to the same object with `rights` (a subset of this handle's; needs DUPLICATE).
    pub fn duplicate(&self, rights: Rights) -> Result<Vmo> {
        self.require(Rights::DUPLICATE)?;
        if !self.rights.contains(rights) {
            return Err(Error::AccessDenied);
        }
        Ok(Vmo {
            inner: self.inner.clone(),
            rights,
        })
    }

    fn require(&self, rights: Rights) -> Result<()> {
        if self.rights.contains(rights) {
            Ok(())
        } else {
            Err(Error::AccessDenied)
        }
    }

    /// The page set and the byte offset of this object's byte 0 in it.
    fn root(&self) -> (&VmoInner, u64) {
        match &self.inner.body {
            Body::Pages { .. } => (&self.inner, 0),
            Body::Slice { root, offset, .. } => (root, *offset),
        }
    }

    fn lock_root_pages(&self) -> crate::sync::MutexGuard<'_, Pages> {
        let (root, _) = self.root();
        match &root.body {
            Body::Pages { pages, .. } => pages.lock(),
            Body::Slice { .. } => unreachable!("a slice's root is always a page set"),
        }
    }

    fn root_observers(&self) -> &crate::sync::Mutex<Observers> {
        let (root, _) = self.root();
        match &root.body {
            Body::Pages { observers, .. } => observers,
            Body::Slice { .. } => unreachable!("a slice's root is always a page set"),
        }
    }

    /// Tells observers of the root about a coming change of root bytes `[start, start + len)`.
    /// An error (an observer's backend failed) means the change must not happen.
    fn notify(&self, start: u64, len: u64, change: RangeChange) -> Result<()> {
        self.root_observers().lock().notify(&[(start, len)], change)
    }

    /// Registers `observer` for changes of this object's pages.
    pub fn add_observer(&self, observer: Weak<dyn VmoObserver>) -> ObserverId {
        let (base, window) = match &self.inner.body {
            Body::Pages { .. } => (0, u64::MAX),
            Body::Slice { offset, size, .. } => (*offset, *size),
        };
        self.root_observers().lock().add(observer, base, window)
    }

    pub fn remove_observer(&self, id: ObserverId) {
        self.root_observers().lock().remove(id);
    }

    /// Bytes committed in this object's page set (see the module doc for shared frames).
    pub fn committed_bytes(&self) -> u64 {
        match &self.inner.body {
            Body::Pages { pages, .. } => pages.lock().committed_pages() * PAGE_SIZE,
            Body::Slice { .. } => {
                let (first, last) = self.root_page_span(0, self.size());
                let pages = self.lock_root_pages();
                pages.committed_in(first, last).len() as u64 * PAGE_SIZE
            }
        }
    }

    /// Root page indices `[first, last)` of this object's bytes `[offset, offset + len)`.
    fn root_page_span(&self, offset: u64, len: u64) -> (u64, u64) {
        let (_, base) = self.root();
        pages_touched(base + offset, base + offset + len)
    }

    /// Physical address of the first frame of a CONTIGUOUS Vmo.
    pub fn contiguous_base(&self) -> Option<Paddr> {
        if !self.inner.flags.contains(VmoFlags::CONTIGUOUS) {
            return None;
        }
        let (_, base) = self.root();
        self.lock_root_pages()
            .get(base / PAGE_SIZE)
            .map(|f| f.paddr())
    }

    /// The committed frame holding byte `offset`, if any (no commit, no rights beyond READ).
    pub fn committed_frame(&self, offset: u64) -> Result<Option<Frame>> {
        self.require(Rights::READ)?;
        check_range(offset, 1, self.size())?;
        let (_, base) = self.root();
        Ok(self.lock_root_pages().get((base + offset) / PAGE_SIZE))
    }

    /// Commits the pages covering `[offset, offset + len)` (zero-filled or from the pager),
    /// walking the range once under one lock. A zero-length range commits nothing.
    pub fn commit(&self, offset: u64, len: u64) -> Result<()> {
        self.require(Rights::WRITE)?;
        let end = check_range(offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        let (_, base) = self.root();
        let (first, last) = pages_touched(base + offset, base + end);
        let mut pages = self.lock_root_pages();
        let result = pages.commit_range(&self.inner.pool, first, last);
        pages.debug_check();
        result.map(drop)
    }

    /// Root slot of page `page_idx` of this object; OutOfRange past the end.
    fn root_slot(&self, page_idx: u64) -> Result<u64> {
        let offset = page_idx.checked_mul(PAGE_SIZE).ok_or(Error::OutOfRange)?;
        check_range(offset, PAGE_SIZE, self.size())?;
        let (_, base) = self.root();
        Ok((base + offset) / PAGE_SIZE)
    }

    /// Commits the page at `page_idx` of this object, blocking on pager I/O if needed.
    pub fn commit_on(&self, page_idx: u64) -> Result<Frame> {
        self.require(Rights::READ)?;
        let idx = self.root_slot(page_idx)?;
        Ok(self
            .lock_root_pages()
            .commit(&self.inner.pool, idx, false)?
            .0)
    }

    /// Like `commit_on`, but reports `ShouldWait` instead of doing pager I/O.
    pub fn try_commit_page(&self, page_idx: u64) -> Result<Frame> {
        self.require(Rights::READ)?;
        let idx = self.root_slot(page_idx)?;
        let mut pages = self.lock_root_pages();
        if pages.needs_io(idx) {
            return Err(Error::ShouldWait);
        }
        Ok(pages.commit(&self.inner.pool, idx, false)?.0)
    }

    /// Frees the committed pages covering `[offset, offset + len)`; they read as zeros (or the
    /// pager's data) afterwards. Pinned pages → `BadState` (checked first, so an assigned DMA
    /// Vmo reports BadState); contiguous Vmos → `NotSupported`. A zero-length range frees
    /// nothing. The pages' translations go first; if that fails, nothing is freed.
    pub fn decommit(&self, offset: u64, len: u64) -> Result<()> {
        self.require(Rights::WRITE)?;
        let end = check_range(offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        let (_, base) = self.root();
        let (first, last) = pages_touched(base + offset, base + end);
        let mut pages = self.lock_root_pages();
        if pages.any_pinned_in(first, last) {
            return Err(Error::BadState);
        }
        if self.inner.flags.contains(VmoFlags::CONTIGUOUS) {
            return Err(Error::NotSupported);
        }
        self.drop_pages(&mut pages, first, last)
    }

    /// Removes committed root slots `[first, last)`, telling observers first.
    fn drop_pages(&self, pages: &mut Pages, first: u64, last: u64) -> Result<()> {
        let committed = pages.committed_in(first, last);
        if committed.is_empty() {
            return Ok(());
        }
        self.notify(
            first * PAGE_SIZE,
            (last - first) * PAGE_SIZE,
            RangeChange::Unmap,
        )?;
        let mut result = Ok(());
        for idx in committed {
            if let Err(e) = pages.remove(idx) {
                result = Err(e);
                break;
            }
        }
        pages.debug_check();
        result
    }

    /// Changes the size (RESIZABLE only; rounded up to pages). Shrinking drops the tail's
    /// pages and their translations in every Vmar; pinned pages in the tail → `BadState`.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.require(Rights::WRITE)?;
        if !self.inner.flags.contains(VmoFlags::RESIZABLE) || self.is_slice() {
            return Err(Error::NotSupported);
        }
        let new_size = page_round_up(new_size)?;
        let mut pages = self.lock_root_pages();
        let old_size = pages.size;
        if new_size < old_size {
            let (first, last) = (new_size / PAGE_SIZE, old_size / PAGE_SIZE);
            if pages.any_pinned_in(first, last) {
                return Err(Error::BadState);
            }
            self.notify(new_size, old_size - new_size, RangeChange::Unmap)?;
        }
        let dropped = pages.resize(new_size)?;
        pages.debug_check();
        drop(pages);
        drop(dropped);
        Ok(())
    }

    /// Pins the pages covering `[offset, offset + len)`: commits them privately and keeps them
    /// from being decommitted, shared or moved until `unpin`.
    pub fn pin(&self, offset: u64, len: u64) -> Result<()> {
        self.require(Rights::READ)?;
        if len == 0 {
            return Err(Error::InvalidArgs);
        }
        let end = check_range(offset, len, self.size())?;
        let (first, last) = self.root_page_span(offset, end - offset);
        let mut pages = self.lock_root_pages();
        // Pinning breaks sharing: translations of shared frames in the range must go.
        self.notify(
            first * PAGE_SIZE,
            (last - first) * PAGE_SIZE,
            RangeChange::Unmap,
        )?;
        let result = pages.pin(&self.inner.pool, first, last);
        pages.debug_check();
        result
    }

    /// Drops one pin from each page covering `[offset, offset + len)`; all must be pinned.
    pub fn unpin(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Err(Error::InvalidArgs);
        }
        let end = check_range(offset, len, self.size())?;
        let (first, last) = self.root_page_span(offset, end - offset);
        self.lock_root_pages().unpin(first, last)
    }

    pub fn has_pins(&self) -> bool {
        self.lock_root_pages().any_pinned()
    }

    /// Whether the page at `page_idx` is committed (no commit happens).
    pub fn is_committed(&self, page_idx: u64) -> bool {
        let (_, base) = self.root();
        self.lock_root_pages()
            .get(base / PAGE_SIZE + page_idx)
            .is_some()
    }

    /// A handle to the same object with `rights` (internal: no DUPLICATE check).
    pub(crate) fn restricted(&self, rights: Rights) -> Vmo {
        Vmo {
            inner: self.inner.clone(),
            rights,
        }
    }

    /// Checks the invariants of the page set behind this handle (`pages.rs`): the first
    /// violation, described. O(size in pages); debug builds run it after every change of small
    /// Vmos, model tests after every step.
    pub fn check_invariants(&self) -> core::result::Result<(), alloc::string::String> {
        self.lock_root_pages().check_invariants()
    }

    /// The object holding this handle's page set (itself, or a slice's root).
    fn inner_root(&self) -> Arc<VmoInner> {
        match &self.inner.body {
            Body::Pages { .. } => self.inner.clone(),
            Body::Slice { root, .. } => root.clone(),
        }
    }
}
