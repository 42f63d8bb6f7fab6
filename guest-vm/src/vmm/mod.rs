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
//!   `vcpu()` (raw ioctls) first applies every write waiting in the sync area by ioctl, so a
//!   caller's ioctls see and set the real state;
//! - short vCPU restore: `restore_state(s)` writes only xsave and the MSRs by ioctl and puts
//!   regs, sregs and events in the sync area (applied by the next `KVM_RUN`; `save_state` reads
//!   them from there meanwhile), instead of the nine ioctls of `VcpuState::restore`, exactly
//!   when (a) `s` is equal (`VcpuState::same_as`) to the state this vCPU last restored in full
//!   and (b) every exit since that full restore was clean: `out PORT_DONE` or `out PORT_CALL`
//!   (a hypercall, served or not) with CS at CPL3 in the sync copy of the sregs. Anything else
//!   clears (b) until the next full restore: every other exit (shutdown, MMIO, `hlt`, port
//!   I/O outside the ABI, unhandled), an interrupted or failed `KVM_RUN` (kick, signal,
//!   EFAULT), a refused fault, `vcpu()`, `setup_long_mode`, a failed restore. Why that is the
//!   full restore: from the restored state, the guest ran only CPL3 code (the boot state has
//!   no IDT, `EFER.SCE` clear and a null `SYSENTER_CS`, so any exception or attempt to enter
//!   CPL0 ends in a shutdown exit, which is not clean), and CPL3 code can change GPRs, flags,
//!   x87/SSE/AVX state (xsave), segment selectors and FS/GS bases (sregs), TSC (MSRs) and
//!   memory, but not XCR0, debug registers, `mp_state`, MSRs other than by the clock, or a
//!   LAPIC (none: no in-kernel irqchip); the short path writes every part CPL3 can change.
//!   Residual assumption, stated: a guest that writes a call gate into its own GDT (which is
//!   in user-writable memory) could reach CPL0 by a far call and return to CPL3 before a
//!   clean exit; the guests of this project do not. Sync-area sregs/events need
//!   `KVM_CAP_SYNC_REGS` to report them; without, every restore is full.

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
    /// KVM's sync area also carries sregs (refreshed at every exit: the CPL check) and events.
    sync_sregs_events: bool,
    /// The sync copy holds an sregs / events write for the next entry (a short restore).
    sregs_pending: bool,
    events_pending: bool,
    /// The state last restored in full on this vCPU (see the module documentation).
    restore_point: Option<Box<VcpuState>>,
    /// Every exit since that full restore was clean: a restore of an equal state may be short.
    clean_since_restore: bool,
    restore_stats: VcpuRestoreStats,
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

    /// The vCPU, for raw ioctls: first applies by ioctl whatever waits in the sync area for
    /// the next entry (a hypercall result, a short restore), so the caller's ioctls see and
    /// set the real state; and, since they may change any of it, the next restore is full.
    pub fn vcpu(&mut self) -> Result<&VcpuFd> {
        self.flush_pending()?;
        self.clean_since_restore = false;
        Ok(&self.vcpu)
    }

    /// How many `restore_state` calls took the full and the short path.
    pub fn vcpu_restore_stats(&self) -> VcpuRestoreStats {
        self.restore_stats
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

    /// The whole state is about to be set by ioctl: drops every write waiting in the sync
    /// area, which must neither be read nor written back.
    fn discard_pending(&mut self) {
        for (pending, reg) in [
            (&mut self.regs_pending, SyncReg::Register),
            (&mut self.sregs_pending, SyncReg::SystemRegister),
            (&mut self.events_pending, SyncReg::VcpuEvents),
        ] {
            if *pending {
                self.vcpu.clear_sync_dirty_reg(reg);
                *pending = false;
            }
        }
        self.regs_stale = true;
    }

    /// Applies by ioctl the writes waiting in the sync area (in `VcpuState::restore`'s order:
    /// sregs, regs, events), then drops them: the vCPU's own state is current, the sync copy of
    /// the registers stale.
    pub(crate) fn flush_pending(&mut self) -> Result<()> {
        let sync = self.vcpu.sync_regs();
        if self.sregs_pending {
            self.vcpu
                .set_sregs(&sync.sregs)
                .map_err(kvm_err("KVM_SET_SREGS"))?;
        }
        if self.regs_pending {
            self.vcpu
                .set_regs(&sync.regs)
                .map_err(kvm_err("KVM_SET_REGS"))?;
        }
        if self.events_pending {
            self.vcpu
                .set_vcpu_events(&sync.events)
                .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        }
        self.discard_pending();
        Ok(())
    }

    /// Saves the complete vCPU state (call between runs), including writes still waiting in
    /// the sync area for the next entry (a hypercall result; regs, sregs and events of a short
    /// restore).
    pub fn save_state(&self) -> Result<VcpuState> {
        let mut state = VcpuState::save(&self.vcpu, &self.msrs, false)?;
        let sync = self.vcpu.sync_regs();
        if self.regs_pending {
            state.regs = sync.regs;
        }
        if self.sregs_pending {
            state.sregs = sync.sregs;
        }
        if self.events_pending {
            state.events = sync.events;
        }
        Ok(state)
    }

    /// Restores a state saved by `save_state` of this or another `GuestVm` of the same kind:
    /// by the short path when the module documentation's condition holds, else in full.
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<()> {
        let short = self.sync_regs
            && self.sync_sregs_events
            && self.clean_since_restore
            && self
                .restore_point
                .as_ref()
                .is_some_and(|p| p.same_as(state));
        if short {
            if let Err(e) = self.restore_short(state) {
                self.clean_since_restore = false;
                return Err(e);
            }
            self.restore_stats.short += 1;
            return Ok(());
        }
        self.discard_pending();
        self.clean_since_restore = false;
        state.restore(&self.vcpu)?;
        match &mut self.restore_point {
            Some(p) => **p = state.clone(),
            None => self.restore_point = Some(Box::new(state.clone())),
        }
        self.clean_since_restore = true;
        self.restore_stats.full += 1;
        Ok(())
    }

    /// The short restore: xsave and MSRs (TSC included, so `rdtsc` stays deterministic across
    /// resets) by ioctl; regs, sregs and events into the sync area for the next `KVM_RUN`.
    fn restore_short(&mut self, state: &VcpuState) -> Result<()> {
        state.restore_xsave_msrs(&self.vcpu)?;
        let sync = self.vcpu.sync_regs_mut();
        sync.regs = state.regs;
        sync.sregs = state.sregs;
        sync.events = state.events;
        for reg in [
            SyncReg::Register,
            SyncReg::SystemRegister,
            SyncReg::VcpuEvents,
        ] {
            self.vcpu.set_sync_dirty_reg(reg);
        }
        self.regs_pending = true;
        self.sregs_pending = true;
        self.events_pending = true;
        // The sync copy of the registers is the state of the next entry.
        self.regs_stale = false;
        Ok(())
    }

    /// After `KVM_RUN` returned: whether the vCPU stopped at CPL3 (from the sync copy of the
    /// sregs, refreshed at every exit).
    fn exit_at_cpl3(&self) -> bool {
        self.sync_sregs_events && self.vcpu.sync_regs().sregs.cs.selector & 3 == 3
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
                self.clean_since_restore = false;
                return Ok(VmExit::GuestFault(e));
            }
            // The guest writes through the reservation: deferred write-protects first.
            self.res.seal()?;
            self.kick.entering();
            let r = self.vcpu.run().map(classify);
            self.kick.left();
            // KVM applied any pending write at entry and refreshed the sync copy at exit.
            self.regs_pending = false;
            self.sregs_pending = false;
            self.events_pending = false;
            self.regs_stale = !self.sync_regs;
            // Only an ABI exit at CPL3 keeps a short restore possible (module documentation).
            let clean = matches!(r, Ok(Step::Hypercall(_) | Step::Exit(VmExit::Done(_))))
                && self.exit_at_cpl3();
            if !clean {
                self.clean_since_restore = false;
            }
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

/// How many vCPU restores took each path (`GuestVm::vcpu_restore_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuRestoreStats {
    /// `VcpuState::restore`: nine or ten ioctls.
    pub full: u64,
    /// xsave + MSRs by ioctl, the rest through the sync area.
    pub short: u64,
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
