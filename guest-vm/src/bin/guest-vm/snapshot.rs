//! `guest-vm snapshot save | restore | inspect`: snapshot files of the key-value store guest.
//!
//! - `save --out F`: boot the store, fill it (`--keys`), save it; with `--from F0 [F1 ..]`
//!   instead restore that chain, serve stream `--seed` (checked), and save (`--diff`: a diff
//!   over the newest file of the chain, else a full file); `--working-set-seed S` first runs a
//!   fork of the guest at the save point through stream S (checked) with recording on, and
//!   stores the pages it touched in the file (format 1.1's working-set section);
//! - `restore F0 [F1 ..]`: restore the chain (lazily, or `--eager`; `--verify` checks every
//!   page first; the newest file's working set is prefetched unless `--no-prefetch`), check
//!   the whole table, serve stream `--seed` checked against the model, and report the demand
//!   faults the run took;
//! - `inspect F0 [F1 ..]`: header, sections, layer chain and page counts (`--json`).
//!
//! The model of a chain's table is rebuilt from the same arguments: `--keys` filled, then the
//! streams of `--history` (seeds served before each later layer was saved, `--requests` each).
//!
//! Exit status: 0 when every check passed, 1 with the typed error's message otherwise.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use guest_vm::snapshot::{self, inspect, RestoreOptions, SaveOptions, SnapshotError};
use guest_vm::workload::kvstore::{memory_for, KvStore};
use guest_vm::workload::model::TableModel;
use guest_vm::workload::streams::{self, Op, FILL_FIRST};
use guest_vm::{Guest, HostFrames};

use crate::measure::ms;
use crate::Workload;

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Save the key-value store guest (fresh, or restored from --from and run) to a file.
    Save {
        /// The snapshot file to write.
        #[arg(long)]
        out: PathBuf,
        /// Restore this chain (base first) and run it before saving.
        #[arg(long, num_args = 1..)]
        from: Vec<PathBuf>,
        /// Write a diff over the newest file of --from.
        #[arg(long)]
        diff: bool,
        /// Record the working set of a fork serving this stream seed and store it in the file.
        #[arg(long)]
        working_set_seed: Option<u64>,
        #[command(flatten)]
        s: StreamArgs,
        #[command(flatten)]
        w: Workload,
    },
    /// Restore a snapshot chain (base first) and serve a checked request stream.
    Restore {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Read every stored page before the guest runs.
        #[arg(long)]
        eager: bool,
        /// Check every stored page's hash before the guest runs.
        #[arg(long)]
        verify: bool,
        /// Do not prefetch the working set the newest file carries.
        #[arg(long)]
        no_prefetch: bool,
        #[command(flatten)]
        s: StreamArgs,
        #[command(flatten)]
        w: Workload,
    },
    /// Describe a snapshot chain (base first).
    Inspect {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
pub struct StreamArgs {
    /// Seed of the request stream served.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seeds served before the later layers of the chain were saved, in order.
    #[arg(long, value_delimiter = ',')]
    history: Vec<u64>,
}

/// What `save` / `restore` did.
#[derive(serde::Serialize)]
struct Report {
    passed: bool,
    command: &'static str,
    files: Vec<PathBuf>,
    restore_ms: f64,
    serve_ms: f64,
    save_ms: f64,
    requests: u64,
    pages_read: u64,
    /// Pages installed from the file's working set before the guest ran (restore).
    prefetched: u64,
    /// userfaultfd faults (missing + write-protect) the restored guest took while serving.
    demand_faults: u64,
    checksum: u64,
    saved: Option<snapshot::SaveStats>,
}

fn model_of(buckets: u64, keys: u64, history: &[u64], requests: u64) -> TableModel {
    let mut m = TableModel::new(buckets);
    m.fill(FILL_FIRST, keys);
    for &seed in history {
        for op in streams::stream(seed, requests, keys, 1) {
            match op {
                Op::Put { key, value } => {
                    m.put(key, &value);
                }
                Op::Del { key } => {
                    m.delete(key);
                }
                Op::Get { .. } => {}
            }
        }
    }
    m
}

fn sizes(w: &Workload) -> Result<(u64, u64), SnapshotError> {
    Ok(crate::options(1, w, false).validate()?)
}

/// The pages a fork of `kv`'s guest at `state` touches serving stream `seed` (checked against
/// a copy of `model`).
fn record_first_run(
    kv: &KvStore<Guest>,
    state: &guest_vm::VcpuState,
    model: &TableModel,
    seed: u64,
    w: &Workload,
    keys: u64,
) -> Result<vmo::WorkingSet, SnapshotError> {
    let child = kv.inner().fork(state)?;
    child.vmar().set_recording(true);
    let mut ckv = KvStore::resume(child);
    let mut m = model.clone();
    let ops = streams::stream(seed, w.requests, keys, 1);
    streams::serve_checked(&mut ckv, &mut m, &ops, seed)?;
    Ok(ckv.inner().vmar().recorded())
}

fn save(
    out: PathBuf,
    from: Vec<PathBuf>,
    diff: bool,
    ws_seed: Option<u64>,
    s: &StreamArgs,
    w: &Workload,
) -> Result<Report, SnapshotError> {
    let (buckets, keys) = sizes(w)?;
    guest_vm::vmm::check_host()?;
    let mem = memory_for(buckets);
    let frames = HostFrames::new(mem * 2)?;
    let mut r = Report {
        passed: false,
        command: "save",
        files: vec![out.clone()],
        restore_ms: 0.0,
        serve_ms: 0.0,
        save_ms: 0.0,
        requests: 0,
        pages_read: 0,
        prefetched: 0,
        demand_faults: 0,
        checksum: 0,
        saved: None,
    };
    let mut opts = SaveOptions {
        progress: !w.json,
        ..SaveOptions::default()
    };
    let (kv, model) = if from.is_empty() {
        if diff {
            return Err(SnapshotError::Unsupported(
                "--diff needs the chain it is relative to (--from)".into(),
            ));
        }
        let mut kv = KvStore::boot(Guest::new(&frames, mem)?, buckets)?;
        kv.fill(FILL_FIRST, keys)?;
        let model = model_of(buckets, keys, &[], 0);
        r.checksum = streams::check_table(&mut kv, &model, "saved guest")?;
        (kv, model)
    } else {
        let t = Instant::now();
        let restored = snapshot::restore(&frames, &from, RestoreOptions::default())?;
        r.restore_ms = ms(t.elapsed());
        if diff {
            opts.diff_base = restored.chain.layers.last().map(|l| l.identity());
        }
        opts.source = Some(restored.chain.clone());
        let mut kv = KvStore::resume(restored.guest);
        let mut model = model_of(buckets, keys, &s.history, w.requests);
        let ops = streams::stream(s.seed, w.requests, keys, 1);
        let t = Instant::now();
        r.requests = streams::serve_checked(&mut kv, &mut model, &ops, s.seed)?.requests;
        r.serve_ms = ms(t.elapsed());
        r.checksum = streams::check_table(&mut kv, &model, "restored guest")?;
        (kv, model)
    };
    let state = kv.inner().snapshot()?;
    if let Some(seed) = ws_seed {
        opts.working_set = Some(record_first_run(&kv, &state, &model, seed, w, keys)?);
    }
    let t = Instant::now();
    r.saved = Some(snapshot::save(kv.inner(), &state, &out, &opts)?);
    r.save_ms = ms(t.elapsed());
    r.passed = true;
    Ok(r)
}

fn restore(
    files: Vec<PathBuf>,
    opts: RestoreOptions,
    s: &StreamArgs,
    w: &Workload,
) -> Result<Report, SnapshotError> {
    let (buckets, keys) = sizes(w)?;
    guest_vm::vmm::check_host()?;
    // Checks every file before any VM exists.
    let layers = snapshot::open_chain(&files)?;
    let mem = layers[0].layout.mem_size;
    if mem != memory_for(buckets) {
        return Err(SnapshotError::Unsupported(format!(
            "the snapshot holds {} MiB of guest memory; --table-mib {} needs {} MiB",
            mem >> 20,
            w.table_mib,
            memory_for(buckets) >> 20
        )));
    }
    if opts.verify {
        for l in &layers {
            l.verify_pages()?;
        }
    }
    let frames = HostFrames::new(mem * 2)?;
    let t = Instant::now();
    let restored = snapshot::restore::restore_layers(&frames, layers, opts)?;
    let restore_ms = ms(t.elapsed());
    let chain = restored.chain.clone();
    let prefetched = restored.prefetched;
    let before = restored.guest.vm().fault_stats();
    let mut kv = KvStore::resume(restored.guest);
    let mut model = model_of(buckets, keys, &s.history, w.requests);
    let ops = streams::stream(s.seed, w.requests, keys, 1);
    let t = Instant::now();
    let served = streams::serve_checked(&mut kv, &mut model, &ops, s.seed);
    let served = served.map_err(|e| first_failure(&chain, e))?;
    let serve_ms = ms(t.elapsed());
    let after = kv.vm().fault_stats();
    let demand_faults = (after.missing + after.wp) - (before.missing + before.wp);
    let checksum = streams::check_table(&mut kv, &model, "restored guest")
        .map_err(|e| first_failure(&chain, e))?;
    Ok(Report {
        passed: true,
        command: "restore",
        files,
        restore_ms,
        serve_ms,
        save_ms: 0.0,
        requests: served.requests,
        pages_read: chain.pages_read.load(std::sync::atomic::Ordering::Relaxed),
        prefetched,
        demand_faults,
        checksum,
        saved: None,
    })
}

/// The page-read failure that stopped the guest, if one did; else `e`.
fn first_failure(chain: &snapshot::Chain, e: guest_vm::Error) -> SnapshotError {
    chain
        .take_failures()
        .into_iter()
        .next()
        .unwrap_or(SnapshotError::Guest(e))
}

fn print_report(r: &Report, json: bool) -> Result<(), guest_vm::Error> {
    if json {
        return crate::print_json(r);
    }
    match &r.saved {
        Some(st) => println!(
            "saved {} ({}): {} pages stored, {} zero entries, {} working-set pages, {} bytes, \
             identity {}; save {:.1} ms",
            r.files[0].display(),
            if st.diff { "diff" } else { "full" },
            st.data_pages,
            st.zero_pages,
            st.working_set_pages,
            st.bytes,
            st.identity,
            r.save_ms
        ),
        None => println!(
            "restored {} layer(s) in {:.2} ms ({} working-set pages prefetched); served {} \
             requests in {:.1} ms, all matched the model; {} demand faults; {} pages read from \
             the file; checksum {:#018x}",
            r.files.len(),
            r.restore_ms,
            r.prefetched,
            r.requests,
            r.serve_ms,
            r.demand_faults,
            r.pages_read,
            r.checksum
        ),
    }
    Ok(())
}

/// Runs one `snapshot` command; `Ok(false)` after printing a typed snapshot error.
pub fn run(cmd: SnapshotCmd) -> Result<bool, guest_vm::Error> {
    let (result, json) = match cmd {
        SnapshotCmd::Save {
            out,
            from,
            diff,
            working_set_seed,
            s,
            w,
        } => (save(out, from, diff, working_set_seed, &s, &w), w.json),
        SnapshotCmd::Restore {
            files,
            eager,
            verify,
            no_prefetch,
            s,
            w,
        } => {
            let prefetch = if no_prefetch {
                snapshot::Prefetch::Off
            } else {
                snapshot::Prefetch::Recorded
            };
            let opts = RestoreOptions {
                eager,
                verify,
                prefetch,
            };
            (restore(files, opts, &s, &w), w.json)
        }
        SnapshotCmd::Inspect { files, json } => {
            return match inspect::inspect(&files) {
                Ok(r) if json => crate::print_json(&r).map(|_| true),
                Ok(r) => {
                    print!("{}", inspect::render(&r));
                    Ok(true)
                }
                Err(e) => fail(e),
            };
        }
    };
    match result {
        Ok(r) => print_report(&r, json).map(|_| true),
        Err(SnapshotError::Guest(e)) => Err(e),
        Err(e) => fail(e),
    }
}

fn fail(e: SnapshotError) -> Result<bool, guest_vm::Error> {
    eprintln!("guest-vm: error: {e}");
    println!("VERDICT: FAIL — {e}");
    Ok(false)
}
