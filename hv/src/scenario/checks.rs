//! The scenario's checks and verdict: rogue guests stopped for the right reason, the main guest
//! and both children completed with the checksums their writes imply, every child's memory (read
//! on the host through its Vmar) equal to its own writes plus the snapshot, the parent unchanged,
//! pages copied vs shared counted from what the second-level tables translate, the fork of the
//! fully written BIG region (write-protected through upper entries, its cost in the verdict),
//! and no frame leaked after teardown.
//!
//! Invariant: each expectation prints one `check ok:` or `CHECK FAILED:` line; the verdict is
//! PASS only if none failed.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use ept::PAGE_SIZE;
use vmo::{Error as VmoError, FramePool};

use super::fork::ForkCost;
use super::guest::{Guest, Status};
use super::program;
use crate::platform::frames;
use crate::platform::serial::println;

fn check(ok: &mut bool, cond: bool, what: &str) {
    if cond {
        println!("check ok: {}", what);
    } else {
        println!("CHECK FAILED: {}", what);
        *ok = false;
    }
}

/// Checks the finished scenario and tears it down; `Ok(detail)` for a PASS verdict.
pub(crate) fn verify(
    backend: &str,
    guests: Vec<Guest>,
    forked: Option<(usize, [usize; 2], ForkCost)>,
    pool: &FramePool,
    frames_before: u64,
    tsc_per_ms: u64,
) -> Result<String, String> {
    let mut ok = true;
    for g in &guests {
        let s = g.space.stats();
        println!(
            "guest {}: {:?}; {} exits; Vmar faults: {} ({} committed, {} installed, {} copied (COW), {} upgraded, {} spurious, {} refused)",
            g.name, g.status, g.exits, s.faults, s.commits, s.installs, s.copies, s.upgrades, s.spurious, s.refused
        );
        if g.space.flush_failures() != 0 {
            println!(
                "CHECK FAILED: {} INVEPT failures for {}",
                g.space.flush_failures(),
                g.name
            );
            ok = false;
        }
    }
    let rogue_oob = &guests[0];
    check(
        &mut ok,
        rogue_oob.stop_error == Some(VmoError::NotFound)
            && !rogue_oob
                .reports
                .iter()
                .any(|r| r.0 == program::TAG_SURVIVED),
        "rogue-oob was stopped for touching GPA outside its mappings",
    );
    let rogue_ro = &guests[2];
    check(
        &mut ok,
        rogue_ro.stop_error == Some(VmoError::AccessDenied)
            && !rogue_ro
                .reports
                .iter()
                .any(|r| r.0 == program::TAG_SURVIVED),
        "rogue-ro was stopped for writing its read-only code mapping",
    );
    let rogue_mc = &guests[3];
    check(
        &mut ok,
        rogue_mc.misconfig == Some(program::DATA_BASE)
            && !rogue_mc
                .reports
                .iter()
                .any(|r| r.0 == program::TAG_SURVIVED),
        "rogue-misconfig was stopped at the malformed second-level entry",
    );
    let snapshot_sum = program::checksum(program::parent_value);
    let main = &guests[1];
    check(
        &mut ok,
        main.status == Status::Done,
        "main guest ran to completion after the rogues were stopped",
    );
    check(
        &mut ok,
        main.reports
            .iter()
            .any(|r| r.0 == program::TAG_FILLED && r.1 == snapshot_sum),
        "main guest's checksum of its filled memory is right",
    );
    let Some((p, kids, cost)) = forked else {
        println!("CHECK FAILED: the main guest never forked");
        return Err(String::from("no fork"));
    };
    check(
        &mut ok,
        guests[p]
            .reports
            .iter()
            .any(|r| r.0 == program::TAG_PARENT_AFTER && r.1 == snapshot_sum),
        "parent still sees its snapshot after both children wrote (checksum unchanged)",
    );
    let big = program::BIG_PAGES;
    check(
        &mut ok,
        cost.writable_before == big,
        &format!(
            "before the fork every BIG page was installed writable ({} of {big})",
            cost.writable_before
        ),
    );
    check(
        &mut ok,
        cost.writable_after == 0,
        &format!(
            "after the fork no BIG page of the parent is writable ({} are)",
            cost.writable_after
        ),
    );
    check(
        &mut ok,
        cost.raw_writable_after == big,
        &format!(
            "the fork write-protected BIG through upper entries: {} of {big} leaves untouched",
            cost.raw_writable_after
        ),
    );
    let word = |g: &Guest, gpa: u64| {
        let mut b = [0u8; 8];
        g.space
            .read(gpa, &mut b)
            .map(|_| u64::from_le_bytes(b))
            .ok()
    };
    let after_fork = program::BIG_BASE + 8;
    check(
        &mut ok,
        word(&guests[p], after_fork) == Some(program::BIG_PARENT_VALUE)
            && kids
                .iter()
                .all(|&c| word(&guests[c], after_fork) == Some(0))
            && kids.iter().chain([&p]).all(|&g| {
                (0..big).all(|page| {
                    let gpa = program::BIG_BASE + page * PAGE_SIZE;
                    word(&guests[g], gpa) == Some(program::parent_value(gpa))
                })
            }),
        "BIG: the parent's write after the fork is its own; every page holds what the guest wrote",
    );
    let mut total_copied = 0;
    let mut total_shared = 0;
    for (k, &c) in kids.iter().enumerate() {
        let k = k as u64 + 1;
        let g = &guests[c];
        let want = program::checksum(|a| program::child_value(k, a));
        check(
            &mut ok,
            g.status == Status::Done,
            &format!("{} ran to completion", g.name),
        );
        check(
            &mut ok,
            g.reports
                .iter()
                .any(|r| r.0 == program::TAG_CHILD && r.2 == k && r.1 == want),
            &format!(
                "{} reported checksum {:#x} = its own writes + the shared snapshot",
                g.name, want
            ),
        );
        // Host-side view: every qword of the child's memory, and of the parent's.
        let mut mism = 0;
        let mut pmism = 0;
        let (mut shared, mut copied) = (0, 0);
        for page in 0..program::DATA_PAGES {
            let base = program::DATA_BASE + page * PAGE_SIZE;
            let mut buf = [0u8; PAGE_SIZE as usize];
            let mut pbuf = [0u8; PAGE_SIZE as usize];
            let _ = g.space.read(base, &mut buf);
            let _ = guests[p].space.read(base, &mut pbuf);
            for i in 0..512u64 {
                let a = base + i * 8;
                let v = u64::from_le_bytes(
                    buf[i as usize * 8..i as usize * 8 + 8]
                        .try_into()
                        .unwrap_or([0; 8]),
                );
                let pv = u64::from_le_bytes(
                    pbuf[i as usize * 8..i as usize * 8 + 8]
                        .try_into()
                        .unwrap_or([0; 8]),
                );
                if v != program::child_value(k, a) {
                    mism += 1;
                }
                if pv != program::parent_value(a) {
                    pmism += 1;
                }
            }
            // What the hardware translates: the child's and the parent's installed frames.
            match (
                g.space.installed(base).map(|t| t.pa),
                guests[p].space.installed(base).map(|t| t.pa),
            ) {
                (Some(a), Some(b)) if a == b => shared += 1,
                (Some(_), Some(_)) => copied += 1,
                _ => {}
            }
        }
        check(
            &mut ok,
            mism == 0 && pmism == 0,
            &format!("{}: host view of memory matches (isolation)", g.name),
        );
        println!(
            "fork: {} data pages: {} copied, {} shared with the parent (expected {} / {})",
            g.name,
            copied,
            shared,
            program::CHILD_PAGES,
            program::DATA_PAGES - program::CHILD_PAGES
        );
        check(
            &mut ok,
            copied == program::CHILD_PAGES && shared == program::DATA_PAGES - program::CHILD_PAGES,
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
    let frames_after = frames::stats().0;
    check(
        &mut ok,
        after.live == 0 && frames_after == frames_before,
        &format!(
            "all guest frames and tables freed after teardown (pool live {}, host frames {} -> {})",
            after.live, frames_before, frames_after
        ),
    );
    let us = |ticks: u64| (ticks * 1000).checked_div(tsc_per_ms).unwrap_or(0);
    println!(
        "fork: a guest with {} pages written forked in {} us (first) and {} us (second); a query of each of its BIG leaves takes {} us (TSC {} MHz)",
        program::DATA_PAGES + big,
        us(cost.first_ticks),
        us(cost.later_ticks),
        us(cost.walk_ticks),
        tsc_per_ms / 1000
    );
    let detail = format!(
        "backend={} stage2-faults={} data-pages-copied={} data-pages-shared={} fork-written-pages={} fork-first-us={} fork-later-us={} leaf-walk-us={} fork-leaves-untouched={}",
        backend,
        faults,
        total_copied,
        total_shared,
        program::DATA_PAGES + big,
        us(cost.first_ticks),
        us(cost.later_ticks),
        us(cost.walk_ticks),
        cost.raw_writable_after
    );
    if ok {
        println!("isolation: OK (children see only their own writes plus the snapshot; parent unchanged)");
        Ok(detail)
    } else {
        Err(detail)
    }
}
