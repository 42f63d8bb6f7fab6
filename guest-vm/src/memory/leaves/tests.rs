//! Unit tests of `LeafIndex`: splits, tracking state, extents, and random traffic against a
//! page-level model.

use super::*;

const M2: u64 = 2 << 20;

fn leaf(pa: u64, size: PageSize, perms: S2Perms) -> Leaf {
    Leaf {
        pa,
        size,
        perms,
        mem_type: MemType::WriteBack,
        track: Track::Unarmed,
    }
}

#[test]
fn split_refines_a_large_leaf_and_keeps_the_indexes() {
    let mut ix = LeafIndex::default();
    ix.put(M2, leaf(4 * M2, PageSize::Size2M, S2Perms::RW));
    let got = ix.split_range(M2 + PAGE_SIZE, PAGE_SIZE);
    assert_eq!(
        got,
        vec![(
            M2 + PAGE_SIZE,
            leaf(4 * M2 + PAGE_SIZE, PageSize::Size4K, S2Perms::RW)
        )]
    );
    assert_eq!(ix.len(), 512);
    assert_eq!(ix.pages(), 512);
    ix.check_invariants();
    ix.mark_read_only(M2, M2);
    assert!(!ix.any_writable_in(0, 4 * M2));
    ix.check_invariants();
    ix.set_perms_in(M2, PAGE_SIZE, S2Perms::RWX);
    assert!(!ix.read_only_is_plain() || ix.any_writable_in(M2, PAGE_SIZE));
    ix.check_invariants();
    assert_eq!(ix.covering(M2 + 5).unwrap().0, M2);
    assert_eq!(ix.overlapping(0, M2), None);
}

#[test]
fn armed_follows_write_permission_and_survives_splits() {
    let mut ix = LeafIndex::default();
    ix.put(M2, leaf(4 * M2, PageSize::Size2M, S2Perms::RW));
    ix.put(0, leaf(0, PageSize::Size4K, S2Perms::READ));
    ix.put(PAGE_SIZE, leaf(PAGE_SIZE, PageSize::Size4K, S2Perms::RW));
    ix.retrack_in(0, 2 * M2, |_| Track::Armed);
    let armed: Vec<(u64, bool)> = ix
        .writable_in(0, 2 * M2)
        .map(|(s, l)| (s, l.track == Track::Armed))
        .collect();
    assert_eq!(armed, vec![(PAGE_SIZE, true), (M2, true)]);
    assert!(
        ix.covering(0).unwrap().1.track != Track::Armed,
        "read-only leaves are never armed"
    );
    // Splitting keeps the state; a perms change that keeps WRITE keeps it too.
    ix.split_range(M2 + PAGE_SIZE, PAGE_SIZE);
    assert!(ix.covering(M2 + 9 * PAGE_SIZE).unwrap().1.track == Track::Armed);
    ix.set_perms_in(M2, PAGE_SIZE, S2Perms::RWX);
    assert!(ix.covering(M2).unwrap().1.track == Track::Armed);
    // Losing WRITE disarms, and regaining it does not re-arm.
    ix.set_perms_in(M2 + PAGE_SIZE, PAGE_SIZE, S2Perms::READ);
    ix.set_perms_in(M2 + PAGE_SIZE, PAGE_SIZE, S2Perms::RW);
    assert!(ix.covering(M2 + PAGE_SIZE).unwrap().1.track != Track::Armed);
    ix.mark_read_only(PAGE_SIZE, PAGE_SIZE);
    assert!(ix.covering(PAGE_SIZE).unwrap().1.track != Track::Armed);
    ix.check_invariants();
}

/// Random put / take / split / protect traffic against a page-level model: after every
/// step the invariants hold and every page's record matches the model.
#[test]
fn matches_a_page_model_under_random_traffic() {
    const PAGES: u64 = 2048;
    let mut ix = LeafIndex::default();
    let mut model: BTreeMap<u64, S2Perms> = BTreeMap::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..2_000 {
        let r = next();
        let page = r % PAGES;
        let perms = [S2Perms::READ, S2Perms::RW, S2Perms::RWX][(r >> 20) as usize % 3];
        let len = (1 + next() % 600).min(PAGES - page);
        match (r >> 16) % 5 {
            0 if ix.overlapping(page * PAGE_SIZE, PAGE_SIZE).is_none() => {
                ix.put(
                    page * PAGE_SIZE,
                    leaf(page * PAGE_SIZE, PageSize::Size4K, perms),
                );
                model.insert(page, perms);
            }
            1 => {
                let slot = (page / 512) * 512;
                if ix.overlapping(slot * PAGE_SIZE, M2).is_none() {
                    ix.put(
                        slot * PAGE_SIZE,
                        leaf(slot * PAGE_SIZE, PageSize::Size2M, perms),
                    );
                    model.extend((slot..slot + 512).map(|p| (p, perms)));
                }
            }
            2 => {
                for (s, _) in ix.split_range(page * PAGE_SIZE, len * PAGE_SIZE) {
                    ix.take(s);
                }
                for p in page..page + len {
                    model.remove(&p);
                }
            }
            3 if ix.read_only_is_plain() => {
                ix.split_range(page * PAGE_SIZE, len * PAGE_SIZE);
                ix.mark_read_only(page * PAGE_SIZE, len * PAGE_SIZE);
                for p in page..page + len {
                    model.entry(p).and_modify(|m| *m = S2Perms::READ);
                }
            }
            _ => {
                ix.split_range(page * PAGE_SIZE, len * PAGE_SIZE);
                ix.set_perms_in(page * PAGE_SIZE, len * PAGE_SIZE, perms);
                for p in page..page + len {
                    model.entry(p).and_modify(|m| *m = perms);
                }
            }
        }
        ix.check_invariants();
        for p in (0..PAGES).step_by(5) {
            let got = ix.covering(p * PAGE_SIZE).map(|(_, l)| l.perms);
            assert_eq!(got, model.get(&p).copied(), "page {p}");
        }
        assert_eq!(ix.pages(), model.len() as u64);
    }
}

#[test]
fn runs_are_one_extent_until_split_and_answer_per_leaf() {
    let mut ix = LeafIndex::default();
    ix.put_run(0, 8 * M2, 64, S2Perms::RW, MemType::WriteBack);
    // A single leaf continuing the run joins it; one over another frame does not.
    ix.put(
        64 * PAGE_SIZE,
        leaf(8 * M2 + 64 * PAGE_SIZE, PageSize::Size4K, S2Perms::RW),
    );
    ix.put(65 * PAGE_SIZE, leaf(0, PageSize::Size4K, S2Perms::RW));
    assert_eq!((ix.len(), ix.pages()), (2, 66));
    let (s, l) = ix.covering(10 * PAGE_SIZE + 7).unwrap();
    assert_eq!((s, l.pa), (10 * PAGE_SIZE, 8 * M2 + 10 * PAGE_SIZE));
    assert_eq!(ix.overlapping(0, M2).unwrap().0, 65 * PAGE_SIZE);
    assert_eq!(ix.range(3 * PAGE_SIZE, 2 * PAGE_SIZE).count(), 2);
    assert_eq!(ix.writable_in(5 * PAGE_SIZE, 3 * PAGE_SIZE).count(), 3);
    // Protect, arm, take and replace split it; the leaves stay exactly as recorded.
    ix.set_perms_in(8 * PAGE_SIZE, 8 * PAGE_SIZE, S2Perms::READ);
    ix.retrack_in(20 * PAGE_SIZE, 4 * PAGE_SIZE, |_| Track::Armed);
    assert_eq!(ix.take(30 * PAGE_SIZE).unwrap().pa, 8 * M2 + 30 * PAGE_SIZE);
    ix.put_run(40 * PAGE_SIZE, 2 * M2, 2, S2Perms::READ, MemType::WriteBack);
    ix.check_invariants();
    assert_eq!(ix.pages(), 65);
    assert_eq!(ix.covering(9 * PAGE_SIZE).unwrap().1.perms, S2Perms::READ);
    assert!(ix.covering(21 * PAGE_SIZE).unwrap().1.track == Track::Armed);
    assert!(ix.covering(24 * PAGE_SIZE).unwrap().1.track != Track::Armed);
    assert!(ix.covering(30 * PAGE_SIZE).is_none());
    assert_eq!(
        ix.covering(41 * PAGE_SIZE).unwrap().1.pa,
        2 * M2 + PAGE_SIZE
    );
    assert_eq!(ix.take_range(0, 66 * PAGE_SIZE), 65);
    assert_eq!(ix.len(), 0);
    ix.check_invariants();
}

#[test]
fn untracked_survives_disarm_and_ends_with_write_permission() {
    let mut ix = LeafIndex::default();
    ix.put_run(0, 0, 4, S2Perms::RW, MemType::WriteBack);
    ix.put(
        8 * PAGE_SIZE,
        leaf(8 * PAGE_SIZE, PageSize::Size4K, S2Perms::READ),
    );
    let untrack = |_| Track::Untracked;
    assert_eq!(ix.retrack_in(0, 2 * PAGE_SIZE, untrack), 2);
    assert_eq!(
        ix.retrack_in(0, 9 * PAGE_SIZE, untrack),
        2,
        "only writable leaves not untracked yet change"
    );
    assert_eq!(ix.covering(8 * PAGE_SIZE).unwrap().1.track, Track::Unarmed);
    ix.retrack_in(2 * PAGE_SIZE, 2 * PAGE_SIZE, |_| Track::Armed);
    // A failed harvest disarms armed leaves only.
    ix.disarm_in(0, 4 * PAGE_SIZE);
    let tracks: Vec<Track> = ix.range(0, 4 * PAGE_SIZE).map(|(_, l)| l.track).collect();
    assert_eq!(
        tracks,
        vec![
            Track::Untracked,
            Track::Untracked,
            Track::Unarmed,
            Track::Unarmed
        ]
    );
    // Keeping WRITE keeps it; losing WRITE or a replacement ends it.
    ix.set_perms_in(0, PAGE_SIZE, S2Perms::RWX);
    assert_eq!(ix.covering(0).unwrap().1.track, Track::Untracked);
    ix.set_perms_in(PAGE_SIZE, PAGE_SIZE, S2Perms::READ);
    ix.set_perms_in(PAGE_SIZE, PAGE_SIZE, S2Perms::RW);
    assert_eq!(ix.covering(PAGE_SIZE).unwrap().1.track, Track::Unarmed);
    ix.put(0, leaf(0, PageSize::Size4K, S2Perms::RWX));
    assert_eq!(ix.covering(0).unwrap().1.track, Track::Unarmed);
    ix.check_invariants();
}

/// `writable_tracks_in` answers per writable extent (not per page), clipped to the range,
/// skipping read-only records, with each extent's tracking.
#[test]
fn writable_extents_come_whole_and_clipped() {
    let mut ix = LeafIndex::default();
    // 512 writable pages over consecutive frames: one extent.
    ix.put_run(0, 8 * M2, 512, S2Perms::RW, MemType::WriteBack);
    ix.put(M2, leaf(0, PageSize::Size4K, S2Perms::READ));
    ix.put(2 * M2, leaf(4 * M2, PageSize::Size2M, S2Perms::RW));
    ix.retrack_in(2 * M2, M2, |_| Track::Armed);
    assert_eq!(ix.len(), 3);
    let got: Vec<_> = ix.writable_tracks_in(PAGE_SIZE, 2 * M2).collect();
    assert_eq!(
        got,
        vec![
            (PAGE_SIZE, M2 - PAGE_SIZE, Track::Unarmed),
            (2 * M2, PAGE_SIZE, Track::Armed)
        ]
    );
    let all: Vec<_> = ix.writable_extents_in(0, 8 * M2).collect();
    assert_eq!(all, vec![(0, M2), (2 * M2, M2)]);
    assert_eq!(ix.writable_extents_in(M2, PAGE_SIZE).count(), 0);
    ix.check_invariants();
}
