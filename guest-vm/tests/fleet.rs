//! Concurrent forks on the product path: ≥ 4 children of one snapshot, each its own VM on its
//! own vCPU thread, serving different request streams at the same time. Asserts isolation
//! against the model, that each child's private memory is exactly the table pages it wrote
//! plus only named pages (mailbox, guest stack, page tables), frame accounting, and zero live
//! frames at teardown. Skips with a printed reason without KVM (fails under
//! `GUESTMEM_REQUIRE_KVM=1`).

mod common;

use std::collections::BTreeSet;

use ept::{S2Perms, Stage2};
use guest_vm::vmm::x86_64::layout::DATA_GPA;
use guest_vm::workload::fleet;
use guest_vm::workload::kvstore::named_extra_pages;
use guest_vm::workload::kvstore::{memory_for, KvStore, BUCKET_SIZE};
use guest_vm::workload::model::TableModel;
use guest_vm::workload::streams::{self, FILL_FIRST};
use guest_vm::{Guest, HostFrames, PAGE_SIZE};

const BUCKETS: u64 = 1 << 15; // 2 MiB table
const KEYS: u64 = 18_000;
const CHILDREN: usize = 4;
const REQUESTS: u64 = 250;

/// Guest pages installed writable in `g`'s memslot (its private frames).
fn writable_pages(g: &Guest) -> BTreeSet<u64> {
    g.vmar().with_stage2(|s| {
        (0..g.mem_size() / PAGE_SIZE)
            .map(|p| p * PAGE_SIZE)
            .filter(|&gpa| {
                s.query(gpa)
                    .is_some_and(|t| t.perms.contains(S2Perms::WRITE))
            })
            .collect()
    })
}

#[test]
fn concurrent_children_are_isolated_and_hold_only_their_writes() {
    require_kvm!();
    let mem = memory_for(BUCKETS);
    let frames = HostFrames::new(mem * 8).unwrap();
    {
        let mut parent = KvStore::boot(Guest::new(&frames, mem).unwrap(), BUCKETS).unwrap();
        parent
            .inner()
            .prefault(DATA_GPA, BUCKETS * BUCKET_SIZE, true)
            .unwrap();
        assert_eq!(parent.fill(FILL_FIRST, KEYS).unwrap(), KEYS);
        let mut model = TableModel::new(BUCKETS);
        model.fill(FILL_FIRST, KEYS);
        model.clear_written();
        let base = streams::check_table(&mut parent, &model, "parent").unwrap();
        let state = parent.inner().snapshot().unwrap();
        let live_at_fork = frames.pool.stats().live;

        let mut children = fleet::fork_children(parent.inner(), &state, &model, CHILDREN).unwrap();
        let (results, wall) = fleet::run_concurrently(&mut children, REQUESTS, KEYS);
        println!("{CHILDREN} children, {REQUESTS} requests each, concurrently in {wall:?}");
        let named: BTreeSet<u64> = named_extra_pages().iter().map(|p| p.0).collect();
        let mut private_sum = 0;
        let mut sums = BTreeSet::new();
        for (c, r) in children.iter().zip(&results) {
            let r = r
                .as_ref()
                .unwrap_or_else(|e| panic!("child {}: {e}", c.index));
            assert_eq!(r.counts.requests, REQUESTS);
            assert!(
                r.counts.peer_probes > 0,
                "child {} probed no sibling key",
                c.index
            );
            sums.insert(r.checksum);
            let m = fleet::guest_memory(c.kv.inner());
            let writable = writable_pages(c.kv.inner());
            let written = c.model.written_pages();
            assert!(
                written.is_subset(&writable),
                "child {}: a written page is not private",
                c.index
            );
            let extra: BTreeSet<u64> = writable.difference(written).copied().collect();
            assert!(
                extra.is_subset(&named),
                "child {}: private pages beyond its writes that are not mailbox/stack/page \
                 tables: {extra:x?}",
                c.index
            );
            assert_eq!(
                m.private_frames,
                writable.len() as u64,
                "child {}: {m:?}",
                c.index
            );
            assert_eq!(m.copies + m.commits, m.private_frames);
            println!(
                "child {}: {} table pages written, {} private frames (extra {:x?}), {} shared",
                c.index,
                written.len(),
                m.private_frames,
                extra,
                m.shared_pages
            );
            private_sum += m.private_frames;
        }
        assert_eq!(
            sums.len(),
            CHILDREN,
            "children's tables differ from each other"
        );
        assert_eq!(frames.pool.stats().live - live_at_fork, private_sum);

        // The parent saw none of it.
        assert_eq!(parent.checksum().unwrap(), base);
        for i in 0..CHILDREN as u64 {
            assert_eq!(parent.get(streams::own_key(i, 1)).unwrap(), None);
        }
        // Reset one child and rerun a different stream.
        let c = &mut children[1];
        let dropped = c.kv.inner_mut().reset(&state).unwrap();
        assert!(dropped >= c.model.written_pages().len() as u64);
        c.model = model.clone();
        assert_eq!(c.kv.checksum().unwrap(), base);
        c.seed = 77;
        let ops = streams::stream(77, REQUESTS, KEYS, CHILDREN as u64);
        fleet::run_child(c, &ops).unwrap();
        for c in children {
            drop(c.kv.finish().unwrap());
        }
        drop(parent.finish().unwrap());
    }
    assert_eq!(frames.pool.stats().live, 0, "every frame returned");
    assert_eq!(frames.alloc.resident_bytes().unwrap(), 0);
}
