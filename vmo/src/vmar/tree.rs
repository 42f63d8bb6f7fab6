//! The region tree of one address space: sub-VMARs (regions) and the flat ordered map of all
//! mappings. Pure bookkeeping — no Stage2, no Vmo page access.
//!
//! Invariants:
//! - a region's `children` are keyed by base address, never overlap, and lie inside the region;
//! - every mapping appears once in `mappings` (keyed by base) and once in the `children` of the
//!   region that holds it, with the same length;
//! - a destroyed region is gone from `regions`; handles naming it get `BadState`;
//! - bases, lengths and Vmo offsets are page aligned and lengths non-zero; the root is region 0,
//!   at 0, without parent (or, once destroyed, the tree is empty); every other region is a
//!   child of a live parent.
//!
//! `Tree::check_invariants` checks all of these in O(regions + mappings); `Space` runs it under
//! `cfg(debug_assertions)` at the end of every operation that changes the tree.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
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

/// What one mapping is: `len` bytes of `vmo` from `vmo_offset`, placed at guest-physical
/// `base` with `perms`. The tree stores one per mapping; `Vmar::query` returns a copy (whose
/// Vmo handle carries only the rights the mapping needs).
#[derive(Clone, Debug)]
pub struct MappingInfo {
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
}

impl MappingInfo {
    pub fn end(&self) -> u64 {
        self.base + self.len
    }

    /// Vmo page index of guest-physical `gpa` (inside the mapping).
    pub fn vmo_page(&self, gpa: u64) -> u64 {
        (self.vmo_offset + (gpa - self.base)) / PAGE_SIZE
    }

    /// The part `[from, to)` of this mapping (inside it) with `perms`.
    pub(crate) fn piece(&self, from: u64, to: u64, perms: VmPerms) -> MappingInfo {
        debug_assert!(self.base <= from && from < to && to <= self.end());
        MappingInfo {
            base: from,
            len: to - from,
            vmo: self.vmo.clone(),
            vmo_offset: self.vmo_offset + (from - self.base),
            perms,
            shared: self.shared,
            allow_faults: self.allow_faults,
        }
    }
}

/// A mapping in the tree: what it is, the region holding it, and its Vmo observer.
pub(crate) struct Mapping<S: Stage2 + Send + 'static> {
    pub info: MappingInfo,
    pub region: RegionId,
    /// Keeps the Vmo observer registration alive; removed on drop.
    pub _observer: Arc<MappingObserver<S>>,
    pub observer_id: ObserverId,
}

impl<S: Stage2 + Send + 'static> core::ops::Deref for Mapping<S> {
    type Target = MappingInfo;
    fn deref(&self) -> &MappingInfo {
        &self.info
    }
}

impl<S: Stage2 + Send + 'static> Drop for Mapping<S> {
    fn drop(&mut self) {
        self.info.vmo.remove_observer(self.observer_id);
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

    /// Checks the module's invariants; the first violation found, described.
    pub fn check_invariants(&self) -> core::result::Result<(), String> {
        let aligned = |v: u64| v.is_multiple_of(PAGE_SIZE);
        let Some(root) = self.regions.get(&ROOT) else {
            // A destroyed root leaves nothing behind.
            if self.regions.is_empty() && self.mappings.is_empty() {
                return Ok(());
            }
            return Err(format!(
                "root destroyed but {} regions, {} mappings left",
                self.regions.len(),
                self.mappings.len()
            ));
        };
        if root.base != 0 || root.parent.is_some() {
            return Err(format!(
                "root at {:#x} with parent {:?}",
                root.base, root.parent
            ));
        }
        let mut mapping_children = 0;
        for (&id, r) in &self.regions {
            if r.len == 0
                || !aligned(r.base)
                || !aligned(r.len)
                || r.base.checked_add(r.len).is_none()
            {
                return Err(format!("region {id}: bad range {:#x}+{:#x}", r.base, r.len));
            }
            if id != ROOT {
                let parent = r.parent.and_then(|p| self.regions.get(&p));
                match parent.and_then(|p| p.children.get(&r.base)) {
                    Some(Child::Region(cid, len)) if *cid == id && *len == r.len => {}
                    other => return Err(format!("region {id}: parent's child entry is {other:?}")),
                }
            }
            let mut cursor = r.base;
            for (&b, c) in &r.children {
                if b < cursor || c.len() == 0 || b.checked_add(c.len()).is_none_or(|e| e > r.end())
                {
                    return Err(format!(
                        "region {id}: child {c:?} at {b:#x} overlaps or leaves it"
                    ));
                }
                cursor = b + c.len();
                match *c {
                    Child::Region(cid, len) => match self.regions.get(&cid) {
                        Some(sub) if sub.base == b && sub.len == len && sub.parent == Some(id) => {}
                        _ => {
                            return Err(format!(
                                "region {id}: child region {cid} at {b:#x} mismatch"
                            ))
                        }
                    },
                    Child::Mapping(len) => {
                        mapping_children += 1;
                        match self.mappings.get(&b) {
                            Some(m) if m.base == b && m.len == len && m.region == id => {}
                            _ => {
                                return Err(format!(
                                    "region {id}: child mapping at {b:#x} mismatch"
                                ))
                            }
                        }
                    }
                }
            }
        }
        if mapping_children != self.mappings.len() {
            return Err(format!(
                "{} mappings, {mapping_children} mapping children",
                self.mappings.len()
            ));
        }
        let mut cursor = 0;
        for (&b, m) in &self.mappings {
            if b != m.base || b < cursor || !aligned(m.len) || !aligned(m.vmo_offset) {
                return Err(format!("mapping at {b:#x} (base {:#x}) misplaced", m.base));
            }
            cursor = m.end();
        }
        Ok(())
    }

    /// `check_invariants` in debug builds, panicking with the violation.
    pub fn debug_check(&self) {
        #[cfg(debug_assertions)]
        if let Err(e) = self.check_invariants() {
            panic!("Vmar tree invariant violated: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FramePool, VmoFlags};
    use alloc::sync::Weak;
    use ept::{EptTable, HeapPhysMem};

    type S = EptTable<HeapPhysMem>;
    const P: u64 = PAGE_SIZE;

    fn mapping(vmo: &Vmo, base: u64, len: u64, region: RegionId) -> Mapping<S> {
        let info = MappingInfo {
            base,
            len,
            vmo: vmo.clone(),
            vmo_offset: 0,
            perms: VmPerms::RW,
            shared: false,
            allow_faults: false,
        };
        let observer = Arc::new(MappingObserver {
            space: Weak::new(),
            gpa: base,
            vmo_offset: 0,
            len,
            perms: VmPerms::RW,
        });
        Mapping {
            info,
            region,
            _observer: observer,
            observer_id: crate::vmo::ObserverId(0),
        }
    }

    #[test]
    fn regions_and_mappings_keep_the_invariants() {
        let pool = FramePool::heap();
        let vmo = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
        let mut t: Tree<S> = Tree::new(64 * P);
        let sub = t
            .add_region(ROOT, 16 * P, 16 * P, VmPerms::MAY_ALL)
            .unwrap();
        t.insert_mapping(mapping(&vmo, 0, 4 * P, ROOT)).unwrap();
        t.insert_mapping(mapping(&vmo, 20 * P, 4 * P, sub)).unwrap();
        t.check_invariants().unwrap();
        assert_eq!(t.mapping_at(21 * P).map(|m| m.base), Some(20 * P));
        assert!(t.mapping_at(24 * P).is_none());
        assert_eq!(t.mappings_in(2 * P, 21 * P), alloc::vec![0, 20 * P]);
        let removed = t.destroy_region(sub).unwrap();
        assert_eq!(removed.len(), 1);
        t.check_invariants().unwrap();
        assert_eq!(t.region(sub).err(), Some(Error::BadState));
        assert!(t.remove_mapping(0).is_some());
        t.check_invariants().unwrap();
        t.destroy_region(ROOT).unwrap();
        t.check_invariants().unwrap();
    }

    #[test]
    fn children_in_and_find_gap() {
        let mut t: Tree<S> = Tree::new(64 * P);
        t.add_region(ROOT, 4 * P, 4 * P, VmPerms::MAY_ALL).unwrap();
        t.add_region(ROOT, 12 * P, 4 * P, VmPerms::MAY_ALL).unwrap();
        let root = t.region(ROOT).unwrap();
        // A child straddling the start is included; one starting at the end is not.
        let bases: Vec<u64> = root
            .children_in(6 * P, 12 * P)
            .iter()
            .map(|(b, _)| *b)
            .collect();
        assert_eq!(bases, alloc::vec![4 * P]);
        assert!(root.children_in(8 * P, 12 * P).is_empty());
        assert_eq!(root.find_gap(4 * P, P), Some(0));
        assert_eq!(root.find_gap(5 * P, P), Some(16 * P));
        assert_eq!(root.find_gap(4 * P, 8 * P), Some(0));
        assert_eq!(root.find_gap(8 * P, 16 * P), Some(16 * P));
        assert_eq!(root.find_gap(64 * P, P), None);
        assert_eq!(root.find_gap(u64::MAX - P, P), None, "no overflow");
    }

    #[test]
    fn check_invariants_catches_a_broken_tree() {
        let pool = FramePool::heap();
        let vmo = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
        let mut t: Tree<S> = Tree::new(64 * P);
        t.insert_mapping(mapping(&vmo, 0, 4 * P, ROOT)).unwrap();
        t.insert_mapping(mapping(&vmo, 2 * P, 4 * P, ROOT)).unwrap();
        assert!(t.check_invariants().is_err(), "overlapping mappings");
        let mut t: Tree<S> = Tree::new(64 * P);
        t.mappings.insert(8 * P, mapping(&vmo, 8 * P, P, ROOT));
        assert!(t.check_invariants().is_err(), "a mapping no region holds");
    }
}
