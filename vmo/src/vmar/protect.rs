//! `Vmar::protect`: changing the permissions of a mapped range.
//!
//! Contract: the range must be fully mapped (a hole → NotFound); the new perms must be well
//! formed and allowed by each mapping's region MAY_* bits and its Vmo's rights (AccessDenied);
//! partly covered mappings are split. Installed second-level entries are downgraded before
//! return: to the new perms without WRITE (a write then refaults and is upgraded in place or
//! copied, so copy-on-write frames never become writable by accident), or removed when the
//! new perms allow nothing. One flush. The entries change before the tree does: a backend
//! failure returns its error with every mapping's perms unchanged.

use alloc::vec::Vec;

use ept::Stage2;

use super::map::{rights_for, split_mapping};
use super::{checked_range, VmPerms, Vmar};
use crate::{Error, Result};

impl<S: Stage2 + Send + 'static> Vmar<S> {
    /// Sets the perms of `[offset, offset + len)` of this region (len rounded up to pages).
    pub fn protect(&self, offset: u64, len: u64, perms: VmPerms) -> Result<()> {
        if perms != perms.access() {
            return Err(Error::InvalidArgs);
        }
        let mut tree = self.space.tree.write();
        let region = tree.region(self.region)?;
        let (s, e) = checked_range(offset, len, region.len)?;
        let (start, end) = (region.base + s, region.base + e);
        let bases = tree.mappings_in(start, end);
        // Check everything first: full coverage, perms and rights of every mapping.
        let mut covered = start;
        for b in &bases {
            let m = &tree.mappings[b];
            if m.base > covered {
                return Err(Error::NotFound);
            }
            covered = covered.max(m.end());
            perms.check(tree.region(m.region)?.may)?;
            if !m.vmo.rights().contains(rights_for(perms)) {
                return Err(Error::AccessDenied);
            }
        }
        if covered < end {
            return Err(Error::NotFound);
        }
        // Translations first, under the tree lock: if the backend fails, the tree (the
        // mappings' perms) is unchanged. A protect that failed part-way may have left entries
        // with perms the old mappings do not allow (an added EXEC), so the range's entries are
        // then removed as well (they refault under the old perms) before the error returns; if
        // even that fails, its error is the one returned.
        {
            let mut stage2 = self.space.stage2.lock();
            let installed = (perms - VmPerms::WRITE).to_stage2();
            let result = if perms.contains(VmPerms::READ) {
                stage2.protect(start, end - start, installed).map(drop)
            } else {
                stage2.unmap(start, end - start).map(drop)
            };
            if let Err(e) = result {
                let undo = stage2.unmap(start, end - start);
                self.space.flush_if_pending(&mut stage2);
                return Err(undo.err().unwrap_or(e).into());
            }
            self.space.flush_if_pending(&mut stage2);
        }
        let mut old = Vec::new();
        for b in bases {
            old.push(split_mapping(
                &self.space,
                &mut tree,
                b,
                start,
                end,
                Some(perms),
            )?);
        }
        tree.debug_check();
        drop(tree);
        drop(old);
        Ok(())
    }
}
