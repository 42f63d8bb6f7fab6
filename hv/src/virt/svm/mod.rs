//! AMD SVM backend with nested paging (NPT).
//!
//! Owns: EFER.SVME, the host save area (VM_HSAVE_PA), one I/O permission map shared by the
//! scenario's guests (every port intercepted), ASID allocation, one VMCB per vCPU, and a
//! pass-through vCPU's own I/O and MSR permission maps (`Backend::new_passthrough_vcpu`). Each vCPU gets its
//! own ASID (never 0), so TLB_CONTROL can flush just that guest's translations.
//! Invariants: VMRUN and VMMCALL are always intercepted (VMRUN must be); guest EFER.SVME is set
//! (VMRUN's consistency check); guest GPRs other than RAX/RSP live in `Gprs` and are swapped by
//! the trampoline (entry.s); TLB_CONTROL is set for exactly the next VMRUN after a table change;
//! an event whose delivery a #VMEXIT interrupted (EXITINTINFO) is injected at the next VMRUN.
//!
//! One job per file:
//! - `mod.rs` — SVM enablement (`init`), the `Backend` (`Svm`) and the `Vcpu` (`SvmVcpu`:
//!   a VMCB's contents and life cycle, VMRUN).
//! - `vmcb` — the VMCB layout (APM Vol. 2 appendix B) and bounds-checked access to one page.
//! - `exit` — the exit codes as named constants and their decoding into `Exit`.
//! - `entry.s` — the world switch (`hv_svm_run`), around the shared guest GPR save/restore of
//!   `../gprs.s`.

pub mod exit;
pub mod vmcb;

use alloc::boxed::Box;

use crate::platform::cpu::{self, rdmsr, wrmsr, MSR_EFER};
use ept::PAGE_SIZE;

use crate::platform::frames;
use crate::virt::stage2::HvTable;
use crate::virt::vcpu::{Backend, BootEntry32, Exit, Gprs, Vcpu, VcpuState};
use vmcb::*;

core::arch::global_asm!(
    include_str!("../gprs.s"),
    include_str!("entry.s"),
    ".purgem GUEST_GPRS_LOAD",
    ".purgem GUEST_GPRS_SAVE",
);

extern "C" {
    /// entry.s: loads the guest GPRs from `*gprs` (RAX and RSP come from the VMCB), runs
    /// VMRUN on the VMCB at `vmcb_pa`, stores the guest GPRs back and returns 0.
    fn hv_svm_run(vmcb_pa: u64, gprs: *mut Gprs) -> u64;
}

/// SVM MSRs and bits (APM Vol. 2 §15.30 "SVM-Related MSRs", §15.4 "Enabling SVM").
const MSR_VM_CR: u32 = 0xC001_0114;
const MSR_VM_HSAVE_PA: u32 = 0xC001_0117;
const VM_CR_SVMDIS: u64 = 1 << 4;
const EFER_SVME: u64 = 1 << 12;
/// CPUID 8000_000A EDX: NRIP save (3), flush by ASID (6).
const CPUID_SVM_NRIPS: u32 = 1 << 3;
const CPUID_SVM_FLUSH_BY_ASID: u32 = 1 << 6;
/// Frames of the I/O permission map (12 KiB) and of the MSR permission map (8 KiB).
const IOPM_FRAMES: u64 = 3;
const MSRPM_FRAMES: u64 = 2;

pub struct Svm {
    iopm: u64,
    msrpm: u64,
    next_asid: u32,
    max_asid: u32,
    nrips: bool,
    flush_by_asid: bool,
}

/// Enables SVM on this CPU. Fails with a reason when SVM is disabled or memory is short.
pub fn init() -> Result<Svm, &'static str> {
    if rdmsr(MSR_VM_CR) & VM_CR_SVMDIS != 0 {
        return Err("SVM disabled by firmware (VM_CR.SVMDIS)");
    }
    let l = cpu::cpuid(0x8000_000A, 0);
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SVME);
    let hsave = frames::alloc_zeroed().ok_or("no memory for the host save area")?;
    wrmsr(MSR_VM_HSAVE_PA, hsave);
    let iopm = frames::alloc_contiguous(IOPM_FRAMES).ok_or("no memory for the IOPM")?;
    // SAFETY: `alloc_contiguous` just handed these identity-mapped frames to us alone; all
    // ones intercepts every port. They stay allocated for the rest of the run.
    unsafe { core::ptr::write_bytes(iopm as *mut u8, 0xFF, (IOPM_FRAMES * PAGE_SIZE) as usize) };
    let msrpm = frames::alloc_contiguous(MSRPM_FRAMES).ok_or("no memory for the MSRPM")?;
    // SAFETY: as for the IOPM; all zeroes intercepts no MSR access.
    unsafe { core::ptr::write_bytes(msrpm as *mut u8, 0, (MSRPM_FRAMES * PAGE_SIZE) as usize) };
    crate::platform::serial::println!(
        "svm: SVM rev {}, {} ASIDs, NRIPS={}, FlushByAsid={}; EFER={:#x}",
        l.eax & 0xFF,
        l.ebx,
        l.edx & CPUID_SVM_NRIPS != 0,
        l.edx & CPUID_SVM_FLUSH_BY_ASID != 0,
        rdmsr(MSR_EFER)
    );
    Ok(Svm {
        iopm,
        msrpm,
        next_asid: 1,
        max_asid: l.ebx.max(2),
        nrips: l.edx & CPUID_SVM_NRIPS != 0,
        flush_by_asid: l.edx & CPUID_SVM_FLUSH_BY_ASID != 0,
    })
}

pub struct SvmVcpu {
    vmcb: Vmcb,
    gprs: Gprs,
    nrips: bool,
    /// TLB_CONTROL for the next VMRUN (set by the NPT flush hook through `tlb_control`).
    tlb_next: u8,
    /// EVENTINJ for the next VMRUN: an event whose delivery a #VMEXIT interrupted
    /// (EXITINTINFO), or an exception `inject_exception` asked for; 0 = none.
    event_next: u64,
    /// The vCPU's own I/O and MSR permission maps (pass-through guest), freed with it.
    own_maps: Option<(u64, u64)>,
}

/// EVENTINJ / EXITINTINFO (APM Vol. 2 §15.20): vector 7:0, type 10:8 (3 = exception), error
/// code valid 11, valid 31, error code 63:32.
const EVENT_VALID: u64 = 1 << 31;
const EVENT_ERROR_VALID: u64 = 1 << 11;
const EVENT_EXCEPTION: u64 = 3 << 8;

/// The MSRs a pass-through guest may not write (APM Vol. 2 §15.30): VM_CR (it could lock or
/// disable SVM) and VM_HSAVE_PA (it would move the host save area #VMEXIT restores hv from).
/// A write raises #GP in the guest; reads pass through.
const GUEST_WRITE_PROTECTED_MSRS: [u32; 2] = [MSR_VM_CR, MSR_VM_HSAVE_PA];

/// Byte offset in the MSR permission map of each MSR range's bit pairs (APM Vol. 2 §15.11).
fn msrpm_bit(msr: u32) -> Option<u64> {
    let (base, offset) = match msr {
        0..=0x1FFF => (0, 0),
        0xC000_0000..=0xC000_1FFF => (0xC000_0000, 0x800),
        0xC001_0000..=0xC001_1FFF => (0xC001_0000, 0x1000),
        _ => return None,
    };
    Some(offset * 8 + u64::from(msr - base) * 2)
}

impl Backend for Svm {
    fn name(&self) -> &'static str {
        "svm"
    }

    fn new_stage2(&self) -> Result<HvTable, ept::Error> {
        HvTable::new_npt(self.flush_by_asid)
    }

    fn new_vcpu(
        &mut self,
        st: &VcpuState,
        stage2_root: u64,
    ) -> Result<Box<dyn Vcpu>, &'static str> {
        if self.next_asid >= self.max_asid {
            return Err("out of ASIDs");
        }
        let asid = self.next_asid;
        self.next_asid += 1;
        let pa = frames::alloc_zeroed().ok_or("no memory for a VMCB")?;
        // SAFETY: `alloc_zeroed` just handed this zeroed 4 KiB frame to us alone; the vCPU
        // owns it (and the view) until its drop frees it.
        let mut v = unsafe { Vmcb::new(pa) };
        v.w32(INTERCEPT_EXCEPTIONS, 0xFFFF_FFFF);
        v.w32(
            INTERCEPT_MISC1,
            INTERCEPT_HLT | INTERCEPT_IOIO_PROT | INTERCEPT_SHUTDOWN,
        );
        v.w32(INTERCEPT_MISC2, INTERCEPT_VMRUN | INTERCEPT_VMMCALL);
        nested_paging(&mut v, self.iopm, self.msrpm, asid, stage2_root);
        // 64-bit flat guest: CS L=1 (attr 0x29B), data 0xC93, busy TSS 0x8B.
        v.seg(CS, 0x08, 0x029B, 0xFFFF_FFFF, 0);
        for off in [ES, SS, DS, FS, GS] {
            v.seg(off, 0x10, 0x0C93, 0xFFFF_FFFF, 0);
        }
        v.seg(GDTR, 0, 0, 0xFFFF, 0);
        v.seg(IDTR, 0, 0, 0, 0);
        v.seg(LDTR, 0, 0x0082, 0, 0);
        v.seg(TR, 0x18, 0x008B, 0x67, 0);
        v.w8(CPL, 0);
        v.w64(EFER, st.efer | EFER_SVME);
        v.w64(CR0, st.cr0);
        v.w64(CR3, st.cr3);
        v.w64(CR4, st.cr4);
        debug_defaults(&mut v);
        v.w64(RFLAGS, st.rflags);
        v.w64(RIP, st.rip);
        v.w64(RSP, st.rsp);
        v.w64(RAX, st.gprs.rax);
        v.w64(G_PAT, 0x0007_0406_0007_0406);
        Ok(Box::new(SvmVcpu {
            vmcb: v,
            gprs: st.gprs,
            nrips: self.nrips,
            tlb_next: 0,
            event_next: 0,
            own_maps: None,
        }))
    }

    fn hypercall_insn(&self) -> [u8; 3] {
        [0x0F, 0x01, 0xD9] // VMMCALL
    }

    /// The pass-through guest. Intercepted, and why (everything else runs on the machine):
    /// - VMRUN: the architecture requires it (the guest gets #UD: hv offers no nested SVM);
    /// - shutdown: a triple fault ends the guest with a report instead of resetting the machine;
    /// - nested page faults: every RAM page arrives through `Vmar::handle_fault`;
    /// - IN/OUT on `trapped_ports` only (the guest's exit and power-off ports);
    /// - writes of VM_CR and VM_HSAVE_PA (`GUEST_WRITE_PROTECTED_MSRS`): they would reach hv.
    ///
    /// Not intercepted: exceptions, physical interrupts and NMIs (V_INTR_MASKING off, so the
    /// guest's RFLAGS.IF governs them and they are delivered through the guest's IDT), HLT,
    /// CPUID (the guest sees the CPU as it is), VMMCALL (#UD in the guest, as on a CPU without a
    /// hypervisor), every other port and MSR. The guest's FS/GS/TR/LDTR and syscall MSRs live
    /// in the CPU itself (no VMLOAD/VMSAVE): hv uses none of them.
    fn new_passthrough_vcpu(
        &mut self,
        entry: &BootEntry32,
        stage2_root: u64,
        trapped_ports: &[u16],
    ) -> Result<Box<dyn Vcpu>, &'static str> {
        if trapped_ports.len() > crate::virt::vcpu::MAX_TRAPPED_PORTS {
            return Err("too many trapped ports");
        }
        if self.next_asid >= self.max_asid {
            return Err("out of ASIDs");
        }
        let iopm = frames::alloc_contiguous(IOPM_FRAMES).ok_or("no memory for an IOPM")?;
        let Some(msrpm) = frames::alloc_contiguous(MSRPM_FRAMES) else {
            for i in 0..IOPM_FRAMES {
                // SAFETY: allocated just above, never handed to the processor.
                unsafe { frames::free(iopm + i * PAGE_SIZE) };
            }
            return Err("no memory for an MSRPM");
        };
        // SAFETY: `alloc_contiguous` just handed these identity-mapped frames to us alone; the
        // vCPU owns them until its drop. All zeroes intercepts nothing; then one bit per
        // trapped port (IOPM) and the write bit of each protected MSR (MSRPM) are set, each
        // inside its map (ports < 65536 bits < 12 KiB; MSR bits < 0x2000 * 8 bits).
        unsafe {
            core::ptr::write_bytes(iopm as *mut u8, 0, (IOPM_FRAMES * PAGE_SIZE) as usize);
            core::ptr::write_bytes(msrpm as *mut u8, 0, (MSRPM_FRAMES * PAGE_SIZE) as usize);
            for &port in trapped_ports {
                *((iopm + u64::from(port) / 8) as *mut u8) |= 1 << (port % 8);
            }
            for msr in GUEST_WRITE_PROTECTED_MSRS {
                if let Some(bit) = msrpm_bit(msr) {
                    let write_bit = bit + 1;
                    *((msrpm + write_bit / 8) as *mut u8) |= 1 << (write_bit % 8);
                }
            }
        }
        let asid = self.next_asid;
        self.next_asid += 1;
        let Some(pa) = frames::alloc_zeroed() else {
            for f in (0..IOPM_FRAMES)
                .map(|i| iopm + i * PAGE_SIZE)
                .chain((0..MSRPM_FRAMES).map(|i| msrpm + i * PAGE_SIZE))
            {
                // SAFETY: allocated just above, never handed to the processor.
                unsafe { frames::free(f) };
            }
            return Err("no memory for a VMCB");
        };
        // SAFETY: `alloc_zeroed` just handed this zeroed 4 KiB frame to us alone; the vCPU
        // owns it (and the view) until its drop frees it.
        let mut v = unsafe { Vmcb::new(pa) };
        v.w32(INTERCEPT_EXCEPTIONS, 0);
        v.w32(
            INTERCEPT_MISC1,
            INTERCEPT_IOIO_PROT | INTERCEPT_MSR_PROT | INTERCEPT_SHUTDOWN,
        );
        v.w32(INTERCEPT_MISC2, INTERCEPT_VMRUN);
        nested_paging(&mut v, iopm, msrpm, asid, stage2_root);
        // Linux boot protocol, 32-bit entry: flat 4 GiB segments, code 0x10 (32-bit, attr
        // 0xC9B), data 0x18 (0xC93); protected mode without paging; interrupts off.
        v.seg(CS, 0x10, 0x0C9B, 0xFFFF_FFFF, 0);
        for off in [ES, SS, DS, FS, GS] {
            v.seg(off, 0x18, 0x0C93, 0xFFFF_FFFF, 0);
        }
        v.seg(GDTR, 0, 0, 0, 0);
        v.seg(IDTR, 0, 0, 0, 0);
        v.seg(LDTR, 0, 0x0082, 0, 0);
        v.seg(TR, 0, 0x008B, 0x67, 0);
        v.w8(CPL, 0);
        v.w64(EFER, EFER_SVME);
        v.w64(CR0, CR0_PE | CR0_ET);
        v.w64(CR3, 0);
        v.w64(CR4, 0);
        debug_defaults(&mut v);
        v.w64(RFLAGS, 0x2);
        v.w64(RIP, u64::from(entry.eip));
        v.w64(RSP, 0);
        v.w64(RAX, 0);
        v.w64(G_PAT, 0x0007_0406_0007_0406);
        let gprs = Gprs {
            rsi: u64::from(entry.esi),
            ..Gprs::default()
        };
        Ok(Box::new(SvmVcpu {
            vmcb: v,
            gprs,
            nrips: self.nrips,
            tlb_next: 0,
            event_next: 0,
            own_maps: Some((iopm, msrpm)),
        }))
    }
}

/// The control-area fields every VMCB here gets: the permission maps, its own ASID, a full
/// flush at the first VMRUN, nested paging through the table at `stage2_root`.
fn nested_paging(v: &mut Vmcb, iopm: u64, msrpm: u64, asid: u32, stage2_root: u64) {
    v.w64(IOPM_BASE_PA, iopm);
    v.w64(MSRPM_BASE_PA, msrpm);
    v.w32(GUEST_ASID, asid);
    v.w8(TLB_CONTROL, 1);
    v.w64(NP_ENABLE, 1);
    v.w64(N_CR3, stage2_root);
}

/// DR6 and DR7 at their reset values.
fn debug_defaults(v: &mut Vmcb) {
    v.w64(DR6, 0xFFFF_0FF0);
    v.w64(DR7, 0x400);
}

/// CR0.PE (protected mode) and CR0.ET (always 1 on these CPUs).
const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;

impl Vcpu for SvmVcpu {
    fn run(&mut self) -> Exit {
        self.vmcb.w64(RAX, self.gprs.rax);
        if self.tlb_next != 0 {
            self.vmcb.w8(TLB_CONTROL, self.tlb_next);
            self.tlb_next = 0;
        }
        self.vmcb.w64(VMCB_CLEAN, 0);
        self.vmcb.w64(EVENTINJ, self.event_next);
        self.event_next = 0;
        // SAFETY: the VMCB is this vCPU's page, filled by `new_vcpu` (VMRUN intercepted, an
        // ASID of its own, nested paging on through the table the Vmar owns, EFER.SVME); the
        // host save area was set by `init`. #VMEXIT restores the host's RSP/RIP/RAX from it and
        // `hv_svm_run` restores the callee-saved registers, so the call behaves as an ordinary
        // extern "C" call. `gprs` is valid for the call.
        unsafe { hv_svm_run(self.vmcb.pa(), &mut self.gprs) };
        self.gprs.rax = self.vmcb.r64(RAX);
        self.vmcb.w8(TLB_CONTROL, 0);
        self.vmcb.w64(EVENTINJ, 0);
        // An event (an interrupt passed through, an exception) whose delivery this exit cut
        // short — e.g. its IDT or stack page was not installed yet — is delivered again at the
        // next entry, or it would be lost.
        let pending = self.vmcb.r64(EXITINTINFO);
        if pending & EVENT_VALID != 0 {
            self.event_next = pending;
        }
        exit::decode(&mut self.vmcb, self.nrips, &self.gprs)
    }

    fn gprs(&mut self) -> &mut Gprs {
        &mut self.gprs
    }

    fn rip(&self) -> u64 {
        self.vmcb.r64(RIP)
    }

    fn state(&self) -> VcpuState {
        VcpuState {
            gprs: self.gprs,
            rip: self.vmcb.r64(RIP),
            rsp: self.vmcb.r64(RSP),
            rflags: self.vmcb.r64(RFLAGS),
            cr0: self.vmcb.r64(CR0),
            cr3: self.vmcb.r64(CR3),
            cr4: self.vmcb.r64(CR4),
            efer: self.vmcb.r64(EFER),
        }
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        let mut event = u64::from(vector) | EVENT_EXCEPTION | EVENT_VALID;
        if let Some(code) = error_code {
            event |= EVENT_ERROR_VALID | (u64::from(code) << 32);
        }
        // An interrupted delivery (EXITINTINFO) goes first; the exception is raised again
        // when the instruction re-executes.
        if self.event_next == 0 {
            self.event_next = event;
        }
    }

    fn tlb_control(&mut self, value: u8) {
        // 1 (flush all) is the stronger of the two values the hook produces.
        self.tlb_next = if self.tlb_next == 1 || value == 1 {
            1
        } else {
            value.max(self.tlb_next)
        };
    }
}

impl Drop for SvmVcpu {
    fn drop(&mut self) {
        // SAFETY: allocated by `new_vcpu`, freed once (here); the processor uses a VMCB only
        // during VMRUN, and no VMRUN of this vCPU can follow its drop.
        unsafe { frames::free(self.vmcb.pa()) };
        if let Some((iopm, msrpm)) = self.own_maps {
            let frames = (0..IOPM_FRAMES)
                .map(|i| iopm + i * PAGE_SIZE)
                .chain((0..MSRPM_FRAMES).map(|i| msrpm + i * PAGE_SIZE));
            for f in frames {
                // SAFETY: allocated by `new_passthrough_vcpu` for this vCPU alone, freed once
                // (here); the processor reads the maps only during this vCPU's VMRUNs.
                unsafe { frames::free(f) };
            }
        }
    }
}
