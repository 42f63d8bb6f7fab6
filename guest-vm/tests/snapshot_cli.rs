//! Two processes: `guest-vm snapshot save` writes a key-value store guest in one process,
//! `guest-vm snapshot restore` restores it in another and serves a checked request stream; a
//! diff saved by a third process restores as a chain; `inspect --json` describes the chain;
//! a working set saved with the file is prefetched by the restoring process (no demand fault
//! on its recorded stream); a bad file is a clean failure. Fails without KVM under
//! `GUESTMEM_REQUIRE_KVM=1`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn guest_vm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_guest-vm"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running the guest-vm binary")
}

fn ok(o: &Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(&out).expect("JSON report")
}

#[test]
fn a_guest_saved_by_one_process_serves_in_another() {
    require_kvm!();
    let dir = std::env::temp_dir().join(format!("gm-snap-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join("base.gms");
    let diff = dir.join("diff.gms");
    let (b, d) = (base.to_str().unwrap(), diff.to_str().unwrap());
    let w = [
        "--table-mib",
        "1",
        "--keys",
        "6000",
        "--requests",
        "400",
        "--json",
    ];
    let saved = ok(&guest_vm(
        &[&["snapshot", "save", "--out", b][..], &w].concat(),
    ));
    assert_eq!(saved["passed"], true);
    let restored = ok(&guest_vm(
        &[&["snapshot", "restore", b, "--seed", "7"][..], &w].concat(),
    ));
    assert_eq!(restored["passed"], true);
    assert_eq!(restored["requests"], 400);
    let r = guest_vm(
        &[
            &[
                "snapshot", "save", "--from", b, "--diff", "--out", d, "--seed", "7",
            ][..],
            &w,
        ]
        .concat(),
    );
    assert_eq!(ok(&r)["saved"]["diff"], true);
    let chain = [
        &["snapshot", "restore", b, d, "--history", "7", "--seed", "8"][..],
        &w,
    ]
    .concat();
    assert_eq!(ok(&guest_vm(&chain))["passed"], true);
    let eager = [
        &[
            "snapshot",
            "restore",
            b,
            d,
            "--history",
            "7",
            "--seed",
            "9",
            "--eager",
        ][..],
        &w,
    ]
    .concat();
    assert_eq!(ok(&guest_vm(&eager))["passed"], true);
    let info = ok(&guest_vm(&["snapshot", "inspect", b, d, "--json"]));
    assert_eq!(info["layers"][1]["base"], info["layers"][0]["identity"]);
    let written = format!(
        "{}.{}",
        guest_vm::snapshot::FORMAT_MAJOR,
        guest_vm::snapshot::FORMAT_MINOR
    );
    assert_eq!(info["layers"][0]["format"], written.as_str());
    assert!(info["layers"][0]["working_set"].is_null());
    // A working set recorded at save (a fork serving stream 7) and prefetched by the restore
    // of another process: that stream then runs without a demand fault; without the prefetch
    // it faults.
    let ws = dir.join("ws.gms");
    let wsp = ws.to_str().unwrap();
    let saved = ok(&guest_vm(
        &[
            &["snapshot", "save", "--out", wsp, "--working-set-seed", "7"][..],
            &w,
        ]
        .concat(),
    ));
    assert!(
        saved["saved"]["working_set_pages"].as_u64() > Some(0),
        "{saved}"
    );
    let warm = ok(&guest_vm(
        &[&["snapshot", "restore", wsp, "--seed", "7"][..], &w].concat(),
    ));
    assert!(warm["prefetched"].as_u64() > Some(0), "{warm}");
    assert_eq!(warm["demand_faults"], 0, "{warm}");
    let cold = ok(&guest_vm(
        &[
            &["snapshot", "restore", wsp, "--seed", "7", "--no-prefetch"][..],
            &w,
        ]
        .concat(),
    ));
    assert_eq!(cold["prefetched"], 0, "{cold}");
    assert!(cold["demand_faults"].as_u64() > Some(0), "{cold}");
    let info = ok(&guest_vm(&["snapshot", "inspect", wsp, "--json"]));
    assert_eq!(
        info["layers"][0]["working_set"]["pages"],
        saved["saved"]["working_set_pages"]
    );
    // The diff without its base, and a file that is not a snapshot: clean failures.
    let no_base = [&["snapshot", "restore", d][..], &w].concat();
    for bad in [&no_base[..], &["snapshot", "inspect", "/dev/null"][..]] {
        let o = guest_vm(bad);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("error:") && !err.contains("panicked"), "{err}");
    }
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
