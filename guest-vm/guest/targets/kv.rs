//! The `kv` fuzz target, shared by the guest example (`sdk/examples/kv.rs`, built with
//! SanitizerCoverage) and the native harness of `guest-vm bench --groups fuzz`: a small
//! `key=value;` record parser fed the input, with a planted bug behind the magic prefix
//! `FUZ!`, checked one byte per branch so edge coverage leads a fuzzer to it.
//!
//! Interface of every target in `guest/targets/` (the bench's target table relies on it):
//! `State`, `setup() -> State` (the warm state, built before `snapshot_here`) and
//! `run(&State, input) -> Result<u64, &'static str>` (`Err` is the planted bug: the guest
//! calls `crash` with it, the native harness reports `ExitKind::Crash`). no_std + alloc; no
//! `unsafe`, no I/O: the same code runs in the guest and natively.

extern crate alloc;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

/// How much of the magic prefix the last input matched (a side effect per matched byte, so
/// the compiler cannot fold the prefix into one comparison and each byte is its own edge).
static DEPTH: AtomicUsize = AtomicUsize::new(0);

/// The warm state: a 256-byte table the result is looked up in.
pub struct State {
    table: Vec<u8>,
}

/// Builds the warm state.
pub fn setup() -> State {
    State {
        table: (0..=255u8).collect(),
    }
}

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

/// Runs one input against `state`: `Err` for the planted bug (input starting `FUZ!`).
pub fn run(state: &State, input: &[u8]) -> Result<u64, &'static str> {
    DEPTH.store(0, Ordering::Relaxed);
    if input.first() == Some(&b'F') {
        DEPTH.store(1, Ordering::Relaxed);
        if input.get(1) == Some(&b'U') {
            DEPTH.store(2, Ordering::Relaxed);
            if input.get(2) == Some(&b'Z') {
                DEPTH.store(3, Ordering::Relaxed);
                if input.get(3) == Some(&b'!') {
                    return Err("planted bug: magic prefix FUZ!");
                }
            }
        }
    }
    Ok(match parse(input) {
        Some(n) => n.min(200) + state.table[input.len() % 256] as u64 % 50,
        None => 255,
    })
}
