//! AMD SVM TLB control: the VMCB TLB_CONTROL values (APM vol. 2, VMCB offset 0x058, bits 7:0)
//! and `NptTlbControl`, the invalidation hook for nested page tables.
//!
//! SVM has no invalidate instruction for nested translations: the hypervisor writes
//! TLB_CONTROL in the VMCB and the flush happens at the next VMRUN. Invariant: the hook's
//! pending value only grows in strength (FlushAll ⊇ FlushGuest ⊇ FlushGuestNonGlobal ⊇
//! DoNothing) until `take` hands it to the VMRUN path and resets it to `DoNothing`.

use crate::invalidate::Invalidate;
use crate::FlushScope;

/// VMCB TLB_CONTROL values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TlbControl {
    /// 0: do nothing.
    DoNothing = 0,
    /// 1: flush the entire TLB (all ASIDs, global entries included).
    FlushAll = 1,
    /// 3: flush this guest's ASID.
    FlushGuest = 3,
    /// 7: flush this guest's non-global translations.
    FlushGuestNonGlobal = 7,
}

impl TlbControl {
    fn strength(self) -> u8 {
        match self {
            TlbControl::DoNothing => 0,
            TlbControl::FlushGuestNonGlobal => 1,
            TlbControl::FlushGuest => 2,
            TlbControl::FlushAll => 3,
        }
    }
    /// The value that performs both `self` and `other`.
    pub fn combine(self, other: TlbControl) -> TlbControl {
        if other.strength() > self.strength() {
            other
        } else {
            self
        }
    }
}

/// Invalidation hook for `NptTable`: records the TLB_CONTROL value the next VMRUN needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NptTlbControl {
    pending: TlbControl,
    context_value: TlbControl,
}

impl Default for NptTlbControl {
    fn default() -> Self {
        Self::new()
    }
}

impl NptTlbControl {
    /// Context flushes become `FlushGuest` (3), all-context flushes `FlushAll` (1).
    pub fn new() -> Self {
        NptTlbControl {
            pending: TlbControl::DoNothing,
            context_value: TlbControl::FlushGuest,
        }
    }
    /// Every flush becomes `FlushAll` (1): for CPUs or emulators without FlushByAsid support
    /// (QEMU TCG honours only value 1).
    pub fn flush_all_only() -> Self {
        NptTlbControl {
            pending: TlbControl::DoNothing,
            context_value: TlbControl::FlushAll,
        }
    }
    /// The value to write into the VMCB before the next VMRUN; resets to `DoNothing`.
    pub fn take(&mut self) -> TlbControl {
        core::mem::replace(&mut self.pending, TlbControl::DoNothing)
    }
    /// The value `take` would return, without resetting it.
    pub fn pending(&self) -> TlbControl {
        self.pending
    }
}

impl Invalidate for NptTlbControl {
    fn invalidate(&mut self, _ncr3: u64, scope: FlushScope) {
        let wanted = match scope {
            FlushScope::Context => self.context_value,
            FlushScope::All => TlbControl::FlushAll,
        };
        self.pending = self.pending.combine(wanted);
    }
}
