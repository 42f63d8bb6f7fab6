//! A guest's physical address space: `vmo::Vmar` over hv's second-level table, plus the
//! host-side views the scenario's checks need and the deliberate table corruption of the
//! misconfiguration test.
//!
//! The fault path is `vmo::Vmar::handle_fault` itself — the same code the host tests and
//! guest-vm's KVM backend run; the exit handler (slice.rs) calls it on `vmar()` directly.
//! Invariants: nothing is installed in the second-level table except by the fault path (no
//! pre-mapping); after any Vmar operation the caller hands `take_tlb_control` to the vCPU so a
//! deferred NPT flush reaches the next VMRUN.

use ept::{FaultInfo, Translation, PAGE_SIZE};
use vmo::{FaultStats, MapOptions, VmPerms, Vmar, Vmo};

use crate::virt::stage2::HvTable;

/// A leaf entry `Space::corrupt_leaf` changed: what to put back with `restore_leaf`.
pub struct CorruptedLeaf {
    gpa: u64,
    original: u64,
    corrupted: u64,
}

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
            pages * PAGE_SIZE,
            MapOptions::specific(gpa, perms),
        )?;
        Ok(())
    }

    /// The Vmar: its `handle_fault` is the guest's fault path.
    pub fn vmar(&self) -> &Vmar<HvTable> {
        &self.vmar
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
    /// misconfiguration / NPT reserved bit) and flushes. Returns what `restore_leaf` needs to
    /// put the table back before teardown.
    pub fn corrupt_leaf(&self, gpa: u64) -> Option<CorruptedLeaf> {
        let f = FaultInfo::new(gpa, ept::Access::READ, ept::FaultKind::NotPresent);
        self.vmar.handle_fault(f).ok()?;
        self.vmar.with_stage2(|t| {
            let p = t.leaf_entry(gpa)?;
            // SAFETY: `leaf_entry` just found `p` by walking the live table, which
            // `with_stage2` lends us exclusively: it points at a present 4 KiB leaf entry in a
            // table frame the table owns (identity mapped, 8-byte aligned).
            let original = unsafe { p.read_volatile() };
            let corrupted = t.corrupted(original);
            // SAFETY: as for the read; the hardware walker may read the entry concurrently,
            // which is why the access is volatile and a flush follows.
            unsafe { p.write_volatile(corrupted) };
            ept::Stage2::flush(t, ept::FlushScope::Context);
            Some(CorruptedLeaf {
                gpa,
                original,
                corrupted,
            })
        })
    }

    /// Puts back an entry `corrupt_leaf` changed, if the table still holds it there.
    pub fn restore_leaf(&self, leaf: CorruptedLeaf) {
        self.vmar.with_stage2(|t| {
            let Some(p) = t.leaf_entry(leaf.gpa) else {
                return;
            };
            // SAFETY: `leaf_entry` found `p` by walking the live table, lent exclusively
            // by `with_stage2`: a 4 KiB leaf entry slot in a frame the table owns.
            if unsafe { p.read_volatile() } == leaf.corrupted {
                // SAFETY: as for the read.
                unsafe { p.write_volatile(leaf.original) };
            }
            ept::Stage2::flush(t, ept::FlushScope::Context);
        });
    }

    pub fn stats(&self) -> FaultStats {
        self.vmar.fault_stats()
    }
}
