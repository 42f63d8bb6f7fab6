//! Stage2 table throughput against a `BTreeMap<gpa, pa>` baseline, in the same run:
//! - map + unmap of 1 GiB page by page, at 4 KiB and at 2 MiB granularity (the fault path's
//!   pattern: one `map` per fault, one `unmap` per page), plus unmapping the GiB in one call;
//! - translate (`query`) throughput on a table populated with 1 GiB of 4 KiB pages, at
//!   pseudo-random addresses.
//!
//! Tables use `HeapPhysMem` and the counting invalidation hook.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ept::{EptTable, FlushScope, HeapPhysMem, MemType, NptTable, PageSize, S2Perms, Stage2};

const GIB: u64 = 1 << 30;
const BASE: u64 = 0x40_0000_0000; // 256 GiB: exercises non-zero upper indices
const PA: u64 = 0x1_0000_0000;

fn map_unmap<T: Stage2>(t: &mut T, size: PageSize) {
    let step = size.bytes();
    let mut gpa = BASE;
    while gpa < BASE + GIB {
        t.map(
            gpa,
            PA + (gpa - BASE),
            size,
            S2Perms::RW,
            MemType::WriteBack,
        )
        .unwrap();
        gpa += step;
    }
    let mut gpa = BASE;
    while gpa < BASE + GIB {
        t.unmap(gpa, step).unwrap();
        gpa += step;
    }
    t.flush(FlushScope::Context);
}

fn map_unmap_range<T: Stage2>(t: &mut T, size: PageSize) {
    let step = size.bytes();
    let mut gpa = BASE;
    while gpa < BASE + GIB {
        t.map(
            gpa,
            PA + (gpa - BASE),
            size,
            S2Perms::RW,
            MemType::WriteBack,
        )
        .unwrap();
        gpa += step;
    }
    t.unmap(BASE, GIB).unwrap();
    t.flush(FlushScope::Context);
}

fn btree_map_unmap(m: &mut BTreeMap<u64, u64>, step: u64) {
    let mut gpa = BASE;
    while gpa < BASE + GIB {
        m.insert(gpa, PA + (gpa - BASE));
        gpa += step;
    }
    let mut gpa = BASE;
    while gpa < BASE + GIB {
        m.remove(&gpa);
        gpa += step;
    }
}

fn bench_map_unmap(c: &mut Criterion) {
    let mut g = c.benchmark_group("map_unmap_1GiB");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for (name, size) in [("4K", PageSize::Size4K), ("2M", PageSize::Size2M)] {
        g.throughput(Throughput::Elements(GIB / size.bytes()));
        let mem = HeapPhysMem::new();
        let mut ept = EptTable::new(&mem).unwrap();
        g.bench_function(BenchmarkId::new("ept", name), |b| {
            b.iter(|| map_unmap(&mut ept, size))
        });
        let mut npt = NptTable::new(&mem).unwrap();
        g.bench_function(BenchmarkId::new("npt", name), |b| {
            b.iter(|| map_unmap(&mut npt, size))
        });
        g.bench_function(BenchmarkId::new("ept_unmap_one_range", name), |b| {
            b.iter(|| map_unmap_range(&mut ept, size))
        });
        let mut m = BTreeMap::new();
        g.bench_function(BenchmarkId::new("btreemap", name), |b| {
            b.iter(|| btree_map_unmap(&mut m, size.bytes()))
        });
    }
    g.finish();
}

/// Pseudo-random page addresses inside the populated GiB (xorshift).
fn addresses(n: usize) -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            BASE + ((x % GIB) & !0xfff) + (x >> 52)
        })
        .collect()
}

fn bench_translate(c: &mut Criterion) {
    const N: usize = 4096;
    let addrs = addresses(N);
    let mut g = c.benchmark_group("translate_4K_populated_1GiB");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(N as u64));

    let mem = HeapPhysMem::new();
    let mut ept = EptTable::new(&mem).unwrap();
    let mut m = BTreeMap::new();
    let mut gpa = BASE;
    while gpa < BASE + GIB {
        ept.map(
            gpa,
            PA + (gpa - BASE),
            PageSize::Size4K,
            S2Perms::RW,
            MemType::WriteBack,
        )
        .unwrap();
        m.insert(gpa, PA + (gpa - BASE));
        gpa += ept::PAGE_SIZE;
    }
    g.bench_function("ept_query", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for &a in &addrs {
                sum = sum.wrapping_add(ept.query(black_box(a)).map_or(0, |t| t.pa_of(a)));
            }
            sum
        })
    });
    g.bench_function("btreemap_get", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for &a in &addrs {
                sum = sum.wrapping_add(
                    m.get(&(black_box(a) & !0xfff))
                        .map_or(0, |pa| pa + (a & 0xfff)),
                );
            }
            sum
        })
    });
    g.finish();
}

criterion_group!(benches, bench_map_unmap, bench_translate);
criterion_main!(benches);
