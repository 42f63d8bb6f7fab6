//! The Vmar model test, shared by the fuzz target `vmar_model`, the million-operation run
//! (`tests/tests/model_million.rs`) and the failure-injection runs (`tests/tests/inject.rs`):
//! random (or fuzzer-chosen) sequences of map / unmap / protect / sub-VMARs / fork / reset /
//! guest and host reads and writes / commit / decommit / resize / handle_fault, on real Vmars
//! over any `Stage2`, checked against a byte-level reference model of every address space.
//!
//! One file per job: [`input`] (byte sources and biased draws), [`ops`] (the operations and
//! their decoding), [`reference`] (the model), [`harness`] (real objects beside the model),
//! [`check`] (the full check). Invariant: a run is a pure function of its input bytes (or
//! seed) and `Options`.

mod check;
pub mod harness;
pub mod input;
pub mod ops;
pub mod reference;

use std::sync::Arc;

use ept::{EptTable, HeapPhysMem, NptTable};

pub use harness::{Harness, Options, Setup, Stats};
pub use input::{Bytes, Rng, Source};

/// The software EPT backend over a shared frame source.
pub fn ept_table(phys: Arc<HeapPhysMem>) -> EptTable<Arc<HeapPhysMem>> {
    EptTable::new(phys).expect("root table frame")
}

/// The software NPT backend over a shared frame source.
pub fn npt_table(phys: Arc<HeapPhysMem>) -> NptTable<Arc<HeapPhysMem>> {
    NptTable::new(phys).expect("root table frame")
}

/// One run on `data` (a fuzzer's input) over the EPT or NPT backend (first byte's low bit),
/// fully checked after every operation, ending with the teardown accounting check.
pub fn run_bytes(data: &[u8]) -> Stats {
    let (first, rest) = data.split_first().map_or((0, data), |(f, r)| (*f, r));
    let opts = Options {
        root_pages: 32,
        check_every: 1,
        max_ops: 512,
        pagers: false,
    };
    let mut src = Bytes::new(rest);
    if first & 1 == 0 {
        let mut h = Harness::new(Setup::plain(ept_table), opts);
        h.run(&mut src);
        h.finish()
    } else {
        let mut h = Harness::new(Setup::plain(npt_table), opts);
        h.run(&mut src);
        h.finish()
    }
}
