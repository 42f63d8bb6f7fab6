//! `Stage2::map_run`, the bulk install of a run of 4 KiB pages, on every backend (EPT and NPT
//! keep the default loop of `map`; KVM installs each contiguous frame piece with one `mmap`):
//! every page translates to its frame with the run's perms, existing 4 KiB leaves are replaced
//! (and counted), bad input is an error that installs nothing, and the run unmaps like pages
//! installed one by one.

use conformance::{for_each_backend, Backend};
use ept::{Error, MemType, PageSize, S2Perms, Stage2};

const P: u64 = vmo::PAGE_SIZE;
const BASE: u64 = 0x20_0000;

fn map_run_installs_replaces_and_refuses_like_map<B: Backend>() {
    let pool = B::pool();
    let mut s = B::stage2(&pool);
    let frames: Vec<vmo::Frame> = (0..8).map(|_| pool.alloc_zeroed().unwrap()).collect();
    let pa: Vec<u64> = frames.iter().map(|f| f.paddr()).collect();
    // Pieces of contiguous frames (if the pool hands them out in order) and jumps between.
    let pas = [pa[0], pa[1], pa[2], pa[3], pa[6], pa[7], pa[4]];
    let wb = MemType::WriteBack;
    assert_eq!(s.map_run(BASE, &pas, S2Perms::RW, wb), Ok(0));
    for (i, &frame) in pas.iter().enumerate() {
        let gpa = BASE + i as u64 * P;
        let t = s.query(gpa).unwrap();
        assert_eq!(
            (t.pa_of(gpa), t.size, t.perms),
            (frame, PageSize::Size4K, S2Perms::RW)
        );
    }
    assert!(s.query(BASE + 7 * P).is_none());
    assert!(s.query(BASE - P).is_none());
    // Replacing 4 KiB leaves (the fault path's read-only → private copy, or the reverse).
    assert_eq!(
        s.map_run(BASE + P, &[pa[5], pa[2]], S2Perms::READ, wb),
        Ok(2)
    );
    let t = s.query(BASE + P).unwrap();
    assert_eq!((t.pa_of(BASE + P), t.perms), (pa[5], S2Perms::READ));
    assert_eq!(s.query(BASE + 3 * P).unwrap().perms, S2Perms::RW);
    s.flush(ept::FlushScope::Context);
    // Bad input installs nothing.
    assert_eq!(
        s.map_run(BASE + 8 * P, &[], S2Perms::RW, wb),
        Err(Error::InvalidArgs)
    );
    assert_eq!(
        s.map_run(BASE + 8 * P + 1, &pas[..1], S2Perms::RW, wb),
        Err(Error::InvalidArgs)
    );
    assert_eq!(
        s.map_run(BASE + 8 * P, &[pa[0] + 1], S2Perms::RW, wb),
        Err(Error::InvalidArgs)
    );
    assert!(s.map_run(!(P - 1), &pas, S2Perms::RW, wb).is_err());
    assert!(s.query(BASE + 8 * P).is_none());
    // The run unmaps as its pages.
    assert_eq!(s.unmap(BASE, 16 * P), Ok(7));
    assert!(s.query(BASE).is_none());
    drop(s);
    drop(frames);
}

for_each_backend!(map_run_installs_replaces_and_refuses_like_map);
