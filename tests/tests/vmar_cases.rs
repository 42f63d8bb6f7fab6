//! The Vmar acceptance cases of CONTRACTS.md, part 1 (Destroy … RightsDrop: regions, map,
//! unmap, bad arguments), run through the software guest CPU on every table backend; part 2 is
//! `vmar_access_cases.rs`.

use conformance::{for_each_backend, Backend, SoftCpu};
use vmo::{Error, MapOptions, Placement, Rights, VmPerms, Vmar};

mod vmar_common;
use vmar_common::*;

fn destroy<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let sub = root
        .allocate(Placement::Specific(16 * P), 16 * P, VmPerms::MAY_ALL)
        .unwrap();
    let v = patterned(&pool, 4);
    let base = sub.map(&v, 0, 4 * P, MapOptions::specific(0, RW)).unwrap();
    assert_eq!(base, 16 * P, "offsets are relative to the sub-region");
    let mut cpu = SoftCpu::new(&root, &pool);
    assert_eq!(cpu.read_u8(base + P).unwrap(), 2);
    sub.destroy().unwrap();
    assert_eq!(root.query(base).unwrap_err(), Error::NotFound);
    assert!(
        installed::<B>(&root, base + P).is_none(),
        "translations are gone"
    );
    assert_eq!(cpu.read_u8(base).unwrap_err().error, Error::NotFound);
    assert_eq!(
        sub.map(&v, 0, P, MapOptions::specific(0, R)).unwrap_err(),
        Error::BadState
    );
}

fn basic_allocate<B: Backend>() {
    let (_pool, root) = space::<B>(GIB);
    let a = root
        .allocate(Placement::Anywhere { align: P }, 8 * P, VmPerms::MAY_ALL)
        .unwrap();
    let b = root
        .allocate(Placement::Anywhere { align: P }, 8 * P, VmPerms::MAY_READ)
        .unwrap();
    let (ab, al) = a.range().unwrap();
    let (bb, bl) = b.range().unwrap();
    assert!(ab + al <= bb || bb + bl <= ab, "sub-regions do not overlap");
    assert_eq!(b.may().unwrap(), VmPerms::MAY_READ);
}

fn map_in_compact<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let sub = root
        .allocate(Placement::Anywhere { align: P }, 16 * P, VmPerms::MAY_ALL)
        .unwrap();
    let v = vmo(&pool, 1);
    let mut bases: Vec<u64> = (0..16)
        .map(|_| sub.map(&v, 0, P, MapOptions::anywhere(R)).unwrap())
        .collect();
    bases.sort();
    bases.dedup();
    assert_eq!(
        bases.len(),
        16,
        "16 one-page mappings fill a 16-page region"
    );
    assert_eq!(
        sub.map(&v, 0, P, MapOptions::anywhere(R)).unwrap_err(),
        Error::NoMemory
    );
}

fn allocate_oob<B: Backend>() {
    let (_pool, root) = space::<B>(GIB);
    let sub = root
        .allocate(Placement::Specific(0), 16 * P, VmPerms::MAY_ALL)
        .unwrap();
    assert_eq!(
        sub.allocate(Placement::Specific(12 * P), 8 * P, VmPerms::MAY_ALL)
            .unwrap_err(),
        Error::InvalidArgs
    );
    assert_eq!(
        sub.allocate(Placement::Specific(!(P - 1)), 2 * P, VmPerms::MAY_ALL)
            .unwrap_err(),
        Error::OutOfRange
    );
    assert_eq!(
        root.allocate(Placement::Specific(GIB), P, VmPerms::MAY_ALL)
            .unwrap_err(),
        Error::InvalidArgs
    );
}

fn unaligned_len<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = vmo(&pool, 8);
    root.map(&v, 0, 8 * P, MapOptions::specific(0, RW)).unwrap();
    root.protect(0, 4 * P - 1, R).unwrap();
    assert_eq!(
        root.query(3 * P).unwrap().perms,
        R,
        "length rounded up: 4 pages"
    );
    assert_eq!(root.query(4 * P).unwrap().perms, RW);
    root.unmap(0, 4 * P - 1).unwrap();
    assert_eq!(root.query(3 * P).unwrap_err(), Error::NotFound);
    assert!(root.query(4 * P).is_ok());
}

fn unaligned_len_map<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = vmo(&pool, 4);
    let base = root.map(&v, 0, 4 * P - 1, MapOptions::anywhere(R)).unwrap();
    assert_eq!(root.query(base).unwrap().len, 4 * P);
}

fn unmap_split<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = patterned(&pool, 4);
    root.map(&v, 0, 4 * P, MapOptions::specific(0, RW)).unwrap();
    let mut cpu = SoftCpu::new(&root, &pool);
    for i in 0..4 {
        cpu.read_u8(i * P).unwrap();
    }
    root.unmap(P, 2 * P).unwrap();
    let left = root.query(0).unwrap();
    let right = root.query(3 * P).unwrap();
    assert_eq!((left.base, left.len, left.vmo_offset), (0, P, 0));
    assert_eq!((right.base, right.len, right.vmo_offset), (3 * P, P, 3 * P));
    assert_eq!(cpu.read_u8(0).unwrap(), 1);
    assert_eq!(cpu.read_u8(3 * P).unwrap(), 4);
    assert_eq!(cpu.read_u8(P).unwrap_err().error, Error::NotFound);
    assert!(installed::<B>(&root, 2 * P).is_none());
}

fn unmap_multiple<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = vmo(&pool, 4);
    for i in 0..3 {
        root.map(&v, 0, 4 * P, MapOptions::specific(i * 4 * P, R))
            .unwrap();
    }
    root.unmap(2 * P, 8 * P).unwrap();
    assert_eq!(root.query(P).unwrap().len, 2 * P);
    assert_eq!(root.query(4 * P).unwrap_err(), Error::NotFound);
    assert_eq!(root.query(10 * P).unwrap().base, 10 * P);
}

fn unmap_base_not_mapped<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = vmo(&pool, 2);
    root.map(&v, 0, 2 * P, MapOptions::specific(P, R)).unwrap();
    root.unmap(0, 4 * P).unwrap();
    assert_eq!(root.query(P).unwrap_err(), Error::NotFound);
    assert_eq!(
        root.unmap(0, 4 * P).unwrap_err(),
        Error::NotFound,
        "nothing there"
    );
}

fn allocate_unsatisfiable<B: Backend>() {
    let (_pool, root) = space::<B>(16 * P);
    assert_eq!(
        root.allocate(Placement::Anywhere { align: P }, 17 * P, VmPerms::MAY_ALL)
            .unwrap_err(),
        Error::NoMemory
    );
    root.allocate(Placement::Specific(0), 10 * P, VmPerms::MAY_ALL)
        .unwrap();
    assert_eq!(
        root.allocate(Placement::Anywhere { align: P }, 7 * P, VmPerms::MAY_ALL)
            .unwrap_err(),
        Error::NoMemory
    );
}

fn destroyed_vmar<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let sub = root
        .allocate(Placement::Anywhere { align: P }, 16 * P, VmPerms::MAY_ALL)
        .unwrap();
    let subsub = sub
        .allocate(Placement::Anywhere { align: P }, 4 * P, VmPerms::MAY_ALL)
        .unwrap();
    sub.destroy().unwrap();
    let v = vmo(&pool, 1);
    for h in [&sub, &subsub] {
        assert_eq!(
            h.map(&v, 0, P, MapOptions::anywhere(R)).unwrap_err(),
            Error::BadState
        );
        assert_eq!(
            h.allocate(Placement::Anywhere { align: P }, P, VmPerms::MAY_ALL)
                .unwrap_err(),
            Error::BadState
        );
        assert_eq!(h.unmap(0, P).unwrap_err(), Error::BadState);
        assert_eq!(h.protect(0, P, R).unwrap_err(), Error::BadState);
        assert_eq!(h.destroy().unwrap_err(), Error::BadState);
    }
}

fn map_over_destroyed<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let sub = root
        .allocate(Placement::Specific(0), 16 * P, VmPerms::MAY_ALL)
        .unwrap();
    let v = vmo(&pool, 16);
    assert_eq!(
        root.map(&v, 0, 16 * P, MapOptions::specific(0, R))
            .unwrap_err(),
        Error::AlreadyExists
    );
    sub.destroy().unwrap();
    root.map(&v, 0, 16 * P, MapOptions::specific(0, R)).unwrap();
}

fn alignment_vmar_map<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = vmo(&pool, 1);
    root.map(&v, 0, P, MapOptions::specific(P, R)).unwrap();
    for align in [P, 1 << 16, 1 << 21, 1 << 28] {
        let mut o = MapOptions::anywhere(R);
        o.placement = Placement::Anywhere { align };
        let base = root.map(&v, 0, P, o).unwrap();
        assert_eq!(base % align, 0);
    }
    let mut o = MapOptions::anywhere(R);
    o.placement = Placement::Anywhere { align: 3 * P };
    assert_eq!(root.map(&v, 0, P, o).unwrap_err(), Error::InvalidArgs);
    o.placement = Placement::Anywhere { align: 2 * GIB };
    assert_eq!(root.map(&v, 0, P, o).unwrap_err(), Error::NoMemory);
}

fn alignment_vmar_allocate<B: Backend>() {
    let (_pool, root) = space::<B>(GIB);
    root.allocate(Placement::Specific(P), P, VmPerms::MAY_ALL)
        .unwrap();
    for align in [1u64 << 16, 1 << 21] {
        let sub = root
            .allocate(Placement::Anywhere { align }, P, VmPerms::MAY_ALL)
            .unwrap();
        assert_eq!(sub.range().unwrap().0 % align, 0);
    }
    assert_eq!(
        root.allocate(Placement::Anywhere { align: 100 }, P, VmPerms::MAY_ALL)
            .unwrap_err(),
        Error::InvalidArgs
    );
}

fn overmapping<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = vmo(&pool, 4);
    root.map(&v, 0, 4 * P, MapOptions::specific(4 * P, R))
        .unwrap();
    assert_eq!(
        root.map(&v, 0, 4 * P, MapOptions::specific(2 * P, R))
            .unwrap_err(),
        Error::AlreadyExists
    );
    assert_eq!(
        root.map(&v, 0, P, MapOptions::specific(7 * P, R))
            .unwrap_err(),
        Error::AlreadyExists
    );
    root.map(&v, 0, 2 * P, MapOptions::specific(2 * P, R))
        .unwrap();
}

fn invalid_args<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = vmo(&pool, 4);
    assert_eq!(
        root.map(&v, 0, 0, MapOptions::anywhere(R)).unwrap_err(),
        Error::InvalidArgs
    );
    assert_eq!(
        root.map(&v, 1, P, MapOptions::anywhere(R)).unwrap_err(),
        Error::InvalidArgs
    );
    assert_eq!(
        root.map(&v, 0, P, MapOptions::specific(1, R)).unwrap_err(),
        Error::InvalidArgs
    );
    assert_eq!(
        root.map(&v, 0, P, MapOptions::anywhere(VmPerms::WRITE))
            .unwrap_err(),
        Error::InvalidArgs
    );
    assert_eq!(
        root.map(&v, 0, P, MapOptions::anywhere(VmPerms::EXEC))
            .unwrap_err(),
        Error::InvalidArgs
    );
    assert_eq!(
        root.map(&v, 0, P, MapOptions::anywhere(R | VmPerms::MAY_READ))
            .unwrap_err(),
        Error::InvalidArgs
    );
    assert_eq!(
        root.map(&v, !(P - 1), 2 * P, MapOptions::anywhere(R))
            .unwrap_err(),
        Error::OutOfRange
    );
    assert_eq!(
        root.map(&v, 0, u64::MAX, MapOptions::anywhere(R))
            .unwrap_err(),
        Error::OutOfRange
    );
    assert_eq!(root.unmap(0, 0).unwrap_err(), Error::InvalidArgs);
    assert_eq!(root.protect(P + 1, P, R).unwrap_err(), Error::InvalidArgs);
    assert_eq!(
        root.allocate(Placement::Anywhere { align: P }, P, R)
            .unwrap_err(),
        Error::InvalidArgs
    );
    assert!(Vmar::new_root(P + 1, B::stage2(&pool)).is_err());
    assert!(Vmar::new_root(0, B::stage2(&pool)).is_err());
    assert_eq!(
        Vmar::new_root(1 << 49, B::stage2(&pool)).err(),
        Some(Error::OutOfRange)
    );
}

fn rights_drop<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let v = patterned(&pool, 2);
    let ro = v.duplicate(Rights::READ | Rights::MAP).unwrap();
    assert_eq!(
        root.map(&ro, 0, P, MapOptions::anywhere(RW)).unwrap_err(),
        Error::AccessDenied
    );
    assert_eq!(
        root.map(&ro, 0, P, MapOptions::anywhere(R | VmPerms::EXEC))
            .unwrap_err(),
        Error::AccessDenied
    );
    let nomap = v.duplicate(Rights::READ | Rights::WRITE).unwrap();
    assert_eq!(
        root.map(&nomap, 0, P, MapOptions::anywhere(R)).unwrap_err(),
        Error::AccessDenied
    );
    let base = root.map(&ro, 0, 2 * P, MapOptions::anywhere(R)).unwrap();
    assert_eq!(root.protect(base, P, RW).unwrap_err(), Error::AccessDenied);
    let mut cpu = SoftCpu::new(&root, &pool);
    assert_eq!(cpu.read_u8(base + P).unwrap(), 2);
    assert_eq!(
        cpu.write_u8(base, 9).unwrap_err().error,
        Error::AccessDenied
    );
}
for_each_backend!(
    destroy,
    basic_allocate,
    map_in_compact,
    allocate_oob,
    unaligned_len,
    unaligned_len_map,
    unmap_split,
    unmap_multiple,
    unmap_base_not_mapped,
    allocate_unsatisfiable,
    destroyed_vmar,
    map_over_destroyed,
    alignment_vmar_map,
    alignment_vmar_allocate,
    overmapping,
    invalid_args,
    rights_drop,
);
