//! `EptTable` and `NptTable`: the page table plus the flush bookkeeping, implementing `Stage2`.
//!
//! Both are `Stage2Table<E, M, I>` with the entry format fixed; `I` is the invalidation hook
//! (`CountingInvalidate` by default, `vmx::InveptInvalidate` or `svm::NptTlbControl` on
//! hardware). Invariants:
//! - `flush_pending()` is true exactly when, since the last `flush`, an operation removed a
//!   present entry or changed a present leaf (frame, permissions or memory type), unlinked a
//!   table frame, or cleared a dirty bit (`harvest_dirty`: a CPU that cached the translation
//!   dirty would not set the bit again); installing into an empty slot or an identical
//!   replacement leaves it false;
//! - `flush` always calls the hook once (also when nothing is pending: the fault path flushes
//!   after a spurious fault), counts it, clears the pending state and only then returns
//!   retired table frames to the `PhysMem`;
//! - the context value the hook receives never changes: the EPTP (WB, 4-level, A/D as chosen at
//!   construction) for EPT, the root address (nCR3) for NPT;
//! - the page table's `AccessDirty` matches what the MMU does: always `Enabled` for NPT, the
//!   EPTP's A/D bit for EPT. `harvest_dirty` is `NotSupported` on an EPT table without A/D
//!   (the hardware would never set a dirty bit, so writes after a harvest would go unseen).
//!
//! `hw_touch` is the hardware side of the A/D protocol: software CPUs and tests call it where
//! an MMU would set accessed/dirty bits (`PageTable::hw_touch`).

use crate::entry::ept::{EptEntry, Eptp};
use crate::entry::npt::NptEntry;
use crate::entry::EntryFormat;
use crate::invalidate::{CountingInvalidate, Invalidate};
use crate::phys::PhysMem;
use crate::table::Harvested;
use crate::table::PageTable;
use crate::{
    Access, AccessDirty, Error, FlushScope, MemType, PageSize, S2Perms, Stage2, Translation,
};

/// A second-level table of format `E` with its invalidation hook.
pub struct Stage2Table<E: EntryFormat, M: PhysMem, I: Invalidate = CountingInvalidate> {
    table: PageTable<E, M>,
    invalidate: I,
    context: u64,
    pending: bool,
    flushes: u64,
}

/// Intel EPT table.
pub type EptTable<M, I = CountingInvalidate> = Stage2Table<EptEntry, M, I>;
/// AMD nested page table.
pub type NptTable<M, I = CountingInvalidate> = Stage2Table<NptEntry, M, I>;

impl<M: PhysMem> Stage2Table<EptEntry, M, CountingInvalidate> {
    /// An empty EPT table (A/D disabled, as hardware without the capability) with the
    /// counting no-op hook. `NoMemory` when the root frame cannot be allocated.
    pub fn new(mem: M) -> Result<Self, Error> {
        Self::with_invalidate(mem, CountingInvalidate::default(), AccessDirty::Disabled)
    }
}

impl<M: PhysMem, I: Invalidate> Stage2Table<EptEntry, M, I> {
    /// An empty EPT table flushed through `invalidate`; `ad` sets the EPTP's A/D bit: only
    /// with `Enabled` does the CPU set accessed/dirty bits in the leaves (and only then can
    /// writes be harvested). Enable it only when IA32_VMX_EPT_VPID_CAP bit 21 says the CPU
    /// supports it. `NoMemory` when the root frame cannot be allocated;
    /// `InvalidArgs`/`OutOfRange` if the `PhysMem` hands out an unusable root.
    pub fn with_invalidate(mem: M, invalidate: I, ad: AccessDirty) -> Result<Self, Error> {
        let table = PageTable::with_access_dirty(mem, ad)?;
        let eptp = Eptp::new(table.root(), MemType::WriteBack, 4, ad)?;
        Ok(Stage2Table {
            table,
            invalidate,
            context: eptp.bits(),
            pending: false,
            flushes: 0,
        })
    }

    /// The EPT pointer to load into the VMCS: WB paging structures, 4-level walk, A/D as chosen.
    pub fn eptp(&self) -> Eptp {
        Eptp::from_bits_retain(self.context)
    }
}

impl<M: PhysMem> Stage2Table<NptEntry, M, CountingInvalidate> {
    /// An empty nested page table with the counting no-op hook. `NoMemory` when the root
    /// frame cannot be allocated.
    pub fn new(mem: M) -> Result<Self, Error> {
        Self::with_invalidate(mem, CountingInvalidate::default())
    }
}

impl<M: PhysMem, I: Invalidate> Stage2Table<NptEntry, M, I> {
    /// An empty nested page table flushed through `invalidate` (e.g. `svm::NptTlbControl`).
    pub fn with_invalidate(mem: M, invalidate: I) -> Result<Self, Error> {
        // The CPU always maintains A/D in nested page tables.
        let table = PageTable::with_access_dirty(mem, AccessDirty::Enabled)?;
        Ok(Stage2Table {
            context: table.root(),
            table,
            invalidate,
            pending: false,
            flushes: 0,
        })
    }

    /// The nested CR3 for the VMCB (N_CR3): the root table's physical address.
    pub fn ncr3(&self) -> u64 {
        self.table.root()
    }
}

impl<E: EntryFormat, M: PhysMem, I: Invalidate> Stage2Table<E, M, I> {
    /// The underlying page table (read-only).
    pub fn page_table(&self) -> &PageTable<E, M> {
        &self.table
    }
    /// Table frames linked in the tree, root included.
    pub fn table_frames(&self) -> usize {
        self.table.table_frames()
    }
    /// Unlinked table frames that the next `flush` returns to the `PhysMem`.
    pub fn retired_frames(&self) -> usize {
        self.table.retired_frames()
    }
    /// The frame source.
    pub fn phys_mem(&self) -> &M {
        self.table.phys_mem()
    }
    /// `flush` calls since creation.
    pub fn flush_count(&self) -> u64 {
        self.flushes
    }
    /// The invalidation hook.
    pub fn invalidator(&self) -> &I {
        &self.invalidate
    }
    /// The invalidation hook, e.g. to `take` a pending TLB_CONTROL value.
    pub fn invalidator_mut(&mut self) -> &mut I {
        &mut self.invalidate
    }
    /// Checks the table's invariants (`PageTable::check_invariants`) and this module's: a
    /// retired table frame implies a pending flush. The first violation, described.
    pub fn check_invariants(&self) -> Result<(), alloc::string::String> {
        self.table.check_invariants()?;
        if self.table.retired_frames() > 0 && !self.pending {
            return Err(alloc::format!(
                "{} retired frames but no flush pending",
                self.table.retired_frames()
            ));
        }
        Ok(())
    }
    /// Flushes only if an operation left a flush pending; returns whether it flushed.
    pub fn flush_if_pending(&mut self, scope: FlushScope) -> bool {
        let pending = self.pending;
        if pending {
            self.flush(scope);
        }
        pending
    }
    /// Whether the MMU maintains accessed/dirty bits in this table (NPT: always; EPT: the
    /// EPTP's A/D enable), i.e. whether `harvest_dirty` can work.
    pub fn access_dirty(&self) -> AccessDirty {
        self.table.access_dirty()
    }
    /// What the hardware does when a vCPU accesses `gpa`: the leaf translating it, after
    /// setting accessed (and, for a permitted write, dirty) bits as the MMU would
    /// (`PageTable::hw_touch`). For software CPUs and tests standing in for the MMU.
    pub fn hw_touch(&self, gpa: u64, access: Access) -> Option<Translation> {
        self.table.hw_touch(gpa, access)
    }
    /// `Stage2::harvest_dirty` with both counts (pages reported, leaves cleared).
    pub fn harvest(
        &mut self,
        gpa: u64,
        len: u64,
        dirty: &mut alloc::vec::Vec<u64>,
    ) -> Result<Harvested, Error> {
        let h = self.table.harvest_dirty(gpa, len, dirty)?;
        if h.cleared > 0 {
            self.pending = true;
        }
        Ok(h)
    }
    /// Calls `f` with every leaf intersecting `[gpa, gpa + len)`, in address order.
    pub fn for_each_leaf(
        &self,
        gpa: u64,
        len: u64,
        f: impl FnMut(Translation),
    ) -> Result<(), Error> {
        self.table.for_each_leaf(gpa, len, f)
    }
    /// Every leaf intersecting `[gpa, gpa + len)`, in address order.
    pub fn leaves(&self, gpa: u64, len: u64) -> Result<alloc::vec::Vec<Translation>, Error> {
        let mut v = alloc::vec::Vec::new();
        self.table.for_each_leaf(gpa, len, |t| v.push(t))?;
        Ok(v)
    }
}

impl<E: EntryFormat, M: PhysMem, I: Invalidate> Stage2 for Stage2Table<E, M, I> {
    fn map(
        &mut self,
        gpa: u64,
        pa: u64,
        size: PageSize,
        perms: S2Perms,
        mem_type: MemType,
    ) -> Result<Option<Translation>, Error> {
        let old = self.table.map(gpa, pa, size, perms, mem_type)?;
        if let Some(old) = old {
            if old.pa != pa || old.perms != perms || old.mem_type != mem_type {
                self.pending = true;
            }
        }
        Ok(old)
    }

    fn unmap(&mut self, gpa: u64, len: u64) -> Result<u64, Error> {
        let removed = self.table.unmap(gpa, len)?;
        if removed > 0 || self.table.retired_frames() > 0 {
            self.pending = true;
        }
        Ok(removed)
    }

    fn protect(&mut self, gpa: u64, len: u64, perms: S2Perms) -> Result<u64, Error> {
        let changed = self.table.protect(gpa, len, perms)?;
        if changed > 0 {
            self.pending = true;
        }
        Ok(changed)
    }

    fn query(&self, gpa: u64) -> Option<Translation> {
        self.table.query(gpa)
    }

    fn flush(&mut self, scope: FlushScope) {
        self.invalidate.invalidate(self.context, scope);
        self.flushes += 1;
        self.pending = false;
        self.table.release_retired();
    }

    fn flush_pending(&self) -> bool {
        self.pending
    }

    /// Reports dirty leaves and clears their dirty bits (`PageTable::harvest_dirty`: a dirty
    /// large leaf straddling an end of the range is split first, so pages outside the range
    /// keep their state). Leaves a flush pending when it cleared a bit.
    fn harvest_dirty(
        &mut self,
        gpa: u64,
        len: u64,
        dirty: &mut alloc::vec::Vec<u64>,
    ) -> Result<u64, Error> {
        self.harvest(gpa, len, dirty).map(|h| h.pages)
    }
}

impl<E: EntryFormat, M: PhysMem, I: Invalidate> core::fmt::Debug for Stage2Table<E, M, I> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Stage2Table")
            .field("context", &format_args!("{:#x}", self.context))
            .field("table", &self.table)
            .field("pending", &self.pending)
            .field("flushes", &self.flushes)
            .finish()
    }
}
