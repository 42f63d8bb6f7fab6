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
