//! KVM-style dirty tracking on top of the fault path: after `enable_dirty_tracking` or
//! `take_dirty`, every installed entry is write-protected, so the first write to each page
//! faults and is recorded. Invariant: a page the guest wrote since the last `take_dirty` is in
//! the set; a page it did not write is not (writes through the host side `Vmo::write` are not
//! guest writes and are not recorded). If re-arming fails in the backend, `take_dirty` returns the
//! error and keeps the pages in the set, so no write goes unreported.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use ept::Stage2;

use super::{VmPerms, Vmar};
use crate::Result;

impl<S: Stage2 + Send + 'static> Vmar<S> {
    /// Starts recording guest writes (clearing any earlier record).
    pub fn enable_dirty_tracking(&self) -> Result<()> {
        let tree = self.space.tree.read();
        *self.space.dirty.lock() = Some(BTreeSet::new());
        let mut stage2 = self.space.stage2.lock();
        for m in tree
            .mappings
            .values()
            .filter(|m| m.perms.contains(VmPerms::WRITE))
        {
            stage2.protect(m.base, m.len, (m.perms - VmPerms::WRITE).to_stage2())?;
        }
        self.space.flush_if_pending(&mut stage2);
        Ok(())
    }

    /// Stops recording.
    pub fn disable_dirty_tracking(&self) {
        *self.space.dirty.lock() = None;
    }

    /// The guest-physical pages written since tracking started or since the last call (sorted),
    /// and write-protects them again so the next write is seen.
    pub fn take_dirty(&self) -> Result<Vec<u64>> {
        let tree = self.space.tree.read();
        let pages: Vec<u64> = match self.space.dirty.lock().as_mut() {
            Some(set) => core::mem::take(set).into_iter().collect(),
            None => return Ok(Vec::new()),
        };
        let mut stage2 = self.space.stage2.lock();
        let mut result = Ok(());
        for &page in &pages {
            if let Some(m) = tree.mapping_at(page) {
                let read_only = (m.perms - VmPerms::WRITE).to_stage2();
                if let Err(e) = stage2.protect(page, crate::PAGE_SIZE, read_only) {
                    result = Err(e);
                    break;
                }
            }
        }
        self.space.flush_if_pending(&mut stage2);
        drop(stage2);
        if let Err(e) = result {
            // Not re-armed: the pages stay recorded (a later write would not be seen again).
            if let Some(set) = self.space.dirty.lock().as_mut() {
                set.extend(pages.iter().copied());
            }
            return Err(e.into());
        }
        Ok(pages)
    }
}
