//! The `guest-vm demo` / `guest-vm fork` job: boot the key-value store guest, build a
//! several-MiB table, snapshot the running guest, fork N children that serve different request
//! streams concurrently (each its own VM and vCPU thread), verify isolation against a model,
//! reset the children to the snapshot and run one again, and collect a `DemoReport`.
//!
//! Checks (each becomes a line of the report; any failure fails the verdict):
//! - every child answers its own stream exactly as the model of "snapshot + its own writes"
//!   says, probes of keys its siblings insert are absent, and its whole-table checksum equals
//!   the model's;
//! - the parent's table is unchanged (checksum, count, sibling keys absent);
//! - each child's private frames (commits + copies) are the table pages it wrote plus at most
//!   `EXTRA_PAGES_MAX` named pages (the mailbox page, its stack page, and the guest page-table
//!   pages whose accessed/dirty bits KVM's shadow MMU sets), and they add up to the pool's
//!   live-frame growth exactly;
//! - a reset child holds the snapshot again (checksum), runs a new stream correctly, and
//!   every frame returns to the pool when all guests are dropped;
//! - save → restore → fork (`demo_snapshot`): the parent saved to a file and restored serves
//!   its checked stream, and a fork of the restored guest is isolated from it.
//!
//! Invariants: the parent is stopped while forking and while the children run; runtime errors
//! (KVM, memory) are `Err`, failed checks are a report with `passed == false`.

use std::time::Instant;

use guest_vm::vmm::x86_64::layout::DATA_GPA;
use guest_vm::workload::fleet::{self, GuestMemory, RunOutcome};
use guest_vm::workload::kvstore::{memory_for, KvStore, BUCKET_SIZE, EXTRA_PAGES_MAX};
use guest_vm::workload::model::TableModel;
use guest_vm::workload::streams::{self, FILL_FIRST};
use guest_vm::{Error, Guest, HostFrames, Result, PAGE_SIZE};
use vmo::ResetPolicy;

use crate::measure::{median, ms};

/// Most children a demo forks.
pub const MAX_CHILDREN: usize = 64;
/// Largest table (MiB).
pub const MAX_TABLE_MIB: u64 = 4096;
/// What to run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoOptions {
    pub children: usize,
    /// Table size in MiB (a power of two).
    pub table_mib: u64,
    /// Keys the parent inserts before the snapshot (0 = 60 % of the buckets).
    pub keys: u64,
    /// Requests per child.
    pub requests: u64,
    /// Reset the children and run one again.
    pub reset: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            children: 4,
            table_mib: 8,
            keys: 0,
            requests: 1000,
            reset: true,
        }
    }
}

impl DemoOptions {
    /// Buckets and keys after validation; bad values are `InvalidArgs` with the reason.
    pub fn validate(&self) -> Result<(u64, u64)> {
        if self.children == 0 || self.children > MAX_CHILDREN {
            return Err(Error::InvalidArgs(format!(
                "children must be 1..={MAX_CHILDREN}, got {}",
                self.children
            )));
        }
        if self.table_mib == 0
            || self.table_mib > MAX_TABLE_MIB
            || !self.table_mib.is_power_of_two()
        {
            return Err(Error::InvalidArgs(format!(
                "table size must be a power of two between 1 and {MAX_TABLE_MIB} MiB, got {}",
                self.table_mib
            )));
        }
        let buckets = (self.table_mib << 20) / BUCKET_SIZE;
        let keys = if self.keys == 0 {
            buckets * 6 / 10
        } else {
            self.keys
        };
        if keys > buckets * 9 / 10 {
            return Err(Error::InvalidArgs(format!(
                "{keys} keys overfill a table of {buckets} buckets (at most 90 %)"
            )));
        }
        if self.requests == 0 || self.requests > 10_000_000 {
            return Err(Error::InvalidArgs(format!(
                "requests per child must be 1..=10000000, got {}",
                self.requests
            )));
        }
        Ok((buckets, keys))
    }
}

/// One verification.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// One child's line of the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChildReport {
    pub index: usize,
    pub fork_ms: f64,
    pub run: Option<RunOutcome>,
    pub error: Option<String>,
    pub memory: GuestMemory,
    /// Table pages the child's stream wrote (from the model).
    pub table_pages_written: u64,
    pub resident_kib: u64,
    pub reset_ms: Option<f64>,
    /// Pages the (restore-policy) reset copied the snapshot's bytes back into, keeping them.
    pub reset_restored_pages: Option<u64>,
    /// Pages the reset returned to the snapshot's frame (or dropped).
    pub reset_dropped_pages: Option<u64>,
}

/// Everything the demo measured and checked.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoReport {
    pub options: DemoOptions,
    pub buckets: u64,
    pub keys: u64,
    pub guest_mib: u64,
    pub boot_ms: f64,
    pub prefault_ms: f64,
    pub prefault_pages: u64,
    pub fill_ms: f64,
    pub parent_memory: GuestMemory,
    pub snapshot_checksum: u64,
    pub snapshot_ms: f64,
    pub fork_ms_median: f64,
    pub concurrent_run_ms: f64,
    pub children: Vec<ChildReport>,
    pub reset_ms_median: Option<f64>,
    pub rerun: Option<RunOutcome>,
    pub frames_live_at_snapshot: u64,
    pub frames_live_after_children: u64,
    pub memfd_resident_kib_at_snapshot: u64,
    pub memfd_resident_kib_after_children: u64,
    pub frames_live_at_teardown: u64,
    /// The save → restore → fork section (absent if it could not run; a check says why).
    pub snapshot_file: Option<crate::demo_snapshot::SnapshotSection>,
    /// The virtio device's DMA summary, when the crate provides one.
    pub dma: Option<String>,
    pub checks: Vec<Check>,
    pub passed: bool,
}

pub(crate) fn check(checks: &mut Vec<Check>, name: &str, passed: bool, detail: String) {
    if !passed {
        tracing::error!(name, %detail, "check failed");
    }
    checks.push(Check {
        name: name.into(),
        passed,
        detail,
    });
}

/// Progress lines for slow steps (stderr, so `--json` output stays clean).
pub(crate) fn progress(msg: &str) {
    eprintln!("[demo] {msg}");
}

/// Runs the demo; see the module documentation.
pub fn run(opts: &DemoOptions) -> Result<DemoReport> {
    let (buckets, keys) = opts.validate()?;
    guest_vm::vmm::check_host()?;
    let mem = memory_for(buckets);
    let frames = HostFrames::new(mem * (opts.children as u64 + 2))?;
    let mut checks = Vec::new();

    progress(&format!(
        "booting the key-value store guest ({} MiB RAM, {} MiB table)",
        mem >> 20,
        opts.table_mib
    ));
    let t = Instant::now();
    let guest = Guest::new(&frames, mem)?;
    let mut parent = KvStore::boot(guest, buckets)?;
    let boot_ms = ms(t.elapsed());
    let t = Instant::now();
    let prefault_pages = parent
        .inner()
        .prefault(DATA_GPA, buckets * BUCKET_SIZE, true)?;
    let prefault_ms = ms(t.elapsed());
    progress(&format!("filling {keys} keys"));
    let t = Instant::now();
    let live = parent.fill(FILL_FIRST, keys)?;
    let fill_ms = ms(t.elapsed());
    let mut model = TableModel::new(buckets);
    model.fill(FILL_FIRST, keys);
    model.clear_written();
    let base_sum = streams::check_table(&mut parent, &model, "parent before snapshot")?;
    check(
        &mut checks,
        "parent table built",
        live == model.count(),
        format!("{live} keys, checksum {base_sum:#018x}"),
    );
    let parent_memory = fleet::guest_memory(parent.inner());

    let t = Instant::now();
    let state = parent.inner().snapshot()?;
    let snapshot_ms = ms(t.elapsed());
    let frames_live_at_snapshot = frames.pool.stats().live;
    let memfd_at_snapshot = frames.alloc.resident_bytes()? / 1024;

    progress(&format!("forking {} children", opts.children));
    let mut children = fleet::fork_children(parent.inner(), &state, &model, opts.children)?;
    let fork_ms: Vec<f64> = children.iter().map(|c| ms(c.fork_time)).collect();
    progress(&format!(
        "running {} children concurrently, {} requests each",
        opts.children, opts.requests
    ));
    let (results, wall) = fleet::run_concurrently(&mut children, opts.requests, keys);
    let frames_live_after = frames.pool.stats().live;
    let memfd_after = frames.alloc.resident_bytes()? / 1024;

    let mut reports = Vec::new();
    let mut private_sum = 0;
    for (child, result) in children.iter().zip(&results) {
        let memory = fleet::guest_memory(child.kv.inner());
        private_sum += memory.private_frames;
        let written = child.model.written_pages().len() as u64;
        let (run, error) = match result {
            Ok(r) => (Some(r.clone()), None),
            Err(e) => (None, Some(e.to_string())),
        };
        check(
            &mut checks,
            &format!("child {} isolation", child.index),
            run.is_some(),
            match (&run, &error) {
                (Some(r), _) => format!(
                    "{} requests matched the model ({} sibling keys absent), checksum {:#018x}",
                    r.counts.requests, r.counts.peer_probes, r.checksum
                ),
                (_, Some(e)) => e.clone(),
                _ => String::new(),
            },
        );
        check(
            &mut checks,
            &format!("child {} resident = its writes", child.index),
            memory.private_frames >= written && memory.private_frames <= written + EXTRA_PAGES_MAX,
            format!(
                "{} private frames for {written} table pages written (+ at most \
                 {EXTRA_PAGES_MAX} mailbox/stack/page-table pages)",
                memory.private_frames
            ),
        );
        reports.push(ChildReport {
            index: child.index,
            fork_ms: ms(child.fork_time),
            run,
            error,
            memory,
            table_pages_written: written,
            resident_kib: memory.private_frames * PAGE_SIZE / 1024,
            reset_ms: None,
            reset_restored_pages: None,
            reset_dropped_pages: None,
        });
    }
    check(
        &mut checks,
        "frame accounting",
        frames_live_after - frames_live_at_snapshot == private_sum,
        format!(
            "pool grew by {} frames = sum of the children's private frames {private_sum}",
            frames_live_after - frames_live_at_snapshot
        ),
    );

    // The parent is unchanged by its children.
    let parent_sum = parent.checksum()?;
    let mut sibling_keys_absent = true;
    for c in 0..opts.children as u64 {
        sibling_keys_absent &= parent.get(streams::own_key(c, 1))?.is_none();
    }
    check(
        &mut checks,
        "parent unchanged",
        parent_sum == base_sum && parent.count()? == model.count() && sibling_keys_absent,
        format!("checksum {parent_sum:#018x}, children's keys absent: {sibling_keys_absent}"),
    );

    let mut reset_ms = Vec::new();
    let mut rerun = None;
    if opts.reset {
        progress("resetting every child to the snapshot (restore policy: copy back, keep frames)");
        let mut first_written = Default::default();
        for (child, report) in children.iter_mut().zip(reports.iter_mut()) {
            let t = Instant::now();
            let stats = child
                .kv
                .inner_mut()
                .reset_with(&state, ResetPolicy::Restore)?;
            let dt = ms(t.elapsed());
            reset_ms.push(dt);
            report.reset_ms = Some(dt);
            report.reset_restored_pages = Some(stats.restored);
            report.reset_dropped_pages = Some(stats.dropped);
            if child.index == 0 {
                first_written = child.model.written_pages().clone();
            }
            child.model = model.clone();
            let sum = child.kv.checksum()?;
            check(
                &mut checks,
                &format!("child {} reset", child.index),
                sum == base_sum,
                format!(
                    "{} pages copied back, {} dropped in {dt:.2} ms; checksum back to the \
                     snapshot's",
                    stats.restored, stats.dropped
                ),
            );
        }
        if let Some(first) = children.first_mut() {
            first.seed = opts.children as u64 + 100;
            let ops = streams::stream(first.seed, opts.requests, keys, opts.children as u64);
            let r = fleet::run_child(first, &ops);
            // Restore kept the first run's frames: the rerun copies only pages it writes that
            // the first run did not, so the child's private frames are the union of both runs'
            // table pages plus the named extra pages (drop would copy the overlap again).
            let memory = fleet::guest_memory(first.kv.inner());
            let union = first_written.union(first.model.written_pages()).count() as u64;
            check(
                &mut checks,
                "reset child = snapshot + its own writes",
                memory.private_frames >= union && memory.private_frames <= union + EXTRA_PAGES_MAX,
                format!(
                    "{} private frames after reset + rerun for {union} table pages written by \
                     the two runs (+ at most {EXTRA_PAGES_MAX} mailbox/stack/page-table pages)",
                    memory.private_frames
                ),
            );
            check(
                &mut checks,
                "reset child runs again",
                r.is_ok(),
                match &r {
                    Ok(o) => format!(
                        "{} new requests matched the model, checksum {:#018x}",
                        o.counts.requests, o.checksum
                    ),
                    Err(e) => e.to_string(),
                },
            );
            rerun = r.ok();
        }
    }

    progress("tearing down");
    // A child that failed its run may not finish cleanly; dropping it is the teardown either way.
    for child in children {
        drop(child.kv.finish());
    }
    // The parent ran read-only requests since the snapshot: save it as it stands now.
    let snapshot_file = match parent.inner().snapshot().and_then(|now| {
        crate::demo_snapshot::run(
            &frames,
            &parent,
            &now,
            &model,
            keys,
            opts.requests,
            &mut checks,
        )
    }) {
        Ok(s) => Some(s),
        Err(e) => {
            check(&mut checks, "save -> restore -> fork", false, e.to_string());
            None
        }
    };
    drop(parent.finish());
    let frames_live_at_teardown = frames.pool.stats().live;
    check(
        &mut checks,
        "teardown",
        frames_live_at_teardown == 0,
        format!("{frames_live_at_teardown} frames live after every guest was dropped"),
    );
    let dma = dma_section(&frames, &mut checks);
    let passed = checks.iter().all(|c| c.passed);
    Ok(DemoReport {
        options: opts.clone(),
        buckets,
        keys,
        guest_mib: mem >> 20,
        boot_ms,
        prefault_ms,
        prefault_pages,
        fill_ms,
        parent_memory,
        snapshot_checksum: base_sum,
        snapshot_ms,
        fork_ms_median: median(&fork_ms),
        concurrent_run_ms: ms(wall),
        children: reports,
        reset_ms_median: (!reset_ms.is_empty()).then(|| median(&reset_ms)),
        rerun,
        frames_live_at_snapshot,
        frames_live_after_children: frames_live_after,
        memfd_resident_kib_at_snapshot: memfd_at_snapshot,
        memfd_resident_kib_after_children: memfd_after,
        frames_live_at_teardown,
        snapshot_file,
        dma,
        checks,
        passed,
    })
}

/// The `dma` section: the virtio-blk device's secure-DMA run (`virtio::demo_report`: regions
/// assigned, requests served, malicious requests refused) on its own address space over the
/// same frame pool, with a check that every attack was contained.
fn dma_section(frames: &HostFrames, checks: &mut Vec<Check>) -> Option<String> {
    progress("virtio-blk device over a DMA domain");
    match guest_vm::virtio::demo_report(frames) {
        Ok(r) => {
            let contained = r.contained() == r.attacks.len();
            check(
                checks,
                "dma (virtio-blk behind a DmaDomain)",
                r.data_verified && contained && r.bytes_written_outside() == 0,
                format!(
                    "{} regions, {} requests served, {} refused, {}/{} attacks contained, {} \
                     bytes written outside the regions",
                    r.regions.len(),
                    r.served,
                    r.refused,
                    r.contained(),
                    r.attacks.len(),
                    r.bytes_written_outside()
                ),
            );
            Some(r.to_string())
        }
        Err(e) => {
            check(
                checks,
                "dma (virtio-blk behind a DmaDomain)",
                false,
                e.to_string(),
            );
            None
        }
    }
}
