//! The pool rows (`--groups pool`): forks into VM shells a `ShellPool` built ahead, against new
//! VMs over a `MAP_PRIVATE` memfd (the Firecracker restore model) in the same run.
//!
//! - `guest-fork-p50` / `guest-fork-p99`: `Guest::fork_from` a warm pool (full before every
//!   sample, so its refill thread is idle while the fork is timed) of a 1 GiB all-resident
//!   parent, p50 and p99 of `POOL_SAMPLES` forks, vs p50 / p99 of as many memfd VMs;
//!   `guest-fork-1g-vs-64m`: p50 at 1 GiB ÷ p50 at 64 MiB;
//! - `fork-1000`: `FLEET` children of one 64 MiB snapshot forked and held (not run) from a
//!   pool holding `FLEET` shells built beforehand (refill off), total time, vs `FLEET` held
//!   memfd VMs; the row carries bytes per child — this process's kernel memory (its memory
//!   cgroup's kernel charge: KVM's VM, vCPU and memslot arrays, VMAs, page tables, thread
//!   stacks; machine-wide `/proc/meminfo` counters where no cgroup reports it) plus its
//!   anonymous resident memory (heap, thread stacks), both measured from before the pool
//!   exists to the held children, over `FLEET`;
//! - `fork-1000-refill`: the same `FLEET` forks from a pool of `REFILL_POOL` refilled in the
//!   background while they run (end-to-end: the shells' build is inside the total).
//!
//! Invariant: every guest, VM and pool is dropped before the next measurement.

use std::time::{Duration, Instant};

use guest_vm::guest::ShellPool;
use guest_vm::vmm::x86_64::layout::DATA_GPA;
use guest_vm::workload::programs;
use guest_vm::{Error, Guest, HostFrames, Result, VcpuState};

use super::{base, guest_mem, loop_args, progress, row, BenchOptions, Row};
use crate::measure::{median, percentile, us};

/// Forks per size for the p50 / p99 rows.
const POOL_SAMPLES: usize = 200;
/// Children of the `fork-1000` rows.
const FLEET: usize = 1000;
/// Pool size of the percentile rows and of `fork-1000-refill`.
const REFILL_POOL: usize = 8;
const SMALL: u64 = 64 << 20;
const BIG: u64 = 1 << 30;

/// This process's memory: kernel bytes charged to it (if any counter reports them) and
/// anonymous resident bytes.
#[derive(Clone, Copy, Debug)]
struct ProcMemory {
    kernel: u64,
    anon: u64,
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// `key value [kB]` lines: the value of `key`, in bytes when the line says kB.
fn field(text: &str, key: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(key))?;
    let mut it = line.split_whitespace().skip(1);
    let v: u64 = it.next()?.parse().ok()?;
    Some(if it.next() == Some("kB") { v * 1024 } else { v })
}

/// Kernel memory charged to this process's memory cgroup (v2 `memory.stat` `kernel`, v1
/// `memory.kmem.usage_in_bytes`), else the machine's unreclaimable slab + vmalloc + kernel
/// stacks + page tables.
fn kernel_bytes() -> Option<u64> {
    let cg = read("/proc/self/cgroup")?;
    for line in cg.lines() {
        let mut p = line.splitn(3, ':');
        let (_, ctrl, path) = (p.next()?, p.next()?, p.next()?);
        if ctrl.is_empty() {
            if let Some(v) =
                read(&format!("/sys/fs/cgroup{path}/memory.stat")).and_then(|s| field(&s, "kernel"))
            {
                return Some(v);
            }
        } else if ctrl.split(',').any(|c| c == "memory") {
            if let Some(v) = read(&format!(
                "/sys/fs/cgroup/memory{path}/memory.kmem.usage_in_bytes"
            ))
            .and_then(|s| s.trim().parse().ok())
            {
                return Some(v);
            }
        }
    }
    let m = read("/proc/meminfo")?;
    Some(
        ["SUnreclaim:", "VmallocUsed:", "KernelStack:", "PageTables:"]
            .iter()
            .filter_map(|k| field(&m, k))
            .sum(),
    )
}

fn proc_memory() -> Result<ProcMemory> {
    let status = read("/proc/self/status")
        .ok_or_else(|| Error::BadState("cannot read /proc/self/status".into()))?;
    Ok(ProcMemory {
        kernel: kernel_bytes()
            .ok_or_else(|| Error::BadState("no kernel memory counter readable".into()))?,
        anon: field(&status, "RssAnon:").unwrap_or(0),
    })
}

/// Bytes per item between `a` and `b` (kernel, total), over `n` items.
fn per_item(a: ProcMemory, b: ProcMemory, n: usize) -> (u64, u64) {
    let k = b.kernel.saturating_sub(a.kernel) / n as u64;
    let u = b.anon.saturating_sub(a.anon) / n as u64;
    (k, k + u)
}

/// A stopped parent of `size` bytes of guest data, every page written and forked once (the
/// first fork's write-protect is not what these rows measure), and its state.
fn parent(frames: &HostFrames, size: u64) -> Result<(Guest, VcpuState)> {
    let mut g = Guest::new(frames, guest_mem(size))?;
    g.vm_mut().load(&programs::write_loop(), loop_args(1))?;
    g.prefault(DATA_GPA, size, true)?;
    let state = g.snapshot()?;
    drop(g.fork(&state)?);
    Ok((g, state))
}

/// p50 and p99 of `POOL_SAMPLES` warm-pool forks and of as many memfd VMs, at `size`.
fn percentiles(frames: &HostFrames, size: u64) -> Result<[f64; 4]> {
    let kvm = kvm_ioctls::Kvm::new()
        .map_err(|e| Error::KvmUnavailable(format!("cannot open /dev/kvm: {e}")))?;
    let (parent, state) = parent(frames, size)?;
    let pool = ShellPool::new(REFILL_POOL, parent.mem_size())?;
    let mut ours = Vec::with_capacity(POOL_SAMPLES);
    for _ in 0..POOL_SAMPLES {
        pool.wait_full(Duration::from_secs(30));
        let t = Instant::now();
        let child = parent.fork_from(&pool, &state)?;
        ours.push(us(t.elapsed()));
        drop(child);
    }
    let misses = pool.stats().misses;
    drop(pool);
    let memfd = base::filled_memfd(parent.mem_size())?;
    let mut fc = Vec::with_capacity(POOL_SAMPLES);
    for _ in 0..POOL_SAMPLES {
        let t = Instant::now();
        let vm = base::private_memfd_vm(&kvm, &memfd, parent.mem_size(), &state)?;
        fc.push(us(t.elapsed()));
        drop(vm);
    }
    let top = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| b.total_cmp(a));
        v.iter()
            .take(4)
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    progress(&format!(
        "pool: {} MiB: ours p50 {:.1} us p99 {:.1} us (largest {} us; {misses} misses), memfd VM \
         p50 {:.1} us p99 {:.1} us (largest {} us)",
        size >> 20,
        median(&ours),
        percentile(&ours, 0.99),
        top(&ours),
        median(&fc),
        percentile(&fc, 0.99),
        top(&fc)
    ));
    Ok([
        median(&ours),
        percentile(&ours, 0.99),
        median(&fc),
        percentile(&fc, 0.99),
    ])
}

pub(super) fn pool_rows(o: &BenchOptions, frames: &HostFrames, rows: &mut Vec<Row>) -> Result<()> {
    let _ = o;
    if frames.alloc.capacity() < guest_mem(BIG) + guest_mem(SMALL) {
        return Err(Error::InvalidArgs(format!(
            "the pool rows need frames for a 1 GiB parent; the bench pool has {} MiB",
            frames.alloc.capacity() >> 20
        )));
    }
    // `FLEET` shells (8 fds each) and `FLEET` memfd VMs are held at once at most.
    let want = (FLEET * 8 + 512) as u64;
    let nofile = guest_vm::sys::limits::raise_nofile(want)?;
    if nofile < want {
        return Err(Error::InvalidArgs(format!(
            "the pool rows hold {FLEET} guests (8 fds each): RLIMIT_NOFILE {nofile} < {want}"
        )));
    }
    progress(&format!(
        "pool: {POOL_SAMPLES} warm-pool forks vs memfd VMs at 64 MiB and 1 GiB"
    ));
    let small = percentiles(frames, SMALL)?;
    let big = percentiles(frames, BIG)?;
    let what = "fork from a warm pool, 1024 MiB resident".to_string();
    let ours = "Guest::fork_from (shell ready: Vmar::fork + attach + restore)";
    let basel = "new VM over MAP_PRIVATE memfd";
    rows.push(row(
        "guest-fork-p50",
        what.clone() + ", p50",
        ours,
        big[0],
        basel,
        big[2],
    ));
    let mut p99 = row(
        "guest-fork-p99",
        what + ", p99",
        ours,
        big[1],
        basel,
        big[3],
    );
    p99.ours_p99_us = Some(big[1]);
    rows.push(p99);
    rows.push(row(
        "guest-fork-1g-vs-64m",
        "fork from a warm pool, p50, 1024 MiB vs 64 MiB resident".into(),
        "1024 MiB parent",
        big[0],
        "64 MiB parent",
        small[0],
    ));
    fleet_rows(frames, rows)
}

/// `fork-1000` and `fork-1000-refill` (module doc).
fn fleet_rows(frames: &HostFrames, rows: &mut Vec<Row>) -> Result<()> {
    let kvm = kvm_ioctls::Kvm::new()
        .map_err(|e| Error::KvmUnavailable(format!("cannot open /dev/kvm: {e}")))?;
    let (parent, state) = parent(frames, SMALL)?;
    let mem = parent.mem_size();

    progress(&format!(
        "pool: {FLEET} children held, pool of {FLEET} built ahead"
    ));
    let before = proc_memory()?;
    let t = Instant::now();
    let pool = ShellPool::new(FLEET, mem)?;
    pool.wait_full(Duration::from_secs(600));
    let built = t.elapsed();
    pool.set_refill(false);
    let t = Instant::now();
    let mut children = Vec::with_capacity(FLEET);
    for _ in 0..FLEET {
        children.push(parent.fork_from(&pool, &state)?);
    }
    let ours = us(t.elapsed());
    let misses = pool.stats().misses;
    let held = proc_memory()?;
    drop(children);
    drop(pool);
    let (kernel, bytes) = per_item(before, held, FLEET);

    let memfd = base::filled_memfd(mem)?;
    let before = proc_memory()?;
    let t = Instant::now();
    let mut vms = Vec::with_capacity(FLEET);
    for _ in 0..FLEET {
        vms.push(base::private_memfd_vm(&kvm, &memfd, mem, &state)?);
    }
    let fc = us(t.elapsed());
    let held = proc_memory()?;
    drop(vms);
    let (fc_kernel, fc_bytes) = per_item(before, held, FLEET);
    drop(memfd);
    progress(&format!(
        "pool: {FLEET} forks {:.1} ms ({misses} misses; the pool took {:.1} ms to build), \
         {bytes} B per child ({kernel} kernel); {FLEET} memfd VMs {:.1} ms, {fc_bytes} B per VM \
         ({fc_kernel} kernel)",
        ours / 1e3,
        built.as_secs_f64() * 1e3,
        fc / 1e3
    ));
    let mut r = row(
        "fork-1000",
        format!("{FLEET} children of a 64 MiB snapshot, held, total"),
        "Guest::fork_from a pool built ahead",
        ours,
        "new VMs over MAP_PRIVATE memfd",
        fc,
    );
    r.bytes_per_child = Some(bytes);
    r.kernel_bytes_per_child = Some(kernel);
    r.baseline_bytes_per_child = Some(fc_bytes);
    rows.push(r);

    progress(&format!(
        "pool: {FLEET} children held, pool of {REFILL_POOL} refilled meanwhile"
    ));
    let pool = ShellPool::new(REFILL_POOL, mem)?;
    pool.wait_full(Duration::from_secs(30));
    let t = Instant::now();
    let mut children = Vec::with_capacity(FLEET);
    for _ in 0..FLEET {
        children.push(parent.fork_from(&pool, &state)?);
    }
    let refill = us(t.elapsed());
    let misses = pool.stats().misses;
    drop(pool);
    drop(children);
    progress(&format!(
        "pool: {misses} of {FLEET} forks built their own shell"
    ));
    rows.push(row(
        "fork-1000-refill",
        format!("{FLEET} children of a 64 MiB snapshot, held, total"),
        "Guest::fork_from a pool of 8 refilled in the background",
        refill,
        "new VMs over MAP_PRIVATE memfd",
        fc,
    ));
    Ok(())
}
