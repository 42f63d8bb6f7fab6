//! The `guest-vm` binary: bad input is a clean error (non-zero exit, a message, no panic), a
//! host that cannot run guests gets a message saying why, and a small `demo` passes with its
//! verdict line. The KVM cases skip with a printed reason when the host cannot run guests, or
//! fail when `GUESTMEM_REQUIRE_KVM=1`.

mod common;

use std::process::{Command, Output};

fn guest_vm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_guest-vm"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running the guest-vm binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn bad_input_is_a_clean_error() {
    let cases: &[&[&str]] = &[
        &[],
        &["frobnicate"],
        &["demo", "--children", "0"],
        &["demo", "--children", "many"],
        &["demo", "--children", "100000"],
        &["fork", "-n", "-3"],
        &["demo", "--table-mib", "3"],
        &["demo", "--table-mib", "1048576"],
        &["run", "--requests", "0"],
        &["run", "--table-mib", "18446744073709551616"],
        &["bench", "--sizes", "0"],
        &["bench", "--sizes", "64,999999"],
        &["bench", "--reps", "0"],
        &["demo", "--keys", "99999999999", "--table-mib", "1"],
        &["bench", "--pages", "16", "--dirty", "4096"],
    ];
    for args in cases {
        let out = guest_vm(args);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            !err.contains("panicked") && !text(&out.stdout).contains("panicked"),
            "{args:?} panicked: {err}"
        );
        assert!(!err.trim().is_empty(), "{args:?}: no error message");
        println!(
            "{args:?} -> {:?}: {}",
            out.status.code(),
            err.lines().next().unwrap_or("")
        );
    }
}

#[test]
fn help_lists_every_command() {
    let out = guest_vm(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for cmd in ["demo", "run", "fork", "bench"] {
        assert!(help.contains(cmd), "help lacks {cmd}: {help}");
    }
}

/// Without root the demo says why it cannot run and exits non-zero (run as `nobody` through
/// `setpriv` when this test itself is root; skipped otherwise).
#[test]
fn demo_without_root_says_why() {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 || Command::new("setpriv").arg("--help").output().is_err() {
        println!("SKIP: needs root and setpriv to drop privileges");
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_guest-vm"))
        .args(["demo", "--table-mib", "1"])
        .output()
        .expect("setpriv");
    let err = text(&out.stderr);
    if err.contains("Permission denied") && err.contains("setpriv") {
        println!("SKIP: the binary is not executable by nobody: {err}");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not root") || err.contains("/dev/kvm"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(text(&out.stdout).contains("VERDICT: FAIL"));
}

#[test]
fn small_demo_passes_with_its_verdict() {
    require_kvm!();
    let out = guest_vm(&[
        "demo",
        "--children",
        "4",
        "--table-mib",
        "1",
        "--requests",
        "150",
    ]);
    let stdout = text(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("VERDICT: PASS"), "{last}");
    for needle in [
        "child",
        "copied pg",
        "resident KiB",
        "reset median",
        "save -> restore -> fork",
        "fork of the restored guest isolated",
    ] {
        assert!(stdout.contains(needle), "report lacks {needle}");
    }
}

#[test]
fn demo_json_and_fork_command() {
    require_kvm!();
    let out = guest_vm(&[
        "fork",
        "-n",
        "2",
        "--table-mib",
        "1",
        "--requests",
        "50",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["passed"], serde_json::Value::Bool(true));
    assert_eq!(v["children"].as_array().map(Vec::len), Some(2));
    assert!(v["reset_ms_median"].is_null(), "fork has no reset phase");
}

/// The smallest `bench` (1 MiB, one repetition) runs every comparison but the time-to-crash
/// rows (including the
/// userfaultfd MISSING + UFFDIO_COPY baseline) and prints JSON with a median and a ratio per
/// row; the real figures come from `guest-vm bench` in release.
#[test]
fn tiny_bench_prints_json_rows() {
    require_kvm!();
    let out = guest_vm(&[
        "bench",
        "--sizes",
        "1",
        "--reps",
        "1",
        "--pages",
        "8",
        "--dirty",
        "4",
        // Every group but `fuzz-crash` (minutes of fuzzing until the planted crashes).
        "--groups",
        "fork,pool,faults,cow,prefetch,reset,snapshot,restore,fleet,fuzz",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let rows = v["rows"].as_array().expect("rows");
    assert!(rows.len() >= 10, "{rows:?}");
    assert!(
        rows.iter()
            .any(|r| r["what"] == "first-touch fault, per page"
                && r["baseline"]
                    .as_str()
                    .is_some_and(|b| b.contains("UFFDIO_COPY"))),
        "no UFFDIO_COPY baseline row: {rows:?}"
    );
    let mut ids = std::collections::BTreeSet::new();
    for r in rows {
        // A count row (demand faults) may count none on our side; a time is never zero.
        let count = r["what"].as_str().is_some_and(|w| w.contains("a count"));
        let ours_ok = |x: f64| if count { x >= 0.0 } else { x > 0.0 };
        assert!(r["ours_us"].as_f64().is_some_and(ours_ok), "{r}");
        assert!(r["ratio"].as_f64().is_some_and(ours_ok), "{r}");
        assert!(r["baseline_us"].as_f64().is_some_and(|x| x > 0.0), "{r}");
        let id = r["id"].as_str().expect("every row has an id");
        assert!(ids.insert(id.to_string()), "duplicate row id {id}");
    }
    for id in [
        "reset-cycle-8",
        "reset-flat",
        "first-touch",
        "cow",
        "prefetch-restore",
        "restore-vs-private-map",
        "fuzz-execs-parser-aflpp",
        "fuzz-execs-warm-aflpp",
    ] {
        assert!(ids.contains(id), "no row {id}: {ids:?}");
    }
}
