//! Permission summaries in non-leaf entries: what lets `protect` skip subtrees it would not
//! change (a later fork write-protects a fully installed guest without visiting its leaves).
//!
//! Bits 55:52 of a non-leaf entry (`SUMMARY_MASK`) are ignored by the hardware of both formats
//! (EPT: SDM Vol. 3C §29.3.2, tables 29-2/29-4/29-6, bits 63:52 ignored in a PML4E, in a PDPTE
//! that references a page directory and in a PDE that references a page table; NPT: APM Vol. 2
//! §5.3.3, bits 62:52 available to software in every long-mode entry). This crate never sets
//! them in a leaf. In a non-leaf entry:
//! - bit 55 (`UNIFORM`) set ⇒ every leaf below the entry has exactly the permissions encoded in
//!   bits 54:52 (`S2Perms` bits: READ 52, WRITE 53, EXEC 54) *as seen from the entry*: its raw
//!   perms ∩ the write gates of the non-leaf entries strictly between (`gate.rs`; the entry's
//!   own gate and those above it are not part of the claim, so the perms the leaves really
//!   have are claim ∩ gate ∩ gates above);
//! - bit 55 clear ⇒ no claim.
//!
//! The claim is conservative: a clear bit is always correct, a set bit must be true. How each
//! path keeps it (`check_invariants` checks it on every non-leaf entry):
//! - `map` of a leaf with perms `p` clears the bit on every ancestor whose summary is not `p`,
//!   and links new tables with summary `p` (their only leaf);
//! - a split (`split_at`: `unmap`/`protect` ends, dirty-harvest ends) links a table of 512
//!   children with the split leaf's perms: summary = those perms; ancestors are unaffected
//!   (the perms below do not change);
//! - `unmap` removes leaves, which keeps every claim true; it does not try to restore one;
//! - `protect(range, p)` skips an entry whose summary ∩ gates is `p` (nothing below would
//!   change), closes the gate of a covered entry claiming `p ∪ WRITE` (`protect.rs`); after
//!   visiting a child it sets the summary `p` when the range covered the entry through open
//!   gates, and otherwise recomputes it from the child's 512 entries (`uniform_perms`), so a
//!   subtree that became uniform again is skipped by the next `protect`;
//! - a push-down (`gate.rs`) drops WRITE from the claim of the entry it opens; closing a gate
//!   changes no claim (the entry's own gate is outside it; the ancestors are recomputed by
//!   the `protect` that closed it).
//!
//! So a later fork of a guest whose every page is installed read-only costs O(mappings ×
//! levels × 512) for the partly covered tables, not O(installed pages), and so does the first
//! fork of a guest whose pages are all writable (gates closed instead of leaves changed).

use core::sync::atomic::{AtomicU64, Ordering};

use super::gate::gate;
use super::{PageTable, ENTRIES};
use crate::entry::EntryFormat;
use crate::phys::PhysMem;
use crate::S2Perms;

/// Bit 55: the subtree's leaves all have the perms in bits 54:52.
const UNIFORM: u64 = 1 << 55;
const PERMS_SHIFT: u32 = 52;
/// The summary bits of a non-leaf entry.
pub(super) const SUMMARY_MASK: u64 = UNIFORM | (0b111 << PERMS_SHIFT);

/// The summary bits claiming every leaf below has `perms`.
pub(super) fn uniform(perms: S2Perms) -> u64 {
    UNIFORM | ((perms.bits() as u64 & 0b111) << PERMS_SHIFT)
}

/// The perms a non-leaf entry's summary claims for every leaf below, if any.
pub(super) fn claimed(raw: u64) -> Option<S2Perms> {
    (raw & UNIFORM != 0).then(|| S2Perms::from_bits_truncate(((raw >> PERMS_SHIFT) & 0b111) as _))
}

/// Replaces the summary bits of a non-leaf entry, keeping everything else (the MMU may be
/// setting the accessed bit concurrently).
pub(super) fn set_summary(slot: &AtomicU64, summary: u64) {
    let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
        Some((cur & !SUMMARY_MASK) | summary)
    });
}

impl<E: EntryFormat, M: PhysMem> PageTable<E, M> {
    /// The perms every leaf below the table `table` at `level` has as seen from the entry
    /// pointing at it, when they are all equal and known from this table's entries (leaves,
    /// and children's summaries through their gates).
    pub(super) fn uniform_perms(&self, table: u64, level: usize) -> Option<S2Perms> {
        let mut seen: Option<S2Perms> = None;
        for slot in self.entries(table) {
            let e = E::from_raw(slot.load(Ordering::Acquire));
            if !e.is_present() {
                continue;
            }
            let p = if e.is_leaf(level) {
                e.perms()
            } else {
                claimed(e.raw())? & gate(e)
            };
            match seen {
                Some(s) if s != p => return None,
                _ => seen = Some(p),
            }
        }
        seen
    }

    /// Checks the summary claims and gates below `table` at `level`: returns the set of perms
    /// the subtree's leaves have as seen from the entry pointing at `table` (as a list of
    /// distinct values, at most 8), or the first violation (a false claim, summary bits in a
    /// leaf, a gate other than `RWX` or `RWX - WRITE`).
    pub(super) fn check_summaries(
        &self,
        table: u64,
        level: usize,
    ) -> Result<alloc::vec::Vec<S2Perms>, alloc::string::String> {
        let mut all = alloc::vec::Vec::new();
        for i in 0..ENTRIES {
            let e = self.load(table, i);
            if !e.is_present() {
                continue;
            }
            if e.is_leaf(level) {
                if e.raw() & SUMMARY_MASK != 0 {
                    return Err(alloc::format!(
                        "level-{level} leaf {i} in table {table:#x} carries summary bits"
                    ));
                }
                if !all.contains(&e.perms()) {
                    all.push(e.perms());
                }
            } else if level > 1 {
                let g = gate(e);
                if g != S2Perms::RWX && g != S2Perms::RWX - S2Perms::WRITE {
                    return Err(alloc::format!(
                        "level-{level} entry {i} in table {table:#x} has gate {g:?}"
                    ));
                }
                let below = self.check_summaries(e.table_address(), level - 1)?;
                if let Some(p) = claimed(e.raw()) {
                    if below.iter().any(|&q| q != p) {
                        return Err(alloc::format!(
                            "level-{level} entry {i} in table {table:#x} claims {p:?} below, \
                             leaves have {below:?}"
                        ));
                    }
                }
                for q in below {
                    let q = q & g;
                    if !all.contains(&q) {
                        all.push(q);
                    }
                }
            }
        }
        Ok(all)
    }
}
