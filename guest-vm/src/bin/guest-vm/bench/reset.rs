//! The reset-cycle rows of `guest-vm bench` (ids from issue 12): a child forked once and reused,
//! run → reset → run …, as fuzzers and request servers use it.
//!
//! - `reset-cycle-N` (per page) and `iterations-50` (per iteration): reset + the next run
//!   re-dirtying the same N scattered pages (every third page), with the restore policy (and
//!   `Guest`'s default hot set, `KVM_HOT_SET`), against the drop policy on the same guest shape
//!   in the same run;
//! - `hot-set-50`: the same loop with the hot set against without it (restore policy both;
//!   per iteration over whole resample periods, so the resamples are paid in the figure);
//! - `hot-break-even`: what one page costs per iteration of the 4096-page loop (large enough
//!   that fixed costs vanish and the copies are cold) — hot (untracked, copied back at every
//!   reset) against tracked and written (the exit, the scan, the copy-back); the ratio is the
//!   write frequency above which a page is cheaper hot;
//! - `reset-50`: the memory reset alone (`Vmar::reset_with`, without the vCPU state) after 50
//!   dirtied pages (p50, and p99 over more samples), against copying 50 cold scattered pages
//!   with `memcpy` (the goal is ≤ 2× memcpy + 20 µs);
//! - `reset-flat`: the same reset in a 4 GiB guest against a 64 MiB guest (no cost that grows
//!   with guest size).
//!
//! Every child is warmed by one run and one reset first (its first writes are copy-on-write
//! faults under either policy). Invariant: a reset that undoes fewer pages than were dirtied is
//! an error, never a figure.

use std::time::Instant;

use guest_vm::workload::programs;
use guest_vm::{Error, Guest, HostFrames, Result, KVM_HOT_SET, PAGE_SIZE};
use vmo::{HotSetPolicy, ResetPolicy};

use super::{base, dirty_run_strided, guest_mem, loop_args, progress, row, BenchOptions, Row};
use crate::measure::{median, percentile, us};

/// Pages between two dirtied pages (scattered: no two are adjacent).
const STRIDE: u64 = 3;

/// A parent guest of `mem` bytes whose write loop covers `n` pages `STRIDE` apart, with those
/// pages committed (they are snapshot memory, as a fuzz target's state is), and its snapshot.
fn parent(frames: &HostFrames, mem: u64, n: u64) -> Result<(Guest, guest_vm::VcpuState)> {
    let mut g = Guest::new(frames, mem)?;
    let mut args = loop_args(n);
    args.rdx = STRIDE * PAGE_SIZE;
    g.vm_mut().load(&programs::write_loop(), args)?;
    g.prefault(args.rdi, n * STRIDE * PAGE_SIZE, true)?;
    let state = g.snapshot()?;
    Ok((g, state))
}

/// Samples of one policy: (whole cycle µs, reset alone µs) per iteration; `hot` is the
/// child's copy-back hot set.
fn cycles(
    parent: &Guest,
    state: &guest_vm::VcpuState,
    n: u64,
    policy: ResetPolicy,
    hot: Option<HotSetPolicy>,
    iters: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut child = parent.fork(state)?;
    child.set_hot_set(hot)?;
    dirty_run_strided(&mut child, n, STRIDE)?;
    child.reset_with(state, policy)?;
    let (mut cycle, mut reset) = (Vec::new(), Vec::new());
    for _ in 0..iters {
        let t = Instant::now();
        dirty_run_strided(&mut child, n, STRIDE)?;
        // The memory reset alone is the `reset-50` sample; the vCPU state follows (both are in
        // the cycle).
        let r = Instant::now();
        let stats = child.vmar().reset_with(policy)?;
        reset.push(us(r.elapsed()));
        child.vm_mut().recover()?;
        child.vm_mut().restore_state(state)?;
        cycle.push(us(t.elapsed()));
        if stats.restored + stats.dropped < n {
            return Err(Error::BadState(format!(
                "{policy:?} reset undid {stats:?} of {n} dirtied pages"
            )));
        }
    }
    Ok((cycle, reset))
}

pub(super) fn reset_rows(o: &BenchOptions, frames: &HostFrames, rows: &mut Vec<Row>) -> Result<()> {
    let mut counts = vec![50.min(o.pages), 4096.min(o.pages)];
    counts.dedup();
    for &n in &counts {
        progress(&format!(
            "reset cycles: {n} scattered pages, restore vs drop policy"
        ));
        let (p, state) = parent(frames, guest_mem(n * STRIDE * PAGE_SIZE), n)?;
        let iters = if n <= 50 { o.reps * 10 } else { o.reps };
        let hot = Some(KVM_HOT_SET);
        let (restore, restore_only) = cycles(&p, &state, n, ResetPolicy::Restore, hot, iters)?;
        let (drop_, _) = cycles(&p, &state, n, ResetPolicy::Drop, None, iters)?;
        let (r, d) = (median(&restore), median(&drop_));
        rows.push(row(
            format!("reset-cycle-{n}"),
            format!("reset + next run re-dirtying {n} scattered pages, per page"),
            "restore policy + hot set (copy back, pages stay installed)",
            r / n as f64,
            "drop policy (next write faults again)",
            d / n as f64,
        ));
        if n == 50 {
            rows.push(row(
                "iterations-50",
                "fork once, then run -> reset -> run ... dirtying 50 pages, per iteration".into(),
                "restore policy + hot set",
                r,
                "drop policy",
                d,
            ));
            let copy = us(base::memcpy_scattered(n as usize, 64)?);
            let mut reset50 = row(
                "reset-50",
                "memory reset alone, 50 dirtied pages (goal: <= 2x memcpy + 20 us)".into(),
                "Vmar::reset_with(Restore), p50; p99 in ours_p99_us",
                median(&restore_only),
                "memcpy of 50 cold scattered pages",
                copy,
            );
            reset50.ours_p99_us = Some(percentile(&restore_only, 0.99));
            rows.push(reset50);
            hot_set_row(&p, &state, n, rows)?;
        } else {
            break_even_row(&p, &state, n, &restore, iters, rows)?;
        }
    }
    let n = 50.min(o.pages);
    progress(&format!(
        "reset flatness: {n} dirtied pages in a 4 GiB vs a 64 MiB guest"
    ));
    let mut per_size = Vec::new();
    for mem in [64u64 << 20, 4 << 30] {
        let (p, state) = parent(frames, mem, n)?;
        let (_, reset) = cycles(
            &p,
            &state,
            n,
            ResetPolicy::Restore,
            Some(KVM_HOT_SET),
            o.reps * 3,
        )?;
        per_size.push(median(&reset));
    }
    rows.push(row(
        "reset-flat",
        format!("reset of {n} dirtied pages, 4 GiB guest vs 64 MiB guest (goal: ratio <= 1.3)"),
        "4 GiB guest",
        per_size[1],
        "64 MiB guest",
        per_size[0],
    ));
    Ok(())
}

/// Cost per iteration of a loop whose cost repeats every `period` iterations, from `samples`
/// covering at least two periods after the first (skipped: the warm-up): each position's
/// median over the periods, averaged over one period — robust to another process's stalls on
/// this shared machine, and still charging a periodic cost (the hot set's resample) in full.
fn periodic_mean(samples: &[f64], period: usize) -> f64 {
    let rest = &samples[period.min(samples.len())..];
    let periods = rest.len() / period.max(1);
    if periods == 0 {
        return median(samples);
    }
    let per_position: f64 = (0..period)
        .map(|pos| {
            let v: Vec<f64> = (0..periods).map(|k| rest[k * period + pos]).collect();
            median(&v)
        })
        .sum();
    per_position / period as f64
}

/// `hot-set-50`: the `n`-page loop of `parent` with the default hot set against every page
/// tracked, per iteration over whole resample periods (see the module documentation).
fn hot_set_row(
    parent: &Guest,
    state: &guest_vm::VcpuState,
    n: u64,
    rows: &mut Vec<Row>,
) -> Result<()> {
    progress(&format!(
        "hot set: {n} pages written every iteration, untracked vs tracked"
    ));
    // The set is resampled every `resample_every` resets that find it non-empty; the reset
    // after a resample starts with it empty, so the pattern repeats every `resample_every + 1`.
    let period = KVM_HOT_SET.resample_every as usize + 1;
    let iters = 4 * period;
    let restore = ResetPolicy::Restore;
    let (hot, _) = cycles(parent, state, n, restore, Some(KVM_HOT_SET), iters)?;
    let (tracked, _) = cycles(parent, state, n, restore, None, iters)?;
    rows.push(row(
        format!("hot-set-{n}"),
        format!(
            "run -> reset -> run ... re-dirtying the same {n} pages, per iteration over whole \
             resample periods ({period} iterations; median per position)"
        ),
        "restore policy + hot set (untracked, copied back every reset)",
        periodic_mean(&hot, period),
        "restore policy, every page tracked",
        periodic_mean(&tracked, period),
    ));
    Ok(())
}

/// `hot-break-even`: per page and iteration of the `n`-page loop (`hot`: its cycles with the
/// default hot set), a hot page against a tracked page written in the iteration.
fn break_even_row(
    parent: &Guest,
    state: &guest_vm::VcpuState,
    n: u64,
    hot: &[f64],
    iters: usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let (tracked, _) = cycles(parent, state, n, ResetPolicy::Restore, None, iters)?;
    rows.push(row(
        "hot-break-even",
        format!(
            "one page of the {n}-page loop, per iteration; ratio = the write frequency above \
             which a page is cheaper hot"
        ),
        "hot page: copied back at every reset, written without an exit",
        median(hot) / n as f64,
        "tracked page written in the iteration: exit + scan + copy-back",
        median(&tracked) / n as f64,
    ));
    Ok(())
}
