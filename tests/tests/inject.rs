//! Failure injection at the seams, under the Vmar model (`conformance::model`): the software
//! EPT backend wrapped in `FaultyStage2` (each run-time error a real backend returns, refused
//! before any change or after changing half the range), the frame pool's allocator wrapped in
//! `FaultyAlloc`, and pager-backed Vmos served by `FaultyPager`; the N-th operation of the seam
//! fails, with N swept, plus runs failing every k-th.
//!
//! What must hold whatever failed: an operation that met an injected failure and returned `Ok`
//! did exactly what the reference says; after one returned an error the harness checks only
//! what holds in every state — `Vmar::check_invariants` (every translation inside a mapping
//! reaches the frame its Vmo holds, so it is live), no translation outside a mapping, no
//! writable translation to a frame of two Vmos or translated through two — and at teardown 0
//! data frames and 0 table frames are live.
//!
//! Size: `GUESTMEM_INJECT_N` (largest N swept, default 160 in release, 40 in debug) and
//! `GUESTMEM_INJECT_OPS` (operations per run, default 300).

use std::sync::Arc;

use conformance::inject::{FaultyAlloc, FaultyStage2, Injector, Partial, Plan, STAGE2_ERRORS};
use conformance::model::{ept_table, Harness, Options, Rng, Setup, Stats};
use ept::{EptTable, HeapPhysMem};
use vmo::{FramePool, HeapFrameAlloc};

type Faulty = FaultyStage2<EptTable<Arc<HeapPhysMem>>>;

fn knob(name: &str, release: u64, debug: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) {
            debug
        } else {
            release
        })
}

fn opts(seam: Seam) -> Options {
    Options {
        root_pages: 32,
        check_every: 4,
        max_ops: knob("GUESTMEM_INJECT_OPS", 300, 300),
        pagers: matches!(seam, Seam::Pager),
    }
}

/// Which seam a run injects at.
#[derive(Clone, Copy, Debug)]
enum Seam {
    Stage2(ept::Error, Partial),
    Alloc,
    Pager,
}

fn setup(seam: Seam, plan: Plan) -> Setup<Faulty> {
    let phys = Arc::new(HeapPhysMem::with_capacity(1 << 14));
    let never = Injector::new(Plan::Never);
    let (s2, alloc, pager) = match seam {
        Seam::Stage2(..) => (Injector::new(plan), never.clone(), never.clone()),
        Seam::Alloc => (never.clone(), Injector::new(plan), never.clone()),
        Seam::Pager => (never.clone(), never.clone(), Injector::new(plan)),
    };
    let (error, partial) = match seam {
        Seam::Stage2(e, p) => (e, p),
        _ => (ept::Error::NoMemory, Partial::Before),
    };
    let pool = FramePool::new(Arc::new(FaultyAlloc {
        inner: HeapFrameAlloc::new(),
        injector: alloc.clone(),
    }));
    let p = phys.clone();
    let inj = s2.clone();
    Setup {
        pool,
        phys: Some(phys),
        new_stage2: Box::new(move || {
            FaultyStage2::new(ept_table(p.clone()), inj.clone(), error, partial)
        }),
        pager_injector: pager.clone(),
        injectors: vec![s2, alloc, pager],
    }
}

/// Operations the seam sees in a run of `seed` without failures.
fn seam_ops(seam: Seam, seed: u64) -> u64 {
    let s = setup(seam, Plan::Never);
    let injectors = s.injectors.clone();
    let mut h = Harness::new(s, opts(seam));
    h.run(&mut Rng::new(seed));
    h.finish();
    let i = match seam {
        Seam::Stage2(..) => 0,
        Seam::Alloc => 1,
        Seam::Pager => 2,
    };
    injectors[i].ops()
}

/// For a few seeds, sweeps N over the seam's operations in a failure-free run (one failure, at
/// the N-th; at most `GUESTMEM_INJECT_N` values of N, evenly spread) and a few periodic plans.
fn sweep(seam: Seam) -> (u64, u64, u64, u64) {
    let max = knob("GUESTMEM_INJECT_N", 160, 40);
    let (mut runs, mut met, mut ops, mut unsynced) = (0, 0, 0, 0);
    let mut plans = Vec::new();
    for seed in 1000..1004u64 {
        let count = seam_ops(seam, seed).max(1);
        let step = count.div_ceil(max / 4).max(1);
        plans.extend(
            (1..=count)
                .step_by(step as usize)
                .map(|n| (seed, Plan::Nth(n))),
        );
        plans.extend([(seed, Plan::Every(3)), (seed, Plan::Every(17))]);
    }
    for (seed, plan) in plans {
        let mut h = Harness::new(setup(seam, plan), opts(seam));
        h.run(&mut Rng::new(seed));
        let s: Stats = h.finish();
        runs += 1;
        ops += s.ops;
        met += u64::from(s.injected > 0);
        unsynced += u64::from(s.unsynced);
    }
    println!("{seam:?}: {runs} runs, {met} met an injected failure, {unsynced} went unsynced, {ops} operations");
    assert!(
        met * 2 >= runs,
        "{seam:?}: most runs should meet their failure ({met}/{runs})"
    );
    (runs, met, ops, unsynced)
}

#[test]
fn stage2_failures_before_any_change() {
    for e in STAGE2_ERRORS {
        sweep(Seam::Stage2(e, Partial::Before));
    }
}

#[test]
fn stage2_failures_after_half_the_range() {
    for e in STAGE2_ERRORS {
        sweep(Seam::Stage2(e, Partial::Half));
    }
}

#[test]
fn frame_allocation_failures() {
    sweep(Seam::Alloc);
}

#[test]
fn pager_failures() {
    sweep(Seam::Pager);
}
