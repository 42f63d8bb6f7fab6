//! Helpers shared by the virtio-blk test files (`virtio_blk.rs`, `virtio_indirect.rs`): a
//! host-side guest address space and the standard rig over a memory disk.
#![allow(dead_code)]

use ept::HeapPhysMem;
use guest_vm::virtio::rig::{BlkRig, DomainTable};
use guest_vm::virtio::MemDisk;
use guest_vm::HostFrames;
use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_S_OK;
use vmo::{MapOptions, VmPerms, Vmar, Vmo, VmoFlags};

pub const GUEST: u64 = 4 << 20;
pub const BASE: u64 = 1 << 20;
pub const DISK: u64 = 1 << 20;
pub const OK: u8 = VIRTIO_BLK_S_OK as u8;

/// A host-side guest address space: `GUEST` bytes of RAM from `frames` at GPA 0.
pub fn guest(frames: &HostFrames) -> Vmar<DomainTable> {
    let vmar = Vmar::new_root(GUEST, DomainTable::new(HeapPhysMem::new()).unwrap()).unwrap();
    let ram = Vmo::new(&frames.pool, GUEST, VmoFlags::empty()).unwrap();
    vmar.map(&ram, 0, GUEST, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    vmar
}

pub fn mem_rig(frames: &HostFrames, g: &Vmar<DomainTable>) -> BlkRig<MemDisk, DomainTable> {
    BlkRig::attach(frames, g, BASE, MemDisk::new(DISK).unwrap(), "vblk-test").unwrap()
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
