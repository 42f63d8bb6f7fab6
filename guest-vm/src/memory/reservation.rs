//! `Reservation`: the host range behind one KVM memslot, and the two userfaultfds watching it.
//!
//! The range is an anonymous `PROT_READ|PROT_WRITE` `MAP_PRIVATE|MAP_NORESERVE` mapping (not
//! PROT_NONE: a PROT_NONE page fails KVM's permission check before userfaultfd sees it,
//! KVM-FAULTS.md Q9), registered with userfaultfd MISSING, so every first touch of a page — by
//! the guest, by KVM's own page walk, or by the VMM — becomes a userfaultfd event with its
//! address.
//!
//! Two descriptors (PERF-FACTS.md "Dirty tracking", and its hazard):
//! - `uffd`, synchronous (`Flavor::Sync`, served by the fault thread): MISSING on anonymous
//!   pieces, WP on **read-only** frame installs — a write to one (a shared copy-on-write frame)
//!   must reach the memory model as an event;
//! - `tracker`, async write-protect (`Flavor::AsyncWp`, never read: it produces no events): WP
//!   on **writable** frame installs only. Write-protecting a page there (`arm`) makes the next
//!   write to it a kernel-resolved fault that `PAGEMAP_SCAN` (`harvest_written`) reports and
//!   re-arms; this is the dirty tracking of `KvmStage2::harvest_dirty`. Writes through the
//!   frame pool's own mapping of the memfd are not seen (another VMA).
//!
//! This file is the one writer of the memslot's host range: installing a frame
//! (`install_frame`, for `KvmStage2`), moving an installed range between read-only and
//! writable (`make_read_only` / `make_writable`), the deferred write-protect of a fork
//! (`defer_read_only`, applied by `seal` / `seal_range`), write tracking (`arm`,
//! `harvest_written`, `disarm`),
//! putting an anonymous piece back (`restore`), and poisoning a page after a refused fault
//! (`poison` / `unpoison`, for the fault thread). Addresses are typed: the guest side speaks
//! [`Gpa`], the host side [`Hva`], frames [`MemfdOffset`].
//!
//! Invariants:
//! - the mapping lives exactly as long as this value (unmapped on drop); every piece of it is
//!   either an anonymous MISSING-registered piece on `uffd`, a read-only frame install
//!   (registered WP on `uffd`, write-protected), a writable frame install (registered WP on
//!   `tracker`, write-protected or not), or a poisoned page (`poison`) until `unpoison` or
//!   until an install or restore re-maps it (`poisoned` lists exactly those pages);
//! - **no frame installed read-only is ever on `tracker`, and no instant exists in which one
//!   is writable without `uffd`'s write protection**: every step that could expose one does
//!   it behind `PROT_READ` (a write in that window fails loudly, it never lands): a read-only
//!   install is mapped `PROT_READ`, registered and write-protected on `uffd`, then opened to
//!   `PROT_READ|PROT_WRITE`; `make_read_only` closes the range (`PROT_READ`) before it leaves
//!   `tracker` (unregistering clears write protection) and opens it only once `uffd` protects
//!   it. Writable installs hold private frames, so their short untracked window (mapped, not
//!   yet registered) only costs tracking, which `KvmStage2` covers by counting a page
//!   installed or made writable as written;
//! - **the one exception is a deferred write-protect** (`defer_read_only`, what a fork's
//!   write-protect of the parent does; moving 1 GiB costs two kernel page-table walks, ≈ 60
//!   ms here, paid only if the parent is written again): the range stays a writable install on
//!   `tracker` while the memory model already counts it read-only over frames it shares with a
//!   child. It is sound because **nothing writes through this mapping without calling `seal`
//!   (or `seal_range` over what it writes) first**, which moves the deferred ranges to `uffd`
//!   before returning: `GuestVm::run` before every `KVM_RUN` (the guest and KVM's own accesses
//!   happen only inside it), the VMM's memslot writes (`write_slot`) and the vm-memory view
//!   (`guest_memory`). The memory model never writes through this mapping (it writes frames
//!   through the pool's own mapping, copying a shared one first), the fault thread only
//!   installs, and a fork requires the parent's vCPU stopped. `seal` holds the `deferred` lock
//!   while it moves, and every host operation that re-maps a piece (install, restore) takes it
//!   and forgets the deferred pieces it covers, so the two never interleave; a range being
//!   sealed is not closed first (nothing can write it meanwhile). A `seal` that fails keeps
//!   the ranges it could not move deferred and returns the error, and the writer does not
//!   write. Writers outside this crate that use `hva()` / `host_mapping()` directly must call
//!   `seal` first too;
//! - anonymous pieces never hold data: a MISSING fault is only ever answered by installing a
//!   frame over the page (never by `UFFDIO_COPY`/zeropage into the anonymous piece);
//! - guest memory is never borrowed as a Rust reference: it is reached through system calls
//!   (`process_vm_readv/writev`), volatile accessors (vm-memory) and KVM, which is what makes
//!   replacing pieces of the mapping sound.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::addr::{Gpa, Hva, MemfdOffset};
use crate::error::{Error, Result};
use crate::memory::ranges::RangeSet;
use crate::sys::mmap::{Backing, MapFlags, Mmap, Prot};
use crate::sys::pagemap::Pagemap;
use crate::sys::uffd::{Protection, RegisterMode, Uffd, Wake};
use ept::PAGE_SIZE;

/// The host range of one memslot; shared (`Arc`) by the Stage2 backend, the fault thread and
/// the VM.
#[derive(Debug)]
pub struct Reservation {
    map: Mmap,
    gpa_base: Gpa,
    uffd: Arc<Uffd>,
    tracker: Uffd,
    pagemap: Pagemap,
    /// Pages (host addresses) `poison` made unusable and nothing has re-mapped since: only
    /// these does `unpoison` touch.
    poisoned: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// Deferred write-protects (guest-physical ranges): writable installs on `tracker` that
    /// the memory model already counts read-only, moved to `uffd` by `seal` before any write
    /// through this mapping (module invariants). Held across every host operation that
    /// re-maps a piece, so `seal` never races an install.
    deferred: Mutex<RangeSet>,
    /// `deferred` is non-empty (the writers' fast path: one load when nothing is deferred).
    has_deferred: AtomicBool,
    seal_stats: SealCounters,
}

/// What the deferred write-protect did, for benchmarks and tests (`Reservation::seal_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SealStats {
    /// Pages whose write-protect was deferred (`defer_read_only`), counted once per deferral.
    pub deferred_pages: u64,
    /// Pages `seal` moved to the synchronous descriptor (the write-protect actually paid).
    pub sealed_pages: u64,
    /// `seal` / `seal_range` calls that found something to move.
    pub seals: u64,
    /// Deferred pages dropped without a move because an install or restore re-mapped them.
    pub dropped_pages: u64,
    /// Pages deferred now (not sealed, not re-mapped).
    pub pending_pages: u64,
}

#[derive(Debug, Default)]
struct SealCounters {
    deferred: AtomicU64,
    sealed: AtomicU64,
    seals: AtomicU64,
    dropped: AtomicU64,
}

/// Whether a move to read-only must close the range first (`Window::Closed`: another thread
/// may write it meanwhile) or may leave it open (`Window::Quiescent`: a deferred range under
/// the `deferred` lock, which no writer reaches before `seal` returns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Window {
    Closed,
    Quiescent,
}

/// How a frame is installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Install {
    /// Read-write, on the tracker, not armed.
    Writable,
    /// Read-only: write-protected on the synchronous descriptor.
    ReadOnly,
}

/// A move between read-only and writable that failed: the error, and what the range is now
/// (`Writable`: back on the tracker and unarmed; `ReadOnly`: not writable through this
/// mapping — write-protected on `uffd`, or `PROT_READ` where a rollback failed too).
#[derive(Debug)]
pub(crate) struct MoveError {
    pub error: Error,
    pub now: Install,
}

impl Reservation {
    /// Reserves `size` bytes (multiple of 4 KiB) for guest-physical `[gpa_base, gpa_base+size)`
    /// and registers them with `uffd` (a `Flavor::Sync` descriptor) in MISSING mode; opens the
    /// reservation's own tracker (`Flavor::AsyncWp`) and pagemap.
    pub fn new(gpa_base: Gpa, size: u64, uffd: Arc<Uffd>) -> Result<Self> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) || !gpa_base.0.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Misaligned {
                gpa: gpa_base.0,
                len: size,
            });
        }
        let map = Mmap::new(
            size,
            Prot::ReadWrite,
            Backing::Anonymous,
            MapFlags::NORESERVE,
        )?;
        if uffd.flavor() != crate::sys::uffd::Flavor::Sync {
            return Err(Error::InvalidArgs(
                "a reservation's fault channel must be a synchronous userfaultfd".into(),
            ));
        }
        let r = Reservation {
            map,
            gpa_base,
            uffd,
            tracker: Uffd::open_async_wp()?,
            pagemap: Pagemap::open()?,
            poisoned: Default::default(),
            deferred: Mutex::new(RangeSet::default()),
            has_deferred: AtomicBool::new(false),
            seal_stats: SealCounters::default(),
        };
        r.uffd.register(r.map.addr(), size, RegisterMode::MISSING)?;
        Ok(r)
    }

    /// Host address of the start of the range (the memslot's `userspace_addr`).
    pub fn hva(&self) -> Hva {
        Hva(self.map.addr())
    }

    pub fn size(&self) -> u64 {
        self.map.len()
    }

    /// Guest-physical address of the start of the range.
    pub fn gpa_base(&self) -> Gpa {
        self.gpa_base
    }

    /// The synchronous descriptor: the fault thread's channel.
    pub fn uffd(&self) -> &Arc<Uffd> {
        &self.uffd
    }

    /// The async write-tracking descriptor (never produces events; for tests).
    pub fn tracker(&self) -> &Uffd {
        &self.tracker
    }

    /// The guest-physical address behind host address `hva`, if it lies in this range.
    pub fn gpa_of(&self, hva: Hva) -> Option<Gpa> {
        let off = hva.0.checked_sub(self.map.addr())?;
        (off < self.size()).then(|| Gpa(self.gpa_base.0 + off))
    }

    /// The host address of `[gpa, gpa+len)`, if the whole range lies in this reservation.
    pub fn hva_of(&self, gpa: Gpa, len: u64) -> Option<Hva> {
        let off = gpa.0.checked_sub(self.gpa_base.0)?;
        (off.checked_add(len)? <= self.size()).then_some(Hva(self.map.addr() + off))
    }

    /// The host address of the page-aligned, non-empty range `[gpa, gpa+len)`.
    fn piece(&self, gpa: Gpa, len: u64) -> Result<Hva> {
        if len == 0 || !gpa.0.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Misaligned { gpa: gpa.0, len });
        }
        self.hva_of(gpa, len)
            .ok_or(Error::OutsideGuest { gpa: gpa.0, len })
    }

    /// Installs `len` bytes of the frame memfd `memfd` from `frame` at `gpa` (`MAP_SHARED`):
    /// `Install::Writable` = read-write and populated (one `mmap(MAP_POPULATE)` of a run is
    /// far cheaper than the guest's faults on it, PERF-FACTS.md), registered WP on the tracker,
    /// not armed;
    /// `Install::ReadOnly` = mapped `PROT_READ` and populated (write protection applies to
    /// present PTEs), registered WP on `uffd` and write-protected, then opened to
    /// read-write, so a write is never possible without a WP event (module invariants).
    pub(crate) fn install_frame(
        &self,
        gpa: Gpa,
        len: u64,
        memfd: BorrowedFd<'_>,
        frame: MemfdOffset,
        how: Install,
    ) -> Result<()> {
        let hva = self.piece(gpa, len)?;
        let (prot, flags) = match how {
            Install::Writable => (Prot::ReadWrite, MapFlags::POPULATE),
            Install::ReadOnly => (Prot::Read, MapFlags::POPULATE),
        };
        self.end_poison(hva, len);
        let _deferred = self.forget_deferred(gpa, len);
        let backing = Backing::Shared {
            fd: memfd,
            offset: frame.0,
        };
        // SAFETY: guest memory is never borrowed as a reference (module invariants).
        unsafe {
            self.map.replace(
                "mmap(MAP_SHARED|MAP_FIXED frame)",
                hva.0,
                len,
                prot,
                backing,
                flags,
            )?
        };
        match how {
            Install::Writable => register(&self.tracker, hva, len),
            Install::ReadOnly => {
                register(&self.uffd, hva, len)?;
                self.uffd
                    .writeprotect(hva.0, len, Protection::Protect, Wake::Wake)?;
                self.set_prot("open read-only install", hva, len, Prot::ReadWrite)
            }
        }
    }

    /// Forgets the poison of the pages in `[hva, hva+len)`: an install or a restore there
    /// re-maps them, so a later `unpoison` must leave them alone (it would undo that mapping:
    /// put an anonymous piece under an installed frame, or open a page the install keeps
    /// read-only).
    fn end_poison(&self, hva: Hva, len: u64) {
        let mut poisoned = self.poisoned.lock().unwrap_or_else(|p| p.into_inner());
        if poisoned.is_empty() {
            return;
        }
        let gone: Vec<u64> = poisoned.range(hva.0..hva.0 + len).copied().collect();
        for page in gone {
            poisoned.remove(&page);
        }
    }

    /// `mprotect` of a piece of the range.
    fn set_prot(&self, what: &'static str, hva: Hva, len: u64, prot: Prot) -> Result<()> {
        // SAFETY: guest memory is never borrowed as a reference (module invariants).
        unsafe { self.map.protect(what, hva.0, len, prot) }
    }

    /// Moves the writable installs `[gpa, gpa+len)` to read-only: closed (`PROT_READ`), off
    /// the tracker, registered WP on `uffd`, write-protected, opened again. On failure the
    /// range is rolled back to writable where possible; `MoveError::now` says what it is.
    pub(crate) fn make_read_only(&self, gpa: Gpa, len: u64) -> std::result::Result<(), MoveError> {
        self.move_read_only(gpa, len, Window::Closed)
    }

    /// `make_read_only`; with `Window::Quiescent` (a deferred range being sealed) without the
    /// close and reopen, and a failed rollback closes the range instead.
    fn move_read_only(
        &self,
        gpa: Gpa,
        len: u64,
        window: Window,
    ) -> std::result::Result<(), MoveError> {
        if let Some(h) = self.hva_of(gpa, len) {
            self.end_poison(h, len);
        }
        let ro = |error| MoveError {
            error,
            now: Install::ReadOnly,
        };
        let hva = self.piece(gpa, len).map_err(|error| MoveError {
            error,
            now: Install::Writable,
        })?;
        if window == Window::Closed {
            self.set_prot("close range", hva, len, Prot::Read)
                .map_err(|error| MoveError {
                    error,
                    now: Install::Writable,
                })?;
        }
        // The step that failed decides the rollback: each undoes the steps before it.
        let failed = match self.tracker.unregister(hva.0, len) {
            Err(e) => Some((e, 0)),
            Ok(()) => match register(&self.uffd, hva, len) {
                Err(e) => Some((e, 1)),
                Ok(()) => self
                    .uffd
                    .writeprotect(hva.0, len, Protection::Protect, Wake::Wake)
                    .err()
                    .map(|e| (e, 2)),
            },
        };
        if let Some((error, step)) = failed {
            // Back to writable on the tracker, opened only once it is there.
            let mut back = Ok(());
            if step == 2 {
                back = self.uffd.unregister(hva.0, len);
            }
            if step >= 1 {
                back = back.and_then(|()| register(&self.tracker, hva, len));
            }
            let now = match window {
                Window::Closed => {
                    match back
                        .and_then(|()| self.set_prot("reopen range", hva, len, Prot::ReadWrite))
                    {
                        Ok(()) => Install::Writable,
                        Err(_) => Install::ReadOnly,
                    }
                }
                // Open all along: if it is not back on the tracker, close it now (and if even
                // that fails it stays writable: `seal` keeps it deferred and fails).
                Window::Quiescent => match back {
                    Ok(()) => Install::Writable,
                    Err(_) if self.set_prot("close range", hva, len, Prot::Read).is_ok() => {
                        Install::ReadOnly
                    }
                    Err(_) => Install::Writable,
                },
            };
            return Err(MoveError { error, now });
        }
        match window {
            Window::Closed => self
                .set_prot("open write-protected range", hva, len, Prot::ReadWrite)
                .map_err(ro),
            Window::Quiescent => Ok(()),
        }
    }

    /// Defers the write-protect of the writable installs `[gpa, gpa+len)` (which the caller
    /// now records read-only: their frames are shared) to the next `seal` covering them: no
    /// host call now. The caller guarantees nothing writes through this mapping until then
    /// except after `seal` (every host-side writer calls it first: `GuestVm::run`, the VMM's
    /// memslot writes, the vm-memory view).
    pub(crate) fn defer_read_only(&self, gpa: Gpa, len: u64) -> Result<()> {
        self.piece(gpa, len)?;
        let mut d = self.lock_deferred();
        d.insert(gpa.0, gpa.0 + len);
        self.has_deferred.store(true, Ordering::Release);
        self.seal_stats
            .deferred
            .fetch_add(len / PAGE_SIZE, Ordering::Relaxed);
        Ok(())
    }

    /// Applies every deferred write-protect (see `defer_read_only`): each deferred range
    /// leaves the tracker and is write-protected on `uffd`, so a later write to one of its
    /// shared frames is a WP event. Call before writing through this mapping by any means; a
    /// no-op (one atomic load) when nothing is deferred. On failure the ranges not moved stay
    /// deferred and the error is returned: the caller must not write.
    pub fn seal(&self) -> Result<()> {
        self.seal_range(self.gpa_base, self.size())
    }

    /// `seal` for the deferred pieces inside `[gpa, gpa+len)` only (a host write of a few
    /// bytes pays for the pages it touches, not the guest). Ranges outside the reservation are
    /// clipped to it.
    pub fn seal_range(&self, gpa: Gpa, len: u64) -> Result<()> {
        if !self.has_deferred.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut d = self.lock_deferred();
        let start = gpa.0 & !(PAGE_SIZE - 1);
        let end = gpa.0.saturating_add(len).next_multiple_of(PAGE_SIZE);
        let pieces = d.take(start, end);
        let mut result = Ok(());
        let mut moved = 0;
        for (i, &(s, e)) in pieces.iter().enumerate() {
            match self.move_read_only(Gpa(s), e - s, Window::Quiescent) {
                Ok(()) => moved += (e - s) / PAGE_SIZE,
                Err(MoveError { error, now }) => {
                    // Still writable: stays deferred, with everything not tried yet.
                    if now == Install::Writable {
                        d.insert(s, e);
                    }
                    for &(s, e) in &pieces[i + 1..] {
                        d.insert(s, e);
                    }
                    result = Err(error);
                    break;
                }
            }
        }
        if moved > 0 {
            self.seal_stats.seals.fetch_add(1, Ordering::Relaxed);
            self.seal_stats.sealed.fetch_add(moved, Ordering::Relaxed);
        }
        self.has_deferred.store(!d.is_empty(), Ordering::Release);
        result
    }

    /// What the deferred write-protect did so far (`SealStats`).
    pub fn seal_stats(&self) -> SealStats {
        let pending_pages = self.lock_deferred().bytes() / PAGE_SIZE;
        SealStats {
            deferred_pages: self.seal_stats.deferred.load(Ordering::Relaxed),
            sealed_pages: self.seal_stats.sealed.load(Ordering::Relaxed),
            seals: self.seal_stats.seals.load(Ordering::Relaxed),
            dropped_pages: self.seal_stats.dropped.load(Ordering::Relaxed),
            pending_pages,
        }
    }

    /// The deferred ranges now, ascending (for `KvmStage2`'s invariant check).
    pub(crate) fn deferred_ranges(&self) -> Vec<(u64, u64)> {
        self.lock_deferred().ranges().collect()
    }

    fn lock_deferred(&self) -> MutexGuard<'_, RangeSet> {
        self.deferred.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Before a host operation re-maps `[gpa, gpa+len)`: the deferred pieces there are
    /// forgotten (the new mapping decides their state), and the returned guard holds the
    /// `deferred` lock until the operation is done, so no `seal` runs in between.
    fn forget_deferred(&self, gpa: Gpa, len: u64) -> Option<MutexGuard<'_, RangeSet>> {
        if !self.has_deferred.load(Ordering::Acquire) {
            return None;
        }
        let mut d = self.lock_deferred();
        let gone: u64 = d
            .take(gpa.0, gpa.0 + len)
            .iter()
            .map(|&(s, e)| (e - s) / PAGE_SIZE)
            .sum();
        self.seal_stats.dropped.fetch_add(gone, Ordering::Relaxed);
        self.has_deferred.store(!d.is_empty(), Ordering::Release);
        Some(d)
    }

    /// Moves the read-only installs `[gpa, gpa+len)` (frames the caller made private) to
    /// writable: off `uffd` (which clears their write protection), registered on the tracker
    /// (unarmed). On failure the range is put back read-only where possible.
    pub(crate) fn make_writable(&self, gpa: Gpa, len: u64) -> std::result::Result<(), MoveError> {
        if let Some(h) = self.hva_of(gpa, len) {
            self.end_poison(h, len);
        }
        let hva = self.piece(gpa, len).map_err(|error| MoveError {
            error,
            now: Install::ReadOnly,
        })?;
        // Deferred pieces are still on the tracker: seal them first, so the whole range is
        // on `uffd` (rare: nothing faults on a deferred piece, so only an explicit protect
        // reaches one).
        self.seal_range(gpa, len).map_err(|error| MoveError {
            error,
            now: Install::ReadOnly,
        })?;
        self.uffd
            .unregister(hva.0, len)
            .map_err(|error| MoveError {
                error,
                now: Install::ReadOnly,
            })?;
        if let Err(error) = register(&self.tracker, hva, len) {
            let back = register(&self.uffd, hva, len).and_then(|()| {
                self.uffd
                    .writeprotect(hva.0, len, Protection::Protect, Wake::Wake)
            });
            return Err(MoveError {
                error,
                now: if back.is_ok() {
                    Install::ReadOnly
                } else {
                    Install::Writable
                },
            });
        }
        Ok(())
    }

    /// Arms write tracking of the writable installs `[gpa, gpa+len)`: the next write to each
    /// page is seen by `harvest_written`.
    pub(crate) fn arm(&self, gpa: Gpa, len: u64) -> Result<()> {
        let hva = self.piece(gpa, len)?;
        // (The kernel refuses DONTWAKE together with WP; nothing waits on the tracker anyway.)
        self.tracker
            .writeprotect(hva.0, len, Protection::Protect, Wake::Wake)
    }

    /// Ends write tracking of the writable installs `[gpa, gpa+len)` (`KvmStage2`'s untracked
    /// hot-set pages): their write protection on the tracker is cleared, so the guest's
    /// writes cost no fault and `harvest_written` no longer sees them.
    pub(crate) fn disarm(&self, gpa: Gpa, len: u64) -> Result<()> {
        let hva = self.piece(gpa, len)?;
        self.tracker
            .writeprotect(hva.0, len, Protection::Unprotect, Wake::Wake)
    }

    /// Appends to `out` the runs `(start, len)` of the armed writable installs in
    /// `[gpa, gpa+len)` written since they were armed, ascending, and re-arms exactly those.
    pub(crate) fn harvest_written(
        &self,
        gpa: Gpa,
        len: u64,
        out: &mut Vec<(Gpa, u64)>,
    ) -> Result<()> {
        let hva = self.piece(gpa, len)?;
        let mut runs = Vec::new();
        self.pagemap.harvest_written(hva.0, len, &mut runs)?;
        let base = self.map.addr();
        out.extend(
            runs.into_iter()
                .map(|(s, e)| (Gpa(self.gpa_base.0 + (s - base)), e - s)),
        );
        Ok(())
    }

    /// Puts an anonymous MISSING-registered piece back over `[gpa, gpa+len)` (page aligned).
    pub(crate) fn restore(&self, gpa: Gpa, len: u64) -> Result<()> {
        let hva = self.piece(gpa, len)?;
        self.end_poison(hva, len);
        let _deferred = self.forget_deferred(gpa, len);
        // SAFETY: guest memory is never borrowed as a reference (module invariants).
        unsafe {
            self.map.replace(
                "mmap(anonymous piece)",
                hva.0,
                len,
                Prot::ReadWrite,
                Backing::Anonymous,
                MapFlags::NORESERVE,
            )?
        };
        self.uffd.register(hva.0, len, RegisterMode::MISSING)
    }

    /// Makes the page at `hva` fail with a plain fault, so a vCPU that retries the access gets
    /// `KVM_RUN = -EFAULT` (CPL3) instead of blocking forever on an unresolvable userfaultfd
    /// event. Used after a resolver error. A not-present page becomes a PROT_NONE piece; an
    /// installed page that refused a write (`installed`) keeps its frame but becomes
    /// PROT_READ (the Stage2 record stays true). `unpoison` undoes either.
    pub(crate) fn poison(&self, hva: Hva, installed: bool) -> Result<()> {
        let page = hva.0 & !(PAGE_SIZE - 1);
        if self.gpa_of(Hva(page)).is_none() {
            return Err(Error::InvalidArgs(format!("poison {:#x} outside", hva.0)));
        }
        self.poisoned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(page);
        if installed {
            // SAFETY: guest memory is never borrowed as a reference (module invariants).
            unsafe {
                self.map
                    .protect("poison guest page", page, PAGE_SIZE, Prot::Read)
            }
        } else {
            // SAFETY: as above.
            unsafe {
                self.map.replace(
                    "poison guest page",
                    page,
                    PAGE_SIZE,
                    Prot::None,
                    Backing::Anonymous,
                    MapFlags::NORESERVE,
                )
            }
        }
    }

    /// Undoes `poison(hva, installed)`: the page faults through userfaultfd again. A page
    /// re-mapped since (installed, restored, moved) is no longer poisoned and is left alone.
    pub(crate) fn unpoison(&self, hva: Hva, installed: bool) -> Result<()> {
        let page = hva.0 & !(PAGE_SIZE - 1);
        if !self
            .poisoned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&page)
        {
            return Ok(());
        }
        let gpa = self
            .gpa_of(Hva(page))
            .ok_or_else(|| Error::InvalidArgs(format!("unpoison {:#x} outside", hva.0)))?;
        if installed {
            // SAFETY: guest memory is never borrowed as a reference (module invariants). The
            // uffd-WP bit survives mprotect.
            unsafe {
                self.map
                    .protect("unpoison guest page", page, PAGE_SIZE, Prot::ReadWrite)
            }
        } else {
            self.restore(gpa, PAGE_SIZE)
        }
    }

    /// The host mapping itself, for benchmarks that replace a piece of guest memory with a
    /// kernel mechanism they compare against (`Mmap::replace` is `unsafe`; such a caller
    /// breaks this type's invariants for that piece on purpose and must not hand it back to
    /// the memory model).
    pub fn host_mapping(&self) -> &Mmap {
        &self.map
    }
}

/// Registers `[hva, hva+len)` WP on `uffd`; ENOMEM there is the map-count limit (registering
/// can split VMAs too).
fn register(uffd: &Uffd, hva: Hva, len: u64) -> Result<()> {
    uffd.register(hva.0, len, RegisterMode::WP)
        .map_err(|e| match e {
            Error::Sys { what, err } => crate::sys::mmap::map_error(what, err),
            other => other,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_translate_both_ways_and_stay_inside() {
        let uffd = Arc::new(Uffd::open().unwrap());
        let r = Reservation::new(Gpa(0x10_0000), 16 * PAGE_SIZE, uffd).unwrap();
        let hva = r.hva_of(Gpa(0x10_1000), PAGE_SIZE).unwrap();
        assert_eq!(hva, r.hva().add(PAGE_SIZE));
        assert_eq!(r.gpa_of(hva), Some(Gpa(0x10_1000)));
        assert_eq!(r.hva_of(Gpa(0xf_f000), PAGE_SIZE), None);
        assert_eq!(r.hva_of(Gpa(0x10_0000), 17 * PAGE_SIZE), None);
        assert_eq!(r.hva_of(Gpa(0x10_0000), u64::MAX), None);
        assert_eq!(r.gpa_of(r.hva().add(16 * PAGE_SIZE)), None);
        assert!(matches!(
            r.restore(Gpa(0x10_0001), PAGE_SIZE),
            Err(Error::Misaligned { .. })
        ));
        assert!(matches!(
            r.restore(Gpa(0x20_0000), PAGE_SIZE),
            Err(Error::OutsideGuest { .. })
        ));
        assert!(Reservation::new(Gpa(1), PAGE_SIZE, r.uffd().clone()).is_err());
    }

    /// A page poisoned while not installed, then installed before `unpoison` (a host-side
    /// prefault of the stopped VM), keeps its frame: `unpoison` must not put an anonymous
    /// piece under an install `KvmStage2` records.
    #[test]
    fn unpoison_leaves_a_page_installed_since_alone() {
        use crate::memory::frames::MemfdFrameAlloc;
        use vmo::FrameAlloc;
        let uffd = Arc::new(Uffd::open().unwrap());
        let r = Reservation::new(Gpa(0), 4 * PAGE_SIZE, uffd).unwrap();
        let frames = MemfdFrameAlloc::new(4 * PAGE_SIZE).unwrap();
        let pa = frames.alloc_frame().unwrap();
        let ptr = frames.frame_ptr(pa);
        // SAFETY: `ptr` is the frame's 4 KiB in the allocator's own mapping, allocated above.
        unsafe { ptr.write(0x5A) };
        let hva = r.hva_of(Gpa(PAGE_SIZE), PAGE_SIZE).unwrap();
        r.poison(hva, false).unwrap();
        r.install_frame(
            Gpa(PAGE_SIZE),
            PAGE_SIZE,
            frames.memfd(),
            frames.offset_of(pa).unwrap(),
            Install::Writable,
        )
        .unwrap();
        r.unpoison(hva, false).unwrap();
        // Present in the page table (the install populated it) rather than an empty
        // anonymous piece; read from /proc/self/pagemap, which never faults (a touch of an
        // anonymous piece would wait for a userfaultfd answer nobody gives here).
        let present = |h: Hva| {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
            f.seek(SeekFrom::Start(h.0 / PAGE_SIZE * 8)).unwrap();
            let mut e = [0u8; 8];
            f.read_exact(&mut e).unwrap();
            u64::from_le_bytes(e) >> 63 == 1
        };
        assert!(present(hva), "the installed frame is still mapped there");
        // SAFETY: the page is a present, writable frame install (no userfaultfd wait), and
        // nothing else maps it mutably here.
        let seen = unsafe { (hva.0 as *const u8).read_volatile() };
        assert_eq!(seen, 0x5A, "and it is the frame's bytes");
        // A page still poisoned is un-poisoned.
        let other = r.hva_of(Gpa(2 * PAGE_SIZE), PAGE_SIZE).unwrap();
        r.poison(other, false).unwrap();
        r.unpoison(other, false).unwrap();
        assert!(r.poisoned.lock().unwrap().is_empty());
        frames.free_frame(pa);
    }
}
