//! Golden bit layouts: entries, EPTP, INVEPT descriptor, TLB_CONTROL, the fault decoders and the
//! accessed/dirty protocol (map, `hw_touch`, harvest),
//! checked against values written out by hand from the manuals' bit positions
//! (Intel SDM vol. 3C "EPT translation mechanism" / "Exit qualification for EPT violations";
//! AMD APM vol. 2 "Nested paging", "Page-translation-table entry fields", VMCB layout).

use ept::entry::EntryFormat;
use ept::fault::{decode_ept_violation, decode_npf};
use ept::*;

// ---- Intel EPT entries ----------------------------------------------------------------------

#[test]
fn ept_leaf_2m_rwx_wb_ignore_pat() {
    // R|W|X = bits 2:0 = 0x7; WB = 6 in bits 5:3 = 0x30; IPAT bit 6 = 0x40; large bit 7 = 0x80.
    let e =
        EptEntry::leaf(2, 0x1234_0020_0000, S2Perms::RWX, MemType::WriteBack).with_ignore_pat(true);
    assert_eq!(e.bits(), 0x0000_1234_0020_00f7);
    assert!(e.is_leaf(2) && e.ignore_pat());
    assert_eq!(e.leaf_address(2), 0x1234_0020_0000);
    assert_eq!(e.perms(), S2Perms::RWX);
    assert_eq!(e.mem_type(2), MemType::WriteBack);
}

#[test]
fn ept_leaves_4k_and_1g() {
    // 4 KiB, read-only, UC (type 0): only bit 0 besides the address.
    let e = EptEntry::leaf(1, 0xabcd_e000, S2Perms::READ, MemType::Uncacheable);
    assert_eq!(e.bits(), 0x0000_0000_abcd_e001);
    // 4 KiB, R+X, WT (type 4 → 0x20).
    let e = EptEntry::leaf(
        1,
        0x5000,
        S2Perms::READ | S2Perms::EXEC,
        MemType::WriteThrough,
    );
    assert_eq!(e.bits(), 0x5025);
    assert_eq!(e.mem_type(1), MemType::WriteThrough);
    // 4 KiB, execute-only, WB: X bit 2 + 0x30.
    let e = EptEntry::leaf(1, 0xf_ffff_ffff_f000, S2Perms::EXEC, MemType::WriteBack);
    assert_eq!(e.bits(), 0x000f_ffff_ffff_f034);
    assert!(e.is_present());
    // 1 GiB, R+W, WB, large: 0x3 | 0x30 | 0x80.
    let e = EptEntry::leaf(3, 0x4000_0000, S2Perms::RW, MemType::WriteBack);
    assert_eq!(e.bits(), 0x4000_00b3);
    assert!(e.is_leaf(3) && !e.is_leaf(4));
    // WC (1 → 0x08) and WP (5 → 0x28).
    let e = EptEntry::leaf(1, 0x1000, S2Perms::READ, MemType::WriteCombining);
    assert_eq!(e.bits(), 0x1009);
    let e = EptEntry::leaf(1, 0x1000, S2Perms::READ, MemType::WriteProtected);
    assert_eq!(e.bits(), 0x1029);
}

#[test]
fn ept_table_pointer_and_flags() {
    let e = EptEntry::table_pointer(0x7000);
    assert_eq!(e.bits(), 0x7007);
    assert!(e.is_present() && !e.is_leaf(2) && !e.is_leaf(3) && !e.is_leaf(4));
    assert_eq!(e.table_address(), 0x7000);
    assert_eq!(EptEntry::ACCESSED.bits(), 1 << 8);
    assert_eq!(EptEntry::DIRTY.bits(), 1 << 9);
    let ad = EptEntry::from_raw(0x1000 | 0x7 | 0x300);
    assert!(ad.accessed() && ad.dirty());
    assert!(!EptEntry::from_raw(0).is_present());
    // Not present whenever bits 2:0 are clear, whatever else is set.
    assert!(!EptEntry::from_raw(0xffff_ffff_ffff_fff8).is_present());
}

#[test]
fn ept_with_perms_and_split() {
    let e = EptEntry::from_raw(0x0000_1234_0020_00f7 | 0x300); // 2M RWX WB IPAT, A+D
    let ro = e.with_perms(S2Perms::READ);
    assert_eq!(ro.bits(), 0x0000_1234_0020_03f1);
    // Child 3 of a 2 MiB leaf: 4 KiB leaf at +0x3000, no large bit, attributes kept.
    let c = e.split_child(2, 3);
    assert_eq!(c.bits(), 0x0000_1234_0020_3377);
    // Child 1 of a 1 GiB leaf: 2 MiB leaf at +2 MiB, large bit kept.
    let g = EptEntry::leaf(3, 0x8000_0000, S2Perms::RW, MemType::WriteBack);
    assert_eq!(g.split_child(3, 1).bits(), 0x8020_00b3);
}

#[test]
fn eptp_layout() {
    // Root 0x1000_2000 | WB (6) in 2:0 | (4 − 1) << 3 = 0x18 | A/D bit 6 = 0x40.
    let p = Eptp::new(0x1000_2000, MemType::WriteBack, 4, AccessDirty::Enabled).unwrap();
    assert_eq!(p.bits(), 0x1000_205e);
    assert_eq!(p.root(), 0x1000_2000);
    assert_eq!(p.walk_levels(), 4);
    assert!(p.ad_enabled());
    assert_eq!(p.mem_type(), Some(MemType::WriteBack));
    let p = Eptp::new(0x1000_2000, MemType::WriteBack, 4, AccessDirty::Disabled).unwrap();
    assert_eq!(p.bits(), 0x1000_201e);
    let p = Eptp::new(0x3000, MemType::Uncacheable, 5, AccessDirty::Disabled).unwrap();
    assert_eq!(p.bits(), 0x3020);
    assert_eq!(
        Eptp::new(0x3000, MemType::WriteThrough, 4, AccessDirty::Disabled),
        Err(Error::InvalidArgs)
    );
    assert_eq!(
        Eptp::new(0x3000, MemType::WriteBack, 3, AccessDirty::Disabled),
        Err(Error::InvalidArgs)
    );
    assert_eq!(
        Eptp::new(0x3008, MemType::WriteBack, 4, AccessDirty::Disabled),
        Err(Error::InvalidArgs)
    );
    assert_eq!(
        Eptp::new(1 << 52, MemType::WriteBack, 4, AccessDirty::Disabled),
        Err(Error::OutOfRange)
    );
}

#[test]
fn ept_table_eptp_points_at_root() {
    let mem = HeapPhysMem::new();
    let t = EptTable::new(&mem).unwrap();
    assert_eq!(t.eptp().root(), t.page_table().root());
    assert_eq!(t.eptp().bits() & 0xfff, 0x1e);
    let t = EptTable::with_invalidate(&mem, CountingInvalidate::default(), AccessDirty::Enabled)
        .unwrap();
    assert_eq!(t.eptp().bits() & 0xfff, 0x5e);
}

// ---- AMD NPT entries ------------------------------------------------------------------------

#[test]
fn npt_leaves() {
    // 4 KiB RWX WB: P|RW|US = 0x7, NX clear, PWT/PCD/PAT clear (PAT index 0 = WB).
    let e = NptEntry::leaf(1, 0x1234_5000, S2Perms::RWX, MemType::WriteBack);
    assert_eq!(e.bits(), 0x1234_5007);
    // 4 KiB read-only, no exec: P|US = 0x5 and NX bit 63.
    let e = NptEntry::leaf(1, 0x1234_5000, S2Perms::READ, MemType::WriteBack);
    assert_eq!(e.bits(), 0x8000_0000_1234_5005);
    assert_eq!(e.perms(), S2Perms::READ);
    // 2 MiB RWX UC: 0x7 | PWT 0x8 | PCD 0x10 | PS 0x80 (PAT index 3 = UC).
    let e = NptEntry::leaf(2, 0x20_0000, S2Perms::RWX, MemType::Uncacheable);
    assert_eq!(e.bits(), 0x0020_009f);
    assert_eq!(e.pat_index(2), 3);
    assert_eq!(e.mem_type(2), MemType::Uncacheable);
    // 2 MiB RWX WT: PWT only (index 1).
    let e = NptEntry::leaf(2, 0x20_0000, S2Perms::RWX, MemType::WriteThrough);
    assert_eq!(e.bits(), 0x0020_008f);
    // 4 KiB RW UC, no exec.
    let e = NptEntry::leaf(1, 0x9000, S2Perms::RW, MemType::Uncacheable);
    assert_eq!(e.bits(), 0x8000_0000_0000_901f);
    // 1 GiB R+X WB: P|US|PS = 0x85.
    let e = NptEntry::leaf(
        3,
        0xc000_0000,
        S2Perms::READ | S2Perms::EXEC,
        MemType::WriteBack,
    );
    assert_eq!(e.bits(), 0xc000_0085);
    assert!(e.is_leaf(3));
    assert_eq!(e.leaf_address(3), 0xc000_0000);
}

#[test]
fn npt_table_pointer_and_pat_positions() {
    assert_eq!(NptEntry::table_pointer(0x3000).bits(), 0x3007);
    assert!(!NptEntry::table_pointer(0x3000).is_leaf(2));
    assert_eq!(NptEntry::PAT_4K.bits(), 1 << 7);
    assert_eq!(NptEntry::PAT_LARGE.bits(), 1 << 12);
    assert_eq!(NptEntry::NO_EXECUTE.bits(), 1 << 63);
    assert_eq!(ept::entry::npt::DEFAULT_PAT, 0x0007_0406_0007_0406);
    // A 2 MiB leaf with PAT (bit 12) + PCD: index 6. The frame address excludes bit 12.
    let big = NptEntry::from_raw(0x0040_0000 | 0x1000 | 0x10 | 0x80 | 0x7);
    assert_eq!(big.pat_index(2), 6);
    assert_eq!(big.leaf_address(2), 0x0040_0000);
    // Splitting moves PAT from bit 12 to bit 7 and clears PS.
    let child = big.split_child(2, 5);
    assert_eq!(child.bits(), 0x0040_5000 | 0x80 | 0x10 | 0x7);
    assert_eq!(child.pat_index(1), 6);
    // A 1 GiB leaf splits into 2 MiB leaves that keep PS and PAT at bit 12.
    let g = NptEntry::from_raw(0x4000_0000 | 0x1000 | 0x80 | 0x5 | (1 << 63));
    assert_eq!(
        g.split_child(3, 2).bits(),
        0x4040_0000 | 0x1000 | 0x80 | 0x5 | (1 << 63)
    );
    // Access / dirty at bits 5 and 6.
    let ad = NptEntry::from_raw(0x1000 | 0x7 | 0x60);
    assert!(ad.accessed() && ad.dirty());
}

#[test]
fn npt_table_ncr3_is_root() {
    let mem = HeapPhysMem::new();
    let t = NptTable::new(&mem).unwrap();
    assert_eq!(t.ncr3(), t.page_table().root());
    assert_eq!(t.ncr3() & 0xfff, 0);
}

// ---- Accessed / dirty (EPT bits 8/9 with the EPTP's A/D enable; NPT bits 5/6) ---------------

const K4: u64 = 0x1000;
const M2: u64 = 0x20_0000;

/// The raw entries the walk for `gpa` reads, root first, ending at the leaf (or the first
/// entry that is not present).
fn walk_raw<E: EntryFormat>(mem: &HeapPhysMem, root: u64, gpa: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut table = root;
    for level in (1..=4usize).rev() {
        let i = ((gpa >> (12 + 9 * (level - 1))) & 511) as usize;
        // SAFETY: `table` is a frame of the live table (the root, then frames named by present
        // non-leaf entries); `i < 512` keeps the read inside it; nothing writes concurrently.
        let raw = unsafe { mem.frame_ptr(table).add(i).read() };
        out.push(raw);
        let e = E::from_raw(raw);
        if !e.is_present() || e.is_leaf(level) {
            break;
        }
        table = e.table_address();
    }
    out
}

fn leaf_raw<E: EntryFormat>(mem: &HeapPhysMem, root: u64, gpa: u64) -> u64 {
    *walk_raw::<E>(mem, root, gpa).last().unwrap()
}

/// The A/D protocol on one format: `(rw_leaf, ro_leaf)` are the clean 4 KiB leaves for frames
/// 0x9000 (RW, WB) and 0xa000 (read-only, WB); `a`/`d` the format's bits; `ptr_low` the low
/// 12 bits of a clean table pointer.
fn ad_protocol<E: EntryFormat, I: Invalidate>(
    mut t: Stage2Table<E, &HeapPhysMem, I>,
    mem: &HeapPhysMem,
    (rw_leaf, ro_leaf): (u64, u64),
    (a, d): (u64, u64),
    ptr_low: u64,
) {
    let root = t.page_table().root();
    let rw = S2Perms::RW;
    let wb = MemType::WriteBack;
    // Installed writable: dirty until the first harvest. Installed read-only: clean.
    t.map(0x5000, 0x9000, PageSize::Size4K, rw, wb).unwrap();
    t.map(0x6000, 0xa000, PageSize::Size4K, S2Perms::READ, wb)
        .unwrap();
    assert_eq!(leaf_raw::<E>(mem, root, 0x5000), rw_leaf | d);
    assert_eq!(leaf_raw::<E>(mem, root, 0x6000), ro_leaf);
    assert!(!t.flush_pending());
    // The first harvest reports the writable page, clears D only, leaves a flush pending.
    let mut dirty = Vec::new();
    assert_eq!(
        t.harvest(0, M2, &mut dirty),
        Ok(Harvested {
            pages: 1,
            cleared: 1
        })
    );
    assert_eq!(dirty, [0x5000]);
    assert_eq!(leaf_raw::<E>(mem, root, 0x5000), rw_leaf);
    assert!(t.flush_pending());
    t.flush(FlushScope::Context);
    // A read through the MMU sets A in every entry it walks, never D.
    let tr = t.hw_touch(0x6123, Access::READ).unwrap();
    assert!(tr.accessed && !tr.dirty);
    let path = walk_raw::<E>(mem, root, 0x6000);
    assert_eq!(path.len(), 4);
    for raw in &path[..3] {
        assert_eq!(raw & 0xfff, ptr_low | a, "table pointer {raw:#x}");
    }
    assert_eq!(path[3], ro_leaf | a);
    // A write to the read-only leaf changes nothing (the CPU raises a violation instead).
    let tr = t.hw_touch(0x6000, Access::WRITE).unwrap();
    assert!(!tr.dirty && !tr.perms.contains(S2Perms::WRITE));
    assert_eq!(leaf_raw::<E>(mem, root, 0x6000), ro_leaf | a);
    // A write to the writable leaf sets A and D; the harvest clears D and keeps A.
    assert!(t.hw_touch(0x5008, Access::WRITE).unwrap().dirty);
    assert_eq!(leaf_raw::<E>(mem, root, 0x5000), rw_leaf | a | d);
    dirty.clear();
    assert_eq!(t.harvest_dirty(0x5000, K4, &mut dirty), Ok(1));
    assert_eq!(
        (dirty.as_slice(), t.flush_pending()),
        (&[0x5000u64][..], true)
    );
    assert_eq!(leaf_raw::<E>(mem, root, 0x5000), rw_leaf | a);
    t.flush(FlushScope::Context);
    // Idempotent: nothing written since, nothing reported, no flush needed.
    assert_eq!(t.harvest_dirty(0, M2, &mut dirty), Ok(0));
    assert!(!t.flush_pending());
    // Made writable by protect: dirty again (but adding exec to a writable leaf is not).
    assert_eq!(t.protect(0x6000, K4, rw), Ok(1));
    assert!(t.query(0x6000).unwrap().dirty);
    t.harvest_dirty(0x6000, K4, &mut dirty).unwrap();
    assert_eq!(t.protect(0x6000, K4, S2Perms::RWX), Ok(1));
    assert!(!t.query(0x6000).unwrap().dirty);
    // Replacing a dirty leaf by one for the same frame keeps D; for another frame it is the
    // new leaf's own state.
    t.hw_touch(0x5000, Access::WRITE);
    t.map(0x5000, 0x9000, PageSize::Size4K, S2Perms::READ, wb)
        .unwrap();
    assert!(t.query(0x5000).unwrap().dirty);
    t.map(0x5000, 0xb000, PageSize::Size4K, S2Perms::READ, wb)
        .unwrap();
    assert!(!t.query(0x5000).unwrap().dirty);
    t.check_invariants().unwrap();
}

#[test]
fn ept_accessed_dirty_bits_8_and_9() {
    let mem = HeapPhysMem::new();
    let t = EptTable::with_invalidate(&mem, CountingInvalidate::default(), AccessDirty::Enabled);
    // RW WB 4 KiB: 0x33; read-only WB: 0x31; table pointers R|W|X = 0x7.
    ad_protocol(t.unwrap(), &mem, (0x9033, 0xa031), (1 << 8, 1 << 9), 0x7);
    assert_eq!(mem.live_frames(), 0);
}

#[test]
fn npt_accessed_dirty_bits_5_and_6() {
    let mem = HeapPhysMem::new();
    // RW WB no-exec 4 KiB: P|RW|US | NX; read-only: P|US | NX; table pointers P|RW|US = 0x7.
    let nx = 1 << 63;
    let t = NptTable::new(&mem).unwrap();
    ad_protocol(t, &mem, (nx | 0x9007, nx | 0xa005), (1 << 5, 1 << 6), 0x7);
    assert_eq!(mem.live_frames(), 0);
}

#[test]
fn ept_without_ad_never_sets_or_harvests_dirty() {
    let mem = HeapPhysMem::new();
    let mut t = EptTable::new(&mem).unwrap();
    assert_eq!(t.access_dirty(), AccessDirty::Disabled);
    assert!(!t.eptp().ad_enabled());
    let root = t.page_table().root();
    t.map(
        0x5000,
        0x9000,
        PageSize::Size4K,
        S2Perms::RW,
        MemType::WriteBack,
    )
    .unwrap();
    assert_eq!(leaf_raw::<EptEntry>(&mem, root, 0x5000), 0x9033);
    let tr = t.hw_touch(0x5000, Access::WRITE).unwrap();
    assert!(!tr.accessed && !tr.dirty);
    assert_eq!(leaf_raw::<EptEntry>(&mem, root, 0x5000), 0x9033);
    let mut dirty = Vec::new();
    assert_eq!(t.harvest_dirty(0, M2, &mut dirty), Err(Error::NotSupported));
    assert!(dirty.is_empty() && !t.flush_pending());
}

/// A dirty 2 MiB leaf partly inside the range: only the pages inside are reported, and the
/// leaf is split so the pages outside keep their dirty state; a dirty large leaf fully inside
/// is cleaned whole, without a split.
#[test]
fn large_leaf_harvest_splits_at_the_range_ends() {
    fn check<E: EntryFormat>(mut t: Stage2Table<E, &HeapPhysMem>, mem: &HeapPhysMem) {
        let root = t.page_table().root();
        let wb = MemType::WriteBack;
        t.map(M2, 0x40_0000, PageSize::Size2M, S2Perms::RW, wb)
            .unwrap();
        t.map(2 * M2, 0x60_0000, PageSize::Size2M, S2Perms::READ, wb)
            .unwrap();
        assert_eq!(t.table_frames(), 3);
        let mut dirty = Vec::new();
        assert_eq!(
            t.harvest(M2 + 3 * K4, 2 * K4, &mut dirty),
            Ok(Harvested {
                pages: 2,
                cleared: 2
            })
        );
        assert_eq!(dirty, [M2 + 3 * K4, M2 + 4 * K4]);
        assert_eq!(t.table_frames(), 4, "the straddling dirty leaf was split");
        for (page, want) in [(2, true), (3, false), (4, false), (5, true), (511, true)] {
            let q = t.query(M2 + page * K4).unwrap();
            assert_eq!((q.size, q.dirty), (PageSize::Size4K, want), "page {page}");
        }
        dirty.clear();
        assert_eq!(t.harvest_dirty(M2, M2, &mut dirty), Ok(510));
        assert!(!dirty.contains(&(M2 + 3 * K4)) && dirty.windows(2).all(|w| w[0] < w[1]));
        // Made writable as a whole: the 2 MiB leaf is dirty, reported page by page, cleaned
        // in place (no split, still one large leaf).
        assert_eq!(t.protect(2 * M2, M2, S2Perms::RW), Ok(512));
        let before = t.table_frames();
        dirty.clear();
        assert_eq!(t.harvest_dirty(0, 4 * M2, &mut dirty), Ok(512));
        assert_eq!((dirty[0], dirty[511]), (2 * M2, 3 * M2 - K4));
        assert_eq!(t.table_frames(), before);
        let leaf = E::from_raw(leaf_raw::<E>(mem, root, 2 * M2));
        assert!(leaf.is_leaf(2) && !leaf.dirty());
        // A write through the large leaf dirties all of it again.
        t.hw_touch(2 * M2 + 77, Access::WRITE);
        dirty.clear();
        assert_eq!(t.harvest_dirty(2 * M2, M2, &mut dirty), Ok(512));
        assert_eq!(t.harvest_dirty(0, 4 * M2, &mut dirty), Ok(0));
        t.check_invariants().unwrap();
    }
    let mem = HeapPhysMem::new();
    let ept = EptTable::with_invalidate(&mem, CountingInvalidate::default(), AccessDirty::Enabled);
    check(ept.unwrap(), &mem);
    check(NptTable::new(&mem).unwrap(), &mem);
    assert_eq!(mem.live_frames(), 0);
}

// ---- INVEPT and TLB_CONTROL -----------------------------------------------------------------

#[test]
fn invept_descriptor_and_kinds() {
    let d = InveptDescriptor::new(0x1000_205e);
    assert_eq!(d.as_words(), [0x1000_205e, 0]);
    assert_eq!(core::mem::size_of::<InveptDescriptor>(), 16);
    assert_eq!(core::mem::align_of::<InveptDescriptor>(), 16);
    assert_eq!(InveptKind::SingleContext as u64, 1);
    assert_eq!(InveptKind::AllContext as u64, 2);
}

#[test]
fn tlb_control_values_and_hook() {
    assert_eq!(TlbControl::DoNothing as u8, 0);
    assert_eq!(TlbControl::FlushAll as u8, 1);
    assert_eq!(TlbControl::FlushGuest as u8, 3);
    assert_eq!(TlbControl::FlushGuestNonGlobal as u8, 7);
    assert_eq!(
        TlbControl::FlushGuestNonGlobal.combine(TlbControl::FlushGuest),
        TlbControl::FlushGuest
    );
    assert_eq!(
        TlbControl::FlushAll.combine(TlbControl::FlushGuest),
        TlbControl::FlushAll
    );

    let mem = HeapPhysMem::new();
    let mut t = NptTable::with_invalidate(&mem, NptTlbControl::new()).unwrap();
    assert_eq!(t.invalidator_mut().take(), TlbControl::DoNothing);
    t.flush(FlushScope::Context);
    assert_eq!(t.invalidator().pending(), TlbControl::FlushGuest);
    t.flush(FlushScope::All);
    assert_eq!(t.invalidator_mut().take(), TlbControl::FlushAll);
    assert_eq!(t.invalidator_mut().take(), TlbControl::DoNothing);

    let mut t = NptTable::with_invalidate(&mem, NptTlbControl::flush_all_only()).unwrap();
    t.flush(FlushScope::Context);
    assert_eq!(t.invalidator_mut().take(), TlbControl::FlushAll);
}

// ---- Fault decoding -------------------------------------------------------------------------

const GPA: u64 = 0x1234_5678;
const GLA: u64 = 0xffff_8000_0000_1000;

#[test]
fn ept_violation_write_not_present_final_translation() {
    // Write (bit 1), entry R/W/X all clear, GLA valid (7), final translation (8).
    let f = decode_vmx_exit(48, 0x182, GPA, GLA).unwrap();
    assert_eq!(f.gpa, GPA);
    assert_eq!(f.access, Access::WRITE);
    assert_eq!(f.kind, FaultKind::NotPresent);
    assert_eq!(f.gla, Some(GLA));
    assert!(!f.guest_walk && !f.nmi_unblocking);
}

#[test]
fn ept_violation_write_to_readonly_during_guest_walk() {
    // Write (1) to an entry that is readable (3); GLA valid (7) but bit 8 clear: the guest's
    // own paging-structure access (A/D update).
    let f = decode_vmx_exit(48, 0x08a, GPA, GLA).unwrap();
    assert_eq!(f.access, Access::WRITE);
    assert_eq!(f.kind, FaultKind::Permission);
    assert!(f.guest_walk);
    assert_eq!(f.gla, Some(GLA));
}

#[test]
fn ept_violation_fetch_nmi_unblocking_no_gla() {
    // Fetch (2), entry readable (3) + writable (4), no GLA, NMI unblocking (12).
    let f = decode_vmx_exit(48, 0x101c, GPA, GLA).unwrap();
    assert_eq!(f.access, Access::EXEC);
    assert_eq!(f.kind, FaultKind::Permission);
    assert_eq!(f.gla, None);
    assert!(!f.guest_walk);
    assert!(f.nmi_unblocking);
    // Read (0), nothing else; exit-reason high bits other than 31 are ignored.
    let f = decode_vmx_exit(48 | (1 << 27), 0x1, GPA, GLA).unwrap();
    assert_eq!(f.access, Access::READ);
    assert_eq!(f.kind, FaultKind::NotPresent);
    assert_eq!(f.gla, None);
    // Read + write (guest A/D update touching a not-present page).
    let f = decode_ept_violation(0x3, GPA, 0).unwrap();
    assert_eq!(f.access, Access::READ | Access::WRITE);
}

#[test]
fn vmx_non_faults_and_misconfig() {
    assert_eq!(
        decode_vmx_exit(49, 0, GPA, 0),
        Err(DecodeError::EptMisconfig { gpa: GPA })
    );
    assert_eq!(
        decode_vmx_exit(30, 0x182, GPA, 0),
        Err(DecodeError::NotAFault)
    );
    assert_eq!(
        decode_vmx_exit(48 | (1 << 31), 0x182, GPA, 0),
        Err(DecodeError::NotAFault)
    );
    assert_eq!(
        decode_vmx_exit(48, 0x180, GPA, 0),
        Err(DecodeError::NoAccess {
            qualification: 0x180
        })
    );
}

#[test]
fn npf_cases() {
    // Not present (P=0), write (1), user (2), final translation (32).
    let f = decode_svm_exit(0x400, 0x1_0000_0006, GPA).unwrap();
    assert_eq!(f.access, Access::WRITE);
    assert_eq!(f.kind, FaultKind::NotPresent);
    assert!(!f.guest_walk && !f.nmi_unblocking);
    assert_eq!(f.gla, None);
    assert_eq!(f.gpa, GPA);
    // Present read during the guest's page-table walk (33).
    let f = decode_svm_exit(0x400, 0x2_0000_0005, GPA).unwrap();
    assert_eq!(f.access, Access::READ);
    assert_eq!(f.kind, FaultKind::Permission);
    assert!(f.guest_walk);
    // Instruction fetch (4) on a present (NX) page.
    let f = decode_npf(0x1_0000_0015, GPA).unwrap();
    assert_eq!(f.access, Access::EXEC);
    assert_eq!(f.kind, FaultKind::Permission);
    // Reserved bit (3): misconfiguration, not a fault for the memory model.
    assert_eq!(
        decode_svm_exit(0x400, 0x1_0000_000d, GPA),
        Err(DecodeError::NptMisconfig { gpa: GPA })
    );
    // Other exit codes (0x4e = #PF intercept, 0x7b = IOIO).
    assert_eq!(decode_svm_exit(0x4e, 0x6, GPA), Err(DecodeError::NotAFault));
    assert_eq!(decode_svm_exit(0x7b, 0x6, GPA), Err(DecodeError::NotAFault));
}

#[test]
fn entry_helpers_never_panic_on_odd_levels() {
    for level in [0usize, 1, 4, 5, 9, usize::MAX] {
        let e = EptEntry::leaf(level, u64::MAX, S2Perms::RWX, MemType::WriteBack);
        let _ = (
            e.split_child(level, u64::MAX),
            e.leaf_address(level),
            e.is_leaf(level),
        );
        let n = NptEntry::leaf(level, u64::MAX, S2Perms::RWX, MemType::WriteBack);
        let _ = (
            n.split_child(level, u64::MAX),
            n.leaf_address(level),
            n.mem_type(level),
        );
    }
    let e = EptEntry::leaf(2, 0x20_0000, S2Perms::RWX, MemType::WriteBack);
    assert_eq!(e.split_child(1, 0), e);
    assert_eq!(e.split_child(2, 512 + 1), e.split_child(2, 1));
}
