//! The `guest-vm run` job: boot one key-value store guest, build its table, serve one request
//! stream checked against the model, and report timings and memory.
//!
//! Invariant: every answer is checked (`streams::serve_checked`); a mismatch is an error.

use std::time::Instant;

use guest_vm::vmm::x86_64::layout::DATA_GPA;
use guest_vm::workload::fleet::{self, GuestMemory};
use guest_vm::workload::kvstore::{memory_for, KvStore, BUCKET_SIZE};
use guest_vm::workload::model::TableModel;
use guest_vm::workload::streams::{self, ServeCounts, FILL_FIRST};
use guest_vm::{Guest, HostFrames, Result};

use crate::demo::DemoOptions;
use crate::measure::ms;

/// What `run` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SingleReport {
    pub guest_mib: u64,
    pub buckets: u64,
    pub keys: u64,
    pub boot_ms: f64,
    pub fill_ms: f64,
    pub serve_ms: f64,
    pub counts: ServeCounts,
    pub checksum: u64,
    pub memory: GuestMemory,
}

/// Boots, fills (prefaulting the table first when `prefault`), serves stream `seed`.
pub fn run(opts: &DemoOptions, seed: u64, prefault: bool) -> Result<SingleReport> {
    let (buckets, keys) = opts.validate()?;
    guest_vm::vmm::check_host()?;
    let mem = memory_for(buckets);
    let frames = HostFrames::new(mem * 2)?;
    let t = Instant::now();
    let mut kv = KvStore::boot(Guest::new(&frames, mem)?, buckets)?;
    let boot_ms = ms(t.elapsed());
    let t = Instant::now();
    if prefault {
        kv.inner().prefault(DATA_GPA, buckets * BUCKET_SIZE, true)?;
    }
    kv.fill(FILL_FIRST, keys)?;
    let fill_ms = ms(t.elapsed());
    let mut model = TableModel::new(buckets);
    model.fill(FILL_FIRST, keys);
    let ops = streams::stream(seed, opts.requests, keys, 1);
    let t = Instant::now();
    let counts = streams::serve_checked(&mut kv, &mut model, &ops, seed)?;
    let serve_ms = ms(t.elapsed());
    let checksum = streams::check_table(&mut kv, &model, "guest")?;
    let memory = fleet::guest_memory(kv.inner());
    drop(kv.finish()?);
    Ok(SingleReport {
        guest_mib: mem >> 20,
        buckets,
        keys,
        boot_ms,
        fill_ms,
        serve_ms,
        counts,
        checksum,
        memory,
    })
}
