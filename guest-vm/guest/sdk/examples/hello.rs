//! The example guest (built by guest-vm's build.rs for the test suite, and by
//! `cargo build --release --example hello` here): checks the ABI's refusals before its
//! snapshot point, builds some warm state, calls `snapshot_here`, then acts on its input:
//!
//! - `FUZ!...` → a planted `crash` (the bug a fuzzer must find behind a magic prefix);
//! - `PANIC`   → a Rust panic (the SDK's panic handler reports it as a crash);
//! - `OOM`     → allocates past the heap (an allocation failure → panic → crash);
//! - `WILD`    → writes beyond guest memory (the host stops it: outside memory / triple fault);
//! - `LOOP`    → never finishes (the host's time limit stops it);
//! - anything else → `done(checksum of the input and the warm state, 0..=255)`.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use guest_sdk as sdk;

sdk::main!(main);

fn main() -> u64 {
    sdk::log!(
        "hello: {} MiB of guest memory, heap {:#x}..{:#x}",
        sdk::mem_size() >> 20,
        sdk::heap_range().0,
        sdk::heap_range().1
    );
    // Out of order and malformed calls are refused, not fatal.
    let mut early = [0u8; 8];
    if sdk::next_input(&mut early).is_ok() {
        sdk::crash("next_input before snapshot_here was not refused");
    }
    if sdk::hypercall::hypercall(sdk::hypercall::HC_INPUT, u64::MAX - 4, 64, 0)
        != sdk::hypercall::HC_ERR
        || sdk::hypercall::hypercall(sdk::hypercall::HC_LOG, 0x1000, 1 << 40, 0)
            != sdk::hypercall::HC_ERR
        || sdk::hypercall::hypercall(77, 0, 0, 0) != sdk::hypercall::HC_ERR
    {
        sdk::crash("a malformed hypercall was not refused");
    }
    sdk::log!("abi self-check passed");
    let warm: Vec<u64> = (0..4096u64).map(|i| i.wrapping_mul(0x9e37_79b9)).collect();
    sdk::snapshot_here().unwrap_or_else(|_| sdk::crash("snapshot_here refused"));
    if sdk::snapshot_here().is_ok() {
        sdk::crash("a second snapshot_here was not refused");
    }
    let input = sdk::input(4096);
    sdk::log!("input of {} bytes", input.len());
    if input.starts_with(b"FUZ!") {
        sdk::crash("planted bug: magic prefix FUZ!");
    }
    if input.starts_with(b"PANIC") {
        panic!("the input asked for a panic");
    }
    if input.starts_with(b"OOM") {
        let mut hog: Vec<Vec<u8>> = Vec::new();
        loop {
            hog.push(alloc::vec![1u8; 1 << 20]);
        }
    }
    if input.starts_with(b"WILD") {
        let past = sdk::mem_size() + (64 << 20);
        // SAFETY: none — this deliberately writes outside guest memory; the host stops the
        // guest before the write has any effect.
        unsafe { core::ptr::write_volatile(past as *mut u64, 1) };
        sdk::crash("a write outside guest memory went through");
    }
    if input.starts_with(b"LOOP") {
        let mut x = 0u64;
        loop {
            // SAFETY: a volatile write to a local.
            unsafe { core::ptr::write_volatile(&mut x, x.wrapping_add(1)) };
        }
    }
    let sum = input
        .iter()
        .fold(warm[input.len() % warm.len()], |a, &b| {
            a.wrapping_mul(31).wrapping_add(b as u64)
        });
    sum & 0xff
}
