//! Interleavings of the fault path, fork, reset, protect, unmap and the Vmo page lock +
//! observer protocol, explored by shuttle over the real vmo code (the crate's locks are
//! shuttle's under the `shuttle` feature: `src/sync.rs` says why shuttle and not loom).
//!
//! One execution builds a small space (a 4-page Vmo mapped RW into a parent `P`, a fork `C`
//! taken before the threads start) on the software backend (`EptTable` over `HeapPhysMem`),
//! then runs five threads against it:
//! - P's guest stores the parent's mark into pages 0..3 (fault, then store through the
//!   translation, as a vCPU does);
//! - C's guest stores the child's mark the same way;
//! - C's host side resets C (copy-back restore) and protects page 1 read-only and back;
//! - a forker forks P (into `F`, whose bytes it reads at once) and C (into `G`);
//! - an observer-side thread writes and decommits P's Vmo directly (the host's own access,
//!   which reaches the mappings through the Vmo's observers) and unmaps page 2 of C.
//!
//! At the end of every execution: every space's translations match its Vmos (`check_invariants`),
//! no writable translation reaches a frame another space's Vmo holds, no space shows a mark it
//! could not have (P never the child's, C and G never the parent's, F exactly what it held right
//! after its fork), and once everything is dropped no frame is live.
//!
//! Iterations: `GUESTMEM_SHUTTLE_ITERS` executions per scheduler (random and PCT depth 3),
//! default 1500. Only built with `--features shuttle`:
//! `cargo test --release -p vmo --features shuttle --test interleave`.
#![cfg(feature = "shuttle")]

mod concurrent;

use std::sync::Arc;

use concurrent::{guest_store, no_shared_writable, table, view, Space, PAGES};
use ept::{Access, FaultInfo, FaultKind};
use vmo::{FramePool, MapOptions, ResetPolicy, VmPerms, Vmo, VmoFlags, PAGE_SIZE as P};

const PATTERN: u8 = 0x10;
/// Offset 1 of a page: the child's (and the child's fork's) guest mark.
const CHILD_MARK: u8 = 0xC0;
/// Offset 2: the parent guest's mark.
const PARENT_MARK: u8 = 0xA0;
/// Offset 3: the host's own write to the parent's Vmo.
const HOST_MARK: u8 = 0xB0;

fn iterations() -> usize {
    std::env::var("GUESTMEM_SHUTTLE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

fn execution() {
    let pool = FramePool::heap();
    let vmo = Vmo::new(&pool, PAGES * P, VmoFlags::empty()).unwrap();
    let parent = Space::new_root(16 * P, table()).unwrap();
    parent.set_fault_around(2);
    parent
        .map(&vmo, 0, PAGES * P, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    for p in 0..PAGES {
        parent.write(p * P, &[PATTERN + p as u8]).unwrap();
    }
    assert!(guest_store(&parent, &pool, 0, PATTERN));
    let child = Arc::new(parent.fork(table()).unwrap());
    child
        .handle_fault(FaultInfo::new(0, Access::READ, FaultKind::NotPresent))
        .unwrap();
    let parent = Arc::new(parent);

    let p_guest = {
        let (parent, pool) = (parent.clone(), pool.clone());
        shuttle::thread::spawn(move || {
            for p in 0..3 {
                assert!(
                    guest_store(&parent, &pool, p * P + 2, PARENT_MARK + p as u8),
                    "the parent's own RW mapping refused a write"
                );
            }
        })
    };
    let c_guest = {
        let (child, pool) = (child.clone(), pool.clone());
        shuttle::thread::spawn(move || {
            for p in 0..3 {
                guest_store(&child, &pool, p * P + 1, CHILD_MARK + p as u8);
            }
        })
    };
    let c_host = {
        let child = child.clone();
        shuttle::thread::spawn(move || {
            child.reset_with(ResetPolicy::Restore).unwrap();
            child.protect(P, P, VmPerms::READ).unwrap();
            child.protect(P, P, VmPerms::RW).unwrap();
        })
    };
    let forker = {
        let (parent, child) = (parent.clone(), child.clone());
        shuttle::thread::spawn(move || {
            let f = parent.fork(table()).unwrap();
            let at_fork: Vec<_> = (0..4).map(|off| view(&f, off)).collect();
            let g = child.fork(table()).unwrap();
            (f, at_fork, g)
        })
    };
    let observer = {
        let (vmo, child) = (vmo.clone(), child.clone());
        shuttle::thread::spawn(move || {
            vmo.write(3 * P + 3, &[HOST_MARK + 3]).unwrap();
            child.unmap(2 * P, P).unwrap();
            vmo.decommit(3 * P, P).unwrap();
        })
    };
    for t in [p_guest, c_guest, c_host, observer] {
        t.join().unwrap();
    }
    let (fork_p, at_fork, fork_c) = forker.join().unwrap();

    for (name, s) in [
        ("P", &*parent),
        ("C", &*child),
        ("F", &fork_p),
        ("G", &fork_c),
    ] {
        s.check_invariants()
            .unwrap_or_else(|e| panic!("space {name}: {e}"));
    }
    no_shared_writable(&[&parent, &child, &fork_p, &fork_c]);

    let parent_view: Vec<_> = (0..4).map(|off| view(&parent, off)).collect();
    for p in 0..3u8 {
        let i = usize::from(p);
        assert_eq!(parent_view[0][i], Some(PATTERN + p), "P page {p}");
        assert_eq!(parent_view[2][i], Some(PARENT_MARK + p), "P page {p}");
        assert_eq!(
            parent_view[1][i],
            Some(0),
            "P page {p} shows a child's store"
        );
    }
    assert_eq!(parent_view[3][3], Some(0), "P page 3 was decommitted last");
    for (name, s) in [("C", &*child), ("G", &fork_c)] {
        for (p, b) in view(s, 2).into_iter().enumerate() {
            assert!(
                b.is_none() || b == Some(0),
                "{name} page {p} shows P's store {b:?}"
            );
        }
        for (p, b) in view(s, 3).into_iter().enumerate() {
            assert!(
                b.is_none() || b == Some(0),
                "{name} page {p} shows the host's write"
            );
        }
    }
    let now: Vec<_> = (0..4).map(|off| view(&fork_p, off)).collect();
    assert_eq!(now, at_fork, "F changed after its fork returned");

    drop((fork_p, fork_c));
    drop(Arc::try_unwrap(child).unwrap());
    drop(Arc::try_unwrap(parent).unwrap());
    drop(vmo);
    assert_eq!(pool.stats().live, 0, "frames leaked: {:?}", pool.stats());
}

#[test]
fn fault_fork_reset_protect_unmap_random() {
    shuttle::check_random(execution, iterations());
}

#[test]
fn fault_fork_reset_protect_unmap_pct() {
    shuttle::check_pct(execution, iterations(), 3);
}
