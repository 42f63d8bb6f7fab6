//! Builds the guest programs with the host toolchain into static ELFs in `OUT_DIR`:
//! - `guest/kvstore.rs` (the key-value store, its own `_start`, linked by `guest/linker.ld`),
//!   embedded by `workload/kvstore.rs`;
//! - the guest SDK (`guest/sdk/src/lib.rs`, as `libguest_sdk.rlib`) and its example guests
//!   (`guest/sdk/examples/{hello,spin,kv}.rs`, linked by `guest/sdk/linker.ld`; `kv`
//!   with SanitizerCoverage edge guards), which the tests run from `OUT_DIR` (`NAME.elf`).
//!
//! No bare-metal target or rust-src is needed (PLATFORM.md): the programs are compiled for the
//! host triple against the precompiled `core` / `alloc`, linked without libc, hermetically (no
//! network). The flags match `guest/sdk/.cargo/config.toml`, the path a user's `cargo build`
//! takes.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `EXAMPLES` are built against the SDK; `(name, with SanitizerCoverage)`.
const EXAMPLES: &[(&str, bool)] = &[("hello", false), ("spin", false), ("kv", true)];

/// SanitizerCoverage edge guards (`guest/sdk/src/cov.rs` counts them in the coverage map).
const SANCOV: &[&str] = &[
    "-C",
    "passes=sancov-module",
    "-C",
    "llvm-args=-sanitizer-coverage-level=3",
    "-C",
    "llvm-args=-sanitizer-coverage-trace-pc-guard",
    "-C",
    "llvm-args=-sanitizer-coverage-trace-compares",
];

fn guest_rustc(crate_type: &str, name: &str) -> Command {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let mut c = Command::new(rustc);
    c.args([
        "--edition",
        "2021",
        "--crate-type",
        crate_type,
        "--crate-name",
        name,
    ])
    .args(["--target", "x86_64-unknown-linux-gnu"])
    .args([
        "-C",
        "opt-level=2",
        "-C",
        "panic=abort",
        "-C",
        "debuginfo=0",
    ])
    .args(["-C", "relocation-model=static"])
    // The host build's flags (e.g. coverage, sanitizers) must not leak into the guest.
    .env_remove("RUSTFLAGS")
    .env_remove("CARGO_ENCODED_RUSTFLAGS");
    c
}

fn link_args(c: &mut Command, ld: &Path) {
    c.args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
        .args(["-C", "link-arg=-static", "-C", "link-arg=-no-pie"])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", ld.display()))
        .args(["-C", "link-arg=-Wl,--build-id=none"]);
}

fn run(mut c: Command, what: &str) {
    let status = c
        .status()
        .unwrap_or_else(|e| panic!("running rustc for {what}: {e}"));
    assert!(status.success(), "building {what} failed");
}

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    for watched in [
        "guest/kvstore.rs",
        "guest/linker.ld",
        "guest/ABI.md",
        "guest/sdk/src",
        "guest/sdk/examples",
        "guest/targets",
        "guest/sdk/linker.ld",
    ] {
        println!("cargo:rerun-if-changed={}", dir.join(watched).display());
    }

    let mut c = guest_rustc("bin", "kvstore");
    link_args(&mut c, &dir.join("guest/linker.ld"));
    c.arg("-o").arg(out.join("kvstore.elf"));
    c.arg(dir.join("guest/kvstore.rs"));
    run(c, "guest/kvstore.rs");

    let sdk = dir.join("guest/sdk");
    let rlib = out.join("libguest_sdk.rlib");
    let mut c = guest_rustc("rlib", "guest_sdk");
    c.arg("-o").arg(&rlib).arg(sdk.join("src/lib.rs"));
    run(c, "the guest SDK");

    for &(name, coverage) in EXAMPLES {
        let mut c = guest_rustc("bin", name);
        if coverage {
            c.args(SANCOV);
        }
        link_args(&mut c, &sdk.join("linker.ld"));
        c.arg("--extern")
            .arg(format!("guest_sdk={}", rlib.display()));
        c.arg("-o").arg(out.join(format!("{name}.elf")));
        c.arg(sdk.join(format!("examples/{name}.rs")));
        run(c, &format!("guest/sdk/examples/{name}.rs"));
    }
}
