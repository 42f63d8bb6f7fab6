//! Builds the guest programs with the host toolchain into static ELFs in `OUT_DIR`:
//! - the guest SDK (`guest/sdk/src/lib.rs`, as `libguest_sdk.rlib`);
//! - `guest/kvstore.rs` (the key-value store, an SDK program linked by `guest/sdk/linker.ld`),
//!   embedded by `workload/kvstore.rs`;
//! - the SDK's example guests
//!   (`guest/sdk/examples/NAME.rs`, linked by `guest/sdk/linker.ld`), which the tests run from
//!   `OUT_DIR` (`NAME.elf`); the fuzz targets (`kv`, `http`, `warm`, whose logic is in
//!   `guest/targets/`) with SanitizerCoverage edge guards;
//! - the crates.io crates an example uses (`httparse` for `http`), compiled for the guest from
//!   the source cargo already fetched for guest-vm's own dependency on them (the same locked
//!   version): `cargo metadata --offline --locked` names it;
//! - the AFL++ baseline harnesses (`guest/aflpp/harness.rs` over the `http` and `warm` targets,
//!   native std programs with SanitizerCoverage trace-pc-guard linked with AFL++'s runtime
//!   object, `aflpp-NAME` in `OUT_DIR`), when that object (`AFLPP_RT`, from Debian's `afl++`)
//!   exists; without it they are not built (a warning) and the bench's `-aflpp` rows fail
//!   naming `ci/setup.sh afl++`. Only an existing runtime is watched (cargo reruns a script
//!   watching a missing path on every build): after installing `afl++` later, touch this file.
//!
//! No bare-metal target or rust-src is needed (PLATFORM.md): the programs are compiled for the
//! host triple against the precompiled `core` / `alloc`, linked without libc, hermetically (no
//! network). The flags match `guest/sdk/.cargo/config.toml`, the path a user's `cargo build`
//! takes.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `EXAMPLES` are built against the SDK: `(name, with SanitizerCoverage, crates.io crates it
/// uses)`. A crate of the list must be a dependency of guest-vm (Cargo.toml) with its no_std
/// features; it is instrumented with its example (a fuzzer wants the parser's edges).
const EXAMPLES: &[(&str, bool, &[&str])] = &[
    ("hello", false, &[]),
    ("spin", false, &[]),
    ("kv", true, &[]),
    ("http", true, &["httparse"]),
    ("warm", true, &[]),
];

/// SanitizerCoverage edge guards alone (AFL++'s runtime counts them in its map for the native
/// harnesses; no compare tracing, which its runtime would log only for CmpLog).
const SANCOV_GUARDS: &[&str] = &[
    "-C",
    "passes=sancov-module",
    "-C",
    "llvm-args=-sanitizer-coverage-level=3",
    "-C",
    "llvm-args=-sanitizer-coverage-trace-pc-guard",
];
/// What the guests get on top of the edge guards: comparison tracing
/// (`guest/sdk/src/cov.rs` counts the guards and logs the comparisons in the coverage map).
const SANCOV_COMPARES: &[&str] = &["-C", "llvm-args=-sanitizer-coverage-trace-compares"];

/// AFL++'s compiler runtime (the fork server, the coverage map, the trace-pc-guard callbacks).
const AFLPP_RT: &str = "/usr/lib/afl/afl-compiler-rt.o";
/// The targets with an AFL++ harness (`guest/aflpp/harness.rs`) and their crates.io crates.
const AFLPP_TARGETS: &[(&str, &[&str])] = &[("http", &["httparse"]), ("warm", &[])];

/// rustc for a native (std, host) program or crate, optimised like the guests.
fn native_rustc(crate_type: &str, name: &str, edition: &str) -> Command {
    let mut c = rustc(crate_type, name, edition);
    c.args(SANCOV_GUARDS);
    c
}

/// The AFL++ harnesses (module documentation); `sources` are the crates.io crates' sources.
fn aflpp_harnesses(dir: &Path, out: &Path, sources: &[(String, DepSource)]) {
    if !Path::new(AFLPP_RT).exists() {
        println!(
            "cargo:warning=AFL++ runtime {AFLPP_RT} missing (ci/setup.sh afl++, or apt-get \
             install afl++, then touch guest-vm/build.rs): the bench's fuzz-execs-*-aflpp rows \
             and tests/aflpp.rs will fail"
        );
        return;
    }
    println!("cargo:rerun-if-changed={AFLPP_RT}");
    let native = out.join("aflpp");
    std::fs::create_dir_all(&native).expect("creating OUT_DIR/aflpp");
    for (name, src) in sources {
        let mut c = native_rustc("rlib", name, &src.edition);
        c.args(["--cap-lints", "allow"])
            .arg("-o")
            .arg(native.join(format!("lib{name}.rlib")))
            .arg(&src.lib_rs);
        run(c, &format!("the {name} crate for the AFL++ harness"));
    }
    for &(target, deps) in AFLPP_TARGETS {
        let mut c = native_rustc("bin", &format!("aflpp_{target}"), "2021");
        c.arg("--cfg").arg(format!("aflpp_target=\"{target}\""));
        for dep in deps {
            c.arg("--extern").arg(format!(
                "{dep}={}",
                native.join(format!("lib{dep}.rlib")).display()
            ));
        }
        c.arg("-C").arg(format!("link-arg={AFLPP_RT}"));
        c.arg("-o").arg(out.join(format!("aflpp-{target}")));
        c.arg(dir.join("guest/aflpp/harness.rs"));
        run(c, &format!("the AFL++ harness of {target}"));
    }
}

fn guest_rustc(crate_type: &str, name: &str) -> Command {
    guest_rustc_edition(crate_type, name, "2021")
}

fn guest_rustc_edition(crate_type: &str, name: &str, edition: &str) -> Command {
    let mut c = rustc(crate_type, name, edition);
    c.args(["--target", "x86_64-unknown-linux-gnu"])
        .args(["-C", "relocation-model=static"]);
    c
}

/// rustc for one crate, optimised, aborting on panic, without debug info, and without the
/// host build's flags (e.g. coverage, sanitizers), which must not leak into what it builds.
fn rustc(crate_type: &str, name: &str, edition: &str) -> Command {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let mut c = Command::new(rustc);
    c.args(["--edition", edition, "--crate-type", crate_type])
        .args(["--crate-name", name])
        .args([
            "-C",
            "opt-level=2",
            "-C",
            "panic=abort",
            "-C",
            "debuginfo=0",
        ])
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

/// A crates.io dependency of guest-vm as cargo resolved it: its library's root file and edition.
struct DepSource {
    lib_rs: PathBuf,
    edition: String,
}

/// The locked sources of guest-vm's dependencies named `names`, from `cargo metadata` (offline:
/// cargo fetched them before running this script, as guest-vm depends on them).
fn dep_sources(manifest_dir: &Path, names: &[&str]) -> Vec<(String, DepSource)> {
    if names.is_empty() {
        return Vec::new();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--offline", "--locked", "--format-version", "1"])
        .args(["--filter-platform", "x86_64-unknown-linux-gnu"])
        .arg("--manifest-path")
        .arg(manifest_dir.join("Cargo.toml"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let packages = meta["packages"].as_array().expect("metadata packages");
    let me = manifest_dir.join("Cargo.toml");
    let my_id = packages
        .iter()
        .find(|p| p["manifest_path"].as_str().map(Path::new) == Some(me.as_path()))
        .and_then(|p| p["id"].as_str())
        .expect("guest-vm in cargo metadata");
    let node = meta["resolve"]["nodes"]
        .as_array()
        .expect("metadata resolve")
        .iter()
        .find(|n| n["id"].as_str() == Some(my_id))
        .expect("guest-vm in the resolve graph");
    names
        .iter()
        .map(|&name| {
            let dep_id = node["deps"]
                .as_array()
                .expect("deps")
                .iter()
                .find(|d| d["name"].as_str() == Some(name))
                .and_then(|d| d["pkg"].as_str())
                .unwrap_or_else(|| panic!("{name} is not a dependency of guest-vm (Cargo.toml)"));
            let pkg = packages
                .iter()
                .find(|p| p["id"].as_str() == Some(dep_id))
                .expect("dependency package in metadata");
            let lib = pkg["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .find(|t| {
                    t["kind"]
                        .as_array()
                        .is_some_and(|k| k.iter().any(|k| k == "lib" || k == "rlib"))
                })
                .unwrap_or_else(|| panic!("{name} has no library target"));
            let src = DepSource {
                lib_rs: PathBuf::from(lib["src_path"].as_str().expect("src_path")),
                edition: lib["edition"].as_str().unwrap_or("2015").to_string(),
            };
            (name.to_string(), src)
        })
        .collect()
}

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    for watched in [
        "guest/kvstore.rs",
        "guest/ABI.md",
        "guest/sdk/src",
        "guest/sdk/examples",
        "guest/targets",
        "guest/aflpp",
        "guest/sdk/linker.ld",
    ] {
        println!("cargo:rerun-if-changed={}", dir.join(watched).display());
    }

    let sdk = dir.join("guest/sdk");
    let rlib = out.join("libguest_sdk.rlib");
    let mut c = guest_rustc("rlib", "guest_sdk");
    c.arg("-o").arg(&rlib).arg(sdk.join("src/lib.rs"));
    run(c, "the guest SDK");

    let sdk_program = |name: &str| {
        let mut c = guest_rustc("bin", name);
        link_args(&mut c, &sdk.join("linker.ld"));
        c.arg("--extern")
            .arg(format!("guest_sdk={}", rlib.display()));
        c
    };
    let mut c = sdk_program("kvstore");
    c.arg("-o").arg(out.join("kvstore.elf"));
    c.arg(dir.join("guest/kvstore.rs"));
    run(c, "guest/kvstore.rs");

    // The crates.io crates of the examples, each compiled once, instrumented (every example
    // using one is a fuzz target).
    let mut crates: Vec<&str> = EXAMPLES.iter().flat_map(|e| e.2.iter().copied()).collect();
    crates.sort_unstable();
    crates.dedup();
    let sources = dep_sources(&dir, &crates);
    for (name, src) in &sources {
        let mut c = guest_rustc_edition("rlib", name, &src.edition);
        c.args(SANCOV_GUARDS)
            .args(SANCOV_COMPARES)
            .args(["--cap-lints", "allow"]);
        c.arg("-o")
            .arg(out.join(format!("lib{name}.rlib")))
            .arg(&src.lib_rs);
        run(c, &format!("the {name} crate for the guest"));
    }

    for &(name, coverage, deps) in EXAMPLES {
        let mut c = sdk_program(name);
        if coverage {
            c.args(SANCOV_GUARDS).args(SANCOV_COMPARES);
        }
        for dep in deps {
            c.arg("--extern").arg(format!(
                "{dep}={}",
                out.join(format!("lib{dep}.rlib")).display()
            ));
        }
        c.arg("-o").arg(out.join(format!("{name}.elf")));
        c.arg(sdk.join(format!("examples/{name}.rs")));
        run(c, &format!("guest/sdk/examples/{name}.rs"));
    }

    aflpp_harnesses(&dir, &out, &sources);
}
