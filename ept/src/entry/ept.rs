//! Intel EPT entries and the EPT pointer (SDM vol. 3C, "The EPT Translation Mechanism").
//!
//! Entry bits: R/W/X 2:0, memory type 5:3 and ignore-PAT 6 (leaves only), large page 7 (PDE /
//! PDPTE), accessed 8 (every level), dirty 9 (leaves), frame or table address 51:12. An entry is
//! present when any of bits 2:0 is set.
//!
//! Accessed / dirty: the CPU sets bit 8 of every entry it walks for an access and bit 9 of the
//! leaf on a write *only* when the EPTP enables A/D (`Eptp::AD_ENABLE`, bit 6; the CPU supports
//! it when IA32_VMX_EPT_VPID_CAP bit 21 is set; `AccessDirty` says which a table was built
//! with). With A/D disabled both bits are ignored and never set by hardware, so a dirty bit
//! means nothing and writes cannot be harvested from the table.
//!
//! Invariants: leaves built here never have the write-without-read combination (an EPT
//! misconfiguration); table pointers grant R/W/X so the leaf alone decides; reserved bits are
//! always zero, so an entry this module builds never causes an EPT misconfiguration exit.
//! Bits 63:52 of a non-leaf entry are ignored (SDM Vol. 3C §29.3.2; bit 8 is its accessed bit,
//! bit 10 its user-execute bit under MBEC): the table keeps a permission summary in 55:52
//! (`table/summary.rs`); `table_pointer` leaves them clear.

use super::{check_common, EntryFormat, ADDRESS_MASK};
use crate::{AccessDirty, Error, MemType, S2Perms};

bitflags::bitflags! {
    /// One EPT paging-structure entry (PML4E, PDPTE, PDE or PTE).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    #[repr(transparent)]
    pub struct EptEntry: u64 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const EXEC = 1 << 2;
        /// Bits 5:3: EPT memory type of a leaf.
        const MEM_TYPE = 0b111 << 3;
        /// Bit 6: ignore the guest PAT (leaves only).
        const IGNORE_PAT = 1 << 6;
        /// Bit 7: this PDPTE/PDE maps a 1 GiB / 2 MiB page.
        const LARGE = 1 << 7;
        const ACCESSED = 1 << 8;
        const DIRTY = 1 << 9;
        /// Bits 51:12: physical address of the frame or next table.
        const ADDRESS = ADDRESS_MASK;
        const _ = !0;
    }
}

const MEM_TYPE_SHIFT: u32 = 3;

/// Decodes a 3-bit EPT/PAT memory-type encoding; reserved encodings (2, 3, 7) read as
/// `None`.
pub fn mem_type_from_bits(bits: u64) -> Option<MemType> {
    match bits {
        0 => Some(MemType::Uncacheable),
        1 => Some(MemType::WriteCombining),
        4 => Some(MemType::WriteThrough),
        5 => Some(MemType::WriteProtected),
        6 => Some(MemType::WriteBack),
        _ => None,
    }
}

impl EptEntry {
    /// Whether the guest PAT is ignored for this leaf.
    pub fn ignore_pat(self) -> bool {
        self.contains(EptEntry::IGNORE_PAT)
    }
    /// This leaf with ignore-PAT set or cleared (leaves built by `EntryFormat::leaf` keep the
    /// guest PAT, i.e. the bit is clear).
    pub fn with_ignore_pat(self, ignore: bool) -> Self {
        let mut e = self;
        e.set(EptEntry::IGNORE_PAT, ignore);
        e
    }
    /// The raw 3-bit memory type field (bits 5:3).
    pub fn mem_type_bits(self) -> u64 {
        (self.bits() & EptEntry::MEM_TYPE.bits()) >> MEM_TYPE_SHIFT
    }
    fn perm_bits(perms: S2Perms) -> EptEntry {
        let mut e = EptEntry::empty();
        e.set(EptEntry::READ, perms.contains(S2Perms::READ));
        e.set(EptEntry::WRITE, perms.contains(S2Perms::WRITE));
        e.set(EptEntry::EXEC, perms.contains(S2Perms::EXEC));
        e
    }
}

impl EntryFormat for EptEntry {
    const ACCESSED_BIT: u64 = EptEntry::ACCESSED.bits();
    const DIRTY_BIT: u64 = EptEntry::DIRTY.bits();
    fn check(perms: S2Perms, _mem_type: MemType) -> Result<(), Error> {
        // Execute-only is expressible on EPT (the hypervisor must check the CPU's
        // IA32_VMX_EPT_VPID_CAP bit 0 before using it).
        check_common(perms)
    }
    fn raw(self) -> u64 {
        self.bits()
    }
    fn from_raw(raw: u64) -> Self {
        EptEntry::from_bits_retain(raw)
    }
    fn table_pointer(table_pa: u64) -> Self {
        EptEntry::from_bits_retain(table_pa & ADDRESS_MASK)
            | EptEntry::READ
            | EptEntry::WRITE
            | EptEntry::EXEC
    }
    fn leaf(level: usize, pa: u64, perms: S2Perms, mem_type: MemType) -> Self {
        let mut e = EptEntry::from_bits_retain(pa & super::leaf_address_mask(level))
            | Self::perm_bits(perms)
            | EptEntry::from_bits_retain((mem_type as u64) << MEM_TYPE_SHIFT);
        if level > 1 {
            e |= EptEntry::LARGE;
        }
        e
    }
    fn is_present(self) -> bool {
        self.intersects(EptEntry::READ | EptEntry::WRITE | EptEntry::EXEC)
    }
    fn is_leaf(self, level: usize) -> bool {
        match level {
            1 => self.is_present(),
            2 | 3 => self.is_present() && self.contains(EptEntry::LARGE),
            _ => false,
        }
    }
    fn perms(self) -> S2Perms {
        let mut p = S2Perms::empty();
        p.set(S2Perms::READ, self.contains(EptEntry::READ));
        p.set(S2Perms::WRITE, self.contains(EptEntry::WRITE));
        p.set(S2Perms::EXEC, self.contains(EptEntry::EXEC));
        p
    }
    fn mem_type(self, _level: usize) -> MemType {
        // Entries built here only carry valid encodings; reserved ones read as UC.
        mem_type_from_bits(self.mem_type_bits()).unwrap_or(MemType::Uncacheable)
    }
    fn accessed(self) -> bool {
        self.contains(EptEntry::ACCESSED)
    }
    fn dirty(self) -> bool {
        self.contains(EptEntry::DIRTY)
    }
    fn with_perms(self, perms: S2Perms) -> Self {
        (self - (EptEntry::READ | EptEntry::WRITE | EptEntry::EXEC)) | Self::perm_bits(perms)
    }
    fn split_child(self, level: usize, index: u64) -> Self {
        if !matches!(level, 2 | 3) {
            return self;
        }
        let child_level = level - 1;
        let pa = self.leaf_address(level) + (index % 512) * super::level_size(child_level);
        let keep = EptEntry::READ
            | EptEntry::WRITE
            | EptEntry::EXEC
            | EptEntry::MEM_TYPE
            | EptEntry::IGNORE_PAT
            | EptEntry::ACCESSED
            | EptEntry::DIRTY;
        let mut e = (self & keep) | EptEntry::from_bits_retain(pa);
        if child_level > 1 {
            e |= EptEntry::LARGE;
        }
        e
    }
}

bitflags::bitflags! {
    /// The EPT pointer (VMCS field 0x201A): memory type of the paging structures (2:0),
    /// page-walk length − 1 (5:3), accessed/dirty enable (6), PML4 address (51:12).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    #[repr(transparent)]
    pub struct Eptp: u64 {
        const MEM_TYPE = 0b111;
        const WALK_LENGTH_MINUS_1 = 0b111 << 3;
        const AD_ENABLE = 1 << 6;
        const ADDRESS = ADDRESS_MASK;
        const _ = !0;
    }
}

impl Eptp {
    /// An EPTP for a `walk_levels`-level table at `root_pa`; `ad` sets the A/D enable bit (6),
    /// without which the CPU never sets accessed/dirty bits in the table (check
    /// IA32_VMX_EPT_VPID_CAP bit 21 before enabling it). Errors: `walk_levels` not 4 or 5, a
    /// memory type other than UC/WB (the only ones the SDM allows here), or a root address
    /// that is misaligned (`InvalidArgs`) or beyond 2^52 (`OutOfRange`).
    pub fn new(
        root_pa: u64,
        mem_type: MemType,
        walk_levels: u64,
        ad: AccessDirty,
    ) -> Result<Eptp, Error> {
        if !matches!(walk_levels, 4 | 5)
            || !matches!(mem_type, MemType::Uncacheable | MemType::WriteBack)
            || root_pa & 0xfff != 0
        {
            return Err(Error::InvalidArgs);
        }
        if root_pa >= crate::PA_LIMIT {
            return Err(Error::OutOfRange);
        }
        let mut e = Eptp::from_bits_retain(root_pa | mem_type as u64 | ((walk_levels - 1) << 3));
        e.set(Eptp::AD_ENABLE, ad == AccessDirty::Enabled);
        Ok(e)
    }
    pub fn root(self) -> u64 {
        self.bits() & ADDRESS_MASK
    }
    pub fn mem_type(self) -> Option<MemType> {
        mem_type_from_bits(self.bits() & 0b111)
    }
    /// Number of paging levels the EPTP declares (page-walk length field + 1).
    pub fn walk_levels(self) -> u64 {
        ((self.bits() >> 3) & 0b111) + 1
    }
    pub fn ad_enabled(self) -> bool {
        self.contains(Eptp::AD_ENABLE)
    }
    /// Whether the CPU maintains accessed/dirty bits in tables walked through this EPTP.
    pub fn access_dirty(self) -> AccessDirty {
        if self.ad_enabled() {
            AccessDirty::Enabled
        } else {
            AccessDirty::Disabled
        }
    }
}
