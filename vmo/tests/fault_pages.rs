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

/// A pager whose page `i` holds the byte `i + 1`, recording the read-aheads announced to it.
struct Announced(std::sync::Mutex<Vec<(u64, u64)>>);

impl vmo::Pager for Announced {
    fn commit_page(&self, idx: u64, buf: &mut [u8; vmo::PAGE_BYTES]) -> vmo::Result<()> {
        buf.fill(idx as u8 + 1);
        Ok(())
    }
    fn commit_overwrite(&self, _idx: u64) -> vmo::Result<()> {
        Ok(())
    }
    fn update_page(&self, _idx: u64) -> vmo::Result<()> {
        Ok(())
    }
    fn decommit_page(&self, _idx: u64, _data: &[u8; vmo::PAGE_BYTES]) -> vmo::Result<()> {
        Ok(())
    }
    fn read_ahead(&self, idx: u64, count: u64) {
        self.0.lock().unwrap().push((idx, count));
    }
}

#[test]
fn a_paged_run_is_announced_from_its_first_to_its_last_empty_slot_and_gets_contiguous_frames() {
    let pool = FramePool::heap();
    let pager = std::sync::Arc::new(Announced(Default::default()));
    let vmo = Vmo::new_paged(&pool, 16 * P, VmoFlags::empty(), pager.clone()).unwrap();
    vmo.write(2 * P, &[9u8; P as usize]).unwrap(); // slot 2 committed (overwritten, no read)
    vmo.write(9 * P, &[9u8; P as usize]).unwrap();
    let pas = vmo
        .fault_pages(2, 8, FaultAccess::Read, |run| {
            Ok(run.iter().map(|p| p.frame.paddr()).collect::<Vec<_>>())
        })
        .unwrap()
        .unwrap();
    assert_eq!(pas.len(), 8);
    // Slots 3..=8 were empty: announced as (3, 6), and their frames are one contiguous run.
    assert_eq!(*pager.0.lock().unwrap(), vec![(3, 6)]);
    assert!(pas[1..7].windows(2).all(|w| w[1] == w[0] + P), "{pas:x?}");
    let mut b = [0u8; 1];
    for i in 3..9 {
        vmo.read(i * P + 17, &mut b).unwrap();
        assert_eq!(b[0], i as u8 + 1, "page {i}");
    }
    // The reserve of the run is gone: only the run's and the written pages are live.
    assert_eq!(pool.stats().live, 8);
    // Nothing empty: nothing announced; one page: nothing announced.
    vmo.fault_pages(3, 6, FaultAccess::Read, |_| Ok(()))
        .unwrap();
    vmo.fault_pages(12, 1, FaultAccess::Read, |_| Ok(()))
        .unwrap();
    assert_eq!(pager.0.lock().unwrap().len(), 1);
}
