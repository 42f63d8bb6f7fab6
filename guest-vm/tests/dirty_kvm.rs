//! `KvmStage2::harvest_dirty` (userfaultfd `WP_ASYNC` + `PAGEMAP_SCAN`) against the
//! `ept::Stage2` dirty-harvest contract, and the hazard that comes with it: a frame installed
//! read-only (shared copy-on-write) is never on the async tracker, so a write to it always
//! raises a synchronous WP event — after installs, after RW→READ moves and after harvests.
//! Host-side cases write through the reservation; the guest case runs a real CPL3 write loop.
//! They need root, /dev/kvm and userfaultfd; they skip with a printed reason otherwise, or fail
//! under `GUESTMEM_REQUIRE_KVM=1`. Timings are printed (`--nocapture`), never asserted.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::{TestMem, PAGE};
use ept::{MemType, PageSize, S2Perms, Stage2};
use guest_vm::vmm::x86_64::layout::DATA_GPA;
use guest_vm::vmm::{GuestArgs, GuestVm, VmExit};
use guest_vm::workload::programs;
use guest_vm::{Gpa, KvmStage2, MemfdFrameAlloc, Reservation};
use vmo::FrameAlloc;

const M2: u64 = 2 << 20;
const WB: MemType = MemType::WriteBack;

fn backend(size: u64) -> (KvmStage2, Arc<MemfdFrameAlloc>) {
    let uffd = Arc::new(guest_vm::sys::uffd::Uffd::open().expect("userfaultfd"));
    let res = Arc::new(Reservation::new(Gpa(0), size, uffd).expect("reservation"));
    let frames = Arc::new(MemfdFrameAlloc::new(32 << 20).expect("memfd"));
    (KvmStage2::new(res, frames.clone()), frames)
}

/// Writes one byte at `gpa` through the reservation (the VMM's view; no fault thread runs
/// here, so only writable installs may be written).
fn host_write(s: &KvmStage2, gpa: u64, byte: u8) {
    let hva = s.reservation().hva_of(Gpa(gpa), 1).unwrap();
    // SAFETY: `gpa` is a writable install of this test; no reference into guest memory is held.
    unsafe { hva.as_mut_ptr::<u8>().write_volatile(byte) };
}

fn harvest(s: &mut KvmStage2, gpa: u64, len: u64) -> Vec<u64> {
    let mut v = Vec::new();
    let n = s.harvest_dirty(gpa, len, &mut v).unwrap();
    assert_eq!(n as usize, v.len());
    assert!(v.windows(2).all(|w| w[0] < w[1]), "ascending: {v:x?}");
    v
}

fn pages(list: &[u64]) -> Vec<u64> {
    list.iter().map(|p| p * PAGE).collect()
}

fn map4k(s: &mut KvmStage2, frames: &MemfdFrameAlloc, gpa: u64, perms: S2Perms) -> u64 {
    let f = frames.alloc_frame().unwrap();
    s.map(gpa, f, PageSize::Size4K, perms, WB).unwrap();
    f
}

#[test]
fn host_writes_are_reported_exactly_and_once() {
    require_kvm!();
    let (mut s, frames) = backend(16 << 20);
    // 40 writable pages: a contiguous run of 24 and 16 scattered ones.
    let mut installed: Vec<u64> = (0..24).collect();
    installed.extend((0..16).map(|i| 100 + 7 * i));
    for &p in &installed {
        map4k(&mut s, &frames, p * PAGE, S2Perms::RW);
    }
    // Installed writable since the last harvest = written; then nothing.
    assert_eq!(harvest(&mut s, 0, 16 << 20), pages(&installed));
    assert_eq!(harvest(&mut s, 0, 16 << 20), Vec::<u64>::new());
    let written = [3, 4, 5, 23, 107, 198];
    for &p in &written {
        host_write(&s, p * PAGE + 17, 0x5a);
    }
    // Writes through the frame pool's own mapping are not tracked (copy-back's path).
    let t = s.query(10 * PAGE).unwrap();
    // SAFETY: the frame is installed by this test; nothing holds a reference into it.
    unsafe { *frames.frame_ptr(t.pa) = 9 };
    assert_eq!(harvest(&mut s, 0, 16 << 20), pages(&written));
    assert_eq!(harvest(&mut s, 0, 16 << 20), Vec::<u64>::new());
    // A page written twice between harvests is one report.
    host_write(&s, 4 * PAGE, 1);
    host_write(&s, 4 * PAGE + 4095, 2);
    assert_eq!(harvest(&mut s, 0, 16 << 20), pages(&[4]));
    // Holes only: nothing, no error.
    assert_eq!(harvest(&mut s, 8 << 20, 8 << 20), Vec::<u64>::new());
    // Bad input is an error value.
    let mut v = Vec::new();
    assert_eq!(
        s.harvest_dirty(1, PAGE, &mut v),
        Err(ept::Error::InvalidArgs)
    );
    assert_eq!(s.harvest_dirty(0, 0, &mut v), Err(ept::Error::InvalidArgs));
    assert_eq!(
        s.harvest_dirty(16 << 20, PAGE, &mut v),
        Err(ept::Error::OutOfRange)
    );
    assert_eq!(
        s.harvest_dirty(u64::MAX - PAGE + 1, PAGE, &mut v),
        Err(ept::Error::OutOfRange)
    );
    assert!(v.is_empty());
    s.check_invariants();
}

#[test]
fn partial_ranges_report_and_rearm_only_their_pages() {
    require_kvm!();
    let (mut s, frames) = backend(16 << 20);
    for p in 0..8 {
        map4k(&mut s, &frames, p * PAGE, S2Perms::RW);
    }
    // First harvest of half: only that half is reported and armed.
    assert_eq!(harvest(&mut s, 0, 4 * PAGE), pages(&[0, 1, 2, 3]));
    host_write(&s, PAGE, 1);
    host_write(&s, 6 * PAGE, 1);
    assert_eq!(harvest(&mut s, 0, 4 * PAGE), pages(&[1]));
    // The other half is still unarmed: reported whole (page 6 among them).
    assert_eq!(harvest(&mut s, 4 * PAGE, 4 * PAGE), pages(&[4, 5, 6, 7]));
    host_write(&s, 6 * PAGE, 1);
    host_write(&s, 2 * PAGE, 1);
    assert_eq!(harvest(&mut s, 5 * PAGE, 2 * PAGE), pages(&[6]));
    assert_eq!(harvest(&mut s, 0, 8 * PAGE), pages(&[2]));
    assert_eq!(harvest(&mut s, 0, 8 * PAGE), Vec::<u64>::new());
}

#[test]
fn large_leaves_report_every_page_when_written() {
    require_kvm!();
    let (mut s, frames) = backend(16 << 20);
    let pa = frames.alloc_contiguous(1024).unwrap().next_multiple_of(M2);
    s.map(M2, pa, PageSize::Size2M, S2Perms::RW, WB).unwrap();
    let all: Vec<u64> = (0..512).map(|i| M2 + i * PAGE).collect();
    assert_eq!(harvest(&mut s, 0, 16 << 20), all);
    assert_eq!(harvest(&mut s, 0, 16 << 20), Vec::<u64>::new());
    assert_eq!(s.query(M2).unwrap().size, PageSize::Size2M, "not split");
    host_write(&s, M2 + 77 * PAGE, 7);
    assert_eq!(harvest(&mut s, M2, M2), all);
    assert_eq!(harvest(&mut s, M2, M2), Vec::<u64>::new());
    // A partial range splits the record (as protect does) and is exact per page.
    host_write(&s, M2 + 5 * PAGE, 1);
    host_write(&s, M2 + 300 * PAGE, 1);
    assert_eq!(harvest(&mut s, M2, 16 * PAGE), vec![M2 + 5 * PAGE]);
    assert_eq!(harvest(&mut s, 0, 16 << 20), vec![M2 + 300 * PAGE]);
    s.check_invariants();
}

#[test]
fn read_only_installs_are_never_reported_and_moves_keep_writes() {
    require_kvm!();
    let (mut s, frames) = backend(16 << 20);
    for p in 0..4 {
        map4k(&mut s, &frames, p * PAGE, S2Perms::READ);
    }
    for p in 4..8 {
        map4k(&mut s, &frames, p * PAGE, S2Perms::RW);
    }
    assert_eq!(harvest(&mut s, 0, 8 * PAGE), pages(&[4, 5, 6, 7]));
    host_write(&s, 5 * PAGE, 1);
    // RW→READ does not hide the write (the Stage2 contract): reported once, then never again
    // while read-only.
    assert_eq!(s.protect(4 * PAGE, 4 * PAGE, S2Perms::READ), Ok(4));
    assert_eq!(harvest(&mut s, 0, 8 * PAGE), pages(&[5]));
    assert_eq!(harvest(&mut s, 0, 8 * PAGE), Vec::<u64>::new());
    // READ→RW (frames the caller made private): made writable = written.
    assert_eq!(s.protect(0, 2 * PAGE, S2Perms::RW), Ok(2));
    assert_eq!(harvest(&mut s, 0, 8 * PAGE), pages(&[0, 1]));
    host_write(&s, PAGE, 3);
    assert_eq!(harvest(&mut s, 0, 8 * PAGE), pages(&[1]));
    // Through the general protect path too (a read-only leaf with EXEC forces it).
    map4k(&mut s, &frames, 9 * PAGE, S2Perms::READ | S2Perms::EXEC);
    assert_eq!(s.protect(0, 10 * PAGE, S2Perms::RW), Ok(7));
    assert_eq!(harvest(&mut s, 0, 10 * PAGE), pages(&[2, 3, 4, 5, 6, 7, 9]));
    assert_eq!(harvest(&mut s, 0, 10 * PAGE), Vec::<u64>::new());
    assert_eq!(s.protect(0, 10 * PAGE, S2Perms::READ), Ok(9));
    assert_eq!(harvest(&mut s, 0, 10 * PAGE), Vec::<u64>::new());
    s.check_invariants();
}

fn boot(mem_size: u64) -> (Arc<std::sync::Mutex<TestMem>>, GuestVm) {
    let (mem, res) = TestMem::new(mem_size, 128 << 20);
    let vm = GuestVm::new(res, TestMem::resolver(&mem)).expect("vm");
    (mem, vm)
}

fn first_byte(f: &vmo::Frame) -> u8 {
    let mut b = [0u8];
    f.read(0, &mut b).unwrap();
    b[0]
}

/// The hazard: a shared (read-only) frame is never written in place, whatever tracking did
/// before. Each write goes through `process_vm_writev` (the VMM's path) and must arrive as a
/// synchronous WP event, which the resolver answers with a private copy; the old frame keeps
/// its bytes. The async tracker never produces an event.
#[test]
fn read_only_frames_always_raise_a_sync_wp_event() {
    require_kvm!();
    let (mem, vm) = boot(64 << 20);
    let a = DATA_GPA;
    let wp = |vm: &GuestVm| vm.fault_stats().wp;
    let old_frame = |a: u64| mem.lock().unwrap().frames[&a].clone();
    let harvest_all = |mem: &std::sync::Mutex<TestMem>| {
        let mut v = Vec::new();
        mem.lock()
            .unwrap()
            .stage2
            .harvest_dirty(DATA_GPA, 1 << 20, &mut v)
            .unwrap();
        v
    };

    // 1. Installed read-only (shared): the write is an event, the frame is untouched.
    mem.lock().unwrap().preinstall(a, 0x11, S2Perms::READ);
    let f = old_frame(a);
    let w = wp(&vm);
    vm.write_guest(a, &[0x22]).unwrap();
    assert_eq!(wp(&vm), w + 1);
    assert_eq!(first_byte(&f), 0x11);
    assert_eq!(mem.lock().unwrap().byte_at(a), Some(0x22));

    // 2. Now private and writable; harvested (armed), written (tracked, no event), then
    //    write-protected RW→READ as a fork does: the next write is an event again.
    assert_eq!(harvest_all(&mem), vec![a]);
    vm.write_guest(a, &[0x33]).unwrap();
    assert_eq!(wp(&vm), w + 1, "a tracked write is not an event");
    assert_eq!(harvest_all(&mem), vec![a]);
    assert_eq!(harvest_all(&mem), Vec::<u64>::new());
    mem.lock()
        .unwrap()
        .stage2
        .protect(a, PAGE, S2Perms::READ)
        .unwrap();
    let f = old_frame(a);
    vm.write_guest(a, &[0x44]).unwrap();
    assert_eq!(wp(&vm), w + 2);
    assert_eq!(first_byte(&f), 0x33, "the shared frame is unchanged");
    assert_eq!(mem.lock().unwrap().byte_at(a), Some(0x44));

    // 3. Harvest with read-only leaves in range, then protect again without any write: the
    //    page (armed on the tracker before) must still be caught synchronously.
    assert_eq!(harvest_all(&mem), vec![a]);
    mem.lock()
        .unwrap()
        .stage2
        .protect(a, PAGE, S2Perms::READ)
        .unwrap();
    assert_eq!(harvest_all(&mem), Vec::<u64>::new());
    let f = old_frame(a);
    vm.write_guest(a, &[0x55]).unwrap();
    assert_eq!(wp(&vm), w + 3);
    assert_eq!(first_byte(&f), 0x44);

    // 4. READ→RW→READ cycles of a neighbour through protect: each READ state still refuses.
    let b = a + PAGE;
    mem.lock().unwrap().preinstall(b, 0x66, S2Perms::READ);
    for round in 0..3u8 {
        let mut m = mem.lock().unwrap();
        m.stage2.protect(b, PAGE, S2Perms::RW).unwrap();
        let mut v = Vec::new();
        m.stage2.harvest_dirty(b, PAGE, &mut v).unwrap();
        assert_eq!(v, vec![b]);
        m.stage2.protect(b, PAGE, S2Perms::READ).unwrap();
        drop(m);
        let f = old_frame(b);
        let before = first_byte(&f);
        vm.write_guest(b, &[0x70 + round]).unwrap();
        assert_eq!(wp(&vm), w + 4 + round as u64);
        assert_eq!(first_byte(&f), before, "round {round}");
        // The copy is the new writable frame; make it the shared one for the next round.
        let m = mem.lock().unwrap();
        let t = m.stage2.query(b).unwrap();
        assert!(t.perms.contains(S2Perms::WRITE));
    }
    let mut evs = Vec::new();
    vm.reservation().tracker().read_faults(&mut evs).unwrap();
    assert!(evs.is_empty(), "the async tracker produced events: {evs:?}");
    assert_eq!(vm.fault_stats().failed, 0);
}

/// The same hazard on a 2 MiB leaf cut by a partial RW→READ: a resolver that refuses writes
/// (the region is read-only in the test's model) leaves the frame unchanged and the VMM's
/// write fails instead of landing.
#[test]
fn partially_write_protected_large_leaf_refuses_writes() {
    require_kvm!();
    let (mem, vm) = boot(64 << 20);
    let base = 8 << 20;
    let pa = {
        let mut m = mem.lock().unwrap();
        m.allowed = vec![(0, base, true), (base, base + M2, false)];
        let pa = m.alloc.alloc_contiguous(1024).unwrap().next_multiple_of(M2);
        m.stage2
            .map(base, pa, PageSize::Size2M, S2Perms::RW, WB)
            .unwrap();
        let mut v = Vec::new();
        assert_eq!(m.stage2.harvest_dirty(base, M2, &mut v), Ok(512));
        assert_eq!(
            m.stage2.protect(base + 16 * PAGE, 32 * PAGE, S2Perms::READ),
            Ok(32)
        );
        pa
    };
    let w = vm.fault_stats().wp;
    assert!(vm.write_guest(base + 20 * PAGE, &[0xee]).is_err());
    assert_eq!(vm.fault_stats().wp, w + 1);
    let alloc = mem.lock().unwrap().alloc.clone();
    // SAFETY: the frame belongs to this test's leaf; nothing holds a reference into it.
    let byte = unsafe { *alloc.frame_ptr(pa + 20 * PAGE) };
    assert_eq!(byte, 0, "the refused write did not land");
    // The writable rest is tracked, not intercepted.
    vm.write_guest(base + 100 * PAGE, &[0xdd]).unwrap();
    assert_eq!(vm.fault_stats().wp, w + 1);
    let mut v = Vec::new();
    mem.lock()
        .unwrap()
        .stage2
        .harvest_dirty(base, M2, &mut v)
        .unwrap();
    assert_eq!(v, vec![base + 100 * PAGE]);
}

fn loop_args(addr: u64, count: u64, stride: u64) -> GuestArgs {
    GuestArgs {
        rdi: addr,
        rcx: count,
        rdx: stride,
        rax: 0x42,
        ..Default::default()
    }
}

/// A real guest at CPL3: its written pages are reported exactly, its reads are not, and a
/// tracked write raises no userfaultfd event. Prints the per-page cost of a tracked write
/// (against an untracked rewrite of the same pages) and of harvest + re-arm.
#[test]
fn guest_writes_are_reported_exactly() {
    require_kvm!();
    let (mem, mut vm) = boot(64 << 20);
    let n = 2048u64;
    let range = n * PAGE;
    let run = |vm: &mut GuestVm, code: Vec<u8>, args: GuestArgs| {
        vm.load(&code, args).unwrap();
        let t = Instant::now();
        let exit = vm.run().unwrap();
        (exit, t.elapsed())
    };
    let harvest = |mem: &std::sync::Mutex<TestMem>| {
        let mut v = Vec::new();
        let t = Instant::now();
        mem.lock()
            .unwrap()
            .stage2
            .harvest_dirty(DATA_GPA, range, &mut v)
            .unwrap();
        (v, t.elapsed())
    };
    let (exit, _) = run(
        &mut vm,
        programs::write_loop(),
        loop_args(DATA_GPA, n, PAGE),
    );
    assert_eq!(exit, VmExit::Done(0x42));
    let all: Vec<u64> = (0..n).map(|i| DATA_GPA + i * PAGE).collect();
    assert_eq!(harvest(&mem).0, all, "installed writable = written");
    assert_eq!(harvest(&mem).0, Vec::<u64>::new());
    // Reads are not writes.
    let (exit, _) = run(&mut vm, programs::read_loop(), loop_args(DATA_GPA, n, PAGE));
    assert!(matches!(exit, VmExit::Done(_)));
    assert_eq!(harvest(&mem).0, Vec::<u64>::new());
    // Every third page, written by the guest.
    let faults = vm.fault_stats();
    let (exit, _) = run(
        &mut vm,
        programs::write_loop(),
        loop_args(DATA_GPA, n / 3, 3 * PAGE),
    );
    assert_eq!(exit, VmExit::Done(0x42));
    let expect: Vec<u64> = (0..n / 3).map(|i| DATA_GPA + 3 * i * PAGE).collect();
    assert_eq!(harvest(&mem).0, expect);
    let after = vm.fault_stats();
    assert_eq!(
        (after.wp, after.failed),
        (faults.wp, 0),
        "tracked writes are no events"
    );

    // Costs: all n pages armed → tracked pass; same pages again → untracked pass.
    let (_, tracked) = run(
        &mut vm,
        programs::write_loop(),
        loop_args(DATA_GPA, n, PAGE),
    );
    let (_, untracked) = run(
        &mut vm,
        programs::write_loop(),
        loop_args(DATA_GPA, n, PAGE),
    );
    let (v, h) = harvest(&mem);
    assert_eq!(v, all);
    let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / n as f64;
    // Scattered: 400 pages 37 pages apart (no neighbour shares a KVM fault).
    let sn = 400u64;
    let sc = loop_args(DATA_GPA, sn, 37 * PAGE);
    let sharvest = |mem: &std::sync::Mutex<TestMem>| {
        let mut v = Vec::new();
        let t = Instant::now();
        mem.lock()
            .unwrap()
            .stage2
            .harvest_dirty(DATA_GPA, sn * 37 * PAGE, &mut v)
            .unwrap();
        (v.len() as u64, t.elapsed())
    };
    run(&mut vm, programs::write_loop(), sc);
    sharvest(&mem);
    sharvest(&mem);
    let (_, st) = run(&mut vm, programs::write_loop(), sc);
    let (_, su) = run(&mut vm, programs::write_loop(), sc);
    let (sw, sh) = sharvest(&mem);
    assert_eq!(sw, sn);
    let sper = |d: std::time::Duration| d.as_secs_f64() * 1e6 / sn as f64;
    println!(
        "FIGURES kvm-dirty: scattered tracked guest write {:.2} µs/page (untracked {:.2}); \
         harvest + re-arm {:.3} µs/page over {sn} scattered written pages",
        sper(st),
        sper(su),
        sper(sh)
    );
    println!(
        "FIGURES kvm-dirty: tracked guest write {:.2} µs/page (untracked pass {:.2} µs/page, \
         difference {:.2}); harvest + re-arm {:.3} µs/page over {n} written pages",
        per(tracked),
        per(untracked),
        per(tracked) - per(untracked),
        per(h)
    );
}

/// The harvest cost of 50 dirty pages follows the writable pages, not the guest size:
/// a 64 MiB and a 4 GiB reservation with the same private pages (plus read-only installs
/// spread over the whole range). Prints the medians.
#[test]
fn harvest_cost_does_not_grow_with_guest_size() {
    require_kvm!();
    let mut med = Vec::new();
    for size in [64u64 << 20, 4 << 30] {
        let (mut s, frames) = backend(size);
        let stride = size / 64;
        for i in 0..64 {
            map4k(&mut s, &frames, i * stride + PAGE, S2Perms::READ);
        }
        let dirty: Vec<u64> = (0..50).map(|i| i * stride + 7 * PAGE).collect();
        for &g in &dirty {
            map4k(&mut s, &frames, g, S2Perms::RW);
        }
        harvest(&mut s, 0, size);
        let t = Instant::now();
        assert!(harvest(&mut s, 0, size).is_empty());
        println!(
            "FIGURES kvm-dirty: idle harvest (50 armed unwritten pages), {} MiB guest: {:.1} µs",
            size >> 20,
            t.elapsed().as_secs_f64() * 1e6
        );
        let mut times = Vec::new();
        for _ in 0..200 {
            for &g in &dirty {
                host_write(&s, g, 1);
            }
            let t = Instant::now();
            let v = harvest(&mut s, 0, size);
            times.push(t.elapsed().as_nanos() as u64);
            assert_eq!(v, dirty);
        }
        times.sort_unstable();
        med.push(times[times.len() / 2]);
        // The fork's write-protect of the same 50 scattered private pages (RW→READ moves).
        let t = Instant::now();
        assert_eq!(s.protect(0, size, S2Perms::READ), Ok(50));
        println!(
            "FIGURES kvm-dirty: RW→READ move of 50 scattered runs, {} MiB guest: {:.2} µs/run",
            size >> 20,
            t.elapsed().as_secs_f64() * 1e6 / 50.0
        );
    }
    println!(
        "FIGURES kvm-dirty: harvest of 50 dirty pages: 64 MiB guest {:.1} µs, 4 GiB guest {:.1} µs \
         (ratio {:.2})",
        med[0] as f64 / 1e3,
        med[1] as f64 / 1e3,
        med[1] as f64 / med[0] as f64
    );
}
