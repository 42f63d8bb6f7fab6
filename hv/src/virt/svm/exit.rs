//! #VMEXIT decoding for SVM: the exit codes this kernel handles as named constants, and
//! `decode`, which reads EXITCODE / EXITINFO1 / EXITINFO2 of a VMCB into a backend-neutral
//! `Exit`.
//!
//! Invariants: `decode` runs right after the #VMEXIT of the vCPU that owns the VMCB; for HLT,
//! VMMCALL and IOIO exits it moves guest RIP past the instruction (NRIP when the CPU provides
//! it, EXITINFO2 for IOIO), for nested page faults, MSR and VMRUN intercepts it leaves RIP
//! alone (the access is retried, or an exception is injected at it), as `Vcpu::run` promises. Any exit it does not know becomes `Exit::Unexpected`
//! with the raw code.

use ept::DecodeError;

use super::vmcb::{Vmcb, EXITCODE, EXITINFO1, EXITINFO2, NEXT_RIP, RIP};
use crate::virt::vcpu::{Exit, Gprs};

/// Exit codes: AMD APM Vol. 2, appendix C "SVM Intercept Exit Codes".
pub mod code {
    /// 0x40 + vector: an intercepted exception (the exception intercepts are all set).
    pub const EXCP_BASE: u64 = 0x40;
    /// HLT.
    pub const HLT: u64 = 0x78;
    /// IN / OUT (with the I/O permission map intercepting every port).
    pub const IOIO: u64 = 0x7B;
    /// RDMSR / WRMSR (with the MSR permission map; EXITINFO1 0 = read, 1 = write).
    pub const MSR: u64 = 0x7C;
    /// Shutdown (triple fault).
    pub const SHUTDOWN: u64 = 0x7F;
    /// VMRUN (the guest's own).
    pub const VMRUN: u64 = 0x80;
    /// VMMCALL.
    pub const VMMCALL: u64 = 0x81;
    /// Nested page fault (APM Vol. 2 §15.25.6).
    pub const NPF: u64 = ept::fault::SVM_EXIT_NPF;
    /// VMRUN failed its consistency checks (VMEXIT_INVALID).
    pub const INVALID: u64 = u64::MAX;
}

/// EXITINFO1 of an IOIO intercept (APM Vol. 2 §15.10.2 "IN and OUT Behavior"): bit 0 type
/// (1 = IN), bits 4/5/6 operand size 8/16/32, bits 31:16 port. EXITINFO2 = the next RIP.
const IOIO_IN: u64 = 1 << 0;
const IOIO_STRING: u64 = 1 << 2;
const IOIO_SZ8: u64 = 1 << 4;
const IOIO_SZ16: u64 = 1 << 5;
const IOIO_PORT_SHIFT: u64 = 16;

/// Length of VMMCALL and HLT, for CPUs without NRIP save.
const VMMCALL_LEN: u64 = 3;
const HLT_LEN: u64 = 1;

/// Moves guest RIP past the intercepted instruction of length `len` (NRIP when available).
fn advance(vmcb: &mut Vmcb, nrips: bool, len: u64) {
    let next = if nrips { vmcb.r64(NEXT_RIP) } else { 0 };
    let rip = if next != 0 { next } else { vmcb.r64(RIP) + len };
    vmcb.w64(RIP, rip);
}

/// The exit that just happened on `vmcb`; `gprs` are the guest's registers (RAX: the value an
/// OUT wrote, RCX: the MSR number), `nrips` whether the CPU saves NRIP.
pub(super) fn decode(vmcb: &mut Vmcb, nrips: bool, gprs: &Gprs) -> Exit {
    let rax = gprs.rax;
    let exit = vmcb.r64(EXITCODE);
    let info1 = vmcb.r64(EXITINFO1);
    let info2 = vmcb.r64(EXITINFO2);
    match exit {
        code::VMMCALL => {
            advance(vmcb, nrips, VMMCALL_LEN);
            Exit::Hypercall
        }
        code::HLT => {
            advance(vmcb, nrips, HLT_LEN);
            Exit::Hlt
        }
        // String I/O (INS/OUTS) is not emulated: only plain IN/OUT ports are intercepted.
        code::IOIO if info1 & IOIO_STRING != 0 => Exit::Unexpected {
            code: code::IOIO,
            detail: info1,
        },
        code::IOIO => {
            // EXITINFO2 holds the RIP of the next instruction for IOIO intercepts.
            vmcb.w64(RIP, info2);
            let size = if info1 & IOIO_SZ8 != 0 {
                1
            } else if info1 & IOIO_SZ16 != 0 {
                2
            } else {
                4
            };
            Exit::Io {
                port: (info1 >> IOIO_PORT_SHIFT) as u16,
                size,
                write: info1 & IOIO_IN == 0,
                value: rax as u32,
            }
        }
        code::NPF => match ept::decode_npf(info1, info2) {
            Ok(f) => Exit::Stage2Fault(f),
            Err(DecodeError::NptMisconfig { gpa }) => Exit::Misconfig {
                gpa,
                what: "NPF with reserved bits (RSVD)",
            },
            Err(_) => Exit::Unexpected {
                code: code::NPF,
                detail: info1,
            },
        },
        code::SHUTDOWN => Exit::Shutdown,
        code::MSR => Exit::Msr {
            msr: gprs.rcx as u32,
            write: info1 & 1 != 0,
        },
        code::VMRUN => Exit::VirtInstruction,
        c if (code::EXCP_BASE..code::EXCP_BASE + 32).contains(&c) => Exit::Exception {
            vector: (c - code::EXCP_BASE) as u8,
            error: info1,
        },
        c => Exit::Unexpected {
            code: c,
            detail: info1,
        },
    }
}
