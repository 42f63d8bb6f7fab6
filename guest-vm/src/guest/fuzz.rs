//! Snapshot fuzzing of an SDK guest: every input runs in one child forked at the guest's
//! `snapshot_here`, and the child is reset to the snapshot between inputs (`Program::reset`,
//! copy-back). Coverage comes from the guest's SanitizerCoverage edge counters in a coverage
//! map that is a shared Vmo of this child alone (`Program::attach_coverage`): reset does not
//! roll it back, the host reads and zeroes it after each input.
//!
//! The loop (a minimal coverage-guided executor, not LibAFL — see the README): pick a corpus
//! entry (the newest half the time), mutate it (`mutate`), run it; an input that reaches a new
//! edge joins the corpus (edges only, no hit-count buckets: a small corpus); the operands of
//! the comparisons the guest made (its comparison log) become mutation tokens, which is how a
//! magic value is matched; an input whose run fails (crash, exception / triple fault, access
//! outside memory, refused fault, time limit) is a `Finding`, one per distinct outcome text.
//!
//! Invariants: the child is at the snapshot whenever `exec` starts (it resets after every
//! run, also after a refused fault, which `reset` recovers); the coverage map is read only
//! between runs.

use std::time::{Duration, Instant};

use super::program::{Coverage, Outcome, Program};
use crate::error::{Error, Result};
use crate::vmm::vcpu_state::VcpuState;
use std::collections::HashSet;

use crate::vmm::x86_64::layout::{COV_CMP_OFF, COV_SIZE};

/// Most mutation tokens kept (comparison operands the guest logged).
pub const MAX_TOKENS: usize = 512;

/// A small xorshift64* generator (reproducible runs from `--seed`).
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Byte-level mutations: 1–2 of bit flip, random byte, insert, delete, duplicate a chunk,
/// an interesting value, a splice with another corpus entry, a token (a comparison operand)
/// written over or inserted; never longer than `max_len`.
pub fn mutate(
    rng: &mut XorShift,
    input: &[u8],
    other: &[u8],
    tokens: &[Vec<u8>],
    max_len: usize,
) -> Vec<u8> {
    const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'=', b';', b'#'];
    let mut v = input.to_vec();
    for _ in 0..=rng.below(2) {
        let op = if v.is_empty() {
            2 + 5 * rng.below(2)
        } else {
            rng.below(9)
        };
        match op {
            0 => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(v.len());
                v[i] = rng.next_u64() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next_u64() as u8);
            }
            3 => {
                v.remove(rng.below(v.len()));
            }
            4 => {
                let a = rng.below(v.len());
                let len = 1 + rng.below((v.len() - a).min(16));
                let chunk = v[a..a + len].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, chunk);
            }
            5 => {
                let i = rng.below(v.len());
                v[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            7 | 8 if !tokens.is_empty() => {
                let t = &tokens[rng.below(tokens.len())];
                let at = rng.below(v.len() + 1);
                if op == 7 {
                    v.splice(at..at, t.iter().copied());
                } else {
                    let end = (at + t.len()).min(v.len());
                    v.splice(at..end, t.iter().copied());
                }
            }
            _ => {
                if !other.is_empty() {
                    let cut = rng.below(v.len() + 1);
                    let from = rng.below(other.len());
                    v.truncate(cut);
                    v.extend_from_slice(&other[from..]);
                }
            }
        }
    }
    v.truncate(max_len);
    v
}

/// A failing input and how its run ended.
#[derive(Clone, Debug)]
pub struct Finding {
    pub input: Vec<u8>,
    pub outcome: Outcome,
}

/// What a fuzzing session did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FuzzStats {
    pub execs: u64,
    pub corpus: usize,
    /// Edges (coverage-map counters) seen non-zero.
    pub edges: u64,
    pub findings: usize,
    pub elapsed_s: f64,
    pub run_s: f64,
    pub reset_s: f64,
    /// Seconds into the session when the first finding came.
    pub first_finding_s: Option<f64>,
}

/// What the session reports as it goes.
pub enum Event<'a> {
    NewCoverage(&'a [u8]),
    Finding(&'a Finding),
}

/// The executor and its corpus; see the module documentation.
pub struct Fuzzer {
    child: Program,
    state: VcpuState,
    cov: Coverage,
    map: Vec<u8>,
    virgin: Vec<u8>,
    pub corpus: Vec<Vec<u8>>,
    pub findings: Vec<Finding>,
    pub tokens: Vec<Vec<u8>>,
    seen_tokens: HashSet<Vec<u8>>,
    rng: XorShift,
    limit: Duration,
    stats: FuzzStats,
}

impl Fuzzer {
    /// A fuzzer over `parent`, which must be stopped at its `snapshot_here` (phase `Ready`):
    /// forks the one child every input runs in and gives it its own coverage map.
    pub fn new(parent: &Program, seed: u64, limit: Duration) -> Result<Fuzzer> {
        let state = parent.snapshot()?;
        let mut child = parent.fork(&state)?;
        let cov = child.attach_coverage()?;
        Ok(Fuzzer {
            child,
            state,
            cov,
            map: vec![0; COV_SIZE as usize],
            virgin: vec![0; COV_SIZE as usize],
            corpus: Vec::new(),
            findings: Vec::new(),
            tokens: Vec::new(),
            seen_tokens: HashSet::new(),
            rng: XorShift::new(seed),
            limit,
            stats: FuzzStats::default(),
        })
    }

    pub fn child(&self) -> &Program {
        &self.child
    }

    /// The coverage counters of the last run.
    pub fn last_map(&self) -> &[u8] {
        &self.map
    }

    /// Runs one input in the child, then resets it; whether it reached new coverage.
    pub fn exec(&mut self, input: &[u8]) -> Result<(Outcome, bool)> {
        self.child.set_input(input);
        let t = Instant::now();
        let outcome = self.child.run(self.limit)?;
        self.stats.run_s += t.elapsed().as_secs_f64();
        self.cov.take(&mut self.map)?;
        let t = Instant::now();
        self.child.reset(&self.state)?;
        self.stats.reset_s += t.elapsed().as_secs_f64();
        self.stats.execs += 1;
        let mut new = false;
        self.learn_tokens();
        let counters = &self.map[..COV_CMP_OFF as usize];
        for (v, &c) in self.virgin.iter_mut().zip(counters) {
            if c != 0 && *v == 0 {
                *v = 1;
                new = true;
                self.stats.edges += 1;
            }
        }
        Ok((outcome, new))
    }

    /// Adds the comparison operands of the last run (the map's log, `COV_CMP_OFF`) to the
    /// tokens.
    fn learn_tokens(&mut self) {
        let log = &self.map[COV_CMP_OFF as usize..];
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&log[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let records = (word(0) as usize).min(log.len() / 16 - 1);
        for r in 1..=records {
            let (size, value) = (word(2 * r) as usize, word(2 * r + 1));
            if !(1..=8).contains(&size) || value == 0 || self.tokens.len() >= MAX_TOKENS {
                continue;
            }
            let t = value.to_le_bytes()[..size].to_vec();
            if self.seen_tokens.insert(t.clone()) {
                self.tokens.push(t);
            }
        }
    }

    /// Runs `seeds` (an empty one when there are none), then mutates the corpus for `time`
    /// (or until the first finding when `until_finding`).
    pub fn fuzz(
        &mut self,
        seeds: &[Vec<u8>],
        time: Duration,
        max_len: usize,
        until_finding: bool,
        mut on: impl FnMut(Event<'_>) -> Result<()>,
    ) -> Result<FuzzStats> {
        if max_len == 0 {
            return Err(Error::InvalidArgs(
                "inputs must be allowed at least 1 byte".into(),
            ));
        }
        let start = Instant::now();
        let empty = [Vec::new()];
        let seeds = if seeds.is_empty() { &empty[..] } else { seeds };
        let mut queue: Vec<Vec<u8>> = seeds.to_vec();
        loop {
            let input = match queue.pop() {
                Some(i) => i,
                None => {
                    if start.elapsed() >= time {
                        break;
                    }
                    if self.corpus.is_empty() {
                        self.corpus.push(Vec::new());
                    }
                    // Half the time the newest entry: chains of new coverage get followed.
                    let a = match self.rng.below(2) {
                        0 => self.corpus.len() - 1,
                        _ => self.rng.below(self.corpus.len()),
                    };
                    let b = self.rng.below(self.corpus.len());
                    let (c, t) = (&self.corpus, &self.tokens);
                    mutate(&mut self.rng, &c[a], &c[b], t, max_len)
                }
            };
            let (outcome, new) = self.exec(&input)?;
            if outcome.is_failure() {
                let text = outcome.to_string();
                if !self.findings.iter().any(|f| f.outcome.to_string() == text) {
                    let f = Finding { input, outcome };
                    on(Event::Finding(&f))?;
                    self.stats
                        .first_finding_s
                        .get_or_insert(start.elapsed().as_secs_f64());
                    self.findings.push(f);
                    if until_finding {
                        break;
                    }
                }
            } else if new || self.corpus.is_empty() {
                on(Event::NewCoverage(&input))?;
                self.corpus.push(input);
            }
        }
        self.stats.corpus = self.corpus.len();
        self.stats.findings = self.findings.len();
        self.stats.elapsed_s = start.elapsed().as_secs_f64();
        Ok(self.stats.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn mutate_never_panics_and_respects_max_len(
            seed in any::<u64>(), input in proptest::collection::vec(any::<u8>(), 0..64),
            other in proptest::collection::vec(any::<u8>(), 0..64), max in 1usize..80,
            tokens in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..9), 0..4),
        ) {
            let mut rng = XorShift::new(seed);
            let out = mutate(&mut rng, &input, &other, &tokens, max);
            prop_assert!(out.len() <= max);
        }
    }
}
