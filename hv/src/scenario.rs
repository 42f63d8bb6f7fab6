//! The guest scenario both backends run, and its checks: a round-robin scheduler over guests,
//! the hypercall handler (report, fork, yield), the fork of a guest (Space fork + vCPU state
//! copy into two children), and the final verdict.
//!
//! Invariants: every second-level fault of every guest goes through `Space::handle_fault`;
//! a guest whose fault cannot be resolved, or that raises an exception, triple-faults or exits
//! unexpectedly, is stopped with a report and the others keep running; the hypervisor never
//! panics on guest behaviour. The verdict is PASS only if every expectation below held.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use vmo::{Error as VmoError, FramePool};

use crate::guest::{self, Role};
use crate::println;
use crate::space::Space;
use crate::vcpu::{Backend, Exit, Vcpu};

#[derive(Debug, PartialEq, Eq)]
enum Status {
    Runnable,
    Done,
    Stopped(String),
}

struct Guest {
    name: String,
    space: Space,
    vcpu: Box<dyn Vcpu>,
    status: Status,
    /// (tag, value, extra) of every HC_REPORT.
    reports: Vec<(u64, u64, u64)>,
    exits: u64,
    stop_error: Option<VmoError>,
    /// GPA of an EPT misconfiguration / NPT reserved-bit fault that stopped the guest.
    misconfig: Option<u64>,
    /// Bytes written to the debug port 0xE9, collected into lines.
    console: String,
}

enum SliceEnd {
    Yield,
    Fork,
    Finished,
}

/// Exits one guest may take in one slice before it is stopped as runaway.
const SLICE_LIMIT: u64 = 100_000;

fn new_guest(backend: &mut dyn Backend, pool: &FramePool, name: &str, role: Role) -> Result<Guest, String> {
    let table = backend.new_stage2().map_err(|e| format!("stage2: {e}"))?;
    let ctx = table.context();
    let space = Space::new(guest::GUEST_PHYS_SIZE, table).map_err(|e| format!("vmar: {e}"))?;
    let st = guest::load(pool, &space, role, backend.hypercall_insn()).map_err(|e| format!("load: {e}"))?;
    let vcpu = backend.new_vcpu(&st, ctx)?;
    Ok(Guest {
        name: name.into(),
        space,
        vcpu,
        status: Status::Runnable,
        reports: Vec::new(),
        exits: 0,
        stop_error: None,
        misconfig: None,
        console: String::new(),
    })
}

fn stop(g: &mut Guest, why: String) {
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
                    guest::HC_REPORT => {
                        g.reports.push((r.rdi, r.rsi, r.rdx));
                        g.vcpu.gprs().rax = 0;
                    }
                    guest::HC_FORK => return SliceEnd::Fork,
                    guest::HC_YIELD => {
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
            Exit::Io { port, size, write, value } => {
                if write && port == 0xE9 {
                    let c = value as u8;
                    if c == b'\n' {
                        println!("guest {} says (port 0xE9): {}", g.name, g.console);
                        g.console.clear();
                    } else if g.console.len() < 200 {
                        g.console.push(if c.is_ascii_graphic() || c == b' ' { c as char } else { '?' });
                    }
                } else if !write {
                    // Reads from absent devices return all ones.
                    let mask = if size >= 4 { 0xFFFF_FFFF } else { (1u64 << (size * 8)) - 1 };
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
                stop(g, format!("exception {} (error code {:#x}) at RIP {:#x}", vector, error, g.vcpu.rip()));
                return SliceEnd::Finished;
            }
            Exit::Shutdown => {
                stop(g, format!("triple fault / shutdown at RIP {:#x}", g.vcpu.rip()));
                return SliceEnd::Finished;
            }
            Exit::Unexpected { code, detail } => {
                stop(g, format!("unexpected exit {:#x} (detail {:#x}) at RIP {:#x}", code, detail, g.vcpu.rip()));
                return SliceEnd::Finished;
            }
        }
    }
    stop(g, format!("runaway: {} exits without yielding", SLICE_LIMIT));
    SliceEnd::Finished
}

/// Forks guest `p` into two children appended to `guests`; returns their indices.
fn fork(backend: &mut dyn Backend, guests: &mut Vec<Guest>, p: usize) -> Result<[usize; 2], String> {
    let parent_state = guests[p].vcpu.state();
    let mut out = [0; 2];
    for k in 1..=2u64 {
        let table = backend.new_stage2().map_err(|e| format!("stage2: {e}"))?;
        let ctx = table.context();
        let space = guests[p].space.fork(table).map_err(|e| format!("fork: {e}"))?;
        let mut st = parent_state;
        st.gprs.rax = k;
        let vcpu = backend.new_vcpu(&st, ctx)?;
        guests.push(Guest {
            name: format!("{}.child{}", guests[p].name, k),
            space,
            vcpu,
            status: Status::Runnable,
            reports: Vec::new(),
            exits: 0,
            stop_error: None,
            misconfig: None,
            console: String::new(),
        });
        out[k as usize - 1] = guests.len() - 1;
    }
    // The parent's writable entries were downgraded by the fork.
    guests[p].vcpu.gprs().rax = 0;
    let v = guests[p].space.take_tlb_control();
    if v != 0 {
        guests[p].vcpu.tlb_control(v);
    }
    Ok(out)
}

fn check(ok: &mut bool, cond: bool, what: &str) {
    if cond {
        println!("check ok: {}", what);
    } else {
        println!("CHECK FAILED: {}", what);
        *ok = false;
    }
}

/// Runs the scenario on `backend`; returns the verdict detail on success.
pub fn run(backend: &mut dyn Backend) -> Result<String, String> {
    let pool = FramePool::new(Arc::new(crate::frames::PhysFrames));
    let frames_before = crate::frames::stats().0;
    let mut guests = Vec::new();
    guests.push(new_guest(backend, &pool, "rogue-oob", Role::OutOfBounds)?);
    guests.push(new_guest(backend, &pool, "main", Role::Main)?);
    guests.push(new_guest(backend, &pool, "rogue-ro", Role::WriteReadOnly)?);
    println!("scenario: {} guests loaded; second-level tables empty (every page arrives by fault)", guests.len());
    guests.push(new_guest(backend, &pool, "rogue-misconfig", Role::ReadCorruptedEntry)?);
    // Deliberately break the table entry this guest will read (the misconfiguration test).
    let corrupted = guests[3].space.corrupt_leaf(guest::DATA_BASE);
    if corrupted.is_none() {
        return Err(String::from("could not install and corrupt the misconfiguration test entry"));
    }
    println!("scenario: rogue-misconfig: its DATA page was installed by a host-side fault, then the entry deliberately corrupted");

    let mut queue: VecDeque<usize> = (0..guests.len()).collect();
    let mut forked = None;
    while let Some(i) = queue.pop_front() {
        match run_slice(&mut guests[i]) {
            SliceEnd::Yield => queue.push_back(i),
            SliceEnd::Finished => {}
            SliceEnd::Fork => match fork(backend, &mut guests, i) {
                Ok(kids) => {
                    println!(
                        "fork: {} -> {}, {} (copy-on-write; {} data pages committed in the parent)",
                        guests[i].name,
                        guests[kids[0]].name,
                        guests[kids[1]].name,
                        (0..guest::DATA_PAGES)
                            .filter(|p| guests[i].space.installed(guest::DATA_BASE + p * 4096).is_some())
                            .count()
                    );
                    queue.push_back(kids[0]);
                    queue.push_back(kids[1]);
                    queue.push_back(i);
                    forked = Some((i, kids));
                }
                Err(e) => stop(&mut guests[i], format!("fork failed: {e}")),
            },
        }
    }

    if let Some(e) = corrupted {
        guests[3].space.restore_leaf(e);
    }
    let mut ok = true;
    for g in &guests {
        let s = g.space.stats();
        println!(
            "guest {}: {:?}; {} exits; Vmar faults: {} ({} committed, {} installed, {} copied (COW), {} upgraded, {} spurious, {} refused)",
            g.name, g.status, g.exits, s.faults, s.commits, s.installs, s.copies, s.upgrades, s.spurious, s.refused
        );
        if g.space.flush_failures() != 0 {
            println!("CHECK FAILED: {} INVEPT failures for {}", g.space.flush_failures(), g.name);
            ok = false;
        }
    }
    let rogue_oob = &guests[0];
    check(
        &mut ok,
        rogue_oob.stop_error == Some(VmoError::NotFound) && !rogue_oob.reports.iter().any(|r| r.0 == guest::TAG_SURVIVED),
        "rogue-oob was stopped for touching GPA outside its mappings",
    );
    let rogue_ro = &guests[2];
    check(
        &mut ok,
        rogue_ro.stop_error == Some(VmoError::AccessDenied)
            && !rogue_ro.reports.iter().any(|r| r.0 == guest::TAG_SURVIVED),
        "rogue-ro was stopped for writing its read-only code mapping",
    );
    let rogue_mc = &guests[3];
    check(
        &mut ok,
        rogue_mc.misconfig == Some(guest::DATA_BASE) && !rogue_mc.reports.iter().any(|r| r.0 == guest::TAG_SURVIVED),
        "rogue-misconfig was stopped at the malformed second-level entry",
    );
    let snapshot_sum = guest::checksum(guest::parent_value);
    let main = &guests[1];
    check(&mut ok, main.status == Status::Done, "main guest ran to completion after the rogues were stopped");
    check(
        &mut ok,
        main.reports.iter().any(|r| r.0 == guest::TAG_FILLED && r.1 == snapshot_sum),
        "main guest's checksum of its filled memory is right",
    );
    let Some((p, kids)) = forked else {
        println!("CHECK FAILED: the main guest never forked");
        return Err(String::from("no fork"));
    };
    check(
        &mut ok,
        guests[p].reports.iter().any(|r| r.0 == guest::TAG_PARENT_AFTER && r.1 == snapshot_sum),
        "parent still sees its snapshot after both children wrote (checksum unchanged)",
    );
    let mut total_copied = 0;
    let mut total_shared = 0;
    for (k, &c) in kids.iter().enumerate() {
        let k = k as u64 + 1;
        let g = &guests[c];
        let want = guest::checksum(|a| guest::child_value(k, a));
        check(&mut ok, g.status == Status::Done, &format!("{} ran to completion", g.name));
        check(
            &mut ok,
            g.reports.iter().any(|r| r.0 == guest::TAG_CHILD && r.2 == k && r.1 == want),
            &format!("{} reported checksum {:#x} = its own writes + the shared snapshot", g.name, want),
        );
        // Host-side view: every qword of the child's memory, and of the parent's.
        let mut mism = 0;
        let mut pmism = 0;
        let (mut shared, mut copied) = (0, 0);
        for page in 0..guest::DATA_PAGES {
            let base = guest::DATA_BASE + page * 4096;
            let mut buf = [0u8; 4096];
            let mut pbuf = [0u8; 4096];
            let _ = g.space.read(base, &mut buf);
            let _ = guests[p].space.read(base, &mut pbuf);
            for i in 0..512u64 {
                let a = base + i * 8;
                let v = u64::from_le_bytes(buf[i as usize * 8..i as usize * 8 + 8].try_into().unwrap_or([0; 8]));
                let pv = u64::from_le_bytes(pbuf[i as usize * 8..i as usize * 8 + 8].try_into().unwrap_or([0; 8]));
                if v != guest::child_value(k, a) {
                    mism += 1;
                }
                if pv != guest::parent_value(a) {
                    pmism += 1;
                }
            }
            // What the hardware translates: the child's and the parent's installed frames.
            match (g.space.installed(base).map(|t| t.pa), guests[p].space.installed(base).map(|t| t.pa)) {
                (Some(a), Some(b)) if a == b => shared += 1,
                (Some(_), Some(_)) => copied += 1,
                _ => {}
            }
        }
        check(&mut ok, mism == 0 && pmism == 0, &format!("{}: host view of memory matches (isolation)", g.name));
        println!(
            "fork: {} data pages: {} copied, {} shared with the parent (expected {} / {})",
            g.name,
            copied,
            shared,
            guest::CHILD_PAGES,
            guest::DATA_PAGES - guest::CHILD_PAGES
        );
        check(
            &mut ok,
            copied == guest::CHILD_PAGES && shared == guest::DATA_PAGES - guest::CHILD_PAGES,
            &format!("{} copied exactly the pages it wrote", g.name),
        );
        total_copied += copied;
        total_shared += shared;
    }
    let faults: u64 = guests.iter().map(|g| g.space.stats().faults).sum();
    let stats = pool.stats();
    println!(
        "frames: pool allocated {}, live {}, COW copies {}",
        stats.allocated, stats.live, stats.cow_copies
    );
    drop(guests);
    let after = pool.stats();
    let frames_after = crate::frames::stats().0;
    check(
        &mut ok,
        after.live == 0 && frames_after == frames_before,
        &format!(
            "all guest frames and tables freed after teardown (pool live {}, host frames {} -> {})",
            after.live, frames_before, frames_after
        ),
    );
    let detail = format!(
        "backend={} stage2-faults={} data-pages-copied={} data-pages-shared={}",
        backend.name(),
        faults,
        total_copied,
        total_shared
    );
    if ok {
        println!("isolation: OK (children see only their own writes plus the snapshot; parent unchanged)");
        Ok(detail)
    } else {
        Err(detail)
    }
}
