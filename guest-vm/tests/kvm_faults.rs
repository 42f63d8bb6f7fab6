//! End-to-end tests of the KVM backend: a real guest at CPL3 whose every page arrives through
//! userfaultfd → resolver → `KvmStage2::map`. They need root and /dev/kvm and print a SKIP
//! reason otherwise. The resolver is the test stand-in in `common` (the product's resolver is
//! `Vmar::handle_fault`).

mod common;

use std::time::{Duration, Instant};

use common::{TestMem, PAGE};
use ept::{Access, FaultKind, S2Perms, Stage2};
use guest_vm::vmm::x86_64::layout::DATA_GPA;
use guest_vm::vmm::{GuestArgs, GuestVm, VmExit};
use guest_vm::workload::programs;

const MEM: u64 = 64 << 20;
const POOL: u64 = 128 << 20;

fn boot(code: Vec<u8>, args: GuestArgs) -> (std::sync::Arc<std::sync::Mutex<TestMem>>, GuestVm) {
    let (mem, res) = TestMem::new(MEM, POOL);
    let mut vm = GuestVm::new(res, TestMem::resolver(&mem)).expect("vm");
    vm.load(&code, args).expect("load");
    (mem, vm)
}

fn loop_args(addr: u64, count: u64, stride: u64, al: u64) -> GuestArgs {
    GuestArgs {
        rdi: addr,
        rcx: count,
        rdx: stride,
        rax: al,
        ..Default::default()
    }
}

#[test]
fn guest_writes_arrive_as_missing_faults_and_land_in_memfd_frames() {
    require_kvm!();
    let n = 256;
    let (mem, mut vm) = boot(programs::write_loop(), loop_args(DATA_GPA, n, PAGE, 0x42));
    let before = vm.fault_stats();
    assert_eq!(vm.run().unwrap(), VmExit::Done(0x42));
    let after = vm.fault_stats();
    // One MISSING fault per data page, plus the page-table / code / stack pages not yet
    // touched by the loader.
    assert!(
        after.missing - before.missing >= n,
        "{before:?} -> {after:?}"
    );
    assert_eq!(after.failed, 0);
    let m = mem.lock().unwrap();
    for i in 0..n {
        assert_eq!(m.byte_at(DATA_GPA + i * PAGE), Some(0x42), "page {i}");
    }
    let writes: Vec<_> = m
        .faults
        .iter()
        .filter(|f| f.gpa >= DATA_GPA && f.gpa < DATA_GPA + n * PAGE)
        .collect();
    assert_eq!(writes.len() as u64, n);
    assert!(writes
        .iter()
        .all(|f| f.access == Access::WRITE && f.kind == FaultKind::NotPresent));
    assert_eq!(m.pool.stats().live, m.frames.len() as u64);
}

#[test]
fn guest_reads_fault_in_zero_pages_and_see_host_data() {
    require_kvm!();
    let n = 64;
    let (mem, mut vm) = boot(programs::read_loop(), loop_args(DATA_GPA, n, PAGE, 0));
    // One page written by the host through the fault path before the guest runs.
    vm.write_guest(DATA_GPA + 5 * PAGE, &[7]).unwrap();
    assert_eq!(vm.run().unwrap(), VmExit::Done(7));
    let m = mem.lock().unwrap();
    let reads = m
        .faults
        .iter()
        .filter(|f| f.gpa >= DATA_GPA && f.access == Access::READ)
        .count();
    assert_eq!(reads as u64, n - 1);
}

#[test]
fn write_to_write_protected_frame_arrives_as_wp_fault_and_copies() {
    require_kvm!();
    let n = 16;
    let (mem, mut vm) = boot(programs::increment_loop(), loop_args(DATA_GPA, n, PAGE, 0));
    let mut old = Vec::new();
    {
        let mut m = mem.lock().unwrap();
        for i in 0..n {
            m.preinstall(DATA_GPA + i * PAGE, 0xa0, S2Perms::READ);
            old.push(m.frames[&(DATA_GPA + i * PAGE)].clone());
        }
    }
    let before = vm.fault_stats();
    assert_eq!(vm.run().unwrap(), VmExit::Done(0));
    let after = vm.fault_stats();
    assert_eq!(after.wp - before.wp, n, "{before:?} -> {after:?}");
    let m = mem.lock().unwrap();
    let wp: Vec<_> = m
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::Permission)
        .collect();
    assert_eq!(wp.len() as u64, n);
    assert!(wp.iter().all(|f| f.access == Access::WRITE));
    for i in 0..n {
        let gpa = DATA_GPA + i * PAGE;
        // The shared frame is intact; the private copy holds copy + write.
        let mut b = [0u8; 2];
        old[i as usize].read(0, &mut b).unwrap();
        assert_eq!(b, [0xa0, 0xa0]);
        assert_eq!(m.byte_at(gpa), Some(0xa1));
        assert_eq!(m.byte_at(gpa + 1), Some(0xa0));
        assert!(m.stage2.query(gpa).unwrap().perms.contains(S2Perms::WRITE));
    }
    assert_eq!(m.pool.stats().cow_copies, n);
}

#[test]
fn readonly_pages_read_without_faults_and_protect_toggles_wp() {
    require_kvm!();
    let n = 8;
    let (mem, mut vm) = boot(programs::read_loop(), loop_args(DATA_GPA, n, PAGE, 0));
    {
        let mut m = mem.lock().unwrap();
        for i in 0..n {
            m.preinstall(DATA_GPA + i * PAGE, 1, S2Perms::READ);
        }
    }
    let before = vm.fault_stats();
    assert_eq!(vm.run().unwrap(), VmExit::Done(n as u8));
    let after = vm.fault_stats();
    assert_eq!(after.wp, before.wp);
    // protect RW then back to R: records and uffd state follow.
    let mut m = mem.lock().unwrap();
    assert_eq!(
        m.stage2.protect(DATA_GPA, n * PAGE, S2Perms::RW).unwrap(),
        n
    );
    assert_eq!(
        m.stage2.protect(DATA_GPA, n * PAGE, S2Perms::RW).unwrap(),
        0
    );
    assert_eq!(
        m.stage2.protect(DATA_GPA, n * PAGE, S2Perms::READ).unwrap(),
        n
    );
    assert!(m.stage2.flush_pending());
}

#[test]
fn unmap_then_retouch_faults_again_with_fresh_frames() {
    require_kvm!();
    let n = 32;
    let (mem, mut vm) = boot(programs::increment_loop(), loop_args(DATA_GPA, n, PAGE, 0));
    assert_eq!(vm.run().unwrap(), VmExit::Done(0));
    {
        let mut m = mem.lock().unwrap();
        assert_eq!(m.byte_at(DATA_GPA), Some(1));
        assert_eq!(m.stage2.unmap(DATA_GPA, n * PAGE).unwrap(), n);
        for i in 0..n {
            m.frames.remove(&(DATA_GPA + i * PAGE));
            assert!(m.stage2.query(DATA_GPA + i * PAGE).is_none());
        }
        m.faults.clear();
    }
    let state = {
        let mut s = vm.save_state().unwrap();
        s.regs.rip = guest_vm::vmm::x86_64::layout::CODE_GPA;
        s.regs.rdi = DATA_GPA;
        s.regs.rcx = n;
        s.regs.rdx = PAGE;
        s
    };
    vm.restore_state(&state).unwrap();
    assert_eq!(vm.run().unwrap(), VmExit::Done(0));
    let m = mem.lock().unwrap();
    let refaults = m.faults.iter().filter(|f| f.gpa >= DATA_GPA).count();
    assert_eq!(refaults as u64, n, "every unmapped page faulted again");
    // Fresh zero frames, incremented once.
    for i in 0..n {
        assert_eq!(m.byte_at(DATA_GPA + i * PAGE), Some(1));
    }
}

#[test]
fn resolver_error_stops_the_guest_with_a_report() {
    require_kvm!();
    let n = 8;
    let (mem, mut vm) = boot(programs::write_loop(), loop_args(DATA_GPA, n, PAGE, 0x11));
    // Only the first 3 data pages belong to the guest.
    mem.lock().unwrap().allowed = vec![(0, DATA_GPA + 3 * PAGE, true)];
    let exit = vm.run().unwrap();
    let VmExit::GuestFault(report) = exit else {
        panic!("expected GuestFault, got {exit:?}");
    };
    assert_eq!(report.fault.gpa, DATA_GPA + 3 * PAGE);
    assert_eq!(report.error, vmo::Error::NotFound);
    assert!(vm.run().is_err(), "a stopped VM refuses to run");
    assert_eq!(mem.lock().unwrap().byte_at(DATA_GPA + 2 * PAGE), Some(0x11));
    // Host accesses to the refused page are errors, not signals.
    let mut b = [0u8];
    assert!(vm.read_guest(DATA_GPA + 3 * PAGE, &mut b).is_err());
    assert!(vm.read_guest(MEM, &mut b).is_err());
}

#[test]
fn write_to_readonly_vmar_range_stops_the_guest() {
    require_kvm!();
    let (mem, mut vm) = boot(programs::write_loop(), loop_args(DATA_GPA, 1, PAGE, 0x11));
    {
        let mut m = mem.lock().unwrap();
        m.allowed = vec![(0, DATA_GPA, true), (DATA_GPA, DATA_GPA + PAGE, false)];
        m.preinstall(DATA_GPA, 0x55, S2Perms::READ);
    }
    let exit = vm.run().unwrap();
    let VmExit::GuestFault(report) = exit else {
        panic!("expected GuestFault, got {exit:?}");
    };
    assert_eq!(report.fault.kind, FaultKind::Permission);
    assert_eq!(report.error, vmo::Error::AccessDenied);
    assert_eq!(mem.lock().unwrap().byte_at(DATA_GPA), Some(0x55));
}

#[test]
fn hypercalls_return_values_and_vcpu_state_restores() {
    require_kvm!();
    let (_mem, mut vm) = boot(
        programs::hypercall_probe(),
        GuestArgs {
            rdi: 41,
            ..Default::default()
        },
    );
    assert_eq!(vm.run().unwrap(), VmExit::Report(41));
    let snap = vm.save_state().unwrap();
    assert_eq!(vm.run().unwrap(), VmExit::Report(42));
    assert_eq!(vm.run().unwrap(), VmExit::Done(43));
    vm.restore_state(&snap).unwrap();
    assert_eq!(vm.run().unwrap(), VmExit::Report(42));
    assert_eq!(vm.run().unwrap(), VmExit::Done(43));
    assert!(!snap.msrs.is_empty());
}

#[test]
fn kick_interrupts_a_spinning_guest() {
    require_kvm!();
    let (_mem, mut vm) = boot(vec![0xeb, 0xfe], GuestArgs::default());
    let k = vm.kicker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        k.kick();
    });
    let start = Instant::now();
    assert_eq!(vm.run().unwrap(), VmExit::Kicked);
    assert!(start.elapsed() >= Duration::from_millis(90));
    t.join().unwrap();
}

/// Prints the cost of a demand fault through the whole path (guest → KVM → uffd → resolver →
/// mmap + register → wake). Run with `--nocapture` to see it.
#[test]
fn measure_fault_cost() {
    require_kvm!();
    {
        let &(n, label) = &(4000u64, "write");
        let (mem, mut vm) = boot(programs::write_loop(), loop_args(DATA_GPA, n, PAGE, 1));
        let t = Instant::now();
        assert_eq!(vm.run().unwrap(), VmExit::Done(1));
        let dt = t.elapsed();
        let maps = mem.lock().unwrap().stage2.stats().maps;
        println!(
            "fault cost: {n} {label} faults in {:.1} ms = {:.1} us/fault ({:.0} faults/s), {maps} maps, {} VMAs in /proc/self/maps",
            dt.as_secs_f64() * 1e3,
            dt.as_secs_f64() * 1e6 / n as f64,
            n as f64 / dt.as_secs_f64(),
            std::fs::read_to_string("/proc/self/maps").unwrap().lines().count()
        );
        // Second pass over installed pages: no faults.
        let again = vm.fault_stats();
        let mut s = vm.save_state().unwrap();
        s.regs.rip = guest_vm::vmm::x86_64::layout::CODE_GPA;
        s.regs.rdi = DATA_GPA;
        s.regs.rcx = n;
        s.regs.rdx = PAGE;
        vm.restore_state(&s).unwrap();
        let t = Instant::now();
        assert_eq!(vm.run().unwrap(), VmExit::Done(1));
        let dt = t.elapsed();
        assert_eq!(vm.fault_stats().missing, again.missing);
        println!(
            "mapped pass: {n} writes in {:.2} ms = {:.2} us/page",
            dt.as_secs_f64() * 1e3,
            dt.as_secs_f64() * 1e6 / n as f64
        );
    }
}
