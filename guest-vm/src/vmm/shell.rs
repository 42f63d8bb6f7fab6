//! `VmShell`: a KVM VM made ready ahead of the guest that will run in it — the VM, its one
//! vCPU (CPUID set, readable MSRs known, `KVM_CAP_SYNC_REGS` on — registers, and sregs when
//! KVM offers them and events, which the short vCPU restore needs, vmm/mod.rs; the host's supported CPUID
//! and readable MSRs are asked once per process and reused), memslot 0 registered over a
//! `Reservation`, and the fault thread started but waiting for its resolver
//! (`FaultThread::spawn_unattached`). `into_vm(resolver)` attaches the resolver (the guest's
//! Vmar) and gives the `GuestVm`; `GuestVm::new` is `VmShell::new` + `into_vm`, so a VM made
//! on the spot and one taken from a pool (`guest::pool::ShellPool`) are built by the same
//! code.
//!
//! Invariants:
//! - nothing touches the reservation while a shell waits: no vCPU has run and its fault
//!   thread reads no event before `into_vm`; a reservation holds no frame until a Stage2 over
//!   it installs one, so a shell owns no frame and dropping one unused returns only its
//!   kernel objects (fault thread joined, then VM, vCPU and the reservation's mapping);
//! - the reservation outlives the VM whose memslot it is (field order of `GuestVm`).

use std::sync::{Arc, OnceLock};

use kvm_bindings::{
    kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_SYNC_X86_EVENTS,
    KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS,
};
use kvm_ioctls::{Cap, Kvm, SyncReg, VcpuFd, VmFd};

use super::kick::{KickState, Kicker};
use super::vcpu_state::readable_msrs;
use super::GuestVm;
use crate::error::{kvm_err, Error, Result};
use crate::memory::fault_thread::{FaultThread, Resolver};
use crate::memory::reservation::Reservation;

/// `KVM_GET_SUPPORTED_CPUID`, asked once per process: it depends only on the host CPU and the
/// KVM module, and asking it is the largest single step of a VM's setup here (≈ 0.4 ms of a
/// 0.8 ms fork at 64 MiB, README "Fork from a pool of VM shells").
static HOST_CPUID: OnceLock<CpuId> = OnceLock::new();
/// `readable_msrs`, probed on the first vCPU (after its CPUID is set: what reads back can depend
/// on it) and the same for every later one, whose CPUID is the same.
static HOST_MSRS: OnceLock<Vec<u32>> = OnceLock::new();

fn host_cpuid(kvm: &Kvm) -> Result<&'static CpuId> {
    if let Some(c) = HOST_CPUID.get() {
        return Ok(c);
    }
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    Ok(HOST_CPUID.get_or_init(|| cpuid))
}

fn host_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<&'static [u32]> {
    if let Some(m) = HOST_MSRS.get() {
        return Ok(m);
    }
    let msrs = readable_msrs(kvm, vcpu)?;
    Ok(HOST_MSRS.get_or_init(|| msrs))
}

/// A prepared VM without its resolver; see the module documentation.
pub struct VmShell {
    // Field order is drop order: the fault thread stops first, the reservation goes last.
    faults: FaultThread,
    kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    msrs: Vec<u32>,
    kick: Arc<KickState>,
    sync_regs: bool,
    sync_sregs_events: bool,
    res: Arc<Reservation>,
}

impl VmShell {
    /// A VM + vCPU whose memslot 0 is `res`, and its fault thread (not serving yet).
    pub fn new(res: Arc<Reservation>) -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| {
            Error::KvmUnavailable(format!("cannot open /dev/kvm (needs root here): {e}"))
        })?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: res.gpa_base().raw(),
            memory_size: res.size(),
            userspace_addr: res.hva().raw(),
        };
        // SAFETY: the host range is our reservation, which outlives the VM (`res` is held
        // by the shell and then the `GuestVm`, and dropped after the VM).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(host_cpuid(&kvm)?)
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        let msrs = host_msrs(&kvm, &vcpu)?.to_vec();
        // The sync-area fields this KVM offers (a mask of KVM_SYNC_X86_*).
        let fields = kvm.check_extension_int(Cap::SyncRegs).max(0) as u32;
        let sync_regs = fields & KVM_SYNC_X86_REGS != 0;
        if sync_regs {
            vcpu.set_sync_valid_reg(SyncReg::Register);
        }
        let both = KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS;
        let sync_sregs_events = sync_regs && fields & both == both;
        if sync_sregs_events {
            // Refreshed at every exit: the short restore's CPL check reads CS there.
            vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
        }
        let kick = KickState::new(&mut vcpu.get_kvm_run().immediate_exit as *mut u8);
        let faults = FaultThread::spawn_unattached(res.clone())?;
        let k = Kicker(kick.clone());
        faults.shared().set_kick(Arc::new(move || k.kick()));
        Ok(VmShell {
            faults,
            kvm,
            vm,
            vcpu,
            msrs,
            kick,
            sync_regs,
            sync_sregs_events,
            res,
        })
    }

    /// The memslot's reservation (to build the guest's Stage2 over before `into_vm`).
    pub fn reservation(&self) -> &Arc<Reservation> {
        &self.res
    }

    /// The guest size this shell's memslot covers.
    pub fn mem_size(&self) -> u64 {
        self.res.size()
    }

    /// The VM, its faults served by `resolver` from now on.
    pub fn into_vm(self, resolver: impl Resolver + 'static) -> Result<GuestVm> {
        let VmShell {
            mut faults,
            kvm,
            vm,
            vcpu,
            msrs,
            kick,
            sync_regs,
            sync_sregs_events,
            res,
        } = self;
        faults.attach(resolver)?;
        Ok(GuestVm {
            kvm,
            _vm: vm,
            vcpu,
            res,
            faults,
            msrs,
            kick,
            stopped: None,
            sync_regs,
            regs_pending: false,
            regs_stale: true,
            sync_sregs_events,
            sregs_pending: false,
            events_pending: false,
            restore_point: None,
            clean_since_restore: false,
            restore_stats: Default::default(),
            access: None,
            log: Vec::new(),
        })
    }
}

impl std::fmt::Debug for VmShell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmShell")
            .field("mem_size", &self.res.size())
            .finish_non_exhaustive()
    }
}
