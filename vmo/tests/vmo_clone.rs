//! Snapshot and slice children: isolation, close orders, attribution, many children, races,
//! and a model-based random test. Every test ends with zero live frames.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use vmo::{ChildKind, Error, FramePool, Vmo, VmoFlags, PAGE_BYTES, PAGE_SIZE};

const P: u64 = PAGE_SIZE;

fn byte_at(vmo: &Vmo, off: u64) -> u8 {
    let mut b = [0u8; 1];
    vmo.read(off, &mut b).unwrap();
    b[0]
}

/// Distinct frames reachable from `vmos` (what the pool must hold, exactly).
fn distinct_frames(vmos: &[&Vmo]) -> u64 {
    let mut set = BTreeSet::new();
    for v in vmos {
        for off in (0..v.size()).step_by(P as usize) {
            if let Some(f) = v.committed_frame(off).unwrap() {
                set.insert(f.paddr());
            }
        }
    }
    set.len() as u64
}

#[test]
fn snapshot_behaves_as_an_eager_copy() {
    let pool = FramePool::heap();
    let parent = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
    parent.write(0, &[1; 4 * PAGE_BYTES]).unwrap();
    let child = parent.create_child(ChildKind::Snapshot, 0, 4 * P).unwrap();
    assert_eq!(pool.stats().live, 4, "creating a child copies nothing");
    assert_eq!(byte_at(&child, 5), 1);
    parent.write(5, &[2]).unwrap();
    child.write(P + 5, &[3]).unwrap();
    assert_eq!(
        byte_at(&child, 5),
        1,
        "child does not see the parent's later write"
    );
    assert_eq!(
        byte_at(&parent, P + 5),
        1,
        "parent does not see the child's write"
    );
    assert_eq!(byte_at(&child, P + 5), 3);
    assert_eq!(pool.stats().live, 6);
    assert_eq!(pool.stats().cow_copies, 2);
    drop(parent);
    assert_eq!(
        pool.stats().live,
        4,
        "the parent's private copy of page 0 is freed"
    );
    // The child now holds the only reference to pages 2 and 3: writes upgrade in place.
    let before = pool.stats().cow_copies;
    child.write(2 * P, &[4]).unwrap();
    assert_eq!(pool.stats().cow_copies, before);
    drop(child);
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn every_close_order_of_three_nodes() {
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    for order in orders {
        let pool = FramePool::heap();
        let p = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
        for i in 0..4u8 {
            p.write(i as u64 * P, &[10 + i]).unwrap();
        }
        let c = p.create_child(ChildKind::Snapshot, 0, 4 * P).unwrap();
        c.write(P, &[21]).unwrap();
        let g = c.create_child(ChildKind::Snapshot, 0, 4 * P).unwrap();
        g.write(2 * P, &[32]).unwrap();
        p.write(3 * P, &[43]).unwrap();
        // Expected contents per node, page by page.
        let expect: [[u8; 4]; 3] = [[10, 11, 12, 43], [10, 21, 12, 13], [10, 21, 32, 13]];
        // Attribution: every node holds 4 committed slots.
        for v in [&p, &c, &g] {
            assert_eq!(v.committed_bytes(), 4 * P);
        }
        let mut nodes: Vec<Option<Vmo>> = vec![Some(p), Some(c), Some(g)];
        assert_eq!(pool.stats().live, 7);
        for &closing in &order {
            nodes[closing] = None;
            let alive: Vec<&Vmo> = nodes.iter().flatten().collect();
            assert_eq!(
                pool.stats().live,
                distinct_frames(&alive),
                "order {order:?} after closing {closing}"
            );
            for (i, n) in nodes.iter().enumerate() {
                if let Some(v) = n {
                    for pg in 0..4 {
                        assert_eq!(
                            byte_at(v, pg * P),
                            expect[i][pg as usize],
                            "order {order:?} node {i} page {pg}"
                        );
                    }
                }
            }
        }
        assert_eq!(pool.stats().live, 0, "order {order:?}");
    }
}

#[test]
fn zero_page_writes_commit_only_in_the_writer() {
    let pool = FramePool::heap();
    let parent = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
    let child = parent.create_child(ChildKind::Snapshot, 0, 4 * P).unwrap();
    child.write(P, &[0]).unwrap();
    assert_eq!((parent.committed_bytes(), child.committed_bytes()), (0, P));
    parent.write(P, &[5]).unwrap();
    assert_eq!(byte_at(&child, P), 0);
    assert_eq!(pool.stats().live, 2);
    drop((parent, child));
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn children_past_the_parents_end_and_at_offsets() {
    let pool = FramePool::heap();
    let parent = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
    parent.write(0, &[1; 4 * PAGE_BYTES]).unwrap();
    let child = parent
        .create_child(ChildKind::Snapshot, 2 * P, 8 * P)
        .unwrap();
    assert_eq!(child.size(), 8 * P);
    assert_eq!(
        child.committed_bytes(),
        2 * P,
        "only the window's pages are attributed"
    );
    assert_eq!(byte_at(&child, 0), 1);
    assert_eq!(
        byte_at(&child, 2 * P),
        0,
        "past the parent's end reads zeros"
    );
    child.write(5 * P, &[9]).unwrap();
    assert_eq!(byte_at(&child, 5 * P), 9);
    let far = parent.create_child(ChildKind::Snapshot, 16 * P, P).unwrap();
    assert_eq!(byte_at(&far, 0), 0);
    drop((parent, child, far));
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn resize_parent_and_children() {
    let pool = FramePool::heap();
    let parent = Vmo::new(&pool, 4 * P, VmoFlags::RESIZABLE).unwrap();
    parent.write(0, &[1; 4 * PAGE_BYTES]).unwrap();
    let a = parent
        .create_child_with(ChildKind::Snapshot, 0, 4 * P, VmoFlags::RESIZABLE)
        .unwrap();
    let b = parent
        .create_child(ChildKind::Snapshot, 2 * P, 2 * P)
        .unwrap();
    parent.resize(P).unwrap();
    assert_eq!(
        byte_at(&a, 3 * P),
        1,
        "shrinking the parent leaves children intact"
    );
    assert_eq!(byte_at(&b, P), 1);
    a.resize(2 * P).unwrap();
    a.resize(4 * P).unwrap();
    assert_eq!(byte_at(&a, 3 * P), 0, "shrunk then grown: zeros");
    assert_eq!(
        b.resize(P),
        Err(Error::NotSupported),
        "child not created RESIZABLE"
    );
    assert_eq!(
        parent.create_child(ChildKind::Slice, 0, P).unwrap_err(),
        Error::NotSupported,
        "no slices of resizable parents"
    );
    drop((parent, a, b));
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn slices_share_pages() {
    let pool = FramePool::heap();
    let parent = Vmo::new(&pool, 8 * P, VmoFlags::empty()).unwrap();
    let slice = parent.create_child(ChildKind::Slice, 2 * P, 4 * P).unwrap();
    slice.write(10, &[7]).unwrap();
    assert_eq!(byte_at(&parent, 2 * P + 10), 7);
    parent.write(3 * P, &[8]).unwrap();
    assert_eq!(byte_at(&slice, P), 8);
    let inner = slice.create_child(ChildKind::Slice, P, P).unwrap();
    assert_eq!(byte_at(&inner, 0), 8);
    assert_eq!(slice.committed_bytes(), 2 * P);
    let mut b = [0u8; 2];
    assert_eq!(
        slice.read(4 * P - 1, &mut b),
        Err(Error::OutOfRange),
        "a slice ends where it ends"
    );
    let snap = slice.create_child(ChildKind::Snapshot, 0, 8 * P).unwrap();
    assert_eq!(byte_at(&snap, 10), 7);
    assert_eq!(snap.committed_bytes(), 2 * P, "only the slice's window");
    parent.write(2 * P + 10, &[1]).unwrap();
    assert_eq!(byte_at(&snap, 10), 7);
    drop((parent, slice, inner, snap));
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn many_children() {
    let pool = FramePool::heap();
    let parent = Vmo::new(&pool, 256 * P, VmoFlags::empty()).unwrap();
    for i in 0..256u64 {
        parent.write(i * P, &[i as u8]).unwrap();
    }
    let children: Vec<Vmo> = (0..128)
        .map(|_| {
            parent
                .create_child(ChildKind::Snapshot, 0, 256 * P)
                .unwrap()
        })
        .collect();
    // Writes in a permuted order.
    for k in 0..128u64 {
        let i = (k * 37) % 128;
        children[i as usize].write(i * P, &[200]).unwrap();
    }
    for (i, c) in children.iter().enumerate() {
        for pg in [0u64, i as u64, 255] {
            let want = if pg == i as u64 { 200 } else { pg as u8 };
            assert_eq!(byte_at(c, pg * P), want, "child {i} page {pg}");
        }
    }
    assert_eq!(pool.stats().live, 256 + 128);
    // Progressive discard: closing children one by one frees exactly their private page.
    let mut children = children;
    while let Some(c) = children.pop() {
        drop(c);
        assert_eq!(pool.stats().live, 256 + children.len() as u64);
    }
    drop(parent);
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn long_chain_of_snapshots() {
    let pool = FramePool::heap();
    let mut v = Vmo::new(&pool, 64 * P, VmoFlags::empty()).unwrap();
    v.write(0, &[1]).unwrap();
    let mut chain = Vec::new();
    for i in 0..1000u64 {
        let c = v.create_child(ChildKind::Snapshot, 0, 64 * P).unwrap();
        c.write((i % 64) * P + 1, &[i as u8]).unwrap();
        chain.push(v);
        v = c;
    }
    // The newest child reads through its own array: no walk up 1000 ancestors.
    assert_eq!(byte_at(&v, 0), 1);
    // Dropping the whole chain (oldest first) frees everything without deep recursion.
    drop(chain);
    assert_eq!(byte_at(&v, 0), 1);
    drop(v);
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn concurrent_create_write_close_race() {
    let pool = FramePool::heap();
    let parent = Vmo::new(&pool, 32 * P, VmoFlags::empty()).unwrap();
    parent.write(0, &[1; 32 * PAGE_BYTES]).unwrap();
    let parent = Arc::new(parent);
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let parent = parent.clone();
            std::thread::spawn(move || {
                for iter in 0..250u32 {
                    let child = parent.create_child(ChildKind::Snapshot, 0, 32 * P).unwrap();
                    let pg = (iter % 32) as u64;
                    child.write(pg * P + 1, &[t + 2]).unwrap();
                    assert_eq!(byte_at(&child, pg * P + 1), t + 2);
                    assert_eq!(byte_at(&child, ((pg + 1) % 32) * P), 1);
                    if t == 0 {
                        // One thread also writes the parent; children keep their snapshot.
                        let before = byte_at(&child, pg * P + 2);
                        parent.write(pg * P + 2, &[before.wrapping_add(1)]).unwrap();
                        assert_eq!(byte_at(&child, pg * P + 2), before);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(pool.stats().live, 32, "only the parent's pages remain");
    drop(parent);
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn concurrent_commits_of_one_page_commit_once() {
    let pool = FramePool::heap();
    let vmo = Arc::new(Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let vmo = vmo.clone();
            std::thread::spawn(move || {
                (0..200)
                    .map(|_| vmo.commit_on(1).unwrap().paddr())
                    .collect::<BTreeSet<_>>()
            })
        })
        .collect();
    let addrs: BTreeSet<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(addrs.len(), 1);
    assert_eq!(pool.stats().allocated, 1);
    drop(vmo);
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn reset_returns_to_the_reset_point_dropping_only_changed_pages() {
    let pool = FramePool::heap();
    let parent = Vmo::new(&pool, 8 * P, VmoFlags::empty()).unwrap();
    parent.write(0, &[1; 8 * PAGE_BYTES]).unwrap();
    let child = parent.create_child(ChildKind::Snapshot, 0, 8 * P).unwrap();
    assert_eq!(child.reset(), Err(Error::BadState), "no reset point yet");
    child.set_reset_point().unwrap();
    child.write(P, &[2]).unwrap();
    child.write(5 * P, &[3]).unwrap();
    assert_eq!(pool.stats().live, 10);
    assert_eq!(child.changed_pages(), vec![1, 5]);
    assert_eq!(child.reset().unwrap(), 2);
    assert_eq!(pool.stats().live, 8, "the two dirtied frames are freed");
    assert_eq!(byte_at(&child, P), 1);
    assert_eq!(byte_at(&child, 5 * P), 1);
    assert!(child.changed_pages().is_empty());
    drop((parent, child));
    assert_eq!(pool.stats().live, 0);
}

mod model {
    //! Random sequences of operations on a family of Vmos against a page-level model.
    use super::*;
    use proptest::prelude::*;

    const PAGES: u64 = 8;

    #[derive(Clone, Debug)]
    enum Op {
        Write { v: usize, page: u64, val: u8 },
        Read { v: usize, page: u64 },
        Commit { v: usize, page: u64 },
        Decommit { v: usize, page: u64 },
        Child { v: usize, offset: u64, size: u64 },
        Close { v: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..6usize, 0..PAGES, 1..255u8).prop_map(|(v, page, val)| Op::Write { v, page, val }),
            3 => (0..6usize, 0..PAGES).prop_map(|(v, page)| Op::Read { v, page }),
            1 => (0..6usize, 0..PAGES).prop_map(|(v, page)| Op::Commit { v, page }),
            1 => (0..6usize, 0..PAGES).prop_map(|(v, page)| Op::Decommit { v, page }),
            2 => (0..6usize, 0..4u64, 1..10u64).prop_map(|(v, offset, size)| Op::Child { v, offset, size }),
            1 => (0..6usize).prop_map(|v| Op::Close { v }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, .. ProptestConfig::default() })]
        #[test]
        fn random_sequences_match_the_model(ops in proptest::collection::vec(op(), 1..80)) {
            let pool = FramePool::heap();
            // Each live Vmo with its model: page → byte at offset 7 of that page.
            let mut vmos: Vec<(Vmo, HashMap<u64, u8>)> =
                vec![(Vmo::new(&pool, PAGES * P, VmoFlags::empty()).unwrap(), HashMap::new())];
            for op in ops {
                let op_desc = format!("{op:?}");
                if vmos.is_empty() {
                    vmos.push((Vmo::new(&pool, PAGES * P, VmoFlags::empty()).unwrap(), HashMap::new()));
                }
                let n = vmos.len();
                match op {
                    Op::Write { v, page, val } => {
                        let (vmo, model) = &mut vmos[v % n];
                        if page * P < vmo.size() {
                            vmo.write(page * P + 7, &[val]).unwrap();
                            model.insert(page, val);
                        }
                    }
                    Op::Read { v, page } => {
                        let (vmo, model) = &vmos[v % n];
                        if page * P < vmo.size() {
                            prop_assert_eq!(byte_at(vmo, page * P + 7), *model.get(&page).unwrap_or(&0));
                        }
                    }
                    Op::Commit { v, page } => {
                        let (vmo, _) = &vmos[v % n];
                        if page * P < vmo.size() {
                            vmo.commit(page * P, P).unwrap();
                        }
                    }
                    Op::Decommit { v, page } => {
                        let (vmo, model) = &mut vmos[v % n];
                        if page * P < vmo.size() {
                            vmo.decommit(page * P, P).unwrap();
                            model.remove(&page);
                        }
                    }
                    Op::Child { v, offset, size } => {
                        let (vmo, model) = &vmos[v % n];
                        let child = vmo.create_child(ChildKind::Snapshot, offset * P, size * P).unwrap();
                        let cm: HashMap<u64, u8> = model
                            .iter()
                            .filter(|(&p, _)| p >= offset && p < offset + size)
                            .map(|(&p, &b)| (p - offset, b))
                            .collect();
                        vmos.push((child, cm));
                    }
                    Op::Close { v } => {
                        vmos.remove(v % n);
                    }
                }
                let alive: Vec<&Vmo> = vmos.iter().map(|(v, _)| v).collect();
                prop_assert_eq!(pool.stats().live, distinct_frames(&alive));
                for v in &alive {
                    if let Err(e) = v.check_invariants() {
                        prop_assert!(false, "after {:?}: {}", op_desc, e);
                    }
                }
            }
            drop(vmos);
            prop_assert_eq!(pool.stats().live, 0);
        }
    }
}

/// Regression: xarray 0.1.1's cursor `remove` past the array's height hit the wrong slot; the
/// Vmo guards every removal. Writing pages one by one past each 64-slot boundary and
/// snapshotting must keep every page.
#[test]
fn pages_past_node_boundaries_survive_growth_and_snapshot() {
    let pool = FramePool::heap();
    let parent = Vmo::new(&pool, 300 * P, VmoFlags::empty()).unwrap();
    for i in 0..300u64 {
        parent.write(i * P, &[i as u8]).unwrap();
    }
    let c = parent
        .create_child(ChildKind::Snapshot, 0, 300 * P)
        .unwrap();
    c.write(0, &[200]).unwrap();
    for i in 1..300u64 {
        assert_eq!(byte_at(&parent, i * P), i as u8, "parent page {i}");
        assert_eq!(byte_at(&c, i * P), i as u8, "child page {i}");
    }
    assert_eq!(pool.stats().live, 301);
    drop((parent, c));
    assert_eq!(pool.stats().live, 0);
}
