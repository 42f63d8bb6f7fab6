//! The Vmar acceptance cases of CONTRACTS.md, part 2 (Protect … ConcurrentUnmapReadMemory:
//! protection, demand paging, partial unmaps, faults, flushes, host writes, teardown), run
//! through the software guest CPU on every table backend; part 1 is `vmar_cases.rs`.

use conformance::{for_each_backend, Backend, SoftCpu};
use std::sync::Arc;
use vmo::{ChildKind, Error, MapOptions, Placement, VmPerms, Vmar, Vmo, VmoFlags};

mod vmar_common;
use vmar_common::*;

fn protect<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = vmo(&pool, 4);
    let base = root.map(&v, 0, 4 * P, MapOptions::anywhere(RW)).unwrap();
    let mut cpu = SoftCpu::new(&root, &pool);
    cpu.write_u8(base, 7).unwrap();
    root.protect(base, 4 * P, R).unwrap();
    let t = installed::<B>(&root, base).unwrap();
    assert!(
        !t.perms.contains(ept::S2Perms::WRITE),
        "downgraded before return"
    );
    assert_eq!(
        cpu.write_u8(base, 8).unwrap_err().error,
        Error::AccessDenied
    );
    assert_eq!(cpu.read_u8(base).unwrap(), 7);
    assert_eq!(cpu.fetch(base).unwrap_err().error, Error::AccessDenied);
    root.protect(base, 4 * P, RW | VmPerms::EXEC).unwrap();
    cpu.write_u8(base, 8).unwrap();
    assert_eq!(cpu.fetch(base).unwrap(), 8);
    root.protect(base, P, VmPerms::empty()).unwrap();
    assert!(
        installed::<B>(&root, base).is_none(),
        "no access: entry removed"
    );
    assert_eq!(cpu.read_u8(base).unwrap_err().error, Error::AccessDenied);
    assert_eq!(
        root.protect(base, 8 * P, R).unwrap_err(),
        Error::NotFound,
        "hole after the mapping"
    );
}

fn nested_region_perms<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let ro_region = root
        .allocate(Placement::Anywhere { align: P }, 16 * P, VmPerms::MAY_READ)
        .unwrap();
    let v = vmo(&pool, 4);
    assert_eq!(
        ro_region
            .map(&v, 0, P, MapOptions::anywhere(RW))
            .unwrap_err(),
        Error::AccessDenied
    );
    let base = ro_region.map(&v, 0, P, MapOptions::anywhere(R)).unwrap();
    assert_eq!(
        root.protect(base, P, RW).unwrap_err(),
        Error::AccessDenied,
        "region MAY bits bind protect too"
    );
    assert_eq!(
        ro_region
            .allocate(
                Placement::Anywhere { align: P },
                P,
                VmPerms::MAY_READ | VmPerms::MAY_WRITE
            )
            .unwrap_err(),
        Error::AccessDenied
    );
    ro_region
        .allocate(Placement::Anywhere { align: P }, P, VmPerms::MAY_READ)
        .unwrap();
}

fn map_specific_overwrite<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let a = patterned(&pool, 4);
    let b = vmo(&pool, 2);
    b.write(0, &[100]).unwrap();
    b.write(P, &[101]).unwrap();
    root.map(&a, 0, 4 * P, MapOptions::specific(0, RW)).unwrap();
    let mut cpu = SoftCpu::new(&root, &pool);
    for i in 0..4 {
        cpu.read_u8(i * P).unwrap();
    }
    let mut o = MapOptions::specific(0, R);
    o.placement = Placement::SpecificOverwrite(P);
    root.map(&b, 0, 2 * P, o).unwrap();
    let got: Vec<u8> = (0..4).map(|i| cpu.read_u8(i * P).unwrap()).collect();
    assert_eq!(got, vec![1, 100, 101, 4]);
    root.allocate(Placement::Specific(8 * P), 4 * P, VmPerms::MAY_ALL)
        .unwrap();
    o.placement = Placement::SpecificOverwrite(7 * P);
    assert_eq!(
        root.map(&b, 0, 2 * P, o).unwrap_err(),
        Error::InvalidArgs,
        "overlaps a sub-region"
    );
}

fn protect_split<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = vmo(&pool, 4);
    root.map(&v, 0, 4 * P, MapOptions::specific(0, RW)).unwrap();
    root.protect(P, 2 * P, R).unwrap();
    let parts: Vec<_> = [0, P, 3 * P]
        .iter()
        .map(|&a| root.query(a).unwrap())
        .collect();
    assert_eq!(
        parts
            .iter()
            .map(|m| (m.base, m.len, m.perms))
            .collect::<Vec<_>>(),
        vec![(0, P, RW), (P, 2 * P, R), (3 * P, P, RW)]
    );
    assert_eq!(parts[1].vmo_offset, P);
}

fn protect_multiple<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = vmo(&pool, 4);
    for i in 0..3 {
        root.map(&v, 0, 4 * P, MapOptions::specific(i * 4 * P, RW))
            .unwrap();
    }
    root.protect(2 * P, 8 * P, R).unwrap();
    assert_eq!(root.query(P).unwrap().perms, RW);
    assert_eq!(root.query(5 * P).unwrap().perms, R);
    assert_eq!(root.query(9 * P).unwrap().perms, R);
    assert_eq!(root.query(10 * P).unwrap().perms, RW);
}

struct FilledPager;
impl vmo::Pager for FilledPager {
    fn commit_page(&self, idx: u64, buf: &mut [u8; vmo::PAGE_BYTES]) -> vmo::Result<()> {
        buf.fill(idx as u8 ^ 0x5a);
        Ok(())
    }
    fn commit_overwrite(&self, _: u64) -> vmo::Result<()> {
        Ok(())
    }
    fn update_page(&self, _: u64) -> vmo::Result<()> {
        Ok(())
    }
    fn decommit_page(&self, _: u64, _: &[u8; vmo::PAGE_BYTES]) -> vmo::Result<()> {
        Ok(())
    }
}

fn protect_over_demand_paged<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = Vmo::new_paged(&pool, 64 * P, VmoFlags::empty(), Arc::new(FilledPager)).unwrap();
    assert_eq!(
        root.map(&v, 0, 64 * P, MapOptions::anywhere(RW))
            .unwrap_err(),
        Error::NotSupported
    );
    let base = root
        .map(&v, 0, 64 * P, MapOptions::anywhere(RW).allow_faults())
        .unwrap();
    root.protect(base, 64 * P, R).unwrap();
    assert_eq!(v.committed_bytes(), 0);
    let mut cpu = SoftCpu::new(&root, &pool);
    assert_eq!(cpu.read_u8(base + 3 * P).unwrap(), 3 ^ 0x5a);
    assert_eq!(cpu.faults, 1, "one fault");
    assert_eq!(
        root.fault_stats().fault_around,
        15,
        "default fault-around installs 16 pages"
    );
    for i in 3..19 {
        assert!(installed::<B>(&root, base + i * P).is_some());
    }
    assert_eq!(
        cpu.write_u8(base, 1).unwrap_err().error,
        Error::AccessDenied
    );
}

fn protect_large_uncommitted<B: Backend>() {
    let (pool, root) = space::<B>(8 * GIB);
    let v = Vmo::new(&pool, 4 * GIB, VmoFlags::empty()).unwrap();
    let base = root.map(&v, 0, 4 * GIB, MapOptions::anywhere(RW)).unwrap();
    root.protect(base, 4 * GIB, R).unwrap();
    assert_eq!(v.committed_bytes(), 0);
    assert_eq!(pool.stats().allocated, 0);
}

fn unmap_large_uncommitted<B: Backend>() {
    let (pool, root) = space::<B>(8 * GIB);
    let v = Vmo::new(&pool, 4 * GIB, VmoFlags::empty()).unwrap();
    let base = root.map(&v, 0, 4 * GIB, MapOptions::anywhere(RW)).unwrap();
    root.unmap(base + GIB, 2 * GIB).unwrap();
    assert_eq!(pool.stats().allocated, 0);
    assert_eq!(root.query(base + GIB - P).unwrap().len, GIB);
}

fn partial_unmap_and_read<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = patterned(&pool, 4);
    let base = root.map(&v, 0, 4 * P, MapOptions::anywhere(RW)).unwrap();
    root.unmap(base + P, P).unwrap();
    let mut cpu = SoftCpu::new(&root, &pool);
    assert_eq!(cpu.read_u8(base).unwrap(), 1);
    assert_eq!(cpu.read_u8(base + 2 * P).unwrap(), 3);
    assert_eq!(cpu.read_u8(base + P).unwrap_err().error, Error::NotFound);
}

fn partial_unmap_and_write<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = vmo(&pool, 4);
    let base = root.map(&v, 0, 4 * P, MapOptions::anywhere(RW)).unwrap();
    root.unmap(base + 2 * P, P).unwrap();
    let mut cpu = SoftCpu::new(&root, &pool);
    cpu.write_u8(base + 3 * P, 9).unwrap();
    assert_eq!(
        cpu.write_u8(base + 2 * P, 9).unwrap_err().error,
        Error::NotFound
    );
    let mut b = [0u8];
    v.read(3 * P, &mut b).unwrap();
    assert_eq!(b[0], 9, "the write landed in the Vmo at the right offset");
}

fn partial_unmap_with_vmar_offset<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let sub = root
        .allocate(Placement::Specific(64 * P), 32 * P, VmPerms::MAY_ALL)
        .unwrap();
    let v = patterned(&pool, 8);
    sub.map(&v, 2 * P, 4 * P, MapOptions::specific(4 * P, RW))
        .unwrap();
    sub.unmap(5 * P, P).unwrap();
    let m = root.query(68 * P + 2 * P).unwrap();
    assert_eq!((m.base, m.len, m.vmo_offset), (70 * P, 2 * P, 4 * P));
    let mut cpu = SoftCpu::new(&root, &pool);
    assert_eq!(cpu.read_u8(68 * P).unwrap(), 3);
    assert_eq!(cpu.read_u8(70 * P).unwrap(), 5);
}

fn allow_faults<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = patterned(&pool, 2);
    assert_eq!(
        root.map(&v, 0, 4 * P, MapOptions::anywhere(RW))
            .unwrap_err(),
        Error::NotSupported
    );
    let base = root
        .map(&v, 0, 4 * P, MapOptions::anywhere(RW).allow_faults())
        .unwrap();
    let mut cpu = SoftCpu::new(&root, &pool);
    assert_eq!(cpu.read_u8(base + P).unwrap(), 2);
    assert_eq!(
        cpu.read_u8(base + 3 * P).unwrap_err().error,
        Error::OutOfRange,
        "past the Vmo's end"
    );
    let r = Vmo::new(&pool, 4 * P, VmoFlags::RESIZABLE).unwrap();
    assert_eq!(
        root.map(&r, 0, 4 * P, MapOptions::anywhere(RW))
            .unwrap_err(),
        Error::NotSupported
    );
    let rb = root
        .map(&r, 0, 4 * P, MapOptions::anywhere(RW).allow_faults())
        .unwrap();
    cpu.write_u8(rb + 3 * P, 5).unwrap();
    r.resize(2 * P).unwrap();
    assert!(
        installed::<B>(&root, rb + 3 * P).is_none(),
        "shrinking unmapped the tail"
    );
    assert_eq!(
        cpu.read_u8(rb + 3 * P).unwrap_err().error,
        Error::OutOfRange
    );
    r.resize(4 * P).unwrap();
    assert_eq!(cpu.read_u8(rb + 3 * P).unwrap(), 0);
}

fn concurrent_unmap_read_memory<B: Backend>() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let (pool, root) = space::<B>(GIB);
    let v = patterned(&pool, 16);
    root.map(&v, 0, 16 * P, MapOptions::specific(0, RW))
        .unwrap();
    let stop = AtomicBool::new(false);
    let (reads, refused) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut cpu = SoftCpu::new(&root, &pool);
            while !stop.load(Ordering::Relaxed) {
                for i in 0..16 {
                    match cpu.read_u8(i * P) {
                        Ok(b) => {
                            assert_eq!(b, i as u8 + 1);
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(f) => {
                            assert_eq!(f.error, Error::NotFound);
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        // Keep remapping until both threads have really overlapped (a loaded machine may start
        // the reader late), at least 300 rounds.
        let mut rounds = 0;
        while rounds < 300 || reads.load(Ordering::Relaxed) < 2000 {
            root.unmap(4 * P, 8 * P).unwrap();
            root.map(&v, 4 * P, 8 * P, MapOptions::specific(4 * P, RW))
                .unwrap();
            rounds += 1;
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert!(reads.load(Ordering::Relaxed) >= 2000);
}

fn fault_outside_every_mapping_installs_nothing<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = vmo(&pool, 1);
    root.map(&v, 0, P, MapOptions::specific(0, R)).unwrap();
    for gpa in [P, GIB - 1, GIB, u64::MAX, 1 << 47] {
        let f = ept::FaultInfo::new(gpa, ept::Access::WRITE, ept::FaultKind::NotPresent);
        assert_eq!(root.handle_fault(f).unwrap_err(), Error::NotFound);
    }
    let f = ept::FaultInfo::new(5, ept::Access::WRITE, ept::FaultKind::NotPresent);
    assert_eq!(root.handle_fault(f).unwrap_err(), Error::AccessDenied);
    assert!(installed::<B>(&root, 0).is_none());
    assert_eq!(pool.stats().allocated, 0);
    assert_eq!(root.fault_stats().refused, 6);
}

fn one_flush_per_operation<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = vmo(&pool, 64);
    root.map(&v, 0, 64 * P, MapOptions::specific(0, RW))
        .unwrap();
    let mut cpu = SoftCpu::new(&root, &pool);
    for i in 0..64 {
        cpu.write_u8(i * P, 1).unwrap();
    }
    let before = root.with_stage2(|s| B::flushes(s));
    root.protect(0, 64 * P, R).unwrap();
    assert_eq!(root.with_stage2(|s| B::flushes(s)), before + 1);
    root.unmap(0, 64 * P).unwrap();
    assert_eq!(root.with_stage2(|s| B::flushes(s)), before + 2);
    let frames = root.with_stage2(|s| B::table_frames(s));
    assert!(
        matches!(frames, None | Some(1)),
        "empty tables freed, only the root is left: {frames:?}"
    );
}

fn host_writes_reach_the_guest<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = patterned(&pool, 2);
    let snap = v.create_child(ChildKind::Snapshot, 0, 2 * P).unwrap();
    root.map(&v, 0, 2 * P, MapOptions::specific(0, RW)).unwrap();
    let mut cpu = SoftCpu::new(&root, &pool);
    assert_eq!(
        cpu.read_u8(0).unwrap(),
        1,
        "installed read-only: shared with the snapshot"
    );
    v.write(0, &[42]).unwrap(); // host-side write breaks COW: the old translation must go
    assert_eq!(cpu.read_u8(0).unwrap(), 42);
    let mut b = [0u8];
    snap.read(0, &mut b).unwrap();
    assert_eq!(b[0], 1);
    cpu.read_u8(P).unwrap();
    v.decommit(P, P).unwrap();
    assert_eq!(
        cpu.read_u8(P).unwrap(),
        0,
        "decommit dropped the translation"
    );
}

fn teardown_frees_every_frame<B: Backend>() {
    let pool = B::pool();
    {
        let root = Vmar::new_root(GIB, B::stage2(&pool)).unwrap();
        let v = vmo(&pool, 32);
        root.map(&v, 0, 32 * P, MapOptions::specific(0, RW))
            .unwrap();
        let mut cpu = SoftCpu::new(&root, &pool);
        for i in 0..32 {
            cpu.write_u8(i * P, 1).unwrap();
        }
        let child = root.fork(B::stage2(&pool)).unwrap();
        let mut ccpu = SoftCpu::new(&child, &pool);
        ccpu.write_u8(0, 2).unwrap();
        assert_eq!(pool.stats().live, 33);
    }
    assert_eq!(pool.stats().live, 0);
}

fn fault_around_installs_committed_neighbours_only<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = vmo(&pool, 64);
    v.write(0, &vec![3u8; 24 * P as usize]).unwrap(); // pages 0..24 committed, 24..64 not
    root.map(&v, 0, 64 * P, MapOptions::specific(0, RW))
        .unwrap();
    let mut cpu = SoftCpu::new(&root, &pool);
    for i in 0..24 {
        assert_eq!(cpu.read_u8(i * P).unwrap(), 3);
    }
    assert_eq!(cpu.faults, 2, "pages 0..16 and 16..24 arrive in two faults");
    assert_eq!(root.fault_stats().fault_around, 22);
    assert!(
        installed::<B>(&root, 24 * P).is_none(),
        "uncommitted anonymous pages are not touched"
    );
    assert_eq!(pool.stats().live, 24, "fault-around commits nothing");
    // Private pages come in writable: writing them needs no further fault.
    cpu.write_u8(5 * P, 4).unwrap();
    assert_eq!(cpu.faults, 2);
    root.set_fault_around(1);
    cpu.read_u8(30 * P).unwrap();
    cpu.read_u8(31 * P).unwrap();
    assert_eq!(cpu.faults, 4, "fault-around off");
}

for_each_backend!(
    fault_around_installs_committed_neighbours_only,
    protect,
    nested_region_perms,
    map_specific_overwrite,
    protect_split,
    protect_multiple,
    protect_over_demand_paged,
    protect_large_uncommitted,
    unmap_large_uncommitted,
    partial_unmap_and_read,
    partial_unmap_and_write,
    partial_unmap_with_vmar_offset,
    allow_faults,
    concurrent_unmap_read_memory,
    fault_outside_every_mapping_installs_nothing,
    one_flush_per_operation,
    host_writes_reach_the_guest,
    teardown_frees_every_frame,
);
