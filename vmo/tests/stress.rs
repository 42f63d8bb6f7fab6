//! Stress: four OS threads for a bounded time against one small family of address spaces on
//! the software backend — a parent guest faulting and storing, a child guest doing the same,
//! a host thread resetting the child (both policies), protecting, unmapping and remapping its
//! pages and writing / decommitting the parent's Vmo directly, and a forker forking parent and
//! child and faulting in the forks before dropping them. The interleaving test (shuttle) covers
//! the schedules systematically on a few operations; this one covers long histories at full
//! speed (release in CI).
//!
//! Checked: every operation's result is one the concurrent history allows (a refused fault is
//! `NotFound` or `AccessDenied`, everything else succeeds); every fork reads, right after it was
//! made, no mark its source could not hold, and keeps its bytes while its source runs on; at teardown every space's translations match its
//! Vmos, no writable translation reaches a frame another space holds, the parent shows none of
//! the child's stores, and once everything is dropped no frame is live.
//!
//! Duration: `GUESTMEM_STRESS_SECS` (default 10 in release, 1 in debug).
#![cfg(not(feature = "shuttle"))]

mod concurrent;

use std::sync::Arc;
use std::time::{Duration, Instant};

use concurrent::{guest_store, no_shared_writable, table, view, Space, PAGES};
use ept::{Access, FaultInfo, FaultKind};
use vmo::{FramePool, MapOptions, ResetPolicy, VmPerms, Vmo, VmoFlags, PAGE_SIZE as P};

// Marks: the high nibble says who stored (the low one varies, so a store that lands where it
// must not changes bytes even where that writer stored before).
const CHILD_MARK: u8 = 0xC0;
const PARENT_MARK: u8 = 0xA0;
const HOST_MARK: u8 = 0xB0;

fn duration() -> Duration {
    let default = if cfg!(debug_assertions) { 1 } else { 10 };
    let secs = std::env::var("GUESTMEM_STRESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Duration::from_secs(secs)
}

/// xorshift64: a per-thread operation schedule.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn four_threads_fault_fork_reset_protect_unmap() {
    let pool = FramePool::heap();
    let vmo = Vmo::new(&pool, PAGES * P, VmoFlags::empty()).unwrap();
    let parent = Space::new_root(16 * P, table()).unwrap();
    parent
        .map(&vmo, 0, PAGES * P, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    let child = parent.fork(table()).unwrap();
    let (parent, child) = (Arc::new(parent), Arc::new(child));
    let end = Instant::now() + duration();

    let spawn = |seed: u64, f: Box<dyn Fn(&mut Rng) + Send>| {
        std::thread::spawn(move || {
            let mut rng = Rng(seed);
            let mut ops = 0u64;
            while Instant::now() < end {
                f(&mut rng);
                ops += 1;
            }
            ops
        })
    };
    let threads = vec![
        {
            let (parent, pool) = (parent.clone(), pool.clone());
            spawn(
                1,
                Box::new(move |rng| {
                    let p = rng.below(PAGES);
                    guest_store(&parent, &pool, p * P + 2, PARENT_MARK | rng.below(16) as u8);
                }),
            )
        },
        {
            let (child, pool) = (child.clone(), pool.clone());
            spawn(
                2,
                Box::new(move |rng| {
                    let p = rng.below(PAGES);
                    guest_store(&child, &pool, p * P + 1, CHILD_MARK | rng.below(16) as u8);
                }),
            )
        },
        {
            let (child, vmo) = (child.clone(), vmo.clone());
            spawn(
                3,
                Box::new(move |rng| {
                    let p = rng.below(PAGES);
                    match rng.below(6) {
                        0 => drop(child.reset_with(ResetPolicy::Restore).unwrap()),
                        1 => drop(child.reset_with(ResetPolicy::Drop).unwrap()),
                        2 => {
                            child.protect(p * P, P, VmPerms::READ).unwrap();
                            child.protect(p * P, P, VmPerms::RW).unwrap();
                        }
                        3 => {
                            let info = child.query(p * P).unwrap();
                            let offset = info.vmo_offset + (p * P - info.base);
                            child.unmap(p * P, P).unwrap();
                            child
                                .map(
                                    &info.vmo,
                                    offset,
                                    P,
                                    MapOptions::specific(p * P, VmPerms::RW),
                                )
                                .unwrap();
                        }
                        4 => vmo.write(p * P + 3, &[HOST_MARK + p as u8]).unwrap(),
                        _ => vmo.decommit(p * P, P).unwrap(),
                    }
                }),
            )
        },
        {
            let (parent, child) = (parent.clone(), child.clone());
            spawn(
                4,
                Box::new(move |rng| {
                    let from_parent = rng.below(2) == 0;
                    let source = if from_parent { &parent } else { &child };
                    let fork = source.fork(table()).unwrap();
                    let at_fork: Vec<_> = (0..4).map(|off| view(&fork, off)).collect();
                    let forbidden = if from_parent { CHILD_MARK } else { PARENT_MARK };
                    for (p, b) in at_fork[if from_parent { 1 } else { 2 }].iter().enumerate() {
                        assert_ne!(b.map(|b| b & 0xF0), Some(forbidden), "fork page {p}");
                    }
                    let p = rng.below(PAGES);
                    let write = FaultInfo::new(p * P, Access::WRITE, FaultKind::NotPresent);
                    match fork.handle_fault(write) {
                        Ok(_) => {}
                        // The child's page was between the host thread's unmap and remap, or
                        // protect and unprotect, when the fork was taken.
                        Err(vmo::Error::NotFound | vmo::Error::AccessDenied) if !from_parent => {}
                        Err(e) => panic!("write fault in a fork: {e:?}"),
                    }
                    // Nobody else touches the fork: while its source's guest keeps storing,
                    // its bytes stay what they were when the fork returned.
                    for _ in 0..16 {
                        std::thread::yield_now();
                    }
                    let now: Vec<_> = (0..4).map(|off| view(&fork, off)).collect();
                    assert_eq!(now, at_fork, "a fork changed after it was taken");
                    fork.check_invariants().unwrap();
                }),
            )
        },
    ];
    let ops: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    println!("stress: {ops:?} operations per thread in {:?}", duration());
    assert!(ops.iter().all(|&n| n > 0));

    for (name, s) in [("parent", &*parent), ("child", &*child)] {
        s.check_invariants()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    no_shared_writable(&[&parent, &child]);
    for (p, b) in view(&parent, 1).into_iter().enumerate() {
        assert_eq!(b, Some(0), "parent page {p} shows the child's store");
    }
    for (p, b) in view(&child, 2).into_iter().enumerate() {
        assert!(
            b.is_none() || b == Some(0),
            "child page {p} shows the parent's store"
        );
    }
    drop(Arc::try_unwrap(child).unwrap());
    drop(Arc::try_unwrap(parent).unwrap());
    drop(vmo);
    assert_eq!(pool.stats().live, 0, "frames leaked: {:?}", pool.stats());
}
