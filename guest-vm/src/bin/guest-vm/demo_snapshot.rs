//! The demo's "save → restore → fork" section: the parent (stopped at its snapshot, table
//! unchanged) is saved to a snapshot file with the working set of a fork's first run; a new
//! guest is restored from the file (lazily, that set prefetched) and serves a checked request
//! stream; a fork of the restored guest serves another stream, and the restored guest is
//! checked unchanged by it.
//!
//! Checks (lines of the demo report): the restored guest's answers and whole table match the
//! model of "snapshot + its own stream"; the fork's answers match "restored + its stream",
//! and afterwards the restored guest's table is still its own (checksum, count) with the
//! fork's inserted keys absent. Invariant: the file lives in a directory of its own under the
//! system temporary directory, removed when the section ends, whatever happened.

use std::path::PathBuf;
use std::time::Instant;

use guest_vm::snapshot::{self, RestoreOptions, SaveOptions, SnapshotError};
use guest_vm::workload::kvstore::KvStore;
use guest_vm::workload::model::TableModel;
use guest_vm::workload::streams::{self, own_key, Op};
use guest_vm::{Error, Guest, HostFrames, Result, VcpuState};

use crate::demo::{check, progress, Check};
use crate::measure::ms;

/// Stream seeds of the section: recorded run, restored guest, its fork.
const RECORD_SEED: u64 = 0;
const RESTORED_SEED: u64 = 0;
const FORK_SEED: u64 = 1;

/// What the section measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SnapshotSection {
    pub save_ms: f64,
    pub file_kib: u64,
    pub stored_pages: u64,
    pub working_set_pages: u64,
    pub restore_ms: f64,
    pub prefetched_pages: u64,
    pub restored_run_ms: f64,
    /// userfaultfd faults the restored guest took while serving.
    pub restored_demand_faults: u64,
    pub fork_ms: f64,
    pub fork_run_ms: f64,
}

fn snap(e: SnapshotError) -> Error {
    match e {
        SnapshotError::Guest(e) => e,
        other => Error::BadState(other.to_string()),
    }
}

/// Removes the section's directory when dropped.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the section over `parent` (stopped at `state`, its table = `model`); see the module
/// documentation. Runtime errors are `Err`; failed checks are lines in `checks`.
pub fn run(
    frames: &HostFrames,
    parent: &KvStore<Guest>,
    state: &VcpuState,
    model: &TableModel,
    keys: u64,
    requests: u64,
    checks: &mut Vec<Check>,
) -> Result<SnapshotSection> {
    progress("save -> restore -> fork: the parent to a snapshot file and back");
    let mut s = SnapshotSection::default();
    let dir = Dir(std::env::temp_dir().join(format!("gm-demo-snap-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).map_err(|err| Error::Sys {
        what: "demo snapshot dir",
        err,
    })?;
    let path = dir.0.join("parent.gms");
    let peers = 2;
    let stream = |seed| streams::stream(seed, requests, keys, peers);

    // The working set: a fork of the parent at the snapshot point, recording its first run.
    let recorder = parent.inner().fork(state)?;
    recorder.vmar().set_recording(true);
    let mut rkv = KvStore::resume(recorder);
    streams::serve_checked(
        &mut rkv,
        &mut model.clone(),
        &stream(RECORD_SEED),
        RECORD_SEED,
    )?;
    let set = rkv.inner().vmar().recorded();
    drop(rkv);
    let t = Instant::now();
    let opts = SaveOptions {
        working_set: Some(set),
        ..SaveOptions::default()
    };
    let saved = snapshot::save(parent.inner(), state, &path, &opts).map_err(snap)?;
    s.save_ms = ms(t.elapsed());
    s.file_kib = saved.bytes / 1024;
    s.stored_pages = saved.data_pages;
    s.working_set_pages = saved.working_set_pages;

    let t = Instant::now();
    let r = snapshot::restore(frames, &[path], RestoreOptions::default()).map_err(snap)?;
    s.restore_ms = ms(t.elapsed());
    s.prefetched_pages = r.prefetched;
    let before = r.guest.vm().fault_stats();
    let mut restored = KvStore::resume(r.guest);
    let mut restored_model = model.clone();
    let t = Instant::now();
    let served = streams::serve_checked(
        &mut restored,
        &mut restored_model,
        &stream(RESTORED_SEED),
        RESTORED_SEED,
    );
    s.restored_run_ms = ms(t.elapsed());
    let after = restored.vm().fault_stats();
    s.restored_demand_faults = (after.missing + after.wp) - (before.missing + before.wp);
    let table = served.and_then(|c| {
        streams::check_table(&mut restored, &restored_model, "restored guest").map(|sum| (c, sum))
    });
    check(
        checks,
        "restored guest serves",
        table.is_ok(),
        match &table {
            Ok((c, sum)) => format!(
                "{} requests matched the model after a restore from the file, checksum {sum:#018x}",
                c.requests
            ),
            Err(e) => e.to_string(),
        },
    );
    let Ok((_, restored_sum)) = table else {
        return Ok(s);
    };

    let t = Instant::now();
    let rstate = restored.inner().snapshot()?;
    let child = restored.inner().fork(&rstate)?;
    s.fork_ms = ms(t.elapsed());
    let mut ckv = KvStore::resume(child);
    let mut child_model = restored_model.clone();
    let ops = stream(FORK_SEED);
    let t = Instant::now();
    let child_run = streams::serve_checked(&mut ckv, &mut child_model, &ops, FORK_SEED)
        .and_then(|_| streams::check_table(&mut ckv, &child_model, "fork of the restored guest"));
    s.fork_run_ms = ms(t.elapsed());
    drop(ckv);
    // The fork's own inserts must not be in the restored guest.
    let mut absent = true;
    let mut probed = 0;
    for op in &ops {
        if let Op::Put { key, .. } = op {
            if *key >= own_key(FORK_SEED, 0) && *key < own_key(FORK_SEED + 1, 0) {
                absent &= restored.get(*key)?.is_none();
                probed += 1;
            }
        }
    }
    let restored_after = streams::check_table(&mut restored, &restored_model, "restored guest");
    check(
        checks,
        "fork of the restored guest isolated",
        child_run.is_ok() && restored_after.as_ref().ok() == Some(&restored_sum) && absent,
        match (&child_run, &restored_after) {
            (Ok(csum), Ok(rsum)) => format!(
                "fork: {} requests matched, checksum {csum:#018x}; restored guest unchanged \
                 (checksum {rsum:#018x}), the fork's {probed} inserted keys absent: {absent}",
                ops.len()
            ),
            (Err(e), _) | (_, Err(e)) => e.to_string(),
        },
    );
    Ok(s)
}
