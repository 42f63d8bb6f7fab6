//! `Vmar`: a guest-physical address space (and its sub-regions), the mappings of Vmos into it,
//! and the second-level table (`ept::Stage2`) that mirrors those mappings lazily.
//!
//! Structure: one `Space` per guest holds the region tree (`Tree`: sub-VMARs and a flat,
//! ordered map of every mapping keyed by its base address), the `Stage2` backend, and counters.
//! A `Vmar` handle names one region of a space. Operations live one per file: `map`, `unmap`,
//! `protect`, `region` (allocate/destroy/query), `fork` (fork and reset), `page_fault` (the single
//! fault path every backend calls) with `large_leaf` (its 2 MiB step), `prefault` (that path over a range, in bulk), `record` (working-set recording and prefetch), `io` (the model's own reads and writes by guest-physical
//! address), `dirty` (KVM-style dirty tracking), `hot` (the copy-back reset's adaptive hot
//! set of untracked pages).
//!
//! Invariants:
//! - mappings never overlap, and each lies inside exactly one live region;
//! - every installed second-level entry lies inside a mapping, translates to a frame the mapped
//!   Vmo holds at that offset, and has at most the mapping's permissions; write permission is
//!   installed only for frames private to the Vmo (copy-on-write frames are read-only);
//! - lock order: tree lock → Vmo page lock → Vmo observer lock → stage2 lock, and tree lock →
//!   hot-set lock → stage2 lock. Vmo observers (`observer.rs`) only ever take the stage2
//!   lock; the hot-set lock is taken only with the tree lock held for writing (reset, fork,
//!   `set_reset_point`, `set_hot_set`) and only ever before the stage2 lock;
//! - each Vmar operation flushes the second-level TLB at most once, at its end; `fork`
//!   write-protects the parent's writable entries and flushes once.
//!
//! Addresses: `map`/`unmap`/`protect`/`allocate` take offsets relative to the handle's region
//! (Zircon's convention); the root region starts at guest-physical 0, so there they are GPAs.
//! Lengths are rounded up to whole pages (as Zircon's vmar_map/unmap/protect do).

mod dirty;
mod fork;
mod hot;
mod io;
mod large_leaf;
mod map;
mod observer;
mod page_fault;
mod prefault;
mod protect;
mod record;
mod region;
mod tree;
mod unmap;

use alloc::sync::Arc;
use core::sync::atomic::{AtomicU64, Ordering};

use ept::{FlushScope, S2Perms, Stage2};

use crate::{Error, Result, PAGE_SIZE};
pub use fork::ResetPolicy;
pub use hot::{HotSetPolicy, HotSetStats};
pub use map::{MapOptions, Placement};
pub use page_fault::{FaultOutcome, Resolution};
pub use record::WorkingSet;
pub use tree::MappingInfo;
use tree::{RegionId, Tree};

bitflags::bitflags! {
    /// Permissions of a mapping (READ/WRITE/EXEC) and of a region (MAY_*: the most any
    /// mapping inside it may have).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct VmPerms: u32 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const EXEC = 1 << 2;
        const MAY_READ = 1 << 3;
        const MAY_WRITE = 1 << 4;
        const MAY_EXEC = 1 << 5;
        const RW = Self::READ.bits() | Self::WRITE.bits();
        const RWX = Self::READ.bits() | Self::WRITE.bits() | Self::EXEC.bits();
        const MAY_ALL = Self::MAY_READ.bits() | Self::MAY_WRITE.bits() | Self::MAY_EXEC.bits();
    }
}

impl VmPerms {
    /// The access bits (READ/WRITE/EXEC) only.
    pub fn access(self) -> VmPerms {
        self & VmPerms::RWX
    }

    /// The MAY_* bits turned into the access bits they allow.
    pub fn allowed(self) -> VmPerms {
        VmPerms::from_bits_truncate((self & VmPerms::MAY_ALL).bits() >> 3)
    }

    /// The MAY_* bits matching these access bits.
    pub fn as_may(self) -> VmPerms {
        VmPerms::from_bits_truncate(self.access().bits() << 3)
    }

    /// Requested access bits are well formed (WRITE and EXEC each need READ) and allowed by
    /// `limit`'s MAY_* bits.
    pub fn check(self, limit: VmPerms) -> Result<()> {
        let req = self.access();
        if req.intersects(VmPerms::WRITE | VmPerms::EXEC) && !req.contains(VmPerms::READ) {
            return Err(Error::InvalidArgs);
        }
        if !limit.allowed().contains(req) {
            return Err(Error::AccessDenied);
        }
        Ok(())
    }

    pub(crate) fn to_stage2(self) -> S2Perms {
        let mut p = S2Perms::empty();
        if self.contains(VmPerms::READ) {
            p |= S2Perms::READ;
        }
        if self.contains(VmPerms::WRITE) {
            p |= S2Perms::WRITE;
        }
        if self.contains(VmPerms::EXEC) {
            p |= S2Perms::EXEC;
        }
        p
    }
}

/// Counters of one address space's fault path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    pub faults: u64,
    /// Faults already resolved by another thread (flush only).
    pub spurious: u64,
    /// Pages committed by the fault path or by `Vmar::write` (zero-filled or from a pager).
    pub commits: u64,
    /// Shared frames copied on a write fault or by `Vmar::write`.
    pub copies: u64,
    /// Shared frames made writable without a copy (the writer held the last reference).
    pub upgrades: u64,
    /// Frames already committed and merely installed.
    pub installs: u64,
    /// Extra pages installed by fault-around.
    pub fault_around: u64,
    /// Faults refused (outside every mapping, or without permission).
    pub refused: u64,
    /// Faults resolved with one 2 MiB leaf (a physically contiguous Vmo, `large_leaf.rs`).
    pub large_leaves: u64,
}

#[derive(Default)]
struct Counters {
    faults: AtomicU64,
    spurious: AtomicU64,
    commits: AtomicU64,
    copies: AtomicU64,
    upgrades: AtomicU64,
    installs: AtomicU64,
    fault_around: AtomicU64,
    refused: AtomicU64,
    large_leaves: AtomicU64,
}

/// One guest's address space.
pub(crate) struct Space<S: Stage2 + Send + 'static> {
    tree: crate::sync::RwLock<Tree<S>>,
    stage2: crate::sync::Mutex<S>,
    counters: Counters,
    /// Pages a fault may install: the faulting one plus committed neighbours after it (see
    /// `page_fault.rs`); 1..=MAX_FAULT_AROUND.
    fault_around: crate::sync::AtomicU64,
    /// Streaming fault-around window in pages (0 = off, at most MAX_FAULT_AROUND).
    stream_window: crate::sync::AtomicU64,
    /// Page of the last resolved write fault (`NO_PAGE` after any other fault): streaming
    /// starts when a write fault follows one on the page before.
    last_write: crate::sync::AtomicU64,
    /// While non-zero, observers leave flushes pending for the operation in progress to do once.
    defer_flush: crate::sync::AtomicU32,
    dirty: crate::sync::Mutex<Option<alloc::collections::BTreeSet<u64>>>,
    /// The working set being recorded (`record.rs`), if recording is on.
    recording: crate::sync::Mutex<Option<WorkingSet>>,
    /// The copy-back reset's hot set (`hot.rs`).
    hot: crate::sync::Mutex<hot::HotSet>,
}

impl<S: Stage2 + Send + 'static> Space<S> {
    /// Removes every translation in `[gpa, gpa + len)` and flushes once (unless deferred).
    /// On a backend error, what it did remove is flushed too and the error returned.
    pub(crate) fn unmap_range(&self, gpa: u64, len: u64) -> Result<()> {
        let mut stage2 = self.stage2.lock();
        let result = stage2.unmap(gpa, len);
        self.flush_if_pending(&mut stage2);
        result.map(drop).map_err(Error::from)
    }

    /// Flushes if an operation left stale translations behind (and nobody defers it).
    pub(crate) fn flush_if_pending(&self, stage2: &mut S) {
        if self.defer_flush.load(Ordering::Acquire) == 0 && stage2.flush_pending() {
            stage2.flush(FlushScope::Context);
        }
    }
}

/// A handle to a region of a guest-physical address space.
pub struct Vmar<S: Stage2 + Send + 'static> {
    space: Arc<Space<S>>,
    region: RegionId,
}

impl<S: Stage2 + Send + 'static> core::fmt::Debug for Vmar<S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Vmar")
            .field("region", &self.region)
            .field("range", &self.range().ok())
            .finish()
    }
}

impl<S: Stage2 + Send + 'static> Clone for Vmar<S> {
    fn clone(&self) -> Self {
        Vmar {
            space: self.space.clone(),
            region: self.region,
        }
    }
}

/// Default number of pages one fault may install (fault-around).
pub const DEFAULT_FAULT_AROUND: u64 = 16;
/// Most pages one fault may install (either fault-around knob is clamped to it): one page
/// table's worth, so a fault's work stays bounded and its arithmetic cannot overflow.
pub const MAX_FAULT_AROUND: u64 = 512;
/// `Space::last_write` when the last fault was not a write.
pub(crate) const NO_PAGE: u64 = u64::MAX;

impl<S: Stage2 + Send + 'static> Vmar<S> {
    /// A root region covering guest-physical `[0, size)` (page aligned, non-zero, below
    /// 2^48), translated by `stage2` (which must be empty). The root may hold any permission.
    pub fn new_root(size: u64, stage2: S) -> Result<Self> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidArgs);
        }
        if size > ept::GPA_LIMIT {
            return Err(Error::OutOfRange);
        }
        let space = Space {
            tree: crate::sync::RwLock::new(Tree::new(size)),
            stage2: crate::sync::Mutex::new(stage2),
            counters: Counters::default(),
            fault_around: crate::sync::AtomicU64::new(DEFAULT_FAULT_AROUND),
            stream_window: crate::sync::AtomicU64::new(0),
            last_write: crate::sync::AtomicU64::new(NO_PAGE),
            defer_flush: crate::sync::AtomicU32::new(0),
            dirty: crate::sync::Mutex::new(None),
            recording: crate::sync::Mutex::new(None),
            hot: crate::sync::Mutex::new(hot::HotSet::new(None)),
        };
        Ok(Vmar {
            space: Arc::new(space),
            region: tree::ROOT,
        })
    }

    /// Base guest-physical address and length of this region.
    pub fn range(&self) -> Result<(u64, u64)> {
        let tree = self.space.tree.read();
        let r = tree.region(self.region)?;
        Ok((r.base, r.len))
    }

    /// The MAY_* permissions of this region.
    pub fn may(&self) -> Result<VmPerms> {
        Ok(self.space.tree.read().region(self.region)?.may)
    }

    /// Runs `f` on the second-level table (e.g. to read the EPTP / nCR3, or inspect entries).
    pub fn with_stage2<R>(&self, f: impl FnOnce(&mut S) -> R) -> R {
        f(&mut self.space.stage2.lock())
    }

    pub fn fault_stats(&self) -> FaultStats {
        let c = &self.space.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultStats {
            faults: l(&c.faults),
            spurious: l(&c.spurious),
            commits: l(&c.commits),
            copies: l(&c.copies),
            upgrades: l(&c.upgrades),
            installs: l(&c.installs),
            fault_around: l(&c.fault_around),
            refused: l(&c.refused),
            large_leaves: l(&c.large_leaves),
        }
    }

    /// Pages one fault may install, counting the faulting page (default 16; 1 turns
    /// fault-around off; clamped to `1..=MAX_FAULT_AROUND`). Applies to the whole space.
    pub fn set_fault_around(&self, pages: u64) {
        self.space
            .fault_around
            .store(pages.clamp(1, MAX_FAULT_AROUND), Ordering::Relaxed);
    }

    /// Streaming fault-around window (pages; 0 = off, the default; clamped to
    /// `MAX_FAULT_AROUND`). When a write fault on a not-present page commits a fresh page and
    /// the previous fault of this space was a write to the page before it, the fault path also
    /// commits and installs writable up to `pages` following pages of the same mapping,
    /// stopping at the first one that is already installed, is not empty in the Vmo (so a fork
    /// never copies a shared page it did not write), or fails. Off while dirty tracking is on.
    /// Applies to the whole space; forks inherit it.
    pub fn set_stream_fault_around(&self, pages: u64) {
        self.space
            .stream_window
            .store(pages.min(MAX_FAULT_AROUND), Ordering::Relaxed);
    }

    /// Checks the invariants of this address space's region tree (`tree.rs`) and that every
    /// installed translation inside a mapping translates to the frame the Vmo holds there,
    /// with at most the mapping's perms. Meant for quiescent points (tests): O(regions +
    /// mapped pages). The tree part runs in debug builds after every tree change.
    pub fn check_invariants(&self) -> core::result::Result<(), alloc::string::String> {
        let tree = self.space.tree.read();
        tree.check_invariants()?;
        for m in tree.mappings.values() {
            let allowed = m.perms.to_stage2();
            let vmo = m.vmo.restricted(crate::Rights::READ);
            for i in 0..m.len / PAGE_SIZE {
                let gpa = m.base + i * PAGE_SIZE;
                // Lock order: the Vmo's page lock before (not inside) the stage2 lock.
                let frame = vmo.committed_frame(m.vmo_offset + i * PAGE_SIZE);
                let Some(t) = self.space.stage2.lock().query(gpa) else {
                    continue;
                };
                if !allowed.contains(t.perms) {
                    return Err(alloc::format!(
                        "{gpa:#x}: installed {:?} beyond the mapping's {:?}",
                        t.perms,
                        m.perms
                    ));
                }
                match frame {
                    Ok(Some(f)) if f.paddr() == t.pa_of(gpa) => {}
                    other => {
                        return Err(alloc::format!(
                            "{gpa:#x}: translates to {:#x}, the Vmo holds {other:?}",
                            t.pa_of(gpa)
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether two handles name the same address space.
    pub fn same_space(&self, other: &Vmar<S>) -> bool {
        Arc::ptr_eq(&self.space, &other.space)
    }
}

/// `[offset, offset + len)` relative to a region of `region_len`, with `len` rounded up to pages.
/// Returns `(start, end)` relative offsets. Zero length or a misaligned offset → InvalidArgs;
/// arithmetic overflow → OutOfRange; a range leaving the region → InvalidArgs (as Zircon).
pub(crate) fn checked_range(offset: u64, len: u64, region_len: u64) -> Result<(u64, u64)> {
    if len == 0 || !offset.is_multiple_of(PAGE_SIZE) {
        return Err(Error::InvalidArgs);
    }
    let len = len.checked_add(PAGE_SIZE - 1).ok_or(Error::OutOfRange)? & !(PAGE_SIZE - 1);
    let end = offset.checked_add(len).ok_or(Error::OutOfRange)?;
    if end > region_len {
        return Err(Error::InvalidArgs);
    }
    Ok((offset, end))
}
