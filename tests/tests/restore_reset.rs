//! Copy-back reset (`Vmar::reset_with(ResetPolicy::Restore)`) on every backend: a reused child
//! returns to its snapshot byte for byte after every iteration, keeps its private frames
//! installed (the next run writes them without a fault), copies back exactly the pages written
//! since the last reset (by the guest or by the model's own writes), and never writes a frame
//! another space can see. Frame accounting is exact throughout and 0 at teardown.

use conformance::{for_each_backend, Backend, Rng, SoftCpu};
use vmo::{FramePool, MapOptions, ResetPolicy, VmPerms, Vmar, Vmo, VmoFlags};

const P: u64 = vmo::PAGE_SIZE;
const PAGES: u64 = 48;

fn bytes<S: ept::Stage2 + Send + 'static>(vmar: &Vmar<S>) -> Vec<u8> {
    let mut all = vec![0u8; (PAGES * P) as usize];
    vmar.read(0, &mut all).unwrap();
    all
}

/// A parent with its first 32 pages written (the snapshot), forked once.
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
    (pool, parent, child, ram)
}

fn restored_equals_snapshot_every_iteration<B: Backend>() {
    let (pool, parent, child, ram) = forked::<B>();
    let snapshot = bytes(&parent);
    let mut rng = Rng(0x5eed);
    let mut live_after_first = None;
    for iter in 0..12 {
        let mut cpu = SoftCpu::new(&child, &pool);
        let mut written = std::collections::BTreeSet::new();
        for _ in 0..10 {
            // Mostly snapshot pages (copy-on-write the first time), some fresh ones.
            let page = rng.below(PAGES);
            cpu.write_u8(page * P + rng.below(P), 0xa0 + iter as u8)
                .unwrap();
            written.insert(page);
        }
        // The model's own write path counts as well.
        child.write(40 * P + 1, &[0xee]).unwrap();
        written.insert(40);
        let stats = child.reset_with(ResetPolicy::Restore).unwrap();
        assert_eq!(bytes(&child), snapshot, "{} iteration {iter}", B::NAME);
        assert_eq!(
            bytes(&parent),
            snapshot,
            "{}: the parent never changes",
            B::NAME
        );
        assert!(
            stats.restored + stats.dropped >= written.len() as u64,
            "{}: {stats:?} for {} written pages",
            B::NAME,
            written.len()
        );
        if iter > 0 {
            assert!(
                stats.restored > 0,
                "{}: {stats:?}: nothing copied back",
                B::NAME
            );
        }
        if iter == 0 {
            live_after_first = Some(pool.stats().live);
        } else {
            // Restored frames stay: only pages never written before add frames.
            assert!(pool.stats().live >= live_after_first.unwrap());
        }
        child.check_invariants().unwrap();
        parent.check_invariants().unwrap();
    }
    // Reused pages are written in place: a rewrite of a kept page takes no copy.
    let copies = child.fault_stats().copies;
    let mut cpu = SoftCpu::new(&child, &pool);
    for page in 0..PAGES {
        cpu.write_u8(page * P, 1).unwrap();
    }
    let kept_rewrites = PAGES - (child.fault_stats().copies - copies);
    assert!(kept_rewrites > 0, "{}: no page stayed installed", B::NAME);
    child.reset_with(ResetPolicy::Restore).unwrap();
    assert_eq!(bytes(&child), snapshot);
    // Drop returns every private frame.
    child.reset_with(ResetPolicy::Drop).unwrap();
    assert_eq!(bytes(&child), snapshot);
    drop((child, parent, ram));
    assert_eq!(pool.stats().live, 0, "{}", B::NAME);
}

/// After restores, the child is forked again: its kept frames become shared with the
/// grandchild, so the next restore must not write them in place (it reverts them instead), and
/// the grandchild keeps what it saw.
fn kept_frames_shared_by_a_later_fork_are_never_written_in_place<B: Backend>() {
    let (pool, parent, child, ram) = forked::<B>();
    let snapshot = bytes(&parent);
    let mut cpu = SoftCpu::new(&child, &pool);
    for page in 0..8 {
        cpu.write_u8(page * P, 0x11).unwrap();
    }
    child.reset_with(ResetPolicy::Restore).unwrap();
    let mut cpu = SoftCpu::new(&child, &pool);
    for page in 0..4 {
        cpu.write_u8(page * P, 0x22).unwrap();
    }
    let grandchild = child.fork(B::stage2(&pool)).unwrap();
    let seen = bytes(&grandchild);
    let mut cpu = SoftCpu::new(&child, &pool);
    cpu.write_u8(6 * P, 0x33).unwrap();
    child.reset_with(ResetPolicy::Restore).unwrap();
    assert_eq!(bytes(&child), snapshot, "{}", B::NAME);
    assert_eq!(
        bytes(&grandchild),
        seen,
        "{}: the grandchild is untouched",
        B::NAME
    );
    assert_eq!(bytes(&parent), snapshot);
    for v in [&parent, &child, &grandchild] {
        v.check_invariants().unwrap();
    }
    drop((grandchild, child, parent, ram));
    assert_eq!(pool.stats().live, 0);
}

for_each_backend!(
    restored_equals_snapshot_every_iteration,
    kept_frames_shared_by_a_later_fork_are_never_written_in_place,
);
