//! INVEPT (SDM vol. 3C, "INVEPT — Invalidate Translations Derived from EPT"): the descriptor,
//! the invalidation types, and, with feature `hw` only, the instruction and the
//! `InveptInvalidate` hook for `EptTable`.
//!
//! Invariant: host builds never contain the privileged instruction; the descriptor's reserved
//! quadword is always zero.

/// The 128-bit INVEPT descriptor: the EPTP, then 64 reserved (zero) bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(16))]
pub struct InveptDescriptor {
    pub eptp: u64,
    reserved: u64,
}

impl InveptDescriptor {
    pub const fn new(eptp: u64) -> Self {
        InveptDescriptor { eptp, reserved: 0 }
    }
    /// The descriptor as the two quadwords the CPU reads.
    pub const fn as_words(&self) -> [u64; 2] {
        [self.eptp, self.reserved]
    }
}

/// INVEPT types (the register operand).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum InveptKind {
    /// 1: translations derived from the descriptor's EPTP.
    SingleContext = 1,
    /// 2: translations derived from any EPTP.
    AllContext = 2,
}

/// INVEPT reported VMfailInvalid or VMfailValid (unsupported type, bad descriptor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InveptFailed;

/// Executes INVEPT.
///
/// # Safety
/// The CPU must be in VMX root operation and support INVEPT with `kind`; otherwise the
/// instruction faults (#UD / #GP).
#[cfg(feature = "hw")]
pub unsafe fn invept(kind: InveptKind, desc: &InveptDescriptor) -> Result<(), InveptFailed> {
    let failed: u8;
    // SAFETY: the caller guarantees VMX root operation; `desc` is a valid 16-byte descriptor.
    unsafe {
        core::arch::asm!(
            "invept {kind}, [{desc}]",
            "setbe {failed}",
            kind = in(reg) kind as u64,
            desc = in(reg) desc as *const InveptDescriptor,
            failed = out(reg_byte) failed,
            options(nostack),
        );
    }
    if failed != 0 {
        Err(InveptFailed)
    } else {
        Ok(())
    }
}

/// Invalidation hook for `EptTable` that executes INVEPT: single-context with the table's EPTP
/// for `FlushScope::Context`, all-context for `FlushScope::All`.
#[cfg(feature = "hw")]
#[derive(Debug, Default)]
pub struct InveptInvalidate {
    /// INVEPT executions that reported failure.
    pub failures: u64,
}

#[cfg(feature = "hw")]
impl InveptInvalidate {
    /// # Safety
    /// Every later `invalidate` runs INVEPT: the CPU must be in VMX root operation and
    /// support single- and all-context INVEPT whenever the table is flushed.
    pub unsafe fn new() -> Self {
        InveptInvalidate { failures: 0 }
    }
}

#[cfg(feature = "hw")]
impl crate::invalidate::Invalidate for InveptInvalidate {
    fn invalidate(&mut self, eptp: u64, scope: crate::FlushScope) {
        let (kind, desc) = match scope {
            crate::FlushScope::Context => (InveptKind::SingleContext, InveptDescriptor::new(eptp)),
            crate::FlushScope::All => (InveptKind::AllContext, InveptDescriptor::new(0)),
        };
        // SAFETY: guaranteed by `InveptInvalidate::new`'s contract.
        if unsafe { invept(kind, &desc) }.is_err() {
            self.failures += 1;
        }
    }
}
