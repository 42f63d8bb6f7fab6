//! `FaultInfo`: one description of a second-level fault, whichever hardware reported it.
//!
//! Decoders for the VMX EPT-violation exit (reason 48, exit qualification + GPA) and the SVM
//! nested page fault (#VMEXIT 0x400, EXITINFO1/EXITINFO2) produce it; guest-vm's KVM backend
//! builds it from a userfaultfd event. The memory model's `Vmar::handle_fault` consumes it.
//!
//! The decoders are total: every input yields a `FaultInfo` or a `DecodeError`, never a panic.
//! Reasons that are not second-level faults, and misconfigurations (EPT exit 49, NPF with RSVD
//! set: the table holds an entry the CPU rejects, a hypervisor bug rather than a guest access),
//! are errors so the fault path never sees them.

bitflags::bitflags! {
    /// The access that faulted.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Access: u8 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const EXEC = 1 << 2;
    }
}

/// Whether a translation existed for the faulting address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// No second-level translation (entry not present at some level).
    NotPresent,
    /// A translation exists but lacks a permission the access needs.
    Permission,
}

/// A second-level fault, ready for the memory model's fault path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultInfo {
    /// Faulting guest-physical address (not page-aligned: the exact byte).
    pub gpa: u64,
    pub access: Access,
    pub kind: FaultKind,
    /// Guest-linear address, when the hardware reports a valid one.
    pub gla: Option<u64>,
    /// The access was the guest's own page-table walk (EPT qualification bit 8 clear with bit 7
    /// set; NPF EXITINFO1 bit 33), not the final translation.
    pub guest_walk: bool,
    /// VMX: NMI unblocking due to IRET (qualification bit 12); the hypervisor must re-block NMIs
    /// before resuming. Always `false` on SVM and KVM.
    pub nmi_unblocking: bool,
}

impl FaultInfo {
    /// A fault as raised by software (a device, the VMM, a test CPU): exact GPA and access, no
    /// linear address.
    pub fn new(gpa: u64, access: Access, kind: FaultKind) -> Self {
        FaultInfo {
            gpa,
            access,
            kind,
            gla: None,
            guest_walk: false,
            nmi_unblocking: false,
        }
    }
}

/// VMX basic exit reason: EPT violation.
pub const VMX_EXIT_EPT_VIOLATION: u32 = 48;
/// VMX basic exit reason: EPT misconfiguration.
pub const VMX_EXIT_EPT_MISCONFIG: u32 = 49;
/// SVM exit code: nested page fault.
pub const SVM_EXIT_NPF: u64 = 0x400;

/// Why an exit could not be decoded into a `FaultInfo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The exit is not a second-level fault (another reason, or a failed VM entry).
    NotAFault,
    /// VMX exit 49: an EPT entry on the walk for `gpa` is misconfigured.
    EptMisconfig { gpa: u64 },
    /// SVM NPF with EXITINFO1.RSVD: a nested entry on the walk for `gpa` has reserved bits set.
    NptMisconfig { gpa: u64 },
    /// An EPT violation whose qualification names no access (bits 2:0 all clear).
    NoAccess { qualification: u64 },
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DecodeError::NotAFault => f.write_str("exit is not a second-level fault"),
            DecodeError::EptMisconfig { gpa } => write!(f, "EPT misconfiguration at {gpa:#x}"),
            DecodeError::NptMisconfig { gpa } => {
                write!(f, "nested page table reserved bits at {gpa:#x}")
            }
            DecodeError::NoAccess { qualification } => {
                write!(f, "EPT violation without access type ({qualification:#x})")
            }
        }
    }
}

/// EPT-violation exit-qualification bits (SDM vol. 3C, table "Exit Qualification for EPT
/// Violations").
pub mod ept_qual {
    pub const READ: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
    pub const FETCH: u64 = 1 << 2;
    /// Bits 5:3: the R/W/X permissions of the translation (AND over the walked entries).
    pub const ENTRY_READABLE: u64 = 1 << 3;
    pub const ENTRY_WRITABLE: u64 = 1 << 4;
    pub const ENTRY_EXECUTABLE: u64 = 1 << 5;
    pub const GLA_VALID: u64 = 1 << 7;
    /// With `GLA_VALID`: set = access to the final translation of the linear address, clear =
    /// access to a guest paging-structure entry.
    pub const FINAL_TRANSLATION: u64 = 1 << 8;
    pub const NMI_UNBLOCKING: u64 = 1 << 12;
}

/// NPF EXITINFO1 bits (APM vol. 2, "Nested Page Fault").
pub mod npf_info {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
    pub const USER: u64 = 1 << 2;
    pub const RESERVED: u64 = 1 << 3;
    pub const FETCH: u64 = 1 << 4;
    pub const FINAL_TRANSLATION: u64 = 1 << 32;
    pub const GUEST_PAGE_TABLE: u64 = 1 << 33;
}

/// Decodes a VMX exit. `exit_reason` is the VMCS exit-reason field (basic reason in bits 15:0,
/// bit 31 = VM-entry failure); `qualification`, `gpa` (guest-physical address field) and `gla`
/// (guest-linear address field, used only when the qualification says it is valid) come from
/// the VMCS.
pub fn decode_vmx_exit(
    exit_reason: u32,
    qualification: u64,
    gpa: u64,
    gla: u64,
) -> Result<FaultInfo, DecodeError> {
    if exit_reason & (1 << 31) != 0 {
        return Err(DecodeError::NotAFault);
    }
    match exit_reason & 0xffff {
        VMX_EXIT_EPT_VIOLATION => decode_ept_violation(qualification, gpa, gla),
        VMX_EXIT_EPT_MISCONFIG => Err(DecodeError::EptMisconfig { gpa }),
        _ => Err(DecodeError::NotAFault),
    }
}

/// Decodes an EPT violation (exit reason 48) from its exit qualification.
pub fn decode_ept_violation(
    qualification: u64,
    gpa: u64,
    gla: u64,
) -> Result<FaultInfo, DecodeError> {
    use ept_qual::*;
    let mut access = Access::empty();
    access.set(Access::READ, qualification & READ != 0);
    access.set(Access::WRITE, qualification & WRITE != 0);
    access.set(Access::EXEC, qualification & FETCH != 0);
    if access.is_empty() {
        return Err(DecodeError::NoAccess { qualification });
    }
    let kind = if qualification & (ENTRY_READABLE | ENTRY_WRITABLE | ENTRY_EXECUTABLE) == 0 {
        FaultKind::NotPresent
    } else {
        FaultKind::Permission
    };
    let gla_valid = qualification & GLA_VALID != 0;
    Ok(FaultInfo {
        gpa,
        access,
        kind,
        gla: gla_valid.then_some(gla),
        guest_walk: gla_valid && qualification & FINAL_TRANSLATION == 0,
        nmi_unblocking: qualification & NMI_UNBLOCKING != 0,
    })
}

/// Decodes an SVM #VMEXIT: `exit_code` (VMCB EXITCODE), `exit_info1` (NPF error code),
/// `exit_info2` (faulting guest-physical address).
pub fn decode_svm_exit(
    exit_code: u64,
    exit_info1: u64,
    exit_info2: u64,
) -> Result<FaultInfo, DecodeError> {
    if exit_code != SVM_EXIT_NPF {
        return Err(DecodeError::NotAFault);
    }
    decode_npf(exit_info1, exit_info2)
}

/// Decodes a nested page fault from EXITINFO1 (error code) and EXITINFO2 (GPA). The access is
/// EXEC when ID is set, else WRITE when RW is set, else READ. The US bit is not carried
/// (nested walks always run as user accesses).
pub fn decode_npf(exit_info1: u64, gpa: u64) -> Result<FaultInfo, DecodeError> {
    use npf_info::*;
    if exit_info1 & RESERVED != 0 {
        return Err(DecodeError::NptMisconfig { gpa });
    }
    let access = if exit_info1 & FETCH != 0 {
        Access::EXEC
    } else if exit_info1 & WRITE != 0 {
        Access::WRITE
    } else {
        Access::READ
    };
    let kind = if exit_info1 & PRESENT != 0 {
        FaultKind::Permission
    } else {
        FaultKind::NotPresent
    };
    Ok(FaultInfo {
        gpa,
        access,
        kind,
        gla: None,
        guest_walk: exit_info1 & GUEST_PAGE_TABLE != 0,
        nmi_unblocking: false,
    })
}
