//! Intel VMX backend with EPT.
//!
//! Owns: CR4.VMXE, the VMXON region, the VM-execution controls (computed once from the
//! (TRUE_)capability MSRs, SDM Vol. 3 appendix A), and one VMCS per vCPU. INVEPT comes from
//! `ept` (feature `hw`).
//!
//! One job per file:
//! - `mod.rs` — VMX capabilities and VMXON (`init`), the `Backend` (`Vmx`) and the `Vcpu`
//!   (`VmxVcpu`: entry, exit, its VMCS's life cycle).
//! - `vmcs` — the VMCS instructions (`vmread`, `vmwrite`, VMPTRLD, VMCLEAR, VMXON), which VMCS
//!   is current, and what a new vCPU's VMCS holds.
//! - `exit` — the exit reasons as named constants and their decoding into `Exit`.
//! - `entry.s` — the world switch (`hv_vmx_enter` / `hv_vmx_exit`), around the shared guest
//!   GPR save/restore of `../gprs.s`.
//!
//! Invariants: a VMCS is made current before any `vmread`/`vmwrite` or entry on its behalf
//! (vmcs.rs tracks which one is); a VMCS is VMLAUNCHed once and VMRESUMEd after, and VMCLEARed
//! before its frame is freed; guest GPRs live in `Gprs` and are swapped by the trampoline; an
//! INVEPT single-context for the vCPU's EPTP precedes its first entry (later EPT changes are
//! flushed by the table's INVEPT hook).

pub mod exit;
pub mod vmcs;

use alloc::boxed::Box;

use ept::vmx::{invept, InveptDescriptor, InveptKind};
use x86::vmx::vmcs::{guest, ro};

use crate::platform::cpu::{self, rdmsr, wrmsr};
use crate::platform::frames;
use crate::virt::stage2::HvTable;
use crate::virt::vcpu::{Backend, BootEntry32, Exit, Gprs, Vcpu, VcpuState};
use vmcs::{Controls, CR4_VMXE};

core::arch::global_asm!(
    include_str!("../gprs.s"),
    include_str!("entry.s"),
    ".purgem GUEST_GPRS_LOAD",
    ".purgem GUEST_GPRS_SAVE",
);

extern "C" {
    /// entry.s: writes HOST_RSP, loads the guest GPRs from `*gprs` and runs VMLAUNCH
    /// (`launched == 0`) or VMRESUME. Returns 0 after a VM exit (guest GPRs stored back), 1 on
    /// VMfailInvalid, 2 on VMfailValid.
    fn hv_vmx_enter(launched: u64, gprs: *mut Gprs) -> u64;
    /// entry.s: HOST_RIP, where a VM exit lands; not callable from Rust.
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

/// IA32_VMX_BASIC (SDM Vol. 3, appendix A.1 "Basic VMX Information"): bits 30:0 VMCS
/// revision id, bit 55 TRUE capability MSRs present.
const BASIC_REVISION: u64 = 0x7FFF_FFFF;
const BASIC_TRUE_CTLS: u64 = 1 << 55;
/// Allowed-1 half of IA32_VMX_PROCBASED_CTLS: "activate secondary controls" may be set.
const PROCBASED_SECONDARY_ALLOWED: u64 = 1 << 63;
/// Allowed-1 half of IA32_VMX_PROCBASED_CTLS2: "enable EPT" may be set.
const PROCBASED2_EPT_ALLOWED: u64 = 1 << 33;
/// IA32_VMX_EPT_VPID_CAP (SDM Vol. 3, appendix A.10 "VPID and EPT Capabilities"): 4-level
/// page walk (6), write-back paging structures (14), INVEPT (20), single-context (25) and
/// all-context (26) INVEPT.
const EPT_CAP_WALK4: u64 = 1 << 6;
const EPT_CAP_WB: u64 = 1 << 14;
const EPT_CAP_INVEPT: u64 = 1 << 20;
const EPT_CAP_INVEPT_SINGLE_ALL: u64 = 3 << 25;
/// IA32_FEATURE_CONTROL: lock (0), VMX outside SMX (2).
const FEATURE_CONTROL_LOCK: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;

/// Primary processor-based VM-execution controls (SDM Vol. 3, table "Definitions of Primary
/// Processor-Based VM-Execution Controls").
const PROC_HLT_EXITING: u32 = 1 << 7;
const PROC_UNCOND_IO_EXITING: u32 = 1 << 24;
const PROC_ACTIVATE_SECONDARY: u32 = 1 << 31;
/// Primary controls of the pass-through vCPU: I/O and MSR bitmaps instead of exiting on all.
const PROC_USE_IO_BITMAPS: u32 = 1 << 25;
const PROC_USE_MSR_BITMAPS: u32 = 1 << 28;
/// Secondary processor-based controls (table "Definitions of Secondary Processor-Based
/// VM-Execution Controls"): enable EPT; for the pass-through vCPU also enable RDTSCP (1 << 3),
/// unrestricted guest (1 << 7: protected mode without paging, as Linux is entered) and enable
/// INVPCID (1 << 12) — without the last two's controls the instructions #UD in the guest.
const PROC2_ENABLE_EPT: u32 = 1 << 1;
const PROC2_ENABLE_RDTSCP: u32 = 1 << 3;
const PROC2_UNRESTRICTED_GUEST: u32 = 1 << 7;
const PROC2_ENABLE_INVPCID: u32 = 1 << 12;
/// VM-exit controls (table "Definitions of VM-Exit Controls").
const EXIT_HOST_ADDR_SPACE_SIZE: u32 = 1 << 9;
const EXIT_SAVE_EFER: u32 = 1 << 20;
const EXIT_LOAD_EFER: u32 = 1 << 21;
/// VM-entry controls (table "Definitions of VM-Entry Controls").
const ENTRY_IA32E_GUEST: u32 = 1 << 9;
const ENTRY_LOAD_EFER: u32 = 1 << 15;

/// The VMX backend after VMXON: the VMCS revision id, what every scenario VMCS gets, and the
/// controls of a pass-through vCPU (or why this CPU cannot run one).
pub struct Vmx {
    revision: u32,
    controls: Controls,
    passthrough: Result<Controls, &'static str>,
}

/// MSRs a pass-through guest may not write: IA32_FEATURE_CONTROL (it could lock VMX off for
/// the hypervisor). A write raises #GP in the guest; reads pass through.
const GUEST_WRITE_PROTECTED_MSRS: [u32; 1] = [IA32_FEATURE_CONTROL];

/// The controls of a pass-through vCPU as this CPU allows them: EPT and unrestricted guest
/// required; RDTSCP, INVPCID and the PAT switch where allowed.
fn passthrough_controls(
    msrs: (u32, u32, u32, u32),
    fixed: ((u64, u64), (u64, u64)),
) -> Result<Controls, &'static str> {
    let (pin_msr, proc_msr, exit_msr, entry_msr) = msrs;
    let allowed = |msr: u32, bits: u32| (rdmsr(msr) >> 32) as u32 & bits;
    let pin = adjust(0, pin_msr, "pass-through pin-based controls")?;
    let proc1 = adjust(
        PROC_USE_IO_BITMAPS | PROC_USE_MSR_BITMAPS | PROC_ACTIVATE_SECONDARY,
        proc_msr,
        "pass-through processor-based controls",
    )?;
    if proc1 & (PROC_HLT_EXITING | PROC_UNCOND_IO_EXITING) != 0 {
        return Err("HLT or unconditional I/O exiting cannot be turned off");
    }
    let optional2 = allowed(
        IA32_VMX_PROCBASED_CTLS2,
        PROC2_ENABLE_RDTSCP | PROC2_ENABLE_INVPCID,
    );
    let proc2 = adjust(
        PROC2_ENABLE_EPT | PROC2_UNRESTRICTED_GUEST | optional2,
        IA32_VMX_PROCBASED_CTLS2,
        "unrestricted guest (protected mode without paging under EPT)",
    )?;
    let pat = allowed(exit_msr, vmcs::EXIT_SAVE_PAT | vmcs::EXIT_LOAD_PAT)
        == vmcs::EXIT_SAVE_PAT | vmcs::EXIT_LOAD_PAT
        && allowed(entry_msr, vmcs::ENTRY_LOAD_PAT) != 0;
    let exit = adjust(
        EXIT_HOST_ADDR_SPACE_SIZE
            | EXIT_SAVE_EFER
            | EXIT_LOAD_EFER
            | if pat {
                vmcs::EXIT_SAVE_PAT | vmcs::EXIT_LOAD_PAT
            } else {
                0
            },
        exit_msr,
        "pass-through VM-exit controls",
    )?;
    let entry = adjust(
        ENTRY_LOAD_EFER | if pat { vmcs::ENTRY_LOAD_PAT } else { 0 },
        entry_msr,
        "pass-through VM-entry controls",
    )?;
    Ok(Controls {
        pin,
        proc1,
        proc2,
        exit,
        entry,
        cr0_fixed: fixed.0,
        cr4_fixed: fixed.1,
    })
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
    let revision = (basic & BASIC_REVISION) as u32;
    let true_ctls = basic & BASIC_TRUE_CTLS != 0;
    if rdmsr(IA32_VMX_PROCBASED_CTLS) & PROCBASED_SECONDARY_ALLOWED == 0 {
        return Err("no secondary processor-based controls (so no EPT)");
    }
    if rdmsr(IA32_VMX_PROCBASED_CTLS2) & PROCBASED2_EPT_ALLOWED == 0 {
        return Err("enable-EPT not allowed");
    }
    let cap = rdmsr(IA32_VMX_EPT_VPID_CAP);
    if cap & EPT_CAP_WALK4 == 0
        || cap & EPT_CAP_WB == 0
        || cap & EPT_CAP_INVEPT == 0
        || cap & EPT_CAP_INVEPT_SINGLE_ALL != EPT_CAP_INVEPT_SINGLE_ALL
    {
        return Err("EPT lacks 4-level walks, WB tables, or single- and all-context INVEPT");
    }
    let fc = rdmsr(IA32_FEATURE_CONTROL);
    if fc & FEATURE_CONTROL_LOCK == 0 {
        wrmsr(
            IA32_FEATURE_CONTROL,
            fc | FEATURE_CONTROL_LOCK | FEATURE_CONTROL_VMX_OUTSIDE_SMX,
        );
    } else if fc & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
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
    let proc1 = adjust(
        PROC_HLT_EXITING | PROC_UNCOND_IO_EXITING | PROC_ACTIVATE_SECONDARY,
        proc_msr,
        "processor-based controls",
    )?;
    let proc2 = adjust(
        PROC2_ENABLE_EPT,
        IA32_VMX_PROCBASED_CTLS2,
        "secondary controls",
    )?;
    let exit = adjust(
        EXIT_HOST_ADDR_SPACE_SIZE | EXIT_SAVE_EFER | EXIT_LOAD_EFER,
        exit_msr,
        "VM-exit controls",
    )?;
    let entry = adjust(
        ENTRY_IA32E_GUEST | ENTRY_LOAD_EFER,
        entry_msr,
        "VM-entry controls",
    )?;

    let region = frames::alloc_zeroed().ok_or("no memory for the VMXON region")?;
    // SAFETY: `alloc_zeroed` just handed this identity-mapped 4 KiB frame to us alone.
    unsafe { (region as *mut u32).write_volatile(revision) };
    // SAFETY: `region` is an aligned frame holding the revision id that is never freed (VMX
    // operation lasts until the run ends); CR0/CR4 were just set to the fixed bits with VMXE.
    if !unsafe { vmcs::vmxon(region) } {
        return Err("VMXON failed");
    }
    crate::platform::serial::println!(
        "vmx: VMXON ok (revision {:#x}, TRUE controls {}); EPT cap {:#x}; controls pin {:#x} proc {:#x} proc2 {:#x} exit {:#x} entry {:#x}",
        revision, true_ctls, cap, pin, proc1, proc2, exit, entry
    );
    let passthrough = passthrough_controls(
        (pin_msr, proc_msr, exit_msr, entry_msr),
        (cr0_fixed, cr4_fixed),
    );
    Ok(Vmx {
        revision,
        passthrough,
        controls: Controls {
            pin,
            proc1,
            proc2,
            exit,
            entry,
            cr0_fixed,
            cr4_fixed,
        },
    })
}

pub struct VmxVcpu {
    /// The VMCS region (a frame owned by this vCPU, VMCLEARed and freed on drop).
    vmcs: u64,
    eptp: u64,
    gprs: Gprs,
    launched: bool,
    flush_next: bool,
    /// A pass-through vCPU: its own permission maps (freed on drop) and which optional
    /// instructions its controls enable (CPUID hides the others).
    passthrough: Option<(vmcs::PassthroughMaps, CpuidPolicy)>,
}

/// What CPUID hides from a pass-through guest: always VMX (hv offers no nested VMX) and XSAVE
/// with what needs it (XSETBV would exit, and hv keeps the host's XCR0); RDTSCP and INVPCID
/// when the VMX controls that allow them in a guest are not available.
#[derive(Clone, Copy)]
struct CpuidPolicy {
    rdtscp: bool,
    invpcid: bool,
}

impl CpuidPolicy {
    /// The guest's view of CPUID leaf `leaf`, subleaf `sub`.
    fn answer(&self, leaf: u32, sub: u32) -> [u32; 4] {
        let r = cpu::cpuid(leaf, sub);
        let [mut a, mut b, mut c, mut d] = [r.eax, r.ebx, r.ecx, r.edx];
        match leaf {
            // ECX: VMX (5), XSAVE (26), OSXSAVE (27), AVX (28), F16C (29), FMA (12).
            1 => c &= !((1 << 5) | (1 << 12) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29)),
            // EBX: AVX2 (5), INVPCID (10), the AVX-512 family (16, 17, 21, 26–28, 30, 31).
            7 if sub == 0 => {
                b &= !((1 << 5) | (1 << 16) | (1 << 17) | (1 << 21) | (7 << 26) | (3 << 30));
                if !self.invpcid {
                    b &= !(1 << 10);
                }
            }
            // The XSAVE leaf describes nothing once XSAVE is hidden.
            0xD => [a, b, c, d] = [0; 4],
            // EDX: RDTSCP (27).
            0x8000_0001 if !self.rdtscp => d &= !(1 << 27),
            _ => {}
        }
        [a, b, c, d]
    }
}

/// VM-exit IDT-vectoring information / VM-entry interruption information (SDM Vol. 3,
/// "Information for VM Exits During Event Delivery"): valid (31), error code valid (11), type
/// (10:8; 4–6 are software events that need an instruction length), vector (7:0).
const EVENT_VALID: u64 = 1 << 31;
const EVENT_ERROR_VALID: u64 = 1 << 11;
const EVENT_FORMAT: u64 = EVENT_VALID | EVENT_ERROR_VALID | 0x7FF;

impl Backend for Vmx {
    fn name(&self) -> &'static str {
        "vmx"
    }

    fn new_stage2(&self) -> Result<HvTable, ept::Error> {
        // SAFETY: `init` entered VMX root operation (which lasts for the rest of the run) and
        // checked IA32_VMX_EPT_VPID_CAP for INVEPT with single- and all-context types.
        unsafe { HvTable::new_ept() }
    }

    fn new_vcpu(&mut self, st: &VcpuState, eptp: u64) -> Result<Box<dyn Vcpu>, &'static str> {
        let vmcs = frames::alloc_zeroed().ok_or("no memory for a VMCS")?;
        // SAFETY: `alloc_zeroed` just handed this identity-mapped 4 KiB frame to us alone.
        unsafe { (vmcs as *mut u32).write_volatile(self.revision) };
        // From here on `vcpu` owns the frame: its drop VMCLEARs and frees it on every error.
        let vcpu = VmxVcpu {
            vmcs,
            eptp,
            gprs: st.gprs,
            launched: false,
            flush_next: true,
            passthrough: None,
        };
        // SAFETY: `vmcs` is an aligned frame with the revision id, owned by `vcpu`; VMX root
        // operation since `init`.
        if !unsafe { vmcs::vmclear(vmcs) } {
            return Err("VMCLEAR failed");
        }
        vmcs::forget_current();
        // SAFETY: as for the VMCLEAR: a VMCS region owned by `vcpu`.
        if !unsafe { vmcs::make_current(vmcs) } {
            return Err("VMPTRLD failed");
        }
        if let Err(field) = vmcs::fill(&self.controls, st, eptp, hv_vmx_exit as *const () as u64) {
            crate::platform::serial::println!("vmx: VMWRITE of field {:#x} failed", field);
            return Err("VMWRITE failed while building a VMCS");
        }
        Ok(Box::new(vcpu))
    }

    fn hypercall_insn(&self) -> [u8; 3] {
        [0x0F, 0x01, 0xC1] // VMCALL
    }

    /// The pass-through guest. Exits, and why (everything else runs on the machine):
    /// - what VMX always exits on: CPUID (answered inside `run`, hiding what hv does not
    ///   virtualize: `CpuidPolicy`), the VMX instructions and VMCALL (#UD: no nested VMX),
    ///   triple fault, INIT/SIPI, XSETBV/INVD/GETSEC (stop the guest: hidden or never used);
    /// - EPT violations and misconfigurations: every RAM page arrives through
    ///   `Vmar::handle_fault`;
    /// - IN/OUT on `trapped_ports` only (I/O bitmaps), writes of IA32_FEATURE_CONTROL (MSR
    ///   bitmap: #GP), and any RDMSR/WRMSR outside the bitmap's ranges (#GP);
    /// - a guest write that would clear CR4.VMXE's mask (never: the guest reads VMXE as 0).
    ///
    /// Not intercepted: exceptions, external interrupts and NMIs (delivered through the guest's
    /// IDT; an event cut short by an exit is re-injected), HLT, CR0/CR3 accesses, every other
    /// port and MSR. The guest's STAR/LSTAR/SFMASK/KERNEL_GS_BASE live in the CPU itself (hv
    /// uses none of them); EFER, PAT (where the controls allow), SYSENTER, FS/GS/TR/LDTR are
    /// switched by the VMCS.
    fn new_passthrough_vcpu(
        &mut self,
        entry: &BootEntry32,
        eptp: u64,
        trapped_ports: &[u16],
    ) -> Result<Box<dyn Vcpu>, &'static str> {
        let controls = self.passthrough.as_ref().map_err(|e| *e)?;
        if trapped_ports.len() > crate::virt::vcpu::MAX_TRAPPED_PORTS {
            return Err("too many trapped ports");
        }
        let mut got = [0u64; 4];
        for i in 0..got.len() {
            match frames::alloc_zeroed() {
                Some(f) => got[i] = f,
                None => {
                    for &f in &got[..i] {
                        // SAFETY: allocated just above, never handed to the processor.
                        unsafe { frames::free(f) };
                    }
                    return Err("no memory for a pass-through VMCS and its bitmaps");
                }
            }
        }
        let [vmcs, io_a, io_b, msr] = got;
        // SAFETY: the four frames were just handed to us alone (zeroed: nothing trapped); each
        // write stays inside its 4 KiB bitmap (a port's bit in A or B; IA32_FEATURE_CONTROL's
        // write bit at 0x800 + 0x3A / 8 in the low-MSR write half), and the VMCS gets its
        // revision id.
        unsafe {
            (vmcs as *mut u32).write_volatile(self.revision);
            for &port in trapped_ports {
                let map = if port < 0x8000 { io_a } else { io_b };
                let bit = u64::from(port & 0x7FFF);
                *((map + bit / 8) as *mut u8) |= 1 << (bit % 8);
            }
            for m in GUEST_WRITE_PROTECTED_MSRS {
                *((msr + 0x800 + u64::from(m) / 8) as *mut u8) |= 1 << (m % 8);
            }
        }
        let policy = CpuidPolicy {
            rdtscp: controls.proc2 & PROC2_ENABLE_RDTSCP != 0,
            invpcid: controls.proc2 & PROC2_ENABLE_INVPCID != 0,
        };
        let maps = vmcs::PassthroughMaps { io_a, io_b, msr };
        // From here on `vcpu` owns the frames: its drop VMCLEARs and frees them on every error.
        let vcpu = VmxVcpu {
            vmcs,
            eptp,
            gprs: Gprs {
                rsi: u64::from(entry.esi),
                ..Gprs::default()
            },
            launched: false,
            flush_next: true,
            passthrough: Some((maps, policy)),
        };
        // SAFETY: `vmcs` is an aligned frame with the revision id, owned by `vcpu`; VMX root
        // operation since `init`.
        if !unsafe { vmcs::vmclear(vmcs) } {
            return Err("VMCLEAR failed");
        }
        vmcs::forget_current();
        // SAFETY: as for the VMCLEAR: a VMCS region owned by `vcpu`.
        if !unsafe { vmcs::make_current(vmcs) } {
            return Err("VMPTRLD failed");
        }
        let maps = &vcpu.passthrough.as_ref().map(|p| &p.0).ok_or("no maps")?;
        if let Err(field) =
            vmcs::fill_passthrough(controls, entry, eptp, hv_vmx_exit as *const () as u64, maps)
        {
            crate::platform::serial::println!("vmx: VMWRITE of field {:#x} failed", field);
            return Err("VMWRITE failed while building a pass-through VMCS");
        }
        crate::platform::serial::println!(
            "vmx: pass-through vCPU: controls pin {:#x} proc {:#x} proc2 {:#x} exit {:#x} entry {:#x}",
            controls.pin, controls.proc1, controls.proc2, controls.exit, controls.entry
        );
        Ok(Box::new(vcpu))
    }
}

impl VmxVcpu {
    /// Makes this vCPU's VMCS current; false on VMfail.
    fn make_current(&self) -> bool {
        // SAFETY: `self.vmcs` is the VMCS region this vCPU owns until its drop.
        unsafe { vmcs::make_current(self.vmcs) }
    }

    /// After a pass-through guest's exit (its VMCS current): re-inject an event whose delivery
    /// the exit cut short (IDT-vectoring information), or it would be lost; and keep the
    /// "IA-32e mode guest" entry control equal to the guest's EFER.LMA, which the guest
    /// changes itself when it enters long mode.
    fn after_passthrough_exit(&mut self) {
        use x86::vmx::vmcs::control;
        let vectoring = vmcs::vmread(ro::IDT_VECTORING_INFO);
        if vectoring & EVENT_VALID != 0 {
            vmcs::vmwrite(
                control::VMENTRY_INTERRUPTION_INFO_FIELD,
                vectoring & EVENT_FORMAT,
            );
            if vectoring & EVENT_ERROR_VALID != 0 {
                vmcs::vmwrite(
                    control::VMENTRY_EXCEPTION_ERR_CODE,
                    vmcs::vmread(ro::IDT_VECTORING_ERR_CODE),
                );
            }
            if (4..=6).contains(&((vectoring >> 8) & 7)) {
                vmcs::vmwrite(
                    control::VMENTRY_INSTRUCTION_LEN,
                    vmcs::vmread(ro::VMEXIT_INSTRUCTION_LEN),
                );
            }
        }
        const EFER_LMA: u64 = 1 << 10;
        let entry = vmcs::vmread(control::VMENTRY_CONTROLS);
        let want = if vmcs::vmread(guest::IA32_EFER_FULL) & EFER_LMA != 0 {
            entry | u64::from(ENTRY_IA32E_GUEST)
        } else {
            entry & !u64::from(ENTRY_IA32E_GUEST)
        };
        if want != entry {
            vmcs::vmwrite(control::VMENTRY_CONTROLS, want);
        }
    }
}

impl Vcpu for VmxVcpu {
    fn run(&mut self) -> Exit {
        if !self.make_current() {
            return Exit::Unexpected {
                code: u64::MAX,
                detail: 0,
            };
        }
        if self.flush_next {
            // A new EPTP may equal that of a freed table whose translations are still cached.
            // SAFETY: VMX root operation since `init`, which checked single-context INVEPT.
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
        // SAFETY: this vCPU's VMCS is current and was filled by `vmcs::fill`: host state is
        // this kernel (its CR0/CR3/CR4, GDT, TSS, EFER) resuming at `hv_vmx_exit`, which
        // restores the callee-saved registers and the stack `hv_vmx_enter` saved, so the call
        // behaves as an ordinary extern "C" call. The guest runs only in the memory its EPT
        // (built by the Vmar from frames it owns) maps. `gprs` is valid for the call.
        let rc = unsafe { hv_vmx_enter(self.launched as u64, &mut self.gprs) };
        if rc != 0 {
            // VMfail: 1 = invalid (no current VMCS), 2 = valid (see VM-instruction error).
            let err = if rc == 2 {
                vmcs::vmread(ro::VM_INSTRUCTION_ERROR)
            } else {
                0
            };
            return Exit::Unexpected {
                code: 0xF000_0000 | rc,
                detail: err,
            };
        }
        self.launched = true;
        if let Some((_, policy)) = self.passthrough {
            self.after_passthrough_exit();
            if vmcs::vmread(ro::EXIT_REASON) & 0xFFFF == exit::reason::CPUID {
                let [a, b, c, d] = policy.answer(self.gprs.rax as u32, self.gprs.rcx as u32);
                let g = &mut self.gprs;
                (g.rax, g.rbx, g.rcx, g.rdx) = (a.into(), b.into(), c.into(), d.into());
                exit::advance();
                return self.run();
            }
        }
        exit::decode(&self.gprs, self.passthrough.is_some())
    }

    fn gprs(&mut self) -> &mut Gprs {
        &mut self.gprs
    }

    fn rip(&self) -> u64 {
        self.make_current();
        vmcs::vmread(guest::RIP)
    }

    fn state(&self) -> VcpuState {
        self.make_current();
        VcpuState {
            gprs: self.gprs,
            rip: vmcs::vmread(guest::RIP),
            rsp: vmcs::vmread(guest::RSP),
            rflags: vmcs::vmread(guest::RFLAGS),
            cr0: vmcs::vmread(guest::CR0),
            cr3: vmcs::vmread(guest::CR3),
            cr4: vmcs::vmread(guest::CR4),
            efer: vmcs::vmread(guest::IA32_EFER_FULL),
        }
    }

    fn tlb_control(&mut self, _value: u8) {
        // The EPT table's hook executes INVEPT itself.
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        // VM-entry interruption information (SDM Vol. 3 §25.8.3): vector, type 3 (hardware
        // exception), bit 11 deliver error code, bit 31 valid. An event the last exit cut
        // short goes first; the exception is raised again when the instruction re-executes.
        self.make_current();
        if vmcs::vmread(x86::vmx::vmcs::control::VMENTRY_INTERRUPTION_INFO_FIELD) & EVENT_VALID != 0
        {
            return;
        }
        let mut info = u64::from(vector) | (3 << 8) | (1 << 31);
        if let Some(code) = error_code {
            info |= 1 << 11;
            vmcs::vmwrite(
                x86::vmx::vmcs::control::VMENTRY_EXCEPTION_ERR_CODE,
                u64::from(code),
            );
        }
        vmcs::vmwrite(
            x86::vmx::vmcs::control::VMENTRY_INTERRUPTION_INFO_FIELD,
            info,
        );
    }
}

impl Drop for VmxVcpu {
    fn drop(&mut self) {
        // SAFETY: `self.vmcs` is this vCPU's VMCS region; clearing it makes the processor
        // write back and forget it, so the frame can be freed below.
        unsafe { vmcs::vmclear(self.vmcs) };
        vmcs::cleared(self.vmcs);
        // SAFETY: allocated by `new_vcpu`, freed once (here), and no longer active or current
        // after the VMCLEAR: no software or processor use remains.
        unsafe { frames::free(self.vmcs) };
        if let Some((maps, _)) = &self.passthrough {
            for f in [maps.io_a, maps.io_b, maps.msr] {
                // SAFETY: allocated by `new_passthrough_vcpu` for this vCPU alone, freed once
                // (here); the processor reads them only while this (now cleared) VMCS runs.
                unsafe { frames::free(f) };
            }
        }
    }
}
