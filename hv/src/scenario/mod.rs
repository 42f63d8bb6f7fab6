//! The guest scenario both backends run: the guests (main, three rogues), a round-robin
//! scheduler, and the exit handler (second-level faults to the Vmar fault path, hypercalls
//! report / fork / yield, HLT, debug-port I/O, everything else stops the guest with a report).
//! Forking lives in fork.rs, the checks and the verdict in checks.rs.
//!
//! Invariants: every second-level fault of every guest goes through `Space::handle_fault`;
//! a guest whose fault cannot be resolved, or that raises an exception, triple-faults or exits
//! unexpectedly, is stopped with a report and the others keep running; the hypervisor never
//! panics on guest behaviour. The verdict is PASS only if every expectation below held.

pub mod checks;
pub mod fork;
pub mod program;
pub mod space;

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use vmo::{Error as VmoError, FramePool};

use program::Role;
use crate::println;
use crate::scenario::space::Space;
use crate::virt::vcpu::{Backend, Exit, Vcpu};

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Status {
    Runnable,
    Done,
    Stopped(String),
}

pub(crate) struct Guest {
    pub(crate) name: String,
    pub(crate) space: Space,
    pub(crate) vcpu: Box<dyn Vcpu>,
    pub(crate) status: Status,
    /// (tag, value, extra) of every HC_REPORT.
    pub(crate) reports: Vec<(u64, u64, u64)>,
    pub(crate) exits: u64,
    pub(crate) stop_error: Option<VmoError>,
    /// GPA of an EPT misconfiguration / NPT reserved-bit fault that stopped the guest.
    pub(crate) misconfig: Option<u64>,
    /// Bytes written to the debug port 0xE9, collected into lines.
    pub(crate) console: String,
}

impl Guest {
    /// A guest that has not run yet.
    pub(crate) fn runnable(name: String, space: Space, vcpu: Box<dyn Vcpu>) -> Guest {
        Guest {
            name,
            space,
            vcpu,
            status: Status::Runnable,
            reports: Vec::new(),
            exits: 0,
            stop_error: None,
            misconfig: None,
            console: String::new(),
        }
    }
}

enum SliceEnd {
    Yield,
    Fork,
    Finished,
}

/// Exits one guest may take in one slice before it is stopped as runaway.
const SLICE_LIMIT: u64 = 100_000;

fn new_guest(
    backend: &mut dyn Backend,
    pool: &FramePool,
    name: &str,
    role: Role,
) -> Result<Guest, String> {
    let table = backend.new_stage2().map_err(|e| format!("stage2: {e}"))?;
    let ctx = table.context();
    let space = Space::new(program::GUEST_PHYS_SIZE, table).map_err(|e| format!("vmar: {e}"))?;
    let st = program::load(pool, &space, role, backend.hypercall_insn())
        .map_err(|e| format!("load: {e}"))?;
    let vcpu = backend.new_vcpu(&st, ctx)?;
    Ok(Guest::runnable(name.into(), space, vcpu))
}

pub(crate) fn stop(g: &mut Guest, why: String) {
    println!("guest {} stopped: {}", g.name, why);
    g.status = Status::Stopped(why);
}

fn run_slice(g: &mut Guest) -> SliceEnd {
    for _ in 0..SLICE_LIMIT {
        let exit = g.vcpu.run();
        g.exits += 1;
        match exit {
            Exit::Stage2Fault(f) => match g.space.handle_fault(&f) {
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
                    stop(
                        g,
                        format!(
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
                stop(
                    g,
                    format!(
                        "second-level table entry malformed: {} at GPA {:#x}, RIP {:#x}",
                        what,
                        gpa,
                        g.vcpu.rip()
                    ),
                );
                return SliceEnd::Finished;
            }
            Exit::Exception { vector, error } => {
                stop(
                    g,
                    format!(
                        "exception {} (error code {:#x}) at RIP {:#x}",
                        vector,
                        error,
                        g.vcpu.rip()
                    ),
                );
                return SliceEnd::Finished;
            }
            Exit::Shutdown => {
                stop(
                    g,
                    format!("triple fault / shutdown at RIP {:#x}", g.vcpu.rip()),
                );
                return SliceEnd::Finished;
            }
            Exit::Unexpected { code, detail } => {
                stop(
                    g,
                    format!(
                        "unexpected exit {:#x} (detail {:#x}) at RIP {:#x}",
                        code,
                        detail,
                        g.vcpu.rip()
                    ),
                );
                return SliceEnd::Finished;
            }
        }
    }
    stop(
        g,
        format!("runaway: {} exits without yielding", SLICE_LIMIT),
    );
    SliceEnd::Finished
}

/// Runs the scenario on `backend`; returns the verdict detail on success.
pub fn run(backend: &mut dyn Backend) -> Result<String, String> {
    let pool = FramePool::new(Arc::new(crate::platform::frames::PhysFrames));
    let frames_before = crate::platform::frames::stats().0;
    let mut guests = Vec::new();
    guests.push(new_guest(backend, &pool, "rogue-oob", Role::OutOfBounds)?);
    guests.push(new_guest(backend, &pool, "main", Role::Main)?);
    guests.push(new_guest(backend, &pool, "rogue-ro", Role::WriteReadOnly)?);
    println!(
        "scenario: {} guests loaded; second-level tables empty (every page arrives by fault)",
        guests.len()
    );
    guests.push(new_guest(
        backend,
        &pool,
        "rogue-misconfig",
        Role::ReadCorruptedEntry,
    )?);
    // Deliberately break the table entry this guest will read (the misconfiguration test).
    let corrupted = guests[3].space.corrupt_leaf(program::DATA_BASE);
    if corrupted.is_none() {
        return Err(String::from(
            "could not install and corrupt the misconfiguration test entry",
        ));
    }
    println!("scenario: rogue-misconfig: its DATA page was installed by a host-side fault, then the entry deliberately corrupted");

    let mut queue: VecDeque<usize> = (0..guests.len()).collect();
    let mut forked = None;
    while let Some(i) = queue.pop_front() {
        match run_slice(&mut guests[i]) {
            SliceEnd::Yield => queue.push_back(i),
            SliceEnd::Finished => {}
            SliceEnd::Fork => {
                match crate::scenario::fork::fork(backend, &mut guests, i) {
                    Ok(kids) => {
                        println!(
                        "fork: {} -> {}, {} (copy-on-write; {} data pages committed in the parent)",
                        guests[i].name,
                        guests[kids[0]].name,
                        guests[kids[1]].name,
                        (0..program::DATA_PAGES)
                            .filter(|p| guests[i].space.installed(program::DATA_BASE + p * 4096).is_some())
                            .count()
                    );
                        queue.push_back(kids[0]);
                        queue.push_back(kids[1]);
                        queue.push_back(i);
                        forked = Some((i, kids));
                    }
                    Err(e) => stop(&mut guests[i], format!("fork failed: {e}")),
                }
            }
        }
    }

    if let Some(e) = corrupted {
        guests[3].space.restore_leaf(e);
    }
    crate::scenario::checks::verify(backend.name(), guests, forked, &pool, frames_before)
}
