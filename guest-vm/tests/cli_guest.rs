//! `guest-vm run --guest FILE` and `guest-vm fork --guest FILE`: a user's guest ELF (the SDK's
//! example guests, built by build.rs into `OUT_DIR`) run to its result, forked into children
//! with one input each, and every error case a clean exit (status 1 or 2, a message, no
//! panic): not an ELF, a missing file, a guest that never calls `snapshot_here`, one that
//! exceeds its memory, bad option values. The KVM cases skip with a printed reason when the
//! host cannot run guests, or fail when `GUESTMEM_REQUIRE_KVM=1`.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

const HELLO: &str = concat!(env!("OUT_DIR"), "/hello.elf");
const SPIN: &str = concat!(env!("OUT_DIR"), "/spin.elf");

fn guest_vm(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_guest-vm"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running the guest-vm binary");
    let (o, e) = (text(&out.stdout), text(&out.stderr));
    println!("{args:?} -> {:?}\n{o}{e}", out.status.code());
    assert!(
        !o.contains("panicked at src") && !e.contains("panicked"),
        "{e}"
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fresh scratch directory for this test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("guest-vm-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn file(dir: &std::path::Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write scratch file");
    p.display().to_string()
}

#[test]
fn bad_guest_options_are_usage_errors() {
    let cases: &[&[&str]] = &[
        &["run", "--guest", HELLO, "--mem", "0"],
        &["run", "--guest", HELLO, "--mem", "1"],
        &["run", "--guest", HELLO, "--mem", "99999"],
        &["run", "--guest", HELLO, "--time-limit", "-1"],
        &["run", "--guest", HELLO, "--time-limit", "soon"],
        &["run", "--input", "/dev/null"],
        &["fork", "--inputs", "/tmp"],
        &["fork", "--guest", HELLO, "-n", "0"],
    ];
    for args in cases {
        let out = guest_vm(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!text(&out.stderr).trim().is_empty(), "{args:?}: no message");
    }
}

#[test]
fn run_guest_prints_its_log_and_done_status() {
    require_kvm!();
    let d = scratch("run-done");
    let input = file(&d, "in", b"hello");
    let out = guest_vm(&["run", "--guest", HELLO, "--mem", "4", "--input", &input]);
    let o = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(o.contains("guest: abi self-check passed"), "{o}");
    assert!(o.contains("guest: input of 5 bytes"), "{o}");
    assert!(o.contains("result: done, status"), "{o}");
}

#[test]
fn run_guest_reproduces_a_crash_from_its_input_file() {
    require_kvm!();
    let d = scratch("run-crash");
    for (input, needle) in [
        (&b"FUZ!abc"[..], "crash: planted bug"),
        (b"PANIC", "crash: panicked at"),
    ] {
        let f = file(&d, "in", input);
        let out = guest_vm(&[
            "run", "--guest", HELLO, "--mem", "4", "--input", &f, "--json",
        ]);
        assert_eq!(out.status.code(), Some(1));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        assert_eq!(v["done"], false);
        assert!(v["outcome"].as_str().unwrap().contains(needle), "{v}");
    }
}

#[test]
fn run_a_file_that_is_not_an_elf_or_missing_is_a_clean_error() {
    require_kvm!();
    let d = scratch("not-elf");
    let script = file(&d, "script.sh", b"#!/bin/sh\necho not a guest\n");
    let out = guest_vm(&["run", "--guest", &script]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("is not a guest this VMM can load"));
    let missing = d.join("nope.elf").display().to_string();
    let out = guest_vm(&["fork", "--guest", &missing, "-n", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read guest"));
}

#[test]
fn a_guest_that_exceeds_its_memory_is_reported() {
    require_kvm!();
    let d = scratch("oom");
    let oom = file(&d, "oom", b"OOM");
    let out = guest_vm(&["run", "--guest", HELLO, "--mem", "4", "--input", &oom]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("memory allocation of"));
    let wild = file(&d, "wild", b"WILD");
    let out = guest_vm(&["run", "--guest", HELLO, "--mem", "4", "--input", &wild]);
    assert_eq!(out.status.code(), Some(1));
    let o = text(&out.stdout);
    assert!(
        o.contains("triple fault") || o.contains("outside guest memory"),
        "{o}"
    );
}

#[test]
fn fork_a_guest_that_never_calls_snapshot_here_stops_at_its_time_limit() {
    require_kvm!();
    let t = std::time::Instant::now();
    let out = guest_vm(&["fork", "--guest", SPIN, "-n", "2", "--time-limit", "0.5"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("never called snapshot_here"));
    assert!(t.elapsed().as_secs() < 30);
}

#[test]
fn fork_children_each_get_their_own_input() {
    require_kvm!();
    let d = scratch("fork-inputs");
    file(&d, "a-plain", b"abc");
    file(&d, "b-crash", b"FUZ!");
    file(&d, "c-loop", b"LOOP");
    let dir = d.display().to_string();
    let out = guest_vm(&[
        "fork",
        "--guest",
        HELLO,
        "-n",
        "4",
        "--mem",
        "4",
        "--inputs",
        &dir,
        "--time-limit",
        "1",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let kids = v["children"].as_array().expect("children");
    assert_eq!(kids.len(), 4);
    let outcome = |i: usize| kids[i]["outcome"].as_str().unwrap().to_string();
    assert!(outcome(0).starts_with("done"), "{}", outcome(0));
    assert!(outcome(1).contains("planted bug"), "{}", outcome(1));
    assert!(outcome(2).starts_with("timeout"), "{}", outcome(2));
    // Inputs are reused in turn; the same input gives the same result.
    assert_eq!(outcome(3), outcome(0));
    assert_eq!(kids[3]["input"], "a-plain");
    for k in kids {
        let pages = k["private_pages"].as_u64().unwrap();
        assert!(
            pages > 0 && pages < 64,
            "a child holds only what it wrote: {k}"
        );
    }
    assert!(v["parent_log"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l == "abi self-check passed"));
}

/// `guest-vm fuzz --until-crash` finds `target`'s planted crash from its benign `seed` within
/// the bound (LibAFL with input-to-state mutations over the guest's comparison log: ~300–1,200
/// inputs here, under a second in a release build, seconds in this debug one), saves coverage
/// inputs in the corpus, and `guest-vm run --input CRASH` reproduces it (exit status 1).
fn fuzz_finds_the_planted_crash(target: &str, mem_mib: &str, seed: &[u8], magic: &[u8]) {
    let d = scratch(&format!("fuzz-{}", magic[0]));
    let corpus = d.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    file(&corpus, "seed", seed);
    let crashes = d.join("crashes").display().to_string();
    let corpus = corpus.display().to_string();
    let out = guest_vm(&[
        "fuzz",
        "--guest",
        target,
        "--corpus",
        &corpus,
        "--crashes",
        &crashes,
        "--mem",
        mem_mib,
        "--time",
        "240",
        "--until-crash",
        "--seed",
        "1",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let f = &v["findings"][0];
    assert!(
        f["outcome"].as_str().unwrap().contains("planted bug"),
        "{v}"
    );
    let crash = f["file"].as_str().unwrap();
    assert!(std::fs::read(crash).unwrap().starts_with(magic), "{v}");
    assert!(
        std::fs::read_dir(&corpus).unwrap().count() > 1,
        "no coverage inputs saved"
    );
    let out = guest_vm(&["run", "--guest", target, "--mem", mem_mib, "--input", crash]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("planted bug"));
}

#[test]
fn fuzz_finds_the_kv_crash_from_a_benign_seed_and_run_reproduces_it() {
    require_kvm!();
    let target = concat!(env!("OUT_DIR"), "/kv.elf");
    fuzz_finds_the_planted_crash(target, "4", b"a=1;", b"FUZ!");
}

#[test]
fn fuzz_finds_the_http_crash_from_a_benign_request_and_run_reproduces_it() {
    require_kvm!();
    let target = concat!(env!("OUT_DIR"), "/http.elf");
    fuzz_finds_the_planted_crash(target, "4", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"PWN");
}

#[test]
fn fuzz_finds_the_warm_crash_from_a_benign_query_and_run_reproduces_it() {
    require_kvm!();
    let target = concat!(env!("OUT_DIR"), "/warm.elf");
    fuzz_finds_the_planted_crash(target, "128", b"1 2 #ff", b"WARM");
}

/// `fuzz --cores 2`: LibAFL's Launcher runs two clients (each its own guest at its snapshot
/// point, LLMP between them), both execute inputs, and the session ends by itself.
#[test]
fn fuzz_on_two_cores_runs_two_clients() {
    require_kvm!();
    let target = concat!(env!("OUT_DIR"), "/kv.elf");
    let d = scratch("fuzz-cores");
    let corpus = d.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    file(&corpus, "seed", b"a=1;");
    let (corpus, crashes) = (
        corpus.display().to_string(),
        d.join("k").display().to_string(),
    );
    // A port of this test run's own, so concurrent runs do not meet one broker.
    let port = (20_000 + std::process::id() % 20_000).to_string();
    let out = guest_vm(&[
        "fuzz",
        "--guest",
        target,
        "--corpus",
        &corpus,
        "--crashes",
        &crashes,
        "--mem",
        "4",
        "--time",
        "4",
        "--cores",
        "2",
        "--broker-port",
        &port,
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let clients: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut ids: Vec<u64> = clients
        .iter()
        .map(|c| c["client"].as_u64().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, [1, 2], "{}", text(&out.stdout));
    for c in &clients {
        assert!(c["stats"]["execs"].as_u64().unwrap() > 0, "{c}");
    }
}

#[test]
fn fuzz_bad_input_is_a_clean_error() {
    let out = guest_vm(&[
        "fuzz",
        "--guest",
        HELLO,
        "--corpus",
        "/tmp",
        "--crashes",
        "/tmp",
        "--time",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    require_kvm!();
    let d = scratch("fuzz-bad");
    let (c, k) = (
        d.join("c").display().to_string(),
        d.join("k").display().to_string(),
    );
    let out = guest_vm(&[
        "fuzz",
        "--guest",
        SPIN,
        "--corpus",
        &c,
        "--crashes",
        &k,
        "--time",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("did not reach snapshot_here"));
}
