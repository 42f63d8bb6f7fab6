//! Dirty harvest (`PageTable::harvest_dirty`) and the MMU's accessed/dirty updates
//! (`PageTable::hw_touch`, what the hardware does when it walks the table for an access).
//!
//! Meaning of the dirty bit in this crate (see `table.rs`): "the leaf may have been written
//! since the harvest that last covered it" — set by the MMU on a write, by `map`/`protect`
//! when a leaf becomes writable, cleared only here. Invariants of the harvest:
//! - it reports a page iff the leaf mapping it is dirty, in ascending address order, only pages
//!   inside the requested range, every 4 KiB page of a dirty large leaf that lies in the range;
//! - it clears the dirty bit only of leaves that lie entirely inside the range: a dirty large
//!   leaf straddling an end of the range is split first (like `protect`: the split is an
//!   equivalent table, translations never change), so pages outside the range keep their dirty
//!   state. If the MMU dirties a straddling leaf after that split (a vCPU running during the
//!   harvest), the leaf's pages in range are reported and its bit is left set: a page may be
//!   reported twice, never missed;
//! - a split that cannot get a frame fails the harvest with `NoMemory` before any bit is
//!   cleared or any page reported;
//! - the walk visits only present entries of the range and allocates nothing but the growth of
//!   the caller's vector;
//! - clearing is an atomic and-not of the dirty bit, so a concurrent hardware update (A, or D
//!   on another leaf) is never lost. The cleared state is not visible to a CPU that cached the
//!   translation with D set: the caller must flush before the guest runs again
//!   (`Harvested::cleared` > 0 ⇒ the owner marks a flush pending).

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use super::{check_range, index, PageTable};
use crate::entry::{level_size, EntryFormat};
use crate::phys::PhysMem;
use crate::{Access, AccessDirty, Error, S2Perms, Translation, GPA_LIMIT, PAGE_SIZE};

/// What one `harvest_dirty` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Harvested {
    /// 4 KiB pages appended to the caller's vector.
    pub pages: u64,
    /// Leaves whose dirty bit was cleared (non-zero ⇒ cached translations must be flushed).
    pub cleared: u64,
}

/// The permission an access needs from a leaf: an instruction fetch needs only execute, a
/// write needs write, anything else read.
fn needed(access: Access) -> S2Perms {
    if access.contains(Access::EXEC) {
        S2Perms::EXEC
    } else if access.contains(Access::WRITE) {
        S2Perms::WRITE
    } else {
        S2Perms::READ
    }
}

impl<E: EntryFormat, M: PhysMem> PageTable<E, M> {
    /// Appends the guest-physical address of every page in `[gpa, gpa + len)` mapped by a dirty
    /// leaf and clears those leaves' dirty bits (module doc). Errors: `NotSupported` when the
    /// table has no accessed/dirty state (`AccessDirty::Disabled`); see `check_range`;
    /// `NoMemory` for a split (nothing reported or cleared, `dirty` untouched).
    pub fn harvest_dirty(
        &mut self,
        gpa: u64,
        len: u64,
        dirty: &mut Vec<u64>,
    ) -> Result<Harvested, Error> {
        if self.ad == AccessDirty::Disabled {
            return Err(Error::NotSupported);
        }
        let end = check_range(gpa, len)?;
        let is_dirty = |e: E, _: S2Perms| e.dirty();
        let before = self.attached;
        self.split_at(gpa, &is_dirty)?;
        self.split_at(end, &is_dirty)?;
        if self.attached != before {
            self.debug_check();
        }
        let mut out = Harvested::default();
        self.harvest_in(self.root, 4, gpa, end, (gpa, end), dirty, &mut out);
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn harvest_in(
        &self,
        table: u64,
        level: usize,
        start: u64,
        end: u64,
        range: (u64, u64),
        dirty: &mut Vec<u64>,
        out: &mut Harvested,
    ) {
        let size = level_size(level);
        let mut addr = start;
        while addr < end {
            let entry_base = addr & !(size - 1);
            let entry_end = entry_base + size;
            let i = index(addr, level);
            let e = self.load(table, i);
            if e.is_present() {
                if e.is_leaf(level) {
                    if e.dirty() {
                        let lo = entry_base.max(range.0);
                        let hi = entry_end.min(range.1);
                        if lo == entry_base && hi == entry_end {
                            self.slot(table, i)
                                .fetch_and(!E::DIRTY_BIT, Ordering::AcqRel);
                            out.cleared += 1;
                        }
                        let pages = (hi - lo) / PAGE_SIZE;
                        dirty.extend((0..pages).map(|k| lo + k * PAGE_SIZE));
                        out.pages += pages;
                    }
                } else if level > 1 {
                    let sub_end = end.min(entry_end);
                    self.harvest_in(
                        e.table_address(),
                        level - 1,
                        addr,
                        sub_end,
                        range,
                        dirty,
                        out,
                    );
                }
            }
            addr = entry_end;
        }
    }

    /// What the hardware does when it translates `gpa` for `access`: walks the table, and —
    /// when the walk grants the access (the leaf's perms ∩ every gate above, `gate.rs`) and
    /// the table has accessed/dirty state — sets the accessed bit of every entry on the way
    /// and, for a write, the leaf's dirty bit, all with atomic ors (as the MMU's locked
    /// updates). Returns the leaf (with the bits as now set and its effective perms), or
    /// `None` when no leaf translates `gpa`; a walk lacking the permission returns the leaf
    /// unchanged (the hardware would raise an EPT violation / NPF instead). For software CPUs
    /// and tests that stand in for the MMU; the memory model never calls it.
    pub fn hw_touch(&self, gpa: u64, access: Access) -> Option<Translation> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        let mut path = [(0u64, 0usize); 4];
        let mut table = self.root;
        let mut level = 4;
        let mut above = S2Perms::RWX;
        loop {
            let i = index(gpa, level);
            let e = self.load(table, i);
            if !e.is_present() {
                return None;
            }
            path[4 - level] = (table, i);
            if e.is_leaf(level) {
                // The walk grants what the leaf and every gate above grant (`gate.rs`).
                let effective = e.perms() & above;
                if self.ad == AccessDirty::Disabled || !effective.contains(needed(access)) {
                    return Some(Self::translation(e, level, gpa, above));
                }
                for &(t, j) in &path[..4 - level] {
                    self.slot(t, j).fetch_or(E::ACCESSED_BIT, Ordering::AcqRel);
                }
                let mut bits = E::ACCESSED_BIT;
                if access.contains(Access::WRITE) {
                    bits |= E::DIRTY_BIT;
                }
                let now = self.slot(table, i).fetch_or(bits, Ordering::AcqRel) | bits;
                return Some(Self::translation(E::from_raw(now), level, gpa, above));
            }
            if level == 1 {
                return None;
            }
            above &= super::gate::gate(e);
            table = e.table_address();
            level -= 1;
        }
    }
}
