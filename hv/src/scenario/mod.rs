//! scenario: what this kernel runs on a backend. Four guests (main and three rogues) each in
//! its own Vmar-backed address space, a round-robin scheduler, a fork of the running main
//! guest (which wrote every page of its 16 MiB BIG region first) into two copy-on-write
//! children, timed, and the checks that decide the verdict.
//!
//! One job per file:
//! - `mod.rs` — `run`: builds the guests, schedules them, forks on request, hands the result
//!   to `checks`.
//! - `guest` — one guest: its space, its vCPU, what the run recorded about it.
//! - `slice` — one scheduling slice and the exit handler (faults → `Vmar::handle_fault`).
//! - `fork` — forking a guest stopped at its fork hypercall.
//! - `checks` — the expectations, the teardown leak check and the verdict detail.
//! - `space` — a guest's address space: `vmo::Vmar` over hv's second-level table, plus the
//!   host-side views the checks read.
//! - `program` — the guest program (program.s), its hypercall ABI, guest-physical layout,
//!   expected values, and `load`.
//! - `linux/` — the other scenario, chosen when GRUB hands hv a bzImage: an unmodified Linux
//!   kernel as a pass-through guest whose RAM is a Vmar (see its module doc).
//!
//! Invariants: every second-level fault of every guest goes through its Vmar's `handle_fault`;
//! a guest whose fault cannot be resolved, or that raises an exception, triple-faults or exits
//! unexpectedly, is stopped with a report and the others keep running; the hypervisor never
//! panics on guest behaviour. The verdict is PASS only if every expectation of `checks` held.

pub mod checks;
pub mod fork;
pub mod guest;
pub mod linux;
pub mod program;
pub mod slice;
pub mod space;

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use ept::PAGE_SIZE;
use vmo::FramePool;

use crate::platform::frames::{self, PhysFrames};
use crate::platform::serial::println;
use crate::platform::tsc;
use crate::virt::vcpu::Backend;
use guest::Guest;
use program::Role;
use slice::SliceEnd;
use space::Space;

fn new_guest(
    backend: &mut dyn Backend,
    pool: &FramePool,
    name: &str,
    role: Role,
) -> Result<Guest, String> {
    let table = backend.new_stage2().map_err(|e| format!("stage2: {e}"))?;
    let ctx = table.context();
    let space = Space::new(program::GUEST_PHYS_SIZE, table).map_err(|e| format!("vmar: {e}"))?;
    let st = program::load(pool, &space, role, backend.hypercall_insn())
        .map_err(|e| format!("load: {e}"))?;
    let vcpu = backend.new_vcpu(&st, ctx)?;
    Ok(Guest::runnable(name.into(), space, vcpu))
}

/// Runs the scenario on `backend`; returns the verdict detail on success.
pub fn run(backend: &mut dyn Backend) -> Result<String, String> {
    // Before any guest runs (it reprograms PIT channel 2): the rate the fork costs print in.
    let tsc_per_ms = tsc::calibrate().unwrap_or(0);
    let pool = FramePool::new(Arc::new(PhysFrames));
    let frames_before = frames::stats().0;
    let mut guests = Vec::new();
    guests.push(new_guest(backend, &pool, "rogue-oob", Role::OutOfBounds)?);
    guests.push(new_guest(backend, &pool, "main", Role::Main)?);
    guests.push(new_guest(backend, &pool, "rogue-ro", Role::WriteReadOnly)?);
    println!(
        "scenario: {} guests loaded; second-level tables empty (every page arrives by fault)",
        guests.len()
    );
    guests.push(new_guest(
        backend,
        &pool,
        "rogue-misconfig",
        Role::ReadCorruptedEntry,
    )?);
    // Deliberately break the table entry this guest will read (the misconfiguration test).
    let corrupted = guests[3].space.corrupt_leaf(program::DATA_BASE);
    if corrupted.is_none() {
        return Err(String::from(
            "could not install and corrupt the misconfiguration test entry",
        ));
    }
    println!("scenario: rogue-misconfig: its DATA page was installed by a host-side fault, then the entry deliberately corrupted");

    let mut queue: VecDeque<usize> = (0..guests.len()).collect();
    let mut forked = None;
    while let Some(i) = queue.pop_front() {
        match slice::run_slice(&mut guests[i]) {
            SliceEnd::Yield => queue.push_back(i),
            SliceEnd::Finished => {}
            SliceEnd::Fork => {
                match fork::fork(backend, &pool, &mut guests, i) {
                    Ok((kids, cost)) => {
                        println!(
                        "fork: {} -> {}, {} (copy-on-write; {} data pages committed in the parent)",
                        guests[i].name,
                        guests[kids[0]].name,
                        guests[kids[1]].name,
                        (0..program::DATA_PAGES)
                            .filter(|p| guests[i].space.installed(program::DATA_BASE + p * PAGE_SIZE).is_some())
                            .count()
                    );
                        queue.push_back(kids[0]);
                        queue.push_back(kids[1]);
                        queue.push_back(i);
                        forked = Some((i, kids, cost));
                    }
                    Err(e) => guests[i].stop(format!("fork failed: {e}")),
                }
            }
        }
    }

    if let Some(e) = corrupted {
        guests[3].space.restore_leaf(e);
    }
    checks::verify(
        backend.name(),
        guests,
        forked,
        &pool,
        frames_before,
        tsc_per_ms,
    )
}
