//! One scheduling slice of one guest, and the exit handler: second-level faults go straight
//! to the guest's `Vmar::handle_fault` (the fault path the host tests and guest-vm run too),
//! hypercalls report / fork / yield, HLT ends the guest, debug-port I/O is collected into
//! lines, everything else stops the guest with a report.
//!
//! Invariants: after every resolved fault the table's deferred flush (TLB_CONTROL) is handed
//! to the vCPU before it runs again; a fault the Vmar cannot resolve, an exception, a triple
//! fault or an unexpected exit stops only this guest; a slice ends after `SLICE_LIMIT` exits
//! at the latest (a runaway guest is stopped); nothing here panics on guest behaviour.

use alloc::format;
use alloc::string::String;

use vmo::Error as VmoError;

use super::guest::{Guest, Status};
use super::program;
use crate::platform::serial::println;
use crate::virt::vcpu::Exit;

/// Why a slice ended.
pub(super) enum SliceEnd {
    /// HC_YIELD: back to the end of the queue.
    Yield,
    /// HC_FORK: the scheduler forks the guest, which is stopped at the hypercall.
    Fork,
    /// The guest halted or was stopped.
    Finished,
}

/// Exits one guest may take in one slice before it is stopped as runaway.
const SLICE_LIMIT: u64 = 100_000;

/// Runs `g` until it yields, forks, halts or is stopped, handling every exit in between.
pub(super) fn run_slice(g: &mut Guest) -> SliceEnd {
    for _ in 0..SLICE_LIMIT {
        let exit = g.vcpu.run();
        g.exits += 1;
        match exit {
            Exit::Stage2Fault(f) => match g.space.vmar().handle_fault(f) {
                Ok(_) => {
                    let v = g.space.take_tlb_control();
                    if v != 0 {
                        g.vcpu.tlb_control(v);
                    }
                }
                Err(e) => {
                    let region = match g.space.perms_at(f.gpa) {
                        Some(p) => format!("mapped {:?}", p),
                        None => String::from("no mapping"),
                    };
                    g.stop(format!(
                            "second-level fault not resolvable: {} ({:?} access to GPA {:#x}, {}, RIP {:#x})",
                            match e {
                                VmoError::NotFound => "no mapping covers this guest-physical address (NotFound)",
                                VmoError::AccessDenied => "access denied by the mapping's permissions (AccessDenied)",
                                _ => "fault path error",
                            },
                            f.access,
                            f.gpa,
                            region,
                            g.vcpu.rip()
                        ),
                    );
                    if !matches!(e, VmoError::NotFound | VmoError::AccessDenied) {
                        println!("guest {}: fault path error {:?}", g.name, e);
                    }
                    g.stop_error = Some(e);
                    return SliceEnd::Finished;
                }
            },
            Exit::Hypercall => {
                let r = *g.vcpu.gprs();
                match r.rax {
                    program::HC_REPORT => {
                        g.reports.push((r.rdi, r.rsi, r.rdx));
                        g.vcpu.gprs().rax = 0;
                    }
                    program::HC_FORK => return SliceEnd::Fork,
                    program::HC_YIELD => {
                        g.vcpu.gprs().rax = 0;
                        return SliceEnd::Yield;
                    }
                    n => {
                        println!("guest {}: unknown hypercall {} (returns -1)", g.name, n);
                        g.vcpu.gprs().rax = u64::MAX;
                    }
                }
            }
            Exit::Hlt => {
                g.status = Status::Done;
                return SliceEnd::Finished;
            }
            Exit::Io {
                port,
                size,
                write,
                value,
            } => {
                if write && port == 0xE9 {
                    let c = value as u8;
                    if c == b'\n' {
                        println!("guest {} says (port 0xE9): {}", g.name, g.console);
                        g.console.clear();
                    } else if g.console.len() < 200 {
                        g.console.push(if c.is_ascii_graphic() || c == b' ' {
                            c as char
                        } else {
                            '?'
                        });
                    }
                } else if !write {
                    // Reads from absent devices return all ones.
                    let mask = if size >= 4 {
                        0xFFFF_FFFF
                    } else {
                        (1u64 << (size * 8)) - 1
                    };
                    g.vcpu.gprs().rax |= mask;
                }
            }
            Exit::Misconfig { gpa, what } => {
                g.misconfig = Some(gpa);
                g.stop(format!(
                    "second-level table entry malformed: {} at GPA {:#x}, RIP {:#x}",
                    what,
                    gpa,
                    g.vcpu.rip()
                ));
                return SliceEnd::Finished;
            }
            Exit::Exception { vector, error } => {
                g.stop(format!(
                    "exception {} (error code {:#x}) at RIP {:#x}",
                    vector,
                    error,
                    g.vcpu.rip()
                ));
                return SliceEnd::Finished;
            }
            Exit::Shutdown => {
                g.stop(format!(
                    "triple fault / shutdown at RIP {:#x}",
                    g.vcpu.rip()
                ));
                return SliceEnd::Finished;
            }
            Exit::Msr { msr, write } => {
                g.stop(format!(
                    "unexpected MSR {} of {:#x} at RIP {:#x}",
                    if write { "write" } else { "read" },
                    msr,
                    g.vcpu.rip()
                ));
                return SliceEnd::Finished;
            }
            Exit::VirtInstruction => {
                g.stop(format!(
                    "guest executed a virtualization instruction at RIP {:#x}",
                    g.vcpu.rip()
                ));
                return SliceEnd::Finished;
            }
            Exit::Unexpected { code, detail } => {
                g.stop(format!(
                    "unexpected exit {:#x} (detail {:#x}) at RIP {:#x}",
                    code,
                    detail,
                    g.vcpu.rip()
                ));
                return SliceEnd::Finished;
            }
        }
    }
    g.stop(format!("runaway: {} exits without yielding", SLICE_LIMIT));
    SliceEnd::Finished
}
