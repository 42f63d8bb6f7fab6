//! Dirty harvest through the `Stage2` seam (`Stage2::harvest_dirty`), on every backend that
//! tracks writes: the software guest CPU writes through the backend's own write path
//! (`Backend::guest_write`) and the MMU's walk (`Backend::translate`), and the harvest must
//! report exactly what the contract says:
//! - every page the guest wrote since the last harvest covering it, plus every page installed
//!   (or made) writable since then (the contract counts those as written);
//! - nothing else: no page that was only read, no hole, no read-only page, and — after a first
//!   harvest — no page that was not written again; a second harvest reports nothing;
//! - a written large leaf reports all its pages in range; a range covering a large leaf only
//!   partly reports the pages inside and keeps the others' state for a later harvest.
//!
//! The model is the set of pages "pending" (written, or newly writable) per address space,
//! checked at every harvest. Large leaves are driven on the backend's `Stage2` directly, since
//! the fault path installs only 4 KiB leaves.
//!
//! Backends: Ept, Npt and Kvm (`KvmStage2`: userfaultfd WP_ASYNC + PAGEMAP_SCAN; the software
//! CPU writes through its memslot mapping).

use std::collections::BTreeSet;

use conformance::{for_each_backend, harvest, writable_pages, Backend, Rng, SoftCpu};
use ept::{Access, MemType, PageSize, S2Perms, Stage2};
use vmo::{FramePool, MapOptions, VmPerms, Vmar, Vmo, VmoFlags};

const P: u64 = vmo::PAGE_SIZE;
const M2: u64 = 2 << 20;
const PAGES: u64 = 64;

fn space<B: Backend>() -> (FramePool, Vmar<B::S>) {
    let pool = B::pool();
    let root = Vmar::new_root(1 << 30, B::stage2(&pool)).unwrap();
    (pool, root)
}

fn vmo(pool: &FramePool, pages: u64) -> Vmo {
    Vmo::new(pool, pages * P, VmoFlags::empty()).unwrap()
}

fn set(pages: impl IntoIterator<Item = u64>) -> BTreeSet<u64> {
    pages.into_iter().map(|p| p * P).collect()
}

/// `op` on the space, recording in `pending` every page it left newly writable (the contract
/// counts a page installed writable as written).
fn tracked<S: Stage2 + Send + 'static>(
    vmar: &Vmar<S>,
    pending: &mut BTreeSet<u64>,
    op: impl FnOnce(),
) {
    let before = writable_pages(vmar, 0, PAGES);
    op();
    pending.extend(writable_pages(vmar, 0, PAGES).difference(&before));
}

fn harvested<S: Stage2 + Send + 'static>(vmar: &Vmar<S>, gpa: u64, len: u64) -> BTreeSet<u64> {
    harvest(vmar, gpa, len)
        .expect("harvest_dirty")
        .into_iter()
        .collect()
}

/// Random guest writes and reads, harvests of random sub-ranges: each harvest reports exactly
/// the pending pages in its range, and only those leave the pending set.
fn harvest_matches_a_model_of_written_pages<B: Backend>() {
    let (pool, root) = space::<B>();
    let ram = vmo(&pool, PAGES);
    root.map(&ram, 0, PAGES * P, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    let mut rng = Rng(0x5eed_d1a7_0000_0001);
    let mut pending = BTreeSet::new();
    let mut reported = 0;
    for step in 0..400 {
        let page = rng.below(PAGES);
        match rng.below(8) {
            0..=3 => {
                let v = rng.below(255) as u8 + 1;
                tracked(&root, &mut pending, || {
                    SoftCpu::new(&root, &pool)
                        .write_u8(page * P + rng.below(P), v)
                        .unwrap()
                });
                pending.insert(page * P);
            }
            4..=5 => tracked(&root, &mut pending, || {
                SoftCpu::new(&root, &pool).read_u8(page * P).unwrap();
            }),
            _ => {
                let len = (1 + rng.below(PAGES - page)) * P;
                let got = harvested(&root, page * P, len);
                let want: BTreeSet<u64> =
                    pending.range(page * P..page * P + len).copied().collect();
                assert_eq!(
                    got,
                    want,
                    "{}: step {step}: harvest {page}+{len:#x}",
                    B::NAME
                );
                pending.retain(|p| !want.contains(p));
                reported += got.len();
            }
        }
        if step % 50 == 49 {
            root.check_invariants().unwrap();
        }
    }
    let rest = harvested(&root, 0, PAGES * P);
    assert_eq!(rest, pending, "{}: final harvest", B::NAME);
    assert!(reported > 0, "the schedule harvested nothing");
    assert!(harvested(&root, 0, PAGES * P).is_empty(), "idempotent");
}

/// After a first harvest (which reports the pages installed writable), only pages written
/// again are reported, reads report nothing, and a second harvest reports nothing.
fn only_written_pages_after_a_first_harvest<B: Backend>() {
    let (pool, root) = space::<B>();
    let ram = vmo(&pool, PAGES);
    root.map(&ram, 0, PAGES * P, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    let mut cpu = SoftCpu::new(&root, &pool);
    for page in 0..PAGES {
        cpu.write_u8(page * P + 1, 1).unwrap();
    }
    assert_eq!(harvested(&root, 0, PAGES * P), set(0..PAGES));
    assert!(harvested(&root, 0, PAGES * P).is_empty(), "second harvest");
    for page in [3u64, 9, 10, 11, 62] {
        cpu.write(page * P + 4000, &[2; 200]).unwrap(); // crosses into the next page
    }
    for page in [0u64, 1, 30, 63] {
        cpu.read_u8(page * P).unwrap();
        assert!(
            cpu.fetch(page * P + 7).is_err(),
            "fetch from a no-exec mapping"
        );
    }
    let want = set([3, 4, 9, 10, 11, 12, 62, 63]);
    assert_eq!(harvested(&root, 0, PAGES * P), want, "{}", B::NAME);
    assert!(harvested(&root, 0, PAGES * P).is_empty(), "idempotent");
    // A harvest of part of the range leaves the rest for later.
    cpu.write_u8(5 * P, 3).unwrap();
    cpu.write_u8(50 * P, 3).unwrap();
    assert_eq!(harvested(&root, 0, 8 * P), set([5]));
    assert_eq!(harvested(&root, 0, PAGES * P), set([50]));
    root.check_invariants().unwrap();
}

/// Holes, read-only mappings and pages the guest may not write are never reported; a range
/// that covers nothing installed is not an error.
fn holes_and_read_only_pages_are_never_reported<B: Backend>() {
    let (pool, root) = space::<B>();
    let rw = vmo(&pool, 8);
    let ro = vmo(&pool, 8);
    for i in 0..8 {
        ro.write(i * P, &[i as u8 + 1]).unwrap();
    }
    root.map(&rw, 0, 8 * P, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    // Pages 8..16 stay a hole.
    root.map(&ro, 0, 8 * P, MapOptions::specific(16 * P, VmPerms::READ))
        .unwrap();
    let mut cpu = SoftCpu::new(&root, &pool);
    for page in 16..24 {
        assert_eq!(cpu.read_u8(page * P).unwrap(), (page - 15) as u8);
        assert!(
            cpu.write_u8(page * P, 9).is_err(),
            "write to a read-only mapping"
        );
    }
    assert!(cpu.write_u8(10 * P, 9).is_err(), "write into a hole");
    cpu.write_u8(2 * P, 1).unwrap();
    assert_eq!(harvested(&root, 0, 32 * P), set([2]));
    assert!(harvested(&root, 8 * P, 8 * P).is_empty(), "hole");
    assert!(harvested(&root, 16 * P, 8 * P).is_empty(), "read-only");
    assert!(
        harvested(&root, 1 << 29, 16 * P).is_empty(),
        "nothing installed"
    );
    assert!(harvested(&root, 0, 32 * P).is_empty());
    root.check_invariants().unwrap();
}

/// A write-protect does not hide writes: pages written since the last harvest and then
/// write-protected (by `Vmar::protect`, as a fork or dirty tracking would) are still reported
/// once — so a copy-back reset never misses them — and pages not written are not.
fn written_then_write_protected_pages_are_still_reported<B: Backend>() {
    let (pool, root) = space::<B>();
    let ram = vmo(&pool, 8);
    root.map(&ram, 0, 8 * P, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    let mut cpu = SoftCpu::new(&root, &pool);
    for page in [1u64, 3, 6] {
        cpu.write_u8(page * P, 1).unwrap();
    }
    assert_eq!(harvested(&root, 0, 8 * P), set([1, 3, 6]));
    cpu.write_u8(P, 2).unwrap();
    cpu.write_u8(5 * P, 2).unwrap();
    root.protect(0, 8 * P, VmPerms::READ).unwrap();
    assert_eq!(harvested(&root, 0, 8 * P), set([1, 5]), "{}", B::NAME);
    assert!(harvested(&root, 0, 8 * P).is_empty());
    // Installed writable and never harvested, then protected: counts as written.
    root.protect(0, 8 * P, VmPerms::RW).unwrap();
    cpu.write_u8(7 * P, 3).unwrap();
    root.protect(0, 8 * P, VmPerms::READ).unwrap();
    let got = harvested(&root, 0, 8 * P);
    assert!(got.contains(&(7 * P)), "{}: {got:?}", B::NAME);
    assert!(harvested(&root, 0, 8 * P).is_empty());
    root.check_invariants().unwrap();
}

/// A fork: the child's reads of shared pages (installed read-only) are never reported, its
/// writes (copy-on-write) are; the parent, write-protected by the fork, reports nothing until
/// it writes itself.
fn forks_report_only_their_own_writes<B: Backend>() {
    let (pool, parent) = space::<B>();
    let ram = vmo(&pool, PAGES);
    parent
        .map(&ram, 0, PAGES * P, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    let mut cpu = SoftCpu::new(&parent, &pool);
    for page in 0..32 {
        cpu.write_u8(page * P, 1).unwrap();
    }
    harvested(&parent, 0, PAGES * P);
    let child = parent.fork(B::stage2(&pool)).unwrap();
    assert!(
        harvested(&parent, 0, PAGES * P).is_empty(),
        "the fork's write-protect"
    );
    let mut pending = BTreeSet::new();
    tracked(&child, &mut pending, || {
        let mut c = SoftCpu::new(&child, &pool);
        for page in 0..16 {
            c.read_u8(page * P).unwrap();
        }
    });
    assert!(
        pending.is_empty(),
        "shared pages installed writable in the child"
    );
    assert!(harvested(&child, 0, PAGES * P).is_empty());
    for page in [2u64, 5, 20, 40] {
        tracked(&child, &mut pending, || {
            SoftCpu::new(&child, &pool)
                .write_u8(page * P + 3, 7)
                .unwrap()
        });
        pending.insert(page * P);
    }
    assert_eq!(harvested(&child, 0, PAGES * P), pending, "{}", B::NAME);
    assert!(
        harvested(&parent, 0, PAGES * P).is_empty(),
        "the child's writes"
    );
    cpu.write_u8(7 * P, 2).unwrap();
    assert_eq!(harvested(&parent, 0, PAGES * P), set([7]));
    assert!(harvested(&child, 0, PAGES * P).is_empty());
    parent.check_invariants().unwrap();
    child.check_invariants().unwrap();
}

/// A guest write through the MMU on a bare table, as `SoftCpu` does it.
fn write_direct<B: Backend>(s: &mut B::S, pool: &FramePool, gpa: u64, byte: u8) -> bool {
    match B::translate(s, gpa, Access::WRITE) {
        Some(t) if t.perms.contains(S2Perms::WRITE) => {
            B::guest_write(s, pool, t, gpa, &[byte]);
            true
        }
        _ => false,
    }
}

fn harvest_s2<S: Stage2>(s: &mut S, gpa: u64, len: u64) -> Vec<u64> {
    let mut dirty = Vec::new();
    let n = s
        .harvest_dirty(gpa, len, &mut dirty)
        .expect("harvest_dirty");
    assert_eq!(n, dirty.len() as u64);
    if s.flush_pending() {
        s.flush(ept::FlushScope::Context);
    }
    dirty
}

/// `got` (ascending, no duplicates) holds every page of `must` and only pages of `may`.
fn within(got: &[u64], must: &[u64], may: &[u64], backend: &str) {
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "{backend}: {got:?} not ascending"
    );
    for p in must {
        assert!(
            got.contains(p),
            "{backend}: written page {p:#x} not reported in {got:?}"
        );
    }
    for p in got {
        assert!(
            may.contains(p),
            "{backend}: page {p:#x} reported outside {may:?}"
        );
    }
}

fn pages(from: u64, to: u64) -> Vec<u64> {
    (from / P..to / P).map(|p| p * P).collect()
}

/// 2 MiB leaves on the backend directly: a writable leaf reports all its 512 pages on the
/// first harvest; a write reports all of them again; a range covering the leaf partly reports
/// only the pages inside and the rest stay dirty for the next harvest; a read-only leaf is
/// never reported.
fn large_leaves_report_every_page_in_range<B: Backend>() {
    let pool = B::pool();
    // 8 MiB of contiguous frames hold three 2 MiB-aligned runs.
    let frames = pool.alloc_contiguous(2048).unwrap();
    let first = frames[0].paddr();
    let base = first.next_multiple_of(M2);
    let mut s = B::stage2(&pool);
    let wb = MemType::WriteBack;
    s.map(M2, base, PageSize::Size2M, S2Perms::RW, wb).unwrap();
    s.map(2 * M2, base + M2, PageSize::Size2M, S2Perms::READ, wb)
        .unwrap();
    s.map(3 * M2, base + 2 * M2, PageSize::Size2M, S2Perms::RW, wb)
        .unwrap();
    s.flush(ept::FlushScope::Context);
    // Installed writable: both RW leaves, every page.
    let mut both = pages(M2, 2 * M2);
    both.extend(pages(3 * M2, 4 * M2));
    assert_eq!(harvest_s2(&mut s, 0, 8 * M2), both, "{}", B::NAME);
    assert!(harvest_s2(&mut s, 0, 8 * M2).is_empty(), "idempotent");
    // One byte written: the whole leaf.
    assert!(write_direct::<B>(&mut s, &pool, M2 + 5 * P + 3, 1));
    assert!(
        !write_direct::<B>(&mut s, &pool, 2 * M2 + 9, 1),
        "read-only leaf"
    );
    assert_eq!(harvest_s2(&mut s, 0, 8 * M2), pages(M2, 2 * M2));
    // Partial overlap: only pages inside are reported; pages outside keep their state. A
    // backend may track a large leaf as one unit (EPT/NPT: one D bit, so every page of it in
    // range is reported) or per page (KVM: exactly the written pages): the harvest must report
    // at least the written pages in range and at most the leaf's pages in range.
    assert!(write_direct::<B>(&mut s, &pool, M2 + 100 * P, 2));
    let written = [M2 + 100 * P];
    let inside = harvest_s2(&mut s, M2 + 10 * P, 20 * P);
    within(&inside, &[], &pages(M2 + 10 * P, M2 + 30 * P), B::NAME);
    let mut rest = pages(M2, M2 + 10 * P);
    rest.extend(pages(M2 + 30 * P, 2 * M2));
    within(&harvest_s2(&mut s, 0, 8 * M2), &written, &rest, B::NAME);
    assert!(harvest_s2(&mut s, 0, 8 * M2).is_empty());
    // Written at its end, harvested in three ranges: one ending 4 pages into it (and
    // covering the read-only leaf), one covering its second half, then the rest.
    assert!(write_direct::<B>(&mut s, &pool, 4 * M2 - 1, 3));
    let head = harvest_s2(&mut s, 2 * M2, M2 + 4 * P);
    within(&head, &[], &pages(3 * M2, 3 * M2 + 4 * P), B::NAME);
    let half = 3 * M2 + M2 / 2;
    within(
        &harvest_s2(&mut s, half, M2),
        &[4 * M2 - P],
        &pages(half, 4 * M2),
        B::NAME,
    );
    within(
        &harvest_s2(&mut s, 0, 8 * M2),
        &[],
        &pages(3 * M2 + 4 * P, half),
        B::NAME,
    );
    assert!(harvest_s2(&mut s, 0, 8 * M2).is_empty());
    s.unmap(0, 8 * M2).unwrap();
    s.flush(ept::FlushScope::Context);
    drop(s);
    drop(frames);
}

for_each_backend!(
    harvest_matches_a_model_of_written_pages,
    only_written_pages_after_a_first_harvest,
    holes_and_read_only_pages_are_never_reported,
    written_then_write_protected_pages_are_still_reported,
    forks_report_only_their_own_writes,
    large_leaves_report_every_page_in_range,
);
