//! Reset points of a page set: `set_reset_point` remembers the current pages (sharing every
//! frame); `reset` returns to them dropping the pages changed since (the *drop* policy), and
//! `restore_objects` returns to them copying the reset point's bytes back into the private
//! frames it keeps (the *restore* policy, `pages/restore.rs`). Invariant: the translations of
//! shared or dropped frames are downgraded / removed before the change, and a backend failure
//! leaves every page set (and its reset point) as it was.

use alloc::sync::Arc;

use super::{Error, RangeChange, Result, Rights, Vmo};

impl Vmo {
    /// Remembers the current contents as the state `reset` returns to (page sets only). The
    /// saved state shares every frame, so installed writable translations become read-only.
    pub fn set_reset_point(&self) -> Result<()> {
        if self.is_slice() {
            return Err(Error::NotSupported);
        }
        let mut pages = self.lock_root_pages();
        if pages.any_pinned() {
            return Err(Error::BadState);
        }
        // The saved state will share every frame: no translation may keep writing them, so the
        // downgrade comes first and a backend failure leaves the old reset point in place.
        if pages.committed_pages() > 0 {
            self.notify(0, pages.size, RangeChange::WriteProtect)?;
        }
        pages.set_reset_point();
        pages.debug_check();
        Ok(())
    }

    /// Pages (indices) changed since the reset point.
    pub fn changed_pages(&self) -> alloc::vec::Vec<u64> {
        self.lock_root_pages().changed()
    }

    /// Returns to the reset point, dropping only the pages changed since (their translations
    /// go first). Returns how many pages were dropped. No reset point, or pinned pages →
    /// `BadState`; a backend failure while dropping translations → that error, nothing reset.
    pub fn reset(&self) -> Result<u64> {
        self.require(Rights::WRITE)?;
        Vmo::reset_objects(core::slice::from_ref(self))
    }

    /// Resets the page set behind every handle in `vmos` (duplicates allowed), all or nothing,
    /// whatever rights the handles carry: the caller (`Vmar::reset`) owns the reset points it
    /// set. Every page set is locked (in address order, so two concurrent calls cannot
    /// deadlock) and checked first (reset point, no pins: else `BadState`); then the
    /// translations of every changed page are dropped (a backend failure returns its error
    /// with nothing reset; translations already dropped just refault); only then are the
    /// arrays swapped, which cannot fail. Returns the pages dropped.
    pub(crate) fn reset_objects(vmos: &[Vmo]) -> Result<u64> {
        let items: alloc::vec::Vec<(Vmo, alloc::vec::Vec<u64>)> = vmos
            .iter()
            .map(|v| (v.clone(), alloc::vec::Vec::new()))
            .collect();
        Vmo::reset_roots(&items, false).map(|s| s.dropped)
    }

    /// The restore policy for the page sets behind `items` (handle, offsets in that handle
    /// written through translations since the last harvest): all or nothing like
    /// `reset_objects`. Every page set is planned first (`Pages::plan_restore`); a set that
    /// cannot be restored in place (resized since its reset point) is reset by dropping
    /// instead. Then the translations of every slot that goes back to a shared frame or to
    /// empty are dropped (a backend failure returns its error with nothing reset), and only
    /// then are the plans applied, which cannot fail.
    pub(crate) fn restore_objects(items: &[(Vmo, alloc::vec::Vec<u64>)]) -> Result<RestoreStats> {
        Vmo::reset_roots(items, true)
    }

    /// Both policies: lock every page set once (address order), check them all, decide per set
    /// (a restore plan, or drop), drop the translations that must go, then change the sets.
    fn reset_roots(items: &[(Vmo, alloc::vec::Vec<u64>)], restore: bool) -> Result<RestoreStats> {
        let key = |v: &Vmo| Arc::as_ptr(&v.inner_root()) as usize;
        // One entry per page set, with the written offsets turned into its slots.
        let mut roots: alloc::vec::Vec<(&Vmo, alloc::vec::Vec<u64>)> = alloc::vec::Vec::new();
        for (vmo, offsets) in items {
            let (_, base) = vmo.root();
            let slots = offsets.iter().map(|o| (base + o) / crate::PAGE_SIZE);
            match roots.iter_mut().find(|(v, _)| key(v) == key(vmo)) {
                Some((_, s)) => s.extend(slots),
                None => roots.push((vmo, slots.collect())),
            }
        }
        roots.sort_by_key(|(v, _)| key(v));
        let mut guards: alloc::vec::Vec<_> =
            roots.iter().map(|(v, _)| v.lock_root_pages()).collect();
        if guards
            .iter()
            .any(|p| !p.has_reset_point() || p.any_pinned())
        {
            return Err(Error::BadState);
        }
        let mut plans = alloc::vec::Vec::new();
        for (pages, (_, slots)) in guards.iter_mut().zip(&roots) {
            plans.push(if restore {
                pages.plan_restore(slots)?
            } else {
                None
            });
        }
        for (((vmo, _), plan), pages) in roots.iter().zip(&plans).zip(&guards) {
            match plan {
                Some(plan) => vmo.unmap_pages(&plan.revert)?,
                None => vmo.unmap_pages(&pages.changed())?,
            }
        }
        // Replaced frames and arrays are dropped after the locks.
        let mut stats = RestoreStats::default();
        let (mut old_frames, mut old_arrays) = (alloc::vec::Vec::new(), alloc::vec::Vec::new());
        for (pages, plan) in guards.iter_mut().zip(plans) {
            match plan {
                Some(plan) => {
                    stats.restored += plan.refilled();
                    stats.dropped += plan.revert.len() as u64;
                    old_frames.extend(pages.apply_restore(plan));
                }
                None => {
                    stats.dropped += pages.changed().len() as u64;
                    old_arrays.push(pages.reset()?);
                    pages.debug_check();
                }
            }
        }
        drop(guards);
        drop((old_frames, old_arrays));
        Ok(stats)
    }
}

/// What a reset did: pages whose private frame was refilled with the reset point's bytes and
/// kept (`restored`), and pages that went back to the reset point's frame or to empty
/// (`dropped`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    pub restored: u64,
    pub dropped: u64,
}
