//! `Vmo::fault_pages`, the fault path's batched entry: a run made present under one lock and
//! installed by one callback; where it stops, what it reports, and the rights it needs.

use vmo::{ChildKind, Error, FaultAccess, FramePool, Rights, Vmo, VmoFlags, PAGE_SIZE};

const P: u64 = PAGE_SIZE;

/// (writable, committed, copied) of each page of the run `fault_pages` hands over.
fn run(
    vmo: &Vmo,
    first: u64,
    count: u64,
    access: FaultAccess,
) -> Result<Vec<(bool, bool, bool)>, Error> {
    vmo.fault_pages(first, count, access, |run| {
        Ok(run
            .iter()
            .map(|p| (p.writable, p.origin.committed, p.origin.copied))
            .collect())
    })
    .map(Option::unwrap_or_default)
}

#[test]
fn a_run_stops_where_the_access_asks_and_reports_errors_at_its_start() {
    let pool = FramePool::heap();
    let vmo = Vmo::new(&pool, 8 * P, VmoFlags::empty()).unwrap();
    vmo.write(0, &[1u8; 3 * P as usize]).unwrap();
    // Committed pages only: the run ends at the first empty slot.
    assert_eq!(
        run(&vmo, 0, 8, FaultAccess::ReadIfCommitted).unwrap().len(),
        3
    );
    assert_eq!(
        run(&vmo, 3, 5, FaultAccess::ReadIfCommitted).unwrap(),
        vec![]
    );
    // Writes commit the rest; private frames are writable.
    let w = run(&vmo, 0, 8, FaultAccess::Write).unwrap();
    assert_eq!(w.len(), 8);
    assert!(w.iter().all(|&(writable, _, _)| writable));
    assert_eq!(w.iter().filter(|p| p.1).count(), 5);
    assert_eq!(pool.stats().live, 8);
    // Past the end: a run ends there; a run starting there is an error.
    assert_eq!(run(&vmo, 6, 4, FaultAccess::Read).unwrap().len(), 2);
    assert_eq!(run(&vmo, 8, 1, FaultAccess::Read), Err(Error::OutOfRange));
    assert_eq!(
        run(&vmo, u64::MAX, 2, FaultAccess::Read),
        Err(Error::OutOfRange)
    );
    // Rights first.
    let ro = vmo.duplicate(Rights::READ).unwrap();
    assert_eq!(run(&ro, 0, 1, FaultAccess::Write), Err(Error::AccessDenied));
    // An install error is returned as is.
    assert_eq!(
        vmo.fault_pages(0, 2, FaultAccess::Read, |_| Err::<(), _>(Error::NoMemory)),
        Err(Error::NoMemory)
    );
}

#[test]
fn shared_frames_are_read_only_and_skipped_by_write_fault_around() {
    let pool = FramePool::heap();
    let parent = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
    parent.write(0, &[7u8; 4 * P as usize]).unwrap();
    let child = parent.create_child(ChildKind::Snapshot, 0, 4 * P).unwrap();
    let r = run(&child, 0, 4, FaultAccess::ReadIfCommitted).unwrap();
    assert_eq!(r.len(), 4);
    assert!(
        r.iter().all(|&(writable, _, _)| !writable),
        "shared frames stay read-only"
    );
    assert_eq!(
        run(&child, 0, 4, FaultAccess::ReadIfPrivate).unwrap(),
        vec![]
    );
    // A write copies; the copies are private and now pass ReadIfPrivate.
    let w = run(&child, 1, 2, FaultAccess::Write).unwrap();
    assert!(w.iter().all(|&(writable, _, copied)| writable && copied));
    assert_eq!(
        run(&child, 1, 3, FaultAccess::ReadIfPrivate).unwrap().len(),
        2
    );
    let mut buf = [0u8; 1];
    parent.read(P, &mut buf).unwrap();
    assert_eq!(buf, [7]);
}
