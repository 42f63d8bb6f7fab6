//! `Vmar::prefault` (the fault path over a range, in bulk) and working-set recording /
//! prefetch on the EPT table backend: what gets installed with which permissions, the checks
//! it shares with `handle_fault`, and that a prefetched fork never gets a shared frame
//! writable.

use ept::{Access, EptTable, FaultInfo, FaultKind, HeapPhysMem, S2Perms, Stage2};
use vmo::{Error, FramePool, MapOptions, VmPerms, Vmar, Vmo, VmoFlags, PAGE_SIZE};

const P: u64 = PAGE_SIZE;
type Table = EptTable<HeapPhysMem>;

fn space() -> (FramePool, Vmar<Table>) {
    let table = EptTable::new(HeapPhysMem::new()).unwrap();
    (FramePool::heap(), Vmar::new_root(1 << 30, table).unwrap())
}

fn perms(vmar: &Vmar<Table>, gpa: u64) -> Option<S2Perms> {
    vmar.with_stage2(|s| s.query(gpa)).map(|t| t.perms)
}

#[test]
fn prefault_installs_a_range_in_bulk_with_the_fault_paths_checks() {
    let (pool, root) = space();
    let v = Vmo::new(&pool, 64 * P, VmoFlags::empty()).unwrap();
    root.map(&v, 0, 64 * P, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    let ro = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
    root.map(&ro, 0, 4 * P, MapOptions::specific(64 * P, VmPerms::READ))
        .unwrap();
    assert_eq!(root.prefault(P, 8 * P, Access::WRITE).unwrap(), 8);
    assert!((1..9).all(|i| perms(&root, i * P) == Some(S2Perms::RW)));
    assert_eq!(perms(&root, 0), None);
    assert_eq!(pool.stats().live, 8);
    // Installed pages are skipped; a partial page rounds out.
    assert_eq!(root.prefault(0, 10 * P - 1, Access::WRITE).unwrap(), 2);
    assert_eq!(root.prefault(64 * P, 4 * P, Access::READ).unwrap(), 4);
    assert_eq!(perms(&root, 65 * P), Some(S2Perms::READ));
    // The fault path's refusals.
    assert_eq!(
        root.prefault(64 * P, P, Access::WRITE),
        Err(Error::AccessDenied)
    );
    assert_eq!(root.prefault(68 * P, P, Access::READ), Err(Error::NotFound));
    assert_eq!(root.prefault(0, 0, Access::READ), Err(Error::InvalidArgs));
    assert_eq!(
        root.prefault(u64::MAX - P, 4 * P, Access::READ),
        Err(Error::OutOfRange)
    );
    root.check_invariants().unwrap();
}

#[test]
fn a_recorded_working_set_prefetches_a_second_fork_without_writable_shared_frames() {
    let (pool, root) = space();
    let v = Vmo::new(&pool, 32 * P, VmoFlags::empty()).unwrap();
    root.map(&v, 0, 32 * P, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    v.write(0, &[5u8; 16 * P as usize]).unwrap();
    let table = || EptTable::new(HeapPhysMem::new()).unwrap();
    let first = root.fork(table()).unwrap();
    first.set_recording(true);
    let fault = |vmar: &Vmar<Table>, gpa, access| {
        vmar.handle_fault(FaultInfo::new(gpa, access, FaultKind::NotPresent))
            .unwrap()
    };
    fault(&first, 2 * P, Access::WRITE);
    fault(&first, 8 * P, Access::READ);
    let set = first.recorded();
    assert_eq!(set.written(), 1);
    assert!(
        set.len() > 2,
        "fault-around pages are recorded too: {}",
        set.len()
    );
    // Read prefetch: shared frames read-only.
    let second = root.fork(table()).unwrap();
    assert_eq!(second.prefetch(&set, false).unwrap(), set.len() as u64);
    assert_eq!(perms(&second, 2 * P), Some(S2Perms::READ));
    // Copy-ahead: the written page is private and writable, the rest stays read-only.
    let third = root.fork(table()).unwrap();
    third.prefetch(&set, true).unwrap();
    assert_eq!(perms(&third, 2 * P), Some(S2Perms::RW));
    assert_eq!(perms(&third, 8 * P), Some(S2Perms::READ));
    assert_eq!(third.fault_stats().copies, 1);
    for vmar in [&root, &first, &second, &third] {
        vmar.check_invariants().unwrap();
    }
    first.set_recording(false);
    assert!(first.recorded().is_empty());
}
