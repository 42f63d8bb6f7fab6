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
//!   (`FaultShared::stop_report`) and the page is poisoned (PROT_NONE, so the retried access
//!   fails with a plain fault: `KVM_RUN = -EFAULT` at CPL3) in one step under one lock, the
//!   kick hook (the VM's "stop the vCPU" function) runs, and the faulter is woken. Every vCPU
//!   that then meets the poisoned page, or enters the VM, finds the report and returns
//!   `VmExit::GuestFault` with it; the report stays until `GuestVm::recover` takes it with
//!   the poisoned pages (`take_refusals`). A poisoned VM must be reset before it runs again.
//!
//! - The protocol (`serve`, `serve_fault`) is written once against [`FaultChannel`], the kernel
//!   operations it needs (wait for and read events, wake, poison): the product runs it over
//!   [`UffdChannel`] (the reservation's synchronous userfaultfd), `tests/uffd_interleave.rs`
//!   over an in-memory userfaultfd under shuttle. Static dispatch, no allocation per event.
//!
//! - The thread can start before its resolver exists (`FaultThread::spawn_unattached`, for a
//!   VM shell prepared ahead: `vmm::shell`): `attach` leaves the resolver in a slot the
//!   thread takes it from at its first event (waiting there if an event came first), so
//!   attaching wakes no thread — the fork path that takes a shell pays no context switch.
//!   `spawn` is `spawn_unattached` + `attach`.
//!
//! Invariants: the resolver runs only on this thread and must never touch guest memory through
//! the reservation itself (it would wait for its own fault); it reaches frame bytes through
//! `FrameAlloc::frame_ptr`. Every event is answered by exactly one wake. A thread gets at most
//! one resolver. The thread stops and is joined when `FaultThread` drops, attached or not (an
//! event that waits for a resolver when the thread is told to stop is refused: nobody is left
//! to serve it).

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
    refusals: Mutex<Refusals>,
    kick: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

/// What refused faults left behind, changed only as a whole under one lock (`refuse`,
/// `take_refusals`).
#[derive(Default)]
struct Refusals {
    /// The first refusal since the last `take_refusals`: the VM's stop report.
    report: Option<FaultError>,
    /// Poisoned pages: (host address, the page was installed).
    poisoned: Vec<(Hva, bool)>,
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

    /// What a vCPU of this VM reports when it finds the VM stopped (before each entry) or its
    /// access failed with a plain fault (`KVM_RUN = -EFAULT`: it touched a poisoned page): the
    /// first refused fault since the last `take_refusals`. It stays until then, so every vCPU
    /// of the VM reports it, and a vCPU that met a poisoned page always finds it: the
    /// refusal that poisoned the page recorded it in the same step (`refuse`), and this call
    /// waits for that step. `None` after an EFAULT breaks the protocol (`GuestVm::run` fails
    /// with "EFAULT with no recorded guest fault").
    pub fn stop_report(&self) -> Option<FaultError> {
        self.refusals.lock().report
    }

    /// Whether a resolver error is pending.
    pub fn has_error(&self) -> bool {
        self.refusals.lock().report.is_some()
    }

    /// Sets the function that stops the VM's vCPUs after a resolver error.
    pub fn set_kick(&self, kick: Arc<dyn Fn() + Send + Sync>) {
        *self.kick.lock() = Some(kick);
    }

    /// Takes, in one step, the poisoned pages (host address, was installed: for `unpoison`)
    /// and the stop report, clearing both: never half of a refusal.
    pub(crate) fn take_refusals(&self) -> (Vec<(Hva, bool)>, Option<FaultError>) {
        let mut r = self.refusals.lock();
        (std::mem::take(&mut r.poisoned), r.report.take())
    }

    /// A refused fault, one step under the refusal lock: record the report (the first one
    /// stays), then poison the page through `ch` and list it for `recover`. Whoever meets the
    /// poisoned page (an EFAULT) and asks `stop_report` takes the same lock, so it sees the
    /// report; `take_refusals` cannot split the step either. Then count and kick.
    fn refuse<C: FaultChannel>(&self, ch: &C, page: Hva, installed: bool, e: FaultError) {
        let mut r = self.refusals.lock();
        if r.report.is_none() {
            r.report = Some(e);
        }
        if ch.poison(page, installed).is_ok() {
            r.poisoned.push((page, installed));
        }
        drop(r);
        self.failed.fetch_add(1, Ordering::Relaxed);
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
    /// Where `attach` leaves the resolver for the thread.
    slot: Arc<LateSlot>,
    attached: bool,
    handle: Option<JoinHandle<()>>,
}

/// The resolver of a thread started before it: `attach` puts it here, the thread takes it at
/// its first event. `closed`: the thread is stopping, nothing will come.
#[derive(Default)]
struct LateSlot {
    slot: std::sync::Mutex<(Option<Box<dyn Resolver>>, bool)>,
    came: std::sync::Condvar,
}

impl LateSlot {
    fn put(&self, r: Box<dyn Resolver>) {
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).0 = Some(r);
        self.came.notify_all();
    }

    fn close(&self) {
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.came.notify_all();
    }

    /// The resolver, waiting for `put`; `None` once closed without one.
    fn take(&self) -> Option<Box<dyn Resolver>> {
        let mut g = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = g.0.take() {
                return Some(r);
            }
            if g.1 {
                return None;
            }
            g = self.came.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The fault thread's resolver: the attached one, taken from the slot at the first event.
struct Late {
    slot: Arc<LateSlot>,
    resolver: Option<Box<dyn Resolver>>,
}

impl Resolver for Late {
    fn resolve(&mut self, fault: FaultInfo) -> vmo::Result<()> {
        if self.resolver.is_none() {
            self.resolver = self.slot.take();
        }
        match self.resolver.as_mut() {
            Some(r) => r.resolve(fault),
            // Stopping without a resolver: nobody is left to serve the fault.
            None => Err(vmo::Error::BadState),
        }
    }
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
        let mut t = Self::spawn_unattached(res)?;
        t.attach(resolver)?;
        Ok(t)
    }

    /// Starts the thread for `res` without a resolver: it waits for `attach` before it reads
    /// any event (module doc).
    pub fn spawn_unattached(res: Arc<Reservation>) -> Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Sys {
            what: "eventfd",
            err: e,
        })?;
        let stop_fd = stop.try_clone().map_err(|e| Error::Sys {
            what: "eventfd clone",
            err: e,
        })?;
        let slot = Arc::new(LateSlot::default());
        let mut late = Late {
            slot: slot.clone(),
            resolver: None,
        };
        let shared = Arc::new(FaultShared::default());
        let sh = shared.clone();
        let handle = std::thread::Builder::new()
            .name("uffd-faults".into())
            .spawn(move || serve(&mut UffdChannel::new(&res, &stop_fd), &mut late, &sh))
            .map_err(|e| Error::Sys {
                what: "spawn fault thread",
                err: e,
            })?;
        Ok(FaultThread {
            shared,
            stop,
            slot,
            attached: false,
            handle: Some(handle),
        })
    }

    /// Hands the thread its resolver; from now on it serves events. A second call is
    /// `Error::BadState`.
    pub fn attach(&mut self, resolver: impl Resolver + 'static) -> Result<()> {
        if self.attached {
            return Err(Error::BadState(
                "fault thread already has its resolver".into(),
            ));
        }
        self.slot.put(Box::new(resolver));
        self.attached = true;
        Ok(())
    }

    /// Whether `attach` has run.
    pub fn is_attached(&self) -> bool {
        self.attached
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
        // An event waiting for a resolver that never came is refused, then the loop stops.
        self.slot.close();
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
        // Recorded and poisoned before the wake, so the woken thread fails instead of
        // faulting again, and finds the report.
        Err(error) => sh.refuse(
            ch,
            page,
            pf.wp,
            FaultError {
                fault: info,
                error,
                tid: pf.tid,
            },
        ),
    }
    ch.wake(page);
}

fn tracing_like_log(msg: &str) {
    tracing::error!("{msg}");
}

#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use std::cell::RefCell;

    use super::*;

    const BASE: u64 = 0x7f00_0000_0000;

    /// A channel that records what the protocol asks of the kernel.
    #[derive(Default)]
    struct Recorder {
        events: Vec<Vec<PageFault>>,
        calls: RefCell<Vec<(&'static str, u64)>>,
    }

    impl FaultChannel for Recorder {
        fn wait_faults(&mut self, out: &mut Vec<PageFault>) -> bool {
            out.clear();
            match self.events.pop() {
                Some(batch) => {
                    out.extend(batch);
                    true
                }
                None => false,
            }
        }
        fn gpa_of(&self, hva: Hva) -> Option<Gpa> {
            let off = hva.raw().checked_sub(BASE)?;
            (off < 16 * PAGE_SIZE).then_some(Gpa(off))
        }
        fn wake(&self, page: Hva) {
            self.calls.borrow_mut().push(("wake", page.raw() - BASE));
        }
        fn poison(&self, page: Hva, _installed: bool) -> Result<()> {
            self.calls.borrow_mut().push(("poison", page.raw() - BASE));
            Ok(())
        }
    }

    fn fault(page: u64, write: bool, tid: u32) -> PageFault {
        PageFault {
            addr: BASE + page * PAGE_SIZE + 8,
            write,
            wp: false,
            tid,
        }
    }

    /// Two vCPUs refused on one page, one resolved elsewhere, one address outside: every
    /// event gets exactly one wake, each refusal is poisoned before its wake, and the report
    /// (the first refusal) stays for every vCPU until `take_refusals` takes it with the pages.
    /// (Before, the report was taken by the first vCPU that asked: a second vCPU meeting the
    /// poisoned page found none.)
    #[test]
    fn refusals_are_reported_to_every_vcpu_until_taken() {
        let mut ch = Recorder {
            events: vec![vec![
                fault(3, true, 7),
                fault(1, false, 8),
                fault(3, true, 8),
                PageFault {
                    addr: BASE + 64 * PAGE_SIZE,
                    write: false,
                    wp: false,
                    tid: 9,
                },
            ]],
            ..Recorder::default()
        };
        let sh = FaultShared::default();
        let kicks = Arc::new(AtomicU64::new(0));
        let k = kicks.clone();
        sh.set_kick(Arc::new(move || {
            k.fetch_add(1, Ordering::Relaxed);
        }));
        let mut resolver = |f: FaultInfo| {
            if f.gpa / PAGE_SIZE == 3 {
                Err(vmo::Error::AccessDenied)
            } else {
                Ok(())
            }
        };
        serve(&mut ch, &mut resolver, &sh);

        let p = PAGE_SIZE;
        assert_eq!(
            *ch.calls.borrow(),
            [
                ("poison", 3 * p),
                ("wake", 3 * p),
                ("wake", p),
                ("poison", 3 * p),
                ("wake", 3 * p),
                ("wake", 64 * p),
            ]
        );
        let first = sh.stop_report().expect("the refusal is reported");
        assert_eq!((first.tid, first.fault.gpa), (7, 3 * p + 8));
        assert_eq!(first.error, vmo::Error::AccessDenied);
        assert_eq!(sh.stop_report(), Some(first), "a second vCPU sees it too");
        assert!(sh.has_error());
        let stats = sh.stats();
        assert_eq!((stats.missing, stats.resolved, stats.failed), (4, 1, 2));
        assert_eq!(kicks.load(Ordering::Relaxed), 2);

        let (pages, report) = sh.take_refusals();
        assert_eq!(report, Some(first));
        assert_eq!(
            pages,
            [(Hva(BASE + 3 * p), false), (Hva(BASE + 3 * p), false)]
        );
        assert_eq!(sh.stop_report(), None);
        assert_eq!(sh.take_refusals(), (Vec::new(), None));
    }

    /// A thread started before its resolver: an event that comes first waits (read, not
    /// answered) until `attach`, then is served by the attached resolver; a second attach is
    /// refused; an unattached thread stops cleanly, and one dropped while an event waits for
    /// its resolver refuses that event rather than leaving the faulter blocked.
    #[test]
    fn an_event_before_attach_waits_for_the_resolver() {
        use crate::sys::uffd::Uffd;
        let uffd = Arc::new(Uffd::open().unwrap());
        let res = Arc::new(Reservation::new(Gpa(0), 4 * PAGE_SIZE, uffd).unwrap());
        drop(FaultThread::spawn_unattached(res.clone()).unwrap());
        let mut t = FaultThread::spawn_unattached(res.clone()).unwrap();
        assert!(!t.is_attached());
        let hva = res.hva().add(PAGE_SIZE).raw();
        let reader = std::thread::spawn(move || read_byte(hva));
        let t0 = std::time::Instant::now();
        while t.stats().missing == 0 {
            assert!(t0.elapsed().as_secs() < 10, "the event never arrived");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            (t.stats().resolved, t.stats().failed),
            (0, 0),
            "waits unanswered"
        );
        assert!(!reader.is_finished());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        t.attach(move |f: FaultInfo| {
            s2.lock().unwrap().push(f.gpa);
            Err(vmo::Error::AccessDenied)
        })
        .unwrap();
        assert_eq!(reader.join().unwrap(), -1, "refused: the read fails");
        assert_eq!(*seen.lock().unwrap(), vec![PAGE_SIZE]);
        assert_eq!(t.stats().failed, 1);
        assert!(matches!(
            t.attach(|_f: FaultInfo| Ok(())),
            Err(Error::BadState(_))
        ));
        drop(t);
        // Dropped while an event waits for a resolver that never comes: refused, not hung.
        let t = FaultThread::spawn_unattached(res.clone()).unwrap();
        let hva = res.hva().add(2 * PAGE_SIZE).raw();
        let reader = std::thread::spawn(move || read_byte(hva));
        let t0 = std::time::Instant::now();
        while t.stats().missing == 0 {
            assert!(t0.elapsed().as_secs() < 10, "the event never arrived");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(t);
        assert_eq!(reader.join().unwrap(), -1, "the waiting read fails");
    }

    /// A kernel-mode read of one byte at `hva` (as KVM's would be): EFAULT on a poisoned
    /// page instead of a signal.
    fn read_byte(hva: u64) -> isize {
        let mut byte = 0u8;
        let local = libc::iovec {
            iov_base: (&mut byte as *mut u8).cast(),
            iov_len: 1,
        };
        let remote = libc::iovec {
            iov_base: hva as *mut libc::c_void,
            iov_len: 1,
        };
        // SAFETY: reads one byte of this process into `byte`, which outlives the call.
        unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) }
    }
}
