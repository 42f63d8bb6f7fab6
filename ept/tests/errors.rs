//! Every bad request is a typed error (never a panic), allocation failure leaves the table
//! consistent (also for a dirty harvest), and flush bookkeeping: one flush per operation, frames
//! returned on flush.

use ept::*;
use proptest::prelude::*;

const K4: u64 = PAGE_SIZE;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
const WB: MemType = MemType::WriteBack;

fn ept(mem: &HeapPhysMem) -> EptTable<&HeapPhysMem> {
    EptTable::new(mem).unwrap()
}
fn npt(mem: &HeapPhysMem) -> NptTable<&HeapPhysMem> {
    NptTable::new(mem).unwrap()
}

/// The checks that are the same on both formats.
fn common_errors(t: &mut dyn Stage2) {
    use PageSize::*;
    // Misaligned gpa or pa for the page size.
    assert_eq!(
        t.map(0x800, 0, Size4K, S2Perms::RW, WB),
        Err(Error::InvalidArgs)
    );
    assert_eq!(
        t.map(0, 0x800, Size4K, S2Perms::RW, WB),
        Err(Error::InvalidArgs)
    );
    assert_eq!(
        t.map(K4, 0, Size2M, S2Perms::RW, WB),
        Err(Error::InvalidArgs)
    );
    assert_eq!(
        t.map(0, M2 + K4, Size2M, S2Perms::RW, WB),
        Err(Error::InvalidArgs)
    );
    assert_eq!(
        t.map(M2, 0, Size1G, S2Perms::RW, WB),
        Err(Error::InvalidArgs)
    );
    assert_eq!(
        t.map(0, M2, Size1G, S2Perms::RW, WB),
        Err(Error::InvalidArgs)
    );
    // gpa beyond 48 bits, pa beyond 52 bits; the last page below each limit works.
    assert_eq!(
        t.map(GPA_LIMIT, 0, Size4K, S2Perms::RW, WB),
        Err(Error::OutOfRange)
    );
    assert_eq!(
        t.map(!(G1 - 1), 0, Size1G, S2Perms::RW, WB),
        Err(Error::OutOfRange)
    );
    assert_eq!(
        t.map(0, PA_LIMIT, Size4K, S2Perms::RW, WB),
        Err(Error::OutOfRange)
    );
    assert_eq!(
        t.map(0, 1 << 63, Size1G, S2Perms::RW, WB),
        Err(Error::OutOfRange)
    );
    assert_eq!(
        t.map(GPA_LIMIT - K4, PA_LIMIT - K4, Size4K, S2Perms::RW, WB),
        Ok(None)
    );
    assert_eq!(
        t.map(GPA_LIMIT - G1, PA_LIMIT - G1, Size1G, S2Perms::RW, WB),
        Err(Error::AlreadyExists)
    );
    assert_eq!(t.unmap(GPA_LIMIT - G1, G1), Ok(1));
    assert_eq!(
        t.map(GPA_LIMIT - G1, PA_LIMIT - G1, Size1G, S2Perms::RW, WB),
        Ok(None)
    );
    // Permissions: empty, write without read.
    assert_eq!(
        t.map(0, 0, Size4K, S2Perms::empty(), WB),
        Err(Error::InvalidArgs)
    );
    assert_eq!(
        t.map(0, 0, Size4K, S2Perms::WRITE, WB),
        Err(Error::InvalidArgs)
    );
    assert_eq!(
        t.map(0, 0, Size4K, S2Perms::WRITE | S2Perms::EXEC, WB),
        Err(Error::InvalidArgs)
    );
    assert_eq!(
        t.map(0, 0, Size4K, S2Perms::from_bits_retain(0x80), WB),
        Err(Error::InvalidArgs)
    );
    // Ranges: zero length, length or address not a multiple of 4 KiB, overflow, beyond 2^48.
    for (gpa, len, err) in [
        (0, 0, Error::InvalidArgs),
        (0, 0x800, Error::InvalidArgs),
        (0, K4 + 1, Error::InvalidArgs),
        (0x10, K4, Error::InvalidArgs),
        (!(K4 - 1), 2 * K4, Error::OutOfRange),
        (GPA_LIMIT - K4, 2 * K4, Error::OutOfRange),
        (GPA_LIMIT, K4, Error::OutOfRange),
        (0, !(K4 - 1), Error::OutOfRange),
    ] {
        assert_eq!(t.unmap(gpa, len), Err(err), "unmap {gpa:#x} {len:#x}");
        assert_eq!(
            t.protect(gpa, len, S2Perms::READ),
            Err(err),
            "protect {gpa:#x} {len:#x}"
        );
    }
    assert_eq!(t.protect(0, K4, S2Perms::empty()), Err(Error::InvalidArgs));
    assert_eq!(t.protect(0, K4, S2Perms::WRITE), Err(Error::InvalidArgs));
    assert_eq!(t.query(GPA_LIMIT), None);
    assert_eq!(t.query(u64::MAX), None);

    // Overlaps.
    assert_eq!(t.map(0, 0, Size2M, S2Perms::RW, WB), Ok(None));
    assert_eq!(
        t.map(K4, 0, Size4K, S2Perms::RW, WB),
        Err(Error::AlreadyExists)
    );
    assert_eq!(
        t.map(0, 0, Size4K, S2Perms::RW, WB),
        Err(Error::AlreadyExists)
    );
    assert_eq!(
        t.map(0, 0, Size1G, S2Perms::RW, WB),
        Err(Error::AlreadyExists)
    );
    assert_eq!(t.map(4 * M2 + K4, 0, Size4K, S2Perms::RW, WB), Ok(None));
    assert_eq!(
        t.map(4 * M2, 0, Size2M, S2Perms::RW, WB),
        Err(Error::AlreadyExists)
    );
    assert_eq!(t.map(G1, 0, Size1G, S2Perms::RW, WB), Ok(None));
    assert_eq!(
        t.map(G1 + M2, 0, Size2M, S2Perms::RW, WB),
        Err(Error::AlreadyExists)
    );
    assert_eq!(
        t.map(G1 + 3 * K4, 0, Size4K, S2Perms::RW, WB),
        Err(Error::AlreadyExists)
    );
    // Same size at the same address: replaced, old translation returned.
    let old = t
        .map(0, 4 * M2, Size2M, S2Perms::READ, WB)
        .unwrap()
        .unwrap();
    assert_eq!(
        (old.gpa, old.pa, old.size, old.perms),
        (0, 0, Size2M, S2Perms::RW)
    );
    let now = t.query(0x1234).unwrap();
    assert_eq!((now.pa, now.perms), (4 * M2, S2Perms::READ));
    assert_eq!(now.pa_of(0x1234), 4 * M2 + 0x1234);
}

#[test]
fn bad_requests_are_typed_errors_ept() {
    let mem = HeapPhysMem::new();
    let mut t = ept(&mem);
    common_errors(&mut t);
    // EPT can express execute-only and every memory type.
    assert_eq!(
        t.map(8 * G1, 0, PageSize::Size4K, S2Perms::EXEC, WB),
        Ok(None)
    );
    assert_eq!(t.query(8 * G1).unwrap().perms, S2Perms::EXEC);
    assert_eq!(
        t.map(
            9 * G1,
            0,
            PageSize::Size4K,
            S2Perms::READ,
            MemType::WriteCombining
        ),
        Ok(None)
    );
    assert_eq!(t.query(9 * G1).unwrap().mem_type, MemType::WriteCombining);
}

#[test]
fn bad_requests_are_typed_errors_npt() {
    let mem = HeapPhysMem::new();
    let mut t = npt(&mem);
    common_errors(&mut t);
    // NPT cannot express execute-only, nor WC/WP under the default PAT.
    assert_eq!(
        t.map(8 * G1, 0, PageSize::Size4K, S2Perms::EXEC, WB),
        Err(Error::NotSupported)
    );
    assert_eq!(t.protect(0, K4, S2Perms::EXEC), Err(Error::NotSupported));
    for mt in [MemType::WriteCombining, MemType::WriteProtected] {
        assert_eq!(
            t.map(9 * G1, 0, PageSize::Size4K, S2Perms::READ, mt),
            Err(Error::NotSupported)
        );
    }
    for mt in [
        MemType::WriteBack,
        MemType::WriteThrough,
        MemType::Uncacheable,
    ] {
        t.map(9 * G1, 0, PageSize::Size4K, S2Perms::READ, mt)
            .unwrap();
        assert_eq!(t.query(9 * G1).unwrap().mem_type, mt);
    }
}

#[test]
fn no_memory_leaves_table_consistent() {
    let mem = HeapPhysMem::new();
    let mut t = ept(&mem);
    assert_eq!(mem.live_frames(), 1);
    // A 4 KiB map needs three new tables; with room for two, nothing is linked or leaked.
    mem.set_limit(3);
    assert_eq!(
        t.map(0, 0, PageSize::Size4K, S2Perms::RW, WB),
        Err(Error::NoMemory)
    );
    assert_eq!((mem.live_frames(), t.table_frames()), (1, 1));
    assert_eq!(t.query(0), None);
    // 1 GiB leaf (one PDPT), then no room to split it.
    assert_eq!(t.map(0, 0, PageSize::Size1G, S2Perms::RWX, WB), Ok(None));
    assert_eq!(t.table_frames(), 2);
    mem.set_limit(2);
    assert_eq!(t.unmap(K4, K4), Err(Error::NoMemory));
    assert_eq!(t.protect(M2, K4, S2Perms::READ), Err(Error::NoMemory));
    assert!(!t.flush_pending());
    let q = t.query(5 * M2).unwrap();
    assert_eq!(
        (q.gpa, q.size, q.perms),
        (0, PageSize::Size1G, S2Perms::RWX)
    );
    // Room for one split (1G → 2M) but not the second (2M → 4K): the first split stays
    // (same translations), nothing is unmapped.
    mem.set_limit(3);
    assert_eq!(t.unmap(M2 + K4, K4), Err(Error::NoMemory));
    let q = t.query(M2 + K4).unwrap();
    assert_eq!(
        (q.gpa, q.pa, q.size, q.perms),
        (M2, M2, PageSize::Size2M, S2Perms::RWX)
    );
    assert_eq!(t.table_frames(), 3);
    assert_eq!(mem.live_frames(), 3);
    // Protect with unchanged permissions needs no split, so it succeeds without memory.
    assert_eq!(t.protect(M2 + K4, K4, S2Perms::RWX), Ok(0));
    mem.clear_limit();
    assert_eq!(t.unmap(M2 + K4, K4), Ok(1));
    assert_eq!(t.query(M2 + K4), None);
    assert_eq!(t.query(M2).unwrap().size, PageSize::Size4K);
    assert_eq!(t.unmap(0, G1), Ok(512 * 512 - 1));
    t.flush(FlushScope::Context);
    assert_eq!((mem.live_frames(), t.table_frames()), (1, 1));
    drop(t);
    assert_eq!(mem.live_frames(), 0);
    assert_eq!(mem.allocated_frames(), mem.freed_frames());
    assert_eq!(mem.bad_frees(), 0);
}

#[test]
fn one_flush_per_operation_and_deferred_frees() {
    let mem = HeapPhysMem::new();
    let mut t = ept(&mem);
    // Installing into empty slots needs no flush.
    for i in 0..4 {
        t.map(i * K4, i * K4, PageSize::Size4K, S2Perms::READ, WB)
            .unwrap();
    }
    assert!(!t.flush_pending());
    assert!(!t.flush_if_pending(FlushScope::Context));
    // Identical replacement: no flush; upgraded permissions or a new frame: flush.
    t.map(0, 0, PageSize::Size4K, S2Perms::READ, WB).unwrap();
    assert!(!t.flush_pending());
    t.map(0, 0, PageSize::Size4K, S2Perms::RW, WB).unwrap();
    assert!(t.flush_pending());
    t.flush(FlushScope::Context);
    assert_eq!(t.invalidator().context_flushes, 1);
    assert_eq!(t.invalidator().last_context, Some(t.eptp().bits()));
    // Protect a range: one operation, one flush.
    assert_eq!(t.protect(0, 4 * K4, S2Perms::READ), Ok(1));
    assert!(t.flush_if_pending(FlushScope::Context));
    assert_eq!(t.protect(0, 4 * K4, S2Perms::READ), Ok(0));
    assert!(!t.flush_pending());
    // Unmapping everything retires the three lower tables until the flush.
    assert_eq!(t.unmap(0, G1), Ok(4));
    assert!(t.flush_pending());
    assert_eq!(
        (t.table_frames(), t.retired_frames(), mem.live_frames()),
        (1, 3, 4)
    );
    t.flush(FlushScope::All);
    assert_eq!(
        (t.table_frames(), t.retired_frames(), mem.live_frames()),
        (1, 0, 1)
    );
    assert_eq!(t.flush_count(), 3);
    assert_eq!(t.invalidator().total(), 3);
    assert_eq!(t.invalidator().all_flushes, 1);
    // Unmapping a hole is not an error and needs no flush.
    assert_eq!(t.unmap(0, G1), Ok(0));
    assert!(!t.flush_pending());
}

#[test]
fn tables_are_send_and_shareable() {
    fn is_send<T: Send>() {}
    fn is_sync<T: Sync>() {}
    is_send::<HeapPhysMem>();
    is_sync::<HeapPhysMem>();
    is_send::<EptTable<&'static HeapPhysMem>>();
    is_send::<NptTable<std::sync::Arc<HeapPhysMem>, NptTlbControl>>();
    let mem = std::sync::Arc::new(HeapPhysMem::new());
    let t = std::sync::Mutex::new(EptTable::new(mem.clone()).unwrap());
    std::thread::scope(|s| {
        s.spawn(|| {
            t.lock()
                .unwrap()
                .map(0, 0, PageSize::Size2M, S2Perms::RW, WB)
                .unwrap();
        });
    });
    assert!(t.lock().unwrap().query(0x1000).is_some());
    drop(t);
    assert_eq!(mem.live_frames(), 0);
}

#[test]
fn heap_phys_mem_accounting() {
    let mem = HeapPhysMem::with_capacity(64);
    let frames: Vec<u64> = (0..64).map(|_| mem.alloc_frame().unwrap()).collect();
    assert_eq!(mem.alloc_frame(), None);
    assert!(frames
        .iter()
        .all(|f| f % PAGE_SIZE == 0 && *f != 0 && *f < PA_LIMIT));
    let p = mem.frame_ptr(frames[3]);
    // SAFETY: frames[3] is live; `PhysMem` makes its pointer valid for 512 u64s.
    unsafe { p.add(511).write(0xdead) };
    // SAFETY: frames[3] came from this pool and is not used afterwards.
    unsafe { mem.free_frame(frames[3]) };
    // SAFETY: deliberately breaks the contract: HeapPhysMem documents that a double free
    // changes nothing (it is counted), and nothing uses the frame.
    unsafe { mem.free_frame(frames[3]) }; // double free: ignored, counted
                                          // SAFETY: likewise for an address it never handed out.
    unsafe { mem.free_frame(0x1234) }; // foreign address: ignored, counted
    assert_eq!(mem.bad_frees(), 2);
    let again = mem.alloc_frame().unwrap();
    assert_eq!(again, frames[3]);
    let p = mem.frame_ptr(again);
    assert!(
        // SAFETY: `again` is live; its pointer is valid for 512 u64s.
        (0..512).all(|i| unsafe { p.add(i).read() } == 0),
        "reused frame is zeroed"
    );
    assert_eq!(mem.live_frames(), 64);
    assert_eq!(mem.allocated_frames(), 65);
    assert_eq!(mem.freed_frames(), 1);
    assert!(mem.frame_ptr(7).is_null());
}

fn arb_perms() -> impl Strategy<Value = S2Perms> {
    any::<u8>().prop_map(S2Perms::from_bits_retain)
}
fn arb_mem_type() -> impl Strategy<Value = MemType> {
    prop_oneof![
        Just(MemType::Uncacheable),
        Just(MemType::WriteCombining),
        Just(MemType::WriteThrough),
        Just(MemType::WriteProtected),
        Just(MemType::WriteBack),
    ]
}
fn arb_size() -> impl Strategy<Value = PageSize> {
    prop_oneof![
        Just(PageSize::Size4K),
        Just(PageSize::Size2M),
        Just(PageSize::Size1G)
    ]
}
/// Arbitrary u64s, half of them masked to page alignment and to 48 bits so that the deeper
/// code paths run too.
fn arb_addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        any::<u64>().prop_map(|a| a & (GPA_LIMIT - 1) & !(K4 - 1)),
        (0u64..8, 0u64..4).prop_map(|(g, p)| g * G1 + p * M2),
    ]
}

#[derive(Debug, Clone)]
enum AnyOp {
    Map(u64, u64, PageSize, S2Perms, MemType),
    Unmap(u64, u64),
    Protect(u64, u64, S2Perms),
    Query(u64),
    Flush,
}

fn arb_op() -> impl Strategy<Value = AnyOp> {
    prop_oneof![
        (
            arb_addr(),
            arb_addr(),
            arb_size(),
            arb_perms(),
            arb_mem_type()
        )
            .prop_map(|(g, p, s, pe, m)| AnyOp::Map(g, p, s, pe, m)),
        (arb_addr(), arb_addr()).prop_map(|(g, l)| AnyOp::Unmap(g, l)),
        (arb_addr(), arb_addr(), arb_perms()).prop_map(|(g, l, p)| AnyOp::Protect(g, l, p)),
        any::<u64>().prop_map(AnyOp::Query),
        Just(AnyOp::Flush),
    ]
}

fn run_any(t: &mut dyn Stage2, ops: &[AnyOp]) {
    for op in ops {
        match *op {
            AnyOp::Map(g, p, s, pe, m) => {
                let _ = t.map(g, p, s, pe, m);
            }
            AnyOp::Unmap(g, l) => {
                let _ = t.unmap(g, l);
            }
            AnyOp::Protect(g, l, p) => {
                let _ = t.protect(g, l, p);
            }
            AnyOp::Query(g) => {
                if let Some(tr) = t.query(g) {
                    assert!(tr.gpa <= g && g - tr.gpa < tr.size.bytes());
                }
            }
            AnyOp::Flush => t.flush(FlushScope::Context),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Arbitrary arguments never panic, on either format, and nothing leaks.
    #[test]
    fn arbitrary_arguments_never_panic(ops in proptest::collection::vec(arb_op(), 1..40)) {
        let mem = HeapPhysMem::new();
        run_any(&mut ept(&mem), &ops);
        run_any(&mut npt(&mem), &ops);
        prop_assert_eq!(mem.live_frames(), 0);
        prop_assert_eq!(mem.bad_frees(), 0);
    }
}

/// Accessed/dirty bits set by the "hardware" (written straight into the leaf) are reported by
/// `query` and survive splits and permission changes.
#[test]
fn accessed_dirty_survive_split_and_protect() {
    use ept::entry::EntryFormat;
    let mem = HeapPhysMem::new();
    let mut t =
        EptTable::with_invalidate(&mem, CountingInvalidate::default(), AccessDirty::Enabled)
            .unwrap();
    t.map(0, M2, PageSize::Size2M, S2Perms::RWX, WB).unwrap();
    // Walk root → PDPT → PD by hand and set A (8) and D (9) in the 2 MiB leaf.
    let mut table = t.page_table().root();
    for _ in 0..2 {
        // SAFETY: `table` is a frame the table holds (the root, then linked tables); entry 0
        // is in bounds. The table is not being modified concurrently.
        let e = EptEntry::from_raw(unsafe { mem.frame_ptr(table).read() });
        table = e.table_address();
    }
    // SAFETY: `table` is the PD the table holds; entry 0 is the 2 MiB leaf, which only this
    // thread touches (playing the CPU's A/D update).
    unsafe {
        let p = mem.frame_ptr(table);
        p.write(p.read() | (1 << 8) | (1 << 9));
    }
    let q = t.query(0).unwrap();
    assert!(q.accessed && q.dirty);
    assert_eq!(t.protect(K4, K4, S2Perms::READ), Ok(1));
    for gpa in [0, K4, 2 * K4] {
        let q = t.query(gpa).unwrap();
        assert_eq!(q.size, PageSize::Size4K);
        assert!(q.accessed && q.dirty, "{gpa:#x}");
    }
    assert_eq!(t.query(K4).unwrap().perms, S2Perms::READ);
}

/// `harvest_dirty`: bad ranges are typed errors, a table without A/D is `NotSupported`, and a
/// split that finds no frame fails before anything is reported or cleaned.
#[test]
fn harvest_errors_change_nothing() {
    fn check(t: &mut dyn Stage2, mem: &HeapPhysMem) {
        let mut dirty = vec![7];
        for (gpa, len, err) in [
            (0, 0, Error::InvalidArgs),
            (0, K4 + 1, Error::InvalidArgs),
            (0x10, K4, Error::InvalidArgs),
            (GPA_LIMIT - K4, 2 * K4, Error::OutOfRange),
            (0, !(K4 - 1), Error::OutOfRange),
        ] {
            assert_eq!(
                t.harvest_dirty(gpa, len, &mut dirty),
                Err(err),
                "{gpa:#x} {len:#x}"
            );
        }
        // A dirty 1 GiB leaf (installed writable) and no frame to split it at the range end.
        t.map(0, 0, PageSize::Size1G, S2Perms::RW, WB).unwrap();
        let limit = mem.live_frames();
        mem.set_limit(limit);
        assert_eq!(t.harvest_dirty(0, M2, &mut dirty), Err(Error::NoMemory));
        assert_eq!(dirty, [7]);
        let q = t.query(M2).unwrap();
        assert!(q.dirty && q.size == PageSize::Size1G && !t.flush_pending());
        mem.set_limit(limit + 2);
        assert_eq!(t.harvest_dirty(0, M2, &mut dirty), Ok(512));
        assert!(t.query(M2).unwrap().dirty && !t.query(0).unwrap().dirty);
        mem.clear_limit();
    }
    let mem = HeapPhysMem::new();
    let mut t =
        EptTable::with_invalidate(&mem, CountingInvalidate::default(), AccessDirty::Enabled)
            .unwrap();
    check(&mut t, &mem);
    check(&mut npt(&mem), &mem);
    let mut dirty = Vec::new();
    assert_eq!(
        ept(&mem).harvest_dirty(0, 0, &mut dirty),
        Err(Error::NotSupported)
    );
}
