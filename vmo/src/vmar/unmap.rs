//! `Vmar::unmap`: removing mappings and sub-regions from a range.
//!
//! Contract: every mapping and every sub-region fully inside the range goes; mappings only
//! partly covered are split (the outside pieces stay); a sub-region only partly covered →
//! InvalidArgs, checked before anything changes; nothing in the range → NotFound; a destroyed
//! region → BadState. The range's second-level entries are removed (and flushed once) before the
//! tree changes; a backend failure returns its error with the tree unchanged.

use alloc::vec::Vec;

use ept::Stage2;

use super::map::split_mapping;
use super::tree::Child;
use super::{checked_range, Vmar};
use crate::{Error, Result};

impl<S: Stage2 + Send + 'static> Vmar<S> {
    /// Unmaps `[offset, offset + len)` of this region (len rounded up to pages).
    pub fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        let mut tree = self.space.tree.write();
        let region = tree.region(self.region)?;
        let (s, e) = checked_range(offset, len, region.len)?;
        let (start, end) = (region.base + s, region.base + e);
        let children = region.children_in(start, end);
        if children.is_empty() {
            return Err(Error::NotFound);
        }
        for (b, c) in &children {
            if let Child::Region(..) = c {
                if *b < start || b + c.len() > end {
                    return Err(Error::InvalidArgs);
                }
            }
        }
        // Translations first, under the tree lock (no fault can reinstall them): if the backend
        // fails, the error is returned with the tree unchanged, so every frame stays owned by a
        // mapping for as long as anything may still translate to it.
        self.space.unmap_range(start, end - start)?;
        let mut removed = Vec::new();
        for (b, c) in children {
            match c {
                Child::Region(id, _) => removed.extend(tree.destroy_region(id)?),
                Child::Mapping(_) => {
                    removed.push(split_mapping(&self.space, &mut tree, b, start, end, None)?)
                }
            }
        }
        tree.debug_check();
        drop(tree);
        drop(removed);
        Ok(())
    }
}
