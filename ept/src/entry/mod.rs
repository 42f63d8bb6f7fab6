//! Second-level entry formats and the `EntryFormat` trait the generic table walker uses.
//!
//! This module owns the contract between the format-independent walker (`crate::table`) and the
//! two hardware formats: Intel EPT (`ept::EptEntry`, plus the `Eptp` root pointer) and AMD NPT
//! (`npt::NptEntry`, the long-mode page-table format).
//!
//! Invariants every format keeps:
//! - an all-zero entry is not present, and so is any entry whose low 12 bits are zero (the walker
//!   relies on this to chain retired table frames through their first entry);
//! - level numbering: 1 = PT (4 KiB leaves), 2 = PD (2 MiB leaves), 3 = PDPT (1 GiB leaves),
//!   4 = PML4 (never a leaf);
//! - `ACCESSED_BIT` and `DIRTY_BIT` are single bits that `leaf`, `table_pointer` and
//!   `with_perms` never set on their own (a new leaf is clean; the table decides when to mark
//!   it dirty) and that `with_perms` and `split_child` keep;
//! - `leaf` is only called with permissions and a memory type that `check` accepted and with a
//!   frame address aligned to the level's page size and below `PA_LIMIT`.

pub mod ept;
pub mod npt;

use crate::{Error, MemType, S2Perms};

/// Bits 51:12 of an entry: the frame or table address.
pub const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Size in bytes of the region one entry at `level` (1..=4) covers. Levels outside 1..=5 are
/// clamped into that range (never a panic).
pub const fn level_size(level: usize) -> u64 {
    let level = if level < 1 {
        1
    } else if level > 5 {
        5
    } else {
        level
    };
    1u64 << (12 + 9 * (level as u32 - 1))
}

/// Address mask of a leaf at `level`: bits 51 down to the level's page shift.
pub const fn leaf_address_mask(level: usize) -> u64 {
    ADDRESS_MASK & !(level_size(level) - 1)
}

/// A second-level entry format the generic 4-level walker can build and read.
pub trait EntryFormat: Copy + Eq + core::fmt::Debug + Send + Sync + 'static {
    /// The accessed bit of a leaf (EPT 8, NPT 5): set by the MMU on any access through it.
    const ACCESSED_BIT: u64;
    /// The dirty bit of a leaf (EPT 9, NPT 6): set by the MMU on a write through it.
    const DIRTY_BIT: u64;

    /// Whether permissions and memory type can be expressed by this format. Errors:
    /// empty perms or write without read → `InvalidArgs`; something the format lacks (NPT:
    /// execute-only, WC/WP under the default PAT) → `NotSupported`.
    fn check(perms: S2Perms, mem_type: MemType) -> Result<(), Error>;

    /// The entry as raw bits, as hardware reads it.
    fn raw(self) -> u64;
    /// An entry from raw bits (all bits kept).
    fn from_raw(raw: u64) -> Self;

    /// A non-leaf entry pointing at the table frame `table_pa`, granting every permission (the
    /// leaves decide).
    fn table_pointer(table_pa: u64) -> Self;
    /// A leaf at `level` (1..=3) mapping the page at `pa`.
    fn leaf(level: usize, pa: u64, perms: S2Perms, mem_type: MemType) -> Self;

    fn is_present(self) -> bool;
    /// Whether this present entry at `level` maps a page (rather than pointing at a table).
    fn is_leaf(self, level: usize) -> bool;
    /// The table frame a non-leaf entry points at.
    fn table_address(self) -> u64 {
        self.raw() & ADDRESS_MASK
    }
    /// The frame a leaf at `level` maps.
    fn leaf_address(self, level: usize) -> u64 {
        self.raw() & leaf_address_mask(level)
    }
    fn perms(self) -> S2Perms;
    /// Memory type of a leaf at `level`.
    fn mem_type(self, level: usize) -> MemType;
    fn accessed(self) -> bool;
    fn dirty(self) -> bool;
    /// The same leaf with `perms` (already accepted by `check`); everything else kept.
    fn with_perms(self, perms: S2Perms) -> Self;
    /// The leaf at `level - 1` that maps child `index` (0..512, taken modulo 512) of this leaf
    /// at `level` (2 or 3) when it is split: same permissions, memory type and accessed/dirty
    /// state. For any other `level` the entry is returned unchanged.
    fn split_child(self, level: usize, index: u64) -> Self;
}

/// Shared permission rule: empty perms and write-without-read are never valid.
pub(crate) fn check_common(perms: S2Perms) -> Result<(), Error> {
    if perms.is_empty() || (perms.contains(S2Perms::WRITE) && !perms.contains(S2Perms::READ)) {
        return Err(Error::InvalidArgs);
    }
    if !S2Perms::RWX.contains(perms) {
        return Err(Error::InvalidArgs);
    }
    Ok(())
}
