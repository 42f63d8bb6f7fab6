//! The `demo-8-children` row: the demo's concurrent phase — 8 children forked from one
//! key-value store snapshot, each serving its own checked request stream on its own vCPU
//! thread at once — timed on the wall, against the CPU time the whole process spent in that
//! phase (every vCPU, fault and host thread, guest time included) divided by the CPUs this
//! host has: the time a perfectly parallel run of the same work would take. A ratio near 1
//! means the children do not wait on each other (locks, the kernel's `mmap_lock`); above 1 is
//! time lost to contention or idling.
//!
//! Invariant: every child's stream is checked against its model (a wrong answer fails the
//! bench, it is not timed); the children are dropped before the next repetition.

use std::time::Duration;

use super::{median, progress, row, BenchOptions, Row};
use crate::measure::us;
use guest_vm::vmm::x86_64::layout::DATA_GPA;
use guest_vm::workload::fleet;
use guest_vm::workload::kvstore::{memory_for, KvStore, BUCKET_SIZE};
use guest_vm::workload::model::TableModel;
use guest_vm::workload::streams::FILL_FIRST;
use guest_vm::{Error, Guest, HostFrames, Result};

/// Children of the row, as the id names them.
const CHILDREN: usize = 8;
/// Table of the demo's default size (8 MiB: 2048 buckets of 4 KiB).
const BUCKETS: u64 = 2048;
/// Keys before the snapshot (60 % of the buckets, as the demo) and requests per child.
const KEYS: u64 = BUCKETS * 6 / 10;
const REQUESTS: u64 = 1000;

/// CPU time this process has used, all threads (CLOCK_PROCESS_CPUTIME_ID).
fn process_cpu() -> Result<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return Err(Error::Sys {
            what: "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)",
            err: std::io::Error::last_os_error(),
        });
    }
    Ok(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// The row; it makes its own frame pool (sized for the children), not the bench's.
pub(super) fn fleet_rows(
    o: &BenchOptions,
    _frames: &HostFrames,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    progress(&format!(
        "fleet: {CHILDREN} children of a kvstore snapshot serving {REQUESTS} requests each, concurrently ({cpus} CPUs)"
    ));
    let mem = memory_for(BUCKETS);
    let frames = HostFrames::new(mem * (CHILDREN as u64 + 2))?;
    let mut parent = KvStore::boot(Guest::new(&frames, mem)?, BUCKETS)?;
    parent
        .inner()
        .prefault(DATA_GPA, BUCKETS * BUCKET_SIZE, true)?;
    parent.fill(FILL_FIRST, KEYS)?;
    let mut model = TableModel::new(BUCKETS);
    model.fill(FILL_FIRST, KEYS);
    model.clear_written();
    let state = parent.inner().snapshot()?;
    let (mut wall, mut parallel) = (Vec::new(), Vec::new());
    for _ in 0..o.reps {
        let mut children = fleet::fork_children(parent.inner(), &state, &model, CHILDREN)?;
        let cpu0 = process_cpu()?;
        let (results, elapsed) = fleet::run_concurrently(&mut children, REQUESTS, KEYS);
        let cpu = process_cpu()? - cpu0;
        for (i, r) in results.into_iter().enumerate() {
            r.map_err(|e| Error::BadState(format!("fleet bench: child {i}: {e}")))?;
        }
        wall.push(us(elapsed));
        parallel.push(us(cpu) / cpus);
    }
    rows.push(row(
        "demo-8-children",
        format!("{CHILDREN} children serving {REQUESTS} requests each, concurrently, per run"),
        "wall time of the concurrent phase",
        median(&wall),
        "process CPU time of the phase / CPUs",
        median(&parallel),
    ));
    Ok(())
}
