//! `FaultInfo`: one description of a second-level fault, whichever hardware reported it.
//!
//! Decoders for the VMX EPT-violation exit (reason 48, exit qualification + GPA) and the SVM
//! nested page fault (#VMEXIT 0x400, EXITINFO1/EXITINFO2) produce it; guest-vm's KVM backend
//! builds it from a userfaultfd event. The memory model's `Vmar::handle_fault` consumes it.

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
