//! `Guest`: a KVM guest whose guest-physical memory is a `vmo::Vmar` — the product path.
//!
//! Wiring: guest RAM is one anonymous Vmo (frames from the process's memfd `HostFrames`)
//! mapped read-write at GPA 0 of a root `Vmar<KvmStage2>`; the VM's fault thread calls
//! `Vmar::handle_fault` for every userfaultfd event (MISSING → not-present, WP → permission),
//! and the Vmar installs frames through `KvmStage2`. The VMM's own accesses (loader, mailbox)
//! raise the same events, so CPU and VMM see one memory.
//!
//! Snapshot / fork / reset:
//! - `snapshot` (guest stopped at an exit): the complete vCPU state; `fork(&state)` forks the
//!   Vmar (`Vmar::fork`: parent and child share every frame copy-on-write; cost independent
//!   of guest size) into a new VM shell (reservation + VM + vCPU + memslot + fault thread,
//!   `vmm::VmShell`), attaches the child Vmar to the shell's fault thread and restores the
//!   state there; `fork_from(&pool, &state)` does the same with a shell a [`pool`]
//!   (`ShellPool`) built ahead in the background, so only `Vmar::fork`, the attach and the
//!   state restore are left on the fork's path (one code path: `fork_into`);
//! - `reset(&state)`: `Vmar::reset_with(Restore)` (copies the snapshot's bytes back into the
//!   pages written since the fork / last reset, keeping them installed; a backend without
//!   dirty harvest drops them instead), un-poisons pages a refused fault poisoned, restores
//!   the vCPU state (`GuestVm::restore_state`: xsave + MSRs by ioctl and the rest through the
//!   sync area when the state is the one last restored in full and the child only took clean
//!   CPL3 ABI exits since — the fuzz loop's case; otherwise in full, vmm/mod.rs). Every guest's Vmar has the copy-back hot set on with `KVM_HOT_SET`
//!   (`set_hot_set` changes it; forks inherit it): pages the guest writes at every iteration
//!   stay untracked, so re-dirtying them costs no exit.
//!
//! The fault thread's resolver is the guest's `Vmar` itself (`impl Resolver for
//! Vmar<KvmStage2>`): uffd event → fault thread → `Vmar::handle_fault` → Vmo → `KvmStage2`.
//! Bulk paths: `prefault` (a range) and `prefetch` (a working set recorded by an earlier run,
//! `Vmar::set_recording`) are `Vmar::prefault` — runs of frames, one `mmap` each, no exits.
//! Streaming fault-around (opt-in, `set_stream_fault_around`) is the Vmar's own policy
//! (`vmo::Vmar::set_stream_fault_around`): after write faults on consecutive pages commit fresh
//! pages, the next ones are committed and installed in the same fault, stopping before any
//! page that is installed, committed already, or shared — so a forked child never copies a
//! page it did not write.
//!
//! [`pool`]: `ShellPool`, VM shells for one guest size built ahead by a background thread
//! (`new_shell` is also where `fork` and `new` get theirs).
//!
//! [`program`]: `Program`, a user's guest ELF in a `Guest` with the host side of the guest ABI
//! (`snapshot_here`, `next_input`, `done`, `crash`, a time limit per run; `guest/ABI.md`).
//!
//! [`watchdog`]: `Watchdog`, a program's time-limit thread, armed per run without waking it.
//!
//! [`fuzz`]: `GuestExecutor`, a LibAFL executor over one forked child of a `Program` (reset per
//! input, coverage from a shared Vmo), and `fuzz`, one LibAFL client over it.
//!
//! Invariants: a `Guest` is driven from one thread at a time (the vCPU thread); forks are taken
//! only while the parent's vCPU is stopped (the Vmar's fork contract), and the host side of
//! the parent's write-protect waits for its next run or host write (`Reservation::seal`);
//! dropping a `Guest` stops its fault thread before its reservation is unmapped, and returns
//! every frame it alone held.

pub mod fuzz;
pub mod pool;
pub mod program;
pub mod watchdog;

use vmo::{HotSetPolicy, MapOptions, ResetPolicy, RestoreStats, VmPerms, Vmar, Vmo, VmoFlags};

use crate::error::{Error, Result};
use crate::memory::frames::HostFrames;
use crate::memory::stage2::KvmStage2;
use crate::vmm::vcpu_state::VcpuState;
use crate::vmm::{GuestVm, VmShell};
pub use pool::{PoolStats, ShellPool};

/// The copy-back hot set of every `Guest` (`vmo::HotSetPolicy`). On this host a tracked
/// write costs a PVM exit while copying a page back costs well under a microsecond
/// (`guest-vm bench`, row `hot-break-even`: a page written in more than a few percent of the
/// iterations is cheaper untracked), so two consecutive written resets are evidence enough;
/// a re-tracking every 64 resets costs each hot page one exit per 64 iterations; at most
/// 8192 hot pages (32 MiB copied per reset) bound what a guest that stops writing them costs
/// until the next resample. On hardware where tracking costs no exit (PML, EPT A/D) the
/// balance differs: that is why this is a policy.
pub const KVM_HOT_SET: HotSetPolicy = HotSetPolicy {
    promote_after: 2,
    resample_every: 64,
    max_pages: 8192,
};

/// A guest container; see the module documentation.
pub struct Guest {
    // Field order is drop order: the VM (and its fault thread, which holds a Vmar clone)
    // goes first.
    vm: GuestVm,
    vmar: Vmar<KvmStage2>,
    pub(crate) frames: HostFrames,
    mem_size: u64,
}

impl Guest {
    /// A fresh guest with `mem_size` bytes of RAM at GPA 0 (nothing committed yet).
    pub fn new(frames: &HostFrames, mem_size: u64) -> Result<Self> {
        Self::with_layout(frames, mem_size, |vmar| {
            let ram = Vmo::new(&frames.pool, mem_size, VmoFlags::empty())?;
            vmar.map(&ram, 0, mem_size, MapOptions::specific(0, VmPerms::RW))?;
            Ok(())
        })
    }

    /// A guest of `mem_size` bytes whose memory layout `layout` builds on the fresh root Vmar
    /// before the VM exists (a restore maps its pager-backed Vmos this way).
    pub fn with_layout(
        frames: &HostFrames,
        mem_size: u64,
        layout: impl FnOnce(&Vmar<KvmStage2>) -> Result<()>,
    ) -> Result<Self> {
        let shell = pool::new_shell(mem_size)?;
        let stage2 = KvmStage2::new(shell.reservation().clone(), frames.alloc.clone());
        let vmar = Vmar::new_root(mem_size, stage2)?;
        vmar.set_hot_set(Some(KVM_HOT_SET))?;
        layout(&vmar)?;
        let mut vm = shell.into_vm(vmar.clone())?;
        vm.set_memory_access(vmar.clone());
        Ok(Guest {
            vm,
            vmar,
            frames: frames.clone(),
            mem_size,
        })
    }

    pub fn vm(&self) -> &GuestVm {
        &self.vm
    }

    pub fn vm_mut(&mut self) -> &mut GuestVm {
        &mut self.vm
    }

    pub fn vmar(&self) -> &Vmar<KvmStage2> {
        &self.vmar
    }

    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// The complete vCPU state (the guest must be stopped at an exit, as it is between runs).
    pub fn snapshot(&self) -> Result<VcpuState> {
        self.vm.save_state()
    }

    /// A child guest: a copy-on-write fork of this guest's memory in a new VM, with vCPU
    /// `state` (from `snapshot`). This guest must not be running.
    pub fn fork(&self, state: &VcpuState) -> Result<Guest> {
        self.fork_into(pool::new_shell(self.mem_size)?, state)
    }

    /// `fork` into a shell from `pool` (built ahead by its refill thread, or on the spot when
    /// the pool is empty): only `Vmar::fork`, attaching the child's Vmar to the shell's fault
    /// thread and restoring `state` remain. The pool's guest size must be this guest's.
    pub fn fork_from(&self, pool: &ShellPool, state: &VcpuState) -> Result<Guest> {
        if pool.mem_size() != self.mem_size {
            return Err(Error::InvalidArgs(format!(
                "shell pool for {:#x}-byte guests, this guest has {:#x} bytes",
                pool.mem_size(),
                self.mem_size
            )));
        }
        self.fork_into(pool.take()?, state)
    }

    /// The one fork path: the Vmar forked over a Stage2 on `shell`'s reservation, the shell
    /// given the child Vmar as its resolver, the vCPU state restored.
    fn fork_into(&self, shell: VmShell, state: &VcpuState) -> Result<Guest> {
        if shell.mem_size() != self.mem_size {
            return Err(Error::InvalidArgs(format!(
                "shell for {:#x} bytes, guest has {:#x}",
                shell.mem_size(),
                self.mem_size
            )));
        }
        let stage2 = KvmStage2::new(shell.reservation().clone(), self.frames.alloc.clone());
        let vmar = self.vmar.fork(stage2)?;
        let mut vm = shell.into_vm(vmar.clone())?;
        vm.set_memory_access(vmar.clone());
        vm.restore_state(state)?;
        Ok(Guest {
            vm,
            vmar,
            frames: self.frames.clone(),
            mem_size: self.mem_size,
        })
    }

    /// Sets the copy-back hot set of this guest (`None` turns it off; default `KVM_HOT_SET`);
    /// forks taken later inherit it.
    pub fn set_hot_set(&self, policy: Option<HotSetPolicy>) -> Result<()> {
        Ok(self.vmar.set_hot_set(policy)?)
    }

    /// Makes the current memory the state `reset` returns to (for a guest that was not forked).
    pub fn set_reset_point(&self) -> Result<()> {
        Ok(self.vmar.set_reset_point()?)
    }

    /// Returns memory to the fork (or last reset point) with the restore policy — the pages
    /// written since the last reset get the snapshot's bytes back and stay installed (see
    /// `reset_with`) — and the vCPU to `state`. Also recovers a VM stopped by a refused fault.
    /// Returns the number of pages reset (restored + dropped).
    pub fn reset(&mut self, state: &VcpuState) -> Result<u64> {
        let stats = self.reset_with(state, ResetPolicy::Restore)?;
        Ok(stats.restored + stats.dropped)
    }

    /// `reset` with an explicit policy: `Restore` (copy-back, the default of `reset`; falls
    /// back to `Drop` when the backend cannot harvest dirty pages) or `Drop` (give the private
    /// frames back, for memory pressure).
    pub fn reset_with(&mut self, state: &VcpuState, policy: ResetPolicy) -> Result<RestoreStats> {
        let stats = self.vmar.reset_with(policy)?;
        self.vm.recover()?;
        self.vm.restore_state(state)?;
        Ok(stats)
    }

    /// Installs `[gpa, gpa+len)` ahead of the guest (VMM-side fault-around for a range it
    /// knows is hot, e.g. a table the workload is about to build): `Vmar::prefault`, the fault
    /// path over the range in bulk (contiguous frame runs, one `mmap` each) — minus the KVM
    /// exits and userfaultfd round trips. `write` asks for writable pages (commits / copies
    /// them). Pages the Vmar refuses are an error; pages already installed are no-ops.
    /// Returns the number of pages in the range.
    pub fn prefault(&self, gpa: u64, len: u64, write: bool) -> Result<u64> {
        let access = if write {
            ept::Access::WRITE
        } else {
            ept::Access::READ
        };
        let start = gpa & !(ept::PAGE_SIZE - 1);
        let end = gpa
            .checked_add(len)
            .filter(|&e| e <= self.mem_size)
            .ok_or_else(|| Error::InvalidArgs(format!("prefault {gpa:#x}+{len:#x}")))?;
        if end > start {
            self.vmar.prefault(start, end - start, access)?;
        }
        Ok((end - start).div_ceil(ept::PAGE_SIZE))
    }

    /// Installs a working set recorded by an earlier run (`vmar().set_recording` /
    /// `recorded()`, e.g. a first child of the same snapshot) before the guest runs:
    /// `Vmar::prefetch` — shared pages read-only, or with `copy_written` the recorded writes
    /// copied ahead and installed writable. Returns the pages installed.
    pub fn prefetch(&self, set: &vmo::WorkingSet, copy_written: bool) -> Result<u64> {
        Ok(self.vmar.prefetch(set, copy_written)?)
    }

    /// `prefetch` for a guest whose pages mostly still need committing (a restore from a file):
    /// `Vmar::prefetch_spans` — runs closer than `max_gap` pages merged into spans installed
    /// read-only in bulk, then the recorded writes installed writable. Returns the pages the
    /// first pass installed.
    pub fn prefetch_spans(
        &self,
        set: &vmo::WorkingSet,
        copy_written: bool,
        max_gap: u64,
    ) -> Result<u64> {
        Ok(self.vmar.prefetch_spans(set, copy_written, max_gap)?)
    }

    /// Sets the streaming fault-around window (pages; 0 turns it off, the default; at most
    /// `vmo::MAX_FAULT_AROUND`). Forks inherit it.
    pub fn set_stream_fault_around(&self, pages: u64) {
        self.vmar.set_stream_fault_around(pages);
    }

    /// Pages installed in this guest's second-level backend (its resident guest memory).
    pub fn installed_pages(&self) -> u64 {
        self.vmar.with_stage2(|s| s.mapped_pages())
    }

    /// Consumes the guest into its parts (VM first: drop it before the Vmar).
    pub fn into_parts(self) -> (GuestVm, Vmar<KvmStage2>) {
        (self.vm, self.vmar)
    }
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("mem_size", &self.mem_size)
            .finish_non_exhaustive()
    }
}

/// Result of `Error` conversion for callers matching on the memory model's refusal.
pub fn vmo_error(e: &Error) -> Option<vmo::Error> {
    match e {
        Error::Vmo(v) => Some(*v),
        _ => None,
    }
}

impl std::borrow::Borrow<GuestVm> for Guest {
    fn borrow(&self) -> &GuestVm {
        &self.vm
    }
}

impl std::borrow::BorrowMut<GuestVm> for Guest {
    fn borrow_mut(&mut self) -> &mut GuestVm {
        &mut self.vm
    }
}
