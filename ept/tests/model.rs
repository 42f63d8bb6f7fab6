//! Random operation sequences (map at all three sizes, unmap, protect, query, flush, hardware
//! accesses through `hw_touch`, dirty harvests) against a simple reference model, for both
//! formats (EPT with and without A/D). The model is a `BTreeMap` of leaves keyed by gpa, each
//! with its accessed / dirty state; it splits large leaves the way the `Stage2` contract
//! specifies (down to the level where the range boundary is aligned, only when needed: for
//! `protect` when the permissions differ, for a harvest when the leaf is dirty), so page sizes,
//! A/D bits, `AlreadyExists` outcomes, page counts, the pages each harvest reports and the exact
//! number of table frames are all compared. The model holds *effective* perms: the table's
//! write gates (`table/gate.rs`: a write-protect may close a non-leaf entry instead of changing
//! its leaves) must be invisible in every query, leaf walk, `map` result and `hw_touch`. A
//! `protect` count is checked against its contract (`Stage2::protect`: exact with write,
//! otherwise an upper bound never above the range, 0 exactly when the model changed nothing),
//! and each format's run must have closed some gate. Every sequence ends by unmapping
//! everything: only the root frame may remain, and nothing after drop.

use std::collections::{BTreeMap, BTreeSet};

use ept::entry::EntryFormat;
use ept::*;
use proptest::prelude::*;

const K4: u64 = PAGE_SIZE;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;

/// Regions the addresses fall into: low memory, four 1 GiB slots straddling the 512 GiB
/// (PML4 entry) boundary, and the top of the 48-bit space.
const REGIONS: [u64; 3] = [0, (1 << 39) - 2 * G1, GPA_LIMIT - 4 * G1];
const REGION_LEN: u64 = 4 * G1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Leaf {
    size: u64,
    pa: u64,
    perms: S2Perms,
    mem_type: MemType,
    accessed: bool,
    dirty: bool,
}

#[derive(Default)]
struct Model {
    leaves: BTreeMap<u64, Leaf>,
    /// Whether the table keeps accessed/dirty state (EPT: the EPTP's A/D bit; NPT: always).
    ad: bool,
}

/// The permission an access needs: fetch → execute, write → write, otherwise read.
fn needed(access: Access) -> S2Perms {
    if access.contains(Access::EXEC) {
        S2Perms::EXEC
    } else if access.contains(Access::WRITE) {
        S2Perms::WRITE
    } else {
        S2Perms::READ
    }
}

/// A leaf as compared: gpa, pa, size, perms, memory type, accessed, dirty.
type Tuple = (u64, u64, PageSize, S2Perms, MemType, bool, bool);

fn tuple(gpa: u64, l: &Leaf) -> Tuple {
    (
        gpa,
        l.pa,
        page_size(l.size),
        l.perms,
        l.mem_type,
        l.accessed,
        l.dirty,
    )
}

fn size_of(s: PageSize) -> u64 {
    s.bytes()
}
fn page_size(bytes: u64) -> PageSize {
    match bytes {
        K4 => PageSize::Size4K,
        M2 => PageSize::Size2M,
        _ => PageSize::Size1G,
    }
}

impl Model {
    fn containing(&self, addr: u64) -> Option<(u64, Leaf)> {
        self.leaves
            .range(..=addr)
            .next_back()
            .filter(|(g, l)| addr < *g + l.size)
            .map(|(g, l)| (*g, *l))
    }

    fn map(&mut self, gpa: u64, mut leaf: Leaf) -> Result<Option<Leaf>, Error> {
        // A leaf installed writable counts as written until the next harvest.
        leaf.dirty = self.ad && leaf.perms.contains(S2Perms::WRITE);
        if let Some(old) = self.leaves.get(&gpa).copied() {
            if old.size == leaf.size {
                // Replacing a dirty leaf by one for the same frame keeps its dirty state.
                leaf.dirty |= old.dirty && old.pa == leaf.pa;
                self.leaves.insert(gpa, leaf);
                return Ok(Some(old));
            }
        }
        if self.containing(gpa).is_some()
            || self.leaves.range(gpa..gpa + leaf.size).next().is_some()
        {
            return Err(Error::AlreadyExists);
        }
        self.leaves.insert(gpa, leaf);
        Ok(None)
    }

    fn split_at(&mut self, addr: u64, wanted: &dyn Fn(&Leaf) -> bool) {
        while let Some((g, l)) = self.containing(addr) {
            if g == addr || !wanted(&l) {
                return;
            }
            self.leaves.remove(&g);
            let child = l.size / 512;
            for i in 0..512 {
                self.leaves.insert(
                    g + i * child,
                    Leaf {
                        size: child,
                        pa: l.pa + i * child,
                        ..l
                    },
                );
            }
        }
    }

    fn unmap(&mut self, start: u64, end: u64) -> u64 {
        self.split_at(start, &|_| true);
        self.split_at(end, &|_| true);
        let keys: Vec<u64> = self.leaves.range(start..end).map(|(g, _)| *g).collect();
        keys.iter()
            .map(|g| self.leaves.remove(g).unwrap().size / K4)
            .sum()
    }

    fn protect(&mut self, start: u64, end: u64, perms: S2Perms) -> u64 {
        self.split_at(start, &|l| l.perms != perms);
        self.split_at(end, &|l| l.perms != perms);
        let mut changed = 0;
        let ad = self.ad;
        for (_, l) in self.leaves.range_mut(start..end) {
            if l.perms != perms {
                // Made writable: counts as written until the next harvest.
                l.dirty |=
                    ad && !l.perms.contains(S2Perms::WRITE) && perms.contains(S2Perms::WRITE);
                l.perms = perms;
                changed += l.size / K4;
            }
        }
        changed
    }

    /// The MMU's walk for `access`: sets A (and D on a write) when the leaf permits it.
    fn touch(&mut self, addr: u64, access: Access) -> Option<Tuple> {
        let (g, _) = self.containing(addr)?;
        let ad = self.ad;
        let l = self.leaves.get_mut(&g).unwrap();
        if ad && l.perms.contains(needed(access)) {
            l.accessed = true;
            l.dirty |= access.contains(Access::WRITE);
        }
        self.query(addr)
    }

    /// Reports and cleans the dirty pages of `[start, end)`, splitting dirty leaves that
    /// straddle an end first.
    fn harvest(&mut self, start: u64, end: u64) -> Result<Vec<u64>, Error> {
        if !self.ad {
            return Err(Error::NotSupported);
        }
        self.split_at(start, &|l| l.dirty);
        self.split_at(end, &|l| l.dirty);
        let mut pages = Vec::new();
        for (g, l) in self.leaves.range_mut(start..end) {
            if l.dirty {
                l.dirty = false;
                pages.extend((0..l.size / K4).map(|k| g + k * K4));
            }
        }
        Ok(pages)
    }

    fn query(&self, addr: u64) -> Option<Tuple> {
        self.containing(addr).map(|(g, l)| tuple(g, &l))
    }

    /// Root, plus one PDPT per used PML4 slot, one PD per 1 GiB slot holding smaller leaves,
    /// one PT per 2 MiB slot holding 4 KiB leaves.
    fn expected_frames(&self) -> usize {
        let mut pdpt = BTreeSet::new();
        let mut pd = BTreeSet::new();
        let mut pt = BTreeSet::new();
        for (g, l) in &self.leaves {
            pdpt.insert(g >> 39);
            if l.size <= M2 {
                pd.insert(g >> 30);
            }
            if l.size == K4 {
                pt.insert(g >> 21);
            }
        }
        1 + pdpt.len() + pd.len() + pt.len()
    }
}

fn check_range(gpa: u64, len: u64) -> Result<u64, Error> {
    if !gpa.is_multiple_of(K4) || !len.is_multiple_of(K4) || len == 0 {
        return Err(Error::InvalidArgs);
    }
    match gpa.checked_add(len) {
        Some(end) if end <= GPA_LIMIT => Ok(end),
        _ => Err(Error::OutOfRange),
    }
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        gpa: u64,
        pa: u64,
        size: PageSize,
        perms: S2Perms,
        mem_type: MemType,
    },
    Unmap {
        gpa: u64,
        len: u64,
    },
    Protect {
        gpa: u64,
        len: u64,
        perms: S2Perms,
    },
    Query {
        gpa: u64,
    },
    /// A guest access through the MMU (`hw_touch`).
    Touch {
        gpa: u64,
        access: Access,
    },
    Harvest {
        gpa: u64,
        len: u64,
    },
    Flush,
}

/// An address inside one of the regions, on a 1G/2M/4K grid that makes collisions likely.
fn arb_addr() -> impl Strategy<Value = u64> {
    (
        0..REGIONS.len(),
        0u64..4,
        prop_oneof![Just(0u64), Just(1), Just(2), Just(511)],
        prop_oneof![Just(0u64), Just(1), Just(2), Just(511)],
    )
        .prop_map(|(r, g, m, k)| REGIONS[r] + g * G1 + m * M2 + k * K4)
}

fn arb_size() -> impl Strategy<Value = PageSize> {
    prop_oneof![
        3 => Just(PageSize::Size4K),
        2 => Just(PageSize::Size2M),
        1 => Just(PageSize::Size1G),
    ]
}

fn arb_perms() -> impl Strategy<Value = S2Perms> {
    prop_oneof![
        Just(S2Perms::READ),
        Just(S2Perms::RW),
        Just(S2Perms::READ | S2Perms::EXEC),
        Just(S2Perms::RWX),
    ]
}

fn arb_mem_type() -> impl Strategy<Value = MemType> {
    prop_oneof![
        4 => Just(MemType::WriteBack),
        1 => Just(MemType::Uncacheable),
        1 => Just(MemType::WriteThrough),
    ]
}

fn arb_len() -> impl Strategy<Value = u64> {
    prop_oneof![
        (1u64..5).prop_map(|n| n * K4),
        Just(M2),
        Just(M2 + K4),
        Just(511 * K4),
        Just(G1),
        Just(G1 + M2 + K4),
        Just(3 * G1),
    ]
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (arb_addr(), any::<u64>(), arb_size(), arb_perms(), arb_mem_type()).prop_map(
            |(gpa, pa, size, perms, mem_type)| {
                let bytes = size.bytes();
                Op::Map {
                    gpa: gpa & !(bytes - 1),
                    pa: pa & (PA_LIMIT - 1) & !(bytes - 1),
                    size,
                    perms,
                    mem_type,
                }
            }
        ),
        2 => (arb_addr(), arb_len()).prop_map(|(gpa, len)| Op::Unmap { gpa, len }),
        2 => (arb_addr(), arb_len(), arb_perms())
            .prop_map(|(gpa, len, perms)| Op::Protect { gpa, len, perms }),
        2 => (arb_addr(), 0u64..K4).prop_map(|(gpa, off)| Op::Query { gpa: gpa + off }),
        3 => (
            arb_addr(),
            0u64..K4,
            prop_oneof![
                Just(Access::READ),
                Just(Access::WRITE),
                Just(Access::READ | Access::EXEC)
            ]
        )
            .prop_map(|(gpa, off, access)| Op::Touch {
                gpa: gpa + off,
                access
            }),
        2 => (arb_addr(), arb_len()).prop_map(|(gpa, len)| Op::Harvest { gpa, len }),
        1 => Just(Op::Flush),
    ]
}

fn tr_tuple(t: Translation) -> Tuple {
    (
        t.gpa, t.pa, t.size, t.perms, t.mem_type, t.accessed, t.dirty,
    )
}

fn compare_all<E: EntryFormat>(
    t: &Stage2Table<E, &HeapPhysMem>,
    model: &Model,
) -> Result<(), TestCaseError> {
    let got: Vec<_> = t
        .leaves(0, GPA_LIMIT)
        .unwrap()
        .into_iter()
        .map(tr_tuple)
        .collect();
    let want: Vec<_> = model.leaves.iter().map(|(g, l)| tuple(*g, l)).collect();
    prop_assert_eq!(got, want);
    Ok(())
}

fn run<E: EntryFormat>(
    mut t: Stage2Table<E, &HeapPhysMem>,
    mem: &HeapPhysMem,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let mut model = Model {
        ad: t.access_dirty() == AccessDirty::Enabled,
        ..Model::default()
    };
    for (n, op) in ops.iter().enumerate() {
        match *op {
            Op::Map {
                gpa,
                pa,
                size,
                perms,
                mem_type,
            } => {
                let leaf = Leaf {
                    size: size_of(size),
                    pa,
                    perms,
                    mem_type,
                    accessed: false,
                    dirty: false,
                };
                let want = model.map(gpa, leaf);
                let got = t.map(gpa, pa, size, perms, mem_type);
                let got = got.map(|o| o.map(tr_tuple));
                let want = want.map(|o| o.map(|l| tuple(gpa, &l)));
                prop_assert_eq!(got, want, "op {}: {:?}", n, op);
            }
            Op::Unmap { gpa, len } => {
                let want = check_range(gpa, len).map(|end| model.unmap(gpa, end));
                let got = t.unmap(gpa, len);
                prop_assert_eq!(got, want, "op {}: {:?}", n, op);
                if matches!(got, Ok(c) if c > 0) {
                    prop_assert!(t.flush_pending());
                }
            }
            Op::Protect { gpa, len, perms } => {
                let want = check_range(gpa, len).map(|end| model.protect(gpa, end, perms));
                let got = t.protect(gpa, len, perms);
                match (got, want) {
                    // The count's contract (`Stage2::protect`): an upper bound, never above
                    // the range's pages, 0 exactly when nothing changed, exact with write.
                    (Ok(g), Ok(w)) => {
                        prop_assert!(
                            g >= w && g <= len / K4,
                            "op {}: {:?}: {} vs {}",
                            n,
                            op,
                            g,
                            w
                        );
                        prop_assert_eq!(g == 0, w == 0, "op {}: {:?}", n, op);
                        if perms.contains(S2Perms::WRITE) {
                            prop_assert_eq!(g, w, "op {}: {:?}", n, op);
                        }
                        if !perms.contains(S2Perms::WRITE) {
                            CLOSED_GATES.with(|c| {
                                c.set(c.get() + closed_gates::<E>(mem, t.page_table().root(), 4))
                            });
                        }
                    }
                    _ => prop_assert_eq!(got, want, "op {}: {:?}", n, op),
                }
                if matches!(got, Ok(c) if c > 0) {
                    prop_assert!(t.flush_pending());
                }
            }
            Op::Query { gpa } => {
                prop_assert_eq!(t.query(gpa).map(tr_tuple), model.query(gpa), "op {}", n);
            }
            Op::Touch { gpa, access } => {
                let got = t.hw_touch(gpa, access).map(tr_tuple);
                prop_assert_eq!(got, model.touch(gpa, access), "op {}: {:?}", n, op);
            }
            Op::Harvest { gpa, len } => {
                // No A/D state is `NotSupported` whatever the range (as the trait default).
                let want = if model.ad {
                    check_range(gpa, len).and_then(|end| model.harvest(gpa, end))
                } else {
                    Err(Error::NotSupported)
                };
                let mut got = vec![0xdead];
                let count = t.harvest_dirty(gpa, len, &mut got);
                let appended = got.split_off(1);
                prop_assert_eq!(got, vec![0xdead], "op {}: appends only", n);
                match want {
                    Ok(pages) => {
                        prop_assert_eq!(count, Ok(pages.len() as u64), "op {}: {:?}", n, op);
                        prop_assert_eq!(appended, pages, "op {}: {:?}", n, op);
                        // Every cleared dirty bit leaves a flush pending.
                        if count != Ok(0) {
                            prop_assert!(t.flush_pending(), "op {}", n);
                        }
                    }
                    Err(e) => {
                        prop_assert_eq!(count, Err(e), "op {}: {:?}", n, op);
                        prop_assert!(appended.is_empty());
                    }
                }
            }
            Op::Flush => {
                t.flush(FlushScope::Context);
                prop_assert_eq!(t.retired_frames(), 0);
            }
        }
        prop_assert_eq!(
            t.table_frames(),
            model.expected_frames(),
            "op {}: {:?}",
            n,
            op
        );
        prop_assert_eq!(mem.live_frames(), t.table_frames() + t.retired_frames());
        if let Err(e) = t.check_invariants() {
            prop_assert!(false, "op {}: {:?}: {}", n, op, e);
        }
        if n % 16 == 15 {
            compare_all(&t, &model)?;
        }
    }
    compare_all(&t, &model)?;
    // Unmap everything: every table frame is released after the flush.
    let mut total = 0;
    for r in REGIONS {
        total += t.unmap(r, REGION_LEN).unwrap();
    }
    let mapped: u64 = model.leaves.values().map(|l| l.size / K4).sum();
    prop_assert_eq!(total, mapped);
    t.flush(FlushScope::Context);
    prop_assert_eq!(t.table_frames(), 1);
    prop_assert_eq!(mem.live_frames(), 1);
    prop_assert!(t.leaves(0, GPA_LIMIT).unwrap().is_empty());
    drop(t);
    prop_assert_eq!(mem.live_frames(), 0);
    prop_assert_eq!(mem.bad_frees(), 0);
    Ok(())
}

/// Operations per sequence; with 64 cases per format this is over 10,000 operations per run.
const OPS: usize = 100;

thread_local! {
    /// Closed write gates seen after write-protects, summed over this thread's sequences: the
    /// generator must reach the hierarchical write-protect (`table/gate.rs`), or the model
    /// comparison would not cover it.
    static CLOSED_GATES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Non-leaf entries below `table` (at `level`) whose gate withholds write, read from the raw
/// table frames.
fn closed_gates<E: EntryFormat>(mem: &HeapPhysMem, table: u64, level: usize) -> u64 {
    let mut n = 0;
    for i in 0..512 {
        // SAFETY: `table` is a frame of the live table (the root, then frames named by
        // present non-leaf entries), `i < 512` stays inside it, and the test thread is the
        // only one using the table.
        let e = E::from_raw(unsafe { mem.frame_ptr(table).add(i).read() });
        if level > 1 && e.is_present() && !e.is_leaf(level) {
            n += u64::from(!e.perms().contains(S2Perms::WRITE));
            n += closed_gates::<E>(mem, e.table_address(), level - 1);
        }
    }
    n
}

/// Runs 64 random sequences on tables from `make` and checks that write gates were closed.
fn check_format<E: EntryFormat>(
    make: for<'a> fn(&'a HeapPhysMem) -> Stage2Table<E, &'a HeapPhysMem>,
) {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
    let strategy = proptest::collection::vec(arb_op(), OPS..OPS + 1);
    let result = runner.run(&strategy, |ops| {
        let mem = HeapPhysMem::new();
        run(make(&mem), &mem, &ops)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(
        CLOSED_GATES.with(|c| c.get()) > 0,
        "no sequence write-protected a subtree through its gate"
    );
}

#[test]
fn ept_matches_model() {
    check_format::<EptEntry>(|mem| {
        EptTable::with_invalidate(mem, CountingInvalidate::default(), AccessDirty::Enabled).unwrap()
    });
}

/// EPT without A/D: no dirty state anywhere, harvests are `NotSupported`.
#[test]
fn ept_without_ad_matches_model() {
    check_format::<EptEntry>(|mem| EptTable::new(mem).unwrap());
}

#[test]
fn npt_matches_model() {
    check_format::<NptEntry>(|mem| NptTable::new(mem).unwrap());
}

/// Deterministic large-page split cases on both formats.
#[test]
fn large_page_splits() {
    fn check<E: EntryFormat>(mut t: Stage2Table<E, &HeapPhysMem>, mem: &HeapPhysMem) {
        let rw = S2Perms::RW;
        t.map(G1, 0x4000_0000, PageSize::Size1G, rw, MemType::WriteBack)
            .unwrap();
        // Protect one 4 KiB page in the middle: 1G → 512×2M, the 2M holding it → 512×4K.
        assert_eq!(t.protect(G1 + 5 * M2 + 7 * K4, K4, S2Perms::READ), Ok(1));
        assert_eq!(t.table_frames(), 4);
        let q = t.query(G1 + 5 * M2 + 7 * K4).unwrap();
        assert_eq!(
            (q.size, q.perms, q.pa),
            (
                PageSize::Size4K,
                S2Perms::READ,
                0x4000_0000 + 5 * M2 + 7 * K4
            )
        );
        let q = t.query(G1 + 5 * M2 + 8 * K4).unwrap();
        assert_eq!((q.size, q.perms), (PageSize::Size4K, rw));
        let q = t.query(G1 + 6 * M2).unwrap();
        assert_eq!(
            (q.gpa, q.size, q.perms, q.pa),
            (G1 + 6 * M2, PageSize::Size2M, rw, 0x4000_0000 + 6 * M2)
        );
        assert_eq!(t.leaves(G1, G1).unwrap().len(), 511 + 512);
        // Unmap a range cutting 2M leaves at both ends.
        assert_eq!(t.unmap(G1 + 10 * M2 + K4, 3 * M2), Ok(3 * 512));
        assert_eq!(t.table_frames(), 6);
        assert!(t.query(G1 + 10 * M2 + K4).is_none());
        assert_eq!(t.query(G1 + 10 * M2).unwrap().size, PageSize::Size4K);
        assert_eq!(t.query(G1 + 13 * M2 + K4).unwrap().size, PageSize::Size4K);
        assert_eq!(t.query(G1 + 14 * M2).unwrap().size, PageSize::Size2M);
        // Unmap the remaining pieces page by page from one 4K table: it is freed at the end.
        assert_eq!(t.unmap(G1 + 10 * M2, K4), Ok(1));
        assert_eq!(t.table_frames(), 5);
        assert_eq!(t.unmap(G1, G1), Ok(512 * 512 - 1 - 3 * 512));
        t.flush(FlushScope::Context);
        assert_eq!((t.table_frames(), mem.live_frames()), (1, 1));
    }
    let mem = HeapPhysMem::new();
    check(EptTable::new(&mem).unwrap(), &mem);
    check(NptTable::new(&mem).unwrap(), &mem);
    assert_eq!(mem.live_frames(), 0);
}
