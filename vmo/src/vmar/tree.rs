//! The region tree of one address space: sub-VMARs (regions) and the flat ordered map of all
//! mappings. Pure bookkeeping — no Stage2, no Vmo page access.
//!
//! Invariants:
//! - a region's `children` are keyed by base address, never overlap, and lie inside the region;
//! - every mapping appears once in `mappings` (keyed by base) and once in the `children` of the
//!   region that holds it, with the same length;
//! - a destroyed region is gone from `regions`; handles naming it get `BadState`.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;

use ept::Stage2;

use super::observer::MappingObserver;
use super::{VmPerms, PAGE_SIZE};
use crate::vmo::ObserverId;
use crate::{Error, Result, Vmo};

pub(crate) type RegionId = u64;
pub(crate) const ROOT: RegionId = 0;

#[derive(Clone, Copy, Debug)]
pub(crate) enum Child {
    Region(RegionId, u64),
    Mapping(u64),
}

impl Child {
    pub fn len(&self) -> u64 {
        match *self {
            Child::Region(_, len) | Child::Mapping(len) => len,
        }
    }
}

pub(crate) struct Region {
    pub base: u64,
    pub len: u64,
    /// MAY_* bits.
    pub may: VmPerms,
    pub parent: Option<RegionId>,
    pub children: BTreeMap<u64, Child>,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.base + self.len
    }

    /// Children intersecting absolute `[start, end)`, in address order.
    pub fn children_in(&self, start: u64, end: u64) -> Vec<(u64, Child)> {
        let mut out = Vec::new();
        if let Some((&b, &c)) = self.children.range(..start).next_back() {
            if b + c.len() > start {
                out.push((b, c));
            }
        }
        out.extend(self.children.range(start..end).map(|(&b, &c)| (b, c)));
        out
    }

    /// First `align`-aligned free range of `len` bytes, lowest address first.
    pub fn find_gap(&self, len: u64, align: u64) -> Option<u64> {
        let mut cursor = self.base;
        for (&b, c) in self.children.iter() {
            let start = cursor.checked_add(align - 1)? & !(align - 1);
            if start.checked_add(len)? <= b {
                return Some(start);
            }
            cursor = cursor.max(b + c.len());
        }
        let start = cursor.checked_add(align - 1)? & !(align - 1);
        (start.checked_add(len)? <= self.end()).then_some(start)
    }
}

/// One Vmo mapped at `[base, base + len)`.
pub(crate) struct Mapping<S: Stage2 + Send + 'static> {
    pub base: u64,
    pub len: u64,
    pub vmo: Vmo,
    pub vmo_offset: u64,
    /// Access bits (READ/WRITE/EXEC).
    pub perms: VmPerms,
    /// Shared mappings stay shared across `fork`; private ones become copy-on-write.
    pub shared: bool,
    /// May extend past the Vmo's end / map a resizable or pager Vmo; faults there are errors.
    pub allow_faults: bool,
    pub region: RegionId,
    /// Keeps the Vmo observer registration alive; removed on drop.
    pub _observer: Arc<MappingObserver<S>>,
    pub observer_id: ObserverId,
}

impl<S: Stage2 + Send + 'static> Mapping<S> {
    pub fn end(&self) -> u64 {
        self.base + self.len
    }

    /// Vmo page index of guest-physical `gpa` (inside the mapping).
    pub fn vmo_page(&self, gpa: u64) -> u64 {
        (self.vmo_offset + (gpa - self.base)) / PAGE_SIZE
    }
}

impl<S: Stage2 + Send + 'static> Drop for Mapping<S> {
    fn drop(&mut self) {
        self.vmo.remove_observer(self.observer_id);
    }
}

pub(crate) struct Tree<S: Stage2 + Send + 'static> {
    regions: BTreeMap<RegionId, Region>,
    pub mappings: BTreeMap<u64, Mapping<S>>,
    next_id: RegionId,
}

impl<S: Stage2 + Send + 'static> Tree<S> {
    pub fn new(size: u64) -> Self {
        let mut regions = BTreeMap::new();
        let root = Region {
            base: 0,
            len: size,
            may: VmPerms::MAY_ALL,
            parent: None,
            children: BTreeMap::new(),
        };
        regions.insert(ROOT, root);
        Tree {
            regions,
            mappings: BTreeMap::new(),
            next_id: ROOT + 1,
        }
    }

    pub fn region(&self, id: RegionId) -> Result<&Region> {
        self.regions.get(&id).ok_or(Error::BadState)
    }

    pub fn region_mut(&mut self, id: RegionId) -> Result<&mut Region> {
        self.regions.get_mut(&id).ok_or(Error::BadState)
    }

    /// The mapping containing `gpa`.
    pub fn mapping_at(&self, gpa: u64) -> Option<&Mapping<S>> {
        let (_, m) = self.mappings.range(..=gpa).next_back()?;
        (gpa < m.end()).then_some(m)
    }

    /// Mappings intersecting `[start, end)` anywhere in the space (bases, in order).
    pub fn mappings_in(&self, start: u64, end: u64) -> Vec<u64> {
        let mut out = Vec::new();
        if let Some((&b, m)) = self.mappings.range(..start).next_back() {
            if m.end() > start {
                out.push(b);
            }
        }
        out.extend(self.mappings.range(start..end).map(|(&b, _)| b));
        out
    }

    pub fn insert_mapping(&mut self, m: Mapping<S>) -> Result<()> {
        let region = self.regions.get_mut(&m.region).ok_or(Error::BadState)?;
        region.children.insert(m.base, Child::Mapping(m.len));
        self.mappings.insert(m.base, m);
        Ok(())
    }

    pub fn remove_mapping(&mut self, base: u64) -> Option<Mapping<S>> {
        let m = self.mappings.remove(&base)?;
        if let Some(region) = self.regions.get_mut(&m.region) {
            region.children.remove(&base);
        }
        Some(m)
    }

    pub fn add_region(
        &mut self,
        parent: RegionId,
        base: u64,
        len: u64,
        may: VmPerms,
    ) -> Result<RegionId> {
        let id = self.next_id;
        self.next_id += 1;
        self.region_mut(parent)?
            .children
            .insert(base, Child::Region(id, len));
        self.regions.insert(
            id,
            Region {
                base,
                len,
                may,
                parent: Some(parent),
                children: BTreeMap::new(),
            },
        );
        Ok(id)
    }

    /// Removes region `id`, its sub-regions and mappings. Returns the removed mappings (the
    /// caller drops their translations, then the mappings, outside hot locks).
    pub fn destroy_region(&mut self, id: RegionId) -> Result<Vec<Mapping<S>>> {
        let region = self.regions.remove(&id).ok_or(Error::BadState)?;
        if let Some(parent) = region.parent.and_then(|p| self.regions.get_mut(&p)) {
            parent.children.remove(&region.base);
        }
        let mut removed = Vec::new();
        for (base, child) in region.children {
            match child {
                Child::Mapping(_) => removed.extend(self.mappings.remove(&base)),
                Child::Region(sub, _) => removed.extend(self.destroy_region(sub)?),
            }
        }
        Ok(removed)
    }

    /// Region ids in creation order (fork rebuilds them in this order, parents first).
    pub fn region_ids(&self) -> Vec<RegionId> {
        self.regions.keys().copied().collect()
    }
}
