//! The restore rows of `guest-vm bench` (ids from issue 14), on the key-value store guest with
//! an 8 MiB table filled to 60 % (the demo's guest), serving `REQUESTS` checked requests of one
//! stream after each restore:
//!
//! - `prefetch-restore` (a count row: `ours_us` / `baseline_us` hold demand-fault counts, not
//!   µs — `what` says so): the userfaultfd faults (missing + write-protect) of a cold restore
//!   whose file carries the working set recorded by a first cold restore's run of the same
//!   stream (prefetched in bulk before the guest runs), against that first restore's faults;
//! - `restore-vs-private-map` (per restore + run, µs): `snapshot::restore` of that file (its
//!   working set prefetched) + serving the stream, against a new VM whose memslot is a
//!   `MAP_PRIVATE` mapping of a raw memory file of the same guest (Firecracker's file backend:
//!   the kernel's page cache and copy-on-write, no userfaultfd) + vCPU state + the same stream;
//! - `restore-vs-private-map-lazy`: the same with the working set not prefetched
//!   (`Prefetch::Off`: every page on demand through the pager).
//!
//! The baseline VM is a `GuestVm` over a reservation whose whole range is replaced by the
//! private file mapping (its fault thread then never hears of a fault; the VMM's accesses go
//! through the memslot), so both sides drive the guest with the same `KvStore` code.
//! Files go to a directory under the system temporary directory, removed at the end (on an
//! error too).
//! Invariant: every run's answers are checked against the table model; a mismatch is an error.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use guest_vm::snapshot::{self, Prefetch, RestoreOptions, SaveOptions};
use guest_vm::sys::mmap::{Backing, MapFlags, Prot};
use guest_vm::sys::uffd::Uffd;
use guest_vm::workload::kvstore::{memory_for, KvStore, BUCKET_SIZE};
use guest_vm::workload::model::TableModel;
use guest_vm::workload::streams::{self, Op, FILL_FIRST};
use guest_vm::{Error, Gpa, Guest, GuestVm, HostFrames, Reservation, Result, VcpuState};

use super::snapshot::snap_err;
use super::{median, progress, row, BenchOptions, Row};
use crate::measure::us;

/// Requests served after each restore.
const REQUESTS: u64 = 1000;
/// The demo's table: 8 MiB, 60 % of its buckets filled.
const TABLE: u64 = 8 << 20;
const STREAM_SEED: u64 = 11;

fn sys(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |err| Error::Sys { what, err }
}

/// userfaultfd faults (missing + write-protect) of `vm` so far.
fn demand_faults(vm: &GuestVm) -> u64 {
    let s = vm.fault_stats();
    s.missing + s.wp
}

/// Serves `ops` on `kv`, checked against a copy of `model`.
fn serve(
    kv: &mut KvStore<impl std::borrow::BorrowMut<GuestVm>>,
    model: &TableModel,
    ops: &[Op],
) -> Result<()> {
    let mut m = model.clone();
    streams::serve_checked(kv, &mut m, ops, STREAM_SEED).map(drop)
}

/// A restore of `path` with `prefetch` + the run: (µs, demand faults of the run, its working
/// set when `record`).
fn restored_run(
    frames: &HostFrames,
    path: &Path,
    prefetch: Prefetch,
    record: bool,
    model: &TableModel,
    ops: &[Op],
) -> Result<(f64, u64, vmo::WorkingSet)> {
    let opts = RestoreOptions {
        prefetch,
        ..RestoreOptions::default()
    };
    let t = Instant::now();
    let r = snapshot::restore(frames, &[path.to_path_buf()], opts).map_err(snap_err)?;
    if record {
        r.guest.vmar().set_recording(true);
    }
    let before = demand_faults(r.guest.vm());
    let mut kv = KvStore::resume(r.guest);
    serve(&mut kv, model, ops)?;
    let took = us(t.elapsed());
    let faults = demand_faults(kv.vm()) - before;
    Ok((took, faults, kv.inner().vmar().recorded()))
}

/// The guest's whole memory as a raw file (GPA = file offset), for the private-map baseline.
fn raw_memory_file(g: &Guest, path: &Path) -> Result<()> {
    let mut buf = vec![0u8; g.mem_size() as usize];
    g.vmar().read(0, &mut buf)?;
    std::fs::write(path, &buf).map_err(sys("bench raw memory file"))
}

/// A new VM over `MAP_PRIVATE` of `raw` with `state` + the run, µs.
fn private_map_run(
    raw: &Path,
    mem: u64,
    state: &VcpuState,
    model: &TableModel,
    ops: &[Op],
) -> Result<f64> {
    let t = Instant::now();
    let file = std::fs::File::open(raw).map_err(sys("open raw memory file"))?;
    let res = Arc::new(Reservation::new(Gpa(0), mem, Arc::new(Uffd::open()?))?);
    // SAFETY: the reservation is fresh (nothing references its bytes); the whole range is
    // replaced, and the reservation's Drop unmaps it with the rest.
    unsafe {
        res.host_mapping().replace(
            "mmap(MAP_PRIVATE raw memory file)",
            res.hva().raw(),
            mem,
            Prot::ReadWrite,
            Backing::Private {
                fd: file.as_fd(),
                offset: 0,
            },
            MapFlags::NORESERVE,
        )?
    };
    let mut vm = GuestVm::new(res, |_f| Err(vmo::Error::AccessDenied))?;
    vm.restore_state(state)?;
    let mut kv = KvStore::resume(vm);
    serve(&mut kv, model, ops)?;
    let took = us(t.elapsed());
    if demand_faults(kv.vm()) != 0 {
        return Err(Error::BadState(
            "the private-map VM reached userfaultfd".into(),
        ));
    }
    Ok(took)
}

pub(super) fn restore_rows(
    o: &BenchOptions,
    _shared: &HostFrames,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let buckets = TABLE / BUCKET_SIZE;
    let keys = buckets * 6 / 10;
    let mem = memory_for(buckets);
    // Its own pool: the parent, one restored guest and its copies at a time, whatever the
    // `--sizes` of the other groups.
    let frames = &HostFrames::new(mem * 4)?;
    let dir =
        TempDir(std::env::temp_dir().join(format!("gm-bench-restore-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).map_err(sys("bench restore dir"))?;
    let dir = &dir.0;
    progress(&format!(
        "restore: kvstore guest ({} MiB table, {keys} keys), {REQUESTS} requests after each restore",
        TABLE >> 20
    ));
    let mut kv = KvStore::boot(Guest::new(frames, mem)?, buckets)?;
    kv.fill(FILL_FIRST, keys)?;
    let mut model = TableModel::new(buckets);
    model.fill(FILL_FIRST, keys);
    let g = kv.into_inner();
    let state = g.snapshot()?;
    let ops = streams::stream(STREAM_SEED, REQUESTS, keys, 1);
    let plain = dir.join("plain.gms");
    snapshot::save(&g, &state, &plain, &SaveOptions::default()).map_err(snap_err)?;
    // First cold restores: no working set in the file; the first one's run is recorded.
    let (mut first, mut set) = (Vec::new(), None);
    for _ in 0..o.reps {
        let (_, faults, ws) =
            restored_run(frames, &plain, Prefetch::Off, set.is_none(), &model, &ops)?;
        first.push(faults as f64);
        set.get_or_insert(ws);
    }
    let with_ws = dir.join("ws.gms");
    let opts = SaveOptions {
        working_set: set,
        ..SaveOptions::default()
    };
    snapshot::save(&g, &state, &with_ws, &opts).map_err(snap_err)?;
    let raw = dir.join("memory.raw");
    raw_memory_file(&g, &raw)?;
    drop(g);
    let (mut second, mut ours, mut lazy, mut base) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..o.reps {
        let (t, faults, _) =
            restored_run(frames, &with_ws, Prefetch::Recorded, false, &model, &ops)?;
        second.push(faults as f64);
        ours.push(t);
        let (t, _, _) = restored_run(frames, &with_ws, Prefetch::Off, false, &model, &ops)?;
        lazy.push(t);
        base.push(private_map_run(&raw, mem, &state, &model, &ops)?);
    }
    rows.push(row(
        "prefetch-restore",
        format!(
            "demand faults (uffd missing + wp; a count, not us) of a cold restore's run of \
             {REQUESTS} requests (goal: ratio <= 0.1)"
        ),
        "second cold restore: the first run's working set in the file, prefetched",
        median(&second),
        "first cold restore: all on demand",
        median(&first),
    ));
    rows.push(row(
        "restore-vs-private-map",
        format!(
            "restore + serve {REQUESTS} kvstore requests ({} MiB table), per restore",
            TABLE >> 20
        ),
        "snapshot::restore, recorded working set prefetched",
        median(&ours),
        "new VM over MAP_PRIVATE of the raw memory file",
        median(&base),
    ));
    rows.push(row(
        "restore-vs-private-map-lazy",
        format!(
            "restore + serve {REQUESTS} kvstore requests ({} MiB table), per restore",
            TABLE >> 20
        ),
        "snapshot::restore, no prefetch (pager on demand)",
        median(&lazy),
        "new VM over MAP_PRIVATE of the raw memory file",
        median(&base),
    ));
    Ok(())
}

/// The rows' file directory, removed when dropped (on errors too).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
