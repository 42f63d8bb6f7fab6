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
//! - `map_run` installs a run of 4 KiB pages with the overlap rules of `map` applied to each
//!   page; backends that can install a run in one host operation (KVM: one `mmap` per
//!   physically contiguous piece) override it, the rest keep the loop of `map`;
//! - operations never invalidate the hardware TLB themselves: they record that a flush is
//!   pending, and the caller issues one `flush` per logical operation;
//! - `set_write_tracking` only ever changes what `harvest_dirty` reports towards *more*
//!   pages (an untracked page is reported by every harvest), and only writable leaves — which
//!   the memory model installs for private frames only — can be untracked, so no frame shared
//!   copy-on-write ever becomes writable through it.

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

/// Whether a backend tracks the guest's writes to an installed writable page
/// (`Stage2::set_write_tracking`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteTracking {
    /// The default of every installed page: a harvest reports the page only if it was written
    /// since the last harvest, and re-arms tracking (on KVM the next write costs an exit).
    Tracked,
    /// Every harvest reports the page as written and leaves it writable without tracking, so
    /// the guest's writes to it cost nothing (the memory model's copy-back hot set,
    /// `vmo::HotSetPolicy`).
    Untracked,
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

    /// Installs the run of 4 KiB pages `gpa + i·4 KiB` → `pas[i]`, all with `perms` and
    /// `mem_type`. Returns how many of them replaced an existing 4 KiB leaf at the same address
    /// (which leaves a flush pending, as `map` does).
    ///
    /// Contract every implementation keeps:
    /// - the overlap rules of `map`, per page: an existing 4 KiB leaf at a page's address is
    ///   replaced; a large leaf overlapping the run is `AlreadyExists`, checked before anything
    ///   is installed;
    /// - arguments (alignment, ranges, perms, an empty run is `InvalidArgs`) are checked before
    ///   anything is installed;
    /// - a failing host operation installs a prefix: on `Err`, pages `[gpa, gpa + k·4 KiB)`
    ///   for some `k` may be installed (recorded exactly as after `map`, so `query` reports
    ///   them), the rest of the run is unchanged. The memory model only passes frames it holds
    ///   for these pages, so a prefix left installed is a valid translation;
    /// - the default is a loop of `map`; a backend overriding it must be observably the same.
    fn map_run(
        &mut self,
        gpa: u64,
        pas: &[u64],
        perms: S2Perms,
        mem_type: MemType,
    ) -> Result<u64, Error> {
        let len = (pas.len() as u64)
            .checked_mul(crate::PAGE_SIZE)
            .ok_or(Error::OutOfRange)?;
        if pas.is_empty() {
            return Err(Error::InvalidArgs);
        }
        gpa.checked_add(len).ok_or(Error::OutOfRange)?;
        for i in 0..pas.len() as u64 {
            let page = gpa + i * crate::PAGE_SIZE;
            if let Some(t) = self.query(page) {
                if t.size != PageSize::Size4K {
                    return Err(Error::AlreadyExists);
                }
            }
        }
        let mut replaced = 0;
        for (i, &pa) in pas.iter().enumerate() {
            let page = gpa + i as u64 * crate::PAGE_SIZE;
            if self
                .map(page, pa, PageSize::Size4K, perms, mem_type)?
                .is_some()
            {
                replaced += 1;
            }
        }
        Ok(replaced)
    }

    /// Removes every translation in `[gpa, gpa + len)`, splitting large pages that straddle the
    /// range's ends. Returns the number of 4 KiB pages that were mapped and are no longer.
    fn unmap(&mut self, gpa: u64, len: u64) -> Result<u64, Error>;

    /// Sets the permissions of every translation in `[gpa, gpa + len)` to `perms`, splitting
    /// large pages at the range's ends. Returns the number of 4 KiB pages changed, which may
    /// be an upper bound: it is 0 exactly when no page's permissions changed, never more than
    /// `len / 4 KiB`, and exact whenever `perms` grants write. EPT/NPT tables count a subtree
    /// they write-protect at once through an upper-level entry by the pages it spans
    /// (`PageTable::protect`); the KVM backend counts exactly. Callers use the count only as
    /// "something changed" (a flush is then pending) or for statistics.
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

    /// Sets the write tracking of every installed writable leaf in `[gpa, gpa + len)` to
    /// `tracking`; returns the number of 4 KiB pages whose tracking changed.
    ///
    /// Contract every implementation keeps:
    /// - only writable leaves change; read-only leaves and holes are skipped (not an error);
    ///   arguments are checked as for `harvest_dirty`;
    /// - `Untracked`: until it ends, every harvest covering the page reports it as written and
    ///   does not re-arm it; a `protect` that removes its write permission, an `unmap`, or a
    ///   `map` replacing its leaf ends it (the page is then tracked as any other, and the
    ///   write-protect rule of `harvest_dirty` still reports it once);
    /// - `Tracked`: ends `Untracked`; the page counts as written until the next harvest (as
    ///   a page made writable does), so no write made while it was untracked is missed;
    /// - a large leaf the range covers only partly is split (or, by a backend that cannot,
    ///   changed whole: reporting more, never less);
    /// - on `Err`, each page in the range is either still as it was, or changed as asked:
    ///   never tracked with a write missed.
    ///
    /// Backends whose tracking costs the guest nothing (EPT/NPT dirty bits set by the page
    /// walk, no exit) keep this default and return `NotSupported`; the memory model then
    /// keeps every page tracked.
    fn set_write_tracking(
        &mut self,
        gpa: u64,
        len: u64,
        tracking: WriteTracking,
    ) -> Result<u64, Error> {
        let _ = (gpa, len, tracking);
        Err(Error::NotSupported)
    }
}
