//! `Kicker`: stops a vCPU that is inside (or about to enter) `KVM_RUN`, from any thread.
//!
//! Mechanism: set `kvm_run.immediate_exit` (a vCPU about to enter returns at once) and send the
//! vCPU thread a real-time signal with a no-op handler (a vCPU inside `KVM_RUN` returns with
//! `EINTR`). The same kick is the fault thread's "stop this VM" hook after a refused fault.
//!
//! Invariants: `immediate_exit` holds the address of the live vCPU's `kvm_run.immediate_exit`
//! or 0, and is cleared (under its mutex) before the vCPU is dropped; `thread` holds the
//! pthread of the thread inside `run`, or 0, and is cleared before `run` returns.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};

pub(super) struct KickState {
    /// `&kvm_run.immediate_exit` while the vCPU exists; 0 after.
    pub(super) immediate_exit: Mutex<usize>,
    /// pthread_t of the thread inside `run`, or 0.
    pub(super) thread: AtomicU64,
    pub(super) requested: AtomicBool,
}

impl KickState {
    pub(super) fn new(immediate_exit: *mut u8) -> Arc<Self> {
        SIGNAL_ONCE.call_once(|| {
            // A failure leaves the default action; kicks then still work via immediate_exit
            // for a vCPU that is about to enter, which is all a failed registration can lose.
            let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler);
        });
        Arc::new(KickState {
            immediate_exit: Mutex::new(immediate_exit as usize),
            thread: AtomicU64::new(0),
            requested: AtomicBool::new(false),
        })
    }

    /// Records that the calling thread is about to enter `KVM_RUN`.
    pub(super) fn entering(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as u64;
        self.thread.store(me, Ordering::SeqCst);
    }

    /// Records that the calling thread left `KVM_RUN`.
    pub(super) fn left(&self) {
        self.thread.store(0, Ordering::SeqCst);
    }

    /// Whether a kick was requested since the last call (clears the request).
    pub(super) fn take_request(&self) -> bool {
        self.requested.swap(false, Ordering::SeqCst)
    }

    /// The vCPU is going away: later kicks must not touch its `kvm_run`.
    pub(super) fn detach(&self) {
        *self
            .immediate_exit
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = 0;
    }
}

/// Stops the VM's vCPU from any thread; see the module documentation.
#[derive(Clone)]
pub struct Kicker(pub(super) Arc<KickState>);

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
