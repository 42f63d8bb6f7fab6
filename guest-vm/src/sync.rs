//! The locks of the fault-thread protocol, in one place so that a concurrency checker can
//! stand in for them (the pattern of `vmo/src/sync.rs`, which says why shuttle rather than
//! loom).
//!
//! Normally [`Mutex`] is `std::sync::Mutex` with a `lock()` that takes a poisoned lock as it is
//! (a thread that panicked while holding one has already failed; the state behind these locks
//! is a report slot and lists, valid at every instant). With the test-only `shuttle` feature
//! it is `shuttle::sync::Mutex` with the same `lock()`, so every acquisition is a scheduling
//! point of the checker and `tests/uffd_interleave.rs` explores the interleavings of the real
//! fault-thread code (`memory::fault_thread::serve`) against vCPUs and the host.
//!
//! Invariants: the state the fault thread shares with the vCPU loop and the owner
//! (`FaultShared`'s report slot, poisoned-page list and kick hook) is behind this `Mutex`,
//! never `std::sync::Mutex` directly; statistics counters stay `std` atomics (their
//! interleaving decides nothing). A `shuttle` build must run that code inside a shuttle
//! scheduler (it panics otherwise), so the feature is for that test alone.

#[cfg(not(feature = "shuttle"))]
use std::sync as imp;

#[cfg(feature = "shuttle")]
use shuttle::sync as imp;

pub(crate) use imp::MutexGuard;

/// A mutex whose `lock()` returns the guard (poisoning ignored, see the module doc).
#[derive(Default)]
pub(crate) struct Mutex<T>(imp::Mutex<T>);

impl<T> Mutex<T> {
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
