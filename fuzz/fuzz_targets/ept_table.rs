//! Fuzz target `ept_table`: byte-driven sequences of map (4K/2M/1G) / unmap / protect / query /
//! flush / table-frame exhaustion on `EptTable` or `NptTable` (first byte) over `HeapPhysMem`,
//! against a reference map of leaves that splits large pages exactly as the `Stage2` contract
//! says (only where a range boundary cuts them, only when the operation changes them).
//!
//! After every operation: the result equals the reference's; `check_invariants` holds; the
//! table holds exactly the frames the leaves need (root + one per used PML4 / 1 GiB / 2 MiB
//! slot) and the `HeapPhysMem` exactly those plus the retired ones. When exhaustion makes an
//! operation fail with `NoMemory`, `map` must have changed nothing; for a splitting unmap /
//! protect the reference is re-read from the table (whatever it kept must still satisfy every
//! invariant and the frame count). At the end everything is unmapped and dropped: 0 frames.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use ept::entry::EntryFormat;
use ept::*;
use libfuzzer_sys::fuzz_target;

const K4: u64 = PAGE_SIZE;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
const REGIONS: [u64; 3] = [0, (1 << 39) - 2 * G1, GPA_LIMIT - 4 * G1];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Leaf {
    size: u64,
    pa: u64,
    perms: S2Perms,
    mem_type: MemType,
}

fn page_size(bytes: u64) -> PageSize {
    match bytes {
        K4 => PageSize::Size4K,
        M2 => PageSize::Size2M,
        _ => PageSize::Size1G,
    }
}

#[derive(Default)]
struct Model {
    leaves: BTreeMap<u64, Leaf>,
}

impl Model {
    fn containing(&self, a: u64) -> Option<(u64, Leaf)> {
        let (g, l) = self.leaves.range(..=a).next_back()?;
        (a < g + l.size).then_some((*g, *l))
    }

    fn map(&mut self, gpa: u64, leaf: Leaf) -> Result<Option<Leaf>, Error> {
        if !gpa.is_multiple_of(leaf.size) || !leaf.pa.is_multiple_of(leaf.size) {
            return Err(Error::InvalidArgs);
        }
        if gpa >= GPA_LIMIT || leaf.pa >= PA_LIMIT {
            return Err(Error::OutOfRange);
        }
        if let Some(old) = self.leaves.get(&gpa).copied() {
            if old.size == leaf.size {
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

    /// Splits the leaf containing `a` (if `a` cuts it and `want` says so) down to the size at
    /// which `a` is a boundary.
    fn split_at(&mut self, a: u64, want: &dyn Fn(&Leaf) -> bool) {
        while let Some((g, l)) = self.containing(a) {
            if g == a || !want(&l) {
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

    fn unmap(&mut self, s: u64, e: u64) -> u64 {
        self.split_at(s, &|_| true);
        self.split_at(e, &|_| true);
        let keys: Vec<u64> = self.leaves.range(s..e).map(|(g, _)| *g).collect();
        keys.iter()
            .map(|g| self.leaves.remove(g).unwrap().size / K4)
            .sum()
    }

    fn protect(&mut self, s: u64, e: u64, perms: S2Perms) -> u64 {
        self.split_at(s, &|l| l.perms != perms);
        self.split_at(e, &|l| l.perms != perms);
        let mut n = 0;
        for (_, l) in self.leaves.range_mut(s..e) {
            if l.perms != perms {
                l.perms = perms;
                n += l.size / K4;
            }
        }
        n
    }

    fn frames(&self) -> usize {
        let (mut a, mut b, mut c) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        for (g, l) in &self.leaves {
            a.insert(g >> 39);
            if l.size <= M2 {
                b.insert(g >> 30);
            }
            if l.size == K4 {
                c.insert(g >> 21);
            }
        }
        1 + a.len() + b.len() + c.len()
    }
}

struct In<'a>(&'a [u8], usize);

impl In<'_> {
    fn b(&mut self) -> u8 {
        let v = self.0.get(self.1).copied().unwrap_or(0);
        self.1 += 1;
        v
    }
    fn done(&self) -> bool {
        self.1 >= self.0.len()
    }
    fn addr(&mut self) -> u64 {
        let grid = [0u64, 1, 2, 511];
        let base = REGIONS[self.b() as usize % 3] + (self.b() as u64 % 4) * G1;
        let a = base + grid[self.b() as usize % 4] * M2 + grid[self.b() as usize % 4] * K4;
        match self.b() % 16 {
            0 => a + 0x10,
            1 => GPA_LIMIT,
            2 => u64::MAX & !(K4 - 1),
            _ => a,
        }
    }
    fn len(&mut self) -> u64 {
        [
            K4,
            2 * K4,
            511 * K4,
            M2,
            M2 + K4,
            G1,
            G1 + M2 + K4,
            3 * G1,
            0,
            5,
            u64::MAX & !(K4 - 1),
            4 * K4,
        ][self.b() as usize % 12]
    }
    fn perms(&mut self) -> S2Perms {
        [
            S2Perms::READ,
            S2Perms::RW,
            S2Perms::READ | S2Perms::EXEC,
            S2Perms::RWX,
        ][self.b() as usize % 4]
    }
}

fn tuple(t: Translation) -> (u64, u64, PageSize, S2Perms, MemType) {
    (t.gpa, t.pa, t.size, t.perms, t.mem_type)
}

fn leaves_of<E: EntryFormat>(t: &Stage2Table<E, &HeapPhysMem>) -> BTreeMap<u64, Leaf> {
    t.leaves(0, GPA_LIMIT)
        .unwrap()
        .into_iter()
        .map(|x| {
            (
                x.gpa,
                Leaf {
                    size: x.size.bytes(),
                    pa: x.pa,
                    perms: x.perms,
                    mem_type: x.mem_type,
                },
            )
        })
        .collect()
}

fn run<E: EntryFormat>(mut t: Stage2Table<E, &HeapPhysMem>, mem: &HeapPhysMem, inp: &mut In) {
    let mut m = Model::default();
    let mut n = 0;
    while !inp.done() && n < 256 {
        n += 1;
        let kind = inp.b() % 16;
        let mut resync = false;
        match kind {
            0..=5 => {
                let size = [K4, K4, K4, M2, M2, G1][inp.b() as usize % 6];
                let gpa = inp.addr() & !(size - 1) | if inp.b() % 32 == 0 { K4 } else { 0 };
                let pa = (u64::from(inp.b()) << 21 | u64::from(inp.b()) << 30) & !(size - 1);
                let pa = if inp.b() % 32 == 0 { PA_LIMIT } else { pa };
                let mem_type = [
                    MemType::WriteBack,
                    MemType::WriteBack,
                    MemType::Uncacheable,
                    MemType::WriteThrough,
                ][inp.b() as usize % 4];
                let leaf = Leaf {
                    size,
                    pa,
                    perms: inp.perms(),
                    mem_type,
                };
                let got = t
                    .map(gpa, pa, page_size(size), leaf.perms, mem_type)
                    .map(|o| o.map(tuple));
                if got == Err(Error::NoMemory) {
                    assert_eq!(
                        leaves_of(&t),
                        m.leaves,
                        "a map that found no table frame changed the table"
                    );
                } else {
                    let want = m
                        .map(gpa, leaf)
                        .map(|o| o.map(|l| (gpa, l.pa, page_size(l.size), l.perms, l.mem_type)));
                    assert_eq!(got, want, "map({gpa:#x}, {pa:#x}, {size:#x})");
                }
            }
            6..=8 => {
                let (gpa, len) = (inp.addr(), inp.len());
                let got = t.unmap(gpa, len);
                match got {
                    Err(Error::NoMemory) => resync = true,
                    _ => {
                        let want = table::check_range(gpa, len).map(|e| m.unmap(gpa, e));
                        assert_eq!(got, want, "unmap({gpa:#x}, {len:#x})");
                    }
                }
            }
            9..=11 => {
                let (gpa, len, perms) = (inp.addr(), inp.len(), inp.perms());
                let got = t.protect(gpa, len, perms);
                match got {
                    Err(Error::NoMemory) => resync = true,
                    _ => {
                        let want = table::check_range(gpa, len).map(|e| m.protect(gpa, e, perms));
                        match (got, want) {
                            // `Stage2::protect`'s count: an upper bound (a subtree protected
                            // through its gate counts its span), within the range, 0 exactly
                            // when nothing changed, exact with write.
                            (Ok(g), Ok(w)) => {
                                let what = format!("protect({gpa:#x}, {len:#x}, {perms:?})");
                                assert!(g >= w && g <= len / 4096, "{what}: {g} vs {w}");
                                assert_eq!(g == 0, w == 0, "{what}");
                                if perms.contains(S2Perms::WRITE) {
                                    assert_eq!(g, w, "{what}");
                                }
                            }
                            _ => assert_eq!(got, want, "protect({gpa:#x}, {len:#x}, {perms:?})"),
                        }
                    }
                }
            }
            12 | 13 => {
                let gpa = inp.addr().wrapping_add(u64::from(inp.b()) * 8);
                let want = m
                    .containing(gpa)
                    .map(|(g, l)| (g, l.pa, page_size(l.size), l.perms, l.mem_type));
                assert_eq!(t.query(gpa).map(tuple), want, "query({gpa:#x})");
            }
            14 => {
                t.flush(FlushScope::Context);
                assert_eq!(t.retired_frames(), 0);
            }
            _ => match inp.b() % 4 {
                0 => mem.clear_limit(),
                k => mem.set_limit(mem.live_frames() + k as usize - 1),
            },
        }
        if resync {
            m.leaves = leaves_of(&t);
        }
        if let Err(e) = t.check_invariants() {
            panic!("op {n}: {e}");
        }
        assert_eq!(t.table_frames(), m.frames(), "op {n}: table frames");
        assert_eq!(
            mem.live_frames(),
            t.table_frames() + t.retired_frames(),
            "op {n}: live frames"
        );
        if n % 8 == 0 {
            assert_eq!(leaves_of(&t), m.leaves, "op {n}: leaves");
        }
    }
    mem.clear_limit();
    assert_eq!(leaves_of(&t), m.leaves);
    for r in REGIONS {
        t.unmap(r, 4 * G1).unwrap();
    }
    t.flush(FlushScope::Context);
    assert_eq!((t.table_frames(), mem.live_frames()), (1, 1));
    drop(t);
    assert_eq!((mem.live_frames(), mem.bad_frees()), (0, 0));
}

fuzz_target!(|data: &[u8]| {
    let mut inp = In(data, 0);
    let mem = HeapPhysMem::with_capacity(4096);
    if inp.b() & 1 == 0 {
        run(EptTable::new(&mem).unwrap(), &mem, &mut inp);
    } else {
        run(NptTable::new(&mem).unwrap(), &mem, &mut inp);
    }
});
