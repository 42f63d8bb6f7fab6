//! `GuestVm`: the VMM for one guest — a KVM VM whose only memslot is a `Reservation`, one
//! vCPU in 64-bit long mode running guest code at CPL3 with IOPL=3, the fault thread serving
//! the reservation, and the exit loop.
//!
//! Ownership: the caller builds the memory side (`Reservation`, `KvmStage2`, and the Vmar or
//! test resolver that owns the Stage2) and hands the resolver to `GuestVm::new`, which runs it
//! on the fault thread. The VM never installs memory itself: every page arrives through the
//! resolver, including the pages the VMM writes when it loads the boot image (host accesses go
//! through `read_guest`/`write_guest`, i.e. `process_vm_readv/writev` on the reservation, which
//! raises the same userfaultfd events and fails with an error instead of a signal).
//!
//! Invariants:
//! - exits are always completed (an MMIO read gets data before the next `KVM_RUN`);
//! - a resolver error stops the VM: `run` returns `VmExit::GuestFault` with the report once, and
//!   every later `run` is `Error::BadState` (the VM must be reset — poisoned pages);
//! - `Kicker::kick` (from any thread) makes a running or about-to-run `KVM_RUN` return with
//!   `VmExit::Kicked` (immediate_exit + a signal); it is also the fault thread's stop hook.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::fault_thread::{FaultError, FaultShared, FaultStats, FaultThread, Resolver};
use crate::hypercall::{Hypercall, HC_ERR, PORT_CALL, PORT_DONE};
use crate::payload;
use crate::reservation::Reservation;
use crate::vcpu_state::{readable_msrs, VcpuState};
use crate::{Error, Result};

/// Why `run` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// `out PORT_DONE, al`: the guest finished with status `al`.
    Done(u8),
    /// `HC_EXIT(code)`.
    Exit(u64),
    /// `HC_REPORT(value)`; running again continues the guest.
    Report(u64),
    /// Port output on a port the ABI does not define.
    IoOut {
        port: u16,
        data: Vec<u8>,
    },
    /// Guest access to a GPA outside the memslot (completed with all-ones on read).
    Mmio {
        addr: u64,
        write: bool,
        data: Vec<u8>,
    },
    Hlt,
    /// Triple fault (e.g. a CPL3 exception with no handler, or an unbacked page table).
    Shutdown,
    /// The resolver refused a fault of this guest; the VM is stopped.
    GuestFault(FaultError),
    /// `Kicker::kick` interrupted the run.
    Kicked,
    /// A hypercall number the VMM core does not serve (a workload's call): `rax` already
    /// holds `HC_ERR`; the caller may answer with `set_hypercall_result` before running on.
    Hypercall {
        nr: u8,
        args: [u64; 3],
    },
    /// An exit this VMM does not handle (its debug text).
    Unhandled(String),
}

/// Initial registers of a guest program.
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestArgs {
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
}

struct KickState {
    /// `&kvm_run.immediate_exit` while the vCPU exists; null after.
    immediate_exit: Mutex<usize>,
    /// pthread_t of the thread inside `run`, or 0.
    thread: AtomicU64,
    requested: AtomicBool,
}

/// Stops the VM's vCPU from any thread; see the module documentation.
#[derive(Clone)]
pub struct Kicker(Arc<KickState>);

static SIGNAL_ONCE: Once = Once::new();

/// Signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Kicker {
    pub fn kick(&self) {
        let st = &self.0;
        st.requested.store(true, Ordering::SeqCst);
        let ptr = *st.immediate_exit.lock().unwrap_or_else(|p| p.into_inner());
        if ptr != 0 {
            // SAFETY: the pointer is `&kvm_run.immediate_exit` of a live vCPU (cleared under
            // this mutex before the vCPU is dropped); a byte store is what KVM expects.
            unsafe { std::ptr::write_volatile(ptr as *mut u8, 1) };
        }
        let t = st.thread.load(Ordering::SeqCst);
        if t != 0 {
            // SAFETY: `t` is the pthread_t of the thread currently inside `run` (it clears the
            // value before returning); the signal has a no-op handler.
            unsafe { libc::pthread_kill(t as libc::pthread_t, kick_signal()) };
        }
    }
}

/// Checks that this process can run guests: root, `/dev/kvm`, userfaultfd with WP. The error
/// says what is missing (tests print it as their SKIP reason).
pub fn check_host() -> Result<()> {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::KvmUnavailable(
            "not root: /dev/kvm and kernel-mode userfaultfd need root here".into(),
        ));
    }
    Kvm::new().map_err(|e| Error::KvmUnavailable(format!("cannot open /dev/kvm: {e}")))?;
    crate::uffd::Uffd::open()?;
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

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |err| Error::Kvm { what, err }
}

impl GuestVm {
    /// A VM over `res` (memslot 0) whose faults go to `resolver` on a new fault thread.
    pub fn new(res: Arc<Reservation>, resolver: Resolver) -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| {
            Error::KvmUnavailable(format!("cannot open /dev/kvm (needs root here): {e}"))
        })?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: res.gpa_base(),
            memory_size: res.size(),
            userspace_addr: res.hva(),
        };
        // SAFETY: the host range is our reservation, which outlives the VM (`res` is held
        // here and dropped after `_vm`).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let msrs = readable_msrs(&kvm, &vcpu)?;
        SIGNAL_ONCE.call_once(|| {
            // A failure leaves the default action; kicks then still work via immediate_exit
            // for a vCPU that is about to enter, which is all a failed registration can lose.
            let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler);
        });
        let mut vcpu = vcpu;
        let ie = &mut vcpu.get_kvm_run().immediate_exit as *mut u8 as usize;
        let kick = Arc::new(KickState {
            immediate_exit: Mutex::new(ie),
            thread: AtomicU64::new(0),
            requested: AtomicBool::new(false),
        });
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

    /// Writes `data` at `gpa` through the reservation (pages not yet installed fault in through
    /// the resolver). Outside the memslot or refused by the resolver: an error, never a signal.
    pub fn write_guest(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.host_access(gpa, data.as_ptr() as *mut u8, data.len(), true)
    }

    /// Reads `buf.len()` bytes at `gpa`; see `write_guest`.
    pub fn read_guest(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.host_access(gpa, buf.as_mut_ptr(), buf.len(), false)
    }

    fn host_access(&self, gpa: u64, local: *mut u8, len: usize, write: bool) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let hva = self.res.hva_of(gpa, len as u64).ok_or_else(|| {
            Error::InvalidArgs(format!(
                "guest range {gpa:#x}+{len:#x} outside guest memory"
            ))
        })?;
        let mut done = 0usize;
        while done < len {
            let l = libc::iovec {
                iov_base: local.wrapping_add(done).cast(),
                iov_len: len - done,
            };
            let r = libc::iovec {
                iov_base: (hva + done as u64) as *mut libc::c_void,
                iov_len: len - done,
            };
            // SAFETY: `l` is our own buffer; `r` is checked by the kernel (EFAULT on failure,
            // no signal), and the reservation is ours.
            let n = unsafe {
                if write {
                    libc::process_vm_writev(libc::getpid(), &l, 1, &r, 1, 0)
                } else {
                    libc::process_vm_readv(libc::getpid(), &l, 1, &r, 1, 0)
                }
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Sys {
                    what: if write {
                        "write guest memory"
                    } else {
                        "read guest memory"
                    },
                    err,
                });
            }
            if n == 0 {
                return Err(Error::InvalidArgs(format!(
                    "guest memory at {:#x} is not accessible (refused by the resolver)",
                    gpa + done as u64
                )));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Writes the boot image (GDT, page tables, `code` at `CODE_GPA`) through the fault path
    /// and points the vCPU at `CODE_GPA` in 64-bit CPL3 with `args`.
    pub fn load(&mut self, code: &[u8], args: GuestArgs) -> Result<()> {
        for (gpa, bytes) in payload::boot_image(self.res.size(), code)? {
            self.write_guest(gpa, &bytes)?;
        }
        self.setup_long_mode(payload::CODE_GPA, args)
    }

    /// Sets the vCPU to 64-bit long mode, CPL3, IOPL=3, paging from `PML4_GPA`, at `rip`.
    pub fn setup_long_mode(&mut self, rip: u64, args: GuestArgs) -> Result<()> {
        let mut sregs = self.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: payload::SEL_USER_CODE,
            type_: 11,
            present: 1,
            dpl: 3,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: payload::SEL_USER_DATA,
            type_: 3,
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment {
            base: 0,
            limit: 0x67,
            selector: payload::SEL_TSS,
            type_: 11,
            present: 1,
            dpl: 0,
            db: 0,
            s: 0,
            l: 0,
            g: 0,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.gdt.base = payload::GDT_GPA;
        sregs.gdt.limit = 7 * 8 - 1;
        // PE | MP | ET | NE | PG
        sregs.cr0 = 0x8000_0033;
        // PAE | OSFXSR | OSXMMEXCPT (the guest's code may use SSE)
        sregs.cr4 = 0x20 | 0x200 | 0x400;
        sregs.cr3 = payload::PML4_GPA;
        // LME | LMA
        sregs.efer = 0x500;
        self.vcpu
            .set_sregs(&sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        let regs = kvm_bindings::kvm_regs {
            rip,
            rsp: payload::STACK_TOP,
            // IOPL=3 | reserved bit 1
            rflags: 0x3002,
            rdi: args.rdi,
            rsi: args.rsi,
            rdx: args.rdx,
            rcx: args.rcx,
            rax: args.rax,
            ..Default::default()
        };
        self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
    }

    /// Sets `rax`, the result of the hypercall the guest is stopped at (after
    /// `VmExit::Hypercall`).
    pub fn set_hypercall_result(&mut self, value: u64) -> Result<()> {
        let mut regs = self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        regs.rax = value;
        self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
    }

    /// A `vm-memory` view of guest RAM (the reservation). Accesses to pages not yet installed
    /// fault in through the resolver like guest accesses. Unlike `read_guest`/`write_guest`,
    /// an access the resolver refuses hits a poisoned page and raises SIGSEGV: use it only for
    /// ranges the memory model maps (devices check descriptors against the Vmar first).
    pub fn guest_memory(&self) -> Result<vm_memory::GuestMemoryMmap> {
        use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
        // SAFETY: the reservation is a live mapping of exactly this size and these flags, and
        // it outlives every use through `self.res` (the view must not outlive the VM).
        let region = unsafe {
            MmapRegion::build_raw(
                self.res.hva() as *mut u8,
                self.res.size() as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
        }
        .map_err(|e| Error::InvalidArgs(format!("vm-memory region: {e}")))?;
        let region = GuestRegionMmap::new(region, GuestAddress(self.res.gpa_base()))
            .ok_or_else(|| Error::InvalidArgs("vm-memory region overflows".into()))?;
        GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| Error::InvalidArgs(format!("vm-memory: {e}")))
    }

    /// Loads a static ELF guest program (linked inside `[CODE_GPA, STACK_TOP - STACK_SIZE)`)
    /// with linux-loader, writes it and the boot image through the fault path, and points the
    /// vCPU at its entry in 64-bit CPL3 with `args`.
    ///
    /// The ELF is parsed and placed by linux-loader into a private staging memory first, so a
    /// malformed image is an error and never touches guest memory.
    pub fn load_elf(&mut self, elf: &[u8], args: GuestArgs) -> Result<()> {
        use linux_loader::loader::{Elf, KernelLoader};
        use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
        let limit = payload::STACK_TOP - payload::STACK_SIZE;
        let staging = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), limit as usize)])
            .map_err(|e| Error::Payload(format!("staging memory: {e}")))?;
        let loaded = Elf::load(&staging, None, &mut std::io::Cursor::new(elf), None)
            .map_err(|e| Error::Payload(format!("ELF: {e}")))?;
        let entry = loaded.kernel_load.0;
        let end = loaded.kernel_end;
        if entry < payload::CODE_GPA || entry >= end || end > limit {
            return Err(Error::Payload(format!(
                "ELF entry {entry:#x} / end {end:#x} outside [{:#x}, {limit:#x})",
                payload::CODE_GPA
            )));
        }
        let mut image = vec![0u8; (end - payload::CODE_GPA) as usize];
        staging
            .read_slice(&mut image, GuestAddress(payload::CODE_GPA))
            .map_err(|e| Error::Payload(format!("staging read: {e}")))?;
        for (gpa, bytes) in payload::boot_image(self.res.size(), &image)? {
            self.write_guest(gpa, &bytes)?;
        }
        self.setup_long_mode(entry, args)
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
            // SAFETY: no arguments.
            let me = unsafe { libc::pthread_self() } as u64;
            self.kick.thread.store(me, Ordering::SeqCst);
            let r = self.vcpu.run();
            let exit = match r {
                Ok(VcpuExit::IoOut(PORT_DONE, data)) => Some(VmExit::Done(data[0])),
                Ok(VcpuExit::IoOut(PORT_CALL, data)) => {
                    let nr = data[0];
                    self.kick.thread.store(0, Ordering::SeqCst);
                    match self.hypercall(nr)? {
                        Some(e) => return Ok(e),
                        None => continue,
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => Some(VmExit::IoOut {
                    port,
                    data: data.to_vec(),
                }),
                Ok(VcpuExit::IoIn(_, data)) => {
                    data.fill(0xff);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    data.fill(0xff);
                    Some(VmExit::Mmio {
                        addr,
                        write: false,
                        data: data.to_vec(),
                    })
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => Some(VmExit::Mmio {
                    addr,
                    write: true,
                    data: data.to_vec(),
                }),
                Ok(VcpuExit::Hlt) => Some(VmExit::Hlt),
                Ok(VcpuExit::Shutdown) => Some(VmExit::Shutdown),
                Ok(VcpuExit::Intr) => None,
                Ok(other) => Some(VmExit::Unhandled(format!("{other:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.vcpu.set_kvm_immediate_exit(0);
                    if self.kick.requested.swap(false, Ordering::SeqCst)
                        && !self.faults.shared().has_error()
                    {
                        Some(VmExit::Kicked)
                    } else {
                        None
                    }
                }
                Err(e) if e.errno() == libc::EFAULT => {
                    // A poisoned page: the fault thread recorded why before waking us.
                    match self.faults.shared().take_error() {
                        Some(fe) => {
                            self.stopped = Some(fe);
                            Some(VmExit::GuestFault(fe))
                        }
                        None => {
                            self.kick.thread.store(0, Ordering::SeqCst);
                            return Err(Error::Kvm {
                                what: "KVM_RUN (EFAULT with no recorded guest fault)",
                                err: e,
                            });
                        }
                    }
                }
                Err(err) => {
                    self.kick.thread.store(0, Ordering::SeqCst);
                    return Err(Error::Kvm {
                        what: "KVM_RUN",
                        err,
                    });
                }
            };
            self.kick.thread.store(0, Ordering::SeqCst);
            if let Some(e) = exit {
                return Ok(e);
            }
        }
    }

    /// Serves hypercall `nr`; `Some` when the caller must see it.
    fn hypercall(&mut self, nr: u8) -> Result<Option<VmExit>> {
        let mut regs = self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let call = Hypercall::decode(nr, regs.rdi, regs.rsi, regs.rdx);
        let (ret, exit) = match call {
            Hypercall::Exit { code } => (0, Some(VmExit::Exit(code))),
            Hypercall::Report { value } => (value.wrapping_add(1), Some(VmExit::Report(value))),
            Hypercall::Log { gpa, len } => {
                let mut buf = vec![0u8; len as usize];
                match self.read_guest(gpa, &mut buf) {
                    Ok(()) => {
                        let s = String::from_utf8_lossy(&buf).into_owned();
                        tracing::info!(target: "guest", "{s}");
                        self.log.push(s);
                        (0, None)
                    }
                    Err(_) => (HC_ERR, None),
                }
            }
            Hypercall::Invalid { nr } => (
                HC_ERR,
                Some(VmExit::Hypercall {
                    nr,
                    args: [regs.rdi, regs.rsi, regs.rdx],
                }),
            ),
        };
        regs.rax = ret;
        self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        Ok(exit)
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        *self
            .kick
            .immediate_exit
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = 0;
    }
}

impl AsRawFd for GuestVm {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.vcpu.as_raw_fd()
    }
}
