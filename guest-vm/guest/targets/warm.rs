//! The `warm` fuzz target: a large in-memory index built once, before `snapshot_here`, that
//! every input is parsed against — the case where resetting a snapshot beats building the
//! state again (or forking a process that holds it) per input.
//!
//! `setup` builds an open-addressing hash table of [`SLOTS`] 16-byte slots (`[key, value]`,
//! 64 MiB) holding [`RECORDS`] generated records (`key = mix(i)`, `value = mix(key) | 1`,
//! linear probing; a slot with value 0 is empty), plus one record per byte of the magic
//! prefix whose value's low byte is that byte. `run` never writes the table.
//!
//! Input: first the magic check, then whitespace-separated queries: a decimal record number
//! `n` (looks up `mix(n)`: present for `n < RECORDS`) or `#hex`, a raw key. Each lookup's
//! result decides a branch (found or not, then the value's low bits), and the answer is a
//! digest of them.
//!
//! The planted bug: an input starting with [`MAGIC`] (`WARM`), compared one byte per branch
//! with a side effect per matched byte (a new edge each, the constant in the comparison log),
//! before any lookup; all four matched, it is `Err` when the table's magic records spell the
//! same bytes (they do once `setup` ran).
//!
//! Shared by the guest example (`guest/sdk/examples/warm.rs`, no_std, run with `--mem 128`)
//! and the native fuzz bench (std, `#[path]`): only `core` and `alloc`; the including crate
//! provides `extern crate alloc`. Invariants: the table has at least one empty slot (probes
//! end), `run` reads it only and never panics; `Err` is only the planted bug.

use alloc::vec::Vec;

/// Slots of the table (a power of two), 16 bytes each: 64 MiB.
pub const SLOTS: usize = 1 << 22;
/// Generated records (load factor 0.75).
pub const RECORDS: u64 = 3 << 20;
/// The prefix the magic records spell.
pub const MAGIC: &[u8] = b"WARM";
/// The keys of the magic records (outside the generated ones: `mix` is a bijection, and
/// these are `mix` of numbers far above `RECORDS`).
const MAGIC_BASE: u64 = 1 << 40;

/// The warm state: the table, `[key, value]` per slot.
pub struct State {
    slots: Vec<[u64; 2]>,
}

/// How far the last input matched the magic (the per-byte side effect).
static DEPTH: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// splitmix64's finaliser: a bijection on u64.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl State {
    fn insert(&mut self, key: u64, value: u64) {
        let mask = SLOTS - 1;
        let mut i = mix(key) as usize & mask;
        while self.slots[i][1] != 0 && self.slots[i][0] != key {
            i = (i + 1) & mask;
        }
        self.slots[i] = [key, value];
    }

    /// The value stored under `key`.
    pub fn get(&self, key: u64) -> Option<u64> {
        let mask = SLOTS - 1;
        let mut i = mix(key) as usize & mask;
        loop {
            let [k, v] = self.slots[i];
            if v == 0 {
                return None;
            }
            if k == key {
                return Some(v);
            }
            i = (i + 1) & mask;
        }
    }
}

/// Builds the table (before `snapshot_here` in the guest): every slot is written.
pub fn setup() -> State {
    let mut s = State {
        slots: alloc::vec![[0u64; 2]; SLOTS],
    };
    for n in 0..RECORDS {
        let key = mix(n);
        s.insert(key, mix(key) | 1);
    }
    for (i, &b) in MAGIC.iter().enumerate() {
        let key = mix(MAGIC_BASE + i as u64);
        s.insert(key, (mix(key) & !0xff) | u64::from(b));
    }
    s
}

/// The planted bug: `Err` when `input` starts with [`MAGIC`], checked byte by byte, and the
/// table's magic records agree (they always do: the bug needs the warm state to be there).
fn check_magic(state: &State, input: &[u8]) -> Result<(), &'static str> {
    for (i, &want) in MAGIC.iter().enumerate() {
        if input.get(i) != Some(&want) {
            return Ok(());
        }
        DEPTH.store(i + 1, core::sync::atomic::Ordering::Relaxed);
    }
    let spelled = (0..MAGIC.len())
        .all(|i| state.get(mix(MAGIC_BASE + i as u64)).map(|v| v as u8) == Some(MAGIC[i]));
    if spelled {
        Err("planted bug: warm magic WARM")
    } else {
        Ok(())
    }
}

/// One query: a decimal record number or `#hex` raw key; `None` when it is neither.
fn query_key(tok: &[u8]) -> Option<u64> {
    let (digits, radix) = match tok.split_first() {
        Some((b'#', rest)) => (rest, 16),
        _ => (tok, 10),
    };
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    let n = digits.iter().try_fold(0u64, |n, &d| {
        (d as char)
            .to_digit(radix)
            .map(|d| n.wrapping_mul(u64::from(radix)) + u64::from(d))
    })?;
    Some(if radix == 10 { mix(n) } else { n })
}

/// Answers the input's queries against the table; the value is a status: 0..=199 a digest of
/// the lookups (found records by their value's low bits, misses), 200 + the number of the
/// first malformed query (mod 50).
pub fn run(state: &State, input: &[u8]) -> Result<u64, &'static str> {
    check_magic(state, input)?;
    let (mut hits, mut misses, mut digest) = (0u64, 0u64, 0u64);
    for (n, tok) in input
        .split(|b| b.is_ascii_whitespace())
        .filter(|t| !t.is_empty())
        .enumerate()
    {
        let Some(key) = query_key(tok) else {
            return Ok(200 + n as u64 % 50);
        };
        match state.get(key) {
            None => misses += 1,
            Some(v) => {
                hits += 1;
                digest = match v & 6 {
                    0 => digest.wrapping_add(v >> 56),
                    2 => digest ^ (v >> 48),
                    4 => digest.rotate_left(5),
                    _ => digest.wrapping_mul(3),
                };
            }
        }
    }
    Ok((hits * 7 + misses * 3 + digest) % 200)
}
