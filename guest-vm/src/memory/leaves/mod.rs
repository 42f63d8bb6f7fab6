//! `LeafIndex`: `KvmStage2`'s record of installed leaves — pure bookkeeping, no host calls.
//!
//! A leaf is one installed translation: a run of memfd frames at a guest-physical start, with
//! a page size, perms, a memory type and its write tracking (`Track`: `Armed` — the host
//! mapping is write-protected on the reservation's tracker, so its pages written since are
//! exactly what `PAGEMAP_SCAN` reports; `Unarmed` — counts as written whole by the next
//! harvest, which arms it; `Untracked` — the copy-back hot set's pages, counted as written
//! whole by every harvest and never armed). Besides the leaves (start GPA → leaf), the index
//! keeps what the common write-protect of a fork needs in O(log n):
//! - `writable`: exactly the starts of the leaves whose perms contain WRITE;
//! - `odd_ro`: the number of other leaves whose perms are not plain READ.
//!
//! Records are extents: a run of 4 KiB leaves over consecutive frames with the same
//! attributes is one record (a run installed by one `mmap`, or single pages that continue
//! one), until an unmap, protect, tracking change or replacement splits it; a large leaf is
//! one record.
//! The interface speaks leaves (`covering`, `range`, `take` answer per leaf), so callers
//! never see the extent boundaries; `writable` and `odd_ro` count records.
//!
//! Invariants (`check_invariants`, run in debug builds by `KvmStage2` after every change):
//! records are disjoint and aligned to their leaf size (start and frame), and only 4 KiB
//! leaves form extents of more than one; `writable` and `odd_ro`
//! are as above; only writable leaves are `Armed` or `Untracked` (a change of write
//! permission makes a leaf `Unarmed`: a leaf made writable starts unarmed, a leaf made
//! read-only leaves the tracker; a replaced leaf starts unarmed). Splitting a large leaf
//! refines the record only (the host mapping is one piece either way).

use std::collections::{BTreeMap, BTreeSet};

use ept::{MemType, PageSize, S2Perms, Translation, PAGE_SIZE};

/// The write tracking of a leaf; see the module documentation. Read-only leaves are always
/// `Unarmed` (they are not on the tracker at all).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Track {
    /// Not write-protected on the tracker: the next harvest reports it whole and arms it.
    Unarmed,
    /// Write-protected on the tracker: its pages written since are what a scan reports.
    Armed,
    /// Never write-protected (`ept::WriteTracking::Untracked`): every harvest reports it whole.
    Untracked,
}

/// One installed translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Leaf {
    pub pa: u64,
    pub size: PageSize,
    pub perms: S2Perms,
    pub mem_type: MemType,
    /// Write tracking (only writable leaves are ever other than `Unarmed`; fits in the padding).
    pub track: Track,
}

impl Leaf {
    pub fn translation(&self, gpa: u64) -> Translation {
        Translation {
            gpa,
            pa: self.pa,
            size: self.size,
            perms: self.perms,
            mem_type: self.mem_type,
            accessed: false,
            dirty: false,
        }
    }
}

/// A record: `pages` leaves of `size` at consecutive addresses over consecutive frames, with
/// one set of attributes (an extent; only 4 KiB leaves form extents of more than one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rec {
    pa: u64,
    pages: u32,
    size: PageSize,
    perms: S2Perms,
    mem_type: MemType,
    track: Track,
}

impl Rec {
    fn one(leaf: Leaf) -> Rec {
        Rec {
            pa: leaf.pa,
            pages: 1,
            size: leaf.size,
            perms: leaf.perms,
            mem_type: leaf.mem_type,
            track: leaf.track,
        }
    }

    fn bytes(&self) -> u64 {
        self.size.bytes() * u64::from(self.pages)
    }

    /// Leaf `i` of the extent.
    fn leaf(&self, i: u64) -> Leaf {
        Leaf {
            pa: self.pa + i * self.size.bytes(),
            size: self.size,
            perms: self.perms,
            mem_type: self.mem_type,
            track: self.track,
        }
    }

    /// Whether `next`, starting where this ends, continues it (one extent).
    fn continued_by(&self, next: &Rec) -> bool {
        self.size == PageSize::Size4K
            && next.size == PageSize::Size4K
            && self.pa + self.bytes() == next.pa
            && (self.perms, self.mem_type, self.track) == (next.perms, next.mem_type, next.track)
            && u64::from(self.pages) + u64::from(next.pages) <= u64::from(u32::MAX)
    }

    /// The leaves of the extent at `s` that start in `[gpa, end)`: (start, leaf).
    fn leaves_in(self, s: u64, gpa: u64, end: u64) -> impl Iterator<Item = (u64, Leaf)> {
        let size = self.size.bytes();
        let lo = gpa.saturating_sub(s).div_ceil(size);
        let hi = (end.saturating_sub(s).div_ceil(size)).min(u64::from(self.pages));
        (lo..hi).map(move |i| (s + i * size, self.leaf(i)))
    }
}

/// The installed leaves and their indexes; see the module documentation.
#[derive(Debug, Default)]
pub(crate) struct LeafIndex {
    recs: BTreeMap<u64, Rec>,
    /// Starts of the records whose perms contain WRITE.
    writable: BTreeSet<u64>,
    /// Records whose perms lack WRITE and are not plain READ.
    odd_ro: u64,
}

impl LeafIndex {
    /// Records (extents and large leaves) held.
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    /// The records as (start, bytes), in order.
    pub fn extents(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.recs.iter().map(|(&s, r)| (s, r.bytes()))
    }

    /// Installed 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.recs.values().map(|r| r.bytes() / PAGE_SIZE).sum()
    }

    /// Whether every read-only leaf is plain READ (the fast write-protect applies).
    pub fn read_only_is_plain(&self) -> bool {
        self.odd_ro == 0
    }

    /// The record covering `gpa`: (its start, the record).
    fn rec_covering(&self, gpa: u64) -> Option<(u64, Rec)> {
        let (&s, &r) = self.recs.range(..=gpa).next_back()?;
        (gpa - s < r.bytes()).then_some((s, r))
    }

    /// The leaf covering `gpa`: (its start, the leaf).
    pub fn covering(&self, gpa: u64) -> Option<(u64, Leaf)> {
        let (s, r) = self.rec_covering(gpa)?;
        let i = (gpa - s) / r.size.bytes();
        Some((s + i * r.size.bytes(), r.leaf(i)))
    }

    /// A leaf `[gpa, gpa+len)` overlaps, if any (the last one starting below its end).
    pub fn overlapping(&self, gpa: u64, len: u64) -> Option<(u64, Leaf)> {
        let end = gpa + len;
        let (&s, &r) = self.recs.range(..end).next_back()?;
        if s + r.bytes() <= gpa {
            return None;
        }
        let i = ((s + r.bytes()).min(end) - 1 - s) / r.size.bytes();
        Some((s + i * r.size.bytes(), r.leaf(i)))
    }

    /// Where iteration over `[gpa, ..)` must start: the record reaching into `gpa` from below.
    fn first_from(&self, gpa: u64) -> u64 {
        match self.recs.range(..gpa).next_back() {
            Some((&s, r)) if s + r.bytes() > gpa => s,
            _ => gpa,
        }
    }

    /// Leaves starting in `[gpa, gpa+len)`, in order.
    pub fn range(&self, gpa: u64, len: u64) -> impl Iterator<Item = (u64, Leaf)> + '_ {
        let end = gpa + len;
        self.recs
            .range(self.first_from(gpa)..end)
            .flat_map(move |(&s, &r)| r.leaves_in(s, gpa, end))
    }

    /// The writable leaves starting in `[gpa, gpa+len)`, in order (visits only them).
    pub fn writable_in(&self, gpa: u64, len: u64) -> impl Iterator<Item = (u64, Leaf)> + '_ {
        let end = gpa + len;
        self.writable
            .range(self.first_from(gpa)..end)
            .filter_map(|s| self.recs.get(s).map(|r| (*s, *r)))
            .flat_map(move |(s, r)| r.leaves_in(s, gpa, end))
    }

    /// The writable records inside `[gpa, gpa+len)`, clipped to it: (start, bytes, tracking),
    /// in order — one item per extent, not per leaf (visits only writable records).
    pub fn writable_tracks_in(
        &self,
        gpa: u64,
        len: u64,
    ) -> impl Iterator<Item = (u64, u64, Track)> + '_ {
        let end = gpa + len;
        self.writable
            .range(self.first_from(gpa)..end)
            .filter_map(move |s| {
                let r = self.recs.get(s)?;
                let (a, b) = ((*s).max(gpa), (*s + r.bytes()).min(end));
                (a < b).then_some((a, b - a, r.track))
            })
    }

    /// `writable_tracks_in` without the tracking: (start, bytes) per writable extent.
    pub fn writable_extents_in(&self, gpa: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.writable_tracks_in(gpa, len).map(|(s, l, _)| (s, l))
    }

    /// Sets the tracking of every writable leaf starting in `[gpa, gpa+len)` to `to(its
    /// tracking)` (visits only them); returns the 4 KiB pages whose tracking changed.
    pub fn retrack_in(&mut self, gpa: u64, len: u64, to: impl Fn(Track) -> Track) -> u64 {
        self.split_extent_at(gpa);
        self.split_extent_at(gpa + len);
        let mut changed = 0;
        for s in self.writable.range(gpa..gpa + len) {
            if let Some(r) = self.recs.get_mut(s) {
                let t = to(r.track);
                if t != r.track {
                    changed += r.bytes() / PAGE_SIZE;
                    r.track = t;
                }
            }
        }
        changed
    }

    /// Armed writable leaves starting in `[gpa, gpa+len)` become `Unarmed` (their host state
    /// is unknown after a failure: counted as written next time); untracked ones stay.
    pub fn disarm_in(&mut self, gpa: u64, len: u64) {
        self.retrack_in(gpa, len, |t| match t {
            Track::Armed => Track::Unarmed,
            other => other,
        });
    }

    /// Whether a writable leaf starts in `[gpa, gpa+len)`.
    pub fn any_writable_in(&self, gpa: u64, len: u64) -> bool {
        self.writable_in(gpa, len).next().is_some()
    }

    fn index(&mut self, start: u64, rec: &Rec, add: bool) {
        if rec.perms.contains(S2Perms::WRITE) {
            if add {
                self.writable.insert(start);
            } else {
                self.writable.remove(&start);
            }
        } else if rec.perms != S2Perms::READ {
            if add {
                self.odd_ro += 1;
            } else {
                self.odd_ro -= 1;
            }
        }
    }

    fn insert(&mut self, start: u64, rec: Rec) {
        if let Some(old) = self.recs.insert(start, rec) {
            self.index(start, &old, false);
        }
        self.index(start, &rec, true);
    }

    fn remove(&mut self, start: u64) -> Option<Rec> {
        let old = self.recs.remove(&start)?;
        self.index(start, &old, false);
        Some(old)
    }

    /// Splits the extent containing `addr` (if it starts before `addr`) at `addr`; large
    /// leaves are left alone.
    fn split_extent_at(&mut self, addr: u64) {
        if let Some((s, r)) = self.rec_covering(addr) {
            if s < addr && r.pages > 1 {
                let head = ((addr - s) / r.size.bytes()) as u32;
                self.insert(s, Rec { pages: head, ..r });
                let pa = r.pa + (addr - s);
                let pages = r.pages - head;
                self.insert(addr, Rec { pa, pages, ..r });
            }
        }
    }

    /// Merges the record at `start` with its neighbours where they continue each other.
    fn merge_around(&mut self, start: u64) {
        let Some(&rec) = self.recs.get(&start) else {
            return;
        };
        let mut start = start;
        let mut rec = rec;
        if let Some((&ps, &prev)) = self.recs.range(..start).next_back() {
            if ps + prev.bytes() == start && prev.continued_by(&rec) {
                self.remove(start);
                rec = Rec {
                    pages: prev.pages + rec.pages,
                    ..prev
                };
                start = ps;
                self.insert(start, rec);
            }
        }
        let end = start + rec.bytes();
        if let Some(&next) = self.recs.get(&end) {
            if rec.continued_by(&next) {
                self.remove(end);
                self.insert(
                    start,
                    Rec {
                        pages: rec.pages + next.pages,
                        ..rec
                    },
                );
            }
        }
    }

    /// Records `leaf` at `start` (replacing the leaf there), keeping the indexes true; a 4 KiB
    /// leaf joins the extents it continues.
    pub fn put(&mut self, start: u64, leaf: Leaf) {
        self.split_extent_at(start);
        self.split_extent_at(start + leaf.size.bytes());
        self.insert(start, Rec::one(leaf));
        self.merge_around(start);
    }

    /// Records the 4 KiB leaves `start + i·4 KiB` → `pa + i·4 KiB` (i < `pages`, at most
    /// `u32::MAX`), all `perms`, unarmed, as one extent, replacing the 4 KiB leaves there (the
    /// caller has checked that no large leaf overlaps).
    pub fn put_run(&mut self, start: u64, pa: u64, pages: u32, perms: S2Perms, mem_type: MemType) {
        let end = start + u64::from(pages) * PAGE_SIZE;
        self.split_extent_at(start);
        self.split_extent_at(end);
        let old: Vec<u64> = self.recs.range(start..end).map(|(&s, _)| s).collect();
        for s in old {
            self.remove(s);
        }
        let rec = Rec {
            pa,
            pages,
            size: PageSize::Size4K,
            perms,
            mem_type,
            track: Track::Unarmed,
        };
        self.insert(start, rec);
        self.merge_around(start);
    }

    /// Forgets the leaf at `start`, keeping the indexes true (`take_range` is what
    /// `KvmStage2` uses; this per-leaf form serves the model tests).
    #[cfg(test)]
    pub fn take(&mut self, start: u64) -> Option<Leaf> {
        self.split_extent_at(start);
        let size = self.recs.get(&start)?.size.bytes();
        self.split_extent_at(start + size);
        self.remove(start).map(|r| r.leaf(0))
    }

    /// Forgets every record starting in `[gpa, gpa+len)` after splitting extents at both ends
    /// (large leaves are the caller's to split); returns the 4 KiB pages forgotten.
    pub fn take_range(&mut self, gpa: u64, len: u64) -> u64 {
        self.split_extent_at(gpa);
        self.split_extent_at(gpa + len);
        let starts: Vec<u64> = self.recs.range(gpa..gpa + len).map(|(&s, _)| s).collect();
        let mut pages = 0;
        for s in starts {
            pages += self.remove(s).map_or(0, |r| r.bytes() / PAGE_SIZE);
        }
        pages
    }

    /// Sets the perms of every leaf starting in `[gpa, gpa+len)` to `perms`; a leaf whose
    /// write permission changes becomes `Unarmed` (armed or untracked before).
    pub fn set_perms_in(&mut self, gpa: u64, len: u64, perms: S2Perms) {
        self.split_extent_at(gpa);
        self.split_extent_at(gpa + len);
        let recs: Vec<(u64, Rec)> = self
            .recs
            .range(gpa..gpa + len)
            .map(|(&s, &r)| (s, r))
            .collect();
        for (start, rec) in recs {
            if rec.perms != perms {
                let keep = rec.perms.contains(S2Perms::WRITE) && perms.contains(S2Perms::WRITE);
                let track = if keep { rec.track } else { Track::Unarmed };
                self.insert(
                    start,
                    Rec {
                        perms,
                        track,
                        ..rec
                    },
                );
            }
        }
    }

    /// Every leaf starting in `[gpa, gpa+len)` becomes plain READ: one pass over the records
    /// and one bulk cut of the writable index. Requires `read_only_is_plain()` (so no record
    /// outside `writable` changes its class).
    pub fn mark_read_only(&mut self, gpa: u64, len: u64) {
        debug_assert!(self.read_only_is_plain());
        self.split_extent_at(gpa);
        self.split_extent_at(gpa + len);
        for rec in self.recs.range_mut(gpa..gpa + len).map(|(_, r)| r) {
            rec.perms = S2Perms::READ;
            rec.track = Track::Unarmed;
        }
        let mut inside = self.writable.split_off(&gpa);
        let mut after = inside.split_off(&(gpa + len));
        self.writable.append(&mut after);
    }

    /// Splits the extent or large leaf containing `addr` (if it starts before `addr`) until
    /// `addr` is a leaf boundary. (A large leaf splits into 512 separate records.)
    pub fn split_at(&mut self, addr: u64) {
        while let Some((start, rec)) = self.rec_covering(addr) {
            if start == addr {
                return;
            }
            if rec.pages > 1 {
                self.split_extent_at(addr);
                return;
            }
            let child = match rec.size {
                PageSize::Size1G => PageSize::Size2M,
                PageSize::Size2M => PageSize::Size4K,
                PageSize::Size4K => return,
            };
            self.remove(start);
            for i in 0..512 {
                let off = i * child.bytes();
                self.insert(
                    start + off,
                    Rec {
                        pa: rec.pa + off,
                        size: child,
                        ..rec
                    },
                );
            }
        }
    }

    /// Leaves in `[gpa, gpa+len)` after splitting at both ends: (start, leaf).
    pub fn split_range(&mut self, gpa: u64, len: u64) -> Vec<(u64, Leaf)> {
        self.split_at(gpa);
        self.split_at(gpa + len);
        self.range(gpa, len).collect()
    }

    /// The module invariants as code; panics on a violation.
    pub fn check_invariants(&self) {
        let mut prev_end = 0u64;
        let mut writable = 0usize;
        let mut odd_ro = 0u64;
        for (&start, rec) in &self.recs {
            let size = rec.size.bytes();
            assert!(
                start >= prev_end,
                "leaf at {start:#x} overlaps the one before"
            );
            assert!(
                start.is_multiple_of(size) && rec.pa.is_multiple_of(size),
                "misaligned leaf at {start:#x}"
            );
            assert!(
                rec.pages == 1 || (rec.pages > 1 && rec.size == PageSize::Size4K),
                "record at {start:#x}: {} leaves of {size:#x}",
                rec.pages
            );
            assert!(
                rec.track == Track::Unarmed || rec.perms.contains(S2Perms::WRITE),
                "read-only leaf {start:#x} is {:?}",
                rec.track
            );
            if rec.perms.contains(S2Perms::WRITE) {
                assert!(
                    self.writable.contains(&start),
                    "writable leaf {start:#x} not indexed"
                );
                writable += 1;
            } else if rec.perms != S2Perms::READ {
                odd_ro += 1;
            }
            prev_end = start + rec.bytes();
        }
        assert_eq!(
            writable,
            self.writable.len(),
            "writable index holds non-writable leaves"
        );
        assert_eq!(odd_ro, self.odd_ro, "odd read-only leaf count");
    }
}

#[cfg(test)]
mod tests;
