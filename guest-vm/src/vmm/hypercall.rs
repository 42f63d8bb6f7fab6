//! The guest↔VMM hypercall ABI (port I/O, CPL3 with IOPL=3), as the VMM core decodes and
//! serves it. The guest-facing description is `guest/ABI.md`; the calls are:
//!
//! - `out PORT_DONE, al` — the guest is finished; `al` is its status byte → `VmExit::Done`.
//! - `out PORT_CALL, al` — hypercall number `al`; arguments in `rdi`, `rsi`, `rdx`; the VMM
//!   writes the result to `rax` before the guest continues (`HC_ERR` for a refused call).
//!   - `HC_EXIT (0)` = `done(status)`: stop; `rdi` = status → `VmExit::Exit(status)`.
//!   - `HC_LOG (1)`: `rdi` = GPA, `rsi` = length (≤ `LOG_MAX`) of a UTF-8 message inside guest
//!     memory; the VMM reads it (through the fault path) and logs it.
//!   - `HC_REPORT (2)`: `rdi` = a value handed to the VMM's caller → `VmExit::Report(value)`;
//!     returns `rdi + 1` (so guests can check the round trip).
//!   - `HC_NEXT (3)`: the key-value store's request loop (served by `workload::kvstore`).
//!   - `HC_SNAPSHOT (4)` = `snapshot_here()` → `VmExit::SnapshotHere`: the caller snapshots
//!     (or forks) here; returns 0, or `HC_ERR` when refused (a second call, or no snapshot
//!     taker).
//!   - `HC_INPUT (5)` = `next_input(buf = rdi, cap = rsi)` → `VmExit::NextInput` after the
//!     buffer is checked (inside guest memory, `cap ≤ INPUT_MAX`); the caller writes the input
//!     and sets the length, or `HC_ERR` (before `snapshot_here`, or a bad buffer).
//!   - `HC_CRASH (6)` = `crash(reason = rdi, len = rsi)`: stop → `VmExit::Crash(reason)`; an
//!     unreadable reason is still a crash, with a reason saying so.
//!   - other numbers reach the VMM's caller as `VmExit::Hypercall` with `rax = HC_ERR`
//!     preset (a caller that does not know the number lets it stand).
//!
//! Invariants: `Hypercall::decode` is total (never panics, for any register values); a known
//! number with a bad buffer is `Refused` (`rax = HC_ERR`, the guest continues); guest buffers
//! are checked against the guest's memory size before the VMM touches them.
//!
//! `GuestVm::serve_hypercall` (below) is the VMM core's side: it serves `HC_EXIT`, `HC_LOG`,
//! `HC_REPORT` and `HC_CRASH`, checks the buffers of the others, and hands them to the caller.

use super::exit::VmExit;
use super::GuestVm;
use crate::error::Result;

pub const PORT_DONE: u16 = 0x10;
pub const PORT_CALL: u16 = 0x11;

pub const HC_EXIT: u8 = 0;
/// `done(status)` is `HC_EXIT`.
pub const HC_DONE: u8 = HC_EXIT;
pub const HC_LOG: u8 = 1;
pub const HC_REPORT: u8 = 2;
/// Workload call (key-value store): "give me the next request"; served by `workload`, not by
/// the VMM core (it arrives as `VmExit::Hypercall`).
pub const HC_NEXT: u8 = 3;
pub const HC_SNAPSHOT: u8 = 4;
pub const HC_INPUT: u8 = 5;
pub const HC_CRASH: u8 = 6;

/// Result of a refused hypercall.
pub const HC_ERR: u64 = u64::MAX;
/// Longest `HC_LOG` message and `HC_CRASH` reason.
pub const LOG_MAX: u64 = 4096;
/// Largest `HC_INPUT` buffer.
pub const INPUT_MAX: u64 = 16 << 20;

/// Why a known hypercall was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The buffer `[gpa, gpa+len)` is not inside guest memory (or wraps).
    OutsideMemory { gpa: u64, len: u64 },
    /// The length exceeds the call's limit.
    TooLong { len: u64, max: u64 },
}

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
    SnapshotHere,
    NextInput {
        gpa: u64,
        cap: u64,
    },
    /// `reason` is `None` when its buffer is bad (still a crash).
    Crash {
        reason: Option<(u64, u64)>,
    },
    /// A known number with bad arguments: answered with `HC_ERR`; the guest continues.
    Refused {
        nr: u8,
        why: Refusal,
    },
    /// A number the VMM core does not know: handed to the caller with `rax = HC_ERR` preset.
    Other {
        nr: u8,
        args: [u64; 3],
    },
}

/// Checks a guest buffer against guest memory `[0, mem_size)` and the call's limit `max`.
pub fn check_buffer(
    gpa: u64,
    len: u64,
    max: u64,
    mem_size: u64,
) -> std::result::Result<(), Refusal> {
    if len > max {
        return Err(Refusal::TooLong { len, max });
    }
    match gpa.checked_add(len) {
        Some(end) if end <= mem_size => Ok(()),
        _ => Err(Refusal::OutsideMemory { gpa, len }),
    }
}

impl Hypercall {
    /// Decodes call `nr` with arguments `rdi, rsi, rdx` for a guest of `mem_size` bytes.
    pub fn decode(nr: u8, rdi: u64, rsi: u64, rdx: u64, mem_size: u64) -> Self {
        let refused = |why| Hypercall::Refused { nr, why };
        match nr {
            HC_EXIT => Hypercall::Exit { code: rdi },
            HC_LOG => match check_buffer(rdi, rsi, LOG_MAX, mem_size) {
                Ok(()) => Hypercall::Log { gpa: rdi, len: rsi },
                Err(why) => refused(why),
            },
            HC_REPORT => Hypercall::Report { value: rdi },
            HC_SNAPSHOT => Hypercall::SnapshotHere,
            HC_INPUT => match check_buffer(rdi, rsi, INPUT_MAX, mem_size) {
                Ok(()) => Hypercall::NextInput { gpa: rdi, cap: rsi },
                Err(why) => refused(why),
            },
            HC_CRASH => Hypercall::Crash {
                reason: check_buffer(rdi, rsi, LOG_MAX, mem_size)
                    .ok()
                    .map(|()| (rdi, rsi)),
            },
            _ => Hypercall::Other {
                nr,
                args: [rdi, rsi, rdx],
            },
        }
    }
}

impl GuestVm {
    /// Reads a guest message (checked by `decode`) as text, lossily.
    fn read_message(&mut self, gpa: u64, len: u64) -> Option<String> {
        let mut buf = vec![0u8; len as usize];
        self.read_guest(gpa, &mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Serves hypercall `nr` (the guest is stopped at its `out PORT_CALL`); `Some` when the
    /// caller must see it.
    pub(super) fn serve_hypercall(&mut self, nr: u8) -> Result<Option<VmExit>> {
        let mut regs = self.exit_regs()?;
        let call = Hypercall::decode(nr, regs.rdi, regs.rsi, regs.rdx, self.res.size());
        let (ret, exit) = match call {
            Hypercall::Exit { code } => (0, Some(VmExit::Exit(code))),
            Hypercall::Report { value } => (value.wrapping_add(1), Some(VmExit::Report(value))),
            Hypercall::Log { gpa, len } => match self.read_message(gpa, len) {
                Some(s) => {
                    tracing::info!(target: "guest", "{s}");
                    self.log.push(s);
                    (0, None)
                }
                None => (HC_ERR, None),
            },
            // The caller answers (0 once it took the snapshot).
            Hypercall::SnapshotHere => (HC_ERR, Some(VmExit::SnapshotHere)),
            Hypercall::NextInput { gpa, cap } => (HC_ERR, Some(VmExit::NextInput { gpa, cap })),
            Hypercall::Crash { reason } => {
                let text = match reason {
                    Some((gpa, len)) => self.read_message(gpa, len).unwrap_or_else(|| {
                        format!("(crash reason at {gpa:#x}+{len} could not be read)")
                    }),
                    None => format!(
                        "(crash reason at {:#x}+{} is outside guest memory or longer than \
                         {LOG_MAX})",
                        regs.rdi, regs.rsi
                    ),
                };
                (HC_ERR, Some(VmExit::Crash(text)))
            }
            Hypercall::Refused { nr, why } => {
                tracing::debug!(nr, ?why, "hypercall refused");
                (HC_ERR, None)
            }
            Hypercall::Other { nr, args } => (HC_ERR, Some(VmExit::Hypercall { nr, args })),
        };
        regs.rax = ret;
        self.set_entry_regs(&regs)?;
        Ok(exit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MEM: u64 = 2 << 20;

    fn dec(nr: u8, rdi: u64, rsi: u64) -> Hypercall {
        Hypercall::decode(nr, rdi, rsi, 0, MEM)
    }

    #[test]
    fn known_calls_decode_to_their_variants() {
        assert_eq!(dec(HC_DONE, 7, 0), Hypercall::Exit { code: 7 });
        assert_eq!(
            dec(HC_LOG, 0x1000, 5),
            Hypercall::Log {
                gpa: 0x1000,
                len: 5
            }
        );
        assert_eq!(dec(HC_REPORT, 9, 0), Hypercall::Report { value: 9 });
        assert_eq!(dec(HC_SNAPSHOT, 1, 2), Hypercall::SnapshotHere);
        assert_eq!(
            dec(HC_INPUT, 0x10_0000, 0x1000),
            Hypercall::NextInput {
                gpa: 0x10_0000,
                cap: 0x1000
            }
        );
        assert_eq!(
            dec(HC_CRASH, 0x2000, 3),
            Hypercall::Crash {
                reason: Some((0x2000, 3))
            }
        );
        assert_eq!(
            Hypercall::decode(HC_NEXT, 1, 2, 3, MEM),
            Hypercall::Other {
                nr: HC_NEXT,
                args: [1, 2, 3]
            }
        );
    }

    #[test]
    fn bad_buffers_are_refused() {
        let too_long = |nr, len, max| Hypercall::Refused {
            nr,
            why: Refusal::TooLong { len, max },
        };
        let outside = |nr, gpa, len| Hypercall::Refused {
            nr,
            why: Refusal::OutsideMemory { gpa, len },
        };
        assert_eq!(
            dec(HC_LOG, 0x1000, LOG_MAX + 1),
            too_long(HC_LOG, LOG_MAX + 1, LOG_MAX)
        );
        assert_eq!(dec(HC_LOG, u64::MAX, 2), outside(HC_LOG, u64::MAX, 2));
        assert_eq!(dec(HC_LOG, MEM - 1, 2), outside(HC_LOG, MEM - 1, 2));
        // A buffer ending exactly at the end of memory is fine; one byte more is not.
        assert_eq!(
            dec(HC_INPUT, MEM - 16, 16),
            Hypercall::NextInput {
                gpa: MEM - 16,
                cap: 16
            }
        );
        assert_eq!(dec(HC_INPUT, MEM - 16, 17), outside(HC_INPUT, MEM - 16, 17));
        assert_eq!(
            dec(HC_INPUT, 0, INPUT_MAX + 1),
            too_long(HC_INPUT, INPUT_MAX + 1, INPUT_MAX)
        );
        assert_eq!(
            dec(HC_CRASH, u64::MAX, 1),
            Hypercall::Crash { reason: None }
        );
        assert_eq!(
            dec(200, 0, 0),
            Hypercall::Other {
                nr: 200,
                args: [0, 0, 0]
            }
        );
    }

    proptest! {
        /// Total over arbitrary registers: never panics, and every buffer it accepts lies
        /// inside guest memory within the call's limit.
        #[test]
        fn decode_is_total_and_accepts_only_inside_buffers(
            nr in any::<u8>(), rdi in any::<u64>(), rsi in any::<u64>(), rdx in any::<u64>(),
            mem in prop_oneof![Just(MEM), any::<u64>()],
        ) {
            let inside = |gpa: u64, len: u64, max: u64| {
                len <= max && gpa.checked_add(len).is_some_and(|e| e <= mem)
            };
            match Hypercall::decode(nr, rdi, rsi, rdx, mem) {
                Hypercall::Log { gpa, len } => prop_assert!(inside(gpa, len, LOG_MAX)),
                Hypercall::NextInput { gpa, cap } => prop_assert!(inside(gpa, cap, INPUT_MAX)),
                Hypercall::Crash { reason: Some((gpa, len)) } => {
                    prop_assert!(inside(gpa, len, LOG_MAX))
                }
                Hypercall::Refused { nr: n, .. } => {
                    prop_assert!(n == HC_LOG || n == HC_INPUT)
                }
                Hypercall::Other { nr: n, .. } => prop_assert!(n > HC_CRASH || n == HC_NEXT),
                _ => {}
            }
        }
    }
}
