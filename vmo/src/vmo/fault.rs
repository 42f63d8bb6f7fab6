//! The fault path's entry into a `Vmo`: `fault_page` (one page) and `fault_pages` (a run of
//! pages under one acquisition of the page-set lock, installed by one callback — the bulk
//! installs of fault-around, streaming and prefault). A run that may commit empty slots is
//! announced to a pager first (`Pager::read_ahead`), so it can read the run in one I/O.
//!
//! Invariant: the install callback runs while the page set is locked, so a translation it
//! installs cannot outlive the frame it names; a frame handed over as `writable` is private to
//! this object's page set.

use alloc::vec::Vec;

use super::observer::RangeChange;
use super::pages::{PageOrigin, Pages};
use super::{Rights, Vmo};
use crate::{Error, Frame, Result, PAGE_SIZE};

/// What `Vmo::fault_page` is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAccess {
    /// Commit if needed (zero or pager), install.
    Read,
    /// Commit if needed and make private (copy-on-write), install writable.
    Write,
    /// Install only if already committed; never commit or do I/O.
    ReadIfCommitted,
    /// Install only if already committed and private to this object (so writable): a write
    /// fault's fault-around, which must not install read-only neighbours that the writer
    /// would fault on again.
    ReadIfPrivate,
    /// Commit a fresh private page and install it writable, only if the slot is empty (never
    /// copies or upgrades a committed frame): streaming fault-around's speculative writes.
    WriteIfUncommitted,
}
/// One page of a run made present by `Vmo::fault_pages`.
#[derive(Clone, Debug)]
pub struct FaultedPage {
    pub frame: Frame,
    /// The frame is private to this object and may be mapped writable.
    pub writable: bool,
    pub origin: PageOrigin,
}

impl Vmo {
    /// The single entry of the fault path into the Vmo: makes page `page_idx` of this object
    /// present (and private, for a write) and runs `install(frame, writable, origin)` while the
    /// page set is locked, so the translation installed cannot outlive the frame. `writable` is
    /// true when the frame is private and may be mapped writable. Needs READ (and WRITE for a
    /// write). With `FaultAccess::ReadIfCommitted` nothing is committed: an empty page returns
    /// `Ok(None)` without calling `install` (fault-around of neighbour pages); with
    /// `WriteIfUncommitted` a committed page returns `Ok(None)` untouched (streaming).
    pub fn fault_page<R>(
        &self,
        page_idx: u64,
        access: FaultAccess,
        install: impl FnOnce(&Frame, bool, PageOrigin) -> Result<R>,
    ) -> Result<Option<R>> {
        self.require_for(access)?;
        let idx = self.root_slot(page_idx)?;
        let mut pages = self.lock_root_pages();
        let result = self.fault_page_locked(&mut pages, idx, access, install);
        pages.debug_check();
        result
    }

    /// `fault_page` with root slot `idx` and the page set locked.
    fn fault_page_locked<R>(
        &self,
        pages: &mut Pages,
        idx: u64,
        access: FaultAccess,
        install: impl FnOnce(&Frame, bool, PageOrigin) -> Result<R>,
    ) -> Result<Option<R>> {
        match access {
            FaultAccess::Write => {
                // Other mappings of this object may still translate a shared frame that the
                // copy replaces: they drop it first, or nothing changes.
                let (frame, origin) = pages.private(&self.inner.pool, idx, false, &mut |idx| {
                    self.notify(idx * PAGE_SIZE, PAGE_SIZE, RangeChange::Unmap)
                })?;
                pages.mark_dirty(idx)?;
                install(&frame, true, origin).map(Some)
            }
            FaultAccess::Read => {
                // Privacy is judged before taking our own handle (which would count as a sharer).
                let committed = pages.commit(&self.inner.pool, idx, false)?.1;
                let writable = pages.is_private(idx);
                let frame = pages.get(idx).ok_or(Error::BadState)?;
                install(
                    &frame,
                    writable,
                    PageOrigin {
                        committed,
                        ..PageOrigin::default()
                    },
                )
                .map(Some)
            }
            FaultAccess::WriteIfUncommitted => {
                if pages.is_committed(idx) {
                    return Ok(None);
                }
                // An empty slot gets a fresh frame: nothing is replaced, nothing to unmap.
                let (frame, origin) =
                    pages.private(&self.inner.pool, idx, false, &mut |_| Ok(()))?;
                pages.mark_dirty(idx)?;
                install(&frame, true, origin).map(Some)
            }
            FaultAccess::ReadIfPrivate => match pages.is_committed(idx) && pages.is_private(idx) {
                true => {
                    let frame = pages.get(idx).ok_or(Error::BadState)?;
                    install(&frame, true, PageOrigin::default()).map(Some)
                }
                false => Ok(None),
            },
            // `is_committed` takes no handle: a temporary one in the scrutinee would live
            // through the arms and make every frame look shared.
            FaultAccess::ReadIfCommitted => match pages.is_committed(idx) {
                true => {
                    let writable = pages.is_private(idx);
                    let frame = pages.get(idx).ok_or(Error::BadState)?;
                    install(&frame, writable, PageOrigin::default()).map(Some)
                }
                false => Ok(None),
            },
        }
    }

    fn require_for(&self, access: FaultAccess) -> Result<()> {
        let write = matches!(access, FaultAccess::Write | FaultAccess::WriteIfUncommitted);
        self.require(if write {
            Rights::READ | Rights::WRITE
        } else {
            Rights::READ
        })
    }

    /// `fault_page` over the run of pages `[first_idx, first_idx + count)`, under one
    /// acquisition of the page-set lock: each page is made present as `access` asks, in order,
    /// and `install(run)` then runs once, still under the lock, with the pages made present.
    /// The run ends early at the first page `fault_page` would answer `Ok(None)` for or that
    /// fails; a failure on the first page is returned, a later one only ends the run (asking
    /// again from there reports it). An empty run returns `Ok(None)` without calling
    /// `install`. Rights and the first page's range are checked first.
    pub fn fault_pages<R>(
        &self,
        first_idx: u64,
        count: u64,
        access: FaultAccess,
        install: impl FnOnce(&[FaultedPage]) -> Result<R>,
    ) -> Result<Option<R>> {
        self.require_for(access)?;
        let first = self.root_slot(first_idx)?;
        // Pages of this object from `first_idx` to its end (`root_slot` locks: not inside).
        let avail = (self.size() / PAGE_SIZE).saturating_sub(first_idx);
        let mut run = Vec::new();
        let mut pages = self.lock_root_pages();
        // The accesses that commit empty slots (and so read a pager) announce the run.
        if count > 1 && matches!(access, FaultAccess::Read | FaultAccess::Write) {
            pages.read_ahead(&self.inner.pool, first, count.min(avail));
        }
        let mut failed = None;
        for i in 0..count {
            if i >= avail {
                failed = Some(Error::OutOfRange);
                break;
            }
            let idx = first + i;
            match self.fault_page_locked(&mut pages, idx, access, |frame, writable, origin| {
                Ok(FaultedPage {
                    frame: frame.clone(),
                    writable,
                    origin,
                })
            }) {
                Ok(Some(p)) => run.push(p),
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        pages.end_run();
        let result = match (run.is_empty(), failed) {
            (true, Some(e)) => Err(e),
            (true, None) => Ok(None),
            (false, _) => install(&run).map(Some),
        };
        pages.debug_check();
        drop(pages);
        result
    }
}
