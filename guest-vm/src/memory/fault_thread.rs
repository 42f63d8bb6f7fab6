//! The fault channel: one thread reads the reservation's synchronous userfaultfd, turns each
//! event into an `ept::FaultInfo`, hands it to one resolver, and wakes the faulting thread.
//! (The reservation's other descriptor, the async write tracker, produces no events by
//! construction — `WP_ASYNC` — and is not served.)
//!
//! - MISSING event (anonymous reservation page) → `FaultInfo { kind: NotPresent }`;
//!   WP event (write to an installed, write-protected frame) → `kind: Permission`, access WRITE.
//! - The resolver is the memory model's fault path: a [`Resolver`]. In the product it is the
//!   guest's `Vmar<KvmStage2>` itself (`Vmar::handle_fault`, which installs pages through
//!   `KvmStage2`); tests hand in closures. The walk is: uffd event → this thread →
//!   `Vmar::handle_fault` → Vmo → `Stage2`.
//! - A resolver error (the guest touched memory outside its Vmar, or wrote a read-only
//!   mapping) never leaves the faulter blocked and never panics: the error is recorded
//!   (`FaultShared::take_error`), the page is poisoned (PROT_NONE, so the retried access fails
//!   with a plain fault: `KVM_RUN = -EFAULT` at CPL3), the faulter is woken, and the kick hook
//!   (the VM's "stop the vCPU" function) runs. The vCPU loop sees the recorded error and
//!   returns `VmExit::GuestFault` with the report. A poisoned VM must be reset before it runs
//!   again.
//!
//! - The protocol (`serve`, `serve_fault`) is written once against [`FaultChannel`], the kernel
//!   operations it needs (wait for and read events, wake, poison): the product runs it over
//!   [`UffdChannel`] (the reservation's synchronous userfaultfd), `tests/uffd_interleave.rs`
//!   over an in-memory userfaultfd under shuttle. Static dispatch, no allocation per event.
//!
//! Invariants: the resolver runs only on this thread and must never touch guest memory through
//! the reservation itself (it would wait for its own fault); it reaches frame bytes through
//! `FrameAlloc::frame_ptr`. Every event is answered by exactly one wake. The thread stops and
//! is joined when `FaultThread` drops.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use ept::{Access, FaultInfo, FaultKind};
use vmm_sys_util::eventfd::EventFd;

use crate::addr::{Gpa, Hva};
use crate::error::{Error, Result};
use crate::memory::reservation::Reservation;
use crate::memory::stage2::KvmStage2;
use crate::sync::Mutex;
use crate::sys::uffd::PageFault;
use ept::PAGE_SIZE;

/// The fault path the thread calls for every event; runs on the fault thread. Implemented by
/// the product's `Vmar<KvmStage2>` and by closures (tests).
pub trait Resolver: Send {
    /// Resolves `fault` (installs what it needs through the backend) or refuses it.
    fn resolve(&mut self, fault: FaultInfo) -> vmo::Result<()>;
}

impl<F: FnMut(FaultInfo) -> vmo::Result<()> + Send> Resolver for F {
    fn resolve(&mut self, fault: FaultInfo) -> vmo::Result<()> {
        self(fault)
    }
}

/// The product: the guest's Vmar resolves its own faults.
impl Resolver for vmo::Vmar<KvmStage2> {
    fn resolve(&mut self, fault: FaultInfo) -> vmo::Result<()> {
        self.handle_fault(fault).map(drop)
    }
}

/// A fault the resolver refused: the report the stopped VM returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultError {
    pub fault: FaultInfo,
    pub error: vmo::Error,
    /// Thread id of the thread that touched the page (a vCPU, or a VMM thread).
    pub tid: u32,
}

/// Event counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    pub missing: u64,
    pub wp: u64,
    pub resolved: u64,
    pub failed: u64,
    /// Time spent inside the resolver, in nanoseconds (its share of the fault cost).
    pub resolve_ns: u64,
}

/// State shared between the fault thread, the VM's vCPU loop and the owner.
#[derive(Default)]
pub struct FaultShared {
    missing: AtomicU64,
    wp: AtomicU64,
    resolved: AtomicU64,
    failed: AtomicU64,
    resolve_ns: AtomicU64,
    error: Mutex<Option<FaultError>>,
    /// Poisoned pages: (host address, the page was installed).
    poisoned: Mutex<Vec<(Hva, bool)>>,
    kick: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

impl FaultShared {
    pub fn stats(&self) -> FaultStats {
        FaultStats {
            missing: self.missing.load(Ordering::Relaxed),
            wp: self.wp.load(Ordering::Relaxed),
            resolved: self.resolved.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            resolve_ns: self.resolve_ns.load(Ordering::Relaxed),
        }
    }

    /// The first unreported resolver error, if any (taking it clears it).
    pub fn take_error(&self) -> Option<FaultError> {
        self.error.lock().take()
    }

    /// What a vCPU of this VM reports when it finds the VM stopped (before each entry) or its
    /// access failed with a plain fault (`KVM_RUN = -EFAULT`: it touched a poisoned page): the
    /// refused fault that stopped the VM. `None` after an EFAULT breaks the protocol
    /// (`GuestVm::run` fails with "EFAULT with no recorded guest fault").
    pub fn stop_report(&self) -> Option<FaultError> {
        self.take_error()
    }

    /// Whether a resolver error is pending.
    pub fn has_error(&self) -> bool {
        self.error.lock().is_some()
    }

    /// Sets the function that stops the VM's vCPUs after a resolver error.
    pub fn set_kick(&self, kick: Arc<dyn Fn() + Send + Sync>) {
        *self.kick.lock() = Some(kick);
    }

    /// Takes the list of poisoned pages (host address, was installed) for `unpoison`.
    pub(crate) fn take_poisoned(&self) -> Vec<(Hva, bool)> {
        std::mem::take(&mut *self.poisoned.lock())
    }

    fn record(&self, e: FaultError) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut slot = self.error.lock();
        if slot.is_none() {
            *slot = Some(e);
        }
        drop(slot);
        let kick = self.kick.lock().clone();
        if let Some(k) = kick {
            k();
        }
    }
}

/// The running fault thread; stops and joins on drop.
pub struct FaultThread {
    shared: Arc<FaultShared>,
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

/// The `FaultInfo` a userfaultfd event on `res` stands for, if the address is in range.
pub fn fault_info(res: &Reservation, pf: &PageFault) -> Option<FaultInfo> {
    res.gpa_of(Hva(pf.addr)).map(|gpa| classify(gpa, pf))
}

/// The `FaultInfo` of event `pf` at guest-physical `gpa`.
fn classify(gpa: Gpa, pf: &PageFault) -> FaultInfo {
    let (access, kind) = if pf.wp {
        (Access::WRITE, FaultKind::Permission)
    } else if pf.write {
        (Access::WRITE, FaultKind::NotPresent)
    } else {
        (Access::READ, FaultKind::NotPresent)
    };
    FaultInfo::new(gpa.raw(), access, kind)
}

impl FaultThread {
    /// Starts the thread serving `res`'s userfaultfd with `resolver`.
    pub fn spawn(res: Arc<Reservation>, resolver: impl Resolver + 'static) -> Result<Self> {
        let mut resolver: Box<dyn Resolver> = Box::new(resolver);
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Sys {
            what: "eventfd",
            err: e,
        })?;
        let stop_fd = stop.try_clone().map_err(|e| Error::Sys {
            what: "eventfd clone",
            err: e,
        })?;
        let shared = Arc::new(FaultShared::default());
        let sh = shared.clone();
        let handle = std::thread::Builder::new()
            .name("uffd-faults".into())
            .spawn(move || {
                serve(
                    &mut UffdChannel::new(&res, &stop_fd),
                    resolver.as_mut(),
                    &sh,
                )
            })
            .map_err(|e| Error::Sys {
                what: "spawn fault thread",
                err: e,
            })?;
        Ok(FaultThread {
            shared,
            stop,
            handle: Some(handle),
        })
    }

    pub fn shared(&self) -> &Arc<FaultShared> {
        &self.shared
    }

    pub fn stats(&self) -> FaultStats {
        self.shared.stats()
    }
}

impl Drop for FaultThread {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What the serve loop needs from the kernel: the events, and the two ways to answer one.
/// Production: [`UffdChannel`] (the reservation's synchronous userfaultfd, poll, ioctls); the
/// interleaving test: an in-memory userfaultfd with the kernel's guarantees (a faulting
/// thread blocks until a wake covers its page; a poisoned page fails whoever touches it).
/// Statically dispatched: `serve` is generic over it.
pub trait FaultChannel {
    /// Waits until events are pending and reads them into `out` (cleared first; it may come
    /// back empty). `false`: the thread must stop (stop requested, or the channel failed).
    fn wait_faults(&mut self, out: &mut Vec<PageFault>) -> bool;
    /// The guest-physical address behind host address `hva`, if it is guest memory.
    fn gpa_of(&self, hva: Hva) -> Option<Gpa>;
    /// Wakes every thread blocked on a fault in the page at `page` (`UFFDIO_WAKE`). A woken
    /// thread retries its access.
    fn wake(&self, page: Hva);
    /// Makes the page at `page` fail whoever touches it next (`Reservation::poison`).
    fn poison(&self, page: Hva, installed: bool) -> Result<()>;
}

/// The product's channel: the reservation's synchronous userfaultfd, and the stop eventfd.
pub struct UffdChannel<'a> {
    res: &'a Reservation,
    stop: &'a EventFd,
}

impl<'a> UffdChannel<'a> {
    pub fn new(res: &'a Reservation, stop: &'a EventFd) -> Self {
        UffdChannel { res, stop }
    }
}

impl FaultChannel for UffdChannel<'_> {
    fn wait_faults(&mut self, out: &mut Vec<PageFault>) -> bool {
        let uffd = self.res.uffd();
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: uffd.raw(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(self.stop),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is an array of two initialized pollfds that outlives the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing_like_log("poll(userfaultfd) failed; fault thread exits");
                return false;
            }
            if fds[1].revents != 0 {
                return false;
            }
            if uffd.read_faults(out).is_err() {
                tracing_like_log("read(userfaultfd) failed; fault thread exits");
                return false;
            }
            return true;
        }
    }

    fn gpa_of(&self, hva: Hva) -> Option<Gpa> {
        self.res.gpa_of(hva)
    }

    fn wake(&self, page: Hva) {
        let _ = self.res.uffd().wake(page.raw(), PAGE_SIZE);
    }

    fn poison(&self, page: Hva, installed: bool) -> Result<()> {
        self.res.poison(page, installed)
    }
}

/// The fault thread's loop: every event `ch` delivers goes through [`serve_fault`], until
/// `ch` says stop.
pub fn serve<C: FaultChannel, R: Resolver + ?Sized>(
    ch: &mut C,
    resolver: &mut R,
    sh: &FaultShared,
) {
    let mut events = Vec::new();
    while ch.wait_faults(&mut events) {
        for pf in &events {
            serve_fault(ch, resolver, sh, pf);
        }
    }
}

/// One event: resolve it, and answer it exactly once — a wake, after a refusal is recorded
/// and the page poisoned (module doc).
pub fn serve_fault<C: FaultChannel, R: Resolver + ?Sized>(
    ch: &C,
    resolver: &mut R,
    sh: &FaultShared,
    pf: &PageFault,
) {
    let page = Hva(pf.addr & !(PAGE_SIZE - 1));
    if pf.wp {
        sh.wp.fetch_add(1, Ordering::Relaxed);
    } else {
        sh.missing.fetch_add(1, Ordering::Relaxed);
    }
    let Some(gpa) = ch.gpa_of(Hva(pf.addr)) else {
        ch.wake(page);
        return;
    };
    let info = classify(gpa, pf);
    let t = std::time::Instant::now();
    let outcome = resolver.resolve(info);
    sh.resolve_ns
        .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    match outcome {
        Ok(()) => {
            sh.resolved.fetch_add(1, Ordering::Relaxed);
        }
        Err(error) => {
            // Poison first so the woken thread fails instead of faulting again.
            if ch.poison(page, pf.wp).is_ok() {
                sh.poisoned.lock().push((page, pf.wp));
            }
            sh.record(FaultError {
                fault: info,
                error,
                tid: pf.tid,
            });
        }
    }
    ch.wake(page);
}

fn tracing_like_log(msg: &str) {
    tracing::error!("{msg}");
}
