//! Backend failures and the defects of issue 11, on the software backend (`EptTable` over
//! `HeapPhysMem`) wrapped in `Flaky`, a `Stage2` whose `unmap` / `protect` fail on demand with
//! `ept::Error::Backend`, as the KVM backend's mmap / userfaultfd steps can.
//!
//! Every path that retires or shares a frame must drop / downgrade its translations first and,
//! when the backend fails, return the error with the frame kept, the tree unchanged and the
//! translation still matching what the Vmo holds (`Vmar::check_invariants`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ept::{
    Access, BackendFailure, EptTable, FaultInfo, FaultKind, FlushScope, HeapPhysMem, MemType,
    PageSize, S2Perms, Stage2, Translation,
};
use vmo::{
    ChildKind, Error, FaultOutcome, FramePool, MapOptions, Placement, VmPerms, Vmar, Vmo, VmoFlags,
    PAGE_SIZE as P,
};

const FAIL: BackendFailure = BackendFailure {
    op: "mmap",
    errno: 12,
};
const BACKEND: Error = Error::Stage2(ept::Error::Backend(FAIL));
const RW: VmPerms = VmPerms::RW;
const R: VmPerms = VmPerms::READ;

#[derive(Clone, Default)]
struct Switches {
    unmap: Arc<AtomicBool>,
    protect: Arc<AtomicBool>,
}

impl Switches {
    fn fail_unmap(&self, on: bool) {
        self.unmap.store(on, Ordering::SeqCst);
    }
    fn fail_protect(&self, on: bool) {
        self.protect.store(on, Ordering::SeqCst);
    }
}

/// The software backend, failing `unmap` / `protect` (before changing anything) on demand.
struct Flaky {
    inner: EptTable<HeapPhysMem>,
    switches: Switches,
}

impl Stage2 for Flaky {
    fn map(
        &mut self,
        gpa: u64,
        pa: u64,
        size: PageSize,
        perms: S2Perms,
        mem_type: MemType,
    ) -> Result<Option<Translation>, ept::Error> {
        self.inner.map(gpa, pa, size, perms, mem_type)
    }
    fn unmap(&mut self, gpa: u64, len: u64) -> Result<u64, ept::Error> {
        if self.switches.unmap.load(Ordering::SeqCst) {
            return Err(ept::Error::Backend(FAIL));
        }
        self.inner.unmap(gpa, len)
    }
    fn protect(&mut self, gpa: u64, len: u64, perms: S2Perms) -> Result<u64, ept::Error> {
        if self.switches.protect.load(Ordering::SeqCst) {
            return Err(ept::Error::Backend(FAIL));
        }
        self.inner.protect(gpa, len, perms)
    }
    fn query(&self, gpa: u64) -> Option<Translation> {
        self.inner.query(gpa)
    }
    fn flush(&mut self, scope: FlushScope) {
        self.inner.flush(scope)
    }
    fn flush_pending(&self) -> bool {
        self.inner.flush_pending()
    }
}

fn flaky() -> (Flaky, Switches) {
    let switches = Switches::default();
    let s = Flaky {
        inner: EptTable::new(HeapPhysMem::new()).unwrap(),
        switches: switches.clone(),
    };
    (s, switches)
}

fn space(size: u64) -> (FramePool, Vmar<Flaky>, Switches) {
    let (s, sw) = flaky();
    (FramePool::heap(), Vmar::new_root(size, s).unwrap(), sw)
}

fn write_fault(vmar: &Vmar<Flaky>, gpa: u64) -> vmo::Result<vmo::Resolution> {
    vmar.handle_fault(FaultInfo::new(gpa, Access::WRITE, FaultKind::NotPresent))
}

fn read_fault(vmar: &Vmar<Flaky>, gpa: u64) -> vmo::Result<vmo::Resolution> {
    vmar.handle_fault(FaultInfo::new(gpa, Access::READ, FaultKind::NotPresent))
}

fn installed(vmar: &Vmar<Flaky>, gpa: u64) -> Option<Translation> {
    vmar.with_stage2(|s| s.query(gpa))
}

fn byte(vmo: &Vmo, offset: u64) -> u8 {
    let mut b = [0u8];
    vmo.read(offset, &mut b).unwrap();
    b[0]
}

fn consistent(vmar: &Vmar<Flaky>) {
    vmar.check_invariants().unwrap();
}

// ---- C1: zero-length ranges -------------------------------------------------------------

#[test]
fn zero_length_decommit_and_commit_touch_nothing() {
    let pool = FramePool::heap();
    let v = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
    v.write(0, &[0xAB]).unwrap();
    v.decommit(100, 0).unwrap();
    assert_eq!(
        byte(&v, 0),
        0xAB,
        "decommit(100, 0) must not discard page 0"
    );
    assert_eq!(v.committed_bytes(), P);
    v.commit(P + 5, 0).unwrap();
    assert_eq!(
        v.committed_bytes(),
        P,
        "commit(4101, 0) must not commit page 1"
    );
    assert!(!v.is_committed(1));
    // The offset is still validated.
    assert_eq!(v.decommit(5 * P, 0), Err(Error::OutOfRange));
    assert_eq!(v.commit(5 * P, 0), Err(Error::OutOfRange));
    v.check_invariants().unwrap();
}

// ---- C2: every frame-retiring path stops on a backend failure ---------------------------

/// A root with one 4-page RW mapping of a fresh Vmo whose page 0 is written and installed.
fn mapped() -> (FramePool, Vmar<Flaky>, Switches, Vmo) {
    let (pool, root, sw) = space(1 << 30);
    let v = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
    root.map(&v, 0, 4 * P, MapOptions::specific(0, RW)).unwrap();
    assert_eq!(
        write_fault(&root, 0).unwrap().outcome,
        FaultOutcome::Committed
    );
    v.write(0, &[7]).unwrap();
    (pool, root, sw, v)
}

fn frame_pa(v: &Vmo, offset: u64) -> u64 {
    v.committed_frame(offset).unwrap().unwrap().paddr()
}

#[test]
fn decommit_keeps_the_frame_when_unmap_fails() {
    let (pool, root, sw, v) = mapped();
    let live = pool.stats().live;
    sw.fail_unmap(true);
    assert_eq!(v.decommit(0, P), Err(BACKEND));
    assert_eq!(byte(&v, 0), 7);
    assert_eq!(pool.stats().live, live, "frame kept");
    assert_eq!(installed(&root, 0).unwrap().pa, frame_pa(&v, 0));
    consistent(&root);
    sw.fail_unmap(false);
    v.decommit(0, P).unwrap();
    assert!(installed(&root, 0).is_none());
    assert_eq!(pool.stats().live, live - 1);
    consistent(&root);
}

#[test]
fn clear_and_resize_keep_frames_when_unmap_fails() {
    let (pool, root, sw) = space(1 << 30);
    let v = Vmo::new(&pool, 4 * P, VmoFlags::RESIZABLE).unwrap();
    root.map(&v, 0, 4 * P, MapOptions::specific(0, RW).allow_faults())
        .unwrap();
    for i in 0..4 {
        write_fault(&root, i * P).unwrap();
        v.write(i * P, &[i as u8 + 1]).unwrap();
    }
    sw.fail_unmap(true);
    assert_eq!(v.clear(0, 2 * P), Err(BACKEND));
    assert_eq!(v.resize(P), Err(BACKEND));
    assert_eq!(v.size(), 4 * P);
    for i in 0..4 {
        assert_eq!(byte(&v, i * P), i as u8 + 1);
        assert_eq!(installed(&root, i * P).unwrap().pa, frame_pa(&v, i * P));
    }
    consistent(&root);
    sw.fail_unmap(false);
    v.clear(0, 2 * P).unwrap();
    v.resize(3 * P).unwrap();
    assert_eq!(v.committed_bytes(), P);
    assert!(installed(&root, 0).is_none() && installed(&root, 3 * P).is_none());
    consistent(&root);
}

#[test]
fn copy_on_write_keeps_the_shared_frame_when_unmap_fails() {
    let (pool, root, sw, v) = mapped();
    let child = v.create_child(ChildKind::Snapshot, 0, 4 * P).unwrap();
    let shared = frame_pa(&v, 0);
    assert!(!installed(&root, 0).unwrap().perms.contains(S2Perms::WRITE));
    sw.fail_unmap(true);
    // A guest write (permission fault) and a host write both need the copy: both refuse.
    let fault = FaultInfo::new(0, Access::WRITE, FaultKind::Permission);
    assert_eq!(root.handle_fault(fault).unwrap_err(), BACKEND);
    assert_eq!(v.write(0, &[9]), Err(BACKEND));
    assert_eq!(frame_pa(&v, 0), shared, "slot keeps the shared frame");
    assert_eq!(installed(&root, 0).unwrap().pa, shared);
    assert_eq!((byte(&v, 0), byte(&child, 0)), (7, 7));
    assert_eq!(pool.stats().cow_copies, 0);
    consistent(&root);
    sw.fail_unmap(false);
    assert_eq!(
        root.handle_fault(fault).unwrap().outcome,
        FaultOutcome::Copied
    );
    assert_ne!(frame_pa(&v, 0), shared);
    consistent(&root);
}

#[test]
fn vmar_unmap_keeps_the_mapping_when_unmap_fails() {
    let (pool, root, sw, v) = mapped();
    let live = pool.stats().live;
    sw.fail_unmap(true);
    assert_eq!(root.unmap(0, 4 * P), Err(BACKEND));
    assert_eq!(root.unmap(P, P), Err(BACKEND), "a split too");
    let info = root.query(0).unwrap();
    assert_eq!((info.base, info.len), (0, 4 * P));
    drop(info);
    assert_eq!(installed(&root, 0).unwrap().pa, frame_pa(&v, 0));
    drop(v);
    assert_eq!(
        pool.stats().live,
        live,
        "the mapping still holds the Vmo and its frame"
    );
    consistent(&root);
    sw.fail_unmap(false);
    root.unmap(0, 4 * P).unwrap();
    assert!(installed(&root, 0).is_none());
    assert_eq!(pool.stats().live, live - 1);
    consistent(&root);
}

#[test]
fn map_overwrite_and_destroy_keep_mappings_when_unmap_fails() {
    let (pool, root, sw) = space(1 << 30);
    let sub = root
        .allocate(Placement::Specific(16 * P), 8 * P, VmPerms::MAY_ALL)
        .unwrap();
    let a = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
    let b = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
    sub.map(&a, 0, 4 * P, MapOptions::specific(0, RW)).unwrap();
    write_fault(&root, 16 * P).unwrap();
    sw.fail_unmap(true);
    let over = MapOptions {
        placement: Placement::SpecificOverwrite(0),
        ..MapOptions::specific(0, RW)
    };
    assert_eq!(sub.map(&b, 0, 2 * P, over), Err(BACKEND));
    assert!(root.query(16 * P).unwrap().vmo.same_object(&a));
    assert_eq!(root.query(16 * P).unwrap().len, 4 * P);
    assert_eq!(sub.destroy(), Err(BACKEND));
    assert_eq!(sub.range().unwrap(), (16 * P, 8 * P));
    assert_eq!(installed(&root, 16 * P).unwrap().pa, frame_pa(&a, 0));
    consistent(&root);
    sw.fail_unmap(false);
    sub.map(&b, 0, 2 * P, over).unwrap();
    assert!(root.query(16 * P).unwrap().vmo.same_object(&b));
    assert!(installed(&root, 16 * P).is_none());
    sub.destroy().unwrap();
    assert_eq!(root.query(16 * P).unwrap_err(), Error::NotFound);
    consistent(&root);
}

#[test]
fn protect_keeps_the_perms_when_the_backend_fails() {
    let (_pool, root, sw, _v) = mapped();
    sw.fail_protect(true);
    assert_eq!(root.protect(0, 4 * P, R), Err(BACKEND));
    assert_eq!(root.query(0).unwrap().perms, RW);
    assert_eq!(root.query(0).unwrap().len, 4 * P, "not split");
    // Nothing installed may exceed the (unchanged) mapping's perms.
    consistent(&root);
    sw.fail_protect(false);
    root.protect(0, 4 * P, R).unwrap();
    assert_eq!(root.query(0).unwrap().perms, R);
    consistent(&root);
}

#[test]
fn sharing_frames_stops_when_write_protect_fails() {
    let (_pool, root, sw, v) = mapped();
    sw.fail_protect(true);
    // A snapshot, a fork and a reset point would all share the writable frame.
    assert_eq!(
        v.create_child(ChildKind::Snapshot, 0, 4 * P).unwrap_err(),
        BACKEND
    );
    let (s, _) = flaky();
    assert_eq!(root.fork(s).unwrap_err(), BACKEND);
    assert_eq!(root.set_reset_point(), Err(BACKEND));
    assert!(installed(&root, 0).unwrap().perms.contains(S2Perms::WRITE));
    // The frame is still private: the next write upgrades nothing and copies nothing.
    assert_eq!(v.committed_frame(0).unwrap().unwrap().ref_count(), 2);
    consistent(&root);
    sw.fail_protect(false);
    root.set_reset_point().unwrap();
    assert!(!installed(&root, 0).unwrap().perms.contains(S2Perms::WRITE));
}

#[test]
fn reset_changes_nothing_when_unmap_fails() {
    let (pool, root, _sw, v) = mapped();
    let (s, child_sw) = flaky();
    let child = root.fork(s).unwrap();
    write_fault(&child, 0).unwrap();
    let cv = child.query(0).unwrap().vmo;
    cv.write(0, &[42]).unwrap();
    child_sw.fail_unmap(true);
    assert_eq!(child.reset(), Err(BACKEND));
    assert_eq!(byte(&cv, 0), 42, "nothing reset");
    assert_eq!(installed(&child, 0).unwrap().pa, frame_pa(&cv, 0));
    consistent(&child);
    child_sw.fail_unmap(false);
    assert_eq!(child.reset().unwrap(), 1);
    assert_eq!((byte(&cv, 0), byte(&v, 0)), (7, 7));
    assert!(installed(&child, 0).is_none());
    consistent(&child);
    drop((child, cv, root, v));
    assert_eq!(pool.stats().live, 0);
}

// ---- C3: reset does not depend on the mapping's handle, and is all-or-nothing ------------

#[test]
fn reset_through_a_read_only_handle_and_all_or_nothing() {
    let (pool, root, _sw) = space(1 << 30);
    let v = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
    root.map(&v, 0, 4 * P, MapOptions::specific(16 * P, RW))
        .unwrap();
    // The lowest-addressed mapping of `v` holds a read-only handle (from `query`).
    let ro = v.duplicate(vmo::Rights::READ | vmo::Rights::MAP).unwrap();
    root.map(&ro, 0, 4 * P, MapOptions::specific(0, R)).unwrap();
    v.write(0, &[1]).unwrap();
    root.set_reset_point().unwrap();
    v.write(0, &[2]).unwrap();
    assert_eq!(root.reset().unwrap(), 1);
    assert_eq!(byte(&v, 0), 1);

    // A Vmo mapped after the reset point has none: the reset refuses before touching `v`.
    let w = Vmo::new(&pool, P, VmoFlags::empty()).unwrap();
    root.map(&w, 0, P, MapOptions::specific(32 * P, RW))
        .unwrap();
    v.write(0, &[3]).unwrap();
    assert_eq!(root.reset(), Err(Error::BadState));
    assert_eq!(byte(&v, 0), 3, "v was not reset");
    consistent(&root);
}

// ---- C4: fault-around counts never overflow ---------------------------------------------

#[test]
fn huge_fault_around_counts_saturate() {
    let (pool, root, _sw) = space(1 << 30);
    let v = Vmo::new(&pool, 1024 * P, VmoFlags::empty()).unwrap();
    v.commit(0, 1024 * P).unwrap();
    root.map(&v, 0, 1024 * P, MapOptions::specific(0, RW))
        .unwrap();
    for n in [u64::MAX, u64::MAX / 2, (u64::MAX / P) + 1, 1 << 60] {
        root.set_fault_around(n);
        root.set_stream_fault_around(n);
        root.unmap(0, 1024 * P).unwrap();
        root.map(&v, 0, 1024 * P, MapOptions::specific(0, RW))
            .unwrap();
        let r = read_fault(&root, 0).unwrap();
        assert_eq!(
            r.pages,
            vmo::MAX_FAULT_AROUND,
            "clamped to MAX_FAULT_AROUND"
        );
        write_fault(&root, 1000 * P).unwrap();
        write_fault(&root, 1001 * P).unwrap();
        // Faults near the top of the address space: no overflow either.
        let top = root.handle_fault(FaultInfo::new(
            u64::MAX,
            Access::WRITE,
            FaultKind::NotPresent,
        ));
        assert_eq!(top.unwrap_err(), Error::NotFound);
    }
    consistent(&root);
}

// ---- C5: a sub-VMAR handle resolves only its own faults ---------------------------------

#[test]
fn handle_fault_is_confined_to_the_handles_region() {
    let (pool, root, _sw) = space(1 << 30);
    let sub = root
        .allocate(Placement::Specific(16 * P), 8 * P, VmPerms::MAY_ALL)
        .unwrap();
    let v = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
    root.map(&v, 0, 4 * P, MapOptions::specific(0, RW)).unwrap();
    sub.map(&v, 0, 4 * P, MapOptions::specific(0, RW)).unwrap();
    assert_eq!(
        read_fault(&sub, 0).unwrap_err(),
        Error::NotFound,
        "outside sub"
    );
    read_fault(&sub, 16 * P).unwrap();
    read_fault(&root, 17 * P).unwrap();
    sub.destroy().unwrap();
    assert_eq!(read_fault(&sub, 16 * P).unwrap_err(), Error::BadState);
    assert_eq!(read_fault(&sub, 0).unwrap_err(), Error::BadState);
    read_fault(&root, P).unwrap();
    root.destroy().unwrap();
    assert_eq!(read_fault(&root, 0).unwrap_err(), Error::BadState);
}

// ---- D: streaming fault-around ----------------------------------------------------------

#[test]
fn streaming_commits_following_pages_after_two_consecutive_write_faults() {
    let (pool, root, _sw) = space(1 << 30);
    let v = Vmo::new(&pool, 64 * P, VmoFlags::empty()).unwrap();
    root.map(&v, 0, 64 * P, MapOptions::specific(0, RW))
        .unwrap();
    root.set_stream_fault_around(8);
    assert_eq!(
        write_fault(&root, 0).unwrap().pages,
        1,
        "one write: no stream yet"
    );
    let r = write_fault(&root, P).unwrap();
    assert_eq!(r.outcome, FaultOutcome::Committed);
    assert_eq!(r.pages, 1 + 8);
    for i in 2..10 {
        let t = installed(&root, i * P).unwrap();
        assert!(
            t.perms.contains(S2Perms::WRITE),
            "page {i} installed writable"
        );
    }
    assert!(installed(&root, 10 * P).is_none());
    assert_eq!(root.fault_stats().commits, 10);
    // The stream continues from its last page.
    assert_eq!(write_fault(&root, 10 * P).unwrap().pages, 9);
    // Stops at an installed page.
    read_fault(&root, 30 * P).unwrap();
    write_fault(&root, 24 * P).unwrap();
    assert_eq!(write_fault(&root, 25 * P).unwrap().pages, 1 + 4);
    // Reads and non-consecutive writes do not stream; 0 turns it off.
    assert_eq!(write_fault(&root, 40 * P).unwrap().pages, 1);
    read_fault(&root, 41 * P).unwrap();
    assert_eq!(write_fault(&root, 42 * P).unwrap().pages, 1);
    root.set_stream_fault_around(0);
    assert_eq!(write_fault(&root, 43 * P).unwrap().pages, 1);
    consistent(&root);
}

#[test]
fn streaming_in_a_fork_never_copies_a_shared_page() {
    let (pool, root, _sw) = space(1 << 30);
    let v = Vmo::new(&pool, 64 * P, VmoFlags::empty()).unwrap();
    root.map(&v, 0, 64 * P, MapOptions::specific(0, RW))
        .unwrap();
    // The parent committed pages 4..8 (shared with the fork below); 0..4 stay empty.
    v.write(4 * P, &[0x11; 4 * vmo::PAGE_BYTES]).unwrap();
    root.set_stream_fault_around(32);
    let (s, _) = flaky();
    let child = root.fork(s).unwrap();
    write_fault(&child, 0).unwrap();
    let r = write_fault(&child, P).unwrap();
    // Pages 2 and 3 streamed; the stream stops at shared page 4, which plain fault-around
    // leaves alone too: a write fault installs no read-only neighbour (issue 12 item 6).
    assert_eq!(r.pages, 1 + 2);
    assert!(installed(&child, 3 * P)
        .unwrap()
        .perms
        .contains(S2Perms::WRITE));
    assert!(installed(&child, 4 * P).is_none());
    // A read fault's fault-around still installs the shared pages, read-only.
    read_fault(&child, 4 * P).unwrap();
    assert!(!installed(&child, 5 * P)
        .unwrap()
        .perms
        .contains(S2Perms::WRITE));
    assert_eq!(child.fault_stats().copies, 0);
    assert_eq!(pool.stats().cow_copies, 0, "no speculative copy");
    // Writing the shared page copies exactly it, and does not stream into shared pages.
    let r = write_fault(&child, 4 * P).unwrap();
    assert_eq!(r.outcome, FaultOutcome::Copied);
    assert_eq!(pool.stats().cow_copies, 1);
    consistent(&child);
    consistent(&root);
}

#[test]
fn streaming_is_off_while_dirty_tracking() {
    let (pool, root, _sw) = space(1 << 30);
    let v = Vmo::new(&pool, 16 * P, VmoFlags::empty()).unwrap();
    root.map(&v, 0, 16 * P, MapOptions::specific(0, RW))
        .unwrap();
    root.set_stream_fault_around(8);
    root.enable_dirty_tracking().unwrap();
    write_fault(&root, 0).unwrap();
    assert_eq!(write_fault(&root, P).unwrap().pages, 1);
    assert_eq!(root.take_dirty().unwrap(), vec![0, P]);
}
