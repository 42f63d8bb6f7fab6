//! The VMCS: the VMX instructions that act on VMCS regions and fields (VMXON, VMCLEAR,
//! VMPTRLD, `vmread`, `vmwrite`), which VMCS is current, and the contents of a new vCPU's
//! VMCS (controls, host state = this kernel, guest state = a 64-bit flat CPL0 guest, or the
//! Linux 32-bit boot state of a pass-through guest).
//!
//! Field encodings come from the `x86` crate (Intel SDM Vol. 3, appendix B "Field Encoding in
//! VMCS"); the VMCS layout itself is processor-private and only reached through
//! VMREAD/VMWRITE. Each wrapper tests CF/ZF inside its own asm block (the `x86` crate 0.52 reads
//! RFLAGS in a separate block, and a VMWRITE was misreported as failed that way).
//!
//! Invariants: a VMCS is made current (`make_current`) before any `vmread`/`vmwrite` or entry
//! on its behalf, and `CURRENT` always names the current VMCS (0 = none): a VMCLEAR of the
//! current VMCS resets it (`cleared`). A VMCS region stays allocated while it is active
//! (between its VMCLEAR at creation and its VMCLEAR before it is freed).
//!
//! Soundness: VMXON, VMCLEAR and VMPTRLD hand a 4 KiB region to the processor, which may read
//! and write it until it is cleared (VMCS) or VMX operation ends (VMXON region): they are
//! `unsafe fn`s whose callers own such a region. VMREAD and VMWRITE touch only the current
//! VMCS, which the processor owns, and fail cleanly (VMfail) without one; what the fields
//! *mean* matters at VM entry, and the entry (`hv_vmx_enter`) is the unsafe step argued in
//! mod.rs.

use core::sync::atomic::{AtomicU64, Ordering};

use x86::vmx::vmcs::{control, guest, host};

use crate::platform::cpu::{self, rdmsr, MSR_EFER};
use crate::virt::vcpu::{BootEntry32, VcpuState};

/// CR4.VMXE (SDM Vol. 3, "Enabling and Entering VMX Operation"): set in the host and, through
/// the CR4 fixed bits, in every guest.
pub(super) const CR4_VMXE: u64 = 1 << 13;

/// What every VMCS of this CPU gets: the VM-execution, exit and entry controls as the
/// capability MSRs allow them, and the CR0/CR4 fixed bits (FIXED0, FIXED1) guests must obey.
pub(super) struct Controls {
    pub(super) pin: u32,
    pub(super) proc1: u32,
    pub(super) proc2: u32,
    pub(super) exit: u32,
    pub(super) entry: u32,
    pub(super) cr0_fixed: (u64, u64),
    pub(super) cr4_fixed: (u64, u64),
}

/// The VMCS currently loaded on this CPU (physical address; 0 = none).
static CURRENT: AtomicU64 = AtomicU64::new(0);

/// VMXON / VMCLEAR / VMPTRLD of the 4 KiB region at physical `pa`; false on VMfail.
macro_rules! vmx_region_insn {
    ($(#[$doc:meta])* $name:ident, $insn:literal) => {
        $(#[$doc])*
        pub(super) unsafe fn $name(pa: u64) -> bool {
            let fail: u8;
            // SAFETY: the operand is `pa`, a live u64 on the stack (the instruction reads its
            // 8 bytes); the region it names is the caller's, per this function's contract.
            unsafe {
                core::arch::asm!(concat!($insn, " qword ptr [{p}]"), "setna {r}", p = in(reg) &pa, r = out(reg_byte) fail, options(nostack));
            }
            fail == 0
        }
    };
}
vmx_region_insn!(
    /// Enters VMX root operation with the VMXON region at `pa`.
    ///
    /// # Safety
    /// `pa` is a 4 KiB-aligned frame holding the VMCS revision id, owned by the caller for as
    /// long as VMX operation lasts (for this kernel: forever); CR0/CR4 satisfy the VMX fixed
    /// bits and CR4.VMXE is set.
    vmxon,
    "vmxon"
);
vmx_region_insn!(
    /// Makes the VMCS at `pa` inactive and clear (the processor writes back its cached data).
    ///
    /// # Safety
    /// `pa` is a 4 KiB-aligned frame owned by the caller as a VMCS region, in VMX root
    /// operation.
    vmclear,
    "vmclear"
);
vmx_region_insn!(
    /// Makes the VMCS at `pa` current (use `make_current`, which keeps `CURRENT` right).
    ///
    /// # Safety
    /// As for `vmclear`; the region stays allocated until it is VMCLEARed again.
    vmptrld,
    "vmptrld"
);

/// VMWRITE of `v` into `field` of the current VMCS; false on VMfail (no current VMCS, an
/// unsupported or read-only field).
pub(super) fn vmwrite(field: u32, v: u64) -> bool {
    let fail: u8;
    // SAFETY: VMWRITE only changes the current VMCS, memory the processor owns (module doc);
    // without a current VMCS it fails with VMfail, which `setna` reports.
    unsafe {
        core::arch::asm!("vmwrite {f}, {v}", "setna {r}", f = in(reg) field as u64, v = in(reg) v, r = out(reg_byte) fail, options(nostack));
    }
    fail == 0
}

/// VMREAD of `field` of the current VMCS (0 on VMfail).
pub(super) fn vmread(field: u32) -> u64 {
    let v: u64;
    let fail: u8;
    // SAFETY: VMREAD only reads the current VMCS into a register; without one it fails with
    // VMfail, which `setna` reports.
    unsafe {
        core::arch::asm!("vmread {v}, {f}", "setna {r}", f = in(reg) field as u64, v = out(reg) v, r = out(reg_byte) fail, options(nostack));
    }
    if fail == 0 {
        v
    } else {
        0
    }
}

/// Makes `vmcs` current unless it already is; false on VMfail.
///
/// # Safety
/// As for `vmptrld`: `vmcs` is a VMCS region the caller owns.
pub(super) unsafe fn make_current(vmcs: u64) -> bool {
    if CURRENT.load(Ordering::Relaxed) == vmcs {
        return true;
    }
    // SAFETY: the caller owns `vmcs` as a VMCS region (this function's contract).
    let ok = unsafe { vmptrld(vmcs) };
    if ok {
        CURRENT.store(vmcs, Ordering::Relaxed);
    }
    ok
}

/// Records that `vmcs` was VMCLEARed: it is no longer current.
pub(super) fn cleared(vmcs: u64) {
    if CURRENT.load(Ordering::Relaxed) == vmcs {
        CURRENT.store(0, Ordering::Relaxed);
    }
}

/// Forgets which VMCS is current (after VMCLEAR of a region that may have been current).
pub(super) fn forget_current() {
    CURRENT.store(0, Ordering::Relaxed);
}

/// VMWRITEs that remember the first field that failed (so one check covers a whole VMCS).
struct Writes {
    failed: Option<u32>,
}

impl Writes {
    fn vmwrite(&mut self, field: u32, v: u64) {
        if !vmwrite(field, v) && self.failed.is_none() {
            self.failed = Some(field);
        }
    }
}

/// The VM-execution, exit and entry controls every VMCS here gets: `vmx`, exceptions that
/// exit (`exception_bitmap`), no CR3 targets, no MSR load/store lists, no event to inject,
/// the EPTP.
fn controls(f: &mut Writes, vmx: &Controls, eptp: u64, exception_bitmap: u64) {
    f.vmwrite(control::PINBASED_EXEC_CONTROLS, vmx.pin as u64);
    f.vmwrite(control::PRIMARY_PROCBASED_EXEC_CONTROLS, vmx.proc1 as u64);
    f.vmwrite(control::SECONDARY_PROCBASED_EXEC_CONTROLS, vmx.proc2 as u64);
    f.vmwrite(control::VMEXIT_CONTROLS, vmx.exit as u64);
    f.vmwrite(control::VMENTRY_CONTROLS, vmx.entry as u64);
    f.vmwrite(control::EXCEPTION_BITMAP, exception_bitmap);
    f.vmwrite(control::PAGE_FAULT_ERR_CODE_MASK, 0);
    f.vmwrite(control::PAGE_FAULT_ERR_CODE_MATCH, 0);
    f.vmwrite(control::CR3_TARGET_COUNT, 0);
    f.vmwrite(control::VMEXIT_MSR_STORE_COUNT, 0);
    f.vmwrite(control::VMEXIT_MSR_LOAD_COUNT, 0);
    f.vmwrite(control::VMENTRY_MSR_LOAD_COUNT, 0);
    f.vmwrite(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
    f.vmwrite(control::EPTP_FULL, eptp);
}

/// Guest state both kinds of vCPU start with: no LDT, no SYSENTER target, debug control
/// clear, no VMCS link, active, interruptible, no pending debug exceptions.
fn guest_common(f: &mut Writes) {
    f.vmwrite(guest::LDTR_SELECTOR, 0);
    f.vmwrite(guest::LDTR_BASE, 0);
    f.vmwrite(guest::LDTR_LIMIT, 0);
    f.vmwrite(guest::LDTR_ACCESS_RIGHTS, 0x10000);
    f.vmwrite(guest::IA32_DEBUGCTL_FULL, 0);
    f.vmwrite(guest::IA32_SYSENTER_CS, 0);
    f.vmwrite(guest::IA32_SYSENTER_ESP, 0);
    f.vmwrite(guest::IA32_SYSENTER_EIP, 0);
    f.vmwrite(guest::LINK_PTR_FULL, u64::MAX);
    f.vmwrite(guest::INTERRUPTIBILITY_STATE, 0);
    f.vmwrite(guest::ACTIVITY_STATE, 0);
    f.vmwrite(guest::PENDING_DBG_EXCEPTIONS, 0);
}

/// Host state: this kernel, resuming at `host_rip` (HOST_RSP is written by the entry
/// trampoline).
fn host_state(f: &mut Writes, host_rip: u64) {
    f.vmwrite(host::CR0, cpu::cr0());
    f.vmwrite(host::CR3, cpu::cr3());
    f.vmwrite(host::CR4, cpu::cr4());
    f.vmwrite(host::CS_SELECTOR, cpu::SEL_CODE as u64);
    for sel in [
        host::SS_SELECTOR,
        host::DS_SELECTOR,
        host::ES_SELECTOR,
        host::FS_SELECTOR,
        host::GS_SELECTOR,
    ] {
        f.vmwrite(sel, cpu::SEL_DATA as u64);
    }
    f.vmwrite(host::TR_SELECTOR, cpu::SEL_TSS as u64);
    f.vmwrite(host::FS_BASE, 0);
    f.vmwrite(host::GS_BASE, 0);
    f.vmwrite(host::TR_BASE, cpu::tss_base());
    let gdt = cpu::sgdt();
    let idt = cpu::sidt();
    f.vmwrite(host::GDTR_BASE, gdt.base);
    f.vmwrite(host::IDTR_BASE, idt.base);
    f.vmwrite(host::IA32_SYSENTER_CS, 0);
    f.vmwrite(host::IA32_SYSENTER_ESP, 0);
    f.vmwrite(host::IA32_SYSENTER_EIP, 0);
    f.vmwrite(host::IA32_EFER_FULL, rdmsr(MSR_EFER));
    f.vmwrite(host::RIP, host_rip);
}

/// Fills the current VMCS for a vCPU that starts from `st` and translates through `eptp`:
/// the controls `vmx`, host state = this kernel resuming at `host_rip` (HOST_RSP is
/// written by the entry trampoline), guest state = 64-bit, CPL0, flat segments. Returns the
/// first field whose VMWRITE failed.
pub(super) fn fill(vmx: &Controls, st: &VcpuState, eptp: u64, host_rip: u64) -> Result<(), u32> {
    let mut w = Writes { failed: None };
    let f = &mut w;
    controls(f, vmx, eptp, 0xFFFF_FFFF);
    f.vmwrite(control::CR0_GUEST_HOST_MASK, 0);
    f.vmwrite(control::CR4_GUEST_HOST_MASK, 0);
    f.vmwrite(control::CR0_READ_SHADOW, st.cr0);
    f.vmwrite(control::CR4_READ_SHADOW, st.cr4);

    host_state(f, host_rip);

    // Guest state: 64-bit, CPL0, flat segments.
    f.vmwrite(guest::CR0, (st.cr0 | vmx.cr0_fixed.0) & vmx.cr0_fixed.1);
    f.vmwrite(guest::CR3, st.cr3);
    f.vmwrite(
        guest::CR4,
        (st.cr4 | CR4_VMXE | vmx.cr4_fixed.0) & vmx.cr4_fixed.1,
    );
    f.vmwrite(guest::DR7, 0x400);
    f.vmwrite(guest::RFLAGS, st.rflags);
    f.vmwrite(guest::RIP, st.rip);
    f.vmwrite(guest::RSP, st.rsp);
    f.vmwrite(guest::CS_SELECTOR, 0x08);
    f.vmwrite(guest::CS_BASE, 0);
    f.vmwrite(guest::CS_LIMIT, 0xFFFF_FFFF);
    f.vmwrite(guest::CS_ACCESS_RIGHTS, 0xA09B);
    for (sel, base, limit, ar) in DATA_SEGMENTS {
        f.vmwrite(sel, 0x10);
        f.vmwrite(base, 0);
        f.vmwrite(limit, 0xFFFF_FFFF);
        f.vmwrite(ar, 0xC093);
    }
    f.vmwrite(guest::TR_SELECTOR, 0x18);
    f.vmwrite(guest::TR_BASE, 0);
    f.vmwrite(guest::TR_LIMIT, 0x67);
    f.vmwrite(guest::TR_ACCESS_RIGHTS, 0x8B);
    f.vmwrite(guest::GDTR_BASE, 0);
    f.vmwrite(guest::GDTR_LIMIT, 0xFFFF);
    f.vmwrite(guest::IDTR_BASE, 0);
    f.vmwrite(guest::IDTR_LIMIT, 0);
    f.vmwrite(guest::IA32_EFER_FULL, st.efer);
    guest_common(f);
    match w.failed {
        None => Ok(()),
        Some(field) => Err(field),
    }
}

/// The permission maps of a pass-through vCPU: I/O bitmaps A (ports 0–0x7FFF) and B, and the
/// MSR bitmap (physical addresses of frames the vCPU owns).
pub(super) struct PassthroughMaps {
    pub io_a: u64,
    pub io_b: u64,
    pub msr: u64,
}

/// Fills the current VMCS for a pass-through vCPU (the controls `vmx` from
/// `Vmx::passthrough`, the permission maps `maps`) starting at `entry` — the Linux 32-bit boot
/// protocol's state: protected mode without paging (unrestricted guest), flat segments code
/// 0x10 / data 0x18, interrupts off, ESI = the zero page (in `Gprs`, not here). No exception
/// exits; CR4.VMXE is the host's (masked, the guest reads 0 and cannot change it).
pub(super) fn fill_passthrough(
    vmx: &Controls,
    entry: &BootEntry32,
    eptp: u64,
    host_rip: u64,
    maps: &PassthroughMaps,
) -> Result<(), u32> {
    let mut w = Writes { failed: None };
    let f = &mut w;
    controls(f, vmx, eptp, 0);
    f.vmwrite(control::IO_BITMAP_A_ADDR_FULL, maps.io_a);
    f.vmwrite(control::IO_BITMAP_B_ADDR_FULL, maps.io_b);
    f.vmwrite(control::MSR_BITMAPS_ADDR_FULL, maps.msr);
    f.vmwrite(control::CR0_GUEST_HOST_MASK, 0);
    f.vmwrite(control::CR4_GUEST_HOST_MASK, CR4_VMXE);
    f.vmwrite(control::CR0_READ_SHADOW, 0);
    f.vmwrite(control::CR4_READ_SHADOW, 0);
    host_state(f, host_rip);
    if vmx.exit & EXIT_LOAD_PAT != 0 {
        f.vmwrite(host::IA32_PAT_FULL, rdmsr(MSR_PAT));
    }

    // CR0: PE, ET and whatever else FIXED0 demands except PE/PG (unrestricted guest).
    let cr0 = ((CR0_PE | CR0_ET) | (vmx.cr0_fixed.0 & !(CR0_PE | CR0_PG))) & vmx.cr0_fixed.1;
    f.vmwrite(guest::CR0, cr0);
    f.vmwrite(guest::CR3, 0);
    f.vmwrite(guest::CR4, (CR4_VMXE | vmx.cr4_fixed.0) & vmx.cr4_fixed.1);
    f.vmwrite(guest::DR7, 0x400);
    f.vmwrite(guest::RFLAGS, 0x2);
    f.vmwrite(guest::RIP, u64::from(entry.eip));
    f.vmwrite(guest::RSP, 0);
    f.vmwrite(guest::CS_SELECTOR, 0x10);
    f.vmwrite(guest::CS_BASE, 0);
    f.vmwrite(guest::CS_LIMIT, 0xFFFF_FFFF);
    f.vmwrite(guest::CS_ACCESS_RIGHTS, 0xC09B);
    for (sel, base, limit, ar) in DATA_SEGMENTS {
        f.vmwrite(sel, 0x18);
        f.vmwrite(base, 0);
        f.vmwrite(limit, 0xFFFF_FFFF);
        f.vmwrite(ar, 0xC093);
    }
    f.vmwrite(guest::TR_SELECTOR, 0);
    f.vmwrite(guest::TR_BASE, 0);
    f.vmwrite(guest::TR_LIMIT, 0x67);
    f.vmwrite(guest::TR_ACCESS_RIGHTS, 0x8B);
    f.vmwrite(guest::GDTR_BASE, 0);
    f.vmwrite(guest::GDTR_LIMIT, 0);
    f.vmwrite(guest::IDTR_BASE, 0);
    f.vmwrite(guest::IDTR_LIMIT, 0);
    f.vmwrite(guest::IA32_EFER_FULL, 0);
    if vmx.entry & ENTRY_LOAD_PAT != 0 {
        f.vmwrite(guest::IA32_PAT_FULL, 0x0007_0406_0007_0406);
    }
    guest_common(f);
    match w.failed {
        None => Ok(()),
        Some(field) => Err(field),
    }
}

/// CR0 bits the pass-through guest starts with or may clear (SDM Vol. 3 §2.5).
const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
/// IA32_PAT, and the exit / entry controls that switch it (SDM Vol. 3, "VM-Exit Controls",
/// "VM-Entry Controls").
const MSR_PAT: u32 = 0x277;
pub(super) const EXIT_SAVE_PAT: u32 = 1 << 18;
pub(super) const EXIT_LOAD_PAT: u32 = 1 << 19;
pub(super) const ENTRY_LOAD_PAT: u32 = 1 << 14;

/// The data segment registers' (selector, base, limit, access rights) fields.
const DATA_SEGMENTS: [(u32, u32, u32, u32); 5] = [
    (
        guest::SS_SELECTOR,
        guest::SS_BASE,
        guest::SS_LIMIT,
        guest::SS_ACCESS_RIGHTS,
    ),
    (
        guest::DS_SELECTOR,
        guest::DS_BASE,
        guest::DS_LIMIT,
        guest::DS_ACCESS_RIGHTS,
    ),
    (
        guest::ES_SELECTOR,
        guest::ES_BASE,
        guest::ES_LIMIT,
        guest::ES_ACCESS_RIGHTS,
    ),
    (
        guest::FS_SELECTOR,
        guest::FS_BASE,
        guest::FS_LIMIT,
        guest::FS_ACCESS_RIGHTS,
    ),
    (
        guest::GS_SELECTOR,
        guest::GS_BASE,
        guest::GS_LIMIT,
        guest::GS_ACCESS_RIGHTS,
    ),
];
