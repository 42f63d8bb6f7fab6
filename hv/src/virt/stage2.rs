//! The second-level tables hv hands to `vmo::Vmar`: `ept::EptTable` (INVEPT hook) and
//! `ept::NptTable` (TLB_CONTROL hook) over the host frame allocator, behind one type so the
//! scenario is backend-neutral.
//!
//! Invariants: tables take their frames from `frames::PhysFrames` (identity mapped, so a
//! frame's pointer is its address); flushes go through ept's `Invalidate` hooks — INVEPT runs
//! at once, an NPT flush leaves a TLB_CONTROL value that `take_tlb_control` hands to the
//! vCPU's next VMRUN; `harvest_dirty` goes to the inner table (NPT: the D bits; EPT:
//! `NotSupported`, since hv builds its EPTP with A/D disabled), and so does
//! `set_write_tracking` (`NotSupported` on both: their tracking costs the guest no exit, so
//! no page is ever left untracked).

use ept::vmx::InveptInvalidate;
use ept::{
    AccessDirty, EptTable, FlushScope, MemType, NptTable, NptTlbControl, PageSize, S2Perms, Stage2,
    Translation,
};

use crate::platform::frames::PhysFrames;

pub enum HvTable {
    Ept(EptTable<PhysFrames, InveptInvalidate>),
    Npt(NptTable<PhysFrames, NptTlbControl>),
}

impl HvTable {
    /// An empty EPT table whose flushes execute INVEPT.
    ///
    /// # Safety
    /// The CPU is in VMX root operation with single- and all-context INVEPT support.
    pub unsafe fn new_ept() -> Result<Self, ept::Error> {
        Ok(HvTable::Ept(EptTable::with_invalidate(
            PhysFrames,
            // SAFETY: the caller's promise (VMX root operation with single- and all-context
            // INVEPT, for the rest of the run) is exactly `InveptInvalidate::new`'s contract.
            unsafe { InveptInvalidate::new() },
            // A/D stays off: hv does not check IA32_VMX_EPT_VPID_CAP bit 21, so the EPT table
            // cannot harvest dirty pages (`harvest_dirty` is NotSupported; NPT's can).
            AccessDirty::Disabled,
        )?))
    }

    /// An empty nested page table; `flush_by_asid` selects TLB_CONTROL 3 (this ASID) over 1.
    pub fn new_npt(flush_by_asid: bool) -> Result<Self, ept::Error> {
        let hook = if flush_by_asid {
            NptTlbControl::new()
        } else {
            NptTlbControl::flush_all_only()
        };
        Ok(HvTable::Npt(NptTable::with_invalidate(PhysFrames, hook)?))
    }

    /// What the vCPU loads: the EPTP value, or the nCR3.
    pub fn context(&self) -> u64 {
        match self {
            HvTable::Ept(t) => t.eptp().bits(),
            HvTable::Npt(t) => t.ncr3(),
        }
    }

    /// The TLB_CONTROL value the next VMRUN must carry (0 for EPT: INVEPT already ran).
    pub fn take_tlb_control(&mut self) -> u8 {
        match self {
            HvTable::Ept(_) => 0,
            HvTable::Npt(t) => t.invalidator_mut().take() as u8,
        }
    }

    /// Pointer to the 4 KiB leaf entry translating `gpa`, found by walking the table in
    /// (identity-mapped) memory. Only for the deliberate-corruption test (`Space::corrupt_leaf`).
    /// The pointer is valid while the table is neither changed nor dropped.
    pub fn leaf_entry(&self, gpa: u64) -> Option<*mut u64> {
        const ADDR: u64 = 0x000F_FFFF_FFFF_F000;
        let (mut table, present): (u64, fn(u64) -> bool) = match self {
            HvTable::Ept(_) => (self.context() & ADDR, |e| e & 7 != 0),
            HvTable::Npt(_) => (self.context() & ADDR, |e| e & 1 != 0),
        };
        for level in (2..=4u32).rev() {
            let idx = (gpa >> (12 + 9 * (level - 1))) & 511;
            // SAFETY: `table` is a frame of this table (the root from `context`, then the
            // frame a present non-leaf entry names), identity mapped and alive while `&self`
            // is borrowed; `idx < 512` keeps the read inside it, 8-byte aligned.
            let e = unsafe { ((table + idx * 8) as *const u64).read_volatile() };
            if !present(e) || e & (1 << 7) != 0 {
                return None;
            }
            table = e & ADDR;
        }
        let p = (table + ((gpa >> 12) & 511) * 8) as *mut u64;
        // SAFETY: as in the loop: `table` is now the page-table frame of `gpa`, index < 512.
        present(unsafe { p.read_volatile() }).then_some(p)
    }

    /// The value that makes a present leaf invalid for the hardware: EPT write-only (a
    /// misconfiguration, exit 49), NPT with reserved bit 50 set (NPF with RSVD).
    pub fn corrupted(&self, entry: u64) -> u64 {
        match self {
            HvTable::Ept(_) => (entry & !7) | 2,
            HvTable::Npt(_) => entry | (1 << 50),
        }
    }

    /// INVEPT executions that failed (always 0 for NPT).
    pub fn flush_failures(&self) -> u64 {
        match self {
            HvTable::Ept(t) => t.invalidator().failures,
            HvTable::Npt(_) => 0,
        }
    }
}

impl Stage2 for HvTable {
    fn map(
        &mut self,
        gpa: u64,
        pa: u64,
        size: PageSize,
        perms: S2Perms,
        mt: MemType,
    ) -> Result<Option<Translation>, ept::Error> {
        match self {
            HvTable::Ept(t) => t.map(gpa, pa, size, perms, mt),
            HvTable::Npt(t) => t.map(gpa, pa, size, perms, mt),
        }
    }
    fn unmap(&mut self, gpa: u64, len: u64) -> Result<u64, ept::Error> {
        match self {
            HvTable::Ept(t) => t.unmap(gpa, len),
            HvTable::Npt(t) => t.unmap(gpa, len),
        }
    }
    fn protect(&mut self, gpa: u64, len: u64, perms: S2Perms) -> Result<u64, ept::Error> {
        match self {
            HvTable::Ept(t) => t.protect(gpa, len, perms),
            HvTable::Npt(t) => t.protect(gpa, len, perms),
        }
    }
    fn query(&self, gpa: u64) -> Option<Translation> {
        match self {
            HvTable::Ept(t) => t.query(gpa),
            HvTable::Npt(t) => t.query(gpa),
        }
    }
    fn flush(&mut self, scope: FlushScope) {
        match self {
            HvTable::Ept(t) => t.flush(scope),
            HvTable::Npt(t) => t.flush(scope),
        }
    }
    fn flush_pending(&self) -> bool {
        match self {
            HvTable::Ept(t) => t.flush_pending(),
            HvTable::Npt(t) => t.flush_pending(),
        }
    }
    fn harvest_dirty(
        &mut self,
        gpa: u64,
        len: u64,
        dirty: &mut alloc::vec::Vec<u64>,
    ) -> Result<u64, ept::Error> {
        match self {
            HvTable::Ept(t) => t.harvest_dirty(gpa, len, dirty),
            HvTable::Npt(t) => t.harvest_dirty(gpa, len, dirty),
        }
    }
    fn set_write_tracking(
        &mut self,
        gpa: u64,
        len: u64,
        tracking: ept::WriteTracking,
    ) -> Result<u64, ept::Error> {
        match self {
            HvTable::Ept(t) => t.set_write_tracking(gpa, len, tracking),
            HvTable::Npt(t) => t.set_write_tracking(gpa, len, tracking),
        }
    }
}
