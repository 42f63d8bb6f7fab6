//! The fault path's 2 MiB step (`vmo/src/vmar/large_leaf.rs`) on every backend: a fault in a
//! physically contiguous Vmo installs its aligned 2 MiB block as one leaf; the pages around it,
//! blocks with a page already installed, and dirty-tracked spaces stay on 4 KiB leaves; a
//! partial protect or unmap splits the leaf and keeps the rest of it translated correctly.

use conformance::{for_each_backend, Backend, SoftCpu};
use ept::PageSize;
use vmo::{Error, MapOptions, Vmar, Vmo};

mod vmar_common;
use vmar_common::*;

const M2: u64 = 2 << 20;

/// A 4 MiB contiguous Vmo whose page i starts with the byte `i + 1` (mod 256), mapped RW
/// (all but its last page) at a guest-physical address congruent to its first frame modulo
/// 2 MiB, so exactly one 2 MiB block of the mapping has a 2 MiB-aligned frame. Returns (Vmo, mapping base, block start).
fn contiguous_mapping<B: Backend>(root: &Vmar<B::S>, pool: &vmo::FramePool) -> (Vmo, u64, u64) {
    let v = Vmo::new_contiguous(pool, 2 * M2, false).unwrap();
    for i in 0..2 * M2 / P {
        v.write(i * P, &[(i + 1) as u8]).unwrap();
    }
    let pa = v.contiguous_base().unwrap();
    let base = 8 * M2 + pa % M2;
    // One page short of the Vmo: whatever the frame's alignment, exactly one block is whole.
    root.map(&v, 0, 2 * M2 - P, MapOptions::specific(base, RW))
        .unwrap();
    let block = base.next_multiple_of(M2);
    (v, base, block)
}

/// Byte the pattern puts at the start of the page at `gpa`.
fn expected(base: u64, gpa: u64) -> u8 {
    ((gpa - base) / P + 1) as u8
}

fn contiguous_vmo_faults_in_one_2m_leaf<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let (v, base, block) = contiguous_mapping::<B>(&root, &pool);
    let mut cpu = SoftCpu::new(&root, &pool);
    let inside = block + 5 * P;
    assert_eq!(cpu.read_u8(inside).unwrap(), expected(base, inside));
    assert_eq!(cpu.faults, 1);
    let t = installed::<B>(&root, inside).expect("installed");
    assert_eq!(t.size, PageSize::Size2M, "one leaf for the whole block");
    assert_eq!(t.gpa, block);
    assert_eq!(t.pa, v.contiguous_base().unwrap() + (block - base));
    assert!(
        t.perms.contains(ept::S2Perms::WRITE),
        "contiguous frames are private"
    );
    // Every other page of the block, for reads and writes, without another fault.
    for p in [0, 1, 255, 511] {
        let gpa = block + p * P;
        assert_eq!(cpu.read_u8(gpa).unwrap(), expected(base, gpa));
        cpu.write_u8(gpa + 7, 0xA5).unwrap();
    }
    assert_eq!(cpu.faults, 1, "the block costs one fault");
    let mut b = [0u8; 1];
    v.read(block - base + 511 * P + 7, &mut b).unwrap();
    assert_eq!(b[0], 0xA5, "guest writes reach the Vmo's frame");
    // Pages of the mapping outside the aligned block take 4 KiB leaves.
    if block > base {
        let before = block - P;
        assert_eq!(cpu.read_u8(before).unwrap(), expected(base, before));
        assert_eq!(
            installed::<B>(&root, before).unwrap().size,
            PageSize::Size4K
        );
    }
    let after = block + M2;
    assert_eq!(cpu.read_u8(after).unwrap(), expected(base, after));
    assert_eq!(installed::<B>(&root, after).unwrap().size, PageSize::Size4K);
    assert_eq!(root.fault_stats().large_leaves, 1);
    drop(root);
    drop(v);
    assert_eq!(pool.stats().live, 0, "no frame leaks");
}

fn partial_protect_and_unmap_split_the_leaf<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let (_v, base, block) = contiguous_mapping::<B>(&root, &pool);
    let mut cpu = SoftCpu::new(&root, &pool);
    cpu.write_u8(block, 1).unwrap();
    assert_eq!(installed::<B>(&root, block).unwrap().size, PageSize::Size2M);
    root.protect(block + 10 * P, P, R).unwrap();
    assert_eq!(
        cpu.write_u8(block + 10 * P, 2).unwrap_err().error,
        Error::AccessDenied,
        "the protected page refuses writes"
    );
    assert_eq!(
        cpu.read_u8(block + 10 * P).unwrap(),
        expected(base, block + 10 * P)
    );
    root.unmap(block + 20 * P, P).unwrap();
    assert_eq!(
        cpu.read_u8(block + 20 * P).unwrap_err().error,
        Error::NotFound
    );
    let faults = cpu.faults;
    for p in [11, 19, 21, 300] {
        let gpa = block + p * P;
        assert_eq!(
            cpu.read_u8(gpa).unwrap(),
            expected(base, gpa),
            "page {p} after the split"
        );
        cpu.write_u8(gpa + 1, 3).unwrap();
    }
    assert!(
        cpu.faults - faults <= 4,
        "the rest of the block stays translated or refaults cleanly"
    );
}

fn dirty_tracking_and_installed_pages_keep_4k_leaves<B: Backend>() {
    let (pool, root) = space::<B>(GIB);
    let (_v, _base, block) = contiguous_mapping::<B>(&root, &pool);
    let mut cpu = SoftCpu::new(&root, &pool);
    root.enable_dirty_tracking().unwrap();
    cpu.write_u8(block + 3 * P, 9).unwrap();
    assert_eq!(
        installed::<B>(&root, block + 3 * P).unwrap().size,
        PageSize::Size4K,
        "a tracked space records every written page"
    );
    assert_eq!(root.take_dirty().unwrap(), vec![block + 3 * P]);
    root.disable_dirty_tracking();
    // The block already holds a 4 KiB leaf: later faults in it stay on 4 KiB leaves.
    cpu.read_u8(block + 100 * P).unwrap();
    assert_eq!(
        installed::<B>(&root, block + 100 * P).unwrap().size,
        PageSize::Size4K
    );
    assert_eq!(root.fault_stats().large_leaves, 0);
}

for_each_backend!(
    contiguous_vmo_faults_in_one_2m_leaf,
    partial_protect_and_unmap_split_the_leaf,
    dirty_tracking_and_installed_pages_keep_4k_leaves,
);
