//! Builds the guest workload (`guest/kvstore.rs`, a `no_std` Rust program) with the host
//! toolchain into a static ELF linked at 0x10000 (`guest/linker.ld`), placed in `OUT_DIR` and
//! embedded by `src/payload.rs`. No bare-metal target or rust-src is needed (PLATFORM.md): the
//! program is compiled for the host triple against the precompiled `core`, linked without libc.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    let src = dir.join("guest/kvstore.rs");
    let ld = dir.join("guest/linker.ld");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", ld.display());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let elf = out.join("kvstore.elf");
    let status = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "kvstore",
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
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
        .args(["-C", "link-arg=-static", "-C", "link-arg=-no-pie"])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", ld.display()))
        .args(["-C", "link-arg=-Wl,--build-id=none"])
        .arg("-o")
        .arg(&elf)
        .arg(&src)
        // The host build's flags (e.g. coverage, sanitizers) must not leak into the guest.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("running rustc for the guest program");
    assert!(status.success(), "building guest/kvstore.rs failed");
}
