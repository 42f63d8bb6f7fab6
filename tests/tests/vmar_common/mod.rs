//! Helpers shared by the Vmar acceptance case files (`vmar_cases.rs`, `vmar_access_cases.rs`).
#![allow(dead_code)]

use conformance::Backend;
use vmo::{FramePool, VmPerms, Vmar, Vmo, VmoFlags};

pub const P: u64 = vmo::PAGE_SIZE;
pub const GIB: u64 = 1 << 30;
pub const R: VmPerms = VmPerms::READ;
pub const RW: VmPerms = VmPerms::RW;

pub fn space<B: Backend>(size: u64) -> (FramePool, Vmar<B::S>) {
    let pool = B::pool();
    let root = Vmar::new_root(size, B::stage2(&pool)).unwrap();
    (pool, root)
}

pub fn vmo(pool: &FramePool, pages: u64) -> Vmo {
    Vmo::new(pool, pages * P, VmoFlags::empty()).unwrap()
}

/// A Vmo whose page i starts with byte i+1.
pub fn patterned(pool: &FramePool, pages: u64) -> Vmo {
    let v = vmo(pool, pages);
    for i in 0..pages {
        v.write(i * P, &[i as u8 + 1]).unwrap();
    }
    v
}

pub fn installed<B: Backend>(vmar: &Vmar<B::S>, gpa: u64) -> Option<ept::Translation> {
    vmar.with_stage2(|s| ept::Stage2::query(s, gpa))
}
