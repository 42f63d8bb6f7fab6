//! A guest's physical address space: a thin handle over `vmo::Vmar` with hv's second-level
//! table, plus the host-side views the scenario's checks need.
//!
//! The fault path is `vmo::Vmar::handle_fault` itself — the same code the host tests and
//! guest-vm's KVM backend run; both hardware backends call it through `handle_fault` here.
//! Invariants: nothing is installed in the second-level table except by the fault path (no
//! pre-mapping); after any Vmar operation the caller hands `take_tlb_control` to the vCPU so a
//! deferred NPT flush reaches the next VMRUN.

use ept::{FaultInfo, Translation};
use vmo::{FaultStats, MapOptions, Resolution, VmPerms, Vmar, Vmo};

use crate::virt::stage2::HvTable;

pub struct Space {
    vmar: Vmar<HvTable>,
}

impl Space {
    /// A root Vmar over guest-physical `[0, size)` translated by `table` (empty).
    pub fn new(size: u64, table: HvTable) -> vmo::Result<Self> {
        Ok(Space {
            vmar: Vmar::new_root(size, table)?,
        })
    }

    /// Maps `pages` pages of `vmo` from `vmo_offset` at guest-physical `gpa` with `perms`.
    pub fn map(
        &self,
        vmo: &Vmo,
        vmo_offset: u64,
        gpa: u64,
        pages: u64,
        perms: VmPerms,
    ) -> vmo::Result<()> {
        self.vmar.map(
            vmo,
            vmo_offset,
            pages * 4096,
            MapOptions::specific(gpa, perms),
        )?;
        Ok(())
    }

    /// THE fault path (vmo's `Vmar::handle_fault`).
    pub fn handle_fault(&self, fault: &FaultInfo) -> vmo::Result<Resolution> {
        self.vmar.handle_fault(*fault)
    }

    /// Copy-on-write fork of the whole space into a child translated by `table` (empty).
    pub fn fork(&self, table: HvTable) -> vmo::Result<Space> {
        Ok(Space {
            vmar: self.vmar.fork(table)?,
        })
    }

    /// The TLB_CONTROL value the vCPU's next VMRUN must carry (0: nothing, or EPT).
    pub fn take_tlb_control(&self) -> u8 {
        self.vmar.with_stage2(|t| t.take_tlb_control())
    }

    pub fn flush_failures(&self) -> u64 {
        self.vmar.with_stage2(|t| t.flush_failures())
    }

    /// The second-level translation installed for `gpa`, if any.
    pub fn installed(&self, gpa: u64) -> Option<Translation> {
        self.vmar.with_stage2(|t| ept::Stage2::query(t, gpa))
    }

    /// Permissions of the mapping covering `gpa` (None: unmapped).
    pub fn perms_at(&self, gpa: u64) -> Option<VmPerms> {
        self.vmar.query(gpa).ok().map(|m| m.perms)
    }

    /// Host-side read of guest memory through the mapped Vmo (no second-level access).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> vmo::Result<()> {
        let m = self.vmar.query(gpa)?;
        m.vmo.read(m.vmo_offset + (gpa - m.base), buf)
    }

    /// TEST ONLY: commits and installs the page at `gpa` through the fault path (a host-side
    /// read fault), then overwrites its leaf entry with a value the hardware rejects (EPT
    /// misconfiguration / NPT reserved bit) and flushes. Returns (entry pointer, original value)
    /// so the caller can restore the table before teardown.
    pub fn corrupt_leaf(&self, gpa: u64) -> Option<(*mut u64, u64)> {
        let f = FaultInfo::new(gpa, ept::Access::READ, ept::FaultKind::NotPresent);
        self.vmar.handle_fault(f).ok()?;
        self.vmar.with_stage2(|t| {
            let p = t.leaf_entry(gpa)?;
            let orig = unsafe { p.read_volatile() };
            unsafe { p.write_volatile(t.corrupted(orig)) };
            ept::Stage2::flush(t, ept::FlushScope::Context);
            Some((p, orig))
        })
    }

    /// Puts back an entry `corrupt_leaf` changed.
    pub fn restore_leaf(&self, entry: (*mut u64, u64)) {
        self.vmar.with_stage2(|t| {
            unsafe { entry.0.write_volatile(entry.1) };
            ept::Stage2::flush(t, ept::FlushScope::Context);
        });
    }

    pub fn stats(&self) -> FaultStats {
        self.vmar.fault_stats()
    }
}
