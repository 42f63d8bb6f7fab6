//! `ShellPool`: VM shells (`vmm::VmShell`: KVM VM + vCPU + registered memslot over a fresh
//! `Reservation` + a fault thread waiting for its resolver) built ahead for guests of one
//! size, so `Guest::fork_from` pays only `Vmar::fork`, attaching the Vmar and restoring the
//! vCPU state (`KVM_CREATE_VM`, vCPU setup and memslot registration are most of a fork's cost:
//! README "Fork from a pool").
//!
//! A background thread keeps `size` shells ready (unless `set_refill(false)` pauses it): it
//! sleeps while the pool is full, builds one
//! shell at a time outside the lock when one was taken, and stops when the pool drops. `take`
//! pops a ready shell, or — the pool empty — builds one on the caller's thread (counted as a
//! miss), so a fork never waits for the refill thread. A refill that fails (e.g. out of fds) is
//! recorded (`PoolStats::last_error`) and retried after a pause, never in a hot loop; `take`
//! then reports its own build's error.
//!
//! Invariants:
//! - at most `size` shells are ready, each for exactly `mem_size` bytes (checked in debug
//!   builds at every change);
//! - a shell holds no frame (a reservation holds frames only once a Stage2 installs them), so
//!   the pool never changes the frame accounting; dropping the pool stops and joins the refill
//!   thread, then drops every ready shell (each joins its fault thread, then closes its VM and
//!   unmaps its reservation) — nothing is left behind;
//! - the lock is never held while a shell is built or dropped.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::addr::Gpa;
use crate::error::{Error, Result};
use crate::memory::reservation::Reservation;
use crate::sys::uffd::Uffd;
use crate::vmm::VmShell;
use ept::PAGE_SIZE;

/// Most shells a pool keeps ready (each holds 8 fds and, on this host, ≈ 180 KB of kernel
/// memory plus KVM's per-slot arrays: README).
pub const MAX_POOL_SIZE: usize = 4096;

/// How long the refill thread waits after a failed build before it tries again.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// A fresh shell for a guest of `mem_size` bytes at GPA 0: reservation (with its synchronous
/// userfaultfd) and the VM over it. The one place a guest's VM and memslot are made.
pub fn new_shell(mem_size: u64) -> Result<VmShell> {
    let uffd = Arc::new(Uffd::open()?);
    let res = Arc::new(Reservation::new(Gpa(0), mem_size, uffd)?);
    VmShell::new(res)
}

/// Counters of a pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Shells ready now.
    pub ready: usize,
    /// Shells the refill thread built.
    pub built: u64,
    /// Shells handed out by `take`.
    pub taken: u64,
    /// `take` calls that found the pool empty and built a shell themselves.
    pub misses: u64,
    /// The refill thread's last failure, if any.
    pub last_error: Option<String>,
}

struct State {
    ready: VecDeque<VmShell>,
    stop: bool,
    /// `set_refill(false)`: the refill thread builds nothing until it is turned on again.
    paused: bool,
    stats: PoolStats,
}

struct Inner {
    size: usize,
    mem_size: u64,
    state: Mutex<State>,
    /// Signalled when a shell is taken, added, or the pool stops.
    changed: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, st: &State) {
        if cfg!(debug_assertions) {
            assert!(st.ready.len() <= self.size, "pool over its size");
            assert!(
                st.ready.iter().all(|s| s.mem_size() == self.mem_size),
                "a shell of another size in the pool"
            );
        }
    }
}

/// A pool of ready VM shells; see the module documentation.
pub struct ShellPool {
    inner: Arc<Inner>,
    refill: Option<JoinHandle<()>>,
}

impl ShellPool {
    /// A pool keeping `size` (1..=`MAX_POOL_SIZE`) shells for guests of `mem_size` bytes (a
    /// non-zero multiple of 4 KiB) ready; its refill thread starts filling it at once.
    pub fn new(size: usize, mem_size: u64) -> Result<Self> {
        if size == 0 || size > MAX_POOL_SIZE {
            return Err(Error::InvalidArgs(format!(
                "pool size must be 1..={MAX_POOL_SIZE}, got {size}"
            )));
        }
        if mem_size == 0 || !mem_size.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidArgs(format!(
                "pool guest size must be a non-zero multiple of 4 KiB, got {mem_size:#x}"
            )));
        }
        let inner = Arc::new(Inner {
            size,
            mem_size,
            state: Mutex::new(State {
                ready: VecDeque::with_capacity(size),
                stop: false,
                paused: false,
                stats: PoolStats::default(),
            }),
            changed: Condvar::new(),
        });
        let i = inner.clone();
        let refill = std::thread::Builder::new()
            .name("shell-refill".into())
            .spawn(move || refill(&i))
            .map_err(|err| Error::Sys {
                what: "spawn shell refill thread",
                err,
            })?;
        Ok(ShellPool {
            inner,
            refill: Some(refill),
        })
    }

    /// Guest size of this pool's shells.
    pub fn mem_size(&self) -> u64 {
        self.inner.mem_size
    }

    /// Shells the pool keeps ready.
    pub fn size(&self) -> usize {
        self.inner.size
    }

    pub fn stats(&self) -> PoolStats {
        let st = self.inner.lock();
        PoolStats {
            ready: st.ready.len(),
            ..st.stats.clone()
        }
    }

    /// A ready shell, or one built now if none is ready (a miss).
    pub fn take(&self) -> Result<VmShell> {
        let mut st = self.inner.lock();
        if let Some(shell) = st.ready.pop_front() {
            st.stats.taken += 1;
            self.inner.check(&st);
            drop(st);
            self.inner.changed.notify_all();
            return Ok(shell);
        }
        st.stats.misses += 1;
        drop(st);
        let shell = new_shell(self.inner.mem_size)?;
        self.inner.lock().stats.taken += 1;
        Ok(shell)
    }

    /// Turns the background refill on (the default) or off; while off, taken shells are not
    /// replaced (a caller that wants a burst of forks without a builder competing for the
    /// CPUs, or that measures what a given number of children costs).
    pub fn set_refill(&self, on: bool) {
        self.inner.lock().paused = !on;
        self.inner.changed.notify_all();
    }

    /// Waits until the pool is full or `timeout` passed; returns the shells ready. (Benches
    /// and tests use it to fork from a warm pool.)
    pub fn wait_full(&self, timeout: Duration) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.inner.lock();
        while st.ready.len() < self.inner.size {
            let now = std::time::Instant::now();
            if now >= deadline {
                break;
            }
            st = self
                .inner
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.ready.len()
    }
}

/// The refill thread: keep `size` shells ready until the pool stops.
fn refill(inner: &Inner) {
    loop {
        let mut st = inner.lock();
        while !st.stop && (st.paused || st.ready.len() >= inner.size) {
            st = inner.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.stop {
            return;
        }
        drop(st);
        match new_shell(inner.mem_size) {
            Ok(shell) => {
                let mut st = inner.lock();
                if st.stop {
                    drop(st);
                    drop(shell);
                    return;
                }
                st.ready.push_back(shell);
                st.stats.built += 1;
                inner.check(&st);
                drop(st);
                inner.changed.notify_all();
            }
            Err(e) => {
                let mut st = inner.lock();
                st.stats.last_error = Some(e.to_string());
                if !st.stop {
                    let _ = inner
                        .changed
                        .wait_timeout(st, RETRY_PAUSE)
                        .unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }
}

impl Drop for ShellPool {
    fn drop(&mut self) {
        self.inner.lock().stop = true;
        self.inner.changed.notify_all();
        if let Some(h) = self.refill.take() {
            let _ = h.join();
        }
        // Dropped outside the lock: each shell joins its fault thread.
        let shells = std::mem::take(&mut self.inner.lock().ready);
        drop(shells);
    }
}

impl std::fmt::Debug for ShellPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShellPool")
            .field("size", &self.inner.size)
            .field("mem_size", &self.inner.mem_size)
            .field("stats", &self.stats())
            .finish()
    }
}
