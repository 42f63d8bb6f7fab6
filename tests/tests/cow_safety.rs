//! The copy-on-write safety rule (issue 12 item 2, DESIGN.md "Fast paths"), on every backend: a
//! frame shared with another address space is never writable through any view, so a child
//! writing through every path the model offers leaves its parent and its sibling unchanged
//! byte for byte.
//!
//! Paths exercised in one child: guest writes through the software CPU (copy-on-write faults,
//! writes crossing pages, in-place upgrades after a protect), host writes (`Vmo::write` on shared
//! and private pages), fault-around installs (reads), streaming fault-around (sequential writes
//! into uncommitted memory), a `Vmar::protect` round trip, a reset, and all of these again after
//! a dirty harvest. After every phase: each space's `check_invariants`, and no writable
//! translation of any space translates to a frame that another space's Vmos hold.

use std::collections::BTreeSet;

use conformance::{for_each_backend, harvest, Backend, SoftCpu};
use ept::Stage2;
use vmo::{FramePool, MapOptions, VmPerms, Vmar, Vmo, VmoFlags};

const P: u64 = vmo::PAGE_SIZE;
const PAGES: u64 = 64;
/// The parent writes pages `0..WRITTEN`; the rest stays uncommitted (streaming commits there).
const WRITTEN: u64 = 48;

/// Every byte of the space's first `PAGES` pages as its guest reads them.
fn contents<S: conformance::BackendTable>(vmar: &Vmar<S>, pool: &FramePool) -> Vec<u8> {
    let mut buf = vec![0u8; (PAGES * P) as usize];
    SoftCpu::new(vmar, pool).read(0, &mut buf).unwrap();
    buf
}

/// Every byte of the space's first `PAGES` pages as its Vmo holds them (commits nothing).
fn host_contents<S: Stage2 + Send + 'static>(vmar: &Vmar<S>) -> Vec<u8> {
    let mut buf = vec![0u8; (PAGES * P) as usize];
    vmar.query(0).unwrap().vmo.read(0, &mut buf).unwrap();
    buf
}

/// The frames the space's Vmos hold for its first `PAGES` pages (shared or private).
fn held<S: Stage2 + Send + 'static>(vmar: &Vmar<S>) -> BTreeSet<u64> {
    (0..PAGES)
        .filter_map(|page| {
            let m = vmar.query(page * P).ok()?;
            let frame = m
                .vmo
                .committed_frame(m.vmo_offset + page * P - m.base)
                .ok()??;
            Some(frame.paddr())
        })
        .collect()
}

/// The rule itself, plus each space's own invariants.
fn assert_no_shared_frame_is_writable<S: Stage2 + Send + 'static>(spaces: &[&Vmar<S>], when: &str) {
    let held: Vec<BTreeSet<u64>> = spaces.iter().map(|v| held(v)).collect();
    for (i, v) in spaces.iter().enumerate() {
        v.check_invariants()
            .unwrap_or_else(|e| panic!("{when}: space {i}: {e}"));
        for page in 0..PAGES {
            let Some(t) = v.with_stage2(|s| s.query(page * P)) else {
                continue;
            };
            if !t.perms.contains(ept::S2Perms::WRITE) {
                continue;
            }
            let pa = t.pa_of(page * P);
            for (j, other) in held.iter().enumerate().filter(|(j, _)| *j != i) {
                assert!(
                    !other.contains(&pa),
                    "{when}: space {i} page {page} writable to frame {pa:#x} held by space {j}"
                );
            }
        }
    }
}

/// A dirty harvest of the whole space (every backend tracks writes).
fn harvest_step<B: Backend>(vmar: &Vmar<B::S>) {
    if let Err(e) = harvest(vmar, 0, PAGES * P) {
        panic!("harvest on {}: {e}", B::NAME);
    }
}

/// One round of writes through every path into `child`; `round` varies the bytes.
fn write_every_path<B: Backend>(child: &Vmar<B::S>, pool: &FramePool, round: u8) {
    let mut cpu = SoftCpu::new(child, pool);
    // Fault-around: reads install shared neighbours (read-only).
    for page in [0u64, 20, 40] {
        cpu.read_u8(page * P).unwrap();
    }
    // Guest writes: copy-on-write faults, one write crossing into the next page.
    for page in [1u64, 3, 21, 22, 41] {
        cpu.write_u8(page * P + 17, 0xa0 | round).unwrap();
    }
    cpu.write(5 * P + P - 3, &[0xb0 | round; 8]).unwrap();
    // Streaming fault-around: sequential writes into uncommitted memory.
    for page in WRITTEN..WRITTEN + 4 {
        cpu.write_u8(page * P + 1, 0xc0 | round).unwrap();
    }
    // Host writes through the child's Vmo: a shared page, a private page, across pages.
    let m = child.query(0).unwrap();
    m.vmo.write(30 * P + 9, &[0xd0 | round; 4]).unwrap();
    m.vmo.write(P + 100, &[0xd1 | round; 4]).unwrap();
    m.vmo.write(33 * P - 2, &[0xd2 | round; 4]).unwrap();
    // A protect round trip, then writes that upgrade private pages in place and copy shared
    // ones.
    child.protect(0, PAGES * P, VmPerms::READ).unwrap();
    child.protect(0, PAGES * P, VmPerms::RW).unwrap();
    for page in [1u64, 3, 10, 35] {
        cpu.write_u8(page * P + 200, 0xe0 | round).unwrap();
    }
}

fn forked_siblings_stay_isolated<B: Backend>() {
    let pool = B::pool();
    let parent = Vmar::new_root(1 << 30, B::stage2(&pool)).unwrap();
    let ram = Vmo::new(&pool, PAGES * P, VmoFlags::empty()).unwrap();
    parent
        .map(&ram, 0, PAGES * P, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    {
        let mut cpu = SoftCpu::new(&parent, &pool);
        for page in 0..WRITTEN {
            cpu.write(page * P, &[page as u8 + 1; 64]).unwrap();
        }
    }
    parent.set_stream_fault_around(8); // forks inherit it
    let a = parent.fork(B::stage2(&pool)).unwrap();
    let b = parent.fork(B::stage2(&pool)).unwrap();
    let spaces = [&parent, &a, &b];
    // The parent and the sibling read the written pages (installing the shared frames
    // read-only) but not the uncommitted rest (the child streams there); their view is what
    // must not change.
    for v in [&parent, &b] {
        let mut buf = vec![0u8; (WRITTEN * P) as usize];
        SoftCpu::new(v, &pool).read(0, &mut buf).unwrap();
    }
    let parent_bytes = host_contents(&parent);
    let sibling_bytes = host_contents(&b);
    assert_eq!(parent_bytes, sibling_bytes);
    assert_no_shared_frame_is_writable(&spaces, "after the forks");

    write_every_path::<B>(&a, &pool, 1);
    let stats = a.fault_stats();
    assert!(stats.copies > 0 && stats.upgrades > 0, "{stats:?}");
    assert!(
        stats.commits > 0 && stats.fault_around > 0,
        "streaming: {stats:?}"
    );
    assert_no_shared_frame_is_writable(&spaces, "after round 1");
    for v in spaces {
        harvest_step::<B>(v);
    }
    write_every_path::<B>(&a, &pool, 2);
    assert_no_shared_frame_is_writable(&spaces, "after a harvest and round 2");
    a.reset().unwrap();
    assert_no_shared_frame_is_writable(&spaces, "after the reset");
    assert_eq!(
        contents(&a, &pool),
        parent_bytes,
        "reset restores the snapshot"
    );
    harvest_step::<B>(&a);
    write_every_path::<B>(&a, &pool, 3);
    assert_no_shared_frame_is_writable(&spaces, "after the reset and round 3");

    // The child sees its own writes; the parent and the sibling see none of them.
    let mut cpu = SoftCpu::new(&a, &pool);
    assert_eq!(cpu.read_u8(21 * P + 17).unwrap(), 0xa3);
    assert_eq!(cpu.read_u8((WRITTEN + 2) * P + 1).unwrap(), 0xc3);
    assert_eq!(cpu.read_u8(30 * P + 9).unwrap(), 0xd3);
    assert_eq!(
        contents(&parent, &pool),
        parent_bytes,
        "{}: parent changed",
        B::NAME
    );
    assert_eq!(
        contents(&b, &pool),
        sibling_bytes,
        "{}: sibling changed",
        B::NAME
    );
    let mut host = vec![0u8; (PAGES * P) as usize];
    ram.read(0, &mut host).unwrap();
    assert_eq!(host, parent_bytes, "the parent's Vmo");
    assert_no_shared_frame_is_writable(&spaces, "at the end");
}

/// Issue 13: forks of a parent with every page installed. The first fork write-protects
/// writable entries; a later fork (after the parent wrote everything again, copying or
/// upgrading) must write-protect exactly those again even where the EPT/NPT tables skip
/// subtrees whose entries are already read-only. After each fork no shared frame is writable,
/// and every space reads what it wrote.
fn repeated_forks_of_an_all_installed_parent<B: Backend>() {
    let pool = B::pool();
    let parent = Vmar::new_root(1 << 30, B::stage2(&pool)).unwrap();
    let ram = Vmo::new(&pool, PAGES * P, VmoFlags::empty()).unwrap();
    parent
        .map(&ram, 0, PAGES * P, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    let mut children = Vec::new();
    for round in 0..4u8 {
        // Every page written (all installed writable), or — in odd rounds — only every third
        // page, so a later fork meets read-only and writable subtrees side by side.
        let step = if round % 2 == 0 { 1 } else { 3 };
        let mut cpu = SoftCpu::new(&parent, &pool);
        for page in (0..PAGES).step_by(step) {
            cpu.write(page * P, &[round + 1; 16]).unwrap();
        }
        let expected = contents(&parent, &pool);
        let child = parent.fork(B::stage2(&pool)).unwrap();
        children.push((child, expected.clone()));
        let spaces: Vec<&Vmar<B::S>> = core::iter::once(&parent)
            .chain(children.iter().map(|(c, _)| c))
            .collect();
        assert_no_shared_frame_is_writable(&spaces, &format!("{}: fork {round}", B::NAME));
        // The parent's next write copies or upgrades; no child sees it.
        SoftCpu::new(&parent, &pool)
            .write_u8(7 * P + 3, 0xf0 | round)
            .unwrap();
        assert_no_shared_frame_is_writable(&spaces, &format!("{}: write {round}", B::NAME));
        for (i, (c, bytes)) in children.iter().enumerate() {
            assert_eq!(&contents(c, &pool), bytes, "{}: child {i} changed", B::NAME);
        }
    }
}

for_each_backend!(
    forked_siblings_stay_isolated,
    repeated_forks_of_an_all_installed_parent
);
