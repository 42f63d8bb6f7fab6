//! DmaDomain: assignment pins, device accesses are translated only inside assigned regions
//! with the right perms, everything else is refused and counted; pin/unpin interplay.

use ept::{EptTable, HeapPhysMem};
use vmo::{ChildKind, DevicePerms, DmaDomain, Error, FramePool, Vmo, VmoFlags};

const P: u64 = vmo::PAGE_SIZE;
type Domain = DmaDomain<EptTable<HeapPhysMem>>;

fn domain(pool: &FramePool) -> Domain {
    DmaDomain::new(pool, 1 << 32, EptTable::new(HeapPhysMem::new()).unwrap()).unwrap()
}

#[test]
fn valid_accesses_reach_the_assigned_frames() {
    let pool = FramePool::heap();
    let d = domain(&pool);
    let buf = Vmo::new_contiguous(&pool, 4 * P, true).unwrap();
    buf.write(P + 10, b"ring").unwrap();
    d.assign(
        &buf,
        0,
        4 * P,
        0x10_0000,
        DevicePerms::READ | DevicePerms::WRITE,
    )
    .unwrap();
    let segs = d
        .translate(0x10_0000 + P + 10, 4, DevicePerms::READ)
        .unwrap();
    assert_eq!(segs.len(), 1);
    // SAFETY: the segment covers 4 bytes of an assigned, pinned frame.
    let got = unsafe { std::slice::from_raw_parts(segs[0].host, 4) };
    assert_eq!(got, b"ring");
    // A contiguous Vmo translates to one host segment even across pages.
    let segs = d
        .translate(0x10_0000 + 100, 3 * P, DevicePerms::WRITE)
        .unwrap();
    assert_eq!(segs.len(), 1);
    assert_eq!(segs[0].len, 3 * P as usize);
    assert_eq!(segs[0].pa, buf.contiguous_base().unwrap() + 100);
    // SAFETY: inside the assigned region.
    unsafe { *segs[0].host.add(P as usize) = 0xab };
    let mut b = [0u8];
    buf.read(P + 100, &mut b).unwrap();
    assert_eq!(b[0], 0xab, "device writes land in the Vmo");
    assert_eq!(d.stats().translated, 2);
    assert_eq!(d.stats().refused, 0);
}

#[test]
fn bad_device_accesses_are_refused_and_counted() {
    let pool = FramePool::heap();
    let d = domain(&pool);
    let rw = Vmo::new_contiguous(&pool, 2 * P, true).unwrap();
    let ro = Vmo::new_contiguous(&pool, P, true).unwrap();
    d.assign(
        &rw,
        0,
        2 * P,
        0x1000_0000,
        DevicePerms::READ | DevicePerms::WRITE,
    )
    .unwrap();
    d.assign(&ro, 0, P, 0x1000_0000 + 2 * P, DevicePerms::READ)
        .unwrap();
    let cases: &[(u64, u64, DevicePerms, Error)] = &[
        (0, 16, DevicePerms::READ, Error::NotFound), // outside the domain's regions
        (0x1000_0000 - 1, 2, DevicePerms::READ, Error::NotFound), // starts before a region
        (0x1000_0000 + P, 2 * P, DevicePerms::READ, Error::NotFound), // crosses the region's end (even into a neighbour)
        (u64::MAX - 8, 64, DevicePerms::READ, Error::OutOfRange),     // 64-bit wrap-around
        (0x1000_0000, u64::MAX, DevicePerms::READ, Error::OutOfRange), // length overflow
        (
            0x1000_0000 + 2 * P,
            16,
            DevicePerms::WRITE,
            Error::AccessDenied,
        ), // device write into a read-only region
        (1 << 40, 16, DevicePerms::READ, Error::NotFound),            // beyond the IOVA space
        (0x2000_0000, 0, DevicePerms::READ, Error::NotFound), // zero length at a bogus address
    ];
    for (i, &(iova, len, access, want)) in cases.iter().enumerate() {
        assert_eq!(
            d.translate(iova, len, access).unwrap_err(),
            want,
            "case {i}"
        );
    }
    let stats = d.stats();
    assert_eq!(stats.refused, cases.len() as u64);
    assert_eq!(
        (stats.outside, stats.wrapped, stats.denied, stats.other),
        (5, 2, 1, 0),
        "refusals by reason"
    );
    assert_eq!(d.stats().translated, 0);
    // The domain still serves valid requests.
    assert_eq!(
        d.translate(0x1000_0000 + 2 * P, 16, DevicePerms::READ)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn assignment_pins_and_unassign_releases() {
    let pool = FramePool::heap();
    let d = domain(&pool);
    let dma = Vmo::new(&pool, 4 * P, VmoFlags::DMA | VmoFlags::RESIZABLE).unwrap();
    d.assign(&dma, 0, 4 * P, 0, DevicePerms::READ).unwrap();
    assert_eq!(dma.decommit(0, P), Err(Error::BadState));
    assert_eq!(dma.resize(P), Err(Error::BadState));
    assert_eq!(
        dma.create_child(ChildKind::Snapshot, 0, 4 * P).unwrap_err(),
        Error::BadState
    );
    let contiguous = Vmo::new_contiguous(&pool, P, true).unwrap();
    d.assign(&contiguous, 0, P, 8 * P, DevicePerms::WRITE)
        .unwrap();
    assert_eq!(contiguous.decommit(0, P), Err(Error::BadState));
    assert_eq!(
        contiguous
            .create_child(ChildKind::Snapshot, 0, P)
            .unwrap_err(),
        Error::BadState
    );
    assert_eq!(
        d.assign(&dma, 0, P, 2 * P, DevicePerms::READ).unwrap_err(),
        Error::AlreadyExists,
        "overlapping iova"
    );
    d.unassign(0).unwrap();
    assert_eq!(
        d.translate(0, 1, DevicePerms::READ).unwrap_err(),
        Error::NotFound
    );
    dma.decommit(0, P).unwrap();
    dma.create_child(ChildKind::Snapshot, 0, 4 * P).unwrap();
    dma.resize(P).unwrap();
    assert_eq!(d.unassign(0).unwrap_err(), Error::NotFound);
    d.unassign(8 * P).unwrap();
    assert_eq!(
        contiguous.decommit(0, P),
        Err(Error::NotSupported),
        "contiguous frames stay"
    );
}

#[test]
fn only_dma_vmos_from_the_pool_can_be_assigned() {
    let pool = FramePool::heap();
    let d = domain(&pool);
    let plain = Vmo::new(&pool, P, VmoFlags::empty()).unwrap();
    assert_eq!(
        d.assign(&plain, 0, P, 0, DevicePerms::READ).unwrap_err(),
        Error::NotSupported
    );
    let other = FramePool::heap();
    let foreign = Vmo::new_contiguous(&other, P, true).unwrap();
    assert_eq!(
        d.assign(&foreign, 0, P, 0, DevicePerms::READ).unwrap_err(),
        Error::InvalidArgs
    );
    let dma = Vmo::new_contiguous(&pool, 2 * P, true).unwrap();
    assert_eq!(
        d.assign(&dma, 0, P + 1, 0, DevicePerms::READ).unwrap_err(),
        Error::InvalidArgs
    );
    assert_eq!(
        d.assign(&dma, 0, 4 * P, 0, DevicePerms::READ).unwrap_err(),
        Error::OutOfRange
    );
    assert_eq!(
        d.assign(&dma, 0, P, 0, DevicePerms::empty()).unwrap_err(),
        Error::InvalidArgs
    );
    assert!(!dma.has_pins(), "a failed assignment leaves nothing pinned");
}

#[test]
fn teardown_frees_every_frame() {
    let pool = FramePool::heap();
    {
        let d = domain(&pool);
        let dma = Vmo::new_contiguous(&pool, 8 * P, true).unwrap();
        d.assign(&dma, 0, 8 * P, 0, DevicePerms::READ).unwrap();
        d.translate(0, 8 * P, DevicePerms::READ).unwrap();
    }
    assert_eq!(pool.stats().live, 0);
}
