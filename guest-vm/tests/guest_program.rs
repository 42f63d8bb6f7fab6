//! User guest programs built with the guest SDK (`guest/sdk/examples/`, built by build.rs),
//! run through `guest::program::Program`: the ABI's refusals (the example checks them itself
//! before its snapshot point), snapshot_here → fork → one input per child, every way a run
//! ends (done, crash, panic, allocation failure, a write outside memory, the time limit), and
//! reset between inputs. Skips with a printed reason without root or /dev/kvm.

mod common;

use std::time::Duration;

use guest_vm::guest::program::{Outcome, Phase, Program};
use guest_vm::{HostFrames, VcpuState};

const HELLO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hello.elf"));
const SPIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/spin.elf"));
/// Small: a run that fills its heap (`OOM`) faults in every page.
const MEM: u64 = 4 << 20;
/// Whether a child's outcome is the one its input asks for.
type Check = fn(&Outcome) -> bool;
const LIMIT: Duration = Duration::from_secs(10);

#[test]
fn hello_snapshots_forks_and_every_child_ends_as_its_input_says() {
    require_kvm!();
    let frames = HostFrames::new(256 << 20).unwrap();
    let mut parent = Program::load(&frames, HELLO, MEM).unwrap();
    assert_eq!(parent.run(LIMIT).unwrap(), Outcome::SnapshotHere);
    assert_eq!(parent.phase(), Phase::Ready);
    assert!(
        parent.log().iter().any(|l| l == "abi self-check passed"),
        "{:?}",
        parent.log()
    );
    let state = parent.snapshot().unwrap();
    let cases: &[(&[u8], Check)] = &[
        (b"hello", |o| matches!(o, Outcome::Done(s) if *s <= 255)),
        (
            b"FUZ!x",
            |o| matches!(o, Outcome::Crash(r) if r.contains("planted bug")),
        ),
        (
            b"PANIC",
            |o| matches!(o, Outcome::Crash(r) if r.contains("asked for a panic")),
        ),
        (
            b"OOM",
            |o| matches!(o, Outcome::Crash(r) if r.contains("memory allocation")),
        ),
        (b"WILD", |o| {
            matches!(
                o,
                Outcome::TripleFault { .. } | Outcome::OutsideMemory { .. }
            )
        }),
    ];
    for (input, ok) in cases {
        let mut child = parent.fork(&state).unwrap();
        child.set_input(input);
        let out = child.run(LIMIT).unwrap();
        println!("{:?} -> {out}", String::from_utf8_lossy(input));
        assert!(ok(&out), "{:?}: {out:?}", String::from_utf8_lossy(input));
    }
    // The parent, resumed past its snapshot point with no input, finishes normally.
    assert!(matches!(parent.run(LIMIT).unwrap(), Outcome::Done(_)));
}

/// `hello`'s parent stopped at its snapshot point, that point's state, and a child of it that
/// has run the input `abc` once, with that run's outcome.
fn child_after_abc(frames: &HostFrames) -> (Program, VcpuState, Program, Outcome) {
    let mut parent = Program::load(frames, HELLO, MEM).unwrap();
    assert_eq!(parent.run(LIMIT).unwrap(), Outcome::SnapshotHere);
    let state = parent.snapshot().unwrap();
    let mut child = parent.fork(&state).unwrap();
    child.set_input(b"abc");
    let first = child.run(LIMIT).unwrap();
    (parent, state, child, first)
}

#[test]
fn same_input_same_result_after_reset_and_the_time_limit_stops_a_loop() {
    require_kvm!();
    let frames = HostFrames::new(256 << 20).unwrap();
    let (_parent, state, mut child, first) = child_after_abc(&frames);
    for input in [&b"LOOP"[..], b"OOM", b"abc"] {
        child.reset(&state).unwrap();
        child.set_input(input);
        let limit = if input == b"LOOP" {
            Duration::from_millis(300)
        } else {
            LIMIT
        };
        let out = child.run(limit).unwrap();
        match input {
            b"LOOP" => assert!(matches!(out, Outcome::Timeout(d) if d >= limit), "{out:?}"),
            b"OOM" => assert!(matches!(out, Outcome::Crash(_)), "{out:?}"),
            _ => assert_eq!(out, first),
        }
    }
}

/// Back-to-back runs share the program's one watchdog (armed per run, its deadline moved on by
/// each): a loop in the middle of a hundred quick inputs still times out at its own limit, and
/// only it — no kick of the inputs before or after it.
#[test]
fn back_to_back_runs_time_out_only_the_loop_among_them() {
    require_kvm!();
    let frames = HostFrames::new(256 << 20).unwrap();
    let (_parent, state, mut child, first) = child_after_abc(&frames);
    let limit = Duration::from_millis(250);
    let mut timeouts = 0;
    for i in 0..100 {
        child.reset(&state).unwrap();
        let input: &[u8] = if i == 60 { b"LOOP" } else { b"abc" };
        child.set_input(input);
        let t = std::time::Instant::now();
        let out = child.run(limit).unwrap();
        if input == b"LOOP" {
            assert!(matches!(out, Outcome::Timeout(d) if d >= limit), "{out:?}");
            assert!(t.elapsed() < limit * 4, "the loop ran {:?}", t.elapsed());
            timeouts += 1;
        } else {
            assert_eq!(out, first, "input {i}");
        }
    }
    assert_eq!(timeouts, 1);
}

#[test]
fn a_guest_that_never_snapshots_is_stopped_at_its_time_limit() {
    require_kvm!();
    let frames = HostFrames::new(64 << 20).unwrap();
    let mut p = Program::load(&frames, SPIN, MEM).unwrap();
    let out = p.run(Duration::from_millis(200)).unwrap();
    assert!(matches!(out, Outcome::Timeout(_)), "{out:?}");
    assert_eq!(p.phase(), Phase::Boot);
}

#[test]
fn a_file_that_is_not_an_elf_is_refused_before_it_runs() {
    require_kvm!();
    let frames = HostFrames::new(64 << 20).unwrap();
    for bad in [&b""[..], b"#!/bin/sh\necho hi\n", &HELLO[..64]] {
        let e = Program::load(&frames, bad, MEM).err().expect("refused");
        assert!(matches!(e, guest_vm::Error::Payload(_)), "{e}");
    }
}

const TARGET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kv.elf"));

/// The fuzzing coverage map is a shared Vmo per child: a child's run fills its own map only,
/// and a reset (copy-back) neither clears nor forks it.
#[test]
fn coverage_maps_are_per_child_and_survive_reset() {
    require_kvm!();
    let frames = HostFrames::new(256 << 20).unwrap();
    let mut parent = Program::load(&frames, TARGET, MEM).unwrap();
    assert_eq!(parent.run(LIMIT).unwrap(), Outcome::SnapshotHere);
    let state = parent.snapshot().unwrap();
    let (mut a, mut b) = (parent.fork(&state).unwrap(), parent.fork(&state).unwrap());
    let (cov_a, cov_b) = (a.attach_coverage().unwrap(), b.attach_coverage().unwrap());
    let read = |c: &guest_vm::guest::program::Coverage| {
        let mut m = vec![0u8; guest_vm::vmm::x86_64::layout::COV_SIZE as usize];
        c.vmo().read(0, &mut m).unwrap();
        m
    };
    a.set_input(b"k=v;x=#1f");
    assert!(matches!(a.run(LIMIT).unwrap(), Outcome::Done(_)));
    let after_run = read(&cov_a);
    assert!(
        after_run.iter().any(|&c| c != 0),
        "the run counted no edges"
    );
    assert!(
        read(&cov_b).iter().all(|&c| c == 0),
        "child b saw child a's coverage"
    );
    a.reset(&state).unwrap();
    assert_eq!(read(&cov_a), after_run, "reset changed the coverage map");
    b.set_input(b"FUZ!");
    assert!(matches!(b.run(LIMIT).unwrap(), Outcome::Crash(_)));
    assert_eq!(read(&cov_a), after_run, "child b wrote child a's map");
}

/// The LibAFL executor's children: each has its own map (a run of one leaves the other's last
/// map empty), the executor hands the run's counters to its map observer and zeroes the shared
/// map for the next input, and the planted bug is a crash, a clean run `Ok`.
#[test]
fn guest_executors_have_their_own_maps_and_read_them_per_input() {
    use guest_vm::guest::fuzz::{exit_kind, GuestExecutor};
    use libafl::executors::ExitKind;
    require_kvm!();
    let frames = HostFrames::new(256 << 20).unwrap();
    let mut parent = Program::load(&frames, TARGET, MEM).unwrap();
    assert_eq!(parent.run(LIMIT).unwrap(), Outcome::SnapshotHere);
    let mut a = GuestExecutor::new(&parent, LIMIT).unwrap();
    let b = GuestExecutor::new(&parent, LIMIT).unwrap();
    let out = a.exec(b"k=v;x=#1f").unwrap();
    assert_eq!(exit_kind(&out), ExitKind::Ok, "{out}");
    let edges = guest_vm::vmm::x86_64::layout::COV_CMP_OFF as usize;
    let first = a.last_map()[..edges].to_vec();
    assert!(first.iter().any(|&c| c != 0), "the run counted no edges");
    assert!(b.last_map().iter().all(|&c| c == 0), "b saw a's coverage");
    // Same input again: the same counters, so the map was zeroed in between (not summed) and
    // the reset restored the guest's state but not the map.
    a.exec(b"k=v;x=#1f").unwrap();
    assert_eq!(&a.last_map()[..edges], &first[..]);
    let out = a.exec(b"FUZ!").unwrap();
    assert_eq!(exit_kind(&out), ExitKind::Crash, "{out}");
    assert!(a.outcome_of(b"FUZ!").is_some());
    assert_eq!(a.stats().execs, 3);
}
