//! The reference model of the memory model: plain data, no frames, no tables. Every Vmo is a
//! byte vector (its whole contents, eagerly copied where the real one shares copy-on-write);
//! every address space is a region tree and a flat map of mappings naming Vmos by index.
//!
//! Each operation here mirrors the documented contract (CONTRACTS.md and the module docs of
//! `vmo::vmar::*`, `vmo::vmo::*`), including the order in which its checks run, and returns
//! exactly the `Result` the real operation must return; on success it applies the effect.
//! Invariants: indices never move (objects are only marked dead), so the harness keeps its real
//! handles in vectors indexed the same way; a region's direct children are the mappings whose
//! `region` is it and the live regions whose `parent` is it.

use std::collections::BTreeMap;

use vmo::{Error, Placement, Rights, VmPerms, PAGE_SIZE};

const P: u64 = PAGE_SIZE;
/// `vmo::vmo::MAX_VMO_SIZE`.
pub const MAX_VMO_SIZE: u64 = 1 << 52;

pub type R<T> = Result<T, Error>;

#[derive(Clone, Debug)]
pub struct RVmo {
    pub data: Vec<u8>,
    pub resizable: bool,
    pub pager: bool,
    /// The reset point's contents (and so its size).
    pub reset: Option<Vec<u8>>,
    /// Rights of the harness's handle (the one it maps).
    pub rights: Rights,
}

#[derive(Clone, Debug)]
pub struct RRegion {
    pub space: usize,
    pub parent: Option<usize>,
    pub base: u64,
    pub len: u64,
    pub may: VmPerms,
    pub alive: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RMap {
    pub len: u64,
    pub vmo: usize,
    pub vmo_offset: u64,
    pub perms: VmPerms,
    pub shared: bool,
    pub allow_faults: bool,
    pub region: usize,
    /// Rights of the Vmo handle the mapping holds.
    pub rights: Rights,
}

#[derive(Clone, Debug)]
pub struct RSpace {
    pub root: usize,
    pub size: u64,
    pub mappings: BTreeMap<u64, RMap>,
    pub dropped: bool,
}

#[derive(Clone, Copy, Debug)]
enum Child {
    Region(usize),
    Mapping,
}

/// A request to `Vmar::map`.
#[derive(Clone, Copy, Debug)]
pub struct MapReq {
    pub region: usize,
    pub vmo: usize,
    pub vmo_offset: u64,
    pub len: u64,
    pub placement: Placement,
    pub perms: VmPerms,
    pub allow_faults: bool,
    pub shared: bool,
}

/// `vmo::vmar::checked_range`.
pub fn checked_range(offset: u64, len: u64, region_len: u64) -> R<(u64, u64)> {
    if len == 0 || !offset.is_multiple_of(P) {
        return Err(Error::InvalidArgs);
    }
    let len = len.checked_add(P - 1).ok_or(Error::OutOfRange)? & !(P - 1);
    let end = offset.checked_add(len).ok_or(Error::OutOfRange)?;
    if end > region_len {
        return Err(Error::InvalidArgs);
    }
    Ok((offset, end))
}

/// `[offset, offset + len)` inside a Vmo of `size` bytes (byte granularity).
fn vmo_range(offset: u64, len: u64, size: u64) -> R<u64> {
    let end = offset.checked_add(len).ok_or(Error::OutOfRange)?;
    if end > size {
        return Err(Error::OutOfRange);
    }
    Ok(end)
}

fn rights_for(perms: VmPerms) -> Rights {
    let mut r = Rights::MAP;
    for (p, q) in [
        (VmPerms::READ, Rights::READ),
        (VmPerms::WRITE, Rights::WRITE),
        (VmPerms::EXEC, Rights::EXEC),
    ] {
        if perms.contains(p) {
            r |= q;
        }
    }
    r
}

/// Rounds a Vmo size up to pages (`OutOfRange` past `MAX_VMO_SIZE`).
pub fn page_round_up(bytes: u64) -> R<u64> {
    let rounded = bytes.checked_add(P - 1).ok_or(Error::OutOfRange)? & !(P - 1);
    if rounded > MAX_VMO_SIZE {
        return Err(Error::OutOfRange);
    }
    Ok(rounded)
}

#[derive(Default, Debug)]
pub struct Reference {
    pub vmos: Vec<RVmo>,
    pub regions: Vec<RRegion>,
    pub spaces: Vec<RSpace>,
}

impl Reference {
    // ---- construction --------------------------------------------------------------------

    pub fn new_space(&mut self, size: u64) -> usize {
        let root = self.regions.len();
        let space = self.spaces.len();
        self.regions.push(RRegion {
            space,
            parent: None,
            base: 0,
            len: size,
            may: VmPerms::MAY_ALL,
            alive: true,
        });
        self.spaces.push(RSpace {
            root,
            size,
            mappings: BTreeMap::new(),
            dropped: false,
        });
        space
    }

    pub fn new_vmo(&mut self, data: Vec<u8>, resizable: bool, pager: bool) -> usize {
        self.vmos.push(RVmo {
            data,
            resizable,
            pager,
            reset: None,
            rights: Rights::ALL,
        });
        self.vmos.len() - 1
    }

    pub fn drop_space(&mut self, space: usize) {
        let s = &mut self.spaces[space];
        s.dropped = true;
        s.mappings.clear();
        for r in self.regions.iter_mut().filter(|r| r.space == space) {
            r.alive = false;
        }
    }

    // ---- lookups -------------------------------------------------------------------------

    fn region(&self, r: usize) -> R<&RRegion> {
        let reg = &self.regions[r];
        if reg.alive {
            Ok(reg)
        } else {
            Err(Error::BadState)
        }
    }

    /// The mapping containing `gpa` in `space`.
    pub fn mapping_at(&self, space: usize, gpa: u64) -> Option<(u64, &RMap)> {
        let (b, m) = self.spaces[space].mappings.range(..=gpa).next_back()?;
        (gpa < b + m.len).then_some((*b, m))
    }

    /// Direct children of region `r` intersecting `[s, e)`, in address order.
    fn children_in(&self, r: usize, s: u64, e: u64) -> Vec<(u64, u64, Child)> {
        let mut out = self.children(r);
        out.retain(|(b, l, _)| *b < e && b + l > s);
        out
    }

    fn children(&self, r: usize) -> Vec<(u64, u64, Child)> {
        let space = self.regions[r].space;
        let mut out: Vec<(u64, u64, Child)> = self.spaces[space]
            .mappings
            .iter()
            .filter(|(_, m)| m.region == r)
            .map(|(b, m)| (*b, m.len, Child::Mapping))
            .collect();
        for (i, reg) in self.regions.iter().enumerate() {
            if reg.alive && reg.parent == Some(r) {
                out.push((reg.base, reg.len, Child::Region(i)));
            }
        }
        out.sort_by_key(|c| c.0);
        out
    }

    /// `Region::find_gap`.
    fn find_gap(&self, r: usize, len: u64, align: u64) -> Option<u64> {
        let reg = &self.regions[r];
        let mut cursor = reg.base;
        for (b, l, _) in self.children(r) {
            let start = cursor.checked_add(align - 1)? & !(align - 1);
            if start.checked_add(len)? <= b {
                return Some(start);
            }
            cursor = cursor.max(b + l);
        }
        let start = cursor.checked_add(align - 1)? & !(align - 1);
        (start.checked_add(len)? <= reg.base + reg.len).then_some(start)
    }

    /// Flat mappings of `space` intersecting `[start, end)` (bases, in order).
    fn mappings_in(&self, space: usize, start: u64, end: u64) -> Vec<u64> {
        self.spaces[space]
            .mappings
            .iter()
            .filter(|(b, m)| **b < end && *b + m.len > start)
            .map(|(b, _)| *b)
            .collect()
    }

    fn split(&mut self, space: usize, base: u64, cs: u64, ce: u64, middle: Option<VmPerms>) {
        let maps = &mut self.spaces[space].mappings;
        let old = maps.remove(&base).expect("split of a mapping that exists");
        let end = base + old.len;
        let (s, e) = (cs.max(base), ce.min(end));
        let piece = |from: u64, to: u64, perms: VmPerms| RMap {
            len: to - from,
            vmo_offset: old.vmo_offset + (from - base),
            perms,
            ..old.clone()
        };
        if base < s {
            maps.insert(base, piece(base, s, old.perms));
        }
        if let Some(p) = middle {
            maps.insert(s, piece(s, e, p));
        }
        if e < end {
            maps.insert(e, piece(e, end, old.perms));
        }
    }

    fn destroy_region(&mut self, r: usize) {
        self.regions[r].alive = false;
        let space = self.regions[r].space;
        self.spaces[space].mappings.retain(|_, m| m.region != r);
        let subs: Vec<usize> = (0..self.regions.len())
            .filter(|&i| self.regions[i].alive && self.regions[i].parent == Some(r))
            .collect();
        for s in subs {
            self.destroy_region(s);
        }
    }

    // ---- Vmar operations -----------------------------------------------------------------

    pub fn map(&mut self, q: &MapReq) -> R<u64> {
        if q.perms != q.perms.access() || !q.vmo_offset.is_multiple_of(P) {
            return Err(Error::InvalidArgs);
        }
        let (_, rounded) = checked_range(0, q.len, u64::MAX)?;
        let vmo_end = q.vmo_offset.checked_add(rounded).ok_or(Error::OutOfRange)?;
        let v = &self.vmos[q.vmo];
        if !v.rights.contains(rights_for(q.perms)) {
            return Err(Error::AccessDenied);
        }
        let needs_faults = vmo_end > v.data.len() as u64 || v.resizable || v.pager;
        if needs_faults && !q.allow_faults {
            return Err(Error::NotSupported);
        }
        let reg = self.region(q.region)?;
        q.perms.check(reg.may)?;
        let (rbase, rlen, space) = (reg.base, reg.len, reg.space);
        let base = match q.placement {
            Placement::Specific(off) => {
                let (s, e) = checked_range(off, rounded, rlen)?;
                if !self.children_in(q.region, rbase + s, rbase + e).is_empty() {
                    return Err(Error::AlreadyExists);
                }
                rbase + s
            }
            Placement::SpecificOverwrite(off) => {
                let (s, e) = checked_range(off, rounded, rlen)?;
                let (s, e) = (rbase + s, rbase + e);
                let over = self.children_in(q.region, s, e);
                if over.iter().any(|c| matches!(c.2, Child::Region(_))) {
                    return Err(Error::InvalidArgs);
                }
                for (b, _, _) in over {
                    self.split(space, b, s, e, None);
                }
                s
            }
            Placement::Anywhere { align } => {
                if !align.is_power_of_two() || align < P {
                    return Err(Error::InvalidArgs);
                }
                self.find_gap(q.region, rounded, align)
                    .ok_or(Error::NoMemory)?
            }
        };
        self.spaces[space].mappings.insert(
            base,
            RMap {
                len: rounded,
                vmo: q.vmo,
                vmo_offset: q.vmo_offset,
                perms: q.perms,
                shared: q.shared,
                allow_faults: q.allow_faults,
                region: q.region,
                rights: self.vmos[q.vmo].rights,
            },
        );
        Ok(base)
    }

    pub fn unmap(&mut self, r: usize, offset: u64, len: u64) -> R<()> {
        let reg = self.region(r)?;
        let (s, e) = checked_range(offset, len, reg.len)?;
        let (start, end, space) = (reg.base + s, reg.base + e, reg.space);
        let children = self.children_in(r, start, end);
        if children.is_empty() {
            return Err(Error::NotFound);
        }
        for (b, l, c) in &children {
            if matches!(c, Child::Region(_)) && (*b < start || b + l > end) {
                return Err(Error::InvalidArgs);
            }
        }
        for (b, _, c) in children {
            match c {
                Child::Region(id) => self.destroy_region(id),
                Child::Mapping => self.split(space, b, start, end, None),
            }
        }
        Ok(())
    }

    pub fn protect(&mut self, r: usize, offset: u64, len: u64, perms: VmPerms) -> R<()> {
        if perms != perms.access() {
            return Err(Error::InvalidArgs);
        }
        let reg = self.region(r)?;
        let (s, e) = checked_range(offset, len, reg.len)?;
        let (start, end, space) = (reg.base + s, reg.base + e, reg.space);
        let bases = self.mappings_in(space, start, end);
        let mut covered = start;
        for b in &bases {
            let m = &self.spaces[space].mappings[b];
            if *b > covered {
                return Err(Error::NotFound);
            }
            covered = covered.max(b + m.len);
            perms.check(self.regions[m.region].may)?;
            if !m.rights.contains(rights_for(perms)) {
                return Err(Error::AccessDenied);
            }
        }
        if covered < end {
            return Err(Error::NotFound);
        }
        for b in bases {
            self.split(space, b, start, end, Some(perms));
        }
        Ok(())
    }

    pub fn allocate(&mut self, r: usize, placement: Placement, len: u64, may: VmPerms) -> R<usize> {
        if may != (may & VmPerms::MAY_ALL) {
            return Err(Error::InvalidArgs);
        }
        let reg = self.region(r)?;
        if !reg.may.contains(may) {
            return Err(Error::AccessDenied);
        }
        let (rbase, rlen, space) = (reg.base, reg.len, reg.space);
        let (_, rounded) = checked_range(0, len, u64::MAX)?;
        let base = match placement {
            Placement::Specific(off) => {
                let (s, e) = checked_range(off, rounded, rlen)?;
                if !self.children_in(r, rbase + s, rbase + e).is_empty() {
                    return Err(Error::AlreadyExists);
                }
                rbase + s
            }
            Placement::SpecificOverwrite(_) => return Err(Error::InvalidArgs),
            Placement::Anywhere { align } => {
                if !align.is_power_of_two() || align < P {
                    return Err(Error::InvalidArgs);
                }
                self.find_gap(r, rounded, align).ok_or(Error::NoMemory)?
            }
        };
        self.regions.push(RRegion {
            space,
            parent: Some(r),
            base,
            len: rounded,
            may,
            alive: true,
        });
        Ok(self.regions.len() - 1)
    }

    pub fn destroy(&mut self, r: usize) -> R<()> {
        self.region(r)?;
        self.destroy_region(r);
        Ok(())
    }

    fn root_of(&self, r: usize) -> R<usize> {
        let space = self.regions[r].space;
        if self.spaces[space].root != r {
            return Err(Error::NotSupported);
        }
        self.region(r)?;
        Ok(space)
    }

    /// Distinct Vmos of the private mappings, in mapping order, with the first base of each.
    fn private_vmos(&self, space: usize) -> Vec<(usize, u64)> {
        let mut out: Vec<(usize, u64)> = Vec::new();
        for (b, m) in self.spaces[space]
            .mappings
            .iter()
            .filter(|(_, m)| !m.shared)
        {
            if !out.iter().any(|(v, _)| *v == m.vmo) {
                out.push((m.vmo, *b));
            }
        }
        out
    }

    /// `Vmar::fork` of root `r`: the child space, and for each new child Vmo the base of the
    /// first mapping of it in the child (where the harness gets its handle with `query`).
    pub fn fork(&mut self, r: usize) -> R<(usize, Vec<(usize, u64)>)> {
        let space = self.root_of(r)?;
        let size = self.spaces[space].size;
        let child = self.new_space(size);
        let child_root = self.spaces[child].root;
        let mut ids = BTreeMap::new();
        ids.insert(r, child_root);
        for i in 0..self.regions.len() {
            let reg = self.regions[i].clone();
            if reg.space == space && reg.alive && i != r {
                let parent = ids[&reg.parent.expect("sub-regions have parents")];
                self.regions.push(RRegion {
                    space: child,
                    parent: Some(parent),
                    ..reg
                });
                ids.insert(i, self.regions.len() - 1);
            }
        }
        // (parent Vmo, child Vmo, rights of the child's handle in the child's mappings)
        let mut forked: Vec<(usize, usize, Rights)> = Vec::new();
        let mut new_vmos = Vec::new();
        let maps: Vec<(u64, RMap)> = self.spaces[space]
            .mappings
            .iter()
            .map(|(b, m)| (*b, m.clone()))
            .collect();
        for (b, m) in maps {
            let (vmo, rights) = if m.shared {
                (m.vmo, m.rights)
            } else if let Some((_, c, r)) = forked.iter().find(|(p, _, _)| *p == m.vmo) {
                (*c, *r)
            } else {
                let parent = self.vmos[m.vmo].clone();
                let child_rights = m.rights | Rights::WRITE;
                // The harness's handle comes from `query` of this mapping in the child.
                let mut rights = Rights::READ | Rights::MAP;
                if m.perms.contains(VmPerms::WRITE) {
                    rights |= Rights::WRITE;
                }
                self.vmos.push(RVmo {
                    reset: Some(parent.data.clone()),
                    rights: rights & child_rights,
                    ..parent
                });
                let c = self.vmos.len() - 1;
                forked.push((m.vmo, c, child_rights));
                new_vmos.push((c, b));
                (c, child_rights)
            };
            let region = ids[&m.region];
            self.spaces[child].mappings.insert(
                b,
                RMap {
                    vmo,
                    region,
                    rights,
                    ..m
                },
            );
        }
        Ok((child, new_vmos))
    }

    pub fn reset(&mut self, r: usize) -> R<()> {
        let space = self.root_of(r)?;
        let vmos = self.private_vmos(space);
        if vmos.iter().any(|(v, _)| self.vmos[*v].reset.is_none()) {
            return Err(Error::BadState);
        }
        for (v, _) in vmos {
            let vmo = &mut self.vmos[v];
            vmo.data = vmo.reset.clone().expect("checked above");
        }
        Ok(())
    }

    pub fn set_reset_point(&mut self, r: usize) -> R<()> {
        let space = self.root_of(r)?;
        for (v, _) in self.private_vmos(space) {
            let vmo = &mut self.vmos[v];
            vmo.reset = Some(vmo.data.clone());
        }
        Ok(())
    }

    pub fn query(&self, r: usize, gpa: u64) -> R<(u64, RMap)> {
        let space = self.region(r)?.space;
        self.mapping_at(space, gpa)
            .map(|(b, m)| (b, m.clone()))
            .ok_or(Error::NotFound)
    }

    /// `Vmar::handle_fault` through region `r`: the Vmo and byte offset of the faulting page.
    pub fn fault(&self, r: usize, gpa: u64, write: bool) -> R<(usize, u64)> {
        let reg = self.region(r)?;
        let page = gpa & !(P - 1);
        if page < reg.base || page >= reg.base + reg.len {
            return Err(Error::NotFound);
        }
        let (b, m) = self.mapping_at(reg.space, page).ok_or(Error::NotFound)?;
        let need = if write { VmPerms::WRITE } else { VmPerms::READ };
        if !m.perms.contains(need) {
            return Err(Error::AccessDenied);
        }
        let mut rights = Rights::READ;
        if write {
            rights |= Rights::WRITE;
        }
        if !m.rights.contains(rights) {
            return Err(Error::AccessDenied);
        }
        let v = &self.vmos[m.vmo];
        let off = m.vmo_offset + (page - b);
        if off.checked_add(P).is_none_or(|e| e > v.data.len() as u64) {
            return Err(Error::OutOfRange);
        }
        Ok((m.vmo, off + (gpa - page)))
    }

    // ---- Vmo operations ------------------------------------------------------------------

    fn require(&self, v: usize, rights: Rights) -> R<()> {
        if self.vmos[v].rights.contains(rights) {
            Ok(())
        } else {
            Err(Error::AccessDenied)
        }
    }

    pub fn vmo_read(&self, v: usize, offset: u64, len: usize) -> R<Vec<u8>> {
        self.require(v, Rights::READ)?;
        let d = &self.vmos[v].data;
        let end = vmo_range(offset, len as u64, d.len() as u64)?;
        Ok(d[offset as usize..end as usize].to_vec())
    }

    pub fn vmo_write(&mut self, v: usize, offset: u64, data: &[u8]) -> R<()> {
        self.require(v, Rights::WRITE)?;
        let d = &mut self.vmos[v].data;
        let end = vmo_range(offset, data.len() as u64, d.len() as u64)?;
        d[offset as usize..end as usize].copy_from_slice(data);
        Ok(())
    }

    pub fn commit(&self, v: usize, offset: u64, len: u64) -> R<()> {
        self.require(v, Rights::WRITE)?;
        vmo_range(offset, len, self.vmos[v].data.len() as u64).map(drop)
    }

    pub fn decommit(&mut self, v: usize, offset: u64, len: u64) -> R<()> {
        self.require(v, Rights::WRITE)?;
        let vmo = &mut self.vmos[v];
        let end = vmo_range(offset, len, vmo.data.len() as u64)?;
        if len == 0 || vmo.pager {
            // A pager Vmo's decommitted pages come back from the pager unchanged.
            return Ok(());
        }
        let first = (offset / P * P) as usize;
        let last = (end.div_ceil(P) * P).min(vmo.data.len() as u64) as usize;
        vmo.data[first..last].fill(0);
        Ok(())
    }

    pub fn resize(&mut self, v: usize, size: u64) -> R<()> {
        self.require(v, Rights::WRITE)?;
        if !self.vmos[v].resizable {
            return Err(Error::NotSupported);
        }
        let size = page_round_up(size)?;
        self.vmos[v].data.resize(size as usize, 0);
        Ok(())
    }
}
