//! Criterion benchmarks of the memory model (issues 4 and 5), each group putting our operation
//! next to its baseline in the same run:
//!
//! - `snapshot_child`: `create_child(Snapshot, 0, size)` + drop of the child, for an anonymous
//!   Vmo with 1 Ki, 64 Ki and 1 Mi committed pages (the copy-on-write structure promises O(1) in
//!   committed pages: the three should be close). Only one of these Vmos is alive at a time.
//! - `first_write_shared_page`: the first write of one byte to a page a snapshot child shares
//!   with its parent (a copy-on-write copy), against `memcpy` of 4 KiB (`copy_from_slice`).
//!   `fresh_child` writes once into a just-created child (so it also pays for unsharing the
//!   XArray node path); `per_page` writes successive pages of a child (node copies amortised
//!   over the 64 pages of a leaf). Child creation and drop are outside the timing.
//! - `bandwidth_16MiB`: `Vmo::read` / `Vmo::write` of 16 MiB in one call over committed private
//!   pages, against `memcpy` of 16 MiB between two `Vec`s (Throughput::Bytes).
//! - `fork`: `Vmar::fork` of a root Vmar with 64 MiB and 4 GiB mapped (one anonymous Vmo, every
//!   fourth page committed, nothing installed in the Stage2). `vmar` excludes the child's drop
//!   (`iter_batched`, the child is returned and dropped outside the timing); `vmar+drop` drops
//!   the child inside the timing. `linux` is `fork()` of this bench process holding a `Vec` of
//!   the committed size (16 MiB / 1 GiB, every page touched) with the child calling `_exit(0)`
//!   at once and the parent timing until `waitpid` returns. Those run first in the group, after
//!   `malloc_trim(0)`, with no Vmo alive, so the process's resident set is mostly that `Vec`
//!   (its VmRSS is printed to stderr).
//! - `fork_installed` (issue 13): the same `Vmar::fork` at 64 MiB and 4 GiB with *every* page
//!   committed and installed in the parent's Stage2. `first`: the first fork after the parent
//!   wrote every page (write faults, so every entry is writable and the fork must write-protect
//!   it); timed by hand, one fork per round after an untimed rewrite of every page (1 Mi write
//!   faults at 4 GiB: criterion's iteration counts would take minutes), median of
//!   `FIRST_ROUNDS` (every round's time is printed too: the first round forks a parent that
//!   never forked, the later ones a parent rewritten after a fork), each with cold caches
//!   (`evict_caches`: 256 MiB written first, at both sizes). `later`: forks of the same parent after that (every entry installed
//!   read-only: the fork changes nothing), in criterion, child dropped outside the timing. Both
//!   print `vmar-fork-{first,later}-4g-vs-64m` with the median ratio 4 GiB ÷ 64 MiB to stderr.
//!   Peak memory ≈ 4 GiB of heap frames + 8 MiB of tables (one size alive at a time).
//! - `faults_4096`: fault resolutions through `Vmar::handle_fault` (Throughput::Elements, 4096
//!   write faults per iteration): `zero_commit` on fresh pages of a mapped anonymous Vmo, `cow`
//!   on the pages of a forked child whose parent committed them (each one copies a frame).
//!   Building and dropping the Vmar/fork is outside the timing (`iter_batched`, PerIteration).
//!
//! Frames come from `FramePool::heap()` (one zeroed heap allocation per frame). Stage2 tables
//! are `EptTable<Arc<HeapPhysMem>>` over one shared `HeapPhysMem`, so creating or dropping a
//! table moves a few table frames in and out of that pool instead of allocating and unmapping a
//! fresh 256 KiB chunk per table (which alone costs ~30 µs and would swamp `vmar+drop`). Host
//! buffers of `bandwidth_16MiB` are page aligned: `rep movsb` into a destination misaligned by
//! 16 bytes (a plain `Vec`) runs at a third of the speed, which would be blamed on `Vmo::read`.

use std::hint::black_box;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use ept::{Access, EptTable, FaultInfo, FaultKind, HeapPhysMem};
use vmo::{ChildKind, FaultOutcome, FramePool, MapOptions, VmPerms, Vmar, Vmo, VmoFlags};

const PAGE: u64 = vmo::PAGE_SIZE;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

type S2 = EptTable<Arc<HeapPhysMem>>;

/// An empty EPT table whose table frames come from one process-wide `HeapPhysMem`.
fn stage2() -> S2 {
    static PHYS: OnceLock<Arc<HeapPhysMem>> = OnceLock::new();
    let phys = PHYS.get_or_init(|| Arc::new(HeapPhysMem::new()));
    EptTable::new(phys.clone()).expect("EPT root frame")
}

/// A page-aligned, heap-allocated byte buffer.
struct AlignedBuf(Vec<AlignedPage>);

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct AlignedPage([u8; PAGE as usize]);

impl AlignedBuf {
    fn new(len: u64, fill: u8) -> Self {
        AlignedBuf(vec![
            AlignedPage([fill; PAGE as usize]);
            (len / PAGE) as usize
        ])
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: `AlignedPage` is plain bytes with no padding (size == align == 4096).
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * PAGE as usize) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`.
        unsafe {
            std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * PAGE as usize)
        }
    }
}

/// Resident set of this process, from /proc/self/status.
fn vm_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l["VmRSS:".len()..].trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn pages_label(pages: u64) -> String {
    if pages >= 1 << 20 {
        format!("{}Mi_pages", pages >> 20)
    } else {
        format!("{}Ki_pages", pages >> 10)
    }
}

fn bench_snapshot(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot_child");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for pages in [1u64 << 10, 1 << 16, 1 << 20] {
        let pool = FramePool::heap();
        let size = pages * PAGE;
        let vmo = Vmo::new(&pool, size, VmoFlags::empty()).unwrap();
        let t = Instant::now();
        vmo.commit(0, size).unwrap();
        eprintln!(
            "snapshot_child: committed {} pages in {:?} (VmRSS {})",
            pages,
            t.elapsed(),
            vm_rss()
        );
        assert_eq!(pool.stats().live, pages);
        g.bench_function(BenchmarkId::new("create+drop", pages_label(pages)), |b| {
            b.iter(|| {
                drop(black_box(
                    vmo.create_child(ChildKind::Snapshot, 0, size).unwrap(),
                ))
            })
        });
        // Snapshots share frames, never allocate them.
        assert_eq!(pool.stats().live, pages);
        let t = Instant::now();
        drop(vmo);
        eprintln!(
            "snapshot_child: dropped {} pages in {:?}",
            pages,
            t.elapsed()
        );
        assert_eq!(pool.stats().live, 0);
    }
    g.finish();
}

fn bench_first_write(c: &mut Criterion) {
    let mut g = c.benchmark_group("first_write_shared_page");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    let pool = FramePool::heap();
    let pages = 1u64 << 14; // 64 MiB parent, every page committed
    let size = pages * PAGE;
    let parent = Vmo::new(&pool, size, VmoFlags::empty()).unwrap();
    parent.commit(0, size).unwrap();

    // Sanity: one write into a child copies exactly one frame.
    {
        let before = pool.stats().cow_copies;
        let child = parent.create_child(ChildKind::Snapshot, 0, size).unwrap();
        child.write(5 * PAGE + 17, &[1]).unwrap();
        assert_eq!(pool.stats().cow_copies, before + 1);
        let mut b = [0u8; 1];
        parent.read(5 * PAGE + 17, &mut b).unwrap();
        assert_eq!(b[0], 0);
    }

    let mid = (pages / 2) * PAGE + 123;
    g.bench_function("cow_write/fresh_child", |b| {
        b.iter_batched(
            || parent.create_child(ChildKind::Snapshot, 0, size).unwrap(),
            |child| {
                child.write(mid, black_box(&[1u8])).unwrap();
                child
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("cow_write/per_page", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let child = parent.create_child(ChildKind::Snapshot, 0, size).unwrap();
                let n = left.min(pages);
                let t = Instant::now();
                for p in 0..n {
                    child.write(p * PAGE + 123, black_box(&[1u8])).unwrap();
                }
                total += t.elapsed();
                left -= n;
                drop(child);
            }
            total
        })
    });
    let src = vec![0xa5u8; PAGE as usize];
    let mut dst = vec![0u8; PAGE as usize];
    g.bench_function("memcpy_4KiB", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        })
    });
    g.finish();
    drop(parent);
    assert_eq!(pool.stats().live, 0);
}

fn bench_bandwidth(c: &mut Criterion) {
    let len = 16 * MIB;
    let mut g = c.benchmark_group("bandwidth_16MiB");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(len));
    let pool = FramePool::heap();
    let vmo = Vmo::new(&pool, len, VmoFlags::empty()).unwrap();
    vmo.commit(0, len).unwrap();
    let mut buf_owner = AlignedBuf::new(len, 0x3c);
    let src_owner = AlignedBuf::new(len, 0x5a);
    let buf = buf_owner.bytes_mut();
    let src = src_owner.bytes();
    vmo.write(0, src).unwrap();
    let committed = pool.stats().allocated;

    g.bench_function("vmo_read", |b| {
        b.iter(|| vmo.read(0, black_box(&mut *buf)).unwrap())
    });
    // Read once more: a criterion filter may have skipped `vmo_read`.
    vmo.read(0, &mut *buf).unwrap();
    assert_eq!(&*buf, src);
    g.bench_function("vmo_write", |b| {
        b.iter(|| vmo.write(0, black_box(src)).unwrap())
    });
    // Committed private pages are written in place: nothing was allocated.
    assert_eq!(pool.stats().allocated, committed);
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            buf.copy_from_slice(black_box(src));
            black_box(&mut *buf);
        })
    });
    g.finish();
}

/// A root Vmar of `size` with one anonymous Vmo mapped RW over all of it, every fourth page
/// committed (through the Vmo: nothing installed in the Stage2).
fn quarter_committed(pool: &FramePool, size: u64) -> (Vmar<S2>, Vmo) {
    let vmar = Vmar::new_root(size, stage2()).unwrap();
    let vmo = Vmo::new(pool, size, VmoFlags::empty()).unwrap();
    let mut off = 0;
    while off < size {
        vmo.commit(off, PAGE).unwrap();
        off += 4 * PAGE;
    }
    vmar.map(&vmo, 0, size, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    (vmar, vmo)
}

fn linux_fork_wait() {
    // SAFETY: the child only calls `_exit` (async-signal-safe); the parent reaps it.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            libc::_exit(0);
        }
        let mut status = 0;
        let r = libc::waitpid(pid, &mut status, 0);
        assert_eq!(r, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }
}

fn bench_fork(c: &mut Criterion) {
    let mut g = c.benchmark_group("fork");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let sizes = [(64 * MIB, "64MiB"), (4 * GIB, "4GiB")];

    // Linux fork() of this process holding the same resident bytes (no Vmo alive).
    for (size, label) in sizes {
        let resident = (size / 4) as usize;
        // SAFETY: plain glibc call; returns freed heap memory to the kernel.
        unsafe { libc::malloc_trim(0) };
        let v = vec![0x77u8; resident]; // every page touched
        eprintln!(
            "fork/linux/{label}: holding {} MiB, VmRSS {}",
            resident >> 20,
            vm_rss()
        );
        g.bench_function(BenchmarkId::new("linux", label), |b| {
            b.iter(linux_fork_wait)
        });
        black_box(&v);
        drop(v);
    }

    for (size, label) in sizes {
        let pool = FramePool::heap();
        let (vmar, vmo) = quarter_committed(&pool, size);
        let committed = pool.stats().live;
        assert_eq!(committed, size / PAGE / 4);
        eprintln!(
            "fork/vmar/{label}: {} committed pages, VmRSS {}",
            committed,
            vm_rss()
        );
        // Sanity: a fork shares every frame and copies none.
        {
            let child = vmar.fork(stage2()).unwrap();
            assert_eq!(pool.stats().live, committed);
            drop(child);
        }
        g.bench_function(BenchmarkId::new("vmar", label), |b| {
            b.iter_batched(stage2, |s2| vmar.fork(s2).unwrap(), BatchSize::SmallInput)
        });
        g.bench_function(BenchmarkId::new("vmar+drop", label), |b| {
            b.iter_batched(
                stage2,
                |s2| drop(vmar.fork(s2).unwrap()),
                BatchSize::SmallInput,
            )
        });
        assert_eq!(pool.stats().live, committed);
        assert_eq!(pool.stats().cow_copies, 0);
        drop(vmar);
        drop(vmo);
        assert_eq!(pool.stats().live, 0);
    }
    g.finish();
}

/// Rounds of the hand-timed first fork in `fork_installed`.
const FIRST_ROUNDS: usize = 5;
/// Hand-timed later forks in `fork_installed` (for the ratio line; criterion times them too).
const LATER_ROUNDS: usize = 50;

/// Bytes written before each timed first fork in `fork_installed` (well above any last-level
/// cache of these machines).
const EVICT_BYTES: usize = 256 << 20;

/// Writes every cache line of `scratch`, pushing the fork's metadata out of the caches.
fn evict_caches(scratch: &mut [u8]) {
    for (i, b) in scratch.iter_mut().step_by(64).enumerate() {
        *b = b.wrapping_add(i as u8);
    }
    black_box(&scratch[..]);
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Writes every page of `[0, size)` through the fault path (commit or upgrade in place), then
/// checks that every page is installed writable.
fn write_everything(vmar: &Vmar<S2>, size: u64) {
    for p in 0..size / PAGE {
        vmar.handle_fault(write_fault(p * PAGE)).unwrap();
    }
    let writable = vmar.with_stage2(|s2| {
        let mut n = 0;
        s2.for_each_leaf(0, size, |t| {
            if t.perms.contains(ept::S2Perms::WRITE) {
                n += t.size.bytes() / PAGE;
            }
        })
        .unwrap();
        n
    });
    assert_eq!(writable, size / PAGE);
}

fn bench_fork_installed(c: &mut Criterion) {
    let mut g = c.benchmark_group("fork_installed");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let mut first = Vec::new();
    let mut later = Vec::new();
    let mut scratch = vec![0u8; EVICT_BYTES];
    for (size, label) in [(64 * MIB, "64MiB"), (4 * GIB, "4GiB")] {
        let pool = FramePool::heap();
        let vmar = Vmar::new_root(size, stage2()).unwrap();
        let vmo = Vmo::new(&pool, size, VmoFlags::empty()).unwrap();
        vmar.map(&vmo, 0, size, MapOptions::specific(0, VmPerms::RW))
            .unwrap();
        let mut times = Vec::new();
        for _ in 0..FIRST_ROUNDS {
            write_everything(&vmar, size);
            let s2 = stage2();
            // Both sizes fork with cold caches, as after a guest's run: otherwise the 64 MiB
            // parent's whole metadata stays cached from the rewrite and the 4 GiB one's cannot,
            // and the ratio measures the cache rather than the fork's work.
            evict_caches(&mut scratch);
            let t0 = Instant::now();
            let child = vmar.fork(s2).unwrap();
            times.push(t0.elapsed());
            drop(child);
        }
        eprintln!("fork_installed/first/{label}: rounds {times:?}");
        let f = median(times);
        eprintln!(
            "fork_installed/first/{label}: median {f:?} over {FIRST_ROUNDS}, {} pages, VmRSS {}",
            size / PAGE,
            vm_rss()
        );
        first.push(f);
        // Every page is installed, read-only now; later forks change no entry.
        let mut times = Vec::new();
        for _ in 0..LATER_ROUNDS {
            let s2 = stage2();
            let t0 = Instant::now();
            let child = vmar.fork(s2).unwrap();
            times.push(t0.elapsed());
            drop(child);
        }
        let l = median(times);
        eprintln!("fork_installed/later/{label}: median {l:?} over {LATER_ROUNDS}");
        later.push(l);
        g.bench_function(BenchmarkId::new("later", label), |b| {
            b.iter_batched(stage2, |s2| vmar.fork(s2).unwrap(), BatchSize::SmallInput)
        });
        assert_eq!(pool.stats().live, size / PAGE);
        assert_eq!(pool.stats().cow_copies, 0);
        drop(vmar);
        drop(vmo);
        assert_eq!(pool.stats().live, 0);
    }
    for (id, v) in [("first", &first), ("later", &later)] {
        eprintln!(
            "vmar-fork-{id}-4g-vs-64m: {:?} / {:?} = {:.2}",
            v[1],
            v[0],
            v[1].as_secs_f64() / v[0].as_secs_f64()
        );
    }
    g.finish();
}

fn write_fault(gpa: u64) -> FaultInfo {
    FaultInfo::new(gpa, Access::WRITE, FaultKind::NotPresent)
}

fn bench_faults(c: &mut Criterion) {
    const N: u64 = 4096;
    let size = N * PAGE;
    let mut g = c.benchmark_group("faults_4096");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(N));
    let pool = FramePool::heap();

    let fresh = || {
        let vmar = Vmar::new_root(size, stage2()).unwrap();
        let vmo = Vmo::new(&pool, size, VmoFlags::empty()).unwrap();
        vmar.map(&vmo, 0, size, MapOptions::specific(0, VmPerms::RW))
            .unwrap();
        (vmar, vmo)
    };
    // Sanity: every fault commits.
    {
        let (vmar, _vmo) = fresh();
        for p in 0..N {
            let r = vmar.handle_fault(write_fault(p * PAGE)).unwrap();
            assert_eq!(r.outcome, FaultOutcome::Committed);
        }
    }
    g.bench_function("zero_commit", |b| {
        b.iter_batched(
            fresh,
            |(vmar, vmo)| {
                for p in 0..N {
                    vmar.handle_fault(write_fault(p * PAGE)).unwrap();
                }
                (vmar, vmo)
            },
            BatchSize::PerIteration,
        )
    });

    let (parent, parent_vmo) = fresh();
    parent_vmo.commit(0, size).unwrap();
    // Sanity: every fault on the child copies.
    {
        let child = parent.fork(stage2()).unwrap();
        for p in 0..N {
            let r = child.handle_fault(write_fault(p * PAGE)).unwrap();
            assert_eq!(r.outcome, FaultOutcome::Copied);
        }
    }
    g.bench_function("cow", |b| {
        b.iter_batched(
            || parent.fork(stage2()).unwrap(),
            |child| {
                for p in 0..N {
                    child.handle_fault(write_fault(p * PAGE)).unwrap();
                }
                child
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
    drop(parent);
    drop(parent_vmo);
    assert_eq!(pool.stats().live, 0);
}

criterion_group!(
    benches,
    bench_snapshot,
    bench_first_write,
    bench_bandwidth,
    bench_fork,
    bench_fork_installed,
    bench_faults
);
criterion_main!(benches);
