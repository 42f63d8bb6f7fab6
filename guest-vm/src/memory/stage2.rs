//! `KvmStage2`: the `ept::Stage2` backend of a KVM guest whose memslot is a `Reservation`.
//! (The host mapping operations themselves are the reservation's: it is the one writer of the
//! memslot's host range.)
//!
//! A "second-level translation" here is a host mapping inside the memslot's host range:
//! - `map(gpa, pa, size, perms)` = `mmap(MAP_SHARED|MAP_FIXED)` of memfd offset `pa` at
//!   `slot_hva + (gpa - gpa_base)` (`Reservation::install_frame`): perms with WRITE are
//!   registered WP on the reservation's async tracker (unarmed); perms without WRITE are
//!   registered WP on the synchronous userfaultfd and write-protected, so a guest write
//!   arrives as a WP event with its address instead of a bare `KVM_RUN = -EFAULT`;
//!   2 MiB / 1 GiB leaves are one mmap of a contiguous run of frames;
//! - `map_run(gpa, pas, perms)` = one such install (one `mmap`, populated, plus one
//!   registration) per maximal run of offset-contiguous frames in `pas`;
//! - `unmap` puts an anonymous MISSING-registered reservation piece back;
//! - `protect` moves ranges between the two descriptors (`make_read_only` /
//!   `make_writable`): a shared frame is never on the tracker while anything can write it
//!   (reservation.rs invariants). The common write-protect (`protect(range, READ)`, what a
//!   fork and a reset point do) is **deferred**: the records become read-only at once, what a
//!   harvest would report there is kept (`written_then_protected`: unarmed and untracked
//!   extents whole, no host call; armed ones scanned), and the host move is left to the
//!   reservation's next `seal`, which every writer of the host range calls first
//!   (`Reservation::defer_read_only`). Per extent, not per page: the first fork of a 1 GiB
//!   written guest makes no host call at all, and a parent that only serves forks never pays
//!   the move;
//! - `harvest_dirty` (the dirty-tracking contract of `ept::Stage2`): per run of writable
//!   leaves in the range, unarmed ones are reported whole and armed (`UFFDIO_WRITEPROTECT` on
//!   the tracker; a leaf installed or made writable is never armed at install, so its first
//!   write costs no tracking fault), armed ones are reported as `PAGEMAP_SCAN` says written
//!   and re-armed in the same scan, untracked ones are reported whole with no host call; a
//!   written large leaf reports all its pages. Only the
//!   writable index is walked, so the cost follows private pages, not guest size. Writes by
//!   the VMM through the reservation are tracked; writes through the frame pool's own mapping
//!   (`FrameAlloc::frame_ptr`) are not;
//! - `set_write_tracking` (the copy-back hot set, `vmo::HotSetPolicy`): `Untracked` clears
//!   the tracker's write protection of the range's writable leaves (one `UFFDIO_WRITEPROTECT`
//!   per run that was armed) and marks them so every harvest reports them whole and never
//!   arms them — the guest writes them without an exit; `Tracked` makes them unarmed again
//!   (counted as written by the next harvest, which arms them), with no host call;
//! - `query` answers from a host-side record of installed leaves;
//! - `flush` does nothing: KVM's MMU notifier drops its shadow/TDP entries when we remap.
//!
//! Invariants:
//! - `leaves` holds disjoint leaves (as extents: one record per run of 4 KiB leaves over
//!   consecutive frames with equal attributes, `LeafIndex`) and matches the host mappings
//!   exactly;
//! - a leaf is armed or untracked only while writable, and an armed leaf's host pages are
//!   write-protected on the tracker except those written since (which the next scan
//!   reports); a failed harvest disarms the range's armed leaves (its next harvest
//!   over-reports, never under-reports); an untracked leaf is reported by every harvest
//!   whatever its host state, so a failed `disarm` only costs the guest exits;
//! - `writable` is exactly the set of leaf starts whose perms contain WRITE, and `odd_ro` the
//!   number of other leaves whose perms are not plain READ; together they let the common
//!   write-protect of a fork (`protect(range, READ)`) return in O(log n) when nothing in the
//!   range is writable, so forking a snapshot again does not walk every installed page (and
//!   otherwise visit the writable extents only);
//!   installed VMAs of the same class (writable on the tracker / read-only on the synchronous
//!   descriptor) have the same flags, so GPA-adjacent leaves of one class over offset-adjacent
//!   frames merge into one VMA;
//! - a leaf recorded read-only is not writable through the host mapping by any writer: it
//!   is read-only on the synchronous descriptor, or deferred on the reservation (sealed
//!   before any write); a leaf recorded writable is never deferred;
//! - execute permission is recorded but not enforced (KVM cannot express it per host page);
//!   perms without READ cannot be expressed and are `NotSupported`;
//! - `vm.max_map_count` exhaustion (ENOMEM from mmap) is retried once after raising the limit
//!   when the process may write `/proc/sys/vm/max_map_count`; otherwise the operation fails
//!   with `ept::Error::Backend` naming the host operation and its errno — never a panic.
//!
//! `check_invariants` states the index invariants as code; it runs at the end of every
//! mutating operation in debug builds (for up to `CHECKED_LEAVES` leaves: the check is linear).

use std::sync::Arc;

use ept::{
    BackendFailure, FlushScope, MemType, PageSize, S2Perms, Stage2, Translation, WriteTracking,
};

use crate::addr::{Gpa, MemfdOffset};
use crate::error::Error;
use crate::memory::frames::MemfdFrameAlloc;
use crate::memory::leaves::{Leaf, LeafIndex, Track};
use crate::memory::ranges::{runs, RangeSet};
use crate::memory::reservation::{Install, MoveError, Reservation};
use crate::sys::mmap::ensure_max_map_count;
use ept::PAGE_SIZE;

/// Debug builds check the index invariants after every change while there are at most this
/// many leaves (the check walks them all).
const CHECKED_LEAVES: usize = 1 << 14;

/// Counters of host operations, for benchmarks and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stage2Stats {
    pub maps: u64,
    pub unmaps: u64,
    pub protects: u64,
    pub map_count_raised: u64,
    /// `harvest_dirty` calls that reached the host (a range with writable leaves).
    pub harvests: u64,
    /// `flush` calls (no-ops here; counted for the conformance suite).
    pub flushes: u64,
    /// Pages harvests reported because they are untracked (no scan, no host call).
    pub untracked_reported: u64,
    /// Pages harvests scanned with `PAGEMAP_SCAN` (armed leaves).
    pub scanned: u64,
}

/// The KVM/userfaultfd `Stage2` backend; see the module documentation.
pub struct KvmStage2 {
    res: Arc<Reservation>,
    frames: Arc<MemfdFrameAlloc>,
    leaves: LeafIndex,
    /// Pages written (or made writable) since the last harvest and write-protected since: a
    /// move off the tracker would erase their written state, so it is kept here for the next
    /// harvest (the contract: write-protecting a page does not hide its writes).
    written_then_protected: RangeSet,
    flush_pending: bool,
    stats: Stage2Stats,
}

impl KvmStage2 {
    /// A backend installing frames of `frames` into `res`. Nothing is installed yet.
    pub fn new(res: Arc<Reservation>, frames: Arc<MemfdFrameAlloc>) -> Self {
        KvmStage2 {
            res,
            frames,
            leaves: LeafIndex::default(),
            written_then_protected: RangeSet::default(),
            flush_pending: false,
            stats: Stage2Stats::default(),
        }
    }

    pub fn reservation(&self) -> &Arc<Reservation> {
        &self.res
    }

    pub fn frames(&self) -> &Arc<MemfdFrameAlloc> {
        &self.frames
    }

    pub fn stats(&self) -> Stage2Stats {
        self.stats
    }

    /// Installed 4 KiB pages.
    pub fn mapped_pages(&self) -> u64 {
        self.leaves.pages()
    }

    /// The write tracking of the writable leaf covering `gpa` (`None`: nothing writable is
    /// installed there).
    pub fn write_tracking(&self, gpa: u64) -> Option<WriteTracking> {
        let (_, l) = self.leaves.covering(gpa)?;
        l.perms.contains(S2Perms::WRITE).then_some(match l.track {
            Track::Untracked => WriteTracking::Untracked,
            Track::Armed | Track::Unarmed => WriteTracking::Tracked,
        })
    }

    /// The module invariants as code: the leaf index keeps its own (`LeafIndex`), every
    /// leaf lies inside the reservation, and no leaf recorded writable is deferred (a deferred
    /// range is one the records already count read-only). Panics on a violation.
    pub fn check_invariants(&self) {
        self.written_then_protected.check_invariants();
        self.leaves.check_invariants();
        for (start, bytes) in self.leaves.extents() {
            assert!(
                self.res.hva_of(Gpa(start), bytes).is_some(),
                "leaf {start:#x} outside the reservation"
            );
        }
        for (s, e) in self.res.deferred_ranges() {
            assert!(
                self.leaves.writable_extents_in(s, e - s).next().is_none(),
                "writable leaf in the deferred range {s:#x}..{e:#x}"
            );
        }
    }

    fn debug_check(&self) {
        if cfg!(debug_assertions) && self.leaves.len() <= CHECKED_LEAVES {
            self.check_invariants();
        }
    }

    /// The `ept::Error` for a failed host operation: the operation and its errno travel in
    /// `Error::Backend` (the full message goes to the log).
    fn fail(e: Error) -> ept::Error {
        tracing::debug!("KvmStage2 host operation failed: {e}");
        match e {
            Error::MapCountLimit { .. } => ept::Error::Backend(BackendFailure {
                op: "mmap (vm.max_map_count exhausted)",
                errno: libc::ENOMEM,
            }),
            Error::Sys { what, err } => ept::Error::Backend(BackendFailure {
                op: what,
                errno: err.raw_os_error().unwrap_or(0),
            }),
            Error::InvalidArgs(_) | Error::Misaligned { .. } => ept::Error::InvalidArgs,
            Error::OutsideGuest { .. } => ept::Error::OutOfRange,
            _ => ept::Error::Backend(BackendFailure {
                op: "KvmStage2 host operation",
                errno: 0,
            }),
        }
    }

    /// Runs a host mapping operation; on the map-count limit raises it (if allowed) and
    /// retries once.
    fn with_map_retry(
        &mut self,
        mut op: impl FnMut(&Self) -> crate::error::Result<()>,
    ) -> Result<(), ept::Error> {
        match op(self) {
            Ok(()) => Ok(()),
            Err(Error::MapCountLimit { limit, .. }) => {
                let want = (limit.max(65530) * 4).min(1 << 30);
                match ensure_max_map_count(want) {
                    Ok(_) => {
                        self.stats.map_count_raised += 1;
                        op(self).map_err(Self::fail)
                    }
                    Err(e) => Err(Self::fail(e)),
                }
            }
            Err(e) => Err(Self::fail(e)),
        }
    }

    fn check_range(&self, gpa: u64, len: u64) -> Result<(), ept::Error> {
        if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || len == 0 {
            return Err(ept::Error::InvalidArgs);
        }
        let end = gpa.checked_add(len).ok_or(ept::Error::OutOfRange)?;
        if end > ept::GPA_LIMIT || self.res.hva_of(Gpa(gpa), len).is_none() {
            return Err(ept::Error::OutOfRange);
        }
        Ok(())
    }

    fn install(&self, gpa: u64, pa: u64, len: u64, how: Install) -> crate::error::Result<()> {
        let frame = MemfdOffset(pa);
        self.res
            .install_frame(Gpa(gpa), len, self.frames.memfd(), frame, how)
    }

    /// Moves the run `[s, s+l)` to `to` on the host; on failure, records what it is now
    /// (perms `perms` if it ended as `to`, its old perms otherwise; disarmed either way).
    fn move_run(&mut self, s: u64, l: u64, to: Install, perms: S2Perms) -> Result<(), ept::Error> {
        if to == Install::ReadOnly {
            self.keep_written(s, l).map_err(Self::fail)?;
        }
        let moved = match to {
            Install::ReadOnly => self.res.make_read_only(Gpa(s), l),
            Install::Writable => self.res.make_writable(Gpa(s), l),
        };
        if let Err(MoveError { error, now }) = moved {
            if now == to {
                self.leaves.set_perms_in(s, l, perms);
            }
            self.leaves.disarm_in(s, l);
            return Err(Self::fail(error));
        }
        Ok(())
    }
}

impl KvmStage2 {
    /// `protect(gpa, len, READ)` when every read-only leaf is plain READ (`odd_ro == 0`): a
    /// range without writable leaves (every fork after the first) costs O(log n); otherwise
    /// one pass over the writable extents, a scan of the armed ones, and one deferral per run
    /// (no host move: `Reservation::seal` does it before the next write).
    fn write_protect(&mut self, gpa: u64, len: u64) -> Result<u64, ept::Error> {
        self.leaves.split_at(gpa);
        self.leaves.split_at(gpa + len);
        if !self.leaves.any_writable_in(gpa, len) {
            return Ok(0);
        }
        let mut changed = 0;
        let mut pieces = Vec::new();
        for (s, l) in self.leaves.writable_extents_in(gpa, len) {
            changed += l / PAGE_SIZE;
            pieces.push((s, l));
        }
        for (s, l) in runs(pieces) {
            // The host move is deferred to the reservation's next `seal` (module docs); what a
            // harvest would report here is kept first, while the tracker still knows it.
            let deferred = self
                .keep_written(s, l)
                .and_then(|()| self.res.defer_read_only(Gpa(s), l));
            if let Err(e) = deferred {
                // The runs before this one are deferred (read-only to every writer): say so.
                // This one stays writable; a scan that failed part-way may have re-armed
                // pages without keeping them, so it counts as written whole next time.
                self.leaves.disarm_in(s, l);
                self.leaves.set_perms_in(gpa, s - gpa, S2Perms::READ);
                self.debug_check();
                return Err(Self::fail(e));
            }
        }
        // Every read-only leaf is plain READ, so after this the whole range is.
        self.leaves.mark_read_only(gpa, len);
        self.stats.protects += 1;
        self.flush_pending = true;
        self.debug_check();
        Ok(changed)
    }
}

impl Stage2 for KvmStage2 {
    fn map(
        &mut self,
        gpa: u64,
        pa: u64,
        size: PageSize,
        perms: S2Perms,
        mem_type: MemType,
    ) -> Result<Option<Translation>, ept::Error> {
        let len = size.bytes();
        if !gpa.is_multiple_of(len) || !pa.is_multiple_of(len) {
            return Err(ept::Error::InvalidArgs);
        }
        check_perms(perms)?;
        self.check_range(gpa, len)?;
        match pa.checked_add(len) {
            Some(end) if end <= self.frames.capacity() && pa < ept::PA_LIMIT => {}
            _ => return Err(ept::Error::OutOfRange),
        }
        // Overlap: only an identical-size leaf at the same address may be replaced.
        let mut replaced = None;
        if let Some((s, l)) = self.leaves.overlapping(gpa, len) {
            if s == gpa && l.size == size {
                replaced = Some(l);
            } else {
                return Err(ept::Error::AlreadyExists);
            }
        }
        let how = if perms.contains(S2Perms::WRITE) {
            Install::Writable
        } else {
            Install::ReadOnly
        };
        self.with_map_retry(|me| me.install(gpa, pa, len, how))?;
        self.stats.maps += 1;
        self.leaves.put(
            gpa,
            Leaf {
                pa,
                size,
                perms,
                mem_type,
                track: Track::Unarmed,
            },
        );
        self.debug_check();
        Ok(replaced.map(|l| {
            self.flush_pending = true;
            l.translation(gpa)
        }))
    }

    fn map_run(
        &mut self,
        gpa: u64,
        pas: &[u64],
        perms: S2Perms,
        mem_type: MemType,
    ) -> Result<u64, ept::Error> {
        if pas.is_empty() || u32::try_from(pas.len()).is_err() {
            return Err(ept::Error::InvalidArgs);
        }
        let len = pas.len() as u64 * PAGE_SIZE;
        check_perms(perms)?;
        self.check_range(gpa, len)?;
        let capacity = self.frames.capacity().min(ept::PA_LIMIT);
        if pas
            .iter()
            .any(|&pa| !pa.is_multiple_of(PAGE_SIZE) || pa >= capacity)
        {
            return Err(match pas.iter().all(|pa| pa.is_multiple_of(PAGE_SIZE)) {
                true => ept::Error::OutOfRange,
                false => ept::Error::InvalidArgs,
            });
        }
        // Overlap: only 4 KiB leaves inside the run may be replaced.
        let mut replaced = 0;
        if let Some((s, l)) = self.leaves.covering(gpa) {
            if s != gpa || l.size != PageSize::Size4K {
                return Err(ept::Error::AlreadyExists);
            }
        }
        for (_, l) in self.leaves.range(gpa, len) {
            if l.size != PageSize::Size4K {
                return Err(ept::Error::AlreadyExists);
            }
            replaced += 1;
        }
        let how = if perms.contains(S2Perms::WRITE) {
            Install::Writable
        } else {
            Install::ReadOnly
        };
        // One host install per physically contiguous piece.
        let mut i = 0;
        while i < pas.len() {
            let mut j = i + 1;
            while j < pas.len() && pas[j] == pas[j - 1] + PAGE_SIZE {
                j += 1;
            }
            let start = gpa + i as u64 * PAGE_SIZE;
            let piece = (j - i) as u64 * PAGE_SIZE;
            self.with_map_retry(|me| me.install(start, pas[i], piece, how))
                .inspect_err(|_| self.debug_check())?;
            self.stats.maps += 1;
            self.leaves
                .put_run(start, pas[i], (j - i) as u32, perms, mem_type);
            i = j;
        }
        if replaced > 0 {
            self.flush_pending = true;
        }
        self.debug_check();
        Ok(replaced)
    }

    fn unmap(&mut self, gpa: u64, len: u64) -> Result<u64, ept::Error> {
        self.check_range(gpa, len)?;
        let gone = self.leaves.split_range(gpa, len);
        if gone.is_empty() {
            return Ok(0);
        }
        let pieces = runs(gone.iter().map(|(s, l)| (*s, l.size.bytes())));
        for (s, l) in pieces {
            let res = self.res.clone();
            self.with_map_retry(|_| res.restore(Gpa(s), l))?;
        }
        let pages = self.leaves.take_range(gpa, len);
        self.written_then_protected.take(gpa, gpa + len);
        self.stats.unmaps += 1;
        self.flush_pending = true;
        self.debug_check();
        Ok(pages)
    }

    fn protect(&mut self, gpa: u64, len: u64, perms: S2Perms) -> Result<u64, ept::Error> {
        check_perms(perms)?;
        self.check_range(gpa, len)?;
        if perms == S2Perms::READ && self.leaves.read_only_is_plain() {
            return self.write_protect(gpa, len);
        }
        let writable = perms.contains(S2Perms::WRITE);
        let mut changed = 0;
        let mut flip = Vec::new();
        let mut downgraded = false;
        for (s, l) in self.leaves.split_range(gpa, len) {
            if l.perms == perms {
                continue;
            }
            changed += l.size.bytes() / PAGE_SIZE;
            if l.perms.contains(S2Perms::WRITE) != writable {
                flip.push((s, l.size.bytes()));
            }
            downgraded |= !perms.contains(l.perms);
        }
        let to = if writable {
            Install::Writable
        } else {
            Install::ReadOnly
        };
        let flip = runs(flip);
        for (i, &(s, l)) in flip.iter().enumerate() {
            if let Err(e) = self.move_run(s, l, to, perms) {
                // The runs before this one changed on the host: their records follow, so no
                // page is writable while its record says read-only (or the reverse).
                for &(ds, dl) in &flip[..i] {
                    self.leaves.set_perms_in(ds, dl, perms);
                }
                self.flush_pending |= downgraded;
                self.debug_check();
                return Err(e);
            }
        }
        self.leaves.set_perms_in(gpa, len, perms);
        if changed > 0 {
            self.stats.protects += 1;
        }
        self.flush_pending |= downgraded;
        self.debug_check();
        Ok(changed)
    }

    fn query(&self, gpa: u64) -> Option<Translation> {
        self.leaves.covering(gpa).map(|(s, l)| l.translation(s))
    }

    fn flush(&mut self, _scope: FlushScope) {
        // KVM's MMU notifier already invalidated its translations when the host mapping changed.
        self.flush_pending = false;
        self.stats.flushes += 1;
    }

    fn flush_pending(&self) -> bool {
        self.flush_pending
    }

    fn harvest_dirty(
        &mut self,
        gpa: u64,
        len: u64,
        dirty: &mut Vec<u64>,
    ) -> Result<u64, ept::Error> {
        self.check_range(gpa, len)?;
        self.leaves.split_at(gpa);
        self.leaves.split_at(gpa + len);
        let leaves: Vec<(u64, Leaf)> = self.leaves.writable_in(gpa, len).collect();
        if leaves.is_empty() && self.written_then_protected.is_empty() {
            return Ok(0);
        }
        self.stats.harvests += 1;
        let before = dirty.len();
        if let Err(e) = self.harvest_leaves(&leaves, dirty) {
            // Some pages may be re-armed without their report reaching the caller: count the
            // whole range as written next time.
            dirty.truncate(before);
            self.leaves.disarm_in(gpa, len);
            self.debug_check();
            return Err(Self::fail(e));
        }
        // Pages written, then write-protected (still installed: `unmap` forgets them).
        let kept = self.written_then_protected.take(gpa, gpa + len);
        if !kept.is_empty() {
            dirty.extend(
                kept.iter()
                    .flat_map(|&(a, b)| (a..b).step_by(PAGE_SIZE as usize)),
            );
            dirty[before..].sort_unstable();
            let mut v = dirty.split_off(before);
            v.dedup();
            dirty.extend(v);
        }
        self.debug_check();
        Ok((dirty.len() - before) as u64)
    }

    fn set_write_tracking(
        &mut self,
        gpa: u64,
        len: u64,
        tracking: WriteTracking,
    ) -> Result<u64, ept::Error> {
        self.check_range(gpa, len)?;
        self.leaves.split_at(gpa);
        self.leaves.split_at(gpa + len);
        let changed = match tracking {
            WriteTracking::Tracked => self.leaves.retrack_in(gpa, len, |t| match t {
                // Unarmed counts as written by the next harvest, which arms it.
                Track::Untracked => Track::Unarmed,
                other => other,
            }),
            WriteTracking::Untracked => {
                // The runs write-protected on the tracker now (armed): cleared once each,
                // after the records say untracked (so a failure still over-reports).
                let armed: Vec<(u64, u64)> = self
                    .leaves
                    .writable_in(gpa, len)
                    .filter(|(_, l)| l.track == Track::Armed)
                    .map(|(s, l)| (s, l.size.bytes()))
                    .collect();
                let changed = self.leaves.retrack_in(gpa, len, |_| Track::Untracked);
                for (s, l) in runs(armed) {
                    if let Err(e) = self.res.disarm(Gpa(s), l) {
                        self.debug_check();
                        return Err(Self::fail(e));
                    }
                }
                changed
            }
        };
        self.debug_check();
        Ok(changed)
    }
}

impl KvmStage2 {
    /// Before `[s, s+l)` leaves the tracker (now, or at a deferred write-protect's seal, with
    /// nothing written in between): what a harvest would report there now goes to
    /// `written_then_protected`. Unarmed and untracked extents count as written whole (no
    /// host call: arming them only for the move to undo it would cost a write-protect of the
    /// range); armed ones are scanned (which re-arms them; the move undoes that).
    fn keep_written(&mut self, s: u64, l: u64) -> crate::error::Result<()> {
        let mut armed = Vec::new();
        let extents: Vec<(u64, u64, Track)> = self.leaves.writable_tracks_in(s, l).collect();
        for (a, n, track) in extents {
            match track {
                Track::Armed => armed.push((a, n)),
                Track::Unarmed | Track::Untracked => {
                    self.written_then_protected.insert(a, a + n);
                }
            }
        }
        let mut written = Vec::new();
        for (a, n) in runs(armed) {
            written.clear();
            self.res.harvest_written(Gpa(a), n, &mut written)?;
            self.stats.scanned += n / PAGE_SIZE;
            for &(w, wl) in &written {
                // A written large leaf counts whole (as `report_written` does).
                let (w, we) = (w.raw(), w.raw() + wl);
                let lo = self.leaves.covering(w).map_or(w, |(ls, _)| ls);
                let hi = self
                    .leaves
                    .covering(we - 1)
                    .map_or(we, |(ls, l)| ls + l.size.bytes());
                self.written_then_protected.insert(lo, hi);
            }
        }
        Ok(())
    }

    /// `harvest_dirty` over `leaves` (writable, ascending): per maximal run of adjacent
    /// leaves with the same tracking, arm-and-report-all (unarmed), scan-and-report-written
    /// (armed) or report-all (untracked).
    fn harvest_leaves(
        &mut self,
        leaves: &[(u64, Leaf)],
        dirty: &mut Vec<u64>,
    ) -> crate::error::Result<()> {
        let mut written = Vec::new();
        let mut i = 0;
        while i < leaves.len() {
            let (start, first) = leaves[i];
            let mut end = start + first.size.bytes();
            let mut j = i + 1;
            while j < leaves.len() && leaves[j].0 == end && leaves[j].1.track == first.track {
                end += leaves[j].1.size.bytes();
                j += 1;
            }
            match first.track {
                Track::Armed => {
                    written.clear();
                    self.res
                        .harvest_written(Gpa(start), end - start, &mut written)?;
                    self.stats.scanned += (end - start) / PAGE_SIZE;
                    report_written(&leaves[i..j], &written, dirty);
                }
                Track::Unarmed => {
                    self.res.arm(Gpa(start), end - start)?;
                    self.leaves.retrack_in(start, end - start, |_| Track::Armed);
                    dirty.extend((start..end).step_by(PAGE_SIZE as usize));
                }
                Track::Untracked => {
                    self.stats.untracked_reported += (end - start) / PAGE_SIZE;
                    dirty.extend((start..end).step_by(PAGE_SIZE as usize));
                }
            }
            i = j;
        }
        Ok(())
    }
}

/// Appends the pages of `leaves` (adjacent, ascending) that the written runs `written`
/// (ascending) touch: a 4 KiB leaf if written, every page of a large leaf if any of it is.
fn report_written(leaves: &[(u64, Leaf)], written: &[(Gpa, u64)], dirty: &mut Vec<u64>) {
    let mut k = 0;
    for &(s, l) in leaves {
        let e = s + l.size.bytes();
        while k < written.len() && written[k].0.raw() + written[k].1 <= s {
            k += 1;
        }
        if k < written.len() && written[k].0.raw() < e {
            dirty.extend((s..e).step_by(PAGE_SIZE as usize));
        }
    }
}

/// Perms an installed page can have here: READ is always needed (an empty set is a caller
/// error; write- or execute-only cannot be expressed by a host mapping).
fn check_perms(perms: S2Perms) -> Result<(), ept::Error> {
    match perms {
        p if p.contains(S2Perms::READ) => Ok(()),
        p if p.is_empty() => Err(ept::Error::InvalidArgs),
        _ => Err(ept::Error::NotSupported),
    }
}
