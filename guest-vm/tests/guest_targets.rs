//! The example fuzz targets (`guest/targets/{http,warm}.rs` in the SDK's example guests, built
//! with SanitizerCoverage by build.rs): a benign input ends `done`, the planted crash ends as
//! a crash with its reason and reproduces from a file with `guest-vm run` (exit status 1), and
//! the warm target's children share the ≥ 64 MiB it built before `snapshot_here` (few private
//! pages per input, the same after a reset) with every frame returned at teardown. Whether the
//! fuzzer finds the crashes is the fuzzer's test. Skips with a printed reason without root or
//! /dev/kvm.

mod common;

use std::process::Command;
use std::time::Duration;

use guest_vm::guest::program::{Outcome, Program};
use guest_vm::workload::fleet::guest_memory;
use guest_vm::HostFrames;

const HTTP: &str = concat!(env!("OUT_DIR"), "/http.elf");
const WARM: &str = concat!(env!("OUT_DIR"), "/warm.elf");
const LIMIT: Duration = Duration::from_secs(20);
const PAGE: u64 = 4096;
/// The warm target's memory (its table is 64 MiB) and its table's pages.
const WARM_MEM: u64 = 128 << 20;
const TABLE_PAGES: u64 = (64 << 20) / PAGE;
/// Private pages a warm child may hold after an input: stack pages, the SDK's allocator and the
/// target's statics (.data/.bss), the heap page of the input buffer, the coverage-window pages
/// its edge counters and comparison log hit (RAM here: no shared map attached; the log's slots
/// are hashed over its 12 pages) — never the table. 19 measured; the window is 16 pages.
const WARM_PRIVATE_MAX: u64 = 24;

/// `(input, what a run of it must end as)` per target.
const HTTP_CASES: &[(&[u8], Expect)] = &[
    (
        b"GET /a/b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
        Expect::Done,
    ),
    (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1f\r\n",
        Expect::Done,
    ),
    (b"GET / HTTP/1.1\r\n\r\n", Expect::Done), // refused: no Host (a status, not a crash)
    (b"\x00\xff garbage", Expect::Done),
    (
        b"PWN /x HTTP/1.1\r\nHost: a\r\n\r\n",
        Expect::Crash("planted bug: http method PWN"),
    ),
    (b"PWN ", Expect::Crash("planted bug: http method PWN")),
    (
        b"PWNED / HTTP/1.0\r\n\r\n",
        Expect::Crash("planted bug: http method PWN"),
    ),
    (b"PW /x HTTP/1.1\r\n\r\n", Expect::Done), // two bytes of the magic only
    (b"PWN", Expect::Done), // the method is not complete: httparse has not read it
];
const WARM_CASES: &[(&[u8], Expect)] = &[
    (b"1 2 3 #ff 4000000", Expect::Done),
    (b"WAR 7", Expect::Done), // three bytes of the magic: a malformed query
    (b"", Expect::Done),
    (b"WARM", Expect::Crash("planted bug: warm magic WARM")),
    (b"WARM 1 2 3", Expect::Crash("planted bug: warm magic WARM")),
];

#[derive(Clone, Copy, Debug)]
enum Expect {
    Done,
    Crash(&'static str),
}

fn check(input: &[u8], out: &Outcome, want: Expect) {
    let ok = match want {
        Expect::Done => matches!(out, Outcome::Done(_)),
        Expect::Crash(why) => matches!(out, Outcome::Crash(r) if r == why),
    };
    assert!(
        ok,
        "{:?}: {out:?}, want {want:?}",
        String::from_utf8_lossy(input)
    );
}

fn elf(path: &str) -> Vec<u8> {
    std::fs::read(path).expect("build.rs built the example")
}

/// Boots `elf` to `snapshot_here`, then runs every case in one child reset between inputs,
/// twice over (a reset gives the same result for the same input); returns the frames live at
/// teardown.
fn run_cases(elf: &[u8], mem: u64, cases: &[(&[u8], Expect)]) -> u64 {
    let frames = HostFrames::new(4 * mem).unwrap();
    {
        let mut parent = Program::load(&frames, elf, mem).unwrap();
        assert_eq!(parent.run(LIMIT).unwrap(), Outcome::SnapshotHere);
        let state = parent.snapshot().unwrap();
        let mut child = parent.fork(&state).unwrap();
        let _cov = child.attach_coverage().unwrap();
        let mut first = Vec::new();
        for round in 0..2 {
            for (i, &(input, want)) in cases.iter().enumerate() {
                child.reset(&state).unwrap();
                child.set_input(input);
                let out = child.run(LIMIT).unwrap();
                check(input, &out, want);
                if round == 0 {
                    first.push(out);
                } else {
                    assert_eq!(out, first[i], "not the same result after a reset");
                }
            }
        }
    }
    frames.pool.stats().live
}

#[test]
fn http_target_parses_benign_requests_and_crashes_on_its_magic_method() {
    require_kvm!();
    assert_eq!(
        run_cases(&elf(HTTP), 4 << 20, HTTP_CASES),
        0,
        "frames leaked"
    );
}

#[test]
fn warm_target_answers_queries_and_crashes_on_the_magic_its_table_spells() {
    require_kvm!();
    assert_eq!(
        run_cases(&elf(WARM), WARM_MEM, WARM_CASES),
        0,
        "frames leaked"
    );
}

/// Two children of the warm target share its table: each holds a few private pages after an
/// input, however many inputs it runs with a reset between them, and the pool grows by exactly
/// their private pages.
#[test]
fn warm_children_share_the_table_and_reset_keeps_their_pages_exact() {
    require_kvm!();
    let frames = HostFrames::new(4 * WARM_MEM).unwrap();
    {
        let mut parent = Program::load(&frames, &elf(WARM), WARM_MEM).unwrap();
        assert_eq!(parent.run(LIMIT).unwrap(), Outcome::SnapshotHere);
        let state = parent.snapshot().unwrap();
        let at_snapshot = frames.pool.stats().live;
        assert!(
            at_snapshot >= TABLE_PAGES,
            "the parent holds {at_snapshot} frames, less than its 64 MiB table"
        );
        let mut children: Vec<Program> = (0..2).map(|_| parent.fork(&state).unwrap()).collect();
        let inputs: [&[u8]; 2] = [b"1 2 3 #ff 4000000", b"17 99 3000000 5"];
        let mut private = Vec::new();
        let mut results = Vec::new();
        for (child, input) in children.iter_mut().zip(inputs) {
            child.set_input(input);
            let out = child.run(LIMIT).unwrap();
            assert!(matches!(out, Outcome::Done(_)), "{out:?}");
            results.push(out);
            let mem = guest_memory(child.guest());
            println!("warm child after one input: {mem:?}");
            assert!(
                mem.private_frames <= WARM_PRIVATE_MAX,
                "{} private pages after one input (the table is shared)",
                mem.private_frames
            );
            private.push(mem.private_frames);
        }
        let after = frames.pool.stats().live;
        assert_eq!(
            after - at_snapshot,
            private.iter().sum::<u64>(),
            "the pool grew by more than the children's private pages"
        );
        // Reset and rerun (the other input in between): same results, the same private pages
        // (copy-back restores them in place), the pool unchanged.
        for round in 0..3 {
            for (i, child) in children.iter_mut().enumerate() {
                let input = if round == 1 { inputs[1 - i] } else { inputs[i] };
                child.reset(&state).unwrap();
                child.set_input(input);
                let out = child.run(LIMIT).unwrap();
                if round != 1 {
                    assert_eq!(out, results[i], "a reset changed the result");
                }
                let p = guest_memory(child.guest()).private_frames;
                assert!(p <= WARM_PRIVATE_MAX, "{p} private pages after a reset");
            }
        }
        let later = frames.pool.stats().live;
        assert!(
            later - at_snapshot <= 2 * WARM_PRIVATE_MAX,
            "the pool grew to {} frames past the snapshot over resets",
            later - at_snapshot
        );
    }
    assert_eq!(frames.pool.stats().live, 0, "frames leaked at teardown");
}

/// The crashing inputs, saved to files, reproduce with `guest-vm run --guest ELF --input FILE`
/// (exit status 1, the planted reason printed); a benign input exits 0.
#[test]
fn planted_crashes_reproduce_with_guest_vm_run() {
    require_kvm!();
    let dir = std::env::temp_dir().join(format!("guest-vm-targets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases: &[(&str, &str, &[u8], Option<&str>)] = &[
        (
            HTTP,
            "4",
            b"PWN / HTTP/1.1\r\n\r\n",
            Some("planted bug: http method PWN"),
        ),
        (HTTP, "4", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", None),
        (WARM, "128", b"WARM!", Some("planted bug: warm magic WARM")),
        (WARM, "128", b"1 2 3", None),
    ];
    for (i, &(guest, mem, input, crash)) in cases.iter().enumerate() {
        let file = dir.join(format!("input-{i}"));
        std::fs::write(&file, input).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_guest-vm"))
            .args(["run", "--guest", guest, "--mem", mem, "--input"])
            .arg(&file)
            .env_remove("RUST_LOG")
            .output()
            .expect("running guest-vm");
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!(
            "{guest} {:?} -> {:?}\n{stdout}",
            String::from_utf8_lossy(input),
            out.status
        );
        match crash {
            Some(why) => {
                assert_eq!(out.status.code(), Some(1), "{stdout}");
                assert!(
                    stdout.contains(&format!("result: crash: {why}")),
                    "{stdout}"
                );
            }
            None => {
                assert_eq!(out.status.code(), Some(0), "{stdout}");
                assert!(stdout.contains("result: done, status"), "{stdout}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
