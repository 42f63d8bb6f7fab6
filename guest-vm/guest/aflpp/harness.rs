//! The AFL++ baseline of the fuzz bench (`fuzz-execs-{parser,warm}-aflpp`): one fuzz target of
//! `guest/targets/` as a native program that `afl-fuzz` drives in its fork-server mode (one
//! fork per input, not persistent mode).
//!
//! Built by guest-vm's build.rs (when AFL++'s runtime object, `/usr/lib/afl/afl-compiler-rt.o`
//! from Debian's `afl++`, exists) with SanitizerCoverage trace-pc-guard edges, linked with that
//! runtime, once per target: `--cfg 'aflpp_target="http"'` or `"warm"` selects the module.
//!
//! The fork server is deferred: `setup()` runs once in the fork server's process, then
//! `__afl_manual_init()` starts the server, so every child starts from the built state — the
//! native analogue of the guest's `snapshot_here` (the warm target's 64 MiB table is built
//! once, not per input). The signature string below tells afl-fuzz the binary defers.
//!
//! The input is the file named by the first argument (`@@`) or, without one, stdin. The
//! planted bug (`Err`) aborts, which afl-fuzz records as a crash; any other input exits 0.

extern crate alloc;

use std::io::Read;

#[cfg(aflpp_target = "http")]
#[path = "../targets/http.rs"]
mod target;
#[cfg(aflpp_target = "warm")]
#[path = "../targets/warm.rs"]
mod target;

extern "C" {
    /// AFL++'s runtime (afl-compiler-rt.o): maps the coverage map and runs the fork server;
    /// returns in each forked child.
    fn __afl_manual_init();
}

/// afl-fuzz looks for this string in the binary to know the fork server is deferred (and then
/// tells the runtime's constructor not to start it before `main`).
static DEFER_SIGNATURE: &[u8] = b"##SIG_AFL_DEFER_FORKSRV##\0";

fn main() {
    let state = target::setup();
    // Keep the signature in the binary (an unreferenced static may be dropped by the linker).
    std::hint::black_box(DEFER_SIGNATURE);
    // SAFETY: called once, single-threaded, before any input is read; the runtime object is
    // linked in (build.rs) and its constructors have run.
    unsafe { __afl_manual_init() };
    let mut input = Vec::new();
    let read = match std::env::args_os().nth(1) {
        Some(path) => std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut input)),
        None => std::io::stdin().read_to_end(&mut input),
    };
    if let Err(e) = read {
        eprintln!("aflpp harness: reading the input: {e}");
        std::process::exit(2);
    }
    if target::run(&state, &input).is_err() {
        std::process::abort();
    }
}
