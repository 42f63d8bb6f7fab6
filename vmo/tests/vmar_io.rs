//! `Vmar::read` / `Vmar::write`: the model's own accesses by guest-physical address. They cross
//! mapping boundaries, copy on write exactly as a guest write (the parent of a fork never sees
//! a child's write), count their commits/copies, and refuse what a guest would be refused
//! (unmapped, read-only, outside the region) before any byte moves.

use ept::{EptTable, HeapPhysMem, Stage2};
use vmo::{Error, FramePool, MapOptions, VmPerms, Vmar, Vmo, VmoFlags, PAGE_SIZE};

const P: u64 = PAGE_SIZE;

fn space() -> (FramePool, Vmar<EptTable<HeapPhysMem>>, Vmo, Vmo) {
    let pool = FramePool::heap();
    let vmar = Vmar::new_root(64 * P, EptTable::new(HeapPhysMem::new()).unwrap()).unwrap();
    let a = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
    let b = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
    vmar.map(&a, 0, 4 * P, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    vmar.map(&b, 0, 4 * P, MapOptions::specific(4 * P, VmPerms::RW))
        .unwrap();
    (pool, vmar, a, b)
}

#[test]
fn accesses_cross_mappings_and_copy_on_write() {
    let (pool, vmar, a, b) = space();
    let data: Vec<u8> = (0..2 * P as usize).map(|i| i as u8).collect();
    vmar.write(3 * P, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    vmar.read(3 * P, &mut back).unwrap();
    assert_eq!(back, data);
    let mut one = [0u8; 1];
    b.read(0, &mut one).unwrap();
    assert_eq!(
        one[0], data[P as usize],
        "the second half landed in the second Vmo"
    );
    assert_eq!(
        vmar.fault_stats().commits,
        2,
        "host-written commits are counted"
    );
    assert_eq!(a.committed_bytes(), P);

    let child = vmar
        .fork(EptTable::new(HeapPhysMem::new()).unwrap())
        .unwrap();
    child.write(3 * P, &[0xee; 8]).unwrap();
    assert_eq!(
        child.fault_stats().copies,
        1,
        "the child's write copied the shared frame"
    );
    vmar.read(3 * P, &mut one).unwrap();
    assert_eq!(one[0], data[0], "the parent does not see the child's write");
    child.read(3 * P, &mut one).unwrap();
    assert_eq!(one[0], 0xee);
    // A host write is a change a reset undoes.
    assert_eq!(child.reset().unwrap(), 1);
    child.read(3 * P, &mut one).unwrap();
    assert_eq!(one[0], data[0]);
    drop((child, vmar, a, b));
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn refused_accesses_move_no_byte() {
    let (_pool, vmar, a, b) = space();
    let ro = Vmo::new(&FramePool::heap(), P, VmoFlags::empty()).unwrap();
    vmar.map(&ro, 0, P, MapOptions::specific(16 * P, VmPerms::READ))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(vmar.read(8 * P, &mut buf), Err(Error::NotFound), "unmapped");
    assert_eq!(
        vmar.write(16 * P, &buf),
        Err(Error::AccessDenied),
        "read-only mapping"
    );
    assert!(vmar.read(16 * P, &mut buf).is_ok());
    // A write running from a mapped page into a hole changes nothing at all.
    assert_eq!(vmar.write(8 * P - 8, &[1u8; 16]), Err(Error::NotFound));
    assert_eq!(vmar.write(u64::MAX - 4, &buf), Err(Error::OutOfRange));
    assert_eq!(vmar.read(64 * P, &mut buf), Err(Error::OutOfRange));
    assert_eq!(a.committed_bytes() + b.committed_bytes(), 0);
    vmar.with_stage2(|s| assert!(s.query(0).is_none(), "host accesses install nothing"));
    assert!(
        vmar.write(0, &[]).is_ok(),
        "an empty access at a mapped address"
    );
}
