//! `Vmar::map`: placing a Vmo (or part of it) into the address space, and the mapping
//! constructor/splitter the other operations share.
//!
//! Contract (CONTRACTS.md, Zircon's vmar_map): placement Specific (overlap → AlreadyExists),
//! SpecificOverwrite (atomically replaces overlapped mappings: their translations are removed
//! first, and if the backend fails the old mappings stay; any overlapped sub-region →
//! InvalidArgs) or Anywhere with a power-of-two alignment (none free → NoMemory). WRITE and EXEC
//! each need READ (InvalidArgs); perms beyond the region's MAY_* bits or the Vmo's rights →
//! AccessDenied. Mapping past the Vmo's end, or a resizable or pager-backed Vmo, needs
//! `allow_faults` (NotSupported otherwise). Nothing is installed in the Stage2 here.

use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;

use ept::Stage2;

use super::observer::MappingObserver;
use super::tree::{Child, Mapping, MappingInfo, RegionId, Tree};
use super::{checked_range, Space, VmPerms, Vmar, PAGE_SIZE};
use crate::vmo::VmoObserver;
use crate::{Error, Result, Rights, Vmo, VmoFlags};

/// Where `map` (and `allocate`) puts the new range. Offsets are relative to the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Specific(u64),
    SpecificOverwrite(u64),
    /// Lowest free range aligned to `align` (a power of two, at least a page).
    Anywhere {
        align: u64,
    },
}

/// Options of `Vmar::map`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapOptions {
    pub placement: Placement,
    /// READ / WRITE / EXEC.
    pub perms: VmPerms,
    /// Allow mapping past the Vmo's end and resizable or pager-backed Vmos.
    pub allow_faults: bool,
    /// Stay shared with forks instead of becoming copy-on-write.
    pub shared: bool,
}

impl MapOptions {
    pub fn specific(offset: u64, perms: VmPerms) -> Self {
        MapOptions {
            placement: Placement::Specific(offset),
            perms,
            allow_faults: false,
            shared: false,
        }
    }

    pub fn anywhere(perms: VmPerms) -> Self {
        MapOptions {
            placement: Placement::Anywhere { align: PAGE_SIZE },
            perms,
            allow_faults: false,
            shared: false,
        }
    }

    pub fn allow_faults(mut self) -> Self {
        self.allow_faults = true;
        self
    }

    pub fn shared(mut self) -> Self {
        self.shared = true;
        self
    }
}

/// The Vmo rights each access bit needs.
pub(crate) fn rights_for(perms: VmPerms) -> Rights {
    let mut r = Rights::MAP;
    if perms.contains(VmPerms::READ) {
        r |= Rights::READ;
    }
    if perms.contains(VmPerms::WRITE) {
        r |= Rights::WRITE;
    }
    if perms.contains(VmPerms::EXEC) {
        r |= Rights::EXEC;
    }
    r
}

/// Builds a mapping in `region` and registers its observer with the Vmo.
pub(crate) fn make_mapping<S: Stage2 + Send + 'static>(
    space: &Arc<Space<S>>,
    info: MappingInfo,
    region: RegionId,
) -> Mapping<S> {
    let observer = Arc::new(MappingObserver {
        space: Arc::downgrade(space),
        gpa: info.base,
        vmo_offset: info.vmo_offset,
        len: info.len,
        perms: info.perms,
    });
    let weak: Weak<dyn VmoObserver> = Arc::downgrade(&observer) as Weak<dyn VmoObserver>;
    let observer_id = info.vmo.add_observer(weak);
    Mapping {
        info,
        region,
        _observer: observer,
        observer_id,
    }
}

/// Replaces mapping `base` by its pieces outside `[cut_start, cut_end)` and, when `middle` is
/// given, a middle piece with those perms. Returns the removed original. Pure tree surgery:
/// the caller has already dealt with the range's translations.
pub(crate) fn split_mapping<S: Stage2 + Send + 'static>(
    space: &Arc<Space<S>>,
    tree: &mut Tree<S>,
    base: u64,
    cut_start: u64,
    cut_end: u64,
    middle: Option<VmPerms>,
) -> Result<Mapping<S>> {
    let old = tree.remove_mapping(base).ok_or(Error::NotFound)?;
    let (s, e) = (cut_start.max(old.base), cut_end.min(old.end()));
    let mut pieces = Vec::new();
    if old.base < s {
        pieces.push(old.piece(old.base, s, old.perms));
    }
    if let Some(perms) = middle {
        pieces.push(old.piece(s, e, perms));
    }
    if e < old.end() {
        pieces.push(old.piece(e, old.end(), old.perms));
    }
    for p in pieces {
        tree.insert_mapping(make_mapping(space, p, old.region))?;
    }
    Ok(old)
}

impl<S: Stage2 + Send + 'static> Vmar<S> {
    /// Maps `len` bytes (rounded up to pages) of `vmo` from `vmo_offset`; returns the
    /// guest-physical base address.
    pub fn map(&self, vmo: &Vmo, vmo_offset: u64, len: u64, opts: MapOptions) -> Result<u64> {
        if opts.perms != opts.perms.access() {
            return Err(Error::InvalidArgs);
        }
        if !vmo_offset.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidArgs);
        }
        let (_, rounded) = checked_range(0, len, u64::MAX)?;
        let vmo_end = vmo_offset.checked_add(rounded).ok_or(Error::OutOfRange)?;
        if !vmo.rights().contains(rights_for(opts.perms)) {
            return Err(Error::AccessDenied);
        }
        let needs_faults = vmo_end > vmo.size()
            || vmo.flags().contains(VmoFlags::RESIZABLE)
            || vmo.is_pager_backed();
        if needs_faults && !opts.allow_faults {
            return Err(Error::NotSupported);
        }

        let mut tree = self.space.tree.write();
        let region = tree.region(self.region)?;
        opts.perms.check(region.may)?;
        let (rbase, rlen) = (region.base, region.len);
        let mut replaced = Vec::new();
        let base = match opts.placement {
            Placement::Specific(off) => {
                let (s, e) = checked_range(off, rounded, rlen)?;
                if !region.children_in(rbase + s, rbase + e).is_empty() {
                    return Err(Error::AlreadyExists);
                }
                rbase + s
            }
            Placement::SpecificOverwrite(off) => {
                let (s, e) = checked_range(off, rounded, rlen)?;
                let (s, e) = (rbase + s, rbase + e);
                let overlapped = region.children_in(s, e);
                if overlapped
                    .iter()
                    .any(|(_, c)| matches!(c, Child::Region(..)))
                {
                    return Err(Error::InvalidArgs);
                }
                if !overlapped.is_empty() {
                    // Translations go first: if the backend fails, the tree is unchanged and
                    // the old mappings (and their frames) stay as they were.
                    self.space.unmap_range(s, e - s)?;
                }
                for (b, _) in overlapped {
                    replaced.push(split_mapping(&self.space, &mut tree, b, s, e, None)?);
                }
                s
            }
            Placement::Anywhere { align } => {
                if !align.is_power_of_two() || align < PAGE_SIZE {
                    return Err(Error::InvalidArgs);
                }
                region.find_gap(rounded, align).ok_or(Error::NoMemory)?
            }
        };
        let info = MappingInfo {
            base,
            len: rounded,
            vmo: vmo.clone(),
            vmo_offset,
            perms: opts.perms,
            shared: opts.shared,
            allow_faults: opts.allow_faults,
        };
        tree.insert_mapping(make_mapping(&self.space, info, self.region))?;
        tree.debug_check();
        drop(tree);
        drop(replaced);
        Ok(base)
    }
}
