//! `Vmar::fork` and `Vmar::reset` / `reset_with`: snapshot a guest's address space into a
//! child that shares every frame copy-on-write, and bring a fork back to its snapshot —
//! dropping the pages it changed (`ResetPolicy::Drop`) or copying the snapshot's bytes back
//! into the pages it wrote (`ResetPolicy::Restore`, through the backend's dirty harvest; with
//! the hot set of `hot.rs`, pages written every iteration are left untracked and reported by
//! every harvest).
//!
//! Policy per mapping:
//! - private mappings: the child maps a snapshot child of the Vmo (one per distinct Vmo, so two
//!   mappings of one Vmo still alias in the child; `SnapshotAtLeastOnWrite` for pager-backed
//!   Vmos). Creating it write-protects the parent's installed entries of that Vmo (the Vmo's
//!   observers do it); the flush is deferred and done once at the end. A backend may defer
//!   the host side of that write-protect as long as no write through the entries can reach
//!   a shared frame before it is applied (the KVM backend applies it before the parent's
//!   next `KVM_RUN` or host write, so a template that only serves forks never pays it);
//! - shared mappings: the child maps the same Vmo (memory shared between parent and child);
//! - DMA mappings (a Vmo with the DMA flag or with pinned pages): the child gets an eager,
//!   private, unpinned copy — a pinned page is never shared copy-on-write, and devices are not
//!   forked: the child's device must assign the copy again.
//!
//! Cost: O(mappings) plus the DMA copies; independent of how much guest memory is committed.
//! The guest's vCPUs must be stopped while forking (as they are at an exit): entries are
//! write-protected before the single flush, so a running vCPU could still write through a
//! stale TLB entry until then.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use ept::Stage2;

use super::map::make_mapping;
use super::tree::MappingInfo;
use super::tree::{Tree, ROOT};
use super::{Counters, Space, Vmar};
use crate::{Error, RestoreStats, Result, Vmo, VmoFlags};

/// Undoes a `defer_flush` increment and flushes once, on every exit path.
struct DeferredFlush<'a, S: Stage2 + Send + 'static>(&'a Space<S>);

impl<'a, S: Stage2 + Send + 'static> DeferredFlush<'a, S> {
    fn new(space: &'a Space<S>) -> Self {
        space.defer_flush.fetch_add(1, Ordering::AcqRel);
        DeferredFlush(space)
    }
}

impl<S: Stage2 + Send + 'static> Drop for DeferredFlush<'_, S> {
    fn drop(&mut self) {
        self.0.defer_flush.fetch_sub(1, Ordering::AcqRel);
        let mut stage2 = self.0.stage2.lock();
        self.0.flush_if_pending(&mut stage2);
    }
}

/// How `Vmar::reset_with` returns private pages to their reset point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetPolicy {
    /// Give the private frames back: the next write to each page copies again (memory
    /// pressure; the state right after a fork).
    Drop,
    /// Keep the private frames installed and writable and copy the reset point's bytes back
    /// into the pages written since the last reset (a child that is reused, as fuzzers and
    /// request servers do).
    Restore,
}

fn is_dma(vmo: &Vmo) -> bool {
    vmo.flags().contains(VmoFlags::DMA) || vmo.has_pins()
}

impl<S: Stage2 + Send + 'static> Vmar<S> {
    /// Forks the whole address space (root handle only) into a child translated by `stage2`
    /// (an empty table). The child's private Vmos get a reset point at the fork.
    pub fn fork(&self, stage2: S) -> Result<Vmar<S>> {
        if self.region != ROOT {
            return Err(Error::NotSupported);
        }
        let tree = self.space.tree.write();
        let root_len = tree.region(ROOT)?.len;
        let _flush = DeferredFlush::new(&self.space);

        let child_space = Arc::new(Space {
            tree: crate::sync::RwLock::new(Tree::new(root_len)),
            stage2: crate::sync::Mutex::new(stage2),
            counters: Counters::default(),
            fault_around: crate::sync::AtomicU64::new(
                self.space.fault_around.load(Ordering::Relaxed),
            ),
            stream_window: crate::sync::AtomicU64::new(
                self.space.stream_window.load(Ordering::Relaxed),
            ),
            last_write: crate::sync::AtomicU64::new(super::NO_PAGE),
            defer_flush: crate::sync::AtomicU32::new(0),
            dirty: crate::sync::Mutex::new(None),
            recording: crate::sync::Mutex::new(None),
            hot: crate::sync::Mutex::new(super::hot::HotSet::new(self.hot_set())),
        });
        let mut child_tree = Tree::new(root_len);
        // Regions: ids grow with creation, so parents come before their children.
        let mut ids = BTreeMap::new();
        ids.insert(ROOT, ROOT);
        for id in tree.region_ids().into_iter().filter(|&id| id != ROOT) {
            let r = tree.region(id)?;
            let parent = r
                .parent
                .and_then(|p| ids.get(&p).copied())
                .ok_or(Error::BadState)?;
            ids.insert(id, child_tree.add_region(parent, r.base, r.len, r.may)?);
        }
        // Mappings: one child Vmo per distinct parent Vmo.
        let mut forked: Vec<(Vmo, Vmo)> = Vec::new();
        for m in tree.mappings.values() {
            let vmo = if m.shared {
                m.vmo.clone()
            } else if let Some((_, c)) = forked.iter().find(|(p, _)| p.same_object(&m.vmo)) {
                c.clone()
            } else {
                let c = if is_dma(&m.vmo) {
                    m.vmo.deep_copy()?
                } else {
                    m.vmo.fork_child()?
                };
                forked.push((m.vmo.clone(), c.clone()));
                c
            };
            let region = *ids.get(&m.region).ok_or(Error::BadState)?;
            let info = MappingInfo {
                vmo,
                ..m.info.clone()
            };
            child_tree.insert_mapping(make_mapping(&child_space, info, region))?;
        }
        child_tree.debug_check();
        *child_space.tree.write() = child_tree;
        // The parent's private entries were write-protected, which ends untracked.
        self.space.hot.lock().forget();
        drop(tree);
        Ok(Vmar {
            space: child_space,
            region: ROOT,
        })
    }

    /// Distinct Vmos of the private mappings.
    fn private_vmos(tree: &Tree<S>) -> Vec<Vmo> {
        let mut out: Vec<Vmo> = Vec::new();
        for m in tree.mappings.values().filter(|m| !m.shared) {
            if !out.iter().any(|v| v.same_object(&m.vmo)) {
                out.push(m.vmo.clone());
            }
        }
        out
    }

    /// Returns every private mapping's Vmo to its reset point (the fork, or the last
    /// `set_reset_point`), dropping only the pages changed since and their translations; one
    /// flush. Returns the number of pages dropped. The same as
    /// `reset_with(ResetPolicy::Drop)`.
    ///
    /// All or nothing: any Vmo without a reset point or with pinned pages → `BadState`, and a
    /// backend failure while dropping translations → that error, in both cases with no Vmo
    /// reset. It does not depend on the rights of the handles the mappings hold (a read-only
    /// handle, e.g. one from `query`, resets like any other): the reset points are this
    /// address space's own, set by `fork` / `set_reset_point`.
    pub fn reset(&self) -> Result<u64> {
        self.reset_with(ResetPolicy::Drop).map(|s| s.dropped)
    }

    /// Returns every private mapping's Vmo to its reset point with `policy`:
    /// - `Drop`: as `reset`;
    /// - `Restore`: harvests the backend's dirty pages over every private mapping
    ///   (`Stage2::harvest_dirty`, which also re-arms tracking), then copies the reset point's
    ///   bytes back into exactly the pages written since the last reset (by the guest, or by
    ///   the model's own `Vmo::write`), keeping those private frames installed and writable;
    ///   pages that cannot be refilled in place (a frame shared with a later fork) go back to
    ///   the reset point's frame. A backend that cannot harvest (`NotSupported`), or a harvest
    ///   that fails part-way (its dirty record is then incomplete), makes this a `Drop` reset,
    ///   which is correct whatever was written. With a hot set (`set_hot_set`), the pages the
    ///   guest wrote in the last resets are then left untracked (`hot.rs`), and the harvest
    ///   reports them at every reset.
    ///
    /// All or nothing, like `reset`; one flush at the end.
    pub fn reset_with(&self, policy: ResetPolicy) -> Result<RestoreStats> {
        if self.region != ROOT {
            return Err(Error::NotSupported);
        }
        let tree = self.space.tree.write();
        tree.region(ROOT)?;
        let _flush = DeferredFlush::new(&self.space);
        if policy == ResetPolicy::Restore {
            let harvested = self.harvest_private(&tree, &mut self.space.hot.lock());
            if let Ok(items) = harvested {
                return Vmo::restore_objects(&items);
            }
        }
        let dropped = Vmo::reset_objects(&Self::private_vmos(&tree))?;
        // Every changed page was dropped, untracked ones included.
        self.space.hot.lock().forget();
        Ok(RestoreStats {
            restored: 0,
            dropped,
        })
    }

    /// Every private mapping's Vmo with the offsets (in that handle) the backend reports as
    /// written since the last harvest; tracking is re-armed, and the hot set `hot` resampled
    /// before and updated after (a failed harvest forgets it: the caller drops).
    fn harvest_private(
        &self,
        tree: &Tree<S>,
        hot: &mut super::hot::HotSet,
    ) -> Result<Vec<(Vmo, Vec<u64>)>> {
        let mut out: Vec<(Vmo, Vec<u64>)> = Vec::new();
        let mut stage2 = self.space.stage2.lock();
        hot.before_harvest(&mut *stage2);
        let mut dirty = Vec::new();
        let mut all = Vec::new();
        for m in tree.mappings.values().filter(|m| !m.shared) {
            dirty.clear();
            if let Err(e) = stage2.harvest_dirty(m.base, m.len, &mut dirty) {
                hot.forget();
                return Err(e.into());
            }
            all.extend_from_slice(&dirty);
            let offsets = dirty.iter().map(|gpa| m.vmo_offset + (gpa - m.base));
            match out.iter_mut().find(|(v, _)| v.same_object(&m.vmo)) {
                Some((_, o)) => o.extend(offsets),
                None => out.push((m.vmo.clone(), offsets.collect())),
            }
        }
        hot.after_harvest(&mut *stage2, &mut all);
        Ok(out)
    }

    /// Makes the current contents of every private mapping the state `reset` returns to
    /// (write-protecting installed entries, one flush).
    pub fn set_reset_point(&self) -> Result<()> {
        if self.region != ROOT {
            return Err(Error::NotSupported);
        }
        let tree = self.space.tree.write();
        tree.region(ROOT)?;
        let _flush = DeferredFlush::new(&self.space);
        // Write-protecting the pages ends untracked (also if this fails part-way).
        self.space.hot.lock().forget();
        for vmo in Self::private_vmos(&tree) {
            vmo.set_reset_point()?;
        }
        Ok(())
    }
}
