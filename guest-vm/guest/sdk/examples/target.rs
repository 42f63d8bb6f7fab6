//! The fuzzing example target: a small `key=value;` record parser fed the input, with a planted
//! crash behind the magic prefix `FUZ!` checked one byte per branch (so edge coverage leads a
//! fuzzer to it). Built with SanitizerCoverage by guest-vm's build.rs (`target.elf`).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use guest_sdk as sdk;

sdk::main!(main);

/// How much of the magic prefix the last input matched.
static mut DEPTH: usize = 0;

/// Parses `k=v;k=v;...`: the number of well-formed records, or `None` on a syntax error.
fn parse(input: &[u8]) -> Option<u64> {
    let mut records = 0;
    for rec in input.split(|&b| b == b';') {
        if rec.is_empty() {
            continue;
        }
        let eq = rec.iter().position(|&b| b == b'=')?;
        let (k, v) = (&rec[..eq], &rec[eq + 1..]);
        if k.is_empty() || !k.iter().all(|b| b.is_ascii_alphanumeric()) {
            return None;
        }
        if v.first() == Some(&b'#') && v.len() > 1 {
            let _ = v[1..].iter().try_fold(0u64, |a, &d| {
                (d as char).to_digit(16).map(|d| a * 16 + d as u64)
            })?;
        }
        records += 1;
    }
    Some(records)
}

fn main() -> u64 {
    sdk::log!("target: {} coverage guards", sdk::cov::guards());
    let warm: Vec<u8> = (0..=255u8).collect();
    sdk::snapshot_here().unwrap_or_else(|_| sdk::crash("snapshot_here refused"));
    let input = sdk::input(1024);
    // One branch per byte, each with a side effect, so the compiler cannot fold the prefix
    // into one comparison and each matched byte is a new edge.
    for (i, &want) in b"FUZ!".iter().enumerate() {
        if input.get(i) != Some(&want) {
            break;
        }
        // SAFETY: a volatile write to this program's own static.
        unsafe { (&raw mut DEPTH).write_volatile(i + 1) };
        match i {
            0 => sdk::log!("F"),
            1 => sdk::log!("FU"),
            2 => sdk::log!("FUZ"),
            _ => sdk::crash("planted bug: magic prefix FUZ!"),
        }
    }
    match parse(&input) {
        Some(n) => n.min(200) + warm[input.len() % 256] as u64 % 50,
        None => 255,
    }
}
