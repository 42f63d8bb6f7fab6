//! Permission summaries in non-leaf entries (bits 56:52, `table/summary.rs`), on both formats:
//! the raw bits map/split/protect leave in table pointers, that `protect` really skips a
//! subtree whose summary equals the perms it sets (a leaf planted writable behind the table's
//! back under such a summary survives the protect), and that `check_invariants` catches a
//! false claim.

use ept::entry::ept::EptEntry;
use ept::entry::npt::NptEntry;
use ept::entry::EntryFormat;
use ept::*;

const K4: u64 = 0x1000;
const M2: u64 = 0x20_0000;
const G1: u64 = 0x4000_0000;
const UNIFORM: u64 = 1 << 55;
const OR_WRITE: u64 = 1 << 56;

fn summary(perms: S2Perms) -> u64 {
    UNIFORM | (perms.bits() as u64) << 52
}

/// The bits of the claim "every leaf below has `perms` or `perms` + WRITE, one has WRITE".
fn or_write(perms: S2Perms) -> u64 {
    OR_WRITE | summary(perms)
}

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
        // SAFETY: as above; nothing else accesses the table during the test.
        let e = E::from_raw(unsafe { slot.read() });
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

fn summaries<E: EntryFormat>(mem: &HeapPhysMem, root: u64, gpa: u64) -> Vec<u64> {
    let path = walk::<E>(mem, root, gpa);
    path[..path.len() - 1]
        .iter()
        .map(|&s| raw(s) & (0x1f << 52))
        .collect()
}

fn protocol<E: EntryFormat>() {
    let mem = HeapPhysMem::new();
    let mut t = PageTable::<E, _>::new(&mem).unwrap();
    let root = t.root();
    let (r, rw) = (S2Perms::READ, S2Perms::RW);
    let wb = MemType::WriteBack;
    // 1 GiB of 4 KiB leaves would be slow in a debug test: 3 × 2 MiB tables' worth of pages,
    // plus a 2 MiB and a 1 GiB leaf.
    for p in 0..3 * 512 {
        t.map(p * K4, 0x100_0000 + p * K4, PageSize::Size4K, rw, wb)
            .unwrap();
    }
    t.map(4 * M2, 0x4000_0000, PageSize::Size2M, rw, wb)
        .unwrap();
    t.map(G1, 0x8000_0000, PageSize::Size1G, rw, wb).unwrap();
    // The first map created every table on the path: each claims its only leaf's perms.
    assert_eq!(summaries::<E>(&mem, root, 0), vec![summary(rw); 3]);
    t.check_invariants().unwrap();

    // A read-only leaf among writable ones drops the claims above it.
    t.map(3 * M2, 0x200_0000, PageSize::Size4K, r, wb).unwrap();
    assert_eq!(summaries::<E>(&mem, root, 3 * M2), vec![0, 0, summary(r)]);
    t.check_invariants().unwrap();

    // Write-protect everything: the 2 MiB tables claiming RW are write-protected through
    // their gate (`table/gate.rs`) and keep their claim, which is about what they see; every
    // claim above becomes READ.
    t.protect(0, 2 * G1, r).unwrap();
    assert_eq!(
        summaries::<E>(&mem, root, 0),
        vec![summary(r), summary(r), summary(rw)]
    );
    let gate = walk::<E>(&mem, root, 0)[2];
    assert!(!E::from_raw(raw(gate)).perms().contains(S2Perms::WRITE));
    assert_eq!(summaries::<E>(&mem, root, 3 * M2), vec![summary(r); 3]);
    t.check_invariants().unwrap();

    // Plant a writable leaf behind the table's back under a READ claim: a protect to READ
    // skips the subtree (the leaf stays writable), and the invariant check reports the false
    // claim.
    let leaf = *walk::<E>(&mem, root, 3 * M2).last().unwrap();
    let ro = raw(leaf);
    let planted = E::from_raw(ro).with_perms(rw).raw();
    // SAFETY: a leaf slot of the live table; single-threaded.
    unsafe { leaf.write(planted) };
    assert!(t.check_invariants().is_err());
    assert_eq!(t.protect(0, 2 * G1, r).unwrap(), 0);
    assert_eq!(
        raw(leaf),
        planted,
        "protect visited a subtree it should skip"
    );
    // SAFETY: as above.
    unsafe { leaf.write(ro) };
    t.check_invariants().unwrap();

    // Making one page writable again: the gate is pushed down, the claims on its path become
    // "READ or RW, one RW" (so the next write-protect closes gates again); its neighbours'
    // stay.
    t.protect(5 * K4, K4, rw).unwrap();
    assert_eq!(summaries::<E>(&mem, root, 5 * K4), vec![or_write(r); 3]);
    assert_eq!(
        summaries::<E>(&mem, root, M2),
        vec![or_write(r), or_write(r), summary(rw)]
    );
    t.check_invariants().unwrap();
    // ... and write-protecting it restores them (the partly covered tables are recomputed).
    t.protect(5 * K4, K4, r).unwrap();
    assert_eq!(
        summaries::<E>(&mem, root, 5 * K4),
        vec![summary(r), summary(r), summary(r)]
    );

    // A split of the read-only 2 MiB leaf (by an unmap of its first page) links a table
    // claiming its perms; the unmap keeps every claim.
    t.unmap(4 * M2, K4).unwrap();
    assert_eq!(summaries::<E>(&mem, root, 4 * M2 + K4), vec![summary(r); 3]);
    // A split of the 1 GiB leaf (by a harvest of a range cutting it) likewise.
    t.protect(G1, G1, rw).unwrap();
    let mut dirty = Vec::new();
    t.harvest_dirty(G1 + M2, K4, &mut dirty).unwrap();
    assert_eq!(dirty, vec![G1 + M2]);
    // The root entry sees the first GiB read-only and the second writable.
    assert_eq!(
        summaries::<E>(&mem, root, G1 + 2 * M2),
        vec![or_write(r), summary(rw)]
    );
    assert_eq!(
        summaries::<E>(&mem, root, G1 + M2),
        vec![or_write(r), summary(rw), summary(rw)]
    );
    t.check_invariants().unwrap();

    // Unmap keeps claims true; the table is consistent to the end.
    t.unmap(0, 4 * M2).unwrap();
    t.check_invariants().unwrap();
}

#[test]
fn summaries_ept() {
    protocol::<EptEntry>();
}

#[test]
fn summaries_npt() {
    protocol::<NptEntry>();
}
