//! VM-exit decoding for VMX: the basic exit reasons this kernel handles as named constants, and
//! `decode`, which reads the exit information of the current VMCS into a backend-neutral
//! `Exit`.
//!
//! Invariants: `decode` runs right after a VM exit, with the exiting vCPU's VMCS current; for
//! HLT, VMCALL and I/O exits it moves guest RIP past the instruction (VM-exit instruction
//! length), for EPT violations, MSR and refused-instruction exits it leaves RIP alone (the
//! access is retried, or an exception is injected at it), as `Vcpu::run` promises. CPUID exits
//! never leave the vCPU (`VmxVcpu::run` answers them itself). Any exit it does not know becomes `Exit::Unexpected` with the raw reason.

use ept::DecodeError;
use x86::vmx::vmcs::{guest, ro};

use super::vmcs::{vmread, vmwrite};
use crate::virt::vcpu::{Exit, Gprs};

/// Basic exit reasons (bits 15:0 of the exit-reason field): Intel SDM Vol. 3, appendix C
/// "VMX Basic Exit Reasons".
pub mod reason {
    /// Exception or NMI (with the exception bitmap all ones: every guest exception).
    pub const EXCEPTION_OR_NMI: u64 = 0;
    /// Triple fault.
    pub const TRIPLE_FAULT: u64 = 2;
    /// CPUID (always exits).
    pub const CPUID: u64 = 10;
    /// HLT (primary processor-based control "HLT exiting").
    pub const HLT: u64 = 12;
    /// VMCALL (always exits in VMX non-root operation).
    pub const VMCALL: u64 = 18;
    /// VMCLEAR … VMXON (19–27): the VMX instructions, which always exit.
    pub const VMCLEAR: u64 = 19;
    pub const VMXON: u64 = 27;
    /// I/O instruction (control "unconditional I/O exiting", or a port set in the I/O bitmaps).
    pub const IO_INSTRUCTION: u64 = 30;
    /// RDMSR / WRMSR of an MSR the MSR bitmap traps (or outside its ranges).
    pub const RDMSR: u64 = 31;
    pub const WRMSR: u64 = 32;
    /// INVEPT, INVVPID, VMFUNC (always exit / #UD for the guest).
    pub const INVEPT: u64 = 50;
    pub const INVVPID: u64 = 53;
    pub const VMFUNC: u64 = 59;
    /// EPT violation.
    pub const EPT_VIOLATION: u64 = ept::fault::VMX_EXIT_EPT_VIOLATION as u64;
    /// EPT misconfiguration.
    pub const EPT_MISCONFIG: u64 = ept::fault::VMX_EXIT_EPT_MISCONFIG as u64;
}

/// Exit-reason bit 31: the VM entry failed (SDM Vol. 3, "Basic VM-Exit Information", and
/// "VM-Entry Failures During or After Loading Guest State").
const ENTRY_FAILED: u64 = 1 << 31;
/// Bits of the exit reason that hold the basic reason.
const BASIC_REASON: u64 = 0xFFFF;

/// VM-exit interruption information (SDM Vol. 3, "VM-Exit Information Fields for Vectored
/// Events"): bits 7:0 vector, bit 11 error code valid.
const INTR_INFO_ERROR_VALID: u64 = 1 << 11;

/// Exit qualification for I/O instructions (SDM Vol. 3, table "Exit Qualification for I/O
/// Instructions"): bits 2:0 size - 1, bit 3 direction (1 = IN), bits 31:16 port.
const IO_QUAL_SIZE: u64 = 7;
const IO_QUAL_IN: u64 = 1 << 3;
const IO_QUAL_STRING: u64 = 1 << 4;
const IO_QUAL_PORT_SHIFT: u64 = 16;

/// Moves guest RIP past the instruction that caused the exit.
pub(super) fn advance() {
    let len = vmread(ro::VMEXIT_INSTRUCTION_LEN);
    vmwrite(guest::RIP, vmread(guest::RIP) + len);
}

/// The exit that just happened; `gprs` are the guest's registers (RAX: the value an OUT
/// wrote; RCX: an MSR number). On a pass-through vCPU (`passthrough`) VMCALL is a
/// virtualization instruction the guest is refused (RIP stays), not a hypercall.
pub(super) fn decode(gprs: &Gprs, passthrough: bool) -> Exit {
    let rax = gprs.rax;
    let reason = vmread(ro::EXIT_REASON);
    let qual = vmread(ro::EXIT_QUALIFICATION);
    if reason & ENTRY_FAILED != 0 {
        return Exit::Unexpected {
            code: reason,
            detail: qual,
        };
    }
    match reason & BASIC_REASON {
        reason::EXCEPTION_OR_NMI => {
            let info = vmread(ro::VMEXIT_INTERRUPTION_INFO);
            let error = if info & INTR_INFO_ERROR_VALID != 0 {
                vmread(ro::VMEXIT_INTERRUPTION_ERR_CODE)
            } else {
                0
            };
            Exit::Exception {
                vector: info as u8,
                error,
            }
        }
        reason::TRIPLE_FAULT => Exit::Shutdown,
        reason::HLT => {
            advance();
            Exit::Hlt
        }
        reason::VMCALL if passthrough => Exit::VirtInstruction,
        reason::VMCALL => {
            advance();
            Exit::Hypercall
        }
        reason::VMCLEAR..=reason::VMXON | reason::INVEPT | reason::INVVPID | reason::VMFUNC => {
            Exit::VirtInstruction
        }
        reason::RDMSR | reason::WRMSR => Exit::Msr {
            msr: gprs.rcx as u32,
            write: reason & BASIC_REASON == reason::WRMSR,
        },
        // String I/O (INS/OUTS) is not emulated: only plain IN/OUT ports are trapped.
        reason::IO_INSTRUCTION if qual & IO_QUAL_STRING != 0 => Exit::Unexpected {
            code: reason,
            detail: qual,
        },
        reason::IO_INSTRUCTION => {
            advance();
            Exit::Io {
                port: (qual >> IO_QUAL_PORT_SHIFT) as u16,
                size: (qual & IO_QUAL_SIZE) as u8 + 1,
                write: qual & IO_QUAL_IN == 0,
                value: rax as u32,
            }
        }
        reason::EPT_VIOLATION | reason::EPT_MISCONFIG => match ept::decode_vmx_exit(
            reason as u32,
            qual,
            vmread(ro::GUEST_PHYSICAL_ADDR_FULL),
            vmread(ro::GUEST_LINEAR_ADDR),
        ) {
            Ok(f) => Exit::Stage2Fault(f),
            Err(DecodeError::EptMisconfig { gpa }) => Exit::Misconfig {
                gpa,
                what: "EPT misconfiguration (exit 49)",
            },
            Err(_) => Exit::Unexpected {
                code: reason,
                detail: qual,
            },
        },
        n => Exit::Unexpected {
            code: n,
            detail: qual,
        },
    }
}
