//! The adaptive hot set of the copy-back reset (`ResetPolicy::Restore`): pages a reused child
//! writes in (nearly) every iteration stay writable and *untracked* in the backend
//! (`Stage2::set_write_tracking`), so the guest writes them without a tracking exit, and are
//! copied back at every reset; every other page stays tracked (its first write is still caught,
//! and may make it join the set). Off unless `Vmar::set_hot_set` turns it on; forks inherit the
//! policy with an empty set.
//!
//! Policy (`HotSetPolicy`), at every restore reset:
//! - a page the harvest reports written in `promote_after` consecutive resets joins the set
//!   (made untracked right after the harvest), while the set holds fewer than `max_pages`;
//! - at every `resample_every`-th reset that finds the set non-empty, the hot pages are
//!   tracked again before the harvest (which reports them, being unarmed, and arms them); the
//!   next reset's harvest says exactly which of them the guest wrote in that one iteration:
//!   those join again at once, the others leave;
//! - a backend answering `NotSupported` (EPT/NPT: their dirty bits cost the guest no exit)
//!   makes the policy inert for this address space: nothing is counted any more;
//! - a drop reset, a new reset point, a fork and a failed harvest forget the set (the pages
//!   were dropped or write-protected, which ends untracked in the backend; a page left
//!   untracked by a failure is reported by every harvest and simply joins again).
//!
//! Correctness does not depend on this file: the backend reports an untracked page as written
//! at every harvest, so every reset copies it back; the set only chooses which pages the guest
//! may write without an exit. Safety: only writable leaves can be untracked, the model installs
//! writable leaves for private frames only, and a fork write-protects them (ending untracked)
//! before any of their frames is shared.
//!
//! Invariants (`HotSet::check_invariants`, debug builds, after every change): `hot`, `streak`,
//! `resampled` and `judged` are ascending without duplicates; `hot` holds at most `max_pages`
//! pages and none of `streak`, `resampled` or `judged`; every streak count is at least 1.

use alloc::vec::Vec;

use ept::{Stage2, WriteTracking};

use super::Vmar;
use crate::{Error, Result, PAGE_SIZE};

/// When a page joins and leaves the copy-back hot set; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HotSetPolicy {
    /// Consecutive resets a page must be reported written in to join (at least 1).
    pub promote_after: u32,
    /// Resets between two re-trackings of the hot pages (at least 1).
    pub resample_every: u32,
    /// Most pages in the set: bounds what a reset copies back for pages the guest may no
    /// longer write (at least 1; `None` in `set_hot_set` turns the set off).
    pub max_pages: u64,
}

impl HotSetPolicy {
    /// Zero in any field → `InvalidArgs`.
    pub fn check(&self) -> Result<()> {
        if self.promote_after == 0 || self.resample_every == 0 || self.max_pages == 0 {
            return Err(Error::InvalidArgs);
        }
        Ok(())
    }
}

/// What the hot set has done (`Vmar::hot_set_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HotSetStats {
    /// Pages in the set now.
    pub pages: u64,
    /// Pages that joined (a page that leaves and joins again counts twice).
    pub promoted: u64,
    /// Pages that left at a resample (not written in their tracked iteration).
    pub demoted: u64,
    /// Resets that re-tracked the set.
    pub resamples: u64,
    /// The backend cannot leave pages untracked (`NotSupported`): the policy is inert.
    pub inert: bool,
    /// Tracking changes the backend refused otherwise (the pages stay reported, or tracked).
    pub backend_errors: u64,
}

/// The hot set of one address space (in `Space`, locked after the tree and before the stage2
/// lock); see the module documentation.
#[derive(Debug, Default)]
pub(crate) struct HotSet {
    policy: Option<HotSetPolicy>,
    /// Untracked pages (GPAs), ascending.
    hot: Vec<u64>,
    /// Pages (not hot) reported written by the last `n` consecutive harvests: (GPA, n).
    streak: Vec<(u64, u32)>,
    /// Hot pages re-tracked by the reset in progress (its harvest reports them unarmed, which
    /// says nothing about the guest's writes).
    resampled: Vec<u64>,
    /// Pages re-tracked by the previous reset: this reset's harvest judges them.
    judged: Vec<u64>,
    /// Resets since the last resample (or since the set was last empty).
    since_resample: u32,
    stats: HotSetStats,
}

/// Maximal runs `(start, len)` of ascending pages.
fn runs(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((s, l)) if *s + *l == p => *l += PAGE_SIZE,
            _ => out.push((p, PAGE_SIZE)),
        }
    }
    out
}

fn ascending(v: &[u64]) -> bool {
    v.windows(2).all(|w| w[0] < w[1])
}

impl HotSet {
    pub fn new(policy: Option<HotSetPolicy>) -> HotSet {
        HotSet {
            policy,
            ..HotSet::default()
        }
    }

    pub fn policy(&self) -> Option<HotSetPolicy> {
        self.policy
    }

    pub fn stats(&self) -> HotSetStats {
        HotSetStats {
            pages: self.hot.len() as u64,
            ..self.stats
        }
    }

    fn active(&self) -> Option<HotSetPolicy> {
        self.policy.filter(|_| !self.stats.inert)
    }

    /// Forgets every page (their backend state was reset by the caller's operation).
    pub fn forget(&mut self) {
        self.hot.clear();
        self.streak.clear();
        self.resampled.clear();
        self.judged.clear();
        self.since_resample = 0;
    }

    /// Before a reset's harvest: the hot pages to track again now, if a resample is due.
    pub fn begin_reset(&mut self) -> Vec<u64> {
        let Some(p) = self.active() else {
            return Vec::new();
        };
        // The clock runs while the set holds pages.
        if self.hot.is_empty() {
            self.since_resample = 0;
            return Vec::new();
        }
        self.since_resample = self.since_resample.saturating_add(1);
        if self.since_resample < p.resample_every {
            return Vec::new();
        }
        self.since_resample = 0;
        self.stats.resamples += 1;
        self.resampled = core::mem::take(&mut self.hot);
        self.resampled.clone()
    }

    /// After a successful harvest reporting `dirty` (GPAs): counts streaks, judges the pages
    /// re-tracked by the previous reset, and returns the pages to make untracked now (already
    /// in the set).
    pub fn observe(&mut self, dirty: &mut Vec<u64>) -> Vec<u64> {
        let Some(p) = self.active() else {
            return Vec::new();
        };
        if !ascending(dirty) {
            dirty.sort_unstable();
            dirty.dedup();
        }
        let resampled = core::mem::take(&mut self.resampled);
        let judged = core::mem::take(&mut self.judged);
        let old = core::mem::take(&mut self.streak);
        let mut streak = Vec::with_capacity(dirty.len());
        for &page in dirty.iter() {
            if self.hot.binary_search(&page).is_ok() {
                continue;
            }
            let n = if resampled.binary_search(&page).is_ok() {
                // Reported because it was untracked: no evidence either way. One tracked
                // write in the next iteration brings it back.
                p.promote_after - 1
            } else {
                let prev = old
                    .binary_search_by_key(&page, |e| e.0)
                    .map_or(0, |i| old[i].1);
                prev.saturating_add(1)
            };
            if n > 0 {
                streak.push((page, n));
            }
        }
        self.stats.demoted += judged
            .iter()
            .filter(|g| dirty.binary_search(g).is_err())
            .count() as u64;
        self.judged = resampled;
        let room = usize::try_from(p.max_pages)
            .unwrap_or(usize::MAX)
            .saturating_sub(self.hot.len());
        let promote: Vec<u64> = streak
            .iter()
            .filter(|e| e.1 >= p.promote_after)
            .map(|e| e.0)
            .take(room)
            .collect();
        if !promote.is_empty() {
            streak.retain(|e| promote.binary_search(&e.0).is_err());
            self.judged.retain(|g| promote.binary_search(g).is_err());
            self.hot.extend_from_slice(&promote);
            self.hot.sort_unstable();
            self.stats.promoted += promote.len() as u64;
        }
        self.streak = streak;
        promote
    }

    /// The invariants of the module documentation; `Err` names the first one broken.
    pub fn check_invariants(&self) -> core::result::Result<(), &'static str> {
        let streak: Vec<u64> = self.streak.iter().map(|e| e.0).collect();
        if !(ascending(&self.hot)
            && ascending(&streak)
            && ascending(&self.resampled)
            && ascending(&self.judged))
        {
            return Err("hot-set lists not ascending");
        }
        if self.streak.iter().any(|e| e.1 == 0) {
            return Err("streak count 0");
        }
        let max = self.policy.map_or(0, |p| p.max_pages);
        if self.hot.len() as u64 > max {
            return Err("hot set above max_pages");
        }
        let in_hot = |g: &u64| self.hot.binary_search(g).is_ok();
        if streak.iter().any(in_hot)
            || self.resampled.iter().any(in_hot)
            || self.judged.iter().any(in_hot)
        {
            return Err("a hot page is also counted or judged");
        }
        Ok(())
    }

    fn debug_check(&self) {
        if cfg!(debug_assertions) {
            if let Err(e) = self.check_invariants() {
                panic!("hot set: {e}");
            }
        }
    }
}

/// Applies `tracking` to each run of `pages` in `stage2`; counts refusals in `set`. Returns
/// `false` if the backend cannot leave pages untracked (`NotSupported`).
fn retrack<S: Stage2>(
    stage2: &mut S,
    set: &mut HotSet,
    pages: &[u64],
    tracking: WriteTracking,
) -> bool {
    for (s, l) in runs(pages) {
        match stage2.set_write_tracking(s, l, tracking) {
            Ok(_) => {}
            Err(ept::Error::NotSupported) => return false,
            Err(_) => set.stats.backend_errors += 1,
        }
    }
    true
}

impl HotSet {
    /// Before a restore reset's harvest (tree lock held, then this set's, then `stage2`'s).
    pub fn before_harvest<S: Stage2>(&mut self, stage2: &mut S) {
        let pages = self.begin_reset();
        // A refusal leaves pages untracked: they are still reported by every harvest.
        if !retrack(stage2, self, &pages, WriteTracking::Tracked) {
            self.make_inert();
        }
        self.debug_check();
    }

    /// After a successful harvest of `dirty` (GPAs, modified: sorted): promotes.
    pub fn after_harvest<S: Stage2>(&mut self, stage2: &mut S, dirty: &mut Vec<u64>) {
        let promote = self.observe(dirty);
        // A page the backend refuses stays tracked, or is untracked and reported: either is
        // correct, and it stays in the set until the next resample judges it.
        if !retrack(stage2, self, &promote, WriteTracking::Untracked) {
            self.make_inert();
        }
        self.debug_check();
    }

    fn make_inert(&mut self) {
        self.forget();
        self.stats.inert = true;
    }

    /// Replaces the policy; returns the hot pages, which the caller tracks again.
    fn replace(&mut self, policy: Option<HotSetPolicy>) -> Vec<u64> {
        let pages = core::mem::take(&mut self.hot);
        self.forget();
        self.policy = policy;
        self.stats = HotSetStats::default();
        pages
    }
}

impl<S: Stage2 + Send + 'static> Vmar<S> {
    /// Turns the copy-back hot set on with `policy`, or off (`None`, the default); any page
    /// in the set is tracked again first. Root handle only (`NotSupported` otherwise); a zero
    /// field → `InvalidArgs`; a backend failure re-tracking a page → that error, with the
    /// policy unchanged (the page is still reported by every harvest). Forks inherit the
    /// policy, with an empty set.
    pub fn set_hot_set(&self, policy: Option<HotSetPolicy>) -> Result<()> {
        if self.region != super::tree::ROOT {
            return Err(Error::NotSupported);
        }
        if let Some(p) = policy {
            p.check()?;
        }
        let _tree = self.space.tree.write();
        let mut set = self.space.hot.lock();
        let mut stage2 = self.space.stage2.lock();
        for (s, l) in runs(&set.hot) {
            match stage2.set_write_tracking(s, l, WriteTracking::Tracked) {
                Ok(_) | Err(ept::Error::NotSupported) => {}
                Err(e) => return Err(e.into()),
            }
        }
        drop(set.replace(policy));
        set.debug_check();
        Ok(())
    }

    /// The hot set's policy (`None`: off).
    pub fn hot_set(&self) -> Option<HotSetPolicy> {
        self.space.hot.lock().policy()
    }

    /// What the hot set has done since the policy was last set.
    pub fn hot_set_stats(&self) -> HotSetStats {
        self.space.hot.lock().stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn policy(promote_after: u32, resample_every: u32, max_pages: u64) -> HotSetPolicy {
        HotSetPolicy {
            promote_after,
            resample_every,
            max_pages,
        }
    }

    /// One reset: the resample's pages, then the promotions for `dirty`.
    fn reset(set: &mut HotSet, dirty: &[u64]) -> (Vec<u64>, Vec<u64>) {
        let re = set.begin_reset();
        let mut d = dirty.to_vec();
        let pr = set.observe(&mut d);
        set.check_invariants().unwrap();
        (re, pr)
    }

    #[test]
    fn streaks_promote_and_a_break_resets_them() {
        let mut s = HotSet::new(Some(policy(3, 100, 10)));
        assert_eq!(reset(&mut s, &[P, 2 * P]).1, Vec::<u64>::new());
        // Page 2 breaks its streak; page 1 keeps it.
        assert_eq!(reset(&mut s, &[P]).1, Vec::<u64>::new());
        assert_eq!(reset(&mut s, &[P, 2 * P]).1, vec![P]);
        assert_eq!(s.stats().pages, 1);
        // A hot page reported again is not counted again.
        assert_eq!(reset(&mut s, &[P, 2 * P]).1, Vec::<u64>::new());
        assert_eq!(reset(&mut s, &[P, 2 * P]).1, vec![2 * P]);
        assert_eq!(s.stats().promoted, 2);
    }

    #[test]
    fn a_resample_keeps_written_pages_and_drops_the_rest() {
        let mut s = HotSet::new(Some(policy(2, 4, 10)));
        reset(&mut s, &[P, 2 * P]);
        assert_eq!(reset(&mut s, &[P, 2 * P]).1, vec![P, 2 * P]);
        for _ in 0..3 {
            assert_eq!(reset(&mut s, &[P, 2 * P]), (vec![], vec![]));
        }
        // The fourth reset with a non-empty set tracks the hot pages again; its harvest
        // reports them (unarmed), which promotes nothing.
        let (re, pr) = reset(&mut s, &[P, 2 * P]);
        assert_eq!((re, pr), (vec![P, 2 * P], vec![]));
        assert_eq!(s.stats().pages, 0);
        // The tracked iteration wrote page 1 only: it is back at once, page 2 left.
        let (re, pr) = reset(&mut s, &[P]);
        assert_eq!((re, pr), (vec![], vec![P]));
        assert_eq!((s.stats().demoted, s.stats().resamples), (1, 1));
    }

    #[test]
    fn the_cap_bounds_the_set_and_promote_after_one_works() {
        let mut s = HotSet::new(Some(policy(1, 2, 2)));
        assert_eq!(reset(&mut s, &[P, 2 * P, 3 * P]).1, vec![P, 2 * P]);
        assert_eq!(reset(&mut s, &[P, 2 * P, 3 * P]).1, Vec::<u64>::new());
        // Resample: nothing promoted on the void report, page 3 waits for room.
        let (re, pr) = reset(&mut s, &[P, 2 * P, 3 * P]);
        assert_eq!((re, pr), (vec![P, 2 * P], vec![3 * P]));
        let (_, pr) = reset(&mut s, &[P, 3 * P]);
        assert_eq!(pr, vec![P]);
        assert_eq!(s.stats().demoted, 1);
        assert!(s.stats().pages <= 2);
    }

    #[test]
    fn unsorted_input_and_bad_policies() {
        let mut s = HotSet::new(Some(policy(1, 8, 8)));
        let mut d = vec![3 * P, P, 3 * P];
        assert_eq!(s.observe(&mut d), vec![P, 3 * P]);
        s.check_invariants().unwrap();
        assert_eq!(policy(0, 1, 1).check(), Err(Error::InvalidArgs));
        assert_eq!(policy(1, 0, 1).check(), Err(Error::InvalidArgs));
        assert_eq!(policy(1, 1, 0).check(), Err(Error::InvalidArgs));
        let mut off = HotSet::new(None);
        assert!(reset(&mut off, &[P]).1.is_empty());
    }

    #[test]
    fn runs_group_adjacent_pages() {
        assert_eq!(
            runs(&[0, P, 3 * P, 4 * P, 9 * P]),
            vec![(0, 2 * P), (3 * P, 2 * P), (9 * P, P)]
        );
    }
}
