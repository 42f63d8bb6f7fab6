//! AMD nested page-table entries (APM vol. 2, "Nested Paging"): the long-mode 4-level format.
//!
//! Bits: P 0, RW 1, US 2 (always set: nested walks are treated as user accesses), PWT 3, PCD 4,
//! A 5 (every level), D 6 (leaves; the CPU always maintains both: A on every nested walk for an
//! access, D on a write), PS 7 on PDPTE/PDE (1 GiB / 2 MiB leaf), PAT 7 on a 4 KiB PTE and 12 on
//! a large leaf, address 51:12 (51:21 / 51:30 on large leaves), NX 63.
//!
//! Memory type: the nested table selects a host PAT entry with index `PAT*4 + PCD*2 + PWT`.
//! This module assumes the power-on default PAT MSR (`DEFAULT_PAT`): index 0 = WB, 1 = WT,
//! 2 = UC-, 3 = UC (4..7 repeat them). WB, WT and UC are encoded as indices 0, 1 and 3; WC and WP
//! have no entry in the default PAT and are `NotSupported`.
//!
//! Permissions: P means readable, RW writable, NX clear executable. Execute-only cannot be
//! expressed (`NotSupported`); write-without-read is `InvalidArgs`. NX in a nested entry needs
//! the host's EFER.NXE at VMRUN, otherwise bit 63 is reserved (the hypervisor must set it).
//!
//! Bits 62:52 are available to software (APM Vol. 2 §5.3.3): the table keeps a permission
//! summary in 55:52 of non-leaf entries (`table/summary.rs`); `table_pointer` leaves them clear.
//!
//! Invariants: table pointers are P|RW|US with NX clear; a leaf's PAT bit sits at the position
//! its level defines (`split_child` moves it when a large leaf becomes 4 KiB leaves).

use super::{check_common, EntryFormat, ADDRESS_MASK};
use crate::{Error, MemType, S2Perms};

/// The power-on value of the PAT MSR this module's memory-type encoding assumes.
pub const DEFAULT_PAT: u64 = 0x0007_0406_0007_0406;

bitflags::bitflags! {
    /// One nested page-table entry (PML4E, PDPTE, PDE or PTE).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    #[repr(transparent)]
    pub struct NptEntry: u64 {
        const PRESENT = 1 << 0;
        const WRITABLE = 1 << 1;
        /// Must be set in every nested entry: nested walks are user-mode accesses.
        const USER = 1 << 2;
        const WRITE_THROUGH = 1 << 3;
        const CACHE_DISABLE = 1 << 4;
        const ACCESSED = 1 << 5;
        const DIRTY = 1 << 6;
        /// Bit 7 on a PDPTE/PDE: 1 GiB / 2 MiB leaf.
        const HUGE = 1 << 7;
        /// Bit 7 on a 4 KiB PTE: PAT index bit 2.
        const PAT_4K = 1 << 7;
        /// Bit 12 on a large leaf: PAT index bit 2.
        const PAT_LARGE = 1 << 12;
        const ADDRESS = ADDRESS_MASK;
        const NO_EXECUTE = 1 << 63;
        const _ = !0;
    }
}

impl NptEntry {
    /// The PAT index (0..8) a leaf at `level` selects.
    pub fn pat_index(self, level: usize) -> u64 {
        let pat = if level == 1 {
            self.contains(NptEntry::PAT_4K)
        } else {
            self.contains(NptEntry::PAT_LARGE)
        };
        (pat as u64) << 2
            | (self.contains(NptEntry::CACHE_DISABLE) as u64) << 1
            | self.contains(NptEntry::WRITE_THROUGH) as u64
    }

    fn cache_bits(mem_type: MemType) -> NptEntry {
        match mem_type {
            MemType::WriteBack => NptEntry::empty(),
            MemType::WriteThrough => NptEntry::WRITE_THROUGH,
            // WC/WP are rejected by `check`; UC is index 3.
            _ => NptEntry::WRITE_THROUGH | NptEntry::CACHE_DISABLE,
        }
    }

    fn perm_bits(perms: S2Perms) -> NptEntry {
        let mut e = NptEntry::PRESENT | NptEntry::USER;
        e.set(NptEntry::WRITABLE, perms.contains(S2Perms::WRITE));
        e.set(NptEntry::NO_EXECUTE, !perms.contains(S2Perms::EXEC));
        e
    }
}

impl EntryFormat for NptEntry {
    const ACCESSED_BIT: u64 = NptEntry::ACCESSED.bits();
    const DIRTY_BIT: u64 = NptEntry::DIRTY.bits();
    fn check(perms: S2Perms, mem_type: MemType) -> Result<(), Error> {
        check_common(perms)?;
        if !perms.contains(S2Perms::READ) {
            return Err(Error::NotSupported);
        }
        match mem_type {
            MemType::WriteBack | MemType::WriteThrough | MemType::Uncacheable => Ok(()),
            MemType::WriteCombining | MemType::WriteProtected => Err(Error::NotSupported),
        }
    }
    fn raw(self) -> u64 {
        self.bits()
    }
    fn from_raw(raw: u64) -> Self {
        NptEntry::from_bits_retain(raw)
    }
    fn table_pointer(table_pa: u64) -> Self {
        NptEntry::from_bits_retain(table_pa & ADDRESS_MASK)
            | NptEntry::PRESENT
            | NptEntry::WRITABLE
            | NptEntry::USER
    }
    fn leaf(level: usize, pa: u64, perms: S2Perms, mem_type: MemType) -> Self {
        let mut e = NptEntry::from_bits_retain(pa & super::leaf_address_mask(level))
            | Self::perm_bits(perms)
            | Self::cache_bits(mem_type);
        if level > 1 {
            e |= NptEntry::HUGE;
        }
        e
    }
    fn is_present(self) -> bool {
        self.contains(NptEntry::PRESENT)
    }
    fn is_leaf(self, level: usize) -> bool {
        match level {
            1 => self.is_present(),
            2 | 3 => self.is_present() && self.contains(NptEntry::HUGE),
            _ => false,
        }
    }
    fn perms(self) -> S2Perms {
        let mut p = S2Perms::empty();
        if self.is_present() {
            p |= S2Perms::READ;
            p.set(S2Perms::WRITE, self.contains(NptEntry::WRITABLE));
            p.set(S2Perms::EXEC, !self.contains(NptEntry::NO_EXECUTE));
        }
        p
    }
    fn mem_type(self, level: usize) -> MemType {
        match self.pat_index(level) & 0b11 {
            0 => MemType::WriteBack,
            1 => MemType::WriteThrough,
            // 2 is UC- in the default PAT: report it as uncacheable.
            _ => MemType::Uncacheable,
        }
    }
    fn accessed(self) -> bool {
        self.contains(NptEntry::ACCESSED)
    }
    fn dirty(self) -> bool {
        self.contains(NptEntry::DIRTY)
    }
    fn with_perms(self, perms: S2Perms) -> Self {
        (self - (NptEntry::PRESENT | NptEntry::WRITABLE | NptEntry::NO_EXECUTE))
            | Self::perm_bits(perms)
    }
    fn split_child(self, level: usize, index: u64) -> Self {
        if !matches!(level, 2 | 3) {
            return self;
        }
        let child_level = level - 1;
        let pa = self.leaf_address(level) + (index % 512) * super::level_size(child_level);
        let keep = NptEntry::PRESENT
            | NptEntry::WRITABLE
            | NptEntry::USER
            | NptEntry::WRITE_THROUGH
            | NptEntry::CACHE_DISABLE
            | NptEntry::ACCESSED
            | NptEntry::DIRTY
            | NptEntry::NO_EXECUTE;
        let mut e = (self & keep) | NptEntry::from_bits_retain(pa);
        let pat = self.contains(NptEntry::PAT_LARGE);
        if child_level == 1 {
            e.set(NptEntry::PAT_4K, pat);
        } else {
            e |= NptEntry::HUGE;
            e.set(NptEntry::PAT_LARGE, pat);
        }
        e
    }
}
