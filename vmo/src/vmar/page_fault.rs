//! `Vmar::handle_fault`: the one function every second-level fault goes through — an EPT
//! violation (hv, VT-x), a nested page fault (hv, SVM), a userfaultfd event (guest-vm, KVM), or a
//! device / VMM access from the host side.
//!
//! Steps (DESIGN.md): 1 find the mapping (none → NotFound); 2 check its perms (AccessDenied);
//! 3 an entry already present with enough permission means another thread resolved it: flush,
//! done; 4/5 ask the Vmo for the page — committing it (zero or pager), copying a shared frame
//! on a write, or upgrading in place when this Vmo holds the last reference; 6 install it
//! through `Stage2` while the Vmo's page lock is held, and flush if an entry changed.
//!
//! Fault-around, one policy with two knobs, both clamped to `MAX_FAULT_AROUND` pages, each
//! installing its pages as one run (`install_run`: one Vmo lock, one `Stage2::map_run` per
//! stretch of equal permissions):
//! - `fault_around` (default 16): after any fault, the pages following it in the mapping (up
//!   to that many, counting the faulting one) before the first one already installed — for a
//!   read fault committed ones (read-only unless private) and, on a pager-backed mapping,
//!   uncommitted ones committed (read-ahead); for a write fault only private committed ones;
//! - `stream_window` (default 0 = off): a write fault on a not-present page that committed a
//!   fresh page, right after a write fault on the page before, also commits and installs
//!   writable up to that many following pages, stopping at the first already installed, not
//!   empty in the Vmo (a shared frame is never copied speculatively) or failing. Off while
//!   dirty tracking is on (a speculative page would be writable without ever being recorded).
//!
//! Before the 4 KiB install, a fault on a not-present page of a physically contiguous Vmo tries
//! to install its whole 2 MiB block as one leaf (`large_leaf.rs`, with the conditions there).
//!
//! While working-set recording is on (`record.rs`), the pages a resolved fault installed are
//! noted there.
//!
//! A handle resolves only faults inside its own region (a sub-VMAR's handle: its range, and
//! `BadState` once destroyed, as every other operation on it), so the root handle is the one a
//! backend's fault loop holds.
//!
//! Invariant: an error return installs nothing and changes nothing; a guest-caused error never
//! panics (fault-around arithmetic saturates). Write permission is installed only for frames
//! private to the Vmo.

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use ept::{Access, FaultInfo, FaultKind, MemType, PageSize, S2Perms, Stage2};

use super::tree::Mapping;
use super::{VmPerms, Vmar, PAGE_SIZE};
use crate::{Error, FaultAccess, Result};

/// What the fault path did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// Already resolved (another vCPU got there first): only a flush.
    Spurious,
    /// A new page was committed (zero-filled or from the pager) and installed.
    Committed,
    /// A shared frame was copied for a write.
    Copied,
    /// A read-only entry became writable without a copy.
    Upgraded,
    /// An already committed frame was installed.
    Installed,
}

/// The result of `handle_fault`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// Guest-physical page that faulted.
    pub gpa: u64,
    /// Frame now translating it.
    pub pa: u64,
    /// Permissions installed.
    pub perms: S2Perms,
    pub outcome: FaultOutcome,
    /// Pages installed, including fault-around.
    pub pages: u64,
}

pub(super) fn needed(access: Access) -> (VmPerms, S2Perms) {
    let mut vm = VmPerms::empty();
    let mut s2 = S2Perms::empty();
    if access.contains(Access::READ) {
        vm |= VmPerms::READ;
        s2 |= S2Perms::READ;
    }
    if access.contains(Access::WRITE) {
        vm |= VmPerms::WRITE;
        s2 |= S2Perms::WRITE;
    }
    if access.contains(Access::EXEC) {
        vm |= VmPerms::EXEC;
        s2 |= S2Perms::EXEC;
    }
    if vm.is_empty() {
        vm = VmPerms::READ;
        s2 = S2Perms::READ;
    }
    (vm, s2)
}

impl<S: Stage2 + Send + 'static> Vmar<S> {
    /// Resolves a second-level fault (see the module doc). Errors: NotFound (no mapping, or
    /// outside this handle's region), AccessDenied (the mapping forbids the access),
    /// OutOfRange (past the end of a Vmo mapped with `allow_faults`), NoMemory, Io (pager),
    /// BadState (this handle's region — the root too — was destroyed), Stage2 (the backend).
    pub fn handle_fault(&self, fault: FaultInfo) -> Result<Resolution> {
        let c = &self.space.counters;
        c.faults.fetch_add(1, Ordering::Relaxed);
        let result = self.resolve(fault);
        if matches!(
            result,
            Err(Error::NotFound | Error::AccessDenied | Error::OutOfRange)
        ) {
            c.refused.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn resolve(&self, fault: FaultInfo) -> Result<Resolution> {
        let page = fault.gpa & !(PAGE_SIZE - 1);
        let tree = self.space.tree.read();
        let region = tree.region(self.region)?;
        if page < region.base || page >= region.end() {
            return Err(Error::NotFound);
        }
        let m = tree.mapping_at(page).ok_or(Error::NotFound)?;
        let (need_vm, need_s2) = needed(fault.access);
        if !m.perms.contains(need_vm) {
            return Err(Error::AccessDenied);
        }
        let write = fault.access.contains(Access::WRITE);
        let present = {
            let mut stage2 = self.space.stage2.lock();
            match stage2.query(page) {
                Some(t) if t.perms.contains(need_s2) => {
                    stage2.flush(ept::FlushScope::Context);
                    self.space.counters.spurious.fetch_add(1, Ordering::Relaxed);
                    return Ok(Resolution {
                        gpa: page,
                        pa: t.pa_of(page),
                        perms: t.perms,
                        outcome: FaultOutcome::Spurious,
                        pages: 0,
                    });
                }
                present => present.is_some(),
            }
        };
        let access = if write {
            FaultAccess::Write
        } else {
            FaultAccess::Read
        };
        let large = if present {
            None
        } else {
            self.install_large(m, page, access)?
        };
        let (pa, perms, origin) = match large {
            Some(installed) => installed,
            None => self.install(m, page, access)?.ok_or(Error::BadState)?,
        };
        let c = &self.space.counters;
        let outcome = if origin.copied {
            c.copies.fetch_add(1, Ordering::Relaxed);
            FaultOutcome::Copied
        } else if origin.committed {
            c.commits.fetch_add(1, Ordering::Relaxed);
            FaultOutcome::Committed
        } else if write && present {
            c.upgrades.fetch_add(1, Ordering::Relaxed);
            m.vmo.pool().count_upgrade();
            FaultOutcome::Upgraded
        } else {
            c.installs.fetch_add(1, Ordering::Relaxed);
            FaultOutcome::Installed
        };
        if write {
            if let Some(dirty) = self.space.dirty.lock().as_mut() {
                dirty.insert(page);
            }
        }
        if large.is_some() {
            // One 2 MiB leaf: no streaming or fault-around beyond it; recording notes the
            // faulting page only.
            self.space
                .last_write
                .store(super::NO_PAGE, Ordering::Relaxed);
            self.record_fault(page, u64::from(write), 1, write);
            return Ok(Resolution {
                gpa: page,
                pa,
                perms,
                outcome,
                pages: PageSize::Size2M.bytes() / PAGE_SIZE,
            });
        }
        let streamed = if write
            && fault.kind == FaultKind::NotPresent
            && outcome == FaultOutcome::Committed
            && page.checked_sub(PAGE_SIZE) == Some(self.space.last_write.load(Ordering::Relaxed))
        {
            self.stream(m, page)
        } else {
            0
        };
        let last = if write {
            page + streamed * PAGE_SIZE
        } else {
            super::NO_PAGE
        };
        self.space.last_write.store(last, Ordering::Relaxed);
        let pages = 1 + streamed + self.fault_around(m, page + streamed * PAGE_SIZE, write);
        self.record_fault(page, 1 + streamed, pages, write);
        Ok(Resolution {
            gpa: page,
            pa,
            perms,
            outcome,
            pages,
        })
    }

    /// Makes the page at `page` present in the Vmo (as `access` asks) and installs it; returns
    /// frame, perms and origin, or `None` when `ReadIfCommitted` found nothing to install.
    fn install(
        &self,
        m: &Mapping<S>,
        page: u64,
        access: FaultAccess,
    ) -> Result<Option<(u64, S2Perms, crate::PageOrigin)>> {
        let full = m.perms.to_stage2();
        m.vmo
            .fault_page(m.vmo_page(page), access, |frame, writable, origin| {
                let perms = if writable {
                    full
                } else {
                    full - S2Perms::WRITE
                };
                let mut stage2 = self.space.stage2.lock();
                stage2.map(
                    page,
                    frame.paddr(),
                    PageSize::Size4K,
                    perms,
                    MemType::WriteBack,
                )?;
                self.space.flush_if_pending(&mut stage2);
                Ok((frame.paddr(), perms, origin))
            })
    }

    /// Makes the run of `count` pages from `first` (inside `m`) present in the Vmo as
    /// `access` asks and installs it with one `Stage2::map_run` per stretch of equal
    /// permissions, all under one acquisition of the Vmo's page lock (`Vmo::fault_pages`: the
    /// run may end early). Returns what was installed; an error may leave a prefix of the run
    /// installed (valid translations of frames the Vmo holds, as `map_run` documents).
    pub(super) fn install_run(
        &self,
        m: &Mapping<S>,
        first: u64,
        count: u64,
        access: FaultAccess,
    ) -> Result<RunDone> {
        let full = m.perms.to_stage2();
        let done = m.vmo.fault_pages(m.vmo_page(first), count, access, |run| {
            let mut stage2 = self.space.stage2.lock();
            let mut pas = Vec::with_capacity(run.len());
            let mut result = Ok(0);
            let mut i = 0;
            while i < run.len() && result.is_ok() {
                let writable = run[i].writable;
                pas.clear();
                let mut j = i;
                while j < run.len() && run[j].writable == writable {
                    pas.push(run[j].frame.paddr());
                    j += 1;
                }
                let perms = if writable {
                    full
                } else {
                    full - S2Perms::WRITE
                };
                let gpa = first + i as u64 * PAGE_SIZE;
                result = stage2.map_run(gpa, &pas, perms, MemType::WriteBack);
                i = j;
            }
            self.space.flush_if_pending(&mut stage2);
            result?;
            let mut done = RunDone {
                pages: run.len() as u64,
                ..RunDone::default()
            };
            for p in run {
                done.commits += u64::from(p.origin.committed && !p.origin.copied);
                done.copies += u64::from(p.origin.copied);
            }
            Ok(done)
        })?;
        Ok(done.unwrap_or_default())
    }

    /// Pages from `first` up to `end` (exclusive) before the first one already installed.
    fn not_installed(&self, first: u64, end: u64) -> u64 {
        let stage2 = self.space.stage2.lock();
        let mut n = 0;
        let mut p = first;
        while p < end && stage2.query(p).is_none() {
            n += 1;
            p += PAGE_SIZE;
        }
        n
    }

    /// Fault-around: installs, as one run, the pages after `page` inside the mapping (up to
    /// `fault_around - 1`) before the first one already installed, so a guest streaming
    /// through memory pays one exit per run instead of one per page. A read fault installs
    /// committed pages (read-only unless private to the Vmo) and, on a pager-backed mapping,
    /// commits uncommitted ones (read-ahead); a write fault installs only private committed
    /// pages (a read-only neighbour would cost the writer another fault to upgrade). Never
    /// commits anonymous memory the guest has not touched. Stops at the first page it must
    /// skip or that fails (the fault itself is already resolved).
    fn fault_around(&self, m: &Mapping<S>, page: u64, write: bool) -> u64 {
        let n = self
            .space
            .fault_around
            .load(Ordering::Relaxed)
            .min(super::MAX_FAULT_AROUND);
        if n <= 1 {
            return 0;
        }
        let access = if write {
            FaultAccess::ReadIfPrivate
        } else if m.vmo.is_pager_backed() {
            FaultAccess::Read
        } else {
            FaultAccess::ReadIfCommitted
        };
        let vmo_end = m.base + m.vmo.size().saturating_sub(m.vmo_offset);
        let end = m
            .end()
            .min(vmo_end)
            .min(page.saturating_add(n.saturating_mul(PAGE_SIZE)));
        let first = page + PAGE_SIZE;
        let count = self.not_installed(first, end);
        if count == 0 {
            return 0;
        }
        let installed = self
            .install_run(m, first, count, access)
            .map_or(0, |d| d.pages);
        self.space
            .counters
            .fault_around
            .fetch_add(installed, Ordering::Relaxed);
        installed
    }

    /// Streaming fault-around (module doc): commits and installs writable, as one run, up to
    /// `stream_window` pages after `page` inside `m`; returns how many.
    fn stream(&self, m: &Mapping<S>, page: u64) -> u64 {
        let window = self
            .space
            .stream_window
            .load(Ordering::Relaxed)
            .min(super::MAX_FAULT_AROUND);
        if window == 0 || self.space.dirty.lock().is_some() {
            return 0;
        }
        let vmo_end = m.base + m.vmo.size().saturating_sub(m.vmo_offset);
        let end = m
            .end()
            .min(vmo_end)
            .min(page.saturating_add(window.saturating_mul(PAGE_SIZE).saturating_add(PAGE_SIZE)));
        let first = page + PAGE_SIZE;
        let count = self.not_installed(first, end);
        if count == 0 {
            return 0;
        }
        let streamed = self
            .install_run(m, first, count, FaultAccess::WriteIfUncommitted)
            .map_or(0, |d| d.pages);
        let c = &self.space.counters;
        c.commits.fetch_add(streamed, Ordering::Relaxed);
        c.fault_around.fetch_add(streamed, Ordering::Relaxed);
        streamed
    }
}

/// What `install_run` installed.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct RunDone {
    pub pages: u64,
    /// Pages committed fresh (zero or pager) / copied from a shared frame.
    pub commits: u64,
    pub copies: u64,
}
