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

use std::sync::Arc;

use ept::{Access, EptTable, FaultInfo, FaultKind, HeapPhysMem, S2Perms, Stage2};
use vmo::{
    Error, FramePool, MapOptions, ResetPolicy, VmPerms, Vmar, Vmo, VmoFlags, PAGE_SIZE as P,
};

type Space = Vmar<EptTable<HeapPhysMem>>;

const PAGES: u64 = 4;
const PATTERN: u8 = 0x10;
/// Offset 1 of a page: the child's (and the child's fork's) guest mark.
const CHILD_MARK: u8 = 0xC0;
/// Offset 2: the parent guest's mark.
const PARENT_MARK: u8 = 0xA0;
/// Offset 3: the host's own write to the parent's Vmo.
const HOST_MARK: u8 = 0xB0;

fn table() -> EptTable<HeapPhysMem> {
    EptTable::new(HeapPhysMem::new()).unwrap()
}

fn iterations() -> usize {
    std::env::var("GUESTMEM_SHUTTLE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

/// A vCPU's store of `byte` at `gpa`: through the current translation if it is writable (under
/// the stage2 lock, as the hardware walks the live table), else a fault and a retry. Returns
/// whether the store happened; a refused fault (unmapped, read-only) ends the attempt.
fn guest_store(space: &Space, pool: &FramePool, gpa: u64, byte: u8) -> bool {
    let alloc = pool.allocator().clone();
    for _ in 0..4 {
        let present = space.with_stage2(|s| match s.query(gpa) {
            Some(t) if t.perms.contains(S2Perms::WRITE) => {
                let p = alloc.frame_ptr(t.pa_of(gpa));
                assert!(!p.is_null(), "{gpa:#x} translates to a frame nobody allocated");
                // SAFETY: `p` points into a heap slab of this pool's allocator, which keeps
                // every slab until it drops (the pool, held by the Vmos, outlives this call);
                // a byte store there is memory-safe even if the frame were wrongly freed —
                // and then the data checks at the end catch it.
                unsafe { p.write_volatile(byte) };
                None
            }
            other => Some(other.is_some()),
        });
        let Some(present) = present else {
            return true;
        };
        let kind = if present {
            FaultKind::Permission
        } else {
            FaultKind::NotPresent
        };
        match space.handle_fault(FaultInfo::new(gpa, Access::WRITE, kind)) {
            Ok(_) => {}
            Err(Error::NotFound | Error::AccessDenied) => return false,
            Err(e) => panic!("write fault at {gpa:#x}: {e:?}"),
        }
    }
    // Four faults, each undone before the store by a concurrent protect / reset / fork: a
    // livelock in a real guest only under this adversarial schedule; not a failure.
    false
}

/// Byte `off` of every page as `space` reads it (None where nothing is mapped).
fn view(space: &Space, off: u64) -> Vec<Option<u8>> {
    (0..PAGES)
        .map(|p| {
            let mut b = [0u8];
            space.read(p * P + off, &mut b).ok().map(|()| b[0])
        })
        .collect()
}

/// No writable translation of one space reaches a frame that another space's Vmo holds.
fn no_shared_writable(spaces: &[&Space]) {
    for (i, a) in spaces.iter().enumerate() {
        for p in 0..PAGES {
            let Some(t) = a.with_stage2(|s| s.query(p * P)) else {
                continue;
            };
            if !t.perms.contains(S2Perms::WRITE) {
                continue;
            }
            for (j, b) in spaces.iter().enumerate() {
                if i == j {
                    continue;
                }
                for q in 0..PAGES {
                    let Ok(info) = b.query(q * P) else { continue };
                    let offset = info.vmo_offset + (q * P - info.base);
                    let held = info.vmo.committed_frame(offset).unwrap();
                    assert!(
                        held.map(|f| f.paddr()) != Some(t.pa_of(p * P)),
                        "space {i} page {p} is writable onto a frame space {j} holds at page {q}"
                    );
                }
            }
        }
    }
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
    for p in 0..3usize {
        assert_eq!(parent_view[0][p], Some(PATTERN + p as u8), "P page {p}");
        assert_eq!(parent_view[2][p], Some(PARENT_MARK + p as u8), "P page {p}");
        assert_eq!(parent_view[1][p], Some(0), "P page {p} shows a child's store");
    }
    assert_eq!(parent_view[3][3], Some(0), "P page 3 was decommitted last");
    for (name, s) in [("C", &*child), ("G", &fork_c)] {
        for (p, b) in view(s, 2).into_iter().enumerate() {
            assert!(b.is_none() || b == Some(0), "{name} page {p} shows P's store {b:?}");
        }
        for (p, b) in view(s, 3).into_iter().enumerate() {
            assert!(b.is_none() || b == Some(0), "{name} page {p} shows the host's write");
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
