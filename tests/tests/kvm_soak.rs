//! KVM soak: many forked children of one snapshot, each cycled through fork → run → reset
//! over and over on real KVM guests (memfd frames, userfaultfd, `Vmar::handle_fault`), with
//! refused faults and pager errors injected while the host keeps serving every other child.
//!
//! The parent guest has RAM (an anonymous Vmo) at `[0, PAGER_GPA)` and a pager-backed Vmo at
//! `[PAGER_GPA, MEM)` served by `conformance::inject::FaultyPager`, whose injector fails every
//! `PAGER_EVERY`-th pager call (shared by all children, so which child meets it depends on the
//! schedule). Its program stores one byte into 8 RAM pages and then 8 pager pages. Per cycle a
//! child (forked from the snapshot when its slot is empty) may also get one of its RAM pages
//! write-protected first (a refused fault, `AccessDenied`). Every run must end in exactly one
//! of: `Done` with every page written, a refusal at the protected page, or an `Io` refusal at a
//! pager page; a stopped child is recovered by `Guest::reset`, and after every reset the
//! written pages read back as the snapshot's bytes.
//!
//! Checked at the end: every injected pager failure stopped exactly one run; with all children
//! gone, the frame pool and the memfd's residency are back to the parent's alone (exactly), the
//! process RSS is back to where it was after the first round (no growth with cycles), and once
//! the parent is dropped no frame is live and the memfd holds nothing.
//!
//! Size: `GUESTMEM_SOAK_CHILDREN` (default 64) slots × `GUESTMEM_SOAK_CYCLES` (default 100)
//! cycles, run by `GUESTMEM_SOAK_WORKERS` (default 4) host threads; a slot's child is dropped
//! after its reset every `GUESTMEM_SOAK_REFORK`-th cycle (default 2: every other cycle forks a
//! fresh child, the others reuse the child the previous cycle reset; 1 forks every cycle).
//! The default size runs in about 12 s in release on this 2-core host. A long run:
//! `GUESTMEM_SOAK_CYCLES=5000 cargo test --release -p conformance --test kvm_soak -- --nocapture`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use conformance::inject::{pager_byte, FaultyPager, Injector, Plan};
use conformance::Rng;
use guest_vm::vmm::{GuestArgs, VmExit};
use guest_vm::workload::programs;
use guest_vm::{Guest, HostFrames, VcpuState};
use vmo::{MapOptions, VmPerms, Vmo, VmoFlags, PAGE_SIZE as P};

const MEM: u64 = 4 << 20;
const PAGER_GPA: u64 = 3 << 20;
/// The program's stores: 8 RAM pages just below the pager Vmo, then 8 pager pages.
const FIRST: u64 = PAGER_GPA - 8 * P;
const STORES: u64 = 16;
const MARK: u8 = 0x5A;
const PAGER_EVERY: u64 = 37;
const PAGER_SEED: u8 = 7;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var_os("GUESTMEM_REQUIRE_KVM").is_none(),
            "kvm_soak: /dev/kvm unavailable and GUESTMEM_REQUIRE_KVM is set"
        );
        println!("SKIP: kvm_soak: /dev/kvm unavailable");
    }
    ok
}

/// Resident set of this process in bytes (`/proc/self/statm`, second field).
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// The byte the snapshot holds at `gpa` (RAM is zero; pager pages come from the pager).
fn snapshot_byte(gpa: u64) -> u8 {
    if gpa < PAGER_GPA {
        0
    } else {
        pager_byte(PAGER_SEED, (gpa - PAGER_GPA) / P, 0)
    }
}

/// Byte 0 of the frame `guest`'s Vmo holds at `gpa`, or `None` when it holds none there (the
/// page reads as its snapshot: zero, or the pager's bytes). Looks at the frame itself rather than
/// through `Vmar::read`, which would commit a pager page — a pager call of the checker's own.
fn held(guest: &Guest, gpa: u64) -> Option<u8> {
    let info = guest.vmar().query(gpa).unwrap();
    let frame = info
        .vmo
        .committed_frame(info.vmo_offset + (gpa - info.base))
        .unwrap()?;
    let mut b = [0u8];
    frame.read(0, &mut b).unwrap();
    Some(b[0])
}

/// The first byte the guest sees at `gpa`.
fn byte(guest: &Guest, gpa: u64) -> u8 {
    held(guest, gpa).unwrap_or_else(|| snapshot_byte(gpa))
}

#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    runs: u64,
    done: u64,
    denied: u64,
    pager_io: u64,
    forks: u64,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.runs += o.runs;
        self.done += o.done;
        self.denied += o.denied;
        self.pager_io += o.pager_io;
        self.forks += o.forks;
    }
}

/// One cycle of one slot: fork if empty, maybe protect a page, run, check, reset.
fn cycle(
    parent: &Mutex<Guest>,
    state: &VcpuState,
    slot: &mut Option<Guest>,
    rng: &mut Rng,
    refork: bool,
    t: &mut Tally,
) {
    if slot.is_none() {
        *slot = Some(parent.lock().unwrap().fork(state).unwrap());
        t.forks += 1;
    }
    let child = slot.as_mut().unwrap();
    let protected = rng
        .next()
        .is_multiple_of(4)
        .then(|| FIRST + (rng.next() % 8) * P);
    if let Some(gpa) = protected {
        child.vmar().protect(gpa, P, VmPerms::READ).unwrap();
    }
    t.runs += 1;
    let stores: Vec<u64> = (0..STORES).map(|i| FIRST + i * P).collect();
    match child.vm_mut().run().unwrap() {
        VmExit::Done(al) => {
            assert_eq!(al, MARK);
            assert!(
                protected.is_none(),
                "a write to a read-only page went through"
            );
            for &gpa in &stores {
                assert_eq!(byte(child, gpa), MARK, "{gpa:#x} not written");
            }
            t.done += 1;
        }
        VmExit::GuestFault(report) => {
            let gpa = report.fault.gpa;
            match report.error {
                vmo::Error::AccessDenied => {
                    assert_eq!(Some(gpa), protected, "refusal away from the protected page");
                    t.denied += 1;
                }
                vmo::Error::Io => {
                    assert!((PAGER_GPA..PAGER_GPA + 8 * P).contains(&gpa), "{gpa:#x}");
                    if let Some(p) = protected {
                        panic!("the run passed the protected page {p:#x} to reach {gpa:#x}");
                    }
                    t.pager_io += 1;
                }
                e => panic!("unexpected refusal {e:?} at {gpa:#x}"),
            }
            for &g in stores.iter().filter(|&&g| g < gpa) {
                assert_eq!(
                    byte(child, g),
                    MARK,
                    "{g:#x} before the refusal not written"
                );
            }
        }
        other => panic!("unexpected exit {other:?}"),
    }
    if let Some(gpa) = protected {
        child.vmar().protect(gpa, P, VmPerms::RW).unwrap();
    }
    child.reset(state).unwrap();
    for &gpa in &[stores[0], stores[7], stores[8], stores[15]] {
        assert_eq!(byte(child, gpa), snapshot_byte(gpa), "{gpa:#x} after reset");
    }
    if refork {
        *slot = None;
    }
}

#[test]
fn children_cycle_fork_run_reset_under_injected_failures() {
    if !kvm_available() {
        return;
    }
    let children = knob("GUESTMEM_SOAK_CHILDREN", 64) as usize;
    let cycles = knob("GUESTMEM_SOAK_CYCLES", 100);
    let workers = knob("GUESTMEM_SOAK_WORKERS", 4).max(1) as usize;
    let refork = knob("GUESTMEM_SOAK_REFORK", 2).max(1);
    let frames = HostFrames::new(1 << 30).unwrap();
    let injector = Injector::new(Plan::Never);
    let pager = Arc::new(FaultyPager::new(PAGER_SEED, injector.clone()));
    let mut parent = Guest::with_layout(&frames, MEM, |vmar| {
        let ram = Vmo::new(&frames.pool, PAGER_GPA, VmoFlags::empty())?;
        vmar.map(&ram, 0, PAGER_GPA, MapOptions::specific(0, VmPerms::RW))?;
        let paged = Vmo::new_paged(&frames.pool, MEM - PAGER_GPA, VmoFlags::empty(), pager)?;
        vmar.map(
            &paged,
            0,
            MEM - PAGER_GPA,
            MapOptions::specific(PAGER_GPA, VmPerms::RW).allow_faults(),
        )?;
        Ok(())
    })
    .unwrap();
    let args = GuestArgs {
        rdi: FIRST,
        rcx: STORES,
        rdx: P,
        rax: MARK as u64,
        ..Default::default()
    };
    parent.vm_mut().load(&programs::write_loop(), args).unwrap();
    parent.set_reset_point().unwrap();
    let state = parent.snapshot().unwrap();
    let parent_live = frames.pool.stats().live;
    let parent_resident = frames.alloc.resident_bytes().unwrap();
    let parent = Arc::new(Mutex::new(parent));
    let state = Arc::new(state);
    injector.set_plan(Plan::Every(PAGER_EVERY));

    let t0 = Instant::now();
    let mut rss_after_first_round = 0;
    let mut total = Tally::default();
    // Round 1 is one cycle per slot (the warm-up whose RSS is the baseline); round 2 the rest.
    for (round, round_cycles) in [(1, 1), (2, cycles.saturating_sub(1))] {
        let per_worker = children.div_ceil(workers);
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (parent, state) = (parent.clone(), state.clone());
                let slots = children.saturating_sub(w * per_worker).min(per_worker);
                std::thread::spawn(move || {
                    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((round * 64 + w as u64) << 8));
                    let mut slot_children: Vec<Option<Guest>> = (0..slots).map(|_| None).collect();
                    let mut t = Tally::default();
                    for c in 0..round_cycles {
                        let refork = (c + 1) % refork == 0 || c + 1 == round_cycles;
                        for s in slot_children.iter_mut() {
                            cycle(&parent, &state, s, &mut rng, refork, &mut t);
                        }
                    }
                    assert!(slot_children.iter().all(Option::is_none));
                    t
                })
            })
            .collect();
        for h in handles {
            total.add(h.join().unwrap());
        }
        assert_eq!(
            frames.pool.stats().live,
            parent_live,
            "round {round}: child frames left"
        );
        assert_eq!(
            frames.alloc.resident_bytes().unwrap(),
            parent_resident,
            "round {round}: memfd residency"
        );
        if round == 1 {
            rss_after_first_round = rss();
        }
    }
    let elapsed = t0.elapsed();
    let rss_end = rss();
    println!(
        "kvm_soak: {children} children x {cycles} cycles on {workers} workers in {:.1} s: {total:?}; \
         {} pager failures injected; RSS {} KiB after round 1, {} KiB at the end",
        elapsed.as_secs_f64(),
        injector.fired(),
        rss_after_first_round / 1024,
        rss_end / 1024,
    );
    assert_eq!(total.runs, children as u64 * cycles.max(1));
    assert_eq!(total.done + total.denied + total.pager_io, total.runs);
    assert!(
        total.denied > 0 && total.pager_io > 0,
        "{total:?}: nothing was injected"
    );
    assert_eq!(
        total.pager_io,
        injector.fired(),
        "every injected pager failure stops exactly one run"
    );
    assert!(
        rss_end <= rss_after_first_round + (8 << 20),
        "RSS grew from {rss_after_first_round} to {rss_end} bytes over the cycles"
    );
    drop(Arc::try_unwrap(parent).ok().unwrap());
    assert_eq!(frames.pool.stats().live, 0, "every frame returned");
    assert_eq!(frames.alloc.resident_bytes().unwrap(), 0, "memfd empty");
}
