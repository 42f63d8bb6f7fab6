//! Intel VMX backend with EPT.
//!
//! Owns: CR4.VMXE, the VMXON region, the VM-execution controls (computed once from the
//! (TRUE_)capability MSRs), and one VMCS per vCPU. VMCS field encodings come from the `x86`
//! crate; INVEPT from `ept` (feature `hw`). The VMX instructions are small asm wrappers here
//! that test CF/ZF inside the same asm block (the `x86` crate 0.52 reads RFLAGS in a separate
//! block, and a VMWRITE was misreported as failed that way); the entry trampoline is entry.s.
//! Invariants: a VMCS is made current (VMPTRLD) before any VMREAD/VMWRITE or entry on its
//! behalf (`CURRENT` tracks which one is); a VMCS is VMLAUNCHed once and VMRESUMEd after;
//! guest GPRs live in `Gprs` and are swapped by the trampoline; an INVEPT single-context for
//! the vCPU's EPTP precedes the first entry after any change to its EPT.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicU64, Ordering};

use ept::vmx::{invept, InveptDescriptor, InveptKind};
use ept::DecodeError;
use x86::vmx::vmcs::{control, guest, host, ro};

use crate::platform::cpu::{self, rdmsr, wrmsr, MSR_EFER};
use crate::platform::frames;
use crate::virt::stage2::HvTable;
use crate::virt::vcpu::{Backend, Exit, Gprs, Vcpu, VcpuState};

core::arch::global_asm!(include_str!("entry.s"));

extern "C" {
    fn hv_vmx_enter(launched: u64, gprs: *mut Gprs) -> u64;
    fn hv_vmx_exit();
}

const IA32_FEATURE_CONTROL: u32 = 0x3A;
const IA32_VMX_BASIC: u32 = 0x480;
const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
const IA32_VMX_EXIT_CTLS: u32 = 0x483;
const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
const IA32_VMX_CR0_FIXED0: u32 = 0x486;
const IA32_VMX_CR0_FIXED1: u32 = 0x487;
const IA32_VMX_CR4_FIXED0: u32 = 0x488;
const IA32_VMX_CR4_FIXED1: u32 = 0x489;
const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48F;
const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;

const CR4_VMXE: u64 = 1 << 13;

/// The VMCS currently loaded on this CPU (physical address; 0 = none).
static CURRENT: AtomicU64 = AtomicU64::new(0);

pub struct Vmx {
    revision: u32,
    pin: u32,
    proc1: u32,
    proc2: u32,
    exit: u32,
    entry: u32,
    cr0_fixed: (u64, u64),
    cr4_fixed: (u64, u64),
}

/// `(want | allowed-0) & allowed-1`; an error if a wanted bit is not allowed.
fn adjust(want: u32, msr: u32, what: &'static str) -> Result<u32, &'static str> {
    let v = rdmsr(msr);
    let r = (want | v as u32) & (v >> 32) as u32;
    if r & want != want {
        return Err(what);
    }
    Ok(r)
}

/// Enters VMX operation. Fails with a reason when VMX or EPT is not usable.
pub fn init() -> Result<Vmx, &'static str> {
    let basic = rdmsr(IA32_VMX_BASIC);
    let revision = (basic & 0x7FFF_FFFF) as u32;
    let true_ctls = basic & (1 << 55) != 0;
    if rdmsr(IA32_VMX_PROCBASED_CTLS) & (1 << 63) == 0 {
        return Err("no secondary processor-based controls (so no EPT)");
    }
    if rdmsr(IA32_VMX_PROCBASED_CTLS2) & (1 << 33) == 0 {
        return Err("enable-EPT not allowed");
    }
    let cap = rdmsr(IA32_VMX_EPT_VPID_CAP);
    if cap & (1 << 6) == 0
        || cap & (1 << 14) == 0
        || cap & (1 << 20) == 0
        || cap & (3 << 25) != 3 << 25
    {
        return Err("EPT lacks 4-level walks, WB tables, or single- and all-context INVEPT");
    }
    let fc = rdmsr(IA32_FEATURE_CONTROL);
    if fc & 1 == 0 {
        wrmsr(IA32_FEATURE_CONTROL, fc | 0x5);
    } else if fc & 0x4 == 0 {
        return Err("VMX outside SMX disabled by firmware (IA32_FEATURE_CONTROL locked)");
    }
    let cr0_fixed = (rdmsr(IA32_VMX_CR0_FIXED0), rdmsr(IA32_VMX_CR0_FIXED1));
    let cr4_fixed = (rdmsr(IA32_VMX_CR4_FIXED0), rdmsr(IA32_VMX_CR4_FIXED1));
    cpu::set_cr0((cpu::cr0() | cr0_fixed.0) & cr0_fixed.1);
    cpu::set_cr4((cpu::cr4() | CR4_VMXE | cr4_fixed.0) & cr4_fixed.1);

    let (pin_msr, proc_msr, exit_msr, entry_msr) = if true_ctls {
        (
            IA32_VMX_TRUE_PINBASED_CTLS,
            IA32_VMX_TRUE_PROCBASED_CTLS,
            IA32_VMX_TRUE_EXIT_CTLS,
            IA32_VMX_TRUE_ENTRY_CTLS,
        )
    } else {
        (
            IA32_VMX_PINBASED_CTLS,
            IA32_VMX_PROCBASED_CTLS,
            IA32_VMX_EXIT_CTLS,
            IA32_VMX_ENTRY_CTLS,
        )
    };
    let pin = adjust(0, pin_msr, "pin-based controls")?;
    // HLT exiting (7), unconditional I/O exiting (24), secondary controls (31).
    let proc1 = adjust(
        (1 << 7) | (1 << 24) | (1 << 31),
        proc_msr,
        "processor-based controls",
    )?;
    // Enable EPT (1).
    let proc2 = adjust(1 << 1, IA32_VMX_PROCBASED_CTLS2, "secondary controls")?;
    // Host address-space size (9), save EFER (20), load EFER (21).
    let exit = adjust(
        (1 << 9) | (1 << 20) | (1 << 21),
        exit_msr,
        "VM-exit controls",
    )?;
    // IA-32e mode guest (9), load EFER (15).
    let entry = adjust((1 << 9) | (1 << 15), entry_msr, "VM-entry controls")?;

    let region = frames::alloc_zeroed().ok_or("no memory for the VMXON region")?;
    unsafe { (region as *mut u32).write_volatile(revision) };
    if !vmxon(region) {
        return Err("VMXON failed");
    }
    crate::println!(
        "vmx: VMXON ok (revision {:#x}, TRUE controls {}); EPT cap {:#x}; controls pin {:#x} proc {:#x} proc2 {:#x} exit {:#x} entry {:#x}",
        revision, true_ctls, cap, pin, proc1, proc2, exit, entry
    );
    Ok(Vmx {
        revision,
        pin,
        proc1,
        proc2,
        exit,
        entry,
        cr0_fixed,
        cr4_fixed,
    })
}

/// VMXON / VMCLEAR / VMPTRLD of the 4 KiB region at physical `pa`; false on VMfail.
macro_rules! vmx_region_insn {
    ($name:ident, $insn:literal) => {
        fn $name(pa: u64) -> bool {
            let fail: u8;
            unsafe {
                core::arch::asm!(concat!($insn, " qword ptr [{p}]"), "setna {r}", p = in(reg) &pa, r = out(reg_byte) fail, options(nostack));
            }
            fail == 0
        }
    };
}
vmx_region_insn!(vmxon, "vmxon");
vmx_region_insn!(vmclear, "vmclear");
vmx_region_insn!(vmptrld, "vmptrld");

/// VMWRITE with the VMfail check in the same asm block.
fn vmwrite(field: u32, v: u64) -> bool {
    let fail: u8;
    unsafe {
        core::arch::asm!("vmwrite {f}, {v}", "setna {r}", f = in(reg) field as u64, v = in(reg) v, r = out(reg_byte) fail, options(nostack));
    }
    fail == 0
}

fn w(field: u32, v: u64, failed: &mut Option<u32>) {
    if !vmwrite(field, v) && failed.is_none() {
        *failed = Some(field);
    }
}

/// VMREAD (0 on VMfail).
fn r(field: u32) -> u64 {
    let v: u64;
    let fail: u8;
    unsafe {
        core::arch::asm!("vmread {v}, {f}", "setna {r}", f = in(reg) field as u64, v = out(reg) v, r = out(reg_byte) fail, options(nostack));
    }
    if fail == 0 {
        v
    } else {
        0
    }
}

fn make_current(vmcs: u64) -> bool {
    if CURRENT.load(Ordering::Relaxed) == vmcs {
        return true;
    }
    let ok = vmptrld(vmcs);
    if ok {
        CURRENT.store(vmcs, Ordering::Relaxed);
    }
    ok
}

pub struct VmxVcpu {
    vmcs: u64,
    eptp: u64,
    gprs: Gprs,
    launched: bool,
    flush_next: bool,
}

impl Backend for Vmx {
    fn name(&self) -> &'static str {
        "vmx"
    }

    fn new_stage2(&self) -> Result<HvTable, ept::Error> {
        // SAFETY: `init` entered VMX root operation and checked single-context INVEPT; the
        // capability MSR check also covers all-context (bit 26) below.
        unsafe { HvTable::new_ept() }
    }

    fn new_vcpu(&mut self, st: &VcpuState, eptp: u64) -> Result<Box<dyn Vcpu>, &'static str> {
        let vmcs = frames::alloc_zeroed().ok_or("no memory for a VMCS")?;
        unsafe { (vmcs as *mut u32).write_volatile(self.revision) };
        if !vmclear(vmcs) {
            frames::free(vmcs);
            return Err("VMCLEAR failed");
        }
        CURRENT.store(0, Ordering::Relaxed);
        if !make_current(vmcs) {
            frames::free(vmcs);
            return Err("VMPTRLD failed");
        }
        let mut f = None;
        let f = &mut f;
        w(control::PINBASED_EXEC_CONTROLS, self.pin as u64, f);
        w(
            control::PRIMARY_PROCBASED_EXEC_CONTROLS,
            self.proc1 as u64,
            f,
        );
        w(
            control::SECONDARY_PROCBASED_EXEC_CONTROLS,
            self.proc2 as u64,
            f,
        );
        w(control::VMEXIT_CONTROLS, self.exit as u64, f);
        w(control::VMENTRY_CONTROLS, self.entry as u64, f);
        w(control::EXCEPTION_BITMAP, 0xFFFF_FFFF, f);
        w(control::PAGE_FAULT_ERR_CODE_MASK, 0, f);
        w(control::PAGE_FAULT_ERR_CODE_MATCH, 0, f);
        w(control::CR3_TARGET_COUNT, 0, f);
        w(control::VMEXIT_MSR_STORE_COUNT, 0, f);
        w(control::VMEXIT_MSR_LOAD_COUNT, 0, f);
        w(control::VMENTRY_MSR_LOAD_COUNT, 0, f);
        w(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0, f);
        w(control::EPTP_FULL, eptp, f);
        w(control::CR0_GUEST_HOST_MASK, 0, f);
        w(control::CR4_GUEST_HOST_MASK, 0, f);
        w(control::CR0_READ_SHADOW, st.cr0, f);
        w(control::CR4_READ_SHADOW, st.cr4, f);

        // Host state: this kernel, resuming at hv_vmx_exit (HOST_RSP is set by the trampoline).
        w(host::CR0, cpu::cr0(), f);
        w(host::CR3, cpu::cr3(), f);
        w(host::CR4, cpu::cr4(), f);
        w(host::CS_SELECTOR, cpu::SEL_CODE as u64, f);
        for sel in [
            host::SS_SELECTOR,
            host::DS_SELECTOR,
            host::ES_SELECTOR,
            host::FS_SELECTOR,
            host::GS_SELECTOR,
        ] {
            w(sel, cpu::SEL_DATA as u64, f);
        }
        w(host::TR_SELECTOR, cpu::SEL_TSS as u64, f);
        w(host::FS_BASE, 0, f);
        w(host::GS_BASE, 0, f);
        w(host::TR_BASE, cpu::tss_base(), f);
        let gdt = cpu::sgdt();
        let idt = cpu::sidt();
        w(host::GDTR_BASE, gdt.base, f);
        w(host::IDTR_BASE, idt.base, f);
        w(host::IA32_SYSENTER_CS, 0, f);
        w(host::IA32_SYSENTER_ESP, 0, f);
        w(host::IA32_SYSENTER_EIP, 0, f);
        w(host::IA32_EFER_FULL, rdmsr(MSR_EFER), f);
        w(host::RIP, hv_vmx_exit as *const () as u64, f);

        // Guest state: 64-bit, CPL0, flat segments.
        w(
            guest::CR0,
            (st.cr0 | self.cr0_fixed.0) & self.cr0_fixed.1,
            f,
        );
        w(guest::CR3, st.cr3, f);
        w(
            guest::CR4,
            (st.cr4 | CR4_VMXE | self.cr4_fixed.0) & self.cr4_fixed.1,
            f,
        );
        w(guest::DR7, 0x400, f);
        w(guest::RFLAGS, st.rflags, f);
        w(guest::RIP, st.rip, f);
        w(guest::RSP, st.rsp, f);
        w(guest::CS_SELECTOR, 0x08, f);
        w(guest::CS_BASE, 0, f);
        w(guest::CS_LIMIT, 0xFFFF_FFFF, f);
        w(guest::CS_ACCESS_RIGHTS, 0xA09B, f);
        for (sel, base, limit, ar) in [
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
        ] {
            w(sel, 0x10, f);
            w(base, 0, f);
            w(limit, 0xFFFF_FFFF, f);
            w(ar, 0xC093, f);
        }
        w(guest::LDTR_SELECTOR, 0, f);
        w(guest::LDTR_BASE, 0, f);
        w(guest::LDTR_LIMIT, 0, f);
        w(guest::LDTR_ACCESS_RIGHTS, 0x10000, f);
        w(guest::TR_SELECTOR, 0x18, f);
        w(guest::TR_BASE, 0, f);
        w(guest::TR_LIMIT, 0x67, f);
        w(guest::TR_ACCESS_RIGHTS, 0x8B, f);
        w(guest::GDTR_BASE, 0, f);
        w(guest::GDTR_LIMIT, 0xFFFF, f);
        w(guest::IDTR_BASE, 0, f);
        w(guest::IDTR_LIMIT, 0, f);
        w(guest::IA32_EFER_FULL, st.efer, f);
        w(guest::IA32_DEBUGCTL_FULL, 0, f);
        w(guest::IA32_SYSENTER_CS, 0, f);
        w(guest::IA32_SYSENTER_ESP, 0, f);
        w(guest::IA32_SYSENTER_EIP, 0, f);
        w(guest::LINK_PTR_FULL, u64::MAX, f);
        w(guest::INTERRUPTIBILITY_STATE, 0, f);
        w(guest::ACTIVITY_STATE, 0, f);
        w(guest::PENDING_DBG_EXCEPTIONS, 0, f);
        if let Some(field) = *f {
            crate::println!("vmx: VMWRITE of field {:#x} failed", field);
            frames::free(vmcs);
            return Err("VMWRITE failed while building a VMCS");
        }
        Ok(Box::new(VmxVcpu {
            vmcs,
            eptp,
            gprs: st.gprs,
            launched: false,
            flush_next: true,
        }))
    }

    fn hypercall_insn(&self) -> [u8; 3] {
        [0x0F, 0x01, 0xC1] // VMCALL
    }
}

impl VmxVcpu {
    fn advance(&mut self) {
        let len = r(ro::VMEXIT_INSTRUCTION_LEN);
        let mut f = None;
        w(guest::RIP, r(guest::RIP) + len, &mut f);
    }
}

impl Vcpu for VmxVcpu {
    fn run(&mut self) -> Exit {
        if !make_current(self.vmcs) {
            return Exit::Unexpected {
                code: u64::MAX,
                detail: 0,
            };
        }
        if self.flush_next {
            // A new EPTP may equal that of a freed table whose translations are still cached.
            if unsafe { invept(InveptKind::SingleContext, &InveptDescriptor::new(self.eptp)) }
                .is_err()
            {
                return Exit::Unexpected {
                    code: u64::MAX - 1,
                    detail: self.eptp,
                };
            }
            self.flush_next = false;
        }
        let rc = unsafe { hv_vmx_enter(self.launched as u64, &mut self.gprs) };
        if rc != 0 {
            // VMfail: 1 = invalid (no current VMCS), 2 = valid (see VM-instruction error).
            let err = if rc == 2 {
                r(ro::VM_INSTRUCTION_ERROR)
            } else {
                0
            };
            return Exit::Unexpected {
                code: 0xF000_0000 | rc,
                detail: err,
            };
        }
        self.launched = true;
        let reason = r(ro::EXIT_REASON);
        let qual = r(ro::EXIT_QUALIFICATION);
        if reason & (1 << 31) != 0 {
            return Exit::Unexpected {
                code: reason,
                detail: qual,
            };
        }
        match reason & 0xFFFF {
            0 => {
                let info = r(ro::VMEXIT_INTERRUPTION_INFO);
                let error = if info & (1 << 11) != 0 {
                    r(ro::VMEXIT_INTERRUPTION_ERR_CODE)
                } else {
                    0
                };
                Exit::Exception {
                    vector: info as u8,
                    error,
                }
            }
            2 => Exit::Shutdown,
            12 => {
                self.advance();
                Exit::Hlt
            }
            18 => {
                self.advance();
                Exit::Hypercall
            }
            30 => {
                self.advance();
                Exit::Io {
                    port: (qual >> 16) as u16,
                    size: (qual & 7) as u8 + 1,
                    write: qual & (1 << 3) == 0,
                    value: self.gprs.rax as u32,
                }
            }
            48 | 49 => match ept::decode_vmx_exit(
                reason as u32,
                qual,
                r(ro::GUEST_PHYSICAL_ADDR_FULL),
                r(ro::GUEST_LINEAR_ADDR),
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

    fn gprs(&mut self) -> &mut Gprs {
        &mut self.gprs
    }

    fn rip(&self) -> u64 {
        make_current(self.vmcs);
        r(guest::RIP)
    }

    fn state(&self) -> VcpuState {
        make_current(self.vmcs);
        VcpuState {
            gprs: self.gprs,
            rip: r(guest::RIP),
            rsp: r(guest::RSP),
            rflags: r(guest::RFLAGS),
            cr0: r(guest::CR0),
            cr3: r(guest::CR3),
            cr4: r(guest::CR4),
            efer: r(guest::IA32_EFER_FULL),
        }
    }

    fn tlb_control(&mut self, _value: u8) {
        // The EPT table's hook executes INVEPT itself.
    }
}

impl Drop for VmxVcpu {
    fn drop(&mut self) {
        vmclear(self.vmcs);
        if CURRENT.load(Ordering::Relaxed) == self.vmcs {
            CURRENT.store(0, Ordering::Relaxed);
        }
        frames::free(self.vmcs);
    }
}
