//! `Watchdog`: the time limit of a program's runs — one thread per program (`run-watchdog`)
//! that kicks the vCPU (`Kicker`) when a run outlives its deadline.
//!
//! Arming and disarming are a mutex each and wake nothing while the thread sleeps towards a
//! later deadline: arming a run moves the deadline on, and the thread, waking at the old one,
//! sees the new one and sleeps again — so back-to-back runs with one limit (a fuzzing loop:
//! thousands a second) wake it about once per time limit, not once per run. Only arming while
//! the thread idles (no run armed when it last woke) or with a deadline before the one it
//! sleeps towards (a shorter limit) notifies it. A thread spawned per run instead cost a third of
//! a fuzzing input's time here (clone, wake-up, join).
//!
//! Invariants: runs are numbered from 1 by `arm`; `fired(run)` is true only when the thread
//! kicked the vCPU because that run's deadline passed while it was armed, so a kick that races
//! with the run's end and reaches a later run is told apart by its number; dropping the
//! watchdog stops and joins the thread.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::vmm::Kicker;

#[derive(Default)]
struct State {
    /// The number of the latest armed run.
    run: u64,
    /// When the armed run times out (`None`: no run armed).
    deadline: Option<Instant>,
    /// The run the thread kicked for (0: none).
    fired: u64,
    /// The thread waits with no deadline: arming must notify it.
    idle: bool,
    /// The thread sleeps until this deadline: arming an earlier one must notify it.
    sleeping_until: Option<Instant>,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A program's time-limit thread; see the module documentation.
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the thread that kicks through `kicker`.
    pub fn new(kicker: Kicker) -> Result<Watchdog> {
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("run-watchdog".into())
            .spawn(move || watch(&sh, &kicker))
            .map_err(|err| Error::Sys {
                what: "spawning the run watchdog thread",
                err,
            })?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    /// Arms the limit for a run starting now; returns the run's number.
    pub fn arm(&self, limit: Duration) -> u64 {
        let mut st = self.shared.lock();
        let deadline = Instant::now() + limit;
        st.run += 1;
        st.deadline = Some(deadline);
        if st.idle || st.sleeping_until.is_some_and(|s| deadline < s) {
            self.shared.wake.notify_one();
        }
        st.run
    }

    /// The run `run` ended: its deadline no longer applies.
    pub fn disarm(&self, run: u64) {
        let mut st = self.shared.lock();
        if st.run == run {
            st.deadline = None;
        }
    }

    /// Whether the vCPU was kicked because `run` timed out.
    pub fn fired(&self, run: u64) -> bool {
        self.shared.lock().fired == run
    }
}

fn watch(shared: &Shared, kicker: &Kicker) {
    let mut st = shared.lock();
    while !st.stop {
        match st.deadline {
            None => {
                st.idle = true;
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                st.idle = false;
            }
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    st.fired = st.run;
                    st.deadline = None;
                    kicker.kick();
                } else {
                    st.sleeping_until = Some(deadline);
                    st = shared
                        .wake
                        .wait_timeout(st, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    st.sleeping_until = None;
                }
            }
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
