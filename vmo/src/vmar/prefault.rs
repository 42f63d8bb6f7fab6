//! `Vmar::prefault`: the fault path over a range, ahead of the guest — what a VMM calls for
//! memory it knows is about to be used (a table the workload builds, a recorded working set).
//!
//! Same checks and the same model operation as `handle_fault` (page_fault.rs), page by page,
//! but the pages that are not installed with enough permission are resolved as runs:
//! `install_run` commits / copies a run under one Vmo lock and installs it with one
//! `Stage2::map_run` per stretch of equal permissions (on KVM: one `mmap` per contiguous frame
//! run). Pages already installed with enough permission are skipped.
//!
//! Invariant: a page installed writable is private to its Vmo (copy-on-write frames are
//! copied first, exactly as a write fault does); writes are recorded by dirty tracking as
//! write faults are. An error may leave the pages before the failing one installed (each a
//! valid translation, as after that many faults).

use core::sync::atomic::Ordering;

use ept::{Access, Stage2};

use super::page_fault::needed;
use super::{Vmar, PAGE_SIZE};
use crate::{Error, FaultAccess, Result};

/// Most pages resolved under one acquisition of a Vmo's page lock.
const RUN_PAGES: u64 = 512;

impl<S: Stage2 + Send + 'static> Vmar<S> {
    /// Resolves every page of `[gpa, gpa + len)` (guest-physical, rounded out to pages; like
    /// `handle_fault`, a handle resolves only pages inside its own region) as a fault with `access` would, in bulk;
    /// returns the number of pages it installed. Errors: InvalidArgs (empty range),
    /// OutOfRange (overflow), NotFound (a page outside this region or every mapping),
    /// AccessDenied (a mapping forbids `access`), and the fault path's own (NoMemory, Io,
    /// Stage2, OutOfRange past a Vmo's end).
    pub fn prefault(&self, gpa: u64, len: u64, access: Access) -> Result<u64> {
        if len == 0 {
            return Err(Error::InvalidArgs);
        }
        let tree = self.space.tree.read();
        let region = tree.region(self.region)?;
        let start = gpa & !(PAGE_SIZE - 1);
        let end = gpa
            .checked_add(len)
            .and_then(|e| e.checked_add(PAGE_SIZE - 1))
            .ok_or(Error::OutOfRange)?
            & !(PAGE_SIZE - 1);
        if start < region.base || end > region.end() {
            return Err(Error::NotFound);
        }
        let (need_vm, need_s2) = needed(access);
        let write = access.contains(Access::WRITE);
        let fa = if write {
            FaultAccess::Write
        } else {
            FaultAccess::Read
        };
        let mut installed = 0;
        let mut page = start;
        while page < end {
            let m = tree.mapping_at(page).ok_or(Error::NotFound)?;
            if !m.perms.contains(need_vm) {
                return Err(Error::AccessDenied);
            }
            let stop = m.end().min(end);
            // Skip what is installed with enough permission; take the run that is not.
            let (first, count) = {
                let stage2 = self.space.stage2.lock();
                let ok = |p: u64| stage2.query(p).is_some_and(|t| t.perms.contains(need_s2));
                while page < stop && ok(page) {
                    page += PAGE_SIZE;
                }
                let first = page;
                while page < stop && !ok(page) && page - first < RUN_PAGES * PAGE_SIZE {
                    page += PAGE_SIZE;
                }
                (first, (page - first) / PAGE_SIZE)
            };
            if count == 0 {
                continue;
            }
            let done = self.install_run(m, first, count, fa)?;
            if done.pages == 0 {
                return Err(Error::BadState);
            }
            // The run may end early: the rest is asked for again (and reports its error).
            page = first + done.pages * PAGE_SIZE;
            installed += done.pages;
            let c = &self.space.counters;
            c.commits.fetch_add(done.commits, Ordering::Relaxed);
            c.copies.fetch_add(done.copies, Ordering::Relaxed);
            c.installs
                .fetch_add(done.pages - done.commits - done.copies, Ordering::Relaxed);
            if write {
                if let Some(dirty) = self.space.dirty.lock().as_mut() {
                    dirty.extend((first..page).step_by(PAGE_SIZE as usize));
                }
            }
        }
        Ok(installed)
    }
}
