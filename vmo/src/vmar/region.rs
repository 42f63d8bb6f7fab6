//! Sub-regions and inspection: `allocate` (a sub-VMAR), `destroy`, `query`.
//!
//! Contract: a sub-region's MAY_* bits must be a subset of its parent's (AccessDenied); its
//! range stays reserved until destroyed; placement is Specific (overlap → AlreadyExists) or
//! Anywhere (none free → NoMemory). `destroy` unmaps everything inside (one flush; translations first, so a backend failure leaves
//! the region intact) and makes
//! every handle to the region (and its sub-regions) fail with BadState afterwards.

use ept::Stage2;

use super::map::Placement;
use super::tree::MappingInfo;
use super::{checked_range, VmPerms, Vmar, PAGE_SIZE};
use crate::{Error, Result, Rights};

impl<S: Stage2 + Send + 'static> Vmar<S> {
    /// A sub-region of `len` bytes with MAY_* bits `may` (a subset of this region's).
    pub fn allocate(&self, placement: Placement, len: u64, may: VmPerms) -> Result<Vmar<S>> {
        if may != (may & VmPerms::MAY_ALL) {
            return Err(Error::InvalidArgs);
        }
        let mut tree = self.space.tree.write();
        let region = tree.region(self.region)?;
        if !region.may.contains(may) {
            return Err(Error::AccessDenied);
        }
        let (rbase, rlen) = (region.base, region.len);
        let (_, rounded) = checked_range(0, len, u64::MAX)?;
        let base = match placement {
            Placement::Specific(off) => {
                let (s, e) = checked_range(off, rounded, rlen)?;
                if !region.children_in(rbase + s, rbase + e).is_empty() {
                    return Err(Error::AlreadyExists);
                }
                rbase + s
            }
            Placement::SpecificOverwrite(_) => return Err(Error::InvalidArgs),
            Placement::Anywhere { align } => {
                if !align.is_power_of_two() || align < PAGE_SIZE {
                    return Err(Error::InvalidArgs);
                }
                region.find_gap(rounded, align).ok_or(Error::NoMemory)?
            }
        };
        let id = tree.add_region(self.region, base, rounded, may)?;
        tree.debug_check();
        Ok(Vmar {
            space: self.space.clone(),
            region: id,
        })
    }

    /// Unmaps everything in this region and removes it (the root too: the space then holds
    /// nothing and accepts nothing).
    pub fn destroy(&self) -> Result<()> {
        let mut tree = self.space.tree.write();
        let (base, len) = {
            let r = tree.region(self.region)?;
            (r.base, r.len)
        };
        // Translations first: a backend failure leaves the region and its mappings in place.
        self.space.unmap_range(base, len)?;
        let removed = tree.destroy_region(self.region)?;
        tree.debug_check();
        drop(tree);
        drop(removed);
        Ok(())
    }

    /// The mapping containing guest-physical `gpa`, anywhere in the space.
    pub fn query(&self, gpa: u64) -> Result<MappingInfo> {
        let tree = self.space.tree.read();
        tree.region(self.region)?;
        let m = tree.mapping_at(gpa).ok_or(Error::NotFound)?;
        let mut rights = Rights::READ | Rights::MAP;
        if m.perms.contains(VmPerms::WRITE) {
            rights |= Rights::WRITE;
        }
        Ok(MappingInfo {
            vmo: m.vmo.restricted(rights & m.vmo.rights()),
            ..m.info.clone()
        })
    }
}
