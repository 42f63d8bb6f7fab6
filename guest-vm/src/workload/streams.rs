//! Request streams for the key-value store guest, and the checked driver that serves one.
//!
//! A stream is deterministic in its seed: child `i` of a fork gets seed `i` and so writes keys
//! no other child writes (its own key range for inserts, its own values for overwrites). The
//! stream also probes keys the *other* children insert, which must stay absent in this child.
//! `serve_checked` sends each request to the guest, applies it to a `TableModel`, and compares
//! every answer; the first mismatch is an `Error::BadState` naming the request.
//!
//! Invariants: a stream never sends a value longer than `VALUE_MAX`; a checked run leaves the
//! model equal to what the guest should hold.

use std::borrow::BorrowMut;

use super::kvstore::{KvStore, ST_OK};
use super::model::TableModel;
use crate::error::{Error, Result};
use crate::vmm::GuestVm;

/// First key of the snapshot's FILL.
pub const FILL_FIRST: u64 = 1000;

/// The key range stream `seed` inserts into (disjoint across seeds).
pub fn own_key(seed: u64, n: u64) -> u64 {
    10_000_000 * (seed + 1) + n
}

/// One request of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put { key: u64, value: Vec<u8> },
    Get { key: u64 },
    Del { key: u64 },
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// `len` requests for stream `seed` over a snapshot holding keys `FILL_FIRST..+filled`;
/// `peers` is the number of sibling streams whose inserted keys this one probes.
pub fn stream(seed: u64, len: u64, filled: u64, peers: u64) -> Vec<Op> {
    let mut rng = Rng(seed.wrapping_mul(0xa076_1d64_78bd_642f) ^ 0xe703_7ed1_a0b4_28db);
    let mut inserted = 0u64;
    let mut out = Vec::with_capacity(len as usize);
    for j in 0..len {
        let op = match rng.below(10) {
            0..=3 => {
                inserted += 1;
                Op::Put {
                    key: own_key(seed, inserted),
                    value: format!("seed {seed} new {inserted}").into_bytes(),
                }
            }
            4 | 5 => Op::Put {
                key: FILL_FIRST + rng.below(filled),
                value: format!("seed {seed} overwrite {j}").into_bytes(),
            },
            6 => Op::Del {
                key: FILL_FIRST + rng.below(filled),
            },
            7 if peers > 1 => {
                // A key a sibling stream inserts: must be absent here.
                let other = (seed + 1 + rng.below(peers - 1)) % peers;
                Op::Get {
                    key: own_key(other, 1 + rng.below(len / 4 + 1)),
                }
            }
            8 if inserted > 0 => Op::Get {
                key: own_key(seed, 1 + rng.below(inserted)),
            },
            _ => Op::Get {
                key: FILL_FIRST + rng.below(filled),
            },
        };
        out.push(op);
    }
    out
}

/// What a checked run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServeCounts {
    pub requests: u64,
    pub puts: u64,
    pub gets: u64,
    pub dels: u64,
    /// GETs of keys a sibling inserts, answered "absent" as they must be.
    pub peer_probes: u64,
}

/// Serves `ops` on `kv`, checking every answer against `model` (which is updated).
pub fn serve_checked<V: BorrowMut<GuestVm>>(
    kv: &mut KvStore<V>,
    model: &mut TableModel,
    ops: &[Op],
    seed: u64,
) -> Result<ServeCounts> {
    let mut c = ServeCounts::default();
    for (i, op) in ops.iter().enumerate() {
        c.requests += 1;
        let mismatch =
            |what: String| Error::BadState(format!("stream {seed} request {i} ({op:?}): {what}"));
        match op {
            Op::Put { key, value } => {
                c.puts += 1;
                let want = model.put(*key, value);
                let got = kv.put(*key, value)?;
                if got != want {
                    return Err(mismatch(format!("status {got}, model says {want}")));
                }
            }
            Op::Get { key } => {
                c.gets += 1;
                let want = model.get(*key).map(<[u8]>::to_vec);
                let got = kv.get(*key)?;
                if got != want {
                    return Err(mismatch(format!("got {got:?}, model says {want:?}")));
                }
                if want.is_none() && *key >= own_key(0, 0) && !is_own(seed, *key) {
                    c.peer_probes += 1;
                }
            }
            Op::Del { key } => {
                c.dels += 1;
                let want = model.delete(*key) == ST_OK;
                let got = kv.delete(*key)?;
                if got != want {
                    return Err(mismatch(format!("deleted {got}, model says {want}")));
                }
            }
        }
    }
    Ok(c)
}

fn is_own(seed: u64, key: u64) -> bool {
    key / 10_000_000 == seed + 1
}

/// Compares the guest's whole table with the model (guest-computed checksum and count).
pub fn check_table<V: BorrowMut<GuestVm>>(
    kv: &mut KvStore<V>,
    model: &TableModel,
    who: &str,
) -> Result<u64> {
    let sum = kv.checksum()?;
    let count = kv.count()?;
    if sum != model.checksum() || count != model.count() {
        return Err(Error::BadState(format!(
            "{who}: table checksum {sum:#x} / count {count}, model {:#x} / {}",
            model.checksum(),
            model.count()
        )));
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_deterministic_and_distinct() {
        assert_eq!(stream(3, 200, 1000, 4), stream(3, 200, 1000, 4));
        assert_ne!(stream(1, 200, 1000, 4), stream(2, 200, 1000, 4));
        for op in stream(0, 500, 1000, 4) {
            if let Op::Put { key, value } = op {
                assert!(value.len() <= crate::workload::kvstore::VALUE_MAX);
                assert!(key < own_key(1, 0), "seed 0 writes only its own range");
            }
        }
    }
}
