//! The fuzzing example target `kv` (`guest/targets/kv.rs`: a `key=value;` parser with a
//! planted bug behind the magic prefix `FUZ!`) as a guest: builds the target's state, stops at
//! `snapshot_here`, runs the input, and reports the planted bug with `crash`. Built with
//! SanitizerCoverage by guest-vm's build.rs (`kv.elf`).
#![no_std]
#![no_main]

extern crate alloc;

use guest_sdk as sdk;

#[path = "../../targets/kv.rs"]
mod kv;

sdk::main!(main);

fn main() -> u64 {
    sdk::log!("kv: {} coverage guards", sdk::cov::guards());
    let state = kv::setup();
    sdk::snapshot_here().unwrap_or_else(|_| sdk::crash("snapshot_here refused"));
    let input = sdk::input(1024);
    match kv::run(&state, &input) {
        Ok(v) => v,
        Err(bug) => sdk::crash(bug),
    }
}
