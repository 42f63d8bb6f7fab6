//! Forking a running guest: the child's address space is `vmo::Vmar::fork` of the parent's
//! (every frame shared copy-on-write, an empty second-level table), its vCPU a copy of the
//! parent's architectural state with RAX = the child number (the parent's RAX becomes 0).
//!
//! The cost of each fork is measured (TSC ticks, `ForkCost`) together with what the fork did to
//! the parent's BIG region, which the guest wrote completely: every page installed writable
//! before, none effectively writable after, and how many leaves still hold their raw write bit
//! — all of them when the write-protect closed upper entries (ept's hierarchical
//! write-protect) instead of rewriting leaves, which is what makes the fork cost independent of
//! how much the guest wrote. A query of every BIG page is timed as the per-leaf reference; a
//! throwaway fork runs first (`warm_up`), so emulator code translation is not in the figure.
//!
//! Invariants: the parent is stopped at its fork hypercall while this runs; the parent's
//! write-protected entries are flushed (INVEPT by the EPT hook, TLB_CONTROL handed to the SVM
//! vCPU) before it runs again; children start with nothing installed.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use ept::{Access, FaultInfo, FaultKind, S2Perms, PAGE_SIZE};
use vmo::{FramePool, VmPerms, Vmo, VmoFlags};

use super::guest::Guest;
use super::program;
use super::space::Space;
use crate::platform::tsc;
use crate::virt::vcpu::Backend;

/// What forking the main guest cost and did (TSC ticks; page counts over BIG).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ForkCost {
    /// The first fork (write-protects the parent) and the second (nothing left writable).
    pub first_ticks: u64,
    pub later_ticks: u64,
    /// `query` of every BIG page once: the cost of visiting each leaf.
    pub walk_ticks: u64,
    /// BIG pages installed writable in the parent before the first fork.
    pub writable_before: u64,
    /// After the first fork: BIG pages effectively writable, and leaves whose own write bit is
    /// still set (untouched by the fork).
    pub writable_after: u64,
    pub raw_writable_after: u64,
}

/// BIG pages of `space` that are installed and writable as the hardware sees them.
fn big_writable(space: &Space) -> u64 {
    (0..program::BIG_PAGES)
        .filter(|p| {
            space
                .installed(program::BIG_BASE + p * PAGE_SIZE)
                .is_some_and(|t| t.perms.contains(S2Perms::WRITE))
        })
        .count() as u64
}

/// BIG leaves of `space` whose own entry grants write (bit 1 is W in both formats).
fn big_raw_writable(space: &Space) -> u64 {
    (0..program::BIG_PAGES)
        .filter(|p| {
            space.vmar().with_stage2(|t| {
                t.leaf_entry(program::BIG_BASE + p * PAGE_SIZE)
                    // SAFETY: `leaf_entry` found the entry by walking the live table, lent
                    // exclusively by `with_stage2`; nothing changes it during the read.
                    .is_some_and(|e| unsafe { e.read_volatile() } & 2 != 0)
            })
        })
        .count() as u64
}

/// Runs the fork path once on a throwaway space (one 2 MiB table of written pages) before the
/// timed forks, so that QEMU TCG's first translation of that code is not part of the figure
/// (it made the first fork ~20× the second there; Bochs interprets and shows no such gap).
fn warm_up(backend: &mut dyn Backend, pool: &FramePool) -> Result<(), String> {
    let table = backend.new_stage2().map_err(|e| format!("stage2: {e}"))?;
    let space = Space::new(program::GUEST_PHYS_SIZE, table).map_err(|e| format!("vmar: {e}"))?;
    let pages = 512;
    let vmo = Vmo::new(pool, pages * PAGE_SIZE, VmoFlags::empty()).map_err(|e| format!("{e}"))?;
    space
        .map(&vmo, 0, program::BIG_BASE, pages, VmPerms::RW)
        .map_err(|e| format!("{e}"))?;
    for page in 0..pages {
        let gpa = program::BIG_BASE + page * PAGE_SIZE;
        let f = FaultInfo::new(gpa, Access::WRITE, FaultKind::NotPresent);
        space.vmar().handle_fault(f).map_err(|e| format!("{e}"))?;
    }
    let table = backend.new_stage2().map_err(|e| format!("stage2: {e}"))?;
    let child = space.fork(table).map_err(|e| format!("fork: {e}"))?;
    drop(child);
    Ok(())
}

/// Forks guest `p` into two children appended to `guests`; returns their indices and what the
/// forks cost.
pub(crate) fn fork(
    backend: &mut dyn Backend,
    pool: &FramePool,
    guests: &mut Vec<Guest>,
    p: usize,
) -> Result<([usize; 2], ForkCost), String> {
    warm_up(backend, pool)?;
    let parent_state = guests[p].vcpu.state();
    let mut out = [0; 2];
    let mut cost = ForkCost {
        writable_before: big_writable(&guests[p].space),
        ..ForkCost::default()
    };
    for k in 1..=2u64 {
        let table = backend.new_stage2().map_err(|e| format!("stage2: {e}"))?;
        let ctx = table.context();
        let t0 = tsc::rdtsc();
        let space = guests[p]
            .space
            .fork(table)
            .map_err(|e| format!("fork: {e}"))?;
        let ticks = tsc::rdtsc() - t0;
        if k == 1 {
            cost.first_ticks = ticks;
            cost.writable_after = big_writable(&guests[p].space);
            cost.raw_writable_after = big_raw_writable(&guests[p].space);
            let t0 = tsc::rdtsc();
            for page in 0..program::BIG_PAGES {
                let gpa = program::BIG_BASE + page * PAGE_SIZE;
                core::hint::black_box(guests[p].space.installed(gpa));
            }
            cost.walk_ticks = tsc::rdtsc() - t0;
        } else {
            cost.later_ticks = ticks;
        }
        let mut st = parent_state;
        st.gprs.rax = k;
        let vcpu = backend.new_vcpu(&st, ctx)?;
        guests.push(Guest::runnable(
            format!("{}.child{}", guests[p].name, k),
            space,
            vcpu,
        ));
        out[k as usize - 1] = guests.len() - 1;
    }
    // The parent's writable entries were downgraded by the fork.
    guests[p].vcpu.gprs().rax = 0;
    let v = guests[p].space.take_tlb_control();
    if v != 0 {
        guests[p].vcpu.tlb_control(v);
    }
    Ok((out, cost))
}
