//! The VMM for one guest: a KVM VM whose only memslot is a `Reservation`, one vCPU in 64-bit
//! long mode running guest code at CPL3 with IOPL=3, the fault thread serving the reservation,
//! and the run loop. No memory policy lives here.
//!
//! Ownership: the caller builds the memory side (`Reservation`, `KvmStage2`, and the Vmar or
//! test resolver that owns the Stage2) and hands the resolver to `GuestVm::new`, which runs it
//! on the fault thread. The VM never installs memory itself: every page arrives through the
//! resolver, including the pages the VMM writes when it loads the boot image.
//!
//! - this file: `GuestVm` (construction, accessors, vCPU state, recovery) and the run loop
//!   (which classifies KVM's exits);
//! - [`exit`]: `VmExit`, what `run` returns;
//! - [`kick`]: `Kicker`, stopping a running vCPU from any thread;
//! - [`access`]: the VMM's reads and writes of guest memory, and the vm-memory view;
//! - [`load`]: loading a guest program (boot image + code or ELF) and its entry state;
//! - [`hypercall`]: the guest↔VMM hypercall ABI and the core's serving of it;
//! - [`vcpu_state`]: complete vCPU state save/restore (the vCPU half of a snapshot);
//! - [`x86_64`]: the guest-physical layout and the boot image.
//!
//! Invariants:
//! - exits are always completed (an MMIO read gets data before the next `KVM_RUN`);
//! - a resolver error stops the VM: `run` returns `VmExit::GuestFault` with the report once, and
//!   every later `run` is `Error::BadState` (the VM must be reset — poisoned pages);
//! - `Kicker::kick` (from any thread) makes a running or about-to-run `KVM_RUN` return with
//!   `VmExit::Kicked` (immediate_exit + a signal); it is also the fault thread's stop hook.

pub mod access;
pub mod exit;
pub mod hypercall;
pub mod kick;
pub mod load;
pub mod vcpu_state;
pub mod x86_64;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

pub use exit::VmExit;
pub use kick::Kicker;
pub use x86_64::boot::GuestArgs;

use crate::error::{kvm_err, Error, Result};
use crate::memory::fault_thread::{FaultError, FaultShared, FaultStats, FaultThread, Resolver};
use crate::memory::reservation::Reservation;
use crate::sys::uffd::Uffd;
use hypercall::{PORT_CALL, PORT_DONE};
use kick::KickState;
use vcpu_state::{readable_msrs, VcpuState};

/// Checks that this process can run guests: root, `/dev/kvm`, userfaultfd with WP (sync and
/// `WP_ASYNC`). The error says what is missing (tests print it as their SKIP reason).
pub fn check_host() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::KvmUnavailable(
            "not root: /dev/kvm and kernel-mode userfaultfd need root here".into(),
        ));
    }
    Kvm::new().map_err(|e| Error::KvmUnavailable(format!("cannot open /dev/kvm: {e}")))?;
    Uffd::open()?;
    // Dirty tracking: every reservation opens an async write-tracking descriptor too.
    Uffd::open_async_wp()?;
    Ok(())
}

/// One guest: KVM VM + vCPU + fault thread; see the module documentation.
pub struct GuestVm {
    kvm: Kvm,
    _vm: VmFd,
    vcpu: VcpuFd,
    res: Arc<Reservation>,
    faults: FaultThread,
    msrs: Vec<u32>,
    kick: Arc<KickState>,
    stopped: Option<FaultError>,
    /// Messages the guest logged with `HC_LOG`.
    pub log: Vec<String>,
}

impl GuestVm {
    /// A VM over `res` (memslot 0) whose faults go to `resolver` on a new fault thread.
    pub fn new(res: Arc<Reservation>, resolver: impl Resolver + 'static) -> Result<Self> {
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
        // here and dropped after `_vm`).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let msrs = readable_msrs(&kvm, &vcpu)?;
        let kick = KickState::new(&mut vcpu.get_kvm_run().immediate_exit as *mut u8);
        let faults = FaultThread::spawn(res.clone(), resolver)?;
        let k = Kicker(kick.clone());
        faults.shared().set_kick(Arc::new(move || k.kick()));
        Ok(GuestVm {
            kvm,
            _vm: vm,
            vcpu,
            res,
            faults,
            msrs,
            kick,
            stopped: None,
            log: Vec::new(),
        })
    }

    pub fn reservation(&self) -> &Arc<Reservation> {
        &self.res
    }

    pub fn kicker(&self) -> Kicker {
        Kicker(self.kick.clone())
    }

    pub fn fault_stats(&self) -> FaultStats {
        self.faults.stats()
    }

    pub fn fault_shared(&self) -> &Arc<FaultShared> {
        self.faults.shared()
    }

    pub fn vcpu(&self) -> &VcpuFd {
        &self.vcpu
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Sets `rax`, the result of the hypercall the guest is stopped at (after
    /// `VmExit::Hypercall`).
    pub fn set_hypercall_result(&mut self, value: u64) -> Result<()> {
        let mut regs = self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        regs.rax = value;
        self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
    }

    /// Saves the complete vCPU state (call between runs).
    pub fn save_state(&self) -> Result<VcpuState> {
        VcpuState::save(&self.vcpu, &self.msrs, false)
    }

    /// Restores a state saved by `save_state` of this or another `GuestVm` of the same kind.
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<()> {
        state.restore(&self.vcpu)
    }

    /// Makes a VM stopped by a refused fault runnable again: un-poisons the pages the fault
    /// thread poisoned and clears the stop. The caller restores memory (Vmar reset) and vCPU
    /// state first; otherwise the guest simply faults again.
    pub fn recover(&mut self) -> Result<()> {
        for (hva, installed) in self.faults.shared().take_poisoned() {
            self.res.unpoison(hva, installed)?;
        }
        let _ = self.faults.shared().take_error();
        self.stopped = None;
        Ok(())
    }

    /// The fault that stopped this VM, if any.
    pub fn stopped_by(&self) -> Option<&FaultError> {
        self.stopped.as_ref()
    }

    /// Runs the vCPU on the calling thread until an exit the caller must see.
    pub fn run(&mut self) -> Result<VmExit> {
        if let Some(e) = &self.stopped {
            return Err(Error::BadState(format!(
                "VM stopped by a refused guest fault at gpa {:#x} ({}); reset it first",
                e.fault.gpa, e.error
            )));
        }
        loop {
            if let Some(e) = self.faults.shared().take_error() {
                self.stopped = Some(e);
                return Ok(VmExit::GuestFault(e));
            }
            self.kick.entering();
            let r = self.vcpu.run().map(classify);
            self.kick.left();
            let exit = match r {
                Ok(Step::Exit(e)) => e,
                Ok(Step::Continue) => continue,
                Ok(Step::Hypercall(nr)) => match self.serve_hypercall(nr)? {
                    Some(e) => e,
                    None => continue,
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.vcpu.set_kvm_immediate_exit(0);
                    if self.kick.take_request() && !self.faults.shared().has_error() {
                        VmExit::Kicked
                    } else {
                        continue;
                    }
                }
                Err(e) if e.errno() == libc::EFAULT => {
                    // A poisoned page: the fault thread recorded why before waking us.
                    match self.faults.shared().take_error() {
                        Some(fe) => {
                            self.stopped = Some(fe);
                            VmExit::GuestFault(fe)
                        }
                        None => {
                            return Err(Error::Kvm {
                                what: "KVM_RUN (EFAULT with no recorded guest fault)",
                                err: e,
                            });
                        }
                    }
                }
                Err(err) => {
                    return Err(Error::Kvm {
                        what: "KVM_RUN",
                        err,
                    });
                }
            };
            return Ok(exit);
        }
    }
}

/// What the run loop does with one successful `KVM_RUN`.
enum Step {
    /// Return this to the caller.
    Exit(VmExit),
    /// `out PORT_CALL, al`: serve hypercall `al`.
    Hypercall(u8),
    /// Completed here; run again.
    Continue,
}

/// Classifies a KVM exit, completing reads (all-ones) on the way.
fn classify(exit: VcpuExit<'_>) -> Step {
    match exit {
        VcpuExit::IoOut(PORT_DONE, data) => Step::Exit(VmExit::Done(data[0])),
        VcpuExit::IoOut(PORT_CALL, data) => Step::Hypercall(data[0]),
        VcpuExit::IoOut(port, data) => Step::Exit(VmExit::IoOut {
            port,
            data: data.to_vec(),
        }),
        VcpuExit::IoIn(_, data) => {
            data.fill(0xff);
            Step::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            data.fill(0xff);
            Step::Exit(VmExit::Mmio {
                addr,
                write: false,
                data: data.to_vec(),
            })
        }
        VcpuExit::MmioWrite(addr, data) => Step::Exit(VmExit::Mmio {
            addr,
            write: true,
            data: data.to_vec(),
        }),
        VcpuExit::Hlt => Step::Exit(VmExit::Hlt),
        VcpuExit::Shutdown => Step::Exit(VmExit::Shutdown),
        VcpuExit::Intr => Step::Continue,
        other => Step::Exit(VmExit::Unhandled(format!("{other:?}"))),
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        self.kick.detach();
    }
}

impl AsRawFd for GuestVm {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.vcpu.as_raw_fd()
    }
}
