//! `VcpuState`: the complete architectural state of one vCPU that KVM exposes — the vCPU half
//! of a snapshot. Saved at an exit (never while `KVM_RUN` is in progress), restored into the
//! same or a fresh vCPU of a forked VM.
//!
//! Contents: GPRs (`regs`), segment/control registers (`sregs`), FPU/SSE/AVX (`xsave`) and
//! `xcrs`, the MSRs in use (`msrs`, the subset of `MSRS_IN_USE` this KVM can read), pending
//! events (`events`), `mp_state`, debug registers, and the LAPIC when the VM has an in-kernel
//! irqchip.
//!
//! Invariants: `save` reads every part or fails as a whole (no partial state); `restore`
//! writes them in the order KVM needs (sregs before regs/xsave; MSRs before events).
//! `restore` is the full restore: `GuestVm::restore_state` may instead take a short path
//! (xsave + MSRs by ioctl, regs/sregs/events through `kvm_run`'s sync area) only when the
//! state equals, by `same_as`, the one it last restored in full and every exit since was clean
//! (vmm/mod.rs states the condition). `same_as` compares every part `restore` writes (not
//! `fpu`, which it does not).

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::error::{Error, Result};

/// MSRs a long-mode guest (CPL3 workload + small CPL0 setup) uses.
pub const MSRS_IN_USE: &[u32] = &[
    0x10,        // TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0080, // EFER
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// The MSRs of `MSRS_IN_USE` that this KVM lists and that read back on `vcpu`.
pub fn readable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let listed = kvm.get_msr_index_list().map_err(|err| Error::Kvm {
        what: "KVM_GET_MSR_INDEX_LIST",
        err,
    })?;
    let listed = listed.as_slice();
    let mut out = Vec::new();
    for &idx in MSRS_IN_USE {
        if !listed.contains(&idx) {
            continue;
        }
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index: idx,
            ..Default::default()
        }])
        .map_err(|_| Error::InvalidArgs("msr list".into()))?;
        if matches!(vcpu.get_msrs(&mut one), Ok(1)) {
            out.push(idx);
        }
    }
    Ok(out)
}

/// Complete saved vCPU state.
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// Legacy FPU view; informational (`xsave` is what `restore` writes).
    pub fpu: kvm_fpu,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
    pub lapic: Option<kvm_lapic_state>,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        VcpuState {
            regs: self.regs,
            sregs: self.sregs,
            fpu: self.fpu,
            // SAFETY: kvm_xsave is plain data (a fixed 4 KiB region plus a zero-length
            // flexible-array marker); a bitwise copy of the fixed part is a valid value.
            xsave: unsafe { std::ptr::read(&self.xsave) },
            xcrs: self.xcrs,
            msrs: self.msrs.clone(),
            events: self.events,
            mp_state: self.mp_state,
            debugregs: self.debugregs,
            lapic: self.lapic,
        }
    }
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .field("cr3", &format_args!("{:#x}", self.sregs.cr3))
            .field("msrs", &self.msrs.len())
            .field("lapic", &self.lapic.is_some())
            .finish_non_exhaustive()
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |err| Error::Kvm { what, err }
}

impl VcpuState {
    /// Reads the whole state of `vcpu` (which must not be running). `msr_indices` is the list
    /// from `readable_msrs`; `irqchip` says whether the VM has an in-kernel LAPIC.
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32], irqchip: bool) -> Result<Self> {
        let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let fpu = vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
        let xsave = vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
        let xcrs = vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?;
        let entries: Vec<kvm_msr_entry> = msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| Error::InvalidArgs("too many MSRs".into()))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        if n != entries.len() {
            return Err(Error::BadState(format!(
                "KVM_GET_MSRS read {n} of {} MSRs",
                entries.len()
            )));
        }
        let events = vcpu
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        let mp_state = vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
        let debugregs = vcpu
            .get_debug_regs()
            .map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
        let lapic = if irqchip {
            Some(vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?)
        } else {
            None
        };
        Ok(VcpuState {
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            msrs: msrs.as_slice().to_vec(),
            events,
            mp_state,
            debugregs,
            lapic,
        })
    }

    /// Whether `restore` would write the same values as for `other`: every part it writes is
    /// equal (`fpu`, informational, is not compared). xsave is compared over its whole fixed
    /// 4 KiB region.
    pub fn same_as(&self, other: &VcpuState) -> bool {
        self.regs == other.regs
            && self.sregs == other.sregs
            && self.xcrs == other.xcrs
            && self.msrs == other.msrs
            && self.events == other.events
            && self.mp_state == other.mp_state
            && self.debugregs == other.debugregs
            && self.lapic == other.lapic
            && self.xsave.region == other.xsave.region
    }

    /// Writes the whole state into `vcpu` (which must not be running).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<()> {
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        // SAFETY: `xsave` is a complete kvm_xsave read by KVM_GET_XSAVE from a vCPU of the same
        // kind; KVM reads only the fixed-size structure.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        if let Some(lapic) = &self.lapic {
            vcpu.set_lapic(lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        }
        self.restore_msrs(vcpu)?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// The part of `restore` that goes by ioctl on the short path: xsave and the MSRs.
    pub(crate) fn restore_xsave_msrs(&self, vcpu: &VcpuFd) -> Result<()> {
        // SAFETY: as in `restore`.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        self.restore_msrs(vcpu)
    }

    fn restore_msrs(&self, vcpu: &VcpuFd) -> Result<()> {
        if self.msrs.is_empty() {
            return Ok(());
        }
        let msrs = Msrs::from_entries(&self.msrs)
            .map_err(|_| Error::InvalidArgs("too many MSRs".into()))?;
        let n = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n != self.msrs.len() {
            return Err(Error::BadState(format!(
                "KVM_SET_MSRS wrote {n} of {} MSRs",
                self.msrs.len()
            )));
        }
        Ok(())
    }
}
