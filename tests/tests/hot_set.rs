//! The copy-back reset's hot set (`Vmar::set_hot_set`, `Stage2::set_write_tracking`) on every
//! backend. Everywhere: after every iteration the child is the snapshot plus exactly its own
//! writes, every restore reset returns it to the snapshot byte for byte, the parent and a
//! grandchild forked while pages are hot never change, frame accounting is exact (a restore
//! reset neither frees nor allocates here) and 0 at teardown. On EPT/NPT (dirty bits, no exit
//! to save) the policy is inert. On KVM a page written every iteration becomes untracked — the
//! harvest reports it without a scan — yet is copied back at every reset, a page that stops
//! being written leaves the set at the next resample, and a fork or turning the policy off
//! ends untracked.

use std::collections::BTreeMap;

use conformance::{for_each_backend, Backend, Rng, SoftCpu};
use ept::WriteTracking;
use vmo::{Error, FramePool, HotSetPolicy, MapOptions, ResetPolicy, VmPerms, Vmar, Vmo, VmoFlags};

const P: u64 = vmo::PAGE_SIZE;
const PAGES: u64 = 48;
/// Written in every iteration (1–3 one run, 8 alone).
const HOT: [u64; 4] = [1, 2, 3, 8];
/// Written in iterations `0..=FADE_LAST` only.
const FADE: u64 = 10;
const FADE_LAST: usize = 5;
const POLICY: HotSetPolicy = HotSetPolicy {
    promote_after: 2,
    resample_every: 4,
    max_pages: 16,
};

fn bytes<S: ept::Stage2 + Send + 'static>(vmar: &Vmar<S>) -> Vec<u8> {
    let mut all = vec![0u8; (PAGES * P) as usize];
    vmar.read(0, &mut all).unwrap();
    all
}

/// A parent with its first 32 pages written (the snapshot), forked once; the child has the
/// hot set on.
fn forked<B: Backend>() -> (FramePool, Vmar<B::S>, Vmar<B::S>, Vmo) {
    let pool = B::pool();
    let parent = Vmar::new_root(1 << 30, B::stage2(&pool)).unwrap();
    let ram = Vmo::new(&pool, PAGES * P, VmoFlags::empty()).unwrap();
    parent
        .map(&ram, 0, PAGES * P, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    let mut cpu = SoftCpu::new(&parent, &pool);
    for page in 0..32 {
        cpu.write_u8(page * P + 7, page as u8 + 1).unwrap();
    }
    let child = parent.fork(B::stage2(&pool)).unwrap();
    child.set_hot_set(Some(POLICY)).unwrap();
    assert_eq!(child.hot_set(), Some(POLICY));
    (pool, parent, child, ram)
}

fn tracking<B: Backend>(vmar: &Vmar<B::S>, page: u64) -> Option<WriteTracking> {
    vmar.with_stage2(|s| B::write_tracking(s, page * P))
}

fn all_untracked<B: Backend>(vmar: &Vmar<B::S>, pages: &[u64]) -> bool {
    pages
        .iter()
        .all(|&p| tracking::<B>(vmar, p) == Some(WriteTracking::Untracked))
}

/// One iteration of the child: the hot pages, the fading page while it lasts, three random
/// pages and one write through the model; returns what the child must read afterwards and
/// the number of pages written.
fn iterate<B: Backend>(
    child: &Vmar<B::S>,
    pool: &FramePool,
    snapshot: &[u8],
    it: usize,
    rng: &mut Rng,
) -> (Vec<u8>, usize) {
    let mut writes: BTreeMap<u64, u8> = BTreeMap::new();
    let mut cpu = SoftCpu::new(child, pool);
    let mut put = |cpu: &mut SoftCpu<'_, B::S>, at: u64, v: u8| {
        cpu.write_u8(at, v).unwrap();
        writes.insert(at, v);
    };
    for &p in &HOT {
        put(&mut cpu, p * P + 100 + it as u64, 0xc0 + it as u8);
    }
    if it <= FADE_LAST {
        put(&mut cpu, FADE * P + 5, 0xf0 + it as u8);
    }
    // Alternate halves: no random page is written in two consecutive iterations, so only
    // HOT and FADE ever make a streak.
    for _ in 0..3 {
        let page = 16 + (it as u64 % 2) * 16 + rng.below(16);
        put(&mut cpu, page * P + rng.below(P), 0x40 + it as u8);
    }
    child.write(40 * P + 3, &[0xee]).unwrap();
    writes.insert(40 * P + 3, 0xee);
    let mut want = snapshot.to_vec();
    for (&at, &v) in &writes {
        want[at as usize] = v;
    }
    let pages = writes
        .keys()
        .map(|a| a / P)
        .collect::<std::collections::BTreeSet<_>>();
    (want, pages.len())
}

fn resets_stay_exact_with_a_hot_set<B: Backend>() {
    let (pool, parent, child, ram) = forked::<B>();
    let snapshot = bytes(&parent);
    let mut rng = Rng(0x407);
    let kvm = child.with_stage2(|s| B::untracked_reported(s)).is_some();
    for it in 0..12 {
        let (want, written) = iterate::<B>(&child, &pool, &snapshot, it, &mut rng);
        assert_eq!(
            bytes(&child),
            want,
            "{}: child = snapshot + its writes, {it}",
            B::NAME
        );
        let live = pool.stats().live;
        let hot_before = child.hot_set_stats().pages;
        let reported = child.with_stage2(|s| B::untracked_reported(s));
        let stats = child.reset_with(ResetPolicy::Restore).unwrap();
        assert_eq!(bytes(&child), snapshot, "{} reset {it}", B::NAME);
        assert_eq!(
            bytes(&parent),
            snapshot,
            "{}: the parent never changes",
            B::NAME
        );
        assert!(
            stats.restored >= written as u64 && stats.dropped == 0,
            "{}: {stats:?} for {written} written pages",
            B::NAME
        );
        assert_eq!(
            pool.stats().live,
            live,
            "{}: a restore keeps every frame",
            B::NAME
        );
        child.check_invariants().unwrap();
        let hs = child.hot_set_stats();
        if !kvm {
            // EPT/NPT: the backend cannot leave a page untracked, so the policy is inert.
            assert_eq!(hs.pages, 0, "{}", B::NAME);
            assert_eq!(hs.inert, it >= 1, "{}: {hs:?}", B::NAME);
            continue;
        }
        assert!(!hs.inert && hs.backend_errors == 0, "{hs:?}");
        // Hot pages were reported by the untracked path, not scanned (a resample reset
        // re-tracks them before its harvest, which then reports them as unarmed).
        let now = child.with_stage2(|s| B::untracked_reported(s));
        if it != 5 && it != 10 {
            assert_eq!(
                now.unwrap() - reported.unwrap(),
                hot_before,
                "reset {it}: {hs:?}"
            );
        }
        match it {
            0 => assert_eq!(hs.pages, 0, "one written reset is not a streak"),
            // HOT and FADE joined at the second reset; the clock runs from the next one.
            1..=4 => {
                assert_eq!(hs.pages, 5, "reset {it}: {hs:?}");
                assert!(all_untracked::<B>(&child, &HOT), "reset {it}: {hs:?}");
                assert_eq!(tracking::<B>(&child, FADE), Some(WriteTracking::Untracked));
            }
            // The fourth reset with a non-empty set tracks the set again …
            5 | 10 => {
                assert_eq!(hs.pages, 0, "{hs:?}");
                assert_eq!(hs.resamples, if it == 5 { 1 } else { 2 });
                for &p in &HOT {
                    assert_eq!(tracking::<B>(&child, p), Some(WriteTracking::Tracked));
                }
            }
            // … and the next one keeps what the tracked iteration wrote; the fading page
            // (not written since iteration FADE_LAST) left.
            6 => {
                assert_eq!((hs.pages, hs.demoted), (4, 1), "{hs:?}");
                assert!(all_untracked::<B>(&child, &HOT), "{hs:?}");
                assert_eq!(tracking::<B>(&child, FADE), Some(WriteTracking::Tracked));
            }
            _ => {
                assert_eq!(hs.pages, 4, "reset {it}: {hs:?}");
                assert!(all_untracked::<B>(&child, &HOT), "reset {it}");
            }
        }
    }
    if kvm {
        assert_eq!(child.hot_set_stats().promoted, 5 + 4 + 4);
    }

    // A fork while pages are hot: the child's frames become shared, which ends untracked,
    // and neither the grandchild nor the parent sees the child's later writes.
    let mut cpu = SoftCpu::new(&child, &pool);
    for &p in &HOT {
        cpu.write_u8(p * P, 0x5a).unwrap();
    }
    let grandchild = child.fork(B::stage2(&pool)).unwrap();
    let seen = bytes(&grandchild);
    for &p in &HOT {
        assert_ne!(
            tracking::<B>(&child, p),
            Some(WriteTracking::Untracked),
            "{}: a shared frame stays untracked",
            B::NAME
        );
    }
    assert_eq!(child.hot_set_stats().pages, 0, "a fork forgets the set");
    let mut cpu = SoftCpu::new(&child, &pool);
    for &p in &HOT {
        cpu.write_u8(p * P + 1, 0xa5).unwrap();
    }
    child.reset_with(ResetPolicy::Restore).unwrap();
    assert_eq!(bytes(&child), snapshot, "{}", B::NAME);
    assert_eq!(
        bytes(&grandchild),
        seen,
        "{}: the grandchild is untouched",
        B::NAME
    );
    assert_eq!(bytes(&parent), snapshot);
    drop(grandchild);

    // Turning the policy off tracks every page again; resets stay exact.
    for it in 0..3 {
        iterate::<B>(&child, &pool, &snapshot, 20 + it, &mut rng);
        child.reset_with(ResetPolicy::Restore).unwrap();
        assert_eq!(bytes(&child), snapshot);
    }
    child.set_hot_set(None).unwrap();
    assert_eq!(child.hot_set(), None);
    for p in 0..PAGES {
        assert_ne!(tracking::<B>(&child, p), Some(WriteTracking::Untracked));
    }
    iterate::<B>(&child, &pool, &snapshot, 30, &mut rng);
    child.reset_with(ResetPolicy::Restore).unwrap();
    assert_eq!(bytes(&child), snapshot, "{}", B::NAME);
    child.reset_with(ResetPolicy::Drop).unwrap();
    assert_eq!(bytes(&child), snapshot, "{}", B::NAME);
    for v in [&parent, &child] {
        v.check_invariants().unwrap();
    }
    drop((child, parent, ram));
    assert_eq!(pool.stats().live, 0, "{}", B::NAME);
}

/// Bad policies are errors, never panics; a sub-region handle cannot set one.
fn bad_hot_set_policies_are_refused<B: Backend>() {
    let pool = B::pool();
    let root = Vmar::new_root(1 << 30, B::stage2(&pool)).unwrap();
    for bad in [
        HotSetPolicy {
            promote_after: 0,
            ..POLICY
        },
        HotSetPolicy {
            resample_every: 0,
            ..POLICY
        },
        HotSetPolicy {
            max_pages: 0,
            ..POLICY
        },
    ] {
        assert_eq!(root.set_hot_set(Some(bad)), Err(Error::InvalidArgs));
    }
    assert_eq!(root.hot_set(), None, "a refused policy changes nothing");
    let sub = root
        .allocate(vmo::Placement::Specific(0), 1 << 20, VmPerms::MAY_ALL)
        .unwrap();
    assert_eq!(sub.set_hot_set(Some(POLICY)), Err(Error::NotSupported));
}

for_each_backend!(
    resets_stay_exact_with_a_hot_set,
    bad_hot_set_policies_are_refused,
);
