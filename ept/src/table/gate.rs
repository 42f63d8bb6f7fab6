//! Write gates: write permission withdrawn in a non-leaf entry, which write-protects the whole
//! subtree below it with one entry change (the first fork of a guest that wrote every page).
//!
//! On both formats the permission the MMU grants is the AND of every entry of the walk: EPT
//! (SDM Vol. 3C, "EPT Violations": a data write is a violation when bit 1 is clear in any EPT
//! paging-structure entry used to translate the address) and NPT (nested walks use the
//! long-mode page-protection checks, APM Vol. 2 "Page-Protection Checks": a write needs R/W
//! set at every level, the walk being a user access). This crate
//! calls the permission bits of a non-leaf entry its *gate*. `table_pointer` builds open gates
//! (EPT R|W|X, NPT P|RW|US with NX clear); the only other gate this crate writes is the open
//! one without write (EPT R|X; NPT P|US, RW clear), through `EntryFormat::with_perms`, which on
//! a non-leaf entry touches exactly those bits (EPT 2:0; NPT P, RW, US, NX) and keeps the table
//! address, the accessed bit and the summary bits. So for every leaf:
//! `effective perms = raw leaf perms ∩ gates of the entries above it`, where each gate is
//! `S2Perms::RWX` or `RWX - WRITE`. Everything that reports perms (`query`, `for_each_leaf`,
//! `map`'s old translation, `hw_touch`) reports effective perms; callers never see a gate.
//!
//! Invariants (checked by `check_invariants`):
//! - every non-leaf gate is `RWX` or `RWX - WRITE`;
//! - summaries (`summary.rs`) describe the perms of the leaves below an entry *as seen from
//!   that entry*: raw leaf perms ∩ the gates strictly below the entry (its own gate excluded).
//!   Hence the perms every leaf below entry `e` really has are `claim(e) ∩ gate(e) ∩ gates
//!   above`. This choice, rather than claims about raw leaf perms, makes a push-down local:
//!   it changes the claim of the one entry it opens and no other (the ancestors see the same
//!   effective perms before and after), and a gate below a claim can never make `protect`
//!   skip a subtree that would not really be unchanged;
//! - a leaf is effectively writable only if every gate above it is open: operations that make
//!   a leaf writable (`map` of a writable leaf, `protect` with write) first `push_down` every
//!   closed gate on their path. A push-down opens one gate after closing the write bit of
//!   every present entry of the table below it (leaves: their raw W; non-leaf: their gate),
//!   in that order, so no page is ever writable that was not, and every page keeps its
//!   effective perms: no flush is needed and no dirty bit changes. The opened entry's claim
//!   becomes the one seen through a closed gate (the children it sees lost WRITE);
//! - closing a gate never touches dirty bits below it: a page written and then write-
//!   protected through a gate is still dirty for the next harvest; a push-down makes nothing
//!   writable, so it marks nothing dirty; a `protect` that makes a leaf effectively writable
//!   marks it dirty even when its raw W was already set under a closed gate.

use core::sync::atomic::{AtomicU64, Ordering};

use super::summary::Claim;
use super::PageTable;
use crate::entry::EntryFormat;
use crate::phys::PhysMem;
use crate::S2Perms;

/// The gate of a non-leaf entry: the perms it lets through to the leaves below.
pub(super) fn gate<E: EntryFormat>(e: E) -> S2Perms {
    e.perms()
}

/// Whether a non-leaf entry's gate lets writes through.
pub(super) fn is_open<E: EntryFormat>(e: E) -> bool {
    e.perms().contains(S2Perms::WRITE)
}

/// Clears the write permission of the present entry in `slot` (a leaf's raw W or a non-leaf
/// entry's gate), keeping every other bit; atomic against the MMU's A/D updates.
pub(super) fn clear_write<E: EntryFormat>(slot: &AtomicU64) {
    let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
        let e = E::from_raw(cur);
        if !e.is_present() || !e.perms().contains(S2Perms::WRITE) {
            return None;
        }
        Some(e.with_perms(e.perms() - S2Perms::WRITE).raw())
    });
}

impl<E: EntryFormat, M: PhysMem> PageTable<E, M> {
    /// Opens the closed gate of the non-leaf entry `i` of `table` (at `level` ≥ 2) without
    /// changing any page's effective perms: closes the write bit of every present entry of the
    /// table below, then sets the gate's write bit and gives it the claim seen through a
    /// closed gate (module doc; `summary.rs`). An entry that is not a closed gate is left alone.
    pub(super) fn push_down(&self, table: u64, i: usize, level: usize) {
        let e = self.load(table, i);
        if !e.is_present() || e.is_leaf(level) || level < 2 || is_open(e) {
            return;
        }
        let child = e.table_address();
        for slot in self.entries(child) {
            clear_write::<E>(slot);
        }
        let _ = self
            .slot(table, i)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                let e = E::from_raw(cur);
                let seen = Claim::of(cur).map(|c| c.through(S2Perms::RWX - S2Perms::WRITE));
                let summary = Claim::bits(seen);
                let open = e.with_perms(e.perms() | S2Perms::WRITE).raw();
                Some((open & !super::summary::SUMMARY_MASK) | summary)
            });
    }

    /// Closes the gate of the non-leaf entry `i` of `table` (write-protects its subtree).
    pub(super) fn close_gate(&self, table: u64, i: usize) {
        clear_write::<E>(self.slot(table, i));
    }
}
