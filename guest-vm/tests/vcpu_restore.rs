//! The short vCPU restore of `GuestVm::restore_state` (vmm/mod.rs): taken after clean runs
//! only, full after every exit that is not an ABI exit at CPL3 (an exception's triple fault, an
//! access outside guest memory, a kick), and equivalent to the full one — the complete state
//! read back after a reset is the snapshot's (TSC aside, which moves), and the state the guest
//! reaches at its first exit is the same after a short and after a full restore. Skips with a
//! printed reason without root or /dev/kvm.

mod common;

use std::time::Duration;

use guest_vm::guest::program::{Outcome, Program};
use guest_vm::guest::Guest;
use guest_vm::vmm::vcpu_state::VcpuState;
use guest_vm::vmm::x86_64::layout::DATA_GPA;
use guest_vm::{GuestArgs, HostFrames, VmExit};

const HELLO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hello.elf"));
const LIMIT: Duration = Duration::from_secs(10);
const TSC: u32 = 0x10;

/// `s` with the TSC zeroed: it advances between any two reads.
fn without_tsc(s: &VcpuState) -> VcpuState {
    let mut c = s.clone();
    for m in &mut c.msrs {
        if m.index == TSC {
            m.data = 0;
        }
    }
    c
}

/// The parts of two states that differ (TSC ignored), by name.
fn differences(a: &VcpuState, b: &VcpuState) -> Vec<&'static str> {
    let (a, b) = (without_tsc(a), without_tsc(b));
    let mut out = Vec::new();
    if a.regs != b.regs {
        out.push("regs");
    }
    if a.sregs != b.sregs {
        out.push("sregs");
    }
    if a.xsave.region != b.xsave.region {
        out.push("xsave");
    }
    if a.xcrs != b.xcrs {
        out.push("xcrs");
    }
    if a.msrs != b.msrs {
        out.push("msrs");
    }
    if a.events != b.events {
        out.push("events");
    }
    if a.mp_state != b.mp_state {
        out.push("mp_state");
    }
    if a.debugregs != b.debugregs {
        out.push("debugregs");
    }
    if a.lapic != b.lapic {
        out.push("lapic");
    }
    assert_eq!(out.is_empty(), a.same_as(&b), "same_as disagrees: {out:?}");
    out
}

/// Guest code (64-bit, CPL3): `HC_REPORT`; then changes CPL3 state the reset must undo (xmm1;
/// the FS selector too, though this PVM does not show that in `KVM_GET_SREGS`) and dispatches on the byte at `DATA_GPA`: 1 writes outside guest memory (3 MiB guest,
/// the page tables map 4 MiB), 2 is `ud2` (no IDT: triple fault), 3 spins, else `out
/// PORT_DONE, 0x61`.
const CODE: &[u8] = &[
    0xb0, 0x02, // 0: mov al, HC_REPORT
    0xe6, 0x11, // 2: out PORT_CALL, al
    0x0f, 0xb6, 0x04, 0x25, 0x00, 0x00, 0x10, 0x00, // 4: movzx eax, byte [0x100000]
    0xb9, 0x78, 0x56, 0x34, 0x12, // 12: mov ecx, 0x12345678
    0x66, 0x0f, 0x6e, 0xc9, // 17: movd xmm1, ecx
    0x31, 0xc9, // 21: xor ecx, ecx
    0x8e, 0xe1, // 23: mov fs, cx
    0x3c, 0x01, // 25: cmp al, 1
    0x74, 0x0e, // 27: je 43
    0x3c, 0x02, // 29: cmp al, 2
    0x74, 0x18, // 31: je 57
    0x3c, 0x03, // 33: cmp al, 3
    0x74, 0x16, // 35: je 59
    0xb0, 0x61, // 37: mov al, 0x61
    0xe6, 0x10, // 39: out PORT_DONE, al
    0xeb, 0xfe, // 41: jmp $
    0xc6, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, 0x01, // 43: mov byte [0x300000], 1
    0xb0, 0x62, // 51: mov al, 0x62
    0xe6, 0x10, // 53: out PORT_DONE, al
    0xeb, 0xfe, // 55: jmp $
    0x0f, 0x0b, // 57: ud2
    0xeb, 0xfe, // 59: jmp $
];

/// Runs `child` (just reset or forked) to its first exit, the report, and returns the state
/// there; then runs it with `mode` at `DATA_GPA` and returns how it ended.
fn run_case(child: &mut Guest, mode: u8) -> (VcpuState, VmExit) {
    assert_eq!(child.vm_mut().run().unwrap(), VmExit::Report(0));
    let at_report = child.vm().save_state().unwrap();
    child.vm_mut().write_guest(DATA_GPA, &[mode]).unwrap();
    let kicker = child.vm().kicker();
    let kick = (mode == 3).then(|| {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            kicker.kick();
        })
    });
    let exit = loop {
        match child.vm_mut().run().unwrap() {
            VmExit::Kicked if kick.is_none() => continue,
            e => break e,
        }
    };
    if let Some(k) = kick {
        k.join().unwrap();
    }
    (at_report, exit)
}

#[test]
fn short_restore_after_clean_exits_full_after_others_and_both_reach_the_same_state() {
    require_kvm!();
    let frames = HostFrames::new(64 << 20).unwrap();
    let mut g = Guest::new(&frames, 3 << 20).unwrap();
    g.vm_mut().load(CODE, GuestArgs::default()).unwrap();
    let entry = g.snapshot().unwrap();
    let mut child = g.fork(&entry).unwrap();
    let stats = |c: &Guest| c.vm().vcpu_restore_stats();
    assert_eq!((stats(&child).full, stats(&child).short), (1, 0));
    assert!(differences(&child.vm().save_state().unwrap(), &entry).is_empty());

    // The reference: the state at the report after the fork's full restore.
    let (reference, exit) = run_case(&mut child, 0);
    assert_eq!(exit, VmExit::Done(0x61));
    let (mut full, mut short) = (1, 0);
    // (mode of the run before this reset, whether that run's exits were all clean)
    let cases: &[(u8, bool)] = &[
        (0, true),
        (0, true),
        (1, false), // outside memory: MMIO exit
        (0, true),
        (2, false), // ud2: triple fault
        (0, true),
        (3, false), // kicked mid-loop
        (0, true),
        (0, true),
    ];
    let mut prev_clean = true;
    for (i, &(mode, clean)) in cases.iter().enumerate() {
        child.reset(&entry).unwrap();
        if prev_clean {
            short += 1;
        } else {
            full += 1;
        }
        let s = stats(&child);
        assert_eq!((s.full, s.short), (full, short), "case {i} (mode {mode})");
        let back = child.vm().save_state().unwrap();
        let d = differences(&back, &entry);
        assert!(
            d.is_empty(),
            "case {i}: read back after reset differs in {d:?}"
        );
        let (at_report, exit) = run_case(&mut child, mode);
        let d = differences(&at_report, &reference);
        assert!(
            d.is_empty(),
            "case {i}: state at the report differs in {d:?}"
        );
        match mode {
            0 => assert_eq!(exit, VmExit::Done(0x61), "case {i}"),
            1 => assert!(
                matches!(
                    exit,
                    VmExit::Mmio {
                        addr: 0x30_0000,
                        write: true,
                        ..
                    }
                ),
                "case {i}: {exit:?}"
            ),
            2 => assert_eq!(exit, VmExit::Shutdown, "case {i}"),
            _ => assert_eq!(exit, VmExit::Kicked, "case {i}"),
        }
        prev_clean = clean;
    }
    assert!(short >= 5 && full >= 4, "{full} full, {short} short");
}

#[test]
fn raw_vcpu_access_after_a_short_restore_sees_the_restored_state_and_forces_a_full_one() {
    require_kvm!();
    let frames = HostFrames::new(64 << 20).unwrap();
    let mut g = Guest::new(&frames, 3 << 20).unwrap();
    g.vm_mut().load(CODE, GuestArgs::default()).unwrap();
    let entry = g.snapshot().unwrap();
    let mut child = g.fork(&entry).unwrap();
    let (_, exit) = run_case(&mut child, 0);
    assert_eq!(exit, VmExit::Done(0x61));
    child.reset(&entry).unwrap();
    assert_eq!(child.vm().vcpu_restore_stats().short, 1);
    // The registers, sregs and events wait in the sync area; `vcpu()` applies them first.
    let vcpu = child.vm_mut().vcpu().unwrap();
    assert_eq!(vcpu.get_regs().unwrap(), entry.regs);
    assert_eq!(vcpu.get_sregs().unwrap(), entry.sregs);
    assert_eq!(vcpu.get_vcpu_events().unwrap(), entry.events);
    assert!(differences(&child.vm().save_state().unwrap(), &entry).is_empty());
    let (_, exit) = run_case(&mut child, 0);
    assert_eq!(exit, VmExit::Done(0x61));
    child.reset(&entry).unwrap();
    let s = child.vm().vcpu_restore_stats();
    assert_eq!(
        (s.full, s.short),
        (2, 1),
        "raw access makes the next restore full"
    );
}

/// The `hello` program: the same input gives the same result after every reset, the path
/// follows how the previous input ended, and the state read back is the snapshot's.
#[test]
fn program_resets_take_the_short_path_after_clean_inputs_only() {
    require_kvm!();
    let frames = HostFrames::new(256 << 20).unwrap();
    let mut parent = Program::load(&frames, HELLO, 4 << 20).unwrap();
    assert_eq!(parent.run(LIMIT).unwrap(), Outcome::SnapshotHere);
    let state = parent.snapshot().unwrap();
    let mut child = parent.fork(&state).unwrap();
    child.set_input(b"abc");
    let first = child.run(LIMIT).unwrap();
    // (input, whether its run ends clean: a hypercall at CPL3)
    let inputs: &[(&[u8], bool)] = &[
        (b"abc", true),
        (b"OOM", true),   // the allocator's failure is a crash hypercall
        (b"PANIC", true), // likewise
        (b"abc", true),
        (b"WILD", false), // unmapped page, no IDT: triple fault
        (b"abc", true),
        (b"LOOP", false), // the time limit kicks it
        (b"abc", true),
        (b"FUZ!", true),
        (b"abc", true),
    ];
    let (mut full, mut short) = (1u64, 0u64);
    let mut prev_clean = true;
    for &(input, clean) in inputs {
        child.reset(&state).unwrap();
        if prev_clean {
            short += 1;
        } else {
            full += 1;
        }
        let s = child.guest().vm().vcpu_restore_stats();
        let name = String::from_utf8_lossy(input);
        assert_eq!((s.full, s.short), (full, short), "before {name}");
        let d = differences(&child.guest().vm().save_state().unwrap(), &state);
        assert!(d.is_empty(), "before {name}: {d:?}");
        child.set_input(input);
        let limit = if input == b"LOOP" {
            Duration::from_millis(200)
        } else {
            LIMIT
        };
        let out = child.run(limit).unwrap();
        match input {
            b"abc" => assert_eq!(out, first),
            b"WILD" => assert!(matches!(out, Outcome::TripleFault { .. }), "{out:?}"),
            b"LOOP" => assert!(matches!(out, Outcome::Timeout(_)), "{out:?}"),
            _ => assert!(matches!(out, Outcome::Crash(_)), "{name}: {out:?}"),
        }
        prev_clean = clean;
    }
}
