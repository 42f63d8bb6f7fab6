//! Hierarchical write-protect (`table/gate.rs`, `table/protect.rs`) on both formats, with
//! 4 KiB, 2 MiB and 1 GiB leaves: a write-protect over subtrees whose leaves are all writable
//! closes the upper entries' write bit and leaves the leaves' raw bits alone; afterwards no
//! write goes through any entry (`query`, `for_each_leaf` and the software MMU `hw_touch`
//! agree), writes made before it are still harvested, and a later write (`protect` with write,
//! or `map` of a writable leaf: the fault path's upgrade and copy) opens the gates on its path
//! one level at a time without making any other page writable. Also the count contract of
//! `protect` and `check_invariants` catching a malformed gate.

use ept::entry::ept::EptEntry;
use ept::entry::npt::NptEntry;
use ept::entry::EntryFormat;
use ept::*;

const K4: u64 = 0x1000;
const M2: u64 = 0x20_0000;
const G1: u64 = 0x4000_0000;
const G512: u64 = 1 << 39;

/// The raw entry slots the walk for `gpa` reads, root first, ending at the leaf.
fn walk<E: EntryFormat>(mem: &HeapPhysMem, root: u64, gpa: u64) -> Vec<*mut u64> {
    let mut out = Vec::new();
    let mut table = root;
    for level in (1..=4usize).rev() {
        let i = ((gpa >> (12 + 9 * (level - 1))) & 511) as usize;
        // SAFETY: `table` is a frame of the live table (the root, then frames named by present
        // non-leaf entries) and `i < 512` keeps the pointer inside it.
        let slot = unsafe { mem.frame_ptr(table).add(i) };
        out.push(slot);
        let e = E::from_raw(raw(slot));
        if !e.is_present() || e.is_leaf(level) {
            break;
        }
        table = e.table_address();
    }
    out
}

fn raw(slot: *mut u64) -> u64 {
    // SAFETY: a slot from `walk` of a live table; the test is single-threaded.
    unsafe { slot.read() }
}

/// Whether each entry on the walk for `gpa` grants write in its own bits (root first; the
/// last one is the leaf's raw W).
fn raw_write<E: EntryFormat>(mem: &HeapPhysMem, root: u64, gpa: u64) -> Vec<bool> {
    walk::<E>(mem, root, gpa)
        .into_iter()
        .map(|s| E::from_raw(raw(s)).perms().contains(S2Perms::WRITE))
        .collect()
}

/// Asserts that no page among `pages` can be written: `query` reports no write, and a write
/// through the MMU is refused (no dirty bit set, the leaf returned without write).
fn assert_no_write<E: EntryFormat>(t: &Stage2Table<E, &HeapPhysMem>, pages: &[u64], when: &str) {
    for &gpa in pages {
        let q = t
            .query(gpa)
            .unwrap_or_else(|| panic!("{when}: {gpa:#x} unmapped"));
        assert!(
            !q.perms.contains(S2Perms::WRITE),
            "{when}: {gpa:#x} writable: {q:?}"
        );
        let before = q.dirty;
        let h = t.hw_touch(gpa + 8, Access::WRITE).unwrap();
        assert!(!h.perms.contains(S2Perms::WRITE), "{when}: {gpa:#x}");
        assert_eq!(
            h.dirty, before,
            "{when}: a refused write set {gpa:#x}'s dirty bit"
        );
    }
}

fn harvested<E: EntryFormat>(t: &mut Stage2Table<E, &HeapPhysMem>, gpa: u64, len: u64) -> Vec<u64> {
    let mut v = Vec::new();
    t.harvest_dirty(gpa, len, &mut v).unwrap();
    v
}

/// 3 × 2 MiB of 4 KiB leaves, a 2 MiB leaf at 4 MiB·2 and a 1 GiB leaf at 1 GiB, all RW, in
/// the first 512 GiB; two 1 GiB leaves RW in the second 512 GiB.
fn build<E: EntryFormat>(t: &mut Stage2Table<E, &HeapPhysMem>) {
    let (rw, wb) = (S2Perms::RW, MemType::WriteBack);
    for p in 0..3 * 512 {
        t.map(p * K4, 0x100_0000 + p * K4, PageSize::Size4K, rw, wb)
            .unwrap();
    }
    t.map(4 * M2, 0x4000_0000, PageSize::Size2M, rw, wb)
        .unwrap();
    t.map(G1, 0x8000_0000, PageSize::Size1G, rw, wb).unwrap();
    t.map(G512, 0xc000_0000, PageSize::Size1G, rw, wb).unwrap();
    t.map(G512 + G1, 0x1_0000_0000, PageSize::Size1G, rw, wb)
        .unwrap();
    t.check_invariants().unwrap();
}

fn protect_then_write<E: EntryFormat>(mut t: Stage2Table<E, &HeapPhysMem>, mem: &HeapPhysMem) {
    let ad = t.access_dirty() == AccessDirty::Enabled;
    let root = t.page_table().root();
    let (r, rw) = (S2Perms::READ, S2Perms::RW);
    build(&mut t);
    if ad {
        harvested(&mut t, 0, 2 * G512);
        // Writes before the fork: they must survive the write-protect.
        for gpa in [7 * K4, 4 * M2 + 3 * K4, G1 + 5 * M2, G512 + G1 + K4] {
            assert!(t.hw_touch(gpa, Access::WRITE).unwrap().dirty);
        }
    }
    t.flush(FlushScope::Context);

    // The first 2 GiB: the 1 GiB entry above the 4 KiB tables and the 2 MiB leaf claims RW
    // and is covered, so its gate closes; the 1 GiB leaf beside it is a leaf.
    let n = t.protect(0, 2 * G1, r).unwrap();
    assert!(
        (3 * 512 + 512 + 512 * 512..=2 * G1 / K4).contains(&n),
        "{n}"
    );
    assert!(t.flush_pending());
    assert_eq!(raw_write::<E>(mem, root, 7 * K4), [true, false, true, true]);
    assert_eq!(raw_write::<E>(mem, root, 4 * M2), [true, false, true]);
    // The second 512 GiB entirely: its PML4 entry's gate closes (one entry for 2 GiB of 1 GiB
    // leaves); the count is the entry's span.
    assert_eq!(t.protect(G512, G512, r), Ok(G512 / K4));
    assert_eq!(raw_write::<E>(mem, root, G512 + G1), [false, true]);
    t.check_invariants().unwrap();
    // Nothing left to change: 0.
    assert_eq!(t.protect(0, 2 * G512, r), Ok(0));

    let pages = [
        0,
        7 * K4,
        M2 + 511 * K4,
        4 * M2,
        4 * M2 + 3 * K4,
        G1,
        G1 + 5 * M2,
        G512,
        G512 + G1 + K4,
    ];
    assert_no_write(&t, &pages, "after the write-protect");
    for l in t.leaves(0, 2 * G512).unwrap() {
        assert_eq!(l.perms, r, "{l:?}");
    }
    if ad {
        // Written before the write-protect: still reported, and only those.
        let d = harvested(&mut t, 0, 2 * G512);
        assert_eq!(d.len(), 1 + 512 + 262_144 + 262_144);
        assert!(d.contains(&(7 * K4)) && d.contains(&(G512 + G1 + K4)));
        assert!(harvested(&mut t, 0, 2 * G512).is_empty());
    }

    // A 4 KiB page made writable (the fault path's in-place upgrade): the gates on its path
    // open one level at a time, every other page keeps no write.
    assert_eq!(t.protect(9 * K4, K4, rw), Ok(1));
    assert_eq!(raw_write::<E>(mem, root, 9 * K4), [true, true, true, true]);
    assert_eq!(
        raw_write::<E>(mem, root, 10 * K4),
        [true, true, true, false]
    );
    assert_eq!(raw_write::<E>(mem, root, M2), [true, true, false, true]);
    assert_eq!(raw_write::<E>(mem, root, 4 * M2), [true, true, false]);
    assert!(t.query(9 * K4).unwrap().perms.contains(S2Perms::WRITE));
    assert!(t
        .hw_touch(9 * K4, Access::WRITE)
        .unwrap()
        .perms
        .contains(S2Perms::WRITE));
    assert_no_write(&t, &pages, "after one upgrade");
    t.check_invariants().unwrap();
    // A copy (map replacing the leaf by a writable one) in the next 2 MiB table: the old leaf
    // comes back with its effective perms.
    let old = t
        .map(
            M2 + 4 * K4,
            0x900_0000,
            PageSize::Size4K,
            rw,
            MemType::WriteBack,
        )
        .unwrap()
        .unwrap();
    assert_eq!((old.pa, old.perms), (0x100_0000 + 516 * K4, r));
    assert_eq!(
        raw_write::<E>(mem, root, M2 + 5 * K4),
        [true, true, true, false]
    );
    assert!(t.query(M2 + 4 * K4).unwrap().perms.contains(S2Perms::WRITE));
    // A page inside the 2 MiB leaf: the leaf is split (its effective perms change).
    assert_eq!(t.protect(4 * M2 + 3 * K4, K4, rw), Ok(1));
    assert_eq!(t.query(4 * M2 + 3 * K4).unwrap().size, PageSize::Size4K);
    // A 1 GiB leaf under the closed PML4 gate, replaced by a writable copy.
    let old = t
        .map(
            G512 + G1,
            0x2_0000_0000,
            PageSize::Size1G,
            rw,
            MemType::WriteBack,
        )
        .unwrap()
        .unwrap();
    assert_eq!((old.size, old.perms), (PageSize::Size1G, r));
    assert_eq!(raw_write::<E>(mem, root, G512), [true, false]);
    // ... and the other made writable in place.
    assert_eq!(t.protect(G512, G1, rw), Ok(G1 / K4));
    let written = [9 * K4, M2 + 4 * K4, 4 * M2 + 3 * K4, G512, G512 + G1];
    for gpa in written {
        assert!(t
            .hw_touch(gpa, Access::WRITE)
            .unwrap()
            .perms
            .contains(S2Perms::WRITE));
    }
    assert_no_write(
        &t,
        &[0, 10 * K4, M2, 4 * M2, 4 * M2 + 4 * K4, G1],
        "after the writes",
    );
    t.check_invariants().unwrap();
    if ad {
        // Pages made writable count as written; pushed-down neighbours do not.
        let d = harvested(&mut t, 0, 2 * G512);
        let mut want = vec![9 * K4, M2 + 4 * K4, 4 * M2 + 3 * K4];
        want.extend((0..2 * G1 / K4).map(|k| G512 + k * K4));
        assert_eq!(d, want);
    }

    // Write-protect again: the partly open subtrees are visited, the rest skipped.
    let n = t.protect(0, 2 * G512, r).unwrap();
    assert!(n >= 3 + 2 * G1 / K4, "{n}");
    let all = t.leaves(0, 2 * G512).unwrap();
    assert!(all.iter().all(|l| l.perms == r));
    t.check_invariants().unwrap();
    // Unmap under closed gates keeps the rest translated, then frees every table.
    assert_eq!(t.unmap(5 * K4, 2 * K4), Ok(2));
    assert_eq!(t.query(7 * K4).unwrap().perms, r);
    t.check_invariants().unwrap();
    t.unmap(0, 2 * G512).unwrap();
    t.flush(FlushScope::Context);
    assert_eq!((t.table_frames(), mem.live_frames()), (1, 1));
}

#[test]
fn hierarchical_protect_ept() {
    let mem = HeapPhysMem::new();
    let t = EptTable::with_invalidate(&mem, CountingInvalidate::default(), AccessDirty::Enabled);
    protect_then_write(t.unwrap(), &mem);
}

#[test]
fn hierarchical_protect_ept_without_ad() {
    let mem = HeapPhysMem::new();
    protect_then_write(EptTable::new(&mem).unwrap(), &mem);
}

#[test]
fn hierarchical_protect_npt() {
    let mem = HeapPhysMem::new();
    protect_then_write(NptTable::new(&mem).unwrap(), &mem);
}

/// The count of a subtree protected at once is its span, not its present pages; with write it
/// is exact; a protect adding exec to a gated subtree rewrites the leaves with the gate's
/// effect kept.
fn count_contract<E: EntryFormat>(mut t: Stage2Table<E, &HeapPhysMem>) {
    let (r, rw) = (S2Perms::READ, S2Perms::RW);
    for p in [0, 1, 300] {
        t.map(p * K4, p * K4, PageSize::Size4K, rw, MemType::WriteBack)
            .unwrap();
    }
    assert_eq!(
        t.protect(0, M2, r),
        Ok(512),
        "one gate for 3 pages counts the 2 MiB"
    );
    assert_eq!(t.protect(0, M2, rw), Ok(3), "with write the count is exact");
    assert_eq!(
        t.protect(0, 2 * K4, r),
        Ok(2),
        "a partial range visits the leaves"
    );
    // Two read-only leaves and one writable: the table claims "R or RW, one RW"
    // (`Claim::OrWrite`), so the whole range is again one gate, counted as its span.
    assert_eq!(t.protect(0, M2, r), Ok(512));
    assert_eq!(
        raw_write::<E>(t.phys_mem(), t.page_table().root(), 300 * K4),
        [true, true, false, true]
    );
    assert_eq!(t.protect(0, M2, rw), Ok(3));
    assert_eq!(t.protect(0, M2, r), Ok(512));
    let rx = S2Perms::READ | S2Perms::EXEC;
    assert_eq!(t.protect(0, M2, rx), Ok(3));
    for p in [0, 1, 300] {
        assert_eq!(t.query(p * K4).unwrap().perms, rx);
    }
    t.check_invariants().unwrap();
}

#[test]
fn count_contract_both_formats() {
    let mem = HeapPhysMem::new();
    count_contract(EptTable::new(&mem).unwrap());
    count_contract(NptTable::new(&mem).unwrap());
    assert_eq!(mem.live_frames(), 0);
}

/// A gate withholding more than write is not something this crate writes: the check says so.
fn bad_gate_is_caught<E: EntryFormat>() {
    let mem = HeapPhysMem::new();
    let mut t = PageTable::<E, _>::new(&mem).unwrap();
    t.map(0, 0, PageSize::Size4K, S2Perms::RW, MemType::WriteBack)
        .unwrap();
    let slot = walk::<E>(&mem, t.root(), 0)[1];
    let good = raw(slot);
    let bad = E::from_raw(good).with_perms(S2Perms::READ).raw();
    // SAFETY: a non-leaf slot of the live table; single-threaded.
    unsafe { slot.write(bad) };
    let err = t.check_invariants().unwrap_err();
    assert!(err.contains("gate"), "{err}");
    // SAFETY: as above.
    unsafe { slot.write(good) };
    t.check_invariants().unwrap();
}

#[test]
fn bad_gate_is_caught_both_formats() {
    bad_gate_is_caught::<EptEntry>();
    bad_gate_is_caught::<NptEntry>();
}

/// Fork after fork of a parent that rewrites all its memory in between (the fault path's
/// copy: `map` of a writable leaf over each read-only one): every round's write-protect closes
/// the same upper gates again instead of visiting the leaves — the push-downs and copies leave
/// "READ or RW, one RW" claims (`Claim::OrWrite`), which a gate can close at once — and after
/// each one no page is writable; with a page left unwritten, the round still closes gates.
fn rounds<E: EntryFormat>(mut t: Stage2Table<E, &HeapPhysMem>) {
    let (r, rw, wb) = (S2Perms::READ, S2Perms::RW, MemType::WriteBack);
    let pages = 3 * 512u64;
    for p in 0..pages {
        t.map(p * K4, 0x100_0000 + p * K4, PageSize::Size4K, rw, wb)
            .unwrap();
    }
    let root = t.page_table().root();
    for round in 0..4u64 {
        let n = t.protect(0, G1, r).unwrap();
        assert!(n >= pages && n <= G1 / K4, "round {round}: {n}");
        // One closed gate, the leaves' raw W untouched: nothing below was visited.
        for p in [0, 700, pages - 1] {
            let w = raw_write::<E>(t.phys_mem(), root, p * K4);
            assert_eq!(
                w[..3].iter().filter(|&&w| !w).count(),
                1,
                "round {round}: {w:?}"
            );
            assert!(
                w[3] || (round > 0 && p == 700),
                "round {round} page {p}: {w:?}"
            );
        }
        assert_no_write(
            &t,
            &[0, 700 * K4, (pages - 1) * K4],
            "after the write-protect",
        );
        t.check_invariants().unwrap();
        // The parent writes every page but 700 (copies into new frames).
        for p in (0..pages).filter(|&p| p != 700) {
            let pa = 0x1000_0000 * (round + 1) + p * K4;
            t.map(p * K4, pa, PageSize::Size4K, rw, wb).unwrap();
        }
        assert!(!t.query(700 * K4).unwrap().perms.contains(S2Perms::WRITE));
        assert!(t.query(0).unwrap().perms.contains(S2Perms::WRITE));
        t.check_invariants().unwrap();
    }
    // Nothing writable left after a final write-protect; a second one changes nothing.
    assert!(t.protect(0, G1, r).unwrap() > 0);
    assert_eq!(t.protect(0, G1, r), Ok(0));
    assert!(t.leaves(0, G1).unwrap().iter().all(|l| l.perms == r));
    t.unmap(0, G1).unwrap();
}

#[test]
fn repeated_fork_rounds_close_gates_both_formats() {
    let mem = HeapPhysMem::new();
    rounds(EptTable::new(&mem).unwrap());
    rounds(NptTable::new(&mem).unwrap());
    assert_eq!(mem.live_frames(), 0);
}
