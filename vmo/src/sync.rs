//! The locks and the protocol atomics of the memory model, in one place so that a concurrency
//! checker can stand in for them.
//!
//! Normally these are `spin`'s `Mutex` / `RwLock` (the crate is `no_std`: `hv` has no OS to block
//! on) and `core`'s atomics. With the `shuttle` feature they are `shuttle::sync`'s, wrapped to
//! keep spin's signatures (`lock()` returns the guard; a poisoned lock — a test thread that
//! panicked while holding it — is taken as it is, the panic being the failure the checker
//! reports). Every acquisition is then a scheduling point of the checker, so
//! `tests/interleave.rs` explores the interleavings of the real fault, fork, reset, protect and
//! unmap code rather than of a model of it.
//!
//! Why shuttle rather than loom: loom explores every interleaving exhaustively (bounded by
//! preemptions) and models the C11 memory orderings, but needs every shared-memory access in
//! the checked code to go through its types and grows exponentially with the number of
//! scheduling points; one Vmar operation here takes a dozen locks and walks an XArray, so even
//! a fault ∥ fork pair is far past what loom finishes in CI time. Shuttle runs the same code
//! under randomized and PCT schedulers (PCT gives a probabilistic guarantee per bug depth) for
//! a chosen number of executions, which bounds the run time and still reaches deep
//! interleavings. What it does not check — weak-memory reorderings of the atomics — is not
//! where this code's protocol lives: every structural change is under a lock.
//!
//! Invariants: code of this crate names these types (never `spin::` directly) for every lock
//! that two threads can contend on and for `Space`'s protocol atomics (`defer_flush`,
//! `last_write`); statistics counters stay `core` atomics (their interleaving decides nothing).
//! A `shuttle` build must run inside a shuttle scheduler (it panics otherwise).

#[cfg(not(feature = "shuttle"))]
pub(crate) use core::sync::atomic::{AtomicU32, AtomicU64};
#[cfg(not(feature = "shuttle"))]
pub(crate) use spin::{Mutex, MutexGuard, RwLock};

#[cfg(feature = "shuttle")]
pub(crate) use checked::{AtomicU32, AtomicU64, Mutex, MutexGuard, RwLock};

#[cfg(feature = "shuttle")]
mod checked {
    use std::sync::PoisonError;

    pub(crate) use shuttle::sync::atomic::{AtomicU32, AtomicU64};
    pub(crate) use shuttle::sync::MutexGuard;
    use shuttle::sync::{RwLockReadGuard, RwLockWriteGuard};

    /// `shuttle::sync::Mutex` with spin's `lock()`.
    #[derive(Default)]
    pub(crate) struct Mutex<T>(shuttle::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Mutex(shuttle::sync::Mutex::new(value))
        }
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(PoisonError::into_inner)
        }
        pub(crate) fn get_mut(&mut self) -> &mut T {
            self.0.get_mut().unwrap_or_else(PoisonError::into_inner)
        }
    }

    /// `shuttle::sync::RwLock` with spin's `read()` / `write()`.
    pub(crate) struct RwLock<T>(shuttle::sync::RwLock<T>);

    impl<T> RwLock<T> {
        pub(crate) fn new(value: T) -> Self {
            RwLock(shuttle::sync::RwLock::new(value))
        }
        pub(crate) fn read(&self) -> RwLockReadGuard<'_, T> {
            self.0.read().unwrap_or_else(PoisonError::into_inner)
        }
        pub(crate) fn write(&self) -> RwLockWriteGuard<'_, T> {
            self.0.write().unwrap_or_else(PoisonError::into_inner)
        }
    }
}
