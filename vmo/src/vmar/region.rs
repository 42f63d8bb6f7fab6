//! Sub-regions and inspection: `allocate` (a sub-VMAR), `destroy`, `query`.
//!
//! Contract: a sub-region's MAY_* bits must be a subset of its parent's (AccessDenied); its
//! range stays reserved until destroyed; placement is Specific (overlap → AlreadyExists) or
//! Anywhere (none free → NoMemory). `destroy` unmaps everything inside (one flush) and makes
//! every handle to the region (and its sub-regions) fail with BadState afterwards.

use ept::Stage2;

use super::map::Placement;
use super::{checked_range, VmPerms, Vmar, PAGE_SIZE};
use crate::{Error, Result, Rights, Vmo};

/// What `query` reports about the mapping at an address.
#[derive(Clone, Debug)]
pub struct MappingInfo {
    pub base: u64,
    pub len: u64,
    /// A handle to the mapped Vmo (read-only rights unless the caller's mapping was writable).
    pub vmo: Vmo,
    pub vmo_offset: u64,
    pub perms: VmPerms,
    pub shared: bool,
}

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
        let removed = tree.destroy_region(self.region)?;
        self.space.unmap_range(base, len)?;
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
            base: m.base,
            len: m.len,
            vmo: m.vmo.restricted(rights & m.vmo.rights()),
            vmo_offset: m.vmo_offset,
            perms: m.perms,
            shared: m.shared,
        })
    }
}
