//! The product path: `Guest` = `vmo::Vmar<KvmStage2>` whose `handle_fault` serves every
//! userfaultfd event of a KVM guest. Key-value store workload, snapshot, fork, reset, refused
//! faults, frame accounting. Skips with a printed reason without root or /dev/kvm.

mod common;

use std::time::Instant;

use ept::FaultKind;
use guest_vm::vmm::x86_64::layout::DATA_GPA;
use guest_vm::vmm::{GuestArgs, VmExit};
use guest_vm::workload::kvstore::{fill_value, memory_for, KvStore, ST_OK};
use guest_vm::workload::programs;
use guest_vm::{Guest, HostFrames};

const BUCKETS: u64 = 1 << 16; // 4 MiB table
const KEYS: u64 = 40_000;

fn booted(frames: &HostFrames) -> KvStore<Guest> {
    let guest = Guest::new(frames, memory_for(BUCKETS)).unwrap();
    let mut kv = KvStore::boot(guest, BUCKETS).unwrap();
    assert_eq!(kv.fill(1000, KEYS).unwrap(), KEYS);
    kv
}

#[test]
fn forked_children_see_the_snapshot_plus_only_their_own_writes() {
    require_kvm!();
    let frames = HostFrames::new(256 << 20).unwrap();
    {
        let mut parent = booted(&frames);
        let base_sum = parent.checksum().unwrap();
        let committed = parent.inner().installed_pages();
        let t = Instant::now();
        let state = parent.inner().snapshot().unwrap();
        let snap_time = t.elapsed();
        let mut children = Vec::new();
        for i in 0..4u64 {
            let t = Instant::now();
            let child = parent.inner().fork(&state).unwrap();
            println!("fork child {i}: {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
            children.push(KvStore::resume(child));
        }
        for (i, c) in children.iter_mut().enumerate() {
            let i = i as u64;
            assert_eq!(
                c.put(1_000_000 + i, format!("child {i}").as_bytes())
                    .unwrap(),
                ST_OK
            );
            assert_eq!(c.put(1000 + i, b"overwritten").unwrap(), ST_OK);
        }
        for (i, c) in children.iter_mut().enumerate() {
            let i = i as u64;
            for j in 0..4u64 {
                let mine = c.get(1_000_000 + j).unwrap();
                if i == j {
                    assert_eq!(mine.as_deref(), Some(format!("child {i}").as_bytes()));
                    assert_eq!(
                        c.get(1000 + j).unwrap().as_deref(),
                        Some(&b"overwritten"[..])
                    );
                } else {
                    assert_eq!(mine, None, "child {i} sees child {j}'s write");
                    assert_eq!(
                        c.get(1000 + j).unwrap().as_deref(),
                        Some(&fill_value(1000 + j)[..])
                    );
                }
            }
            let st = c.inner().vmar().fault_stats();
            println!(
                "child {i}: {} faults, {} copied, {} installed shared, {} pages installed",
                st.faults,
                st.copies,
                st.installs,
                c.inner().installed_pages()
            );
            assert!(st.copies >= 1 && st.copies <= 4, "{st:?}");
        }
        // The parent is untouched by its children.
        assert_eq!(parent.get(1_000_000).unwrap(), None);
        assert_eq!(
            parent.get(1000).unwrap().as_deref(),
            Some(&fill_value(1000)[..])
        );
        assert_eq!(parent.checksum().unwrap(), base_sum);
        println!(
            "snapshot (vCPU state) {:.3} ms; parent had {committed} pages; frames live {} \
             (memfd resident {} KiB)",
            snap_time.as_secs_f64() * 1e3,
            frames.pool.stats().live,
            frames.alloc.resident_bytes().unwrap() / 1024
        );
        // Memory: the children share the parent's frames; only their copies are new.
        assert!(frames.pool.stats().live < committed + 64);
        for c in children {
            drop(c.finish().unwrap());
        }
        drop(parent.finish().unwrap());
    }
    assert_eq!(frames.pool.stats().live, 0, "every frame returned");
    assert_eq!(frames.alloc.resident_bytes().unwrap(), 0);
}

#[test]
fn reset_restores_the_snapshot_exactly_100_times() {
    require_kvm!();
    let frames = HostFrames::new(256 << 20).unwrap();
    let mut parent = booted(&frames);
    let sum = parent.checksum().unwrap();
    let state = parent.inner().snapshot().unwrap();
    let mut child = KvStore::resume(parent.inner().fork(&state).unwrap());
    let t = Instant::now();
    let mut dropped_total = 0;
    for round in 0..100u64 {
        let k = 2_000_000 + round;
        assert_eq!(child.put(k, b"x").unwrap(), ST_OK);
        assert!(child.delete(1000 + round).unwrap());
        assert_eq!(child.get(k).unwrap().as_deref(), Some(&b"x"[..]));
        let dropped = child.inner_mut().reset(&state).unwrap();
        assert!(dropped >= 1, "round {round}");
        dropped_total += dropped;
        assert_eq!(child.get(k).unwrap(), None, "round {round}");
        assert_eq!(
            child.get(1000 + round).unwrap().as_deref(),
            Some(&fill_value(1000 + round)[..])
        );
        child.inner_mut().reset(&state).unwrap();
        if round % 25 == 0 {
            assert_eq!(child.checksum().unwrap(), sum, "round {round}");
            child.inner_mut().reset(&state).unwrap();
        }
    }
    println!(
        "100 reset rounds in {:.0} ms ({} pages dropped in total)",
        t.elapsed().as_secs_f64() * 1e3,
        dropped_total
    );
    assert_eq!(child.checksum().unwrap(), sum);
}

#[test]
fn guest_touching_unmapped_gpa_is_stopped_and_others_keep_running() {
    require_kvm!();
    let frames = HostFrames::new(64 << 20).unwrap();
    let mem = 8 << 20;
    let mut bad = Guest::new(&frames, mem).unwrap();
    // Carve a hole in guest RAM: 4 pages at 4 MiB are outside every mapping.
    bad.vmar().unmap(4 << 20, 4 * 4096).unwrap();
    let args = GuestArgs {
        rdi: (4 << 20) - 2 * 4096,
        rcx: 4,
        rdx: 4096,
        rax: 0x33,
        ..Default::default()
    };
    bad.vm_mut().load(&programs::write_loop(), args).unwrap();
    bad.set_reset_point().unwrap();
    let state = bad.snapshot().unwrap();
    let mut good = Guest::new(&frames, mem).unwrap();
    good.vm_mut()
        .load(
            &programs::write_loop(),
            GuestArgs {
                rdi: DATA_GPA,
                rcx: 16,
                rdx: 4096,
                rax: 0x44,
                ..Default::default()
            },
        )
        .unwrap();
    let exit = bad.vm_mut().run().unwrap();
    let VmExit::GuestFault(report) = exit else {
        panic!("expected GuestFault, got {exit:?}");
    };
    assert_eq!(report.fault.gpa, 4 << 20);
    assert_eq!(report.fault.kind, FaultKind::NotPresent);
    assert_eq!(report.error, vmo::Error::NotFound);
    assert!(bad.vm_mut().run().is_err());
    // The other VM is unaffected.
    assert_eq!(good.vm_mut().run().unwrap(), VmExit::Done(0x44));
    // Reset recovers the stopped guest; it faults at the same place again.
    bad.reset(&state).unwrap();
    assert!(matches!(bad.vm_mut().run().unwrap(), VmExit::GuestFault(_)));
}

/// Demand-fault cost on the product path (guest write → KVM → uffd MISSING → fault thread →
/// `Vmar::handle_fault` → Vmo commit → `KvmStage2::map` → UFFDIO_WAKE), and the cost of the
/// copy-on-write path in a fork (uffd WP or MISSING → copy → map). `--nocapture` prints it.
#[test]
fn measure_product_fault_costs() {
    require_kvm!();
    let frames = HostFrames::new(256 << 20).unwrap();
    let n = 4096u64;
    let args = GuestArgs {
        rdi: DATA_GPA,
        rcx: n,
        rdx: 4096,
        rax: 1,
        ..Default::default()
    };
    let mut g = Guest::new(&frames, 32 << 20).unwrap();
    g.vm_mut().load(&programs::increment_loop(), args).unwrap();
    let entry = g.snapshot().unwrap();
    let t = Instant::now();
    assert_eq!(g.vm_mut().run().unwrap(), VmExit::Done(1));
    let dt = t.elapsed();
    let maps = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count();
    let fs = g.vm().fault_stats();
    println!(
        "first touch: {n} pages in {:.1} ms = {:.1} us/fault ({:.0} faults/s), of which \
         {:.1} us in Vmar::handle_fault (commit + mmap + uffd register); {maps} maps lines",
        dt.as_secs_f64() * 1e3,
        dt.as_secs_f64() * 1e6 / n as f64,
        n as f64 / dt.as_secs_f64(),
        fs.resolve_ns as f64 / 1e3 / fs.resolved as f64
    );
    // The same pass with the range prefaulted by the VMM (no exits, no uffd round trips).
    let mut h = Guest::new(&frames, 32 << 20).unwrap();
    h.vm_mut().load(&programs::increment_loop(), args).unwrap();
    let t = Instant::now();
    assert_eq!(h.prefault(DATA_GPA, n * 4096, true).unwrap(), n);
    let pre = t.elapsed();
    let t = Instant::now();
    assert_eq!(h.vm_mut().run().unwrap(), VmExit::Done(1));
    let run = t.elapsed();
    println!(
        "prefaulted: {n} pages installed by the VMM in {:.1} ms ({:.1} us/page), guest pass \
         {:.1} ms ({} uffd faults)",
        pre.as_secs_f64() * 1e3,
        pre.as_secs_f64() * 1e6 / n as f64,
        run.as_secs_f64() * 1e3,
        h.vm().fault_stats().missing
    );
    drop(h);
    // Fork and let the child increment every page again: each write hits a shared frame.
    let mut child = g.fork(&entry).unwrap();
    let t = Instant::now();
    assert_eq!(child.vm_mut().run().unwrap(), VmExit::Done(1));
    let dt = t.elapsed();
    let (mut a, mut b) = ([0u8], [0u8]);
    child
        .vm()
        .read_guest(DATA_GPA + 4096 * (n - 1), &mut a)
        .unwrap();
    g.vm()
        .read_guest(DATA_GPA + 4096 * (n - 1), &mut b)
        .unwrap();
    assert_eq!(
        (a[0], b[0]),
        (2, 1),
        "child wrote its copy, parent unchanged"
    );
    let st = child.vmar().fault_stats();
    let cf = child.vm().fault_stats();
    println!(
        "fork child COW: {n} pages in {:.1} ms = {:.1} us/page ({:.1} us in the resolver); \
         uffd {cf:?}; child vmar {st:?}",
        dt.as_secs_f64() * 1e3,
        dt.as_secs_f64() * 1e6 / n as f64,
        cf.resolve_ns as f64 / 1e3 / cf.resolved as f64
    );
    // Reset cost vs dirtied pages.
    let t = Instant::now();
    let dropped = child.reset(&entry).unwrap();
    println!(
        "reset: {dropped} dirtied pages dropped in {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert!(dropped >= n);
}

/// A guest spinning on another thread is stopped with the kicker, snapshotted, forked; the
/// child resumes from exactly the snapshot (its counter register continues from there).
#[test]
fn snapshot_of_a_running_guest_via_kick() {
    require_kvm!();
    let frames = HostFrames::new(64 << 20).unwrap();
    let mut g = Guest::new(&frames, 4 << 20).unwrap();
    // spin: inc rbx ; jmp spin
    g.vm_mut()
        .load(&[0x48, 0xff, 0xc3, 0xeb, 0xfb], GuestArgs::default())
        .unwrap();
    let kick = g.vm().kicker();
    let runner = std::thread::spawn(move || {
        let exit = g.vm_mut().run().unwrap();
        (g, exit)
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    kick.kick();
    let (g, exit) = runner.join().unwrap();
    assert_eq!(exit, VmExit::Kicked);
    let state = g.snapshot().unwrap();
    assert!(state.regs.rbx > 1000, "guest ran: rbx = {}", state.regs.rbx);
    let mut child = g.fork(&state).unwrap();
    let again = child.snapshot().unwrap();
    assert_eq!(again.regs.rbx, state.regs.rbx);
    assert_eq!(again.regs.rip, state.regs.rip);
    let k = child.vm().kicker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(20));
        k.kick();
    });
    assert_eq!(child.vm_mut().run().unwrap(), VmExit::Kicked);
    t.join().unwrap();
    assert!(child.snapshot().unwrap().regs.rbx > state.regs.rbx);
}

/// The copy-back hot set with a real CPL3 guest (`KVM_HOT_SET`, on in every `Guest`): a child
/// re-dirtying the same 40 scattered pages per iteration has them untracked after two resets
/// (the harvest reports them without a scan), every reset returns it to the snapshot byte for
/// byte and keeps every frame, and with the set off the same loop is tracked again.
#[test]
fn a_reused_child_writes_its_hot_pages_without_tracking() {
    require_kvm!();
    const N: u64 = 40;
    const STRIDE: u64 = 3 * 4096;
    let frames = HostFrames::new(64 << 20).unwrap();
    let mut parent = Guest::new(&frames, 16 << 20).unwrap();
    assert_eq!(parent.vmar().hot_set(), Some(guest_vm::KVM_HOT_SET));
    let args = GuestArgs {
        rdi: DATA_GPA,
        rcx: N,
        rdx: STRIDE,
        rax: 7,
        ..Default::default()
    };
    parent.vm_mut().load(&programs::write_loop(), args).unwrap();
    parent.prefault(DATA_GPA, N * STRIDE, true).unwrap();
    let state = parent.snapshot().unwrap();
    let mut snap = vec![0u8; (N * STRIDE) as usize];
    parent.vmar().read(DATA_GPA, &mut snap).unwrap();
    let mut child = parent.fork(&state).unwrap();
    let mut now = vec![0u8; snap.len()];
    let mut live = None;
    for it in 0..8 {
        match child.vm_mut().run().unwrap() {
            VmExit::Done(7) => {}
            other => panic!("iteration {it}: {other:?}"),
        }
        child.vmar().read(DATA_GPA, &mut now).unwrap();
        assert!(
            (0..N).all(|i| now[(i * STRIDE) as usize] == 7),
            "iteration {it}: the guest's writes are visible"
        );
        let before = child.vmar().with_stage2(|s| s.stats());
        let hot = child.vmar().hot_set_stats().pages;
        let reset = child.reset(&state).unwrap();
        assert!(reset >= N, "iteration {it}: {reset} pages reset");
        let after = child.vmar().with_stage2(|s| s.stats());
        child.vmar().read(DATA_GPA, &mut now).unwrap();
        assert!(now == snap, "iteration {it}: reset to the snapshot");
        let frames_now = frames.pool.stats().live;
        assert_eq!(
            *live.get_or_insert(frames_now),
            frames_now,
            "iteration {it}"
        );
        if it >= 2 {
            assert!(
                hot >= N,
                "iteration {it}: {:?}",
                child.vmar().hot_set_stats()
            );
            assert_eq!(after.untracked_reported - before.untracked_reported, hot);
        }
    }
    assert!(child.vmar().hot_set_stats().pages >= N);
    child.set_hot_set(None).unwrap();
    assert_eq!(child.vmar().hot_set_stats().pages, 0);
    for _ in 0..2 {
        child.vm_mut().run().unwrap();
        let before = child.vmar().with_stage2(|s| s.stats());
        child.reset(&state).unwrap();
        let after = child.vmar().with_stage2(|s| s.stats());
        assert_eq!(after.untracked_reported, before.untracked_reported);
        child.vmar().read(DATA_GPA, &mut now).unwrap();
        assert!(now == snap);
    }
}
