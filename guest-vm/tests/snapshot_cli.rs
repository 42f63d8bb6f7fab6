//! Two processes: `guest-vm snapshot save` writes a key-value store guest in one process,
//! `guest-vm snapshot restore` restores it in another and serves a checked request stream; a
//! diff saved by a third process restores as a chain; `inspect --json` describes the chain;
//! a bad file is a clean failure. Fails without KVM under `GUESTMEM_REQUIRE_KVM=1`.

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
    assert_eq!(info["layers"][0]["format"], "1.0");
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
