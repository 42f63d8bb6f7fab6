//! `VmExit`: why `GuestVm::run` returned to its caller.
//!
//! Invariant: every exit is completed before `run` returns it (port and MMIO reads get
//! all-ones data), so a caller may run again after any `VmExit` other than `GuestFault`.

use crate::memory::fault_thread::FaultError;

/// Why `run` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// `out PORT_DONE, al`: the guest finished with status `al`.
    Done(u8),
    /// `HC_EXIT(code)`.
    Exit(u64),
    /// `HC_CRASH(reason)`: the guest gave up; the text is its reason.
    Crash(String),
    /// `HC_SNAPSHOT` (`snapshot_here()`): `rax` holds `HC_ERR` until the caller answers (0
    /// once it took its snapshot, with `set_hypercall_result`).
    SnapshotHere,
    /// `HC_INPUT` (`next_input(buf, cap)`), buffer already checked inside guest memory: the
    /// caller writes up to `cap` bytes at `gpa` and answers their count (`rax` = `HC_ERR`
    /// until then).
    NextInput {
        gpa: u64,
        cap: u64,
    },
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
