//! The backend-neutral vCPU model: guest registers, the architectural state a fork copies, the
//! exits the scenario handles, and the `Vcpu` / `Backend` traits both hardware backends
//! (svm/, vmx/) implement. Nothing here knows a vendor.
//!
//! Invariants: after `Vcpu::run` returns, `gprs()` holds the guest's general registers as the
//! guest left them; for `Hypercall`, `Hlt` and `Io` exits the guest RIP already points past the
//! instruction, so resuming continues the guest; for `Stage2Fault` RIP is unchanged (the access
//! is retried after the fault is resolved).

use alloc::boxed::Box;

use ept::FaultInfo;

use crate::virt::stage2::HvTable;

/// Guest general-purpose registers except RSP (which lives in the VMCS/VMCB). The order is
/// fixed: the shared save/restore macros of gprs.s index it (pinned by the asserts below).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Gprs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

// The offsets gprs.s and vmx/entry.s hard-code.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(offset_of!(Gprs, rax) == 0);
    assert!(offset_of!(Gprs, rbx) == 8);
    assert!(offset_of!(Gprs, rcx) == 16);
    assert!(offset_of!(Gprs, rdx) == 24);
    assert!(offset_of!(Gprs, rsi) == 32);
    assert!(offset_of!(Gprs, rdi) == 40);
    assert!(offset_of!(Gprs, rbp) == 48);
    assert!(offset_of!(Gprs, r8) == 56);
    assert!(offset_of!(Gprs, r15) == 112);
    assert!(size_of::<Gprs>() == 120);
};

/// What a fork copies from parent to child, and what a new vCPU starts from. The guest runs in
/// 64-bit mode at CPL0 with flat segments (code 0x08, data 0x10).
#[derive(Clone, Copy, Debug)]
pub struct VcpuState {
    pub gprs: Gprs,
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// Why the guest stopped running.
#[derive(Clone, Copy, Debug)]
pub enum Exit {
    /// VMCALL / VMMCALL: number in RAX, arguments in RDI, RSI, RDX; result goes in RAX.
    Hypercall,
    /// HLT: the guest is done (or idle).
    Hlt,
    /// Port I/O (`value` is what an OUT wrote; an IN reads all ones).
    Io {
        port: u16,
        size: u8,
        write: bool,
        value: u32,
    },
    /// Second-level fault (EPT violation / NPF), decoded.
    Stage2Fault(FaultInfo),
    /// The second-level table is malformed at `gpa` (EPT misconfiguration, exit 49; or an NPF
    /// with the reserved-bit flag); the guest cannot continue. `what` names the hardware report.
    Misconfig { gpa: u64, what: &'static str },
    /// An exception in the guest (intercepted; the guest has no IDT of its own).
    Exception { vector: u8, error: u64 },
    /// Triple fault / shutdown.
    Shutdown,
    /// An intercepted RDMSR / WRMSR (the pass-through guest: only the MSRs that would reach
    /// the hypervisor's own state are intercepted). RIP still points at the instruction.
    Msr { msr: u32, write: bool },
    /// The pass-through guest executed a virtualization instruction hv does not offer it (SVM:
    /// VMRUN, always intercepted; VMX: VMCALL, VMXON and the other VMX instructions, which
    /// always exit). RIP still points at it.
    VirtInstruction,
    /// VM entry failed or an exit the hypervisor does not handle.
    Unexpected { code: u64, detail: u64 },
}

/// Where a pass-through guest starts: the Linux 32-bit boot protocol's state — protected mode
/// with paging off, flat 4 GiB code segment 0x10 and data segments 0x18, interrupts off,
/// `eip` the kernel's 32-bit entry and `esi` the boot parameters ("zero page").
#[derive(Clone, Copy, Debug)]
pub struct BootEntry32 {
    pub eip: u32,
    pub esi: u32,
}

/// Ports a pass-through guest's IN/OUT on which exit to the hypervisor; every other port goes
/// to the machine's device directly.
pub const MAX_TRAPPED_PORTS: usize = 4;

/// One virtual CPU on one of the hardware backends.
pub trait Vcpu {
    fn run(&mut self) -> Exit;
    fn gprs(&mut self) -> &mut Gprs;
    fn rip(&self) -> u64;
    /// The state a fork copies.
    fn state(&self) -> VcpuState;
    /// A deferred second-level flush from the table's hook: the SVM TLB_CONTROL value the next
    /// VMRUN must carry. VMX ignores it (its hook ran INVEPT already).
    fn tlb_control(&mut self, value: u8);
    /// Delivers exception `vector` (with `error_code` if it has one) to the guest at its next
    /// entry, as if the instruction at RIP had raised it.
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>);
}

/// A hardware backend: makes second-level tables of its format and vCPUs that use them.
pub trait Backend {
    fn name(&self) -> &'static str;
    /// A fresh, empty second-level table of this backend's format.
    fn new_stage2(&self) -> Result<HvTable, ept::Error>;
    /// A vCPU starting from `state` that translates through the table with `context` (EPTP
    /// value or nCR3, from `HvTable::context`).
    fn new_vcpu(&mut self, state: &VcpuState, context: u64) -> Result<Box<dyn Vcpu>, &'static str>;
    /// Bytes of the hypercall instruction (patched into guest payloads).
    fn hypercall_insn(&self) -> [u8; 3];
    /// A vCPU for a pass-through guest (the machine's own devices, interrupts delivered to the
    /// guest directly) starting at `entry`, translating through `context`; only the ports in
    /// `trapped_ports` (at most `MAX_TRAPPED_PORTS`) exit on I/O. What else exits is the
    /// backend's to say (svm: VMRUN, shutdown, nested page faults and writes of the SVM MSRs;
    /// vmx: what always exits, EPT violations, writes of IA32_FEATURE_CONTROL).
    fn new_passthrough_vcpu(
        &mut self,
        entry: &BootEntry32,
        context: u64,
        trapped_ports: &[u16],
    ) -> Result<Box<dyn Vcpu>, &'static str>;
}
