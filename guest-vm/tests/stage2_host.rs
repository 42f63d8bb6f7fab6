//! `KvmStage2` semantics checked from the host side (no vCPU): the `ept::Stage2` contract
//! (alignment, overlap, same-size replacement, splitting of large leaves on unmap/protect,
//! query) and that the reservation really shows the installed memfd frames. Needs
//! userfaultfd with write-protect (root here); skips with a printed reason otherwise, or fails
//! when `GUESTMEM_REQUIRE_KVM=1`.

use std::sync::Arc;

use ept::{MemType, PageSize, S2Perms, Stage2};
use guest_vm::sys::uffd::Uffd;
use guest_vm::{KvmStage2, MemfdFrameAlloc, Reservation};
use vmo::FrameAlloc;

const P: u64 = 4096;
const M2: u64 = 2 << 20;

fn setup() -> Option<(KvmStage2, Arc<MemfdFrameAlloc>)> {
    let uffd = match Uffd::open() {
        Ok(u) => Arc::new(u),
        Err(e) => {
            if std::env::var("GUESTMEM_REQUIRE_KVM").is_ok_and(|v| v == "1") {
                panic!("GUESTMEM_REQUIRE_KVM=1 but userfaultfd is unavailable: {e}");
            }
            println!("SKIP: {e}");
            return None;
        }
    };
    let res = Arc::new(Reservation::new(guest_vm::Gpa(0), 16 << 20, uffd).unwrap());
    let frames = Arc::new(MemfdFrameAlloc::new(32 << 20).unwrap());
    Some((KvmStage2::new(res, frames.clone()), frames))
}

fn host_byte(s: &KvmStage2, gpa: u64) -> u8 {
    let hva = s.reservation().hva_of(guest_vm::Gpa(gpa), 1).unwrap();
    // SAFETY: the test only reads pages it installed.
    unsafe { *hva.as_mut_ptr::<u8>() }
}

#[test]
fn map_query_replace_and_overlap() {
    let Some((mut s, frames)) = setup() else {
        return;
    };
    let wb = MemType::WriteBack;
    let a = frames.alloc_frame().unwrap();
    let b = frames.alloc_frame().unwrap();
    // SAFETY: `a` and `b` are allocated frames of `frames`, nothing else writes them.
    unsafe {
        *frames.frame_ptr(a) = 0xaa;
        *frames.frame_ptr(b) = 0xbb;
    }
    assert_eq!(
        s.map(0x5000, a, PageSize::Size4K, S2Perms::RW, wb),
        Ok(None)
    );
    assert_eq!(host_byte(&s, 0x5000), 0xaa);
    let t = s.query(0x5123).unwrap();
    assert_eq!((t.gpa, t.pa, t.size), (0x5000, a, PageSize::Size4K));
    // Same size, same address: replaced, old translation returned, flush pending.
    let old = s
        .map(0x5000, b, PageSize::Size4K, S2Perms::READ, wb)
        .unwrap()
        .unwrap();
    assert_eq!(old.pa, a);
    assert!(s.flush_pending());
    assert_eq!(host_byte(&s, 0x5000), 0xbb);
    s.flush(ept::FlushScope::Context);
    assert!(!s.flush_pending());
    // Bad input is an error value.
    assert_eq!(
        s.map(0x5001, a, PageSize::Size4K, S2Perms::RW, wb),
        Err(ept::Error::InvalidArgs)
    );
    assert_eq!(
        s.map(0x6000, a, PageSize::Size4K, S2Perms::empty(), wb),
        Err(ept::Error::InvalidArgs)
    );
    assert_eq!(
        s.map(0x6000, a, PageSize::Size4K, S2Perms::WRITE, wb),
        Err(ept::Error::NotSupported)
    );
    assert_eq!(
        s.map(16 << 20, a, PageSize::Size4K, S2Perms::RW, wb),
        Err(ept::Error::OutOfRange)
    );
    assert_eq!(
        s.map(0x6000, 64 << 20, PageSize::Size4K, S2Perms::RW, wb),
        Err(ept::Error::OutOfRange)
    );
    assert_eq!(s.unmap(0, 0), Err(ept::Error::InvalidArgs));
    // A 2 MiB leaf over the 4 KiB one overlaps.
    let run = frames.alloc_contiguous(512 + 511).unwrap();
    let run2m = run.next_multiple_of(M2);
    assert_eq!(
        s.map(0, run2m, PageSize::Size2M, S2Perms::RW, wb),
        Err(ept::Error::AlreadyExists)
    );
}

#[test]
fn large_leaves_split_on_partial_unmap_and_protect() {
    let Some((mut s, frames)) = setup() else {
        return;
    };
    let wb = MemType::WriteBack;
    let run = frames.alloc_contiguous(1024).unwrap();
    let pa = run.next_multiple_of(M2);
    for i in 0..512u64 {
        // SAFETY: a frame of the contiguous run allocated above.
        unsafe { *frames.frame_ptr(pa + i * P) = i as u8 };
    }
    s.map(M2, pa, PageSize::Size2M, S2Perms::RW, wb).unwrap();
    assert_eq!(s.query(M2 + 77 * P).unwrap().size, PageSize::Size2M);
    assert_eq!(host_byte(&s, M2 + 77 * P), 77);
    assert_eq!(s.mapped_pages(), 512);
    // Unmap 3 pages in the middle: the leaf splits, neighbours keep their frames.
    assert_eq!(s.unmap(M2 + 10 * P, 3 * P).unwrap(), 3);
    assert_eq!(s.mapped_pages(), 509);
    assert!(s.query(M2 + 11 * P).is_none());
    let t = s.query(M2 + 13 * P).unwrap();
    assert_eq!((t.size, t.pa), (PageSize::Size4K, pa + 13 * P));
    assert_eq!(host_byte(&s, M2 + 13 * P), 13);
    assert_eq!(host_byte(&s, M2 + 9 * P), 9);
    // Holes are not an error; nothing mapped → 0.
    assert_eq!(s.unmap(M2 + 10 * P, 3 * P).unwrap(), 0);
    // Protect a range straddling the hole: only mapped pages count.
    assert_eq!(s.protect(M2 + 8 * P, 8 * P, S2Perms::READ).unwrap(), 5);
    assert_eq!(s.query(M2 + 8 * P).unwrap().perms, S2Perms::READ);
    assert_eq!(s.query(M2 + 16 * P).unwrap().perms, S2Perms::RW);
    assert_eq!(s.unmap(0, 16 << 20).unwrap(), 509);
    assert_eq!(s.mapped_pages(), 0);
}

/// The fork's write-protect (`protect(range, READ)`) changes exactly the writable leaves —
/// through the fast path that visits only them, and through the general path once a
/// read-only leaf carries other perms — and a second one changes nothing.
#[test]
fn write_protect_changes_exactly_the_writable_leaves() {
    let Some((mut s, frames)) = setup() else {
        return;
    };
    let wb = MemType::WriteBack;
    let map = |s: &mut KvmStage2, gpa: u64, perms: S2Perms| {
        let f = frames.alloc_frame().unwrap();
        s.map(gpa, f, PageSize::Size4K, perms, wb).unwrap();
    };
    for i in 0..8 {
        map(&mut s, 0x10_0000 + i * P, S2Perms::RW);
    }
    map(&mut s, 0x20_0000, S2Perms::READ);
    let big = frames
        .alloc_contiguous(1024)
        .unwrap()
        .next_multiple_of(2 << 20);
    s.map(0x40_0000, big, PageSize::Size2M, S2Perms::RW, wb)
        .unwrap();
    // A range that cuts the 2 MiB leaf: only its first 16 pages change.
    assert_eq!(s.protect(0, 0x40_0000 + 16 * P, S2Perms::READ), Ok(8 + 16));
    assert_eq!(s.query(0x10_3000).unwrap().perms, S2Perms::READ);
    assert_eq!(s.query(0x40_f000).unwrap().perms, S2Perms::READ);
    assert_eq!(s.query(0x41_0000).unwrap().perms, S2Perms::RW);
    assert_eq!(s.protect(0, 0x40_0000 + 16 * P, S2Perms::READ), Ok(0));
    // Back to RW, then a read-only leaf with EXEC: the general path counts it too.
    assert_eq!(s.protect(0x10_0000, 8 * P, S2Perms::RW), Ok(8));
    map(&mut s, 0x30_0000, S2Perms::READ | S2Perms::EXEC);
    assert_eq!(s.protect(0x10_0000, 0x21_0000, S2Perms::READ), Ok(8 + 1));
    assert_eq!(s.query(0x30_0000).unwrap().perms, S2Perms::READ);
    assert_eq!(s.protect(0, 16 << 20, S2Perms::READ), Ok(512 - 16));
    assert_eq!(s.protect(0, 16 << 20, S2Perms::READ), Ok(0));
    // Unmapping keeps the index true: a remapped writable page is protected again.
    s.unmap(0x10_0000, P).unwrap();
    map(&mut s, 0x10_0000, S2Perms::RW);
    assert_eq!(s.protect(0, 16 << 20, S2Perms::READ), Ok(1));
}

/// A write-protect that fails halfway (here: the host range behind the second run was
/// replaced by a private mapping of a disk file, which userfaultfd cannot register, so moving
/// it between the synchronous descriptor and the tracker fails) leaves the records true. A
/// write-protect is deferred to the reservation's `seal`: the records say read-only at once,
/// and a `seal` failing on the second run moves the first, keeps the second deferred and
/// keeps failing (so no writer passes). On the unprotect direction, the runs already made
/// writable on the host read as writable, the rest as before. Before the fix the records kept
/// saying "writable" for pages that were read-only on the host, or the reverse.
#[test]
fn protect_failing_halfway_keeps_records_true() {
    use guest_vm::sys::mmap::{Backing, MapFlags, Prot};
    let Some((mut s, frames)) = setup() else {
        return;
    };
    let wb = MemType::WriteBack;
    for gpa in [0, 2 * P] {
        let f = frames.alloc_frame().unwrap();
        s.map(gpa, f, PageSize::Size4K, S2Perms::RW, wb).unwrap();
    }
    // Sabotage the second run: a private mapping of this test's executable (an ordinary disk
    // file: userfaultfd can neither register nor unregister it).
    let exe = std::fs::File::open(std::env::current_exe().unwrap()).unwrap();
    let res = s.reservation().clone();
    let sabotage = |gpa: u64| {
        use std::os::fd::AsFd;
        let hva = res.hva_of(guest_vm::Gpa(gpa), P).unwrap().raw();
        // SAFETY: the test holds no reference into guest memory.
        unsafe {
            res.host_mapping()
                .replace(
                    "sabotage",
                    hva,
                    P,
                    Prot::ReadWrite,
                    Backing::Private {
                        fd: exe.as_fd(),
                        offset: 0,
                    },
                    MapFlags::empty(),
                )
                .unwrap()
        };
    };
    sabotage(2 * P);
    // The write-protect itself is deferred (no host call), so it succeeds; the reservation's
    // `seal`, which every writer calls first, fails on the sabotaged run and keeps it
    // deferred: no writer gets past it.
    assert_eq!(s.protect(0, 3 * P, S2Perms::READ), Ok(2));
    assert_eq!(s.reservation().seal_stats().pending_pages, 2);
    assert!(s.reservation().seal().is_err());
    let st = s.reservation().seal_stats();
    assert_eq!(
        (st.sealed_pages, st.pending_pages),
        (1, 1),
        "page 0 moved, page 2 still deferred"
    );
    assert!(s.reservation().seal().is_err(), "and it stays refused");
    assert_eq!(s.query(0).unwrap().perms, S2Perms::READ);
    assert_eq!(s.query(2 * P).unwrap().perms, S2Perms::READ);
    s.check_invariants();

    // The other direction: unprotect fails on the sabotaged run after the first succeeded.
    let f = frames.alloc_frame().unwrap();
    s.map(4 * P, f, PageSize::Size4K, S2Perms::READ, wb)
        .unwrap();
    // Page 2 becomes a fresh read-only leaf (unmapping also repairs the sabotaged piece and
    // ends its deferral).
    s.unmap(2 * P, P).unwrap();
    assert_eq!(s.reservation().seal_stats().pending_pages, 0);
    s.reservation().seal().unwrap();
    let f2 = frames.alloc_frame().unwrap();
    s.map(2 * P, f2, PageSize::Size4K, S2Perms::READ, wb)
        .unwrap();
    // Page 0 READ, page 2 READ, page 4 READ; sabotage page 4.
    sabotage(4 * P);
    assert!(s.protect(0, 5 * P, S2Perms::RW).is_err());
    assert_eq!(
        s.query(0).unwrap().perms,
        S2Perms::RW,
        "unprotected on the host, so recorded"
    );
    assert_eq!(s.query(2 * P).unwrap().perms, S2Perms::RW);
    assert_eq!(
        s.query(4 * P).unwrap().perms,
        S2Perms::READ,
        "still protected in the records"
    );
    s.check_invariants();
}
