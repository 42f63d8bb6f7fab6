//! `VmExit`: why `GuestVm::run` returned to its caller, and the translation of KVM's exits
//! into it.
//!
//! Invariant: every exit is completed before the next `KVM_RUN` (port and MMIO reads get
//! all-ones data here), so a caller may run again after any `VmExit` other than `GuestFault`.

use kvm_ioctls::VcpuExit;

use super::hypercall::{PORT_CALL, PORT_DONE};
use crate::memory::fault_thread::FaultError;

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

/// What the run loop does with one successful `KVM_RUN`.
pub(super) enum Step {
    /// Return this to the caller.
    Exit(VmExit),
    /// `out PORT_CALL, al`: serve hypercall `al`.
    Hypercall(u8),
    /// Completed here; run again.
    Continue,
}

/// Classifies a KVM exit, completing reads (all-ones) on the way.
pub(super) fn classify(exit: VcpuExit<'_>) -> Step {
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
