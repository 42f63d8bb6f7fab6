//! Reset points of a page set: `set_reset_point` remembers the current pages (sharing every
//! frame), `reset` returns to them dropping only the pages changed since. Invariant: the
//! translations of shared or dropped frames are downgraded / removed before the change, and a
//! backend failure leaves the page set (and its reset point) as it was.

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
        let key = |v: &Vmo| Arc::as_ptr(&v.inner_root()) as usize;
        let mut roots: alloc::vec::Vec<&Vmo> = vmos.iter().collect();
        roots.sort_by_key(|v| key(v));
        roots.dedup_by_key(|v| key(v));
        let mut guards: alloc::vec::Vec<_> = roots.iter().map(|v| v.lock_root_pages()).collect();
        if guards
            .iter()
            .any(|p| !p.has_reset_point() || p.any_pinned())
        {
            return Err(Error::BadState);
        }
        let changed: alloc::vec::Vec<alloc::vec::Vec<u64>> =
            guards.iter().map(|p| p.changed()).collect();
        for (vmo, slots) in roots.iter().zip(&changed) {
            vmo.unmap_pages(slots)?;
        }
        let mut old = alloc::vec::Vec::new();
        for pages in guards.iter_mut() {
            old.push(pages.reset()?);
            pages.debug_check();
        }
        drop(guards);
        drop(old);
        Ok(changed.iter().map(|c| c.len() as u64).sum())
    }
}
