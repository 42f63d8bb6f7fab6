//! The `Stage2` trait: the only seam between the memory model (`vmo`) and a second-level
//! translation backend (Intel EPT, AMD NPT, guest-vm's KVM/userfaultfd backend).
//!
//! Invariants every implementation keeps:
//! - addresses and lengths are multiples of 4 KiB; a guest-physical address is below 2^48 and a
//!   host-physical (frame) address below 2^52; violations are `Error`s, never panics;
//! - `map` never silently overlaps a mapping of a different size: it replaces only an existing
//!   leaf of exactly the same page size at exactly the same address (the fault path's "replace a
//!   shared frame by its private copy"), and otherwise fails with `AlreadyExists`;
//! - `unmap` and `protect` accept any page-aligned range and split large pages that the range
//!   covers only partly; holes inside the range are not an error;
//! - operations never invalidate the hardware TLB themselves: they record that a flush is
//!   pending, and the caller issues one `flush` per logical operation.

use alloc::vec::Vec;

use crate::{Error, MemType, PageSize, S2Perms};

/// What a second-level entry translates a guest-physical address to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical address of the start of the leaf (aligned to `size`).
    pub gpa: u64,
    /// Host-physical (frame) address of the start of the leaf.
    pub pa: u64,
    pub size: PageSize,
    pub perms: S2Perms,
    pub mem_type: MemType,
    /// Hardware accessed / dirty bits (EPT with A/D enabled, NPT always); `false` where the
    /// backend has none.
    pub accessed: bool,
    pub dirty: bool,
}

impl Translation {
    /// The host-physical address `gpa` translates to through this leaf.
    pub fn pa_of(&self, gpa: u64) -> u64 {
        self.pa + (gpa - self.gpa)
    }
}

/// How much of the hardware's cached translations a flush must drop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushScope {
    /// Every translation tagged with this table's context (INVEPT single-context,
    /// SVM TLB_CONTROL = flush this ASID).
    Context,
    /// Every context (INVEPT all-context, SVM TLB_CONTROL = flush all).
    All,
}

/// The operations the memory model performs on a second-level translation.
pub trait Stage2 {
    /// Installs `[gpa, gpa + size)` → `[pa, pa + size)` with `perms`. Replaces an existing
    /// leaf of the same size at `gpa` (returning it); any other overlap is `AlreadyExists`.
    fn map(
        &mut self,
        gpa: u64,
        pa: u64,
        size: PageSize,
        perms: S2Perms,
        mem_type: MemType,
    ) -> Result<Option<Translation>, Error>;

    /// Removes every translation in `[gpa, gpa + len)`, splitting large pages that straddle the
    /// range's ends. Returns the number of 4 KiB pages that were mapped and are no longer.
    fn unmap(&mut self, gpa: u64, len: u64) -> Result<u64, Error>;

    /// Sets the permissions of every translation in `[gpa, gpa + len)` to `perms`, splitting
    /// large pages at the range's ends. Returns the number of 4 KiB pages changed.
    fn protect(&mut self, gpa: u64, len: u64, perms: S2Perms) -> Result<u64, Error>;

    /// The leaf translating `gpa`, if any.
    fn query(&self, gpa: u64) -> Option<Translation>;

    /// Drops cached translations: INVEPT / TLB_CONTROL on hardware, nothing where the backend
    /// has no TLB of its own. Clears the pending-flush state.
    fn flush(&mut self, scope: FlushScope);

    /// Whether an operation since the last `flush` removed or downgraded a present entry (so
    /// stale translations may be cached).
    fn flush_pending(&self) -> bool;

    /// Dirty harvest: appends to `dirty`, in ascending order, the guest-physical address of
    /// every installed 4 KiB page in `[gpa, gpa + len)` that was written through this
    /// translation since the last harvest that covered it, and re-arms tracking for the range
    /// (the next write is reported by the next harvest). Returns the number of pages appended.
    ///
    /// Contract every implementation keeps:
    /// - a page installed (or made) writable since the last harvest counts as written (the
    ///   memory model installs writable pages only for writes it already knows about, and this
    ///   keeps the first write free of a tracking fault);
    /// - a write-protect does not hide writes: a page written since the last harvest and
    ///   write-protected since is still reported (once);
    /// - a written large leaf reports every 4 KiB page it maps in the range, or — for a
    ///   backend that tracks large leaves per page — exactly the written ones;
    /// - pages never writable since the last harvest are never reported; holes are not an
    ///   error; a page unmapped since is not reported (the memory model knows it changed);
    /// - a second harvest with no write in between reports nothing;
    /// - re-arming may leave a flush pending (EPT/NPT: cleared dirty bits must be re-fetched
    ///   by the hardware); the caller flushes as after `protect`.
    ///
    /// Backends that cannot track writes keep this default and return `NotSupported`; the
    /// memory model then falls back to dropping private pages on reset.
    fn harvest_dirty(&mut self, gpa: u64, len: u64, dirty: &mut Vec<u64>) -> Result<u64, Error> {
        let _ = (gpa, len, dirty);
        Err(Error::NotSupported)
    }
}
