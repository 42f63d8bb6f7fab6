//! `PageTable::protect`: permission changes over a range, with subtree skipping (`summary.rs`)
//! and hierarchical write-protect (`gate.rs`).
//!
//! Rules, for `protect(range, p)`, at each present non-leaf entry `e` inside the walk, with
//! `seen = claim(e) ∩ gate(e) ∩ gates above` (the perms every leaf below `e` has, if claimed):
//! 1. `seen == p` for every leaf: nothing below changes; skipped.
//! 2. `p` lacks WRITE, `e` lies wholly inside the range, `claim(e)` is `Exact(p ∪ WRITE)` or
//!    `OrWrite(p)` (`summary.rs`), and the gates down to and including `e` are open: `e`'s
//!    gate is closed. Every leaf below now has effective perms `p` — O(1) for the subtree,
//!    the leaves keep their raw perms.
//! 3. Otherwise the walk descends; when `p` has WRITE and `e`'s gate is closed, the gate is
//!    pushed down first (`push_down`), so that the leaves outside the range keep their perms
//!    and the ones inside can be made writable. After the descent `e`'s claim is `p` when the
//!    range covered `e` and every gate down to `e` is open (then every leaf below was set to
//!    `p` as seen from `e`), and is recomputed from the child's entries otherwise.
//!
//! A leaf is changed when its effective perms differ from `p`: its raw perms become `p`, and
//! it is marked dirty (`table.rs`) when it becomes effectively writable. Large leaves that
//! straddle the range's ends are split first, and only when their effective perms change.
//!
//! The count it returns: the 4 KiB pages whose effective perms changed, counted exactly at the
//! leaves it visits; a subtree write-protected at once (rule 2) counts every 4 KiB page its
//! entry spans (2 MiB → 512, 1 GiB → 2^18, 512 GiB → 2^27) — counting its present pages would
//! mean walking them. So the count is an upper bound on the pages changed, never above the
//! range's pages, exact whenever no rule-2 step happened (always when `p` has WRITE), and
//! zero exactly when nothing changed (a linked table is never empty, so a closed gate always
//! write-protects at least one writable page).

use super::gate::{gate, is_open};
use super::summary::{set_summary, Claim};
use super::{check_range, index, PageTable};
use crate::entry::{level_size, EntryFormat};
use crate::phys::PhysMem;
use crate::{Error, MemType, S2Perms, PAGE_SIZE};
use core::sync::atomic::Ordering;

impl<E: EntryFormat, M: PhysMem> PageTable<E, M> {
    /// Sets the effective permissions of every translation in `[gpa, gpa + len)` to `perms`.
    /// Large leaves straddling the ends are split only when their permissions change; a
    /// subtree wholly inside the range whose every leaf differs from `perms` only by WRITE is
    /// write-protected through its upper entry (module doc). Returns the number of 4 KiB pages
    /// whose permissions changed, as an upper bound: exact unless a subtree was write-protected
    /// at once (which counts the pages it spans), never above `len / 4 KiB`, and 0 exactly
    /// when nothing changed. Errors: see `check_range`; unrepresentable perms (`InvalidArgs`,
    /// `NotSupported`; empty perms are `InvalidArgs`: use `unmap`); `NoMemory` for a split
    /// (then nothing changed).
    pub fn protect(&mut self, gpa: u64, len: u64, perms: S2Perms) -> Result<u64, Error> {
        let end = check_range(gpa, len)?;
        // The memory type is not changed; any accepted type validates the permissions alone.
        E::check(perms, MemType::WriteBack)?;
        let differs = move |_: E, effective: S2Perms| effective != perms;
        let before = self.attached;
        self.split_at(gpa, &differs)?;
        self.split_at(end, &differs)?;
        let changed = self.protect_in(self.root, 4, gpa, end, perms, S2Perms::RWX);
        if self.attached != before {
            self.debug_check();
        }
        Ok(changed)
    }

    /// `protect` below `table` at `level`; `above` is the AND of the gates above `table`.
    fn protect_in(
        &mut self,
        table: u64,
        level: usize,
        start: u64,
        end: u64,
        perms: S2Perms,
        above: S2Perms,
    ) -> u64 {
        let size = level_size(level);
        let mut changed = 0;
        let mut addr = start;
        while addr < end {
            let entry_base = addr & !(size - 1);
            let entry_end = entry_base + size;
            let i = index(addr, level);
            let e = self.load(table, i);
            if e.is_present() {
                if e.is_leaf(level) {
                    if self.protect_leaf(table, i, perms, above) {
                        changed += size / PAGE_SIZE;
                    }
                } else if level > 1 {
                    let covered = addr == entry_base && end >= entry_end;
                    let claim = Claim::of(e.raw());
                    let through = above & gate(e);
                    if claim.and_then(|c| c.effective(through)) == Some(perms) {
                        // Rule 1: nothing below changes.
                    } else if covered
                        && through.contains(S2Perms::WRITE)
                        && claim.is_some_and(|c| c.closes_to(perms))
                    {
                        // Rule 2: write-protect the whole subtree through its gate.
                        self.close_gate(table, i);
                        changed += size / PAGE_SIZE;
                    } else {
                        // Rule 3.
                        let mut through = through;
                        if perms.contains(S2Perms::WRITE) && !is_open(e) {
                            self.push_down(table, i, level);
                            through = above;
                        }
                        let child = self.load(table, i).table_address();
                        let sub_end = end.min(entry_end);
                        changed += self.protect_in(child, level - 1, addr, sub_end, perms, through);
                        let now = if covered && through.contains(S2Perms::WRITE) {
                            Some(Claim::Exact(perms))
                        } else {
                            self.table_claim(child, level - 1)
                        };
                        set_summary(self.slot(table, i), Claim::bits(now));
                    }
                }
            }
            addr = entry_end;
        }
        changed
    }

    /// Gives the leaf `i` of `table` (under gates `above`) the effective perms `perms`; whether
    /// they changed. A leaf becoming effectively writable is marked dirty.
    fn protect_leaf(&self, table: u64, i: usize, perms: S2Perms, above: S2Perms) -> bool {
        let slot = self.slot(table, i);
        let mut cur = slot.load(Ordering::Acquire);
        let effective = E::from_raw(cur).perms() & above;
        if effective == perms {
            return false;
        }
        let gains_write = !effective.contains(S2Perms::WRITE);
        loop {
            let mut new = E::from_raw(cur).with_perms(perms);
            if gains_write {
                new = self.dirty_if_writable(new);
            }
            match slot.compare_exchange(cur, new.raw(), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }
}
