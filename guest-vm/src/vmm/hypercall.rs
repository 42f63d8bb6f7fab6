//! The guest↔VMM hypercall ABI (port I/O, CPL3 with IOPL=3):
//!
//! - `out PORT_DONE, al` — the guest is finished; `al` is its status byte → `VmExit::Done`.
//! - `out PORT_CALL, al` — hypercall number `al`; arguments in `rdi`, `rsi`, `rdx`; the VMM
//!   writes the result to `rax` before the guest continues (`HC_ERR` for a bad call).
//!   - `HC_EXIT (0)`:   stop; `rdi` = exit code → `VmExit::Exit(code)`.
//!   - `HC_LOG (1)`: `rdi` = GPA, `rsi` = length (≤ `LOG_MAX`) of a UTF-8 message; the VMM
//!     reads it from guest memory (through the fault path) and logs it.
//!   - `HC_REPORT (2)`: `rdi` = a value handed to the VMM's caller → `VmExit::Report(value)`;
//!     returns `rdi + 1` (so guests can check the round trip).
//!   - other numbers reach the VMM's caller as `VmExit::Hypercall` with `rax = HC_ERR`
//!     preset; workloads define their own (`HC_NEXT (3)`: the key-value store's request loop).
//!
//! Invariants: decoding never panics; unknown numbers and bad arguments are guest-visible
//! errors (`rax = HC_ERR`) and the guest continues.
//!
//! `GuestVm::serve_hypercall` (below) is the VMM core's side: it serves `HC_EXIT`, `HC_LOG`
//! and `HC_REPORT` and hands every other number to the caller.

use super::exit::VmExit;
use super::GuestVm;
use crate::error::Result;

pub const PORT_DONE: u16 = 0x10;
pub const PORT_CALL: u16 = 0x11;

pub const HC_EXIT: u8 = 0;
pub const HC_LOG: u8 = 1;
pub const HC_REPORT: u8 = 2;
/// Workload call (key-value store): "give me the next request"; served by `workload`, not by
/// the VMM core (it arrives as `VmExit::Hypercall`).
pub const HC_NEXT: u8 = 3;

/// Result of a failed hypercall.
pub const HC_ERR: u64 = u64::MAX;
/// Longest `HC_LOG` message.
pub const LOG_MAX: u64 = 4096;

/// A decoded hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypercall {
    Exit {
        code: u64,
    },
    Log {
        gpa: u64,
        len: u64,
    },
    Report {
        value: u64,
    },
    /// Unknown number or bad arguments: answered with `HC_ERR`.
    Invalid {
        nr: u8,
    },
}

impl Hypercall {
    /// Decodes call `nr` with arguments `rdi, rsi, rdx`.
    pub fn decode(nr: u8, rdi: u64, rsi: u64, _rdx: u64) -> Self {
        match nr {
            HC_EXIT => Hypercall::Exit { code: rdi },
            HC_LOG if rsi <= LOG_MAX && rdi.checked_add(rsi).is_some() => {
                Hypercall::Log { gpa: rdi, len: rsi }
            }
            HC_REPORT => Hypercall::Report { value: rdi },
            _ => Hypercall::Invalid { nr },
        }
    }
}

impl GuestVm {
    /// Serves hypercall `nr` (the guest is stopped at its `out PORT_CALL`); `Some` when the
    /// caller must see it.
    pub(super) fn serve_hypercall(&mut self, nr: u8) -> Result<Option<VmExit>> {
        let mut regs = self.exit_regs()?;
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
        self.set_entry_regs(&regs)?;
        Ok(exit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_never_panics_and_rejects_bad_args() {
        assert_eq!(Hypercall::decode(0, 7, 0, 0), Hypercall::Exit { code: 7 });
        assert_eq!(
            Hypercall::decode(1, 0x1000, 5, 0),
            Hypercall::Log {
                gpa: 0x1000,
                len: 5
            }
        );
        assert_eq!(
            Hypercall::decode(1, 0x1000, LOG_MAX + 1, 0),
            Hypercall::Invalid { nr: 1 }
        );
        assert_eq!(
            Hypercall::decode(1, u64::MAX, 2, 0),
            Hypercall::Invalid { nr: 1 }
        );
        assert_eq!(
            Hypercall::decode(200, 0, 0, 0),
            Hypercall::Invalid { nr: 200 }
        );
    }
}
