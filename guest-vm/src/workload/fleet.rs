//! A fleet of forked key-value store guests: fork N children of a stopped parent, run them
//! concurrently (each child is its own VM on its own vCPU thread, all sharing the parent's
//! frames copy-on-write through one `HostFrames` pool), and account for each child's memory.
//!
//! Memory accounting per child comes from the child's `Vmar` fault counters: every frame the
//! child allocates is a commit (a page the snapshot never had) or a copy (a write to a shared
//! frame); `private_frames = commits + copies` is the child's own resident memory. Pages it
//! merely reads are installed read-only over the shared frames. The pool's `live` count rises
//! by exactly the sum of the children's private frames while the parent stays stopped.
//!
//! Invariants: children are forked only while the parent is stopped at an exit (the
//! `Vmar::fork` contract); a failing or panicking child is reported as that child's error and
//! never stops its siblings.

use std::time::{Duration, Instant};

use super::kvstore::KvStore;
use super::model::TableModel;
use super::streams::{self, Op, ServeCounts};
use crate::error::{Error, Result};
use crate::guest::Guest;
use crate::vmm::vcpu_state::VcpuState;

/// One forked child with its request stream's model.
pub struct Child {
    pub index: usize,
    pub seed: u64,
    pub kv: KvStore<Guest>,
    /// What the child's table must hold (the snapshot plus its own writes).
    pub model: TableModel,
    pub fork_time: Duration,
}

/// Memory of one guest, from its Vmar and second-level backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GuestMemory {
    /// Frames this guest allocated itself: commits + copies.
    pub private_frames: u64,
    pub commits: u64,
    /// Shared frames copied on a write (copy-on-write).
    pub copies: u64,
    /// Pages installed in the guest's memslot (private + shared read-only).
    pub installed_pages: u64,
    /// Installed pages still shared with the snapshot.
    pub shared_pages: u64,
    /// Faults through the Vmar (`handle_fault` calls).
    pub vmar_faults: u64,
    /// userfaultfd events: not-present pages, and writes to write-protected shared frames.
    pub uffd_missing: u64,
    pub uffd_wp: u64,
}

/// The memory accounting of `guest`.
pub fn guest_memory(guest: &Guest) -> GuestMemory {
    let st = guest.vmar().fault_stats();
    let uf = guest.vm().fault_stats();
    let installed = guest.installed_pages();
    let private = st.commits + st.copies;
    GuestMemory {
        private_frames: private,
        commits: st.commits,
        copies: st.copies,
        installed_pages: installed,
        shared_pages: installed.saturating_sub(private + st.upgrades),
        vmar_faults: st.faults,
        uffd_missing: uf.missing,
        uffd_wp: uf.wp,
    }
}

/// Forks `n` children of the stopped `parent` at vCPU `state`; child `i` gets seed `i` and a
/// copy of `model` (the snapshot's table).
pub fn fork_children(
    parent: &Guest,
    state: &VcpuState,
    model: &TableModel,
    n: usize,
) -> Result<Vec<Child>> {
    let mut out = Vec::with_capacity(n);
    for index in 0..n {
        let t = Instant::now();
        let guest = parent.fork(state)?;
        let fork_time = t.elapsed();
        tracing::debug!(index, ?fork_time, "forked child");
        out.push(Child {
            index,
            seed: index as u64,
            kv: KvStore::resume(guest),
            model: model.clone(),
            fork_time,
        });
    }
    Ok(out)
}

/// The outcome of one child's run.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RunOutcome {
    pub counts: ServeCounts,
    pub elapsed_ms: f64,
    /// The child's table checksum after the run (equal to its model's).
    pub checksum: u64,
}

/// Serves `ops` on `child` (checked against its model) and compares the whole table after.
pub fn run_child(child: &mut Child, ops: &[Op]) -> Result<RunOutcome> {
    let t = Instant::now();
    let counts = streams::serve_checked(&mut child.kv, &mut child.model, ops, child.seed)?;
    let elapsed = t.elapsed();
    let who = format!("child {}", child.index);
    let checksum = streams::check_table(&mut child.kv, &child.model, &who)?;
    Ok(RunOutcome {
        counts,
        elapsed_ms: elapsed.as_secs_f64() * 1e3,
        checksum,
    })
}

/// Runs every child concurrently, each on its own thread with its own stream
/// (`streams::stream(seed, requests, filled, children)`). Returns the results in child
/// order and the wall time of the whole concurrent phase.
pub fn run_concurrently(
    children: &mut [Child],
    requests: u64,
    filled: u64,
) -> (Vec<Result<RunOutcome>>, Duration) {
    let peers = children.len() as u64;
    let t = Instant::now();
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = children
            .iter_mut()
            .map(|child| {
                let ops = streams::stream(child.seed, requests, filled, peers);
                std::thread::Builder::new()
                    .name(format!("vcpu-child-{}", child.index))
                    .spawn_scoped(s, move || run_child(child, &ops))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(Error::BadState("child vCPU thread panicked".into()))),
                Err(e) => Err(Error::Sys {
                    what: "spawn child vCPU thread",
                    err: e,
                }),
            })
            .collect()
    });
    (results, t.elapsed())
}
