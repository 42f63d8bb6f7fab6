//! The `warm` fuzz target in a guest (`guest/targets/warm.rs`: a 64 MiB hash table built
//! before `snapshot_here`, the input's queries answered against it, a planted crash behind the
//! magic the table spells, `WARM`). Needs `--mem 128`. Built with SanitizerCoverage by
//! guest-vm's build.rs (`warm.elf`), or here with `cargo build --release --example warm`.
#![no_std]
#![no_main]

extern crate alloc;

use guest_sdk as sdk;

#[path = "../../targets/warm.rs"]
mod warm;

sdk::main!(main);

fn main() -> u64 {
    let state = warm::setup();
    sdk::log!(
        "warm: table of {} MiB built, {} coverage guards",
        (warm::SLOTS * core::mem::size_of::<[u64; 2]>()) >> 20,
        sdk::cov::guards()
    );
    sdk::snapshot_here().unwrap_or_else(|_| sdk::crash("snapshot_here refused"));
    let input = sdk::input(16 << 10);
    match warm::run(&state, &input) {
        Ok(status) => status,
        Err(why) => sdk::crash(why),
    }
}
