//! `Program`: a user's guest ELF (built with the guest SDK, `guest/sdk/`) running in a `Guest`,
//! with the host side of the guest ABI (`guest/ABI.md`): `snapshot_here`, `next_input`,
//! `done`, `crash`, and a time limit per run.
//!
//! Life cycle: `Program::load` boots the ELF (entry registers: `rdi` = memory size, `rsi` /
//! `rdx` = heap start / end) in phase `Boot`; `run` goes on until an `Outcome`. At the guest's
//! first `snapshot_here` the run returns `Outcome::SnapshotHere` with the call answered 0, so
//! the caller can `snapshot` (vCPU state) and `fork` children, or simply `run` on. From then on
//! (phase `Ready`) the first `next_input` gets the input set with `set_input` (truncated to
//! the buffer; the call returns the bytes written) and later ones get 0 bytes (phase
//! `InputTaken`). `reset` returns a child to the snapshot and to phase `Ready`.
//!
//! Invariants (the ABI's "defined result, never a host panic"): `next_input` before
//! `snapshot_here` and a second `snapshot_here` are answered `HC_ERR` and the guest continues;
//! unknown hypercall numbers are answered `HC_ERR`; every way a guest can stop (done, crash,
//! triple fault, an access outside guest memory or refused by the Vmar, the time limit, an exit
//! this VMM does not handle) is an `Outcome` value with a report, not an `Err`. `Err` is for the
//! host failing (KVM, the fault path).
//!
//! Coverage (fuzzing): `attach_coverage` maps a fresh shared Vmo over the SDK's coverage map
//! (`COV_GPA`); the host reads and zeroes it per input (`Coverage::take`).
//!
//! The time limit is the program's `Watchdog` (one thread, started at its first run, armed
//! per run) that kicks the vCPU (`Kicker`) at the deadline; a kick left over from a previous
//! run (it raced with the guest finishing) is recognised because it fired for another run's
//! number, and the guest just continues.

use std::time::{Duration, Instant};

use vmo::{MapOptions, VmPerms, Vmo, VmoFlags};

use super::watchdog::Watchdog;
use super::Guest;
use crate::error::{Error, Result};
use crate::memory::fault_thread::FaultError;
use crate::memory::frames::HostFrames;
use crate::vmm::hypercall::HC_ERR;
use crate::vmm::vcpu_state::VcpuState;
use crate::vmm::x86_64::layout::{COV_GPA, COV_SIZE, DATA_GPA};
use crate::vmm::{GuestArgs, VmExit};

/// Streaming fault-around window of a program (pages).
pub const STREAM_WINDOW: u64 = 64;

/// Where a program is in the ABI's order of calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Before `snapshot_here`: `next_input` is refused.
    Boot,
    /// After `snapshot_here` (in the parent, or a fork / reset of it): the input is waiting.
    Ready,
    /// The input was taken; further `next_input` calls get 0 bytes.
    InputTaken,
}

/// How a run of a program ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `snapshot_here()`: the guest is stopped at its snapshot point (answered 0).
    SnapshotHere,
    /// `done(status)` (`HC_EXIT`, or `out PORT_DONE` with a status byte).
    Done(u64),
    /// `crash(reason)`, including the SDK's panic handler.
    Crash(String),
    /// A triple fault: an exception at CPL3 (the guest has no IDT), or an access to a virtual
    /// address the boot page tables do not map (beyond guest memory).
    TripleFault { rip: u64 },
    /// An access to a guest-physical address outside guest memory (beyond the memslot).
    OutsideMemory { gpa: u64, write: bool },
    /// The Vmar refused a fault (the VM is stopped until `reset`).
    Refused(FaultError),
    /// The run hit its time limit.
    Timeout(Duration),
    /// An exit the ABI does not define (unknown port, `hlt`, ...), as text.
    Stopped(String),
}

impl Outcome {
    /// Whether this outcome is a failure of the guest (everything but done and the snapshot
    /// point; a timeout counts).
    pub fn is_failure(&self) -> bool {
        !matches!(self, Outcome::SnapshotHere | Outcome::Done(_))
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::SnapshotHere => write!(f, "stopped at snapshot_here"),
            Outcome::Done(s) => write!(f, "done, status {s}"),
            Outcome::Crash(r) => write!(f, "crash: {r}"),
            Outcome::TripleFault { rip } => write!(
                f,
                "triple fault at rip {rip:#x} (a CPU exception in the guest, or an access \
                 beyond guest memory)"
            ),
            Outcome::OutsideMemory { gpa, write } => write!(
                f,
                "{} outside guest memory at gpa {gpa:#x}",
                if *write { "write" } else { "read" }
            ),
            Outcome::Refused(e) => write!(
                f,
                "guest memory access refused at gpa {:#x}: {}",
                e.fault.gpa, e.error
            ),
            Outcome::Timeout(d) => write!(f, "timeout after {:.1} s", d.as_secs_f64()),
            Outcome::Stopped(s) => write!(f, "stopped: {s}"),
        }
    }
}

/// A program's coverage map (`attach_coverage`): the SDK's edge counters, seen by the host
/// through the Vmo the guest's map is.
pub struct Coverage {
    vmo: Vmo,
    zeros: Vec<u8>,
}

impl Coverage {
    /// Copies the counters into `out` (`COV_SIZE` bytes) and zeroes the map.
    pub fn take(&self, out: &mut [u8]) -> Result<()> {
        self.vmo.read(0, out)?;
        self.vmo.write(0, &self.zeros[..out.len()])?;
        Ok(())
    }

    pub fn vmo(&self) -> &Vmo {
        &self.vmo
    }
}

/// A guest program and its place in the ABI; see the module documentation.
pub struct Program {
    guest: Guest,
    phase: Phase,
    input: Vec<u8>,
    /// The time limit's thread, started by the first `run`.
    watchdog: Option<Watchdog>,
}

impl Program {
    /// Boots `elf` in a fresh guest of `mem_size` bytes (frames from `frames`). A file that is
    /// not a loadable ELF for this layout is `Error::Payload`.
    pub fn load(frames: &HostFrames, elf: &[u8], mem_size: u64) -> Result<Program> {
        if mem_size <= DATA_GPA {
            return Err(Error::InvalidArgs(format!(
                "guest memory {mem_size:#x} leaves no heap (must exceed {DATA_GPA:#x})"
            )));
        }
        let mut guest = Guest::new(frames, mem_size)?;
        let args = GuestArgs {
            rdi: mem_size,
            rsi: DATA_GPA,
            rdx: mem_size,
            ..Default::default()
        };
        guest.vm_mut().load_elf(elf, args)?;
        // Heaps are written in streams: commit ahead of sequential write faults (never pages
        // a fork shares, so a child still copies only what it writes).
        guest.set_stream_fault_around(STREAM_WINDOW);
        Ok(Program {
            guest,
            phase: Phase::Boot,
            input: Vec::new(),
            watchdog: None,
        })
    }

    pub fn guest(&self) -> &Guest {
        &self.guest
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// What the guest logged so far (`log`).
    pub fn log(&self) -> &[String] {
        &self.guest.vm().log
    }

    /// The input the next `next_input` gets.
    pub fn set_input(&mut self, input: &[u8]) {
        self.input = input.to_vec();
    }

    /// The vCPU state at the current stop (take it at `Outcome::SnapshotHere`).
    pub fn snapshot(&self) -> Result<VcpuState> {
        self.guest.snapshot()
    }

    /// A child at `state` (from `snapshot` at the snapshot point), copy-on-write, in phase
    /// `Ready`, with an empty input.
    pub fn fork(&self, state: &VcpuState) -> Result<Program> {
        Ok(Program {
            guest: self.guest.fork(state)?,
            phase: Phase::Ready,
            input: Vec::new(),
            watchdog: None,
        })
    }

    /// Gives this program its own coverage map: a fresh Vmo mapped **shared** over
    /// `[COV_GPA, COV_GPA + COV_SIZE)` in place of the RAM there, so `reset` never rolls it
    /// back and a later fork of this program would share it (fork each child first, then
    /// attach: two children never share one map). Call while the guest is stopped.
    pub fn attach_coverage(&mut self) -> Result<Coverage> {
        let vmo = Vmo::new(&self.guest.frames.pool, COV_SIZE, VmoFlags::empty())?;
        let vmar = self.guest.vmar();
        vmar.unmap(COV_GPA, COV_SIZE)?;
        let mut opts = MapOptions::specific(COV_GPA, VmPerms::RW);
        opts.shared = true;
        vmar.map(&vmo, 0, COV_SIZE, opts)?;
        Ok(Coverage {
            vmo,
            zeros: vec![0; COV_SIZE as usize],
        })
    }

    /// Returns a child to the snapshot (`Guest::reset`, copy-back) and to phase `Ready`;
    /// the number of pages reset.
    pub fn reset(&mut self, state: &VcpuState) -> Result<u64> {
        let pages = self.guest.reset(state)?;
        self.guest.vm_mut().log.clear();
        self.phase = Phase::Ready;
        Ok(pages)
    }

    /// Runs until an `Outcome`, for at most `limit`.
    pub fn run(&mut self, limit: Duration) -> Result<Outcome> {
        if self.watchdog.is_none() {
            self.watchdog = Some(Watchdog::new(self.guest.vm().kicker())?);
        }
        let start = Instant::now();
        let run = self.watchdog.as_ref().map_or(0, |w| w.arm(limit));
        let r = self.run_inner(run, start);
        if let Some(w) = &self.watchdog {
            w.disarm(run);
        }
        r
    }

    fn run_inner(&mut self, run: u64, start: Instant) -> Result<Outcome> {
        loop {
            let exit = self.guest.vm_mut().run()?;
            let outcome = match exit {
                VmExit::SnapshotHere => {
                    if self.phase == Phase::Boot {
                        self.guest.vm_mut().set_hypercall_result(0)?;
                        self.phase = Phase::Ready;
                        return Ok(Outcome::SnapshotHere);
                    }
                    // Out of order: `rax` already holds HC_ERR.
                    continue;
                }
                VmExit::NextInput { gpa, cap } => {
                    let ret = match self.phase {
                        Phase::Boot => HC_ERR,
                        Phase::InputTaken => 0,
                        Phase::Ready => {
                            let n = self.input.len().min(cap as usize);
                            self.guest.vm_mut().write_guest(gpa, &self.input[..n])?;
                            self.phase = Phase::InputTaken;
                            n as u64
                        }
                    };
                    self.guest.vm_mut().set_hypercall_result(ret)?;
                    continue;
                }
                // Unknown numbers: `rax` already holds HC_ERR.
                VmExit::Hypercall { .. } | VmExit::Report(_) => continue,
                VmExit::Kicked if self.watchdog.as_ref().is_some_and(|w| w.fired(run)) => {
                    Outcome::Timeout(start.elapsed())
                }
                // A kick left over from an earlier run.
                VmExit::Kicked => continue,
                VmExit::Exit(code) => Outcome::Done(code),
                VmExit::Done(status) => Outcome::Done(status.into()),
                VmExit::Crash(reason) => Outcome::Crash(reason),
                VmExit::Shutdown => {
                    let rip = self
                        .guest
                        .vm_mut()
                        .vcpu()
                        .ok()
                        .and_then(|v| v.get_regs().ok())
                        .map_or(0, |r| r.rip);
                    Outcome::TripleFault { rip }
                }
                VmExit::Mmio { addr, write, .. } => Outcome::OutsideMemory { gpa: addr, write },
                VmExit::GuestFault(e) => Outcome::Refused(e),
                VmExit::IoOut { port, .. } => {
                    Outcome::Stopped(format!("output to port {port:#x}, which the ABI lacks"))
                }
                VmExit::Hlt => Outcome::Stopped("hlt".into()),
                VmExit::Unhandled(s) => Outcome::Stopped(s),
            };
            return Ok(outcome);
        }
    }
}
