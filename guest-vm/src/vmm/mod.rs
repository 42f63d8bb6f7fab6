//! The VMM for one guest: a KVM VM whose only memslot is a `Reservation`, one vCPU in 64-bit
//! long mode running guest code at CPL3 with IOPL=3, the fault thread serving the reservation,
//! and the run loop. No memory policy lives here.
//!
//! Ownership: the caller builds the memory side (`Reservation`, `KvmStage2`, and the Vmar or
//! test resolver that owns the Stage2) and hands the resolver to `GuestVm::new`, which runs it
//! on the fault thread. The VM never installs memory itself: every page arrives through the
//! resolver, including the pages the VMM writes when it loads the boot image.
//!
//! - this file: `GuestVm` (accessors, vCPU state, recovery; built from a [`shell`]) and the
//!   run loop (which classifies KVM's exits);
//! - [`exit`]: `VmExit`, what `run` returns;
//! - [`kick`]: `Kicker`, stopping a running vCPU from any thread;
//! - [`access`]: the VMM's reads and writes of guest memory, and the vm-memory view;
//! - [`load`]: loading a guest program (boot image + code or ELF) and its entry state;
//! - [`hypercall`]: the guest↔VMM hypercall ABI and the core's serving of it;
//! - [`shell`]: `VmShell`, a VM + vCPU + memslot + fault thread prepared before its resolver
//!   (`GuestVm::new` is a shell attached at once; `guest::pool` keeps shells ready);
//! - [`vcpu_state`]: complete vCPU state save/restore (the vCPU half of a snapshot);
//! - [`x86_64`]: the guest-physical layout and the boot image.
//!
//! Invariants:
//! - exits are always completed (an MMIO read gets data before the next `KVM_RUN`);
//! - every `KVM_RUN` is preceded by `Reservation::seal`: a fork defers the parent's
//!   write-protect to its next run (reservation.rs), so the guest never runs over a frame it
//!   shares with a child without the write protection that makes its writes events;
//! - a resolver error stops the VM: `run` returns `VmExit::GuestFault` with the report once, and
//!   every later `run` is `Error::BadState` (the VM must be reset — poisoned pages);
//! - `Kicker::kick` (from any thread) makes a running or about-to-run `KVM_RUN` return with
//!   `VmExit::Kicked` (immediate_exit + a signal); it is also the fault thread's stop hook;
//! - registers at an exit are read from `kvm_run`'s sync area and hypercall results written
//!   back there (`KVM_CAP_SYNC_REGS`, when KVM offers it): no register ioctl per hypercall. A
//!   write waits in the sync area for the next `KVM_RUN` (`regs_pending`); `save_state` takes
//!   it into the saved state, and every path that sets registers by ioctl first drops it and
//!   marks the sync copy stale (`regs_set_by_ioctl`), so it is neither read nor written back.
//!   Raw register ioctls through `vcpu()` are for callers between a non-hypercall exit and the
//!   next run (nothing is pending then).

pub mod access;
pub mod exit;
pub mod hypercall;
pub mod kick;
pub mod load;
pub mod shell;
pub mod vcpu_state;
pub mod x86_64;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_bindings::kvm_regs;
use kvm_ioctls::{Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};

pub use access::MemoryAccess;
pub use exit::VmExit;
pub use kick::Kicker;
pub use shell::VmShell;
pub use x86_64::boot::GuestArgs;

use crate::error::{kvm_err, Error, Result};
use crate::memory::fault_thread::{FaultError, FaultShared, FaultStats, FaultThread, Resolver};
use crate::memory::reservation::Reservation;
use crate::sys::uffd::Uffd;
use hypercall::{PORT_CALL, PORT_DONE};
use kick::KickState;
use vcpu_state::VcpuState;

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
    /// KVM copies the general registers into `kvm_run` at every exit.
    sync_regs: bool,
    /// The sync copy holds a register write for the next entry.
    regs_pending: bool,
    /// The sync copy is older than the vCPU's registers (set by ioctl since the last exit).
    regs_stale: bool,
    /// Where `read_guest` / `write_guest` go instead of the memslot (see `access`).
    access: Option<Box<dyn access::MemoryAccess>>,
    /// Messages the guest logged with `HC_LOG`.
    pub log: Vec<String>,
}

impl GuestVm {
    /// A VM over `res` (memslot 0) whose faults go to `resolver` on a new fault thread: a
    /// `VmShell` made on the spot and attached at once.
    pub fn new(res: Arc<Reservation>, resolver: impl Resolver + 'static) -> Result<Self> {
        VmShell::new(res)?.into_vm(resolver)
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

    /// The vCPU, for raw ioctls. After a hypercall exit the result register (`rax`) may still
    /// be waiting in the sync area until the next `run`: read registers through
    /// `save_state` then, and set them through `set_hypercall_result` / `restore_state`.
    pub fn vcpu(&self) -> &VcpuFd {
        &self.vcpu
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Sets `rax`, the result of the hypercall the guest is stopped at (after
    /// `VmExit::Hypercall`). It reaches the vCPU at the next `run` (or `save_state`).
    pub fn set_hypercall_result(&mut self, value: u64) -> Result<()> {
        let mut regs = self.exit_regs()?;
        regs.rax = value;
        self.set_entry_regs(&regs)
    }

    /// The general registers as of the last exit (and any write pending for the next entry):
    /// from the sync area when it is current, else by ioctl.
    pub(crate) fn exit_regs(&self) -> Result<kvm_regs> {
        if self.sync_regs && !self.regs_stale {
            Ok(self.vcpu.sync_regs().regs)
        } else {
            self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))
        }
    }

    /// Sets the general registers for the next entry: in the sync area when it is current
    /// (applied by the next `KVM_RUN`), else by ioctl.
    pub(crate) fn set_entry_regs(&mut self, regs: &kvm_regs) -> Result<()> {
        if self.sync_regs && !self.regs_stale {
            self.vcpu.sync_regs_mut().regs = *regs;
            self.vcpu.set_sync_dirty_reg(SyncReg::Register);
            self.regs_pending = true;
            Ok(())
        } else {
            self.vcpu.set_regs(regs).map_err(kvm_err("KVM_SET_REGS"))
        }
    }

    /// The registers were set by ioctl: the sync copy must neither be read nor written back.
    pub(crate) fn regs_set_by_ioctl(&mut self) {
        if self.regs_pending {
            self.vcpu.clear_sync_dirty_reg(SyncReg::Register);
            self.regs_pending = false;
        }
        self.regs_stale = true;
    }

    /// Saves the complete vCPU state (call between runs), including a register write still
    /// waiting for the next entry (a hypercall result).
    pub fn save_state(&self) -> Result<VcpuState> {
        let mut state = VcpuState::save(&self.vcpu, &self.msrs, false)?;
        if self.regs_pending {
            state.regs = self.vcpu.sync_regs().regs;
        }
        Ok(state)
    }

    /// Restores a state saved by `save_state` of this or another `GuestVm` of the same kind.
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<()> {
        self.regs_set_by_ioctl();
        state.restore(&self.vcpu)
    }

    /// Makes a VM stopped by a refused fault runnable again: un-poisons the pages the fault
    /// thread poisoned and clears the stop. The caller restores memory (Vmar reset) and vCPU
    /// state first; otherwise the guest simply faults again.
    pub fn recover(&mut self) -> Result<()> {
        let (poisoned, _report) = self.faults.shared().take_refusals();
        for (hva, installed) in poisoned {
            self.res.unpoison(hva, installed)?;
        }
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
            if let Some(e) = self.faults.shared().stop_report() {
                self.stopped = Some(e);
                return Ok(VmExit::GuestFault(e));
            }
            // The guest writes through the reservation: deferred write-protects first.
            self.res.seal()?;
            self.kick.entering();
            let r = self.vcpu.run().map(classify);
            self.kick.left();
            // KVM applied any pending write at entry and refreshed the sync copy at exit.
            self.regs_pending = false;
            self.regs_stale = !self.sync_regs;
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
                    match self.faults.shared().stop_report() {
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
