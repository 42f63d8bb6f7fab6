//! `LeafIndex`: `KvmStage2`'s record of installed leaves — pure bookkeeping, no host calls.
//!
//! A leaf is one installed translation: a run of memfd frames at a guest-physical start, with
//! a page size, perms, a memory type and whether write tracking is armed on it (`armed`: the
//! host mapping is write-protected on the reservation's tracker, so its pages written since
//! are exactly what `PAGEMAP_SCAN` reports; an unarmed writable leaf counts as written
//! whole). Besides the leaves (start GPA → leaf), the index
//! keeps what the common write-protect of a fork needs in O(log n):
//! - `writable`: exactly the starts of the leaves whose perms contain WRITE;
//! - `odd_ro`: the number of other leaves whose perms are not plain READ.
//!
//! Invariants (`check_invariants`, run in debug builds by `KvmStage2` after every change):
//! leaves are disjoint and aligned to their size (start and frame); `writable` and `odd_ro`
//! are as above; only writable leaves are armed (a perms change disarms: a leaf made writable
//! is unarmed, a leaf made read-only leaves the tracker). Splitting a large leaf refines the record only (the host mapping is one
//! piece either way).

use std::collections::{BTreeMap, BTreeSet};

use ept::{MemType, PageSize, S2Perms, Translation, PAGE_SIZE};

/// One installed translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Leaf {
    pub pa: u64,
    pub size: PageSize,
    pub perms: S2Perms,
    pub mem_type: MemType,
    /// Write tracking is armed (only ever on writable leaves; fits in the padding).
    pub armed: bool,
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

/// The installed leaves and their indexes; see the module documentation.
#[derive(Debug, Default)]
pub(crate) struct LeafIndex {
    leaves: BTreeMap<u64, Leaf>,
    writable: BTreeSet<u64>,
    odd_ro: u64,
}

impl LeafIndex {
    pub fn len(&self) -> usize {
        self.leaves.len()
    }

    /// Installed 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.leaves
            .values()
            .map(|l| l.size.bytes() / PAGE_SIZE)
            .sum()
    }

    /// Whether every read-only leaf is plain READ (the fast write-protect applies).
    pub fn read_only_is_plain(&self) -> bool {
        self.odd_ro == 0
    }

    /// The leaf covering `gpa`: (its start, the leaf).
    pub fn covering(&self, gpa: u64) -> Option<(u64, Leaf)> {
        let (&s, &l) = self.leaves.range(..=gpa).next_back()?;
        (gpa < s + l.size.bytes()).then_some((s, l))
    }

    /// The leaf `[gpa, gpa+len)` overlaps, if any (the last one starting below its end).
    pub fn overlapping(&self, gpa: u64, len: u64) -> Option<(u64, Leaf)> {
        let (&s, &l) = self.leaves.range(..gpa + len).next_back()?;
        (s + l.size.bytes() > gpa).then_some((s, l))
    }

    /// Leaves starting in `[gpa, gpa+len)`, in order.
    pub fn range(&self, gpa: u64, len: u64) -> impl Iterator<Item = (u64, Leaf)> + '_ {
        self.leaves.range(gpa..gpa + len).map(|(&s, &l)| (s, l))
    }

    /// The writable leaves starting in `[gpa, gpa+len)`, in order (visits only them).
    pub fn writable_in(&self, gpa: u64, len: u64) -> impl Iterator<Item = (u64, Leaf)> + '_ {
        self.writable
            .range(gpa..gpa + len)
            .filter_map(|s| self.leaves.get(s).map(|l| (*s, *l)))
    }

    /// Sets `armed` of the writable leaves starting in `[gpa, gpa+len)` (visits only them).
    pub fn set_armed_in(&mut self, gpa: u64, len: u64, armed: bool) {
        for s in self.writable.range(gpa..gpa + len) {
            if let Some(l) = self.leaves.get_mut(s) {
                l.armed = armed;
            }
        }
    }

    /// Whether a leaf with WRITE starts in `[gpa, gpa+len)`.
    pub fn any_writable_in(&self, gpa: u64, len: u64) -> bool {
        self.writable.range(gpa..gpa + len).next().is_some()
    }

    fn index(&mut self, start: u64, leaf: &Leaf, add: bool) {
        if leaf.perms.contains(S2Perms::WRITE) {
            if add {
                self.writable.insert(start);
            } else {
                self.writable.remove(&start);
            }
        } else if leaf.perms != S2Perms::READ {
            if add {
                self.odd_ro += 1;
            } else {
                self.odd_ro -= 1;
            }
        }
    }

    /// Records `leaf` at `start` (replacing any leaf there), keeping the indexes true.
    pub fn put(&mut self, start: u64, leaf: Leaf) {
        if let Some(old) = self.leaves.insert(start, leaf) {
            self.index(start, &old, false);
        }
        self.index(start, &leaf, true);
    }

    /// Forgets the leaf at `start`, keeping the indexes true.
    pub fn take(&mut self, start: u64) -> Option<Leaf> {
        let old = self.leaves.remove(&start)?;
        self.index(start, &old, false);
        Some(old)
    }

    /// Sets the perms of every leaf starting in `[gpa, gpa+len)` to `perms`; a leaf whose
    /// write permission changes is disarmed.
    pub fn set_perms_in(&mut self, gpa: u64, len: u64, perms: S2Perms) {
        let starts: Vec<u64> = self.range(gpa, len).map(|(s, _)| s).collect();
        for start in starts {
            if let Some(&leaf) = self.leaves.get(&start) {
                if leaf.perms != perms {
                    let keep =
                        leaf.perms.contains(S2Perms::WRITE) && perms.contains(S2Perms::WRITE);
                    let armed = leaf.armed && keep;
                    self.put(
                        start,
                        Leaf {
                            perms,
                            armed,
                            ..leaf
                        },
                    );
                }
            }
        }
    }

    /// Every leaf starting in `[gpa, gpa+len)` becomes plain READ: one pass over the records
    /// and one bulk cut of the writable index. Requires `read_only_is_plain()` (so no leaf
    /// outside `writable` changes its class).
    pub fn mark_read_only(&mut self, gpa: u64, len: u64) {
        debug_assert!(self.read_only_is_plain());
        for leaf in self.leaves.range_mut(gpa..gpa + len).map(|(_, l)| l) {
            leaf.perms = S2Perms::READ;
            leaf.armed = false;
        }
        let mut inside = self.writable.split_off(&gpa);
        let mut after = inside.split_off(&(gpa + len));
        self.writable.append(&mut after);
    }

    /// Splits the large leaf containing `addr` (if it starts before `addr`) until `addr` is a
    /// leaf boundary.
    pub fn split_at(&mut self, addr: u64) {
        while let Some((start, leaf)) = self.covering(addr) {
            if start == addr {
                return;
            }
            let child = match leaf.size {
                PageSize::Size1G => PageSize::Size2M,
                PageSize::Size2M => PageSize::Size4K,
                PageSize::Size4K => return,
            };
            self.take(start);
            for i in 0..512 {
                let off = i * child.bytes();
                self.put(
                    start + off,
                    Leaf {
                        pa: leaf.pa + off,
                        size: child,
                        ..leaf
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
        for (&start, leaf) in &self.leaves {
            let len = leaf.size.bytes();
            assert!(
                start >= prev_end,
                "leaf at {start:#x} overlaps the one before"
            );
            assert!(
                start.is_multiple_of(len) && leaf.pa.is_multiple_of(len),
                "misaligned leaf at {start:#x}"
            );
            assert!(
                !leaf.armed || leaf.perms.contains(S2Perms::WRITE),
                "read-only leaf {start:#x} armed"
            );
            if leaf.perms.contains(S2Perms::WRITE) {
                assert!(
                    self.writable.contains(&start),
                    "writable leaf {start:#x} not indexed"
                );
                writable += 1;
            } else if leaf.perms != S2Perms::READ {
                odd_ro += 1;
            }
            prev_end = start + len;
        }
        assert_eq!(
            writable,
            self.writable.len(),
            "writable index holds non-writable leaves"
        );
        assert_eq!(odd_ro, self.odd_ro, "odd read-only leaf count");
    }
}

/// A set of page-aligned guest-physical ranges (start → end), kept disjoint and coalesced:
/// the pages whose written state a write-protect would otherwise erase (see `KvmStage2`).
#[derive(Debug, Default)]
pub(crate) struct RangeSet {
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// Adds `[start, end)`, merging with what it overlaps or touches.
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.ranges.remove(&s);
            }
        }
        let inside: Vec<(u64, u64)> = self
            .ranges
            .range(start..=end)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in inside {
            end = end.max(e);
            self.ranges.remove(&s);
        }
        self.ranges.insert(start, end);
    }

    /// Removes `[start, end)` and returns the removed pieces, ascending.
    pub fn take(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut first = start;
        if let Some((&s, _)) = self.ranges.range(..start).next_back() {
            first = s;
        }
        let hit: Vec<(u64, u64)> = self
            .ranges
            .range(first..end)
            .map(|(&s, &e)| (s, e))
            .filter(|&(_, e)| e > start)
            .collect();
        for (s, e) in hit {
            self.ranges.remove(&s);
            if s < start {
                self.ranges.insert(s, start);
            }
            if e > end {
                self.ranges.insert(end, e);
            }
            out.push((s.max(start), e.min(end)));
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Disjoint, non-touching, non-empty ranges; panics otherwise.
    pub fn check_invariants(&self) {
        let mut prev = None;
        for (&s, &e) in &self.ranges {
            assert!(s < e, "empty range at {s:#x}");
            if let Some(p) = prev {
                assert!(s > p, "ranges touch or overlap at {s:#x}");
            }
            prev = Some(e);
        }
    }
}

/// Coalesces sorted (start, len) pieces into maximal adjacent runs.
pub(crate) fn runs(pieces: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, l) in pieces {
        match out.last_mut() {
            Some((ps, pl)) if *ps + *pl == s => *pl += l,
            _ => out.push((s, l)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const M2: u64 = 2 << 20;

    fn leaf(pa: u64, size: PageSize, perms: S2Perms) -> Leaf {
        Leaf {
            pa,
            size,
            perms,
            mem_type: MemType::WriteBack,
            armed: false,
        }
    }

    #[test]
    fn range_set_merges_and_takes_pieces() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(20, 25);
        r.insert(5, 12);
        r.check_invariants();
        assert_eq!(r.take(0, 100), vec![(5, 25), (30, 40)]);
        assert!(r.is_empty());
        r.insert(0, 100);
        assert_eq!(r.take(10, 20), vec![(10, 20)]);
        assert_eq!(r.take(95, 200), vec![(95, 100)]);
        r.check_invariants();
        assert_eq!(r.take(0, 95), vec![(0, 10), (20, 95)]);
        r.insert(7, 7);
        assert!(r.is_empty());
    }

    #[test]
    fn runs_coalesce_only_adjacent_pieces() {
        assert_eq!(runs([(0, 4), (4, 4), (12, 4)]), vec![(0, 8), (12, 4)]);
        assert_eq!(runs([]), vec![]);
    }

    #[test]
    fn split_refines_a_large_leaf_and_keeps_the_indexes() {
        let mut ix = LeafIndex::default();
        ix.put(M2, leaf(4 * M2, PageSize::Size2M, S2Perms::RW));
        let got = ix.split_range(M2 + PAGE_SIZE, PAGE_SIZE);
        assert_eq!(
            got,
            vec![(
                M2 + PAGE_SIZE,
                leaf(4 * M2 + PAGE_SIZE, PageSize::Size4K, S2Perms::RW)
            )]
        );
        assert_eq!(ix.len(), 512);
        assert_eq!(ix.pages(), 512);
        ix.check_invariants();
        ix.mark_read_only(M2, M2);
        assert!(!ix.any_writable_in(0, 4 * M2));
        ix.check_invariants();
        ix.set_perms_in(M2, PAGE_SIZE, S2Perms::RWX);
        assert!(!ix.read_only_is_plain() || ix.any_writable_in(M2, PAGE_SIZE));
        ix.check_invariants();
        assert_eq!(ix.covering(M2 + 5).unwrap().0, M2);
        assert_eq!(ix.overlapping(0, M2), None);
    }

    #[test]
    fn armed_follows_write_permission_and_survives_splits() {
        let mut ix = LeafIndex::default();
        ix.put(M2, leaf(4 * M2, PageSize::Size2M, S2Perms::RW));
        ix.put(0, leaf(0, PageSize::Size4K, S2Perms::READ));
        ix.put(PAGE_SIZE, leaf(PAGE_SIZE, PageSize::Size4K, S2Perms::RW));
        ix.set_armed_in(0, 2 * M2, true);
        let armed: Vec<(u64, bool)> = ix
            .writable_in(0, 2 * M2)
            .map(|(s, l)| (s, l.armed))
            .collect();
        assert_eq!(armed, vec![(PAGE_SIZE, true), (M2, true)]);
        assert!(
            !ix.covering(0).unwrap().1.armed,
            "read-only leaves are never armed"
        );
        // Splitting keeps the state; a perms change that keeps WRITE keeps it too.
        ix.split_range(M2 + PAGE_SIZE, PAGE_SIZE);
        assert!(ix.covering(M2 + 9 * PAGE_SIZE).unwrap().1.armed);
        ix.set_perms_in(M2, PAGE_SIZE, S2Perms::RWX);
        assert!(ix.covering(M2).unwrap().1.armed);
        // Losing WRITE disarms, and regaining it does not re-arm.
        ix.set_perms_in(M2 + PAGE_SIZE, PAGE_SIZE, S2Perms::READ);
        ix.set_perms_in(M2 + PAGE_SIZE, PAGE_SIZE, S2Perms::RW);
        assert!(!ix.covering(M2 + PAGE_SIZE).unwrap().1.armed);
        ix.mark_read_only(PAGE_SIZE, PAGE_SIZE);
        assert!(!ix.covering(PAGE_SIZE).unwrap().1.armed);
        ix.check_invariants();
    }

    /// Random put / take / split / protect traffic against a page-level model: after every
    /// step the invariants hold and every page's record matches the model.
    #[test]
    fn matches_a_page_model_under_random_traffic() {
        const PAGES: u64 = 2048;
        let mut ix = LeafIndex::default();
        let mut model: BTreeMap<u64, S2Perms> = BTreeMap::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2_000 {
            let r = next();
            let page = r % PAGES;
            let perms = [S2Perms::READ, S2Perms::RW, S2Perms::RWX][(r >> 20) as usize % 3];
            let len = (1 + next() % 600).min(PAGES - page);
            match (r >> 16) % 5 {
                0 if ix.overlapping(page * PAGE_SIZE, PAGE_SIZE).is_none() => {
                    ix.put(
                        page * PAGE_SIZE,
                        leaf(page * PAGE_SIZE, PageSize::Size4K, perms),
                    );
                    model.insert(page, perms);
                }
                1 => {
                    let slot = (page / 512) * 512;
                    if ix.overlapping(slot * PAGE_SIZE, M2).is_none() {
                        ix.put(
                            slot * PAGE_SIZE,
                            leaf(slot * PAGE_SIZE, PageSize::Size2M, perms),
                        );
                        model.extend((slot..slot + 512).map(|p| (p, perms)));
                    }
                }
                2 => {
                    for (s, _) in ix.split_range(page * PAGE_SIZE, len * PAGE_SIZE) {
                        ix.take(s);
                    }
                    for p in page..page + len {
                        model.remove(&p);
                    }
                }
                3 if ix.read_only_is_plain() => {
                    ix.split_range(page * PAGE_SIZE, len * PAGE_SIZE);
                    ix.mark_read_only(page * PAGE_SIZE, len * PAGE_SIZE);
                    for p in page..page + len {
                        model.entry(p).and_modify(|m| *m = S2Perms::READ);
                    }
                }
                _ => {
                    ix.split_range(page * PAGE_SIZE, len * PAGE_SIZE);
                    ix.set_perms_in(page * PAGE_SIZE, len * PAGE_SIZE, perms);
                    for p in page..page + len {
                        model.entry(p).and_modify(|m| *m = perms);
                    }
                }
            }
            ix.check_invariants();
            for p in (0..PAGES).step_by(5) {
                let got = ix.covering(p * PAGE_SIZE).map(|(_, l)| l.perms);
                assert_eq!(got, model.get(&p).copied(), "page {p}");
            }
            assert_eq!(ix.pages(), model.len() as u64);
        }
    }
}
