//! Permission summaries in non-leaf entries: what lets `protect` skip subtrees it would not
//! change, and close a gate over a subtree instead of visiting its leaves (`protect.rs`), so a
//! fork write-protects a fully installed guest without visiting its leaves — the first fork,
//! and every later one after the parent rewrote its memory.
//!
//! Bits 56:52 of a non-leaf entry (`SUMMARY_MASK`) are ignored by the hardware of both formats
//! (EPT: SDM Vol. 3C §29.3.2, tables 29-2/29-4/29-6, bits 63:52 ignored in a PML4E, in a PDPTE
//! that references a page directory and in a PDE that references a page table; NPT: APM Vol. 2
//! §5.3.3, bits 62:52 available to software in every long-mode entry). This crate never sets
//! them in a leaf. A non-leaf entry's bits say one of three things (`Claim`), about the perms
//! of the leaves below it *as seen from the entry*: their raw perms ∩ the write gates of the
//! non-leaf entries strictly between (`gate.rs`; the entry's own gate and those above it are
//! not part of the claim, so the perms the leaves really have are claim ∩ gate ∩ gates above):
//! - bit 55 (`UNIFORM`) clear: no claim;
//! - bit 55 set, bit 56 (`OR_WRITE`) clear — `Claim::Exact(p)`: every leaf has exactly `p`
//!   (bits 54:52, `S2Perms` bits READ 52, WRITE 53, EXEC 54);
//! - bits 55 and 56 set — `Claim::OrWrite(p)`, `p` without WRITE: every leaf has `p` or
//!   `p ∪ WRITE`, and at least one has `p ∪ WRITE` (the *witness*, which makes a gate closed
//!   over the subtree always change something: `protect`'s count is 0 exactly when nothing
//!   changed). This is what a parent's tree looks like after a fork closed its gates and the
//!   parent wrote again: the push-downs on the written paths leave `p`, the copies mapped
//!   writable add `p ∪ WRITE`, and the next fork still closes one gate per subtree.
//!
//! A claim is a set the leaves' perms lie in (plus the witness): a missing claim is always
//! correct, a present one must be true. How each path keeps it (`check_invariants` checks it
//! on every non-leaf entry):
//! - `map` of a leaf with perms `q` (as seen from every ancestor: a writable map opens the
//!   gates on its path first) merges `Exact(q)` into every ancestor's claim once the leaf is
//!   in place (`Claim::merge`); an `OrWrite` result is kept only when the new leaf is its
//!   witness (a replaced leaf may have been the old one). New tables claim `Exact(q)`;
//! - a split (`split_at`: `unmap`/`protect` ends, dirty-harvest ends) links a table of 512
//!   children with the split leaf's perms: `Exact` of those; ancestors are unaffected;
//! - `unmap` removes leaves, which keeps every `Exact` claim true; an `OrWrite` claim above
//!   removed leaves may have lost its witness and is recomputed from the child's entries;
//! - `protect(range, p)` skips an entry whose claim says every leaf already has `p`, closes
//!   the gate of a covered entry whose claim is `Exact(p ∪ WRITE)` or `OrWrite(p)`
//!   (`protect.rs`); after visiting a child it sets `Exact(p)` when the range covered the
//!   entry through open gates, and otherwise recomputes the claim from the child's 512
//!   entries (`table_claim`), so a subtree that became uniform again is skipped next time;
//! - a push-down (`gate.rs`) replaces the claim of the entry it opens by the claim seen
//!   through a closed gate (`Claim::through`: the children it sees lost WRITE); closing a gate
//!   changes no claim (the entry's own gate is outside it; the ancestors are recomputed by the
//!   `protect` that closed it).
//!
//! So a fork of a guest whose every page is installed costs O(mappings × levels × 512) for the
//! partly covered tables, not O(installed pages), whether the pages are writable or not, and
//! whether or not the parent forked and wrote before.

use core::sync::atomic::{AtomicU64, Ordering};

use super::gate::gate;
use super::{PageTable, ENTRIES};
use crate::entry::EntryFormat;
use crate::phys::PhysMem;
use crate::S2Perms;

/// Bit 55: the entry carries a claim (`Claim`).
const UNIFORM: u64 = 1 << 55;
/// Bit 56, with bit 55: the claim is `OrWrite`.
const OR_WRITE: u64 = 1 << 56;
const PERMS_SHIFT: u32 = 52;
/// The summary bits of a non-leaf entry.
pub(super) const SUMMARY_MASK: u64 = OR_WRITE | UNIFORM | (0b111 << PERMS_SHIFT);

/// What a non-leaf entry says about the perms of every leaf below it, as seen from the entry
/// (module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Claim {
    /// Every leaf has exactly these perms.
    Exact(S2Perms),
    /// Every leaf has these perms (which lack WRITE) or these plus WRITE, and at least one
    /// has WRITE.
    OrWrite(S2Perms),
}

impl Claim {
    /// The summary bits encoding `claim` (0 for none).
    pub(super) fn bits(claim: Option<Claim>) -> u64 {
        let (flags, p) = match claim {
            None => return 0,
            Some(Claim::Exact(p)) => (UNIFORM, p),
            Some(Claim::OrWrite(p)) => (UNIFORM | OR_WRITE, p - S2Perms::WRITE),
        };
        flags | ((p.bits() as u64 & 0b111) << PERMS_SHIFT)
    }

    /// The claim a non-leaf entry's summary bits make, if any.
    pub(super) fn of(raw: u64) -> Option<Claim> {
        if raw & UNIFORM == 0 {
            return None;
        }
        let p = S2Perms::from_bits_truncate(((raw >> PERMS_SHIFT) & 0b111) as _);
        Some(if raw & OR_WRITE != 0 {
            Claim::OrWrite(p - S2Perms::WRITE)
        } else {
            Claim::Exact(p)
        })
    }

    /// The claim as seen one gate further up, through gate `g`: a closed gate takes WRITE
    /// from every leaf.
    pub(super) fn through(self, g: S2Perms) -> Claim {
        if g.contains(S2Perms::WRITE) {
            return self;
        }
        Claim::Exact(self.base() & g)
    }

    /// The perms without WRITE that the claim allows every leaf (it may add WRITE to them).
    fn base(self) -> S2Perms {
        match self {
            Claim::Exact(p) | Claim::OrWrite(p) => p - S2Perms::WRITE,
        }
    }

    /// The perms every leaf has after gates `through` (the entry's own and those above), when
    /// they are all equal.
    pub(super) fn effective(self, through: S2Perms) -> Option<S2Perms> {
        match self {
            Claim::Exact(p) => Some(p & through),
            Claim::OrWrite(p) if !through.contains(S2Perms::WRITE) => Some(p & through),
            Claim::OrWrite(_) => None,
        }
    }

    /// Whether closing the entry's gate gives every leaf exactly `perms` (which lack WRITE)
    /// and changes at least one (under open gates).
    pub(super) fn closes_to(self, perms: S2Perms) -> bool {
        !perms.contains(S2Perms::WRITE)
            && (self == Claim::Exact(perms | S2Perms::WRITE) || self == Claim::OrWrite(perms))
    }

    /// The claim true of the union of two sets of leaves, each described by a claim.
    pub(super) fn merge(self, other: Claim) -> Option<Claim> {
        use Claim::*;
        if self == other {
            return Some(self);
        }
        let a = self.base();
        // Two different claims over the same base: one of them is, or has, a WRITE leaf.
        (a == other.base()).then_some(OrWrite(a))
    }

    /// Whether a leaf with `perms` (as seen from the entry) is allowed by the claim.
    fn admits(self, perms: S2Perms) -> bool {
        match self {
            Claim::Exact(p) => perms == p,
            Claim::OrWrite(p) => perms == p || perms == p | S2Perms::WRITE,
        }
    }
}

/// The summary bits claiming every leaf below has exactly `perms`.
pub(super) fn uniform(perms: S2Perms) -> u64 {
    Claim::bits(Some(Claim::Exact(perms)))
}

/// Replaces the summary bits of a non-leaf entry, keeping everything else (the MMU may be
/// setting the accessed bit concurrently).
pub(super) fn set_summary(slot: &AtomicU64, summary: u64) {
    let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
        Some((cur & !SUMMARY_MASK) | summary)
    });
}

impl<E: EntryFormat, M: PhysMem> PageTable<E, M> {
    /// The claim true of every leaf below the table `table` at `level`, as seen from the entry
    /// pointing at it, as far as this table's entries tell (leaves, and children's claims
    /// through their gates); `None` when they disagree, a child has no claim, or the table is
    /// empty.
    pub(super) fn table_claim(&self, table: u64, level: usize) -> Option<Claim> {
        let mut seen: Option<Claim> = None;
        for slot in self.entries(table) {
            let e = E::from_raw(slot.load(Ordering::Acquire));
            if !e.is_present() {
                continue;
            }
            let c = if e.is_leaf(level) {
                Claim::Exact(e.perms())
            } else {
                Claim::of(e.raw())?.through(gate(e))
            };
            seen = Some(match seen {
                None => c,
                Some(s) => s.merge(c)?,
            });
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
                if let Some(c) = Claim::of(e.raw()) {
                    let witness = match c {
                        Claim::Exact(_) => true,
                        Claim::OrWrite(p) => below.contains(&(p | S2Perms::WRITE)),
                    };
                    if below.iter().any(|&q| !c.admits(q)) || !witness {
                        return Err(alloc::format!(
                            "level-{level} entry {i} in table {table:#x} claims {c:?} below, \
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
