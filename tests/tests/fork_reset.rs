//! Fork and reset through the fault path, on every table backend: isolation against a model
//! with exact copy counts, reset, concurrent faults, dirty tracking, the DMA and shared-mapping
//! fork policies, and frame accounting.

use conformance::{for_each_backend, Backend, Rng, SoftCpu};
use std::collections::HashMap;
use vmo::{MapOptions, VmPerms, Vmar, Vmo, VmoFlags};

const P: u64 = vmo::PAGE_SIZE;
const PAGES: u64 = 64;

/// The sharing model: which frame each space's page uses, and who references each frame.
#[derive(Default)]
struct Model {
    /// Per space: page → frame id. Space i's reset point is `holders[i]`.
    spaces: Vec<HashMap<u64, u64>>,
    holders: Vec<HashMap<u64, u64>>,
    value: HashMap<u64, u8>,
    next_frame: u64,
    copies: u64,
    commits: u64,
}

impl Model {
    fn refs(&self, frame: u64) -> usize {
        self.spaces
            .iter()
            .chain(self.holders.iter())
            .flat_map(|m| m.values())
            .filter(|&&f| f == frame)
            .count()
    }
    fn write(&mut self, s: usize, page: u64, v: u8) {
        let frame = match self.spaces[s].get(&page).copied() {
            None => {
                self.commits += 1;
                self.next_frame += 1;
                self.next_frame
            }
            Some(f) if self.refs(f) > 1 => {
                self.copies += 1;
                self.next_frame += 1;
                self.next_frame
            }
            Some(f) => f,
        };
        self.spaces[s].insert(page, frame);
        self.value.insert(frame, v);
    }
    /// A guest read of an uncommitted page commits a zero frame (the fault path installs a
    /// real page so the next write needs no second fault when the page stays private).
    fn read(&mut self, s: usize, page: u64) -> u8 {
        if !self.spaces[s].contains_key(&page) {
            self.commits += 1;
            self.next_frame += 1;
            self.spaces[s].insert(page, self.next_frame);
            self.value.insert(self.next_frame, 0);
        }
        self.value[&self.spaces[s][&page]]
    }
    fn fork(&mut self, s: usize) -> usize {
        let snap = self.spaces[s].clone();
        self.spaces.push(snap.clone());
        self.holders.push(snap);
        self.spaces.len() - 1
    }
    fn live(&self) -> usize {
        let mut all: Vec<u64> = self
            .spaces
            .iter()
            .chain(self.holders.iter())
            .flat_map(|m| m.values().copied())
            .collect();
        all.sort();
        all.dedup();
        all.len()
    }
}

fn fork_isolation_matches_the_model<B: Backend>() {
    let pool = B::pool();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut model = Model::default();
    {
        let parent = Vmar::new_root(1 << 30, B::stage2(&pool)).unwrap();
        let ram = Vmo::new(&pool, PAGES * P, VmoFlags::empty()).unwrap();
        parent
            .map(&ram, 0, PAGES * P, MapOptions::specific(0, VmPerms::RW))
            .unwrap();
        let mut vmars = vec![parent];
        model.spaces.push(HashMap::new());
        model.holders.push(HashMap::new()); // the parent has no reset point: an empty holder
        for _ in 0..200 {
            let page = rng.below(PAGES);
            let v = rng.below(255) as u8 + 1;
            SoftCpu::new(&vmars[0], &pool)
                .write_u8(page * P + 5, v)
                .unwrap();
            model.write(0, page, v);
        }
        // 8 children of the parent, then 2 grandchildren under each of the first 3 children.
        for _ in 0..8 {
            let child = vmars[0].fork(B::stage2(&pool)).unwrap();
            vmars.push(child);
            model.fork(0);
        }
        for c in 1..4 {
            for _ in 0..2 {
                let g = vmars[c].fork(B::stage2(&pool)).unwrap();
                vmars.push(g);
                model.fork(c);
            }
        }
        assert_eq!(
            pool.stats().live as usize,
            model.live(),
            "forks copy nothing"
        );
        for step in 0..3000 {
            let s = rng.below(vmars.len() as u64) as usize;
            let page = rng.below(PAGES);
            let mut cpu = SoftCpu::new(&vmars[s], &pool);
            if rng.below(3) == 0 {
                assert_eq!(
                    cpu.read_u8(page * P + 5).unwrap(),
                    model.read(s, page),
                    "step {step} space {s} page {page}"
                );
            } else {
                let v = rng.below(255) as u8 + 1;
                cpu.write_u8(page * P + 5, v).unwrap();
                model.write(s, page, v);
            }
        }
        for (s, vmar) in vmars.iter().enumerate() {
            let mut cpu = SoftCpu::new(vmar, &pool);
            for page in 0..PAGES {
                assert_eq!(
                    cpu.read_u8(page * P + 5).unwrap(),
                    model.read(s, page),
                    "space {s} page {page}"
                );
            }
        }
        assert_eq!(pool.stats().cow_copies, model.copies, "copies are exact");
        let fault_copies: u64 = vmars.iter().map(|v| v.fault_stats().copies).sum();
        assert_eq!(fault_copies, model.copies);
        assert_eq!(
            pool.stats().live as usize,
            model.live(),
            "live frames are exact"
        );
        let commits: u64 = vmars.iter().map(|v| v.fault_stats().commits).sum();
        assert_eq!(commits, model.commits, "commits are exact");
        // Drop in an interleaved order; frames still referenced stay.
        while !vmars.is_empty() {
            let i = rng.below(vmars.len() as u64) as usize;
            vmars.remove(i);
        }
    }
    assert_eq!(pool.stats().live, 0);
}

fn reset_restores_the_snapshot_and_frees_dirtied_frames<B: Backend>() {
    let pool = B::pool();
    let parent = Vmar::new_root(1 << 30, B::stage2(&pool)).unwrap();
    let ram = Vmo::new(&pool, PAGES * P, VmoFlags::empty()).unwrap();
    parent
        .map(&ram, 0, PAGES * P, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    let mut pcpu = SoftCpu::new(&parent, &pool);
    for page in 0..PAGES / 2 {
        pcpu.write_u8(page * P, page as u8 + 1).unwrap();
    }
    let child = parent.fork(B::stage2(&pool)).unwrap();
    let live_at_fork = pool.stats().live;
    let mut rng = Rng(42);
    for round in 0..5 {
        let mut cpu = SoftCpu::new(&child, &pool);
        for _ in 0..100 {
            let page = rng.below(PAGES);
            cpu.write_u8(page * P + rng.below(P), 0xee).unwrap();
        }
        assert!(pool.stats().live > live_at_fork);
        let dropped = child.reset().unwrap();
        assert!(dropped > 0, "round {round}");
        assert_eq!(
            pool.stats().live,
            live_at_fork,
            "round {round}: dirtied frames freed"
        );
        let mut cpu = SoftCpu::new(&child, &pool);
        for page in 0..PAGES {
            let mut buf = vec![0u8; P as usize];
            cpu.read(page * P, &mut buf).unwrap();
            let want = if page < PAGES / 2 { page as u8 + 1 } else { 0 };
            assert_eq!(buf[0], want, "round {round} page {page}");
            assert!(
                buf[1..].iter().all(|&b| b == 0),
                "round {round} page {page}"
            );
        }
    }
    // The parent was never affected.
    assert_eq!(pcpu.read_u8(0).unwrap(), 1);
}

fn concurrent_faults_commit_once_copy_once<B: Backend>() {
    let pool = B::pool();
    let root = Vmar::new_root(1 << 30, B::stage2(&pool)).unwrap();
    let ram = Vmo::new(&pool, 16 * P, VmoFlags::empty()).unwrap();
    root.map(&ram, 0, 16 * P, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    let write_all = |vmar: &Vmar<B::S>| {
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let pool = &pool;
                s.spawn(move || {
                    let mut cpu = SoftCpu::new(vmar, pool);
                    for page in 0..16 {
                        cpu.write_u8(page * P + t, t as u8 + 10).unwrap();
                    }
                });
            }
        });
    };
    write_all(&root);
    assert_eq!(root.fault_stats().commits, 16, "one commit per page");
    assert_eq!(pool.stats().allocated, 16);
    let child = root.fork(B::stage2(&pool)).unwrap();
    // Parent's frames are shared now; children writing concurrently copy each page once.
    let before = pool.stats().cow_copies;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (pool, child) = (&pool, &child);
            s.spawn(move || {
                let mut cpu = SoftCpu::new(child, pool);
                for page in 0..16 {
                    cpu.write_u8(page * P + 8 + t, t as u8 + 20).unwrap();
                }
            });
        }
    });
    assert_eq!(pool.stats().cow_copies - before, 16, "one copy per page");
    let mut cpu = SoftCpu::new(&child, &pool);
    for page in 0..16 {
        for t in 0..4 {
            assert_eq!(
                cpu.read_u8(page * P + t).unwrap(),
                t as u8 + 10,
                "no lost write"
            );
            assert_eq!(
                cpu.read_u8(page * P + 8 + t).unwrap(),
                t as u8 + 20,
                "no lost write"
            );
        }
    }
}

fn fork_write_protects_the_parent_with_one_flush<B: Backend>() {
    let pool = B::pool();
    let root = Vmar::new_root(1 << 30, B::stage2(&pool)).unwrap();
    let a = Vmo::new(&pool, 8 * P, VmoFlags::empty()).unwrap();
    let b = Vmo::new(&pool, 8 * P, VmoFlags::empty()).unwrap();
    root.map(&a, 0, 8 * P, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    root.map(&b, 0, 8 * P, MapOptions::specific(16 * P, VmPerms::RW))
        .unwrap();
    let mut cpu = SoftCpu::new(&root, &pool);
    for page in (0..8).chain(16..24) {
        cpu.write_u8(page * P, 1).unwrap();
    }
    let flushes = root.with_stage2(|s| B::flushes(s));
    let _child = root.fork(B::stage2(&pool)).unwrap();
    assert_eq!(
        root.with_stage2(|s| B::flushes(s)),
        flushes + 1,
        "one flush for the whole fork"
    );
    for page in (0..8).chain(16..24) {
        let t = root
            .with_stage2(|s| ept::Stage2::query(s, page * P))
            .unwrap();
        assert!(
            !t.perms.contains(ept::S2Perms::WRITE),
            "page {page} write-protected"
        );
    }
    // The parent's next write copies (the child shares the frame) and lands privately.
    cpu.write_u8(0, 2).unwrap();
    assert_eq!(root.fault_stats().copies, 1);
}

fn shared_mappings_stay_shared_and_dma_is_copied<B: Backend>() {
    let pool = B::pool();
    let root = Vmar::new_root(1 << 30, B::stage2(&pool)).unwrap();
    let shm = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
    let dma = Vmo::new_contiguous(&pool, 4 * P, true).unwrap();
    dma.pin(0, 4 * P).unwrap();
    root.map(
        &shm,
        0,
        4 * P,
        MapOptions::specific(0, VmPerms::RW).shared(),
    )
    .unwrap();
    root.map(&dma, 0, 4 * P, MapOptions::specific(16 * P, VmPerms::RW))
        .unwrap();
    let mut cpu = SoftCpu::new(&root, &pool);
    cpu.write_u8(16 * P, 7).unwrap();
    let child = root.fork(B::stage2(&pool)).unwrap();
    let mut ccpu = SoftCpu::new(&child, &pool);
    ccpu.write_u8(0, 5).unwrap();
    assert_eq!(
        cpu.read_u8(0).unwrap(),
        5,
        "shared memory is shared with the fork"
    );
    assert_eq!(
        ccpu.read_u8(16 * P).unwrap(),
        7,
        "the DMA region was copied eagerly"
    );
    ccpu.write_u8(16 * P, 8).unwrap();
    assert_eq!(cpu.read_u8(16 * P).unwrap(), 7);
    let child_dma = child.query(16 * P).unwrap().vmo;
    assert!(!child_dma.same_object(&dma));
    assert!(
        !child_dma.has_pins(),
        "the copy is not assigned to any device"
    );
    for off in (0..4 * P).step_by(P as usize) {
        let frame = dma.committed_frame(off).unwrap().unwrap();
        assert_eq!(
            frame.ref_count(),
            2,
            "pinned frames are never shared: the array and this handle only"
        );
        assert_ne!(
            child_dma.committed_frame(off).unwrap().unwrap().paddr(),
            frame.paddr()
        );
    }
    let base = dma.contiguous_base().unwrap();
    assert_eq!(
        root.with_stage2(|s| ept::Stage2::query(s, 16 * P))
            .unwrap()
            .pa,
        base
    );
}

fn dirty_tracking_reports_exactly_the_written_pages<B: Backend>() {
    let pool = B::pool();
    let root = Vmar::new_root(1 << 30, B::stage2(&pool)).unwrap();
    let ram = Vmo::new(&pool, 32 * P, VmoFlags::empty()).unwrap();
    root.map(&ram, 0, 32 * P, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    let mut cpu = SoftCpu::new(&root, &pool);
    for page in 0..32 {
        cpu.write_u8(page * P, 1).unwrap(); // installed writable before tracking starts
    }
    root.enable_dirty_tracking().unwrap();
    for page in [3u64, 7, 8, 30] {
        cpu.write_u8(page * P + 9, 2).unwrap();
    }
    for page in [1u64, 2] {
        cpu.read_u8(page * P).unwrap();
    }
    assert_eq!(
        root.take_dirty().unwrap(),
        vec![3 * P, 7 * P, 8 * P, 30 * P]
    );
    cpu.write_u8(7 * P, 3).unwrap();
    cpu.write_u8(12 * P, 3).unwrap();
    assert_eq!(
        root.take_dirty().unwrap(),
        vec![7 * P, 12 * P],
        "after a clear only new writes count"
    );
    assert!(root.take_dirty().unwrap().is_empty());
}

for_each_backend!(
    fork_isolation_matches_the_model,
    reset_restores_the_snapshot_and_frees_dirtied_frames,
    concurrent_faults_commit_once_copy_once,
    fork_write_protects_the_parent_with_one_flush,
    shared_mappings_stay_shared_and_dma_is_copied,
    dirty_tracking_reports_exactly_the_written_pages,
);
