//! `Pages`: the committed pages of one Vmo (not a slice), and the copy-on-write rule.
//!
//! Structure: pages live in an `XArray<Frame>` indexed by page number. A snapshot child gets a
//! `clone()` of the array, which shares the array's nodes (node-level copy-on-write inside the
//! `xarray` crate): creating a child is O(1) in the number of committed pages, and a long chain
//! of snapshots never makes reads walk the chain — every Vmo reaches its frames through its own
//! array of height ≤ 11.
//!
//! xarray 0.1.1 caveat: a mutable cursor's `remove` at an index beyond the array's current
//! height lands on the wrong slot (it does not check the bound that `load` checks), so every
//! removal here first checks the slot with `load`. `tests/vmo_clone.rs` keeps a regression test.
//!
//! Invariants:
//! - a frame reachable from two arrays is shared; a frame is private to this Vmo exactly when,
//!   after the path to its slot has been made exclusive (a mutable cursor copies shared nodes on
//!   the way down), this array's handle is the only one (`Frame::ref_count() == 1` once taken
//!   out of the slot). Writing requires private; a shared frame is copied (or, when fully
//!   overwritten, replaced by a fresh frame), a private one is written in place;
//! - `committed` equals the number of occupied slots;
//! - pinned slots are private and never removed or shared (the Vmo refuses snapshots while any
//!   page is pinned);
//! - when a reset point exists, every slot whose frame differs from the reset point's is in
//!   `changed` (stored, removed, or written by the host since the last reset) or in `kept` (a
//!   private frame a copy-back reset refilled with the reset point's bytes and kept), so a reset
//!   knows exactly which installed translations to drop and which pages to restore; without a
//!   reset point both are empty;
//! - the size is page aligned and at most `MAX_VMO_SIZE`; no slot at or past `size` is
//!   occupied (resize and snapshot windows remove them); pin counts are non-zero and name
//!   committed slots.
//!
//! Children: `check` — `check_invariants` / `debug_check`; [`restore`] — the copy-back reset (plan, then apply) over `changed`, `kept` and
//! the pages a dirty harvest reports.
//!
//! `check_invariants` checks the countable ones in O(size in pages) — xarray 0.1.1's `range`
//! visits every index — (privacy of pinned slots is not checked: judging it makes array paths
//! exclusive, a change). Debug builds run it at the end of every Vmo operation that changes the
//! page set of a Vmo of at most `DEBUG_CHECK_MAX_PAGES` pages, so the suites' large guests (up
//! to GiBs, faulted a page at a time) do not turn quadratic; the model tests call it after
//! every step.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::sync::Arc;
use alloc::vec::Vec;
use xarray::XArray;

mod check;
mod restore;

use crate::pager::Pager;
use crate::{Error, Frame, FramePool, Result, PAGE_BYTES, PAGE_SIZE};

/// Size in pages above which debug builds skip the automatic `check_invariants`.
#[cfg_attr(not(debug_assertions), allow(dead_code))]
pub(crate) const DEBUG_CHECK_MAX_PAGES: u64 = 4096;

/// Where a fresh page's contents come from: zeros, or a pager.
pub(crate) struct PageSource {
    pub pager: Option<Arc<dyn Pager>>,
    /// Pager page index of slot 0 (a snapshot child at an offset reads the parent's pages).
    base: u64,
    /// Whether this page set owns the pager's backing store: only then are `update_page`,
    /// `commit_overwrite` and `decommit_page` called. Snapshot children read through the
    /// pager but never write back (their writes are private).
    writeback: bool,
    /// Frames taken in one run for the pager reads of an announced run (`read_ahead`), last
    /// first; used before allocating one by one, emptied when the run ends (`end_run`).
    /// Boxed: empty (`None`) outside announced runs, and the Vmo body stays small.
    reserve: Option<alloc::boxed::Box<Reserve>>,
}

/// The frames of an announced run not used yet, last first.
struct Reserve(Vec<Frame>);

impl PageSource {
    /// A frame for empty slot `idx` (zero-filled, or the pager's data; with `overwrite` the
    /// caller overwrites the whole page, so nothing is read).
    fn fresh_frame(&mut self, pool: &FramePool, idx: u64, overwrite: bool) -> Result<Frame> {
        match (&self.pager, overwrite) {
            (Some(pager), true) => {
                if self.writeback {
                    pager.commit_overwrite(self.base + idx)?;
                }
                pool.alloc_uninit()
            }
            (Some(pager), false) => {
                let frame = match self.reserve.as_mut().and_then(|r| r.0.pop()) {
                    Some(f) => f,
                    None => pool.alloc_uninit()?,
                };
                let mut buf = [0u8; PAGE_BYTES];
                pager.commit_page(self.base + idx, &mut buf)?;
                frame.write(0, &buf)?;
                Ok(frame)
            }
            (None, true) => pool.alloc_uninit(),
            (None, false) => pool.alloc_zeroed(),
        }
    }
}

/// A saved copy of the page array (O(1) to take, shares every frame).
pub(crate) struct ResetPoint {
    array: XArray<Frame>,
    committed: u64,
    size: u64,
}

pub(crate) struct Pages {
    /// Size in bytes (page aligned).
    pub size: u64,
    array: XArray<Frame>,
    committed: u64,
    /// Page index → pin count.
    pinned: BTreeMap<u64, u32>,
    pub source: PageSource,
    reset_point: Option<ResetPoint>,
    changed: BTreeSet<u64>,
    /// Slots holding a private frame that a copy-back reset refilled from the reset point.
    kept: BTreeSet<u64>,
}

/// How a fault or write got its frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageOrigin {
    /// A new frame was committed (zero-filled or from the pager).
    pub committed: bool,
    /// A shared frame was copied to a private one.
    pub copied: bool,
    /// The slot's frame changed (copied, or replaced by a fresh frame for a full overwrite):
    /// translations of the old frame must go.
    pub replaced: bool,
}

impl Pages {
    pub fn new(size: u64, pager: Option<Arc<dyn Pager>>) -> Self {
        Pages {
            size,
            array: XArray::new(),
            committed: 0,
            pinned: BTreeMap::new(),
            source: PageSource {
                pager,
                base: 0,
                writeback: true,
                reserve: None,
            },
            reset_point: None,
            changed: BTreeSet::new(),
            kept: BTreeSet::new(),
        }
    }

    pub fn page_count(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    pub fn committed_pages(&self) -> u64 {
        self.committed
    }

    /// The frame in slot `idx`, without committing.
    pub fn get(&self, idx: u64) -> Option<Frame> {
        self.array.load(idx).map(|f| (*f).clone())
    }

    /// Whether slot `idx` is occupied (no handle is taken).
    pub fn is_committed(&self, idx: u64) -> bool {
        self.array.load(idx).is_some()
    }

    /// Occupied slots in `[start, end)`, in order.
    pub fn committed_in(&self, start: u64, end: u64) -> Vec<u64> {
        self.array.range(start..end).map(|(i, _)| i).collect()
    }

    fn note_change(&mut self, idx: u64) {
        if self.reset_point.is_some() {
            self.changed.insert(idx);
        }
    }

    fn store(&mut self, idx: u64, frame: Frame) {
        if self.array.store(idx, frame).is_none() {
            self.committed += 1;
        }
        self.note_change(idx);
    }

    /// Commits slot `idx` if empty (zero frame, or the pager's data; with `overwrite` the caller
    /// will overwrite the whole page, so no read happens). Returns the frame and whether it was
    /// committed now.
    pub fn commit(&mut self, pool: &FramePool, idx: u64, overwrite: bool) -> Result<(Frame, bool)> {
        if let Some(f) = self.get(idx) {
            return Ok((f, false));
        }
        let frame = self.source.fresh_frame(pool, idx, overwrite)?;
        self.store(idx, frame.clone());
        Ok((frame, true))
    }

    /// Commits every empty slot in `[first, last)` walking one mutable cursor; returns how many
    /// were committed. On an error the slots committed so far stay committed.
    pub fn commit_range(&mut self, pool: &FramePool, first: u64, last: u64) -> Result<u64> {
        let mut fresh = Vec::new();
        let mut result = Ok(());
        let mut cursor = self.array.cursor_mut(first);
        for idx in first..last {
            if cursor.load().is_none() {
                match self.source.fresh_frame(pool, idx, false) {
                    Ok(frame) => {
                        cursor.store(frame);
                        fresh.push(idx);
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            cursor.next();
        }
        drop(cursor);
        self.committed += fresh.len() as u64;
        for &idx in &fresh {
            self.note_change(idx);
        }
        result.map(|()| fresh.len() as u64)
    }

    /// Before committing a run of `[first, first + count)`: tells the pager (if any) the
    /// stretch from the first to the last empty slot, when it holds more than one page
    /// (`Pager::read_ahead`).
    /// The empty slots of the run also get their frames in one contiguous, populated run
    /// (`FramePool::alloc_run_uninit`), which the pager reads then fill.
    pub fn read_ahead(&mut self, pool: &FramePool, first: u64, count: u64) {
        let Some(pager) = &self.source.pager else {
            return;
        };
        let empty = |i: &u64| self.array.load(*i).is_none();
        let Some(a) = (first..first + count).find(empty) else {
            return;
        };
        let b = (a..first + count).rev().find(empty).unwrap_or(a) + 1;
        if b - a > 1 {
            pager.read_ahead(self.source.base + a, b - a);
            let n = (a..b).filter(empty).count();
            if let Some(mut run) = pool.alloc_run_uninit(n) {
                run.reverse();
                self.source.reserve = Some(alloc::boxed::Box::new(Reserve(run)));
            }
        }
    }

    /// Ends an announced run: frames of the reserve it did not use go back to the pool.
    pub fn end_run(&mut self) {
        self.source.reserve = None;
    }

    /// Would committing slot `idx` need pager I/O?
    pub fn needs_io(&self, idx: u64) -> bool {
        self.source.pager.is_some() && self.array.load(idx).is_none()
    }

    /// Makes slot `idx` committed and private to this Vmo, so it may be written. `overwrite`:
    /// the caller overwrites the whole page (no read, no copy needed). When the slot's frame is
    /// shared and must be replaced, `before_replace(idx)` runs first (the caller drops the old
    /// frame's translations there); if it fails, the slot keeps its frame and the error returns.
    pub fn private(
        &mut self,
        pool: &FramePool,
        idx: u64,
        overwrite: bool,
        before_replace: &mut dyn FnMut(u64) -> Result<()>,
    ) -> Result<(Frame, PageOrigin)> {
        if self.array.load(idx).is_none() {
            let frame = self.source.fresh_frame(pool, idx, overwrite)?;
            self.store(idx, frame.clone());
            let origin = PageOrigin {
                committed: true,
                ..PageOrigin::default()
            };
            return Ok((frame, origin));
        }
        let mut cursor = self.array.cursor_mut(idx);
        // Taking the frame out makes the path exclusive: afterwards the count is exact.
        let frame = cursor.remove().ok_or(Error::BadState)?;
        if frame.ref_count() == 1 {
            cursor.store(frame.clone());
            return Ok((frame, PageOrigin::default()));
        }
        if let Err(e) = before_replace(idx) {
            cursor.store(frame);
            return Err(e);
        }
        let copy = if overwrite {
            pool.alloc_uninit()
        } else {
            pool.copy_of(&frame)
        };
        match copy {
            Ok(copy) => {
                cursor.store(copy.clone());
                drop(cursor);
                self.note_change(idx);
                Ok((
                    copy,
                    PageOrigin {
                        committed: false,
                        copied: !overwrite,
                        replaced: true,
                    },
                ))
            }
            Err(e) => {
                cursor.store(frame);
                Err(e)
            }
        }
    }

    /// Whether slot `idx` holds a frame no other Vmo can reach (makes the path exclusive).
    pub fn is_private(&mut self, idx: u64) -> bool {
        if self.array.load(idx).is_none() {
            return false;
        }
        let mut cursor = self.array.cursor_mut(idx);
        match cursor.remove() {
            Some(frame) => {
                let private = frame.ref_count() == 1;
                cursor.store(frame);
                private
            }
            None => false,
        }
    }

    /// Removes slot `idx` (its frame is freed when the last holder drops it). The pager gets
    /// the final contents. Pinned slots are refused.
    pub fn remove(&mut self, idx: u64) -> Result<Option<Frame>> {
        if self.pinned.contains_key(&idx) {
            return Err(Error::BadState);
        }
        if self.array.load(idx).is_none() {
            return Ok(None);
        }
        let Some(frame) = self.array.remove(idx) else {
            return Ok(None);
        };
        self.committed -= 1;
        self.note_change(idx);
        if let (Some(pager), true) = (&self.source.pager, self.source.writeback) {
            let mut buf = [0u8; PAGE_BYTES];
            frame.read(0, &mut buf)?;
            pager.decommit_page(self.source.base + idx, &buf)?;
        }
        Ok(Some(frame))
    }

    /// Slot `idx` was written by the host (Vmo::write / clear): a reset must restore it, and a
    /// write-back pager hears of it.
    pub fn mark_dirty(&mut self, idx: u64) -> Result<()> {
        self.note_change(idx);
        match (&self.source.pager, self.source.writeback) {
            (Some(pager), true) => pager.update_page(self.source.base + idx),
            _ => Ok(()),
        }
    }

    pub fn is_pinned(&self, idx: u64) -> bool {
        self.pinned.contains_key(&idx)
    }

    /// Puts `frame` in empty slot `idx` (frames made by the caller, e.g. a contiguous run).
    pub fn adopt(&mut self, idx: u64, frame: Frame) {
        self.store(idx, frame);
    }

    pub fn any_pinned(&self) -> bool {
        !self.pinned.is_empty()
    }

    pub fn any_pinned_in(&self, start: u64, end: u64) -> bool {
        self.pinned.range(start..end).next().is_some()
    }

    /// Pins slots `[start, end)`: commits them privately and counts a pin on each.
    pub fn pin(&mut self, pool: &FramePool, start: u64, end: u64) -> Result<()> {
        for idx in start..end {
            // The caller dropped the range's translations before pinning.
            if let Err(e) = self.private(pool, idx, false, &mut |_| Ok(())) {
                // Undo the pins taken so far; committed pages stay committed.
                self.unpin(start, idx)?;
                return Err(e);
            }
            *self.pinned.entry(idx).or_insert(0) += 1;
        }
        Ok(())
    }

    /// Drops one pin from each slot in `[start, end)`; every slot must be pinned.
    pub fn unpin(&mut self, start: u64, end: u64) -> Result<()> {
        if (start..end).any(|i| !self.pinned.contains_key(&i)) {
            return Err(Error::BadState);
        }
        for idx in start..end {
            let count = self.pinned.get_mut(&idx).ok_or(Error::BadState)?;
            *count -= 1;
            if *count == 0 {
                self.pinned.remove(&idx);
            }
        }
        Ok(())
    }

    /// A copy of this page set sharing every frame (the body of a snapshot child), keeping only
    /// slots `[start, end)` and renumbering them from 0.
    pub fn snapshot(&self, start: u64, end: u64, size: u64) -> Pages {
        let mut child = Pages::new(size, self.source.pager.clone());
        child.source.base = self.source.base + start;
        child.source.writeback = false;
        if start == 0 {
            child.array = self.array.clone();
            child.committed = self.committed;
            // Drop what lies beyond the child's window (O(slots past the window)).
            for idx in self.committed_in(end, self.page_count().max(end)) {
                if child.array.remove(idx).is_some() {
                    child.committed -= 1;
                }
            }
        } else {
            // A window at an offset cannot share the array's numbering: share frames one by one.
            for idx in self.committed_in(start, end) {
                if let Some(frame) = self.get(idx) {
                    child.store(idx - start, frame);
                }
            }
        }
        child
    }

    /// Sets the size; the caller has checked pins. Returns the frames dropped past the new end.
    pub fn resize(&mut self, new_size: u64) -> Result<Vec<Frame>> {
        let new_pages = new_size / PAGE_SIZE;
        let mut dropped = Vec::new();
        for idx in self.committed_in(new_pages, self.page_count().max(new_pages)) {
            if let Some(f) = self.remove(idx)? {
                dropped.push(f);
            }
        }
        self.size = new_size;
        Ok(dropped)
    }

    /// Remembers the current pages as the state `reset` returns to.
    pub fn set_reset_point(&mut self) {
        self.reset_point = Some(ResetPoint {
            array: self.array.clone(),
            committed: self.committed,
            size: self.size,
        });
        self.changed.clear();
        self.kept.clear();
    }

    pub fn has_reset_point(&self) -> bool {
        self.reset_point.is_some()
    }

    /// Slots changed since the reset point (ascending), including the ones a copy-back reset
    /// kept: every slot whose frame may differ from the reset point's.
    pub fn changed(&self) -> Vec<u64> {
        self.changed.union(&self.kept).copied().collect()
    }

    /// Returns to the reset point; the caller has already dropped the translations of
    /// `changed()`. Returns the replaced array so the caller can drop it outside its locks.
    pub fn reset(&mut self) -> Result<XArray<Frame>> {
        let point = self.reset_point.as_ref().ok_or(Error::BadState)?;
        if self.any_pinned() {
            return Err(Error::BadState);
        }
        let old = core::mem::replace(&mut self.array, point.array.clone());
        self.committed = point.committed;
        self.size = point.size;
        self.changed.clear();
        self.kept.clear();
        Ok(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn noop(_: u64) -> Result<()> {
        Ok(())
    }

    #[test]
    fn commit_remove_and_counts() {
        let pool = FramePool::heap();
        let mut p = Pages::new(8 * P, None);
        assert_eq!(p.commit_range(&pool, 2, 5).unwrap(), 3);
        assert!(!p.commit(&pool, 3, false).unwrap().1, "already committed");
        assert_eq!(p.committed_pages(), 3);
        assert_eq!(p.committed_in(0, 8), alloc::vec![2, 3, 4]);
        assert!(p.remove(3).unwrap().is_some());
        assert!(p.remove(3).unwrap().is_none());
        assert_eq!(p.committed_pages(), 2);
        p.check_invariants().unwrap();
        drop(p.resize(3 * P).unwrap());
        assert_eq!(p.committed_in(0, 8), alloc::vec![2]);
        p.check_invariants().unwrap();
    }

    #[test]
    fn sharing_decides_copy_on_write() {
        let pool = FramePool::heap();
        let mut p = Pages::new(4 * P, None);
        let (f, origin) = p.private(&pool, 0, false, &mut noop).unwrap();
        assert!(origin.committed && !origin.replaced);
        drop(f);
        assert!(p.is_private(0));
        let mut child = p.snapshot(0, 4, 4 * P);
        assert!(!p.is_private(0) && !child.is_private(0));
        // A failing hook keeps the shared frame.
        let before = p.get(0).unwrap();
        let refuse = &mut |_| Err(Error::BadState);
        assert_eq!(
            p.private(&pool, 0, false, refuse).err(),
            Some(Error::BadState)
        );
        assert!(p.get(0).unwrap() == before);
        drop(before);
        let (_, origin) = p.private(&pool, 0, false, &mut noop).unwrap();
        assert!(origin.copied && origin.replaced);
        assert!(
            p.is_private(0) && child.is_private(0),
            "each side has its own frame"
        );
        p.check_invariants().unwrap();
        child.check_invariants().unwrap();
    }

    #[test]
    fn pins_and_reset_points() {
        let pool = FramePool::heap();
        let mut p = Pages::new(4 * P, None);
        p.pin(&pool, 1, 3).unwrap();
        assert!(p.is_pinned(1) && p.any_pinned_in(0, 2) && !p.any_pinned_in(3, 4));
        assert_eq!(p.remove(1).err(), Some(Error::BadState));
        assert_eq!(
            p.unpin(0, 2).err(),
            Some(Error::BadState),
            "slot 0 is not pinned"
        );
        p.unpin(1, 3).unwrap();
        assert!(!p.any_pinned());
        p.check_invariants().unwrap();
        p.set_reset_point();
        p.commit(&pool, 0, false).unwrap();
        p.remove(2).unwrap();
        assert_eq!(p.changed(), alloc::vec![0, 2]);
        drop(p.reset().unwrap());
        assert_eq!(p.committed_in(0, 4), alloc::vec![1, 2]);
        assert!(p.changed().is_empty());
        p.check_invariants().unwrap();
    }

    #[test]
    fn check_invariants_catches_a_wrong_count() {
        let pool = FramePool::heap();
        let mut p = Pages::new(4 * P, None);
        p.commit(&pool, 0, false).unwrap();
        p.committed += 1;
        assert!(p.check_invariants().is_err());
        p.committed -= 1;
        p.changed.insert(3);
        assert!(
            p.check_invariants().is_err(),
            "changed slots without a reset point"
        );
    }
}
