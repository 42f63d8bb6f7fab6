//! Helpers shared by the interleaving test (shuttle) and the stress test (OS threads): a small
//! space on the software backend, a vCPU-like store through the live translation, and the
//! cross-space copy-on-write check. Runs under either: the locks it takes are the crate's.
#![allow(dead_code)]

use ept::{Access, EptTable, FaultInfo, FaultKind, HeapPhysMem, S2Perms, Stage2};
use vmo::{Error, FramePool, Vmar, PAGE_SIZE as P};

pub type Space = Vmar<EptTable<HeapPhysMem>>;

/// Pages of the Vmo the tests map.
pub const PAGES: u64 = 4;

pub fn table() -> EptTable<HeapPhysMem> {
    EptTable::new(HeapPhysMem::new()).unwrap()
}

/// A vCPU's store of `byte` at `gpa`: through the current translation if it is writable (under
/// the stage2 lock, as the hardware walks the live table), else a fault and a retry. Returns
/// whether the store happened; a refused fault (unmapped, read-only) ends the attempt.
pub fn guest_store(space: &Space, pool: &FramePool, gpa: u64, byte: u8) -> bool {
    let alloc = pool.allocator().clone();
    for _ in 0..4 {
        let present = space.with_stage2(|s| match s.query(gpa) {
            Some(t) if t.perms.contains(S2Perms::WRITE) => {
                let p = alloc.frame_ptr(t.pa_of(gpa));
                assert!(
                    !p.is_null(),
                    "{gpa:#x} translates to a frame nobody allocated"
                );
                // SAFETY: `p` points into a heap slab of this pool's allocator, which keeps
                // every slab until it drops (the pool, held by the Vmos, outlives this call);
                // a byte store there is memory-safe even if the frame were wrongly freed —
                // and then the data checks at the end catch it.
                unsafe { p.write_volatile(byte) };
                None
            }
            other => Some(other.is_some()),
        });
        let Some(present) = present else {
            return true;
        };
        let kind = if present {
            FaultKind::Permission
        } else {
            FaultKind::NotPresent
        };
        match space.handle_fault(FaultInfo::new(gpa, Access::WRITE, kind)) {
            Ok(_) => {}
            Err(Error::NotFound | Error::AccessDenied) => return false,
            Err(e) => panic!("write fault at {gpa:#x}: {e:?}"),
        }
    }
    // Four faults, each undone before the store by a concurrent protect / reset / fork: a
    // livelock in a real guest only under this adversarial schedule; not a failure.
    false
}

/// Byte `off` of every page as `space` reads it (None where nothing is mapped).
pub fn view(space: &Space, off: u64) -> Vec<Option<u8>> {
    (0..PAGES)
        .map(|p| {
            let mut b = [0u8];
            space.read(p * P + off, &mut b).ok().map(|()| b[0])
        })
        .collect()
}

/// No writable translation of one space reaches a frame that another space's Vmo holds.
pub fn no_shared_writable(spaces: &[&Space]) {
    for (i, a) in spaces.iter().enumerate() {
        for p in 0..PAGES {
            let Some(t) = a.with_stage2(|s| s.query(p * P)) else {
                continue;
            };
            if !t.perms.contains(S2Perms::WRITE) {
                continue;
            }
            for (j, b) in spaces.iter().enumerate() {
                if i == j {
                    continue;
                }
                for q in 0..PAGES {
                    let Ok(info) = b.query(q * P) else { continue };
                    let offset = info.vmo_offset + (q * P - info.base);
                    let held = info.vmo.committed_frame(offset).unwrap();
                    assert!(
                        held.map(|f| f.paddr()) != Some(t.pa_of(p * P)),
                        "space {i} page {p} is writable onto a frame space {j} holds at page {q}"
                    );
                }
            }
        }
    }
}
