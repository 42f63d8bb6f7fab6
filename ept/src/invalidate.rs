//! The invalidation hook: how a table's `Stage2::flush` reaches the hardware.
//!
//! A table never invalidates on its own; `flush(scope)` calls its `Invalidate` with the table's
//! context value and the scope. Implementations:
//! - `CountingInvalidate` (the default): does nothing but count, for host tests and for the
//!   memory model's host builds;
//! - `svm::NptTlbControl`: records the VMCB TLB_CONTROL value the next VMRUN must carry;
//! - `vmx::InveptInvalidate` (feature `hw`): executes INVEPT.
//!
//! Invariant: `invalidate` returns only once the invalidation is done or, for deferred
//! mechanisms (TLB_CONTROL), recorded so that it happens before the guest runs again.

use crate::FlushScope;

/// Performs (or schedules) the invalidation of cached second-level translations.
pub trait Invalidate {
    /// `context` identifies the table: the EPTP value (EPT) or the nCR3 root address (NPT).
    fn invalidate(&mut self, context: u64, scope: FlushScope);
}

/// An `Invalidate` that only counts: host tests assert "one flush per operation" with it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountingInvalidate {
    /// Flushes with `FlushScope::Context`.
    pub context_flushes: u64,
    /// Flushes with `FlushScope::All`.
    pub all_flushes: u64,
    /// Context value of the last flush.
    pub last_context: Option<u64>,
}

impl CountingInvalidate {
    /// Flushes of either scope.
    pub fn total(&self) -> u64 {
        self.context_flushes + self.all_flushes
    }
}

impl Invalidate for CountingInvalidate {
    fn invalidate(&mut self, context: u64, scope: FlushScope) {
        match scope {
            FlushScope::Context => self.context_flushes += 1,
            FlushScope::All => self.all_flushes += 1,
        }
        self.last_context = Some(context);
    }
}

impl<T: Invalidate + ?Sized> Invalidate for &mut T {
    fn invalidate(&mut self, context: u64, scope: FlushScope) {
        (**self).invalidate(context, scope)
    }
}
