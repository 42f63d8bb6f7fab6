//! `guest-vm bench`: our paths side by side with the kernel's, in one run, as medians and
//! ratios (absolute times on this nested host mean little; ratios against a baseline measured
//! in the same run do).
//!
//! Rows (ours vs baseline):
//! - fork of a guest with S MiB resident (new VM + vCPU + `Vmar::fork`, state restored) vs
//!   Linux `fork()` of this process holding S MiB resident, and vs a new VM over a
//!   `MAP_PRIVATE` memfd (the Firecracker restore model), for each size; the first fork of
//!   a freshly written guest (`guest-fork-first-{64m,1g}`, one new parent per repetition) and
//!   that parent's next run, which pays the deferred write-protect
//!   (`guest-fork-first-*-parent-resume`), both vs Linux `fork()`;
//! - first-touch guest write fault through uffd + `Vmar::handle_fault`, and the same pass after
//!   `Guest::prefault`, vs the same guest loop over plain anonymous memory (KVM + the kernel's
//!   page fault, no uffd), and with streaming fault-around at its widest (`first-touch-bulk`:
//!   each fault installs up to `MAX_FAULT_AROUND` pages as one run); the first-touch row also vs anonymous memory served by userfaultfd
//!   MISSING + `UFFDIO_COPY` from a handler thread (the post-copy / lazy-restore mechanism);
//! - copy-on-write of a shared frame by a forked guest vs kernel COW of a `MAP_PRIVATE` memfd
//!   page, and vs `memcpy` of 4 KiB;
//! - fork from a warm pool of VM shells (`Guest::fork_from`), p50 / p99 at 1 GiB and flatness
//!   against 64 MiB, and 1,000 held children with their bytes per child, vs new VMs over a
//!   `MAP_PRIVATE` memfd (`pool`);
//! - reset with D dirtied pages vs re-creating the VM from the snapshot (`fork` again);
//! - a second child of a snapshot with the first child's recorded working set prefetched vs
//!   the first child's demand faults (`prefetch`);
//! - restores of the key-value store guest serving requests: demand faults with the working
//!   set stored in the file vs without, and restore + run vs a new VM over `MAP_PRIVATE` of a
//!   raw memory file (`restore`);
//! - the demo's 8 concurrent children: wall time vs process CPU time / CPUs (`fleet`);
//! - snapshot fuzzing: time per input of the LibAFL guest executor (reset per input) vs
//!   LibAFL's fork-per-input and in-process executors on the same target code natively, and vs
//!   AFL++'s `afl-fuzz` in its deferred fork-server mode (`aflpp`; http and warm), the
//!   reset share, two clients vs one, the time to the planted crash (`fuzz`).
//!
//! `--groups` runs a subset (`GROUPS` names them); every row of a group is measured together.
//!
//! Invariant: the guests are dropped between measurements; a failure is an `Err`, never a
//! partial table presented as complete.
//!
//! Children: [`baseline`] (the kernel mechanisms measured beside ours), `prefetch` (the
//! working-set row), `pool` (the shell-pool rows), `reset` (the reset-cycle rows: restore vs drop policy, reset alone vs
//! memcpy, flatness in guest size), `snapshot` (the snapshot-file rows: save vs write, restore
//! flatness, diff-save pause), `restore` (prefetched restore, restore vs private file map),
//! `fleet` (the concurrent-children row), `fuzz` (the fuzzing rows; group `fuzz-crash` for the
//! minutes-long time-to-crash rows), `aflpp` (the fuzz rows' AFL++ baseline) and [`print`] (the table).

use std::time::{Duration, Instant};

use guest_vm::vmm::vcpu_state::VcpuState;
use guest_vm::vmm::x86_64::layout::DATA_GPA;
use guest_vm::vmm::{GuestArgs, VmExit};
use guest_vm::workload::programs;
use guest_vm::{Error, Guest, HostFrames, Result, PAGE_SIZE};

use crate::measure::{median, ratio, us};
use baseline::{self as base, OverlayKind};

mod aflpp;
pub mod baseline;
mod fleet;
mod fuzz;
mod pool;
mod prefetch;
pub mod print;
mod reset;
mod restore;
mod snapshot;

/// The row groups, in run order (`--groups` names a subset).
pub const GROUPS: [&str; 11] = [
    "fork",
    "pool",
    "faults",
    "cow",
    "prefetch",
    "reset",
    "snapshot",
    "restore",
    "fleet",
    "fuzz",
    "fuzz-crash",
];

/// Fault-around window of the streaming row (pages).
const STREAM_WINDOW: u64 = 32;

/// What to measure.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchOptions {
    /// Resident sizes (MiB) of the fork rows.
    pub sizes_mib: Vec<u64>,
    /// Repetitions per measurement (the median is reported).
    pub reps: usize,
    /// Pages per fault / COW pass.
    pub pages: u64,
    /// Dirtied-page counts of the reset rows.
    pub dirty: Vec<u64>,
    /// Row groups to run (`GROUPS`); all when empty.
    pub groups: Vec<String>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            sizes_mib: vec![64, 1024],
            reps: 7,
            pages: 4096,
            dirty: vec![16, 256, 4096],
            groups: Vec::new(),
        }
    }
}

/// One comparison: median of ours, median of the baseline, `ours / baseline`. `id` is stable
/// across versions (the issues and the README name rows by it); times are per unit (page,
/// iteration, fork) as `what` says.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub id: String,
    pub what: String,
    pub ours: String,
    pub ours_us: f64,
    pub baseline: String,
    pub baseline_us: f64,
    pub ratio: f64,
    /// 99th percentile of ours, where the row reports one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ours_p99_us: Option<f64>,
    /// Bytes per child of ours (kernel memory charged to the process + anonymous resident
    /// memory), where the row measures it (`fork-1000`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_child: Option<u64>,
    /// The kernel part of `bytes_per_child`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_bytes_per_child: Option<u64>,
    /// `bytes_per_child` of the baseline's VMs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_bytes_per_child: Option<u64>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub options: BenchOptions,
    pub rows: Vec<Row>,
}

fn row(id: impl Into<String>, what: String, ours: &str, o: f64, baseline: &str, b: f64) -> Row {
    Row {
        id: id.into(),
        what,
        ours: ours.into(),
        ours_us: o,
        baseline: baseline.into(),
        baseline_us: b,
        ratio: ratio(o, b),
        ours_p99_us: None,
        bytes_per_child: None,
        kernel_bytes_per_child: None,
        baseline_bytes_per_child: None,
    }
}

fn progress(msg: &str) {
    eprintln!("[bench] {msg}");
}

impl BenchOptions {
    pub fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(Error::InvalidArgs(s));
        if self.sizes_mib.is_empty() || self.sizes_mib.iter().any(|&s| s == 0 || s > 4096) {
            return bad(format!(
                "sizes must be 1..=4096 MiB, got {:?}",
                self.sizes_mib
            ));
        }
        if self.reps == 0 || self.reps > 1000 {
            return bad(format!("reps must be 1..=1000, got {}", self.reps));
        }
        if self.pages == 0 || self.pages > 262_144 {
            return bad(format!("pages must be 1..=262144, got {}", self.pages));
        }
        if let Some(g) = self.groups.iter().find(|g| !GROUPS.contains(&g.as_str())) {
            return bad(format!(
                "unknown row group `{g}`; groups: {}",
                GROUPS.join(", ")
            ));
        }
        if self.dirty.is_empty() || self.dirty.iter().any(|&d| d == 0 || d > self.pages) {
            return bad(format!(
                "dirty counts must be 1..={} (pages), got {:?}",
                self.pages, self.dirty
            ));
        }
        Ok(())
    }
}

/// Guest memory holding `data` bytes above `DATA_GPA`, rounded to 2 MiB.
fn guest_mem(data: u64) -> u64 {
    (DATA_GPA + data).next_multiple_of(2 << 20)
}

fn loop_args(pages: u64) -> GuestArgs {
    GuestArgs {
        rdi: DATA_GPA,
        rcx: pages,
        rdx: PAGE_SIZE,
        rax: 7,
        ..Default::default()
    }
}

/// A guest loaded with the write loop over `pages` pages (not run yet).
fn write_guest(frames: &HostFrames, pages: u64) -> Result<Guest> {
    let mut g = Guest::new(frames, guest_mem(pages * PAGE_SIZE))?;
    g.vm_mut().load(&programs::write_loop(), loop_args(pages))?;
    Ok(g)
}

fn run_done(g: &mut Guest) -> Result<Duration> {
    let t = Instant::now();
    match g.vm_mut().run()? {
        VmExit::Done(7) => Ok(t.elapsed()),
        other => Err(Error::BadState(format!(
            "bench guest stopped with {other:?}"
        ))),
    }
}

fn per_page(d: Duration, pages: u64) -> f64 {
    us(d) / pages as f64
}

fn fork_rows(o: &BenchOptions, frames: &HostFrames, rows: &mut Vec<Row>) -> Result<()> {
    let kvm = kvm_ioctls::Kvm::new()
        .map_err(|e| Error::KvmUnavailable(format!("cannot open /dev/kvm: {e}")))?;
    for &mib in &o.sizes_mib {
        let size = mib << 20;
        progress(&format!(
            "fork: Linux fork() of a process with {mib} MiB resident"
        ));
        let linux = {
            let _resident = base::resident_anon(size)?;
            let mut s = Vec::new();
            for _ in 0..o.reps {
                s.push(us(base::linux_fork()?));
            }
            median(&s)
        };
        progress(&format!(
            "fork: first forks of {} guests with {mib} MiB written, and their parents' next runs",
            o.reps
        ));
        let (mut first, mut resume, mut ours) = (Vec::new(), Vec::new(), Vec::new());
        let mut state = None;
        for rep in 0..o.reps {
            let (mut g, st) = written_guest(frames, size)?;
            // The first fork write-protects the parent's written extents; the host side of
            // that waits for the parent's next run (`Reservation::seal`).
            let t = Instant::now();
            let child = g.fork(&st)?;
            first.push(us(t.elapsed()));
            let seal = g.vm().reservation().seal_stats();
            if seal.pending_pages < size / PAGE_SIZE || seal.sealed_pages != 0 {
                return Err(Error::BadState(format!(
                    "the first fork of {mib} MiB did not defer the parent's write-protect: {seal:?}"
                )));
            }
            if rep == 0 {
                // Later forks of the same snapshot find nothing writable left to protect.
                for _ in 0..o.reps {
                    let t = Instant::now();
                    let c = g.fork(&st)?;
                    ours.push(us(t.elapsed()));
                    drop(c);
                }
            }
            // The parent runs again (one page written): the deferred write-protect is paid.
            resume.push(us(run_done(&mut g)?));
            drop(child);
            drop(g);
            state = Some(st);
        }
        let state = state.ok_or_else(|| Error::BadState("no fork measured".into()))?;
        let ours = median(&ours);
        progress(&format!(
            "fork: MAP_PRIVATE memfd VM of {mib} MiB (Firecracker model)"
        ));
        let memfd = base::filled_memfd(guest_mem(size))?;
        let mut fc = Vec::new();
        for _ in 0..o.reps {
            let t = Instant::now();
            let vm = base::private_memfd_vm(&kvm, &memfd, guest_mem(size), &state)?;
            fc.push(us(t.elapsed()));
            drop(vm);
        }
        drop(memfd);
        let what = format!("fork, {mib} MiB resident");
        let label = size_label(mib);
        rows.push(row(
            format!("guest-fork-first-{label}"),
            format!("first fork of a guest with {mib} MiB written"),
            "Guest::fork (write-protect deferred to the parent's next run)",
            median(&first),
            "Linux fork()+waitpid",
            linux,
        ));
        rows.push(row(
            format!("guest-fork-first-{label}-parent-resume"),
            format!("the parent's next run after that first fork, {mib} MiB written"),
            "seal (the deferred write-protect) + a 1-page guest run",
            median(&resume),
            "Linux fork()+waitpid",
            linux,
        ));
        rows.push(row(
            format!("fork-{mib}m"),
            what.clone(),
            "guest fork (VM+vCPU+Vmar::fork)",
            ours,
            "Linux fork()+waitpid",
            linux,
        ));
        rows.push(row(
            format!("fork-{mib}m-vs-memfd"),
            what,
            "guest fork (VM+vCPU+Vmar::fork)",
            ours,
            "new VM over MAP_PRIVATE memfd",
            median(&fc),
        ));
    }
    Ok(())
}

/// A guest with `size` bytes above `DATA_GPA` written (committed, installed writable, by
/// `Guest::prefault`), loaded with the 1-page write loop; and its entry state.
fn written_guest(frames: &HostFrames, size: u64) -> Result<(Guest, VcpuState)> {
    let mut g = Guest::new(frames, guest_mem(size))?;
    g.vm_mut().load(&programs::write_loop(), loop_args(1))?;
    g.prefault(DATA_GPA, size, true)?;
    let state = g.snapshot()?;
    Ok((g, state))
}

/// "64m", "1g": the size part of a row id.
fn size_label(mib: u64) -> String {
    if mib.is_multiple_of(1024) {
        format!("{}g", mib / 1024)
    } else {
        format!("{mib}m")
    }
}

fn fault_rows(o: &BenchOptions, frames: &HostFrames, rows: &mut Vec<Row>) -> Result<()> {
    let n = o.pages;
    progress(&format!(
        "faults: {n} first-touch guest writes (ours, fault-around, prefault, kernel, UFFDIO_COPY)"
    ));
    let (mut uffd, mut pre, mut kernel) = (Vec::new(), Vec::new(), Vec::new());
    let (mut around, mut copy, mut bulk) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..o.reps {
        let mut g = write_guest(frames, n)?;
        uffd.push(per_page(run_done(&mut g)?, n));
        drop(g);
        let mut g = write_guest(frames, n)?;
        g.set_stream_fault_around(STREAM_WINDOW);
        around.push(per_page(run_done(&mut g)?, n));
        drop(g);
        let mut g = write_guest(frames, n)?;
        g.set_stream_fault_around(vmo::MAX_FAULT_AROUND);
        bulk.push(per_page(run_done(&mut g)?, n));
        drop(g);
        let mut g = write_guest(frames, n)?;
        let t = Instant::now();
        g.prefault(DATA_GPA, n * PAGE_SIZE, true)?;
        let p = t.elapsed();
        pre.push(per_page(p + run_done(&mut g)?, n));
        drop(g);
        let mut g = write_guest(frames, n)?;
        base::overlay(&g, DATA_GPA, n * PAGE_SIZE, OverlayKind::Anonymous)?;
        kernel.push(per_page(run_done(&mut g)?, n));
        drop(g);
        let mut g = write_guest(frames, n)?;
        let server = base::uffd_copy_overlay(&g, DATA_GPA, n * PAGE_SIZE)?;
        let pass = run_done(&mut g)?;
        let copies = server.finish()?;
        if copies != n {
            return Err(Error::BadState(format!(
                "UFFDIO_COPY pass copied {copies} of {n} pages"
            )));
        }
        copy.push(per_page(pass, n));
        drop(g);
    }
    let k = median(&kernel);
    let ours = median(&uffd);
    rows.push(row(
        "first-touch",
        "first-touch fault, per page".into(),
        "uffd MISSING -> Vmar::handle_fault -> mmap",
        ours,
        "KVM + kernel anon fault (no uffd)",
        k,
    ));
    rows.push(row(
        "first-touch-vs-uffd-copy",
        "first-touch fault, per page".into(),
        "uffd MISSING -> Vmar::handle_fault -> mmap",
        ours,
        "uffd MISSING + UFFDIO_COPY (anon slot, handler thread)",
        median(&copy),
    ));
    rows.push(row(
        "first-touch-stream",
        format!("first-touch, streaming fault-around {STREAM_WINDOW}, per page"),
        "uffd fault + Vmar commits the next pages",
        median(&around),
        "KVM + kernel anon fault (no uffd)",
        k,
    ));
    rows.push(row(
        "first-touch-bulk",
        format!(
            "first-touch, bulk streaming fault-around {}, per page",
            vmo::MAX_FAULT_AROUND
        ),
        "uffd fault + one mmap(MAP_POPULATE) per run",
        median(&bulk),
        "KVM + kernel anon fault (no uffd)",
        k,
    ));
    rows.push(row(
        "first-touch-prefault",
        "first-touch, VMM prefault, per page".into(),
        "Guest::prefault + guest pass",
        median(&pre),
        "KVM + kernel anon fault (no uffd)",
        k,
    ));
    Ok(())
}

fn cow_rows(o: &BenchOptions, frames: &HostFrames, rows: &mut Vec<Row>) -> Result<()> {
    let n = o.pages;
    progress(&format!(
        "copy-on-write: {n} pages written by a forked guest"
    ));
    let mut parent = write_guest(frames, n)?;
    let entry = parent.snapshot()?;
    run_done(&mut parent)?;
    let (mut ours, mut kernel) = (Vec::new(), Vec::new());
    for _ in 0..o.reps {
        let mut child = parent.fork(&entry)?;
        ours.push(per_page(run_done(&mut child)?, n));
        let copies = child.vmar().fault_stats().copies;
        if copies < n {
            return Err(Error::BadState(format!(
                "COW pass copied {copies} of {n} pages"
            )));
        }
        drop(child);
        let mut g = write_guest(frames, n)?;
        let _memfd = base::overlay(&g, DATA_GPA, n * PAGE_SIZE, OverlayKind::PrivateMemfd)?;
        kernel.push(per_page(run_done(&mut g)?, n));
        drop(g);
    }
    let copy = us(base::memcpy_4k(100_000));
    let ours = median(&ours);
    rows.push(row(
        "cow",
        "COW of a shared page, per page".into(),
        "guest write -> uffd -> Vmar copy -> mmap",
        ours,
        "KVM + kernel COW of MAP_PRIVATE memfd",
        median(&kernel),
    ));
    rows.push(row(
        "cow-vs-memcpy",
        "COW of a shared page, per page".into(),
        "guest write -> uffd -> Vmar copy -> mmap",
        ours,
        "memcpy 4 KiB",
        copy,
    ));

    progress("reset vs re-creating the VM");
    let mut child = parent.fork(&entry)?;
    for &d in &o.dirty {
        let (mut reset, mut recreate) = (Vec::new(), Vec::new());
        for _ in 0..o.reps {
            // The same dirty state twice: once undone by reset, once by dropping the VM and
            // forking a new one from the snapshot.
            dirty_run(&mut child, d)?;
            let t = Instant::now();
            let dropped = child.reset(&entry)?;
            reset.push(us(t.elapsed()));
            if dropped < d {
                return Err(Error::BadState(format!(
                    "reset dropped {dropped} of {d} pages"
                )));
            }
            dirty_run(&mut child, d)?;
            let t = Instant::now();
            drop(child);
            child = parent.fork(&entry)?;
            recreate.push(us(t.elapsed()));
        }
        rows.push(row(
            format!("reset-{d}-vs-refork"),
            format!("reset, {d} dirtied pages"),
            "Guest::reset (restore policy)",
            median(&reset),
            "drop VM + fork a new one",
            median(&recreate),
        ));
    }
    Ok(())
}

/// Runs the write loop of a guest at its entry state over its first `d` pages.
fn dirty_run(child: &mut Guest, d: u64) -> Result<()> {
    dirty_run_strided(child, d, 1)
}

/// Runs the write loop of a guest at its entry state over `d` pages `stride` pages apart.
fn dirty_run_strided(child: &mut Guest, d: u64, stride: u64) -> Result<()> {
    let vcpu = child.vm_mut().vcpu()?;
    let mut regs = vcpu.get_regs().map_err(|err| Error::Kvm {
        what: "KVM_GET_REGS",
        err,
    })?;
    regs.rcx = d;
    regs.rdx = stride * PAGE_SIZE;
    vcpu.set_regs(&regs).map_err(|err| Error::Kvm {
        what: "KVM_SET_REGS",
        err,
    })?;
    run_done(child).map(drop)
}

/// Runs every measurement; see the module documentation.
pub fn run(o: &BenchOptions) -> Result<BenchReport> {
    o.validate()?;
    guest_vm::vmm::check_host()?;
    let on = |g: &str| o.groups.is_empty() || o.groups.iter().any(|x| x == g);
    let mut biggest = o.sizes_mib.iter().copied().max().unwrap_or(64) << 20;
    if on("pool") {
        // The pool rows fork a 1 GiB parent whatever `--sizes` says.
        biggest = biggest.max(1 << 30);
    }
    let frames = HostFrames::new(guest_mem(biggest).max(guest_mem(o.pages * PAGE_SIZE)) * 4)?;
    let mut rows = Vec::new();
    type Group = fn(&BenchOptions, &HostFrames, &mut Vec<Row>) -> Result<()>;
    let groups: [Group; 11] = [
        fork_rows,
        pool::pool_rows,
        fault_rows,
        cow_rows,
        prefetch::prefetch_rows,
        reset::reset_rows,
        snapshot::snapshot_rows,
        restore::restore_rows,
        fleet::fleet_rows,
        fuzz::fuzz_rows,
        fuzz::fuzz_crash_rows,
    ];
    for (name, group) in GROUPS.iter().zip(groups) {
        if on(name) {
            group(o, &frames, &mut rows)?;
        }
    }
    Ok(BenchReport {
        options: o.clone(),
        rows,
    })
}
