//! Page-range bookkeeping shared by `KvmStage2`, its leaf index and the reservation:
//! `RangeSet` (disjoint, coalesced guest-physical ranges) and `runs` (coalescing sorted
//! pieces). Pure, no host calls.

use std::collections::BTreeMap;

/// A set of page-aligned guest-physical ranges (start → end), kept disjoint and coalesced:
/// the pages whose written state a write-protect would otherwise erase (`KvmStage2`), the
/// deferred write-protects (`Reservation`).
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

    /// The ranges (start, end), ascending.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }

    /// Bytes covered.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(&s, &e)| e - s).sum()
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
}
