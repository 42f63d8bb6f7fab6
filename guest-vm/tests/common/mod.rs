//! Test support: a stand-in for `Vmar::handle_fault` until the Vmar lands.
//!
//! `TestMem` is NOT the product's fault path. It is the smallest resolver that exercises
//! `KvmStage2` the way the Vmar will: a list of allowed GPA ranges (outside: `NotFound`;
//! writes to read-only ranges: `AccessDenied`), zero-filled frames from a counted `FramePool`
//! for not-present faults, and copy-on-write (copy the frame, `Stage2::map` the copy over the
//! read-only one) for permission faults.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ept::{Access, FaultInfo, FaultKind, MemType, PageSize, S2Perms, Stage2};
use guest_vm::sys::uffd::Uffd;
use guest_vm::{KvmStage2, MemfdFrameAlloc, Reservation, Resolver};
use vmo::{Frame, FramePool};

pub const PAGE: u64 = 4096;

pub struct TestMem {
    pub stage2: KvmStage2,
    pub pool: FramePool,
    pub alloc: Arc<MemfdFrameAlloc>,
    pub frames: BTreeMap<u64, Frame>,
    /// (start, end, writable)
    pub allowed: Vec<(u64, u64, bool)>,
    pub faults: Vec<FaultInfo>,
}

impl TestMem {
    /// Guest memory of `mem_size` bytes at GPA 0, frames from a memfd of `pool_size` bytes,
    /// everything allowed read-write.
    pub fn new(mem_size: u64, pool_size: u64) -> (Arc<Mutex<TestMem>>, Arc<Reservation>) {
        let uffd = Arc::new(Uffd::open().expect("userfaultfd"));
        let res =
            Arc::new(Reservation::new(guest_vm::Gpa(0), mem_size, uffd).expect("reservation"));
        let alloc = Arc::new(MemfdFrameAlloc::new(pool_size).expect("memfd pool"));
        let pool = FramePool::new(alloc.clone());
        let stage2 = KvmStage2::new(res.clone(), alloc.clone());
        let mem = TestMem {
            stage2,
            pool,
            alloc,
            frames: BTreeMap::new(),
            allowed: vec![(0, mem_size, true)],
            faults: Vec::new(),
        };
        (Arc::new(Mutex::new(mem)), res)
    }

    /// The resolver handed to `GuestVm::new`.
    pub fn resolver(mem: &Arc<Mutex<TestMem>>) -> impl Resolver + 'static {
        let mem = mem.clone();
        move |f| mem.lock().unwrap().resolve(f)
    }

    fn resolve(&mut self, f: FaultInfo) -> vmo::Result<()> {
        self.faults.push(f);
        let page = f.gpa & !(PAGE - 1);
        let &(_, _, writable) = self
            .allowed
            .iter()
            .find(|(s, e, _)| (*s..*e).contains(&page))
            .ok_or(vmo::Error::NotFound)?;
        let write = f.access.contains(Access::WRITE);
        if write && !writable {
            return Err(vmo::Error::AccessDenied);
        }
        match self.stage2.query(page) {
            Some(t) if !write || t.perms.contains(S2Perms::WRITE) => Ok(()), // raced / spurious
            Some(_) => {
                // Copy-on-write of a read-only installed frame.
                let old = self.frames.get(&page).ok_or(vmo::Error::BadState)?;
                let new = self.pool.copy_of(old)?;
                self.stage2.map(
                    page,
                    new.paddr(),
                    PageSize::Size4K,
                    S2Perms::RW,
                    MemType::WriteBack,
                )?;
                self.frames.insert(page, new);
                Ok(())
            }
            None => {
                assert_eq!(f.kind, FaultKind::NotPresent);
                let frame = self.pool.alloc_zeroed()?;
                let perms = if writable { S2Perms::RW } else { S2Perms::READ };
                self.stage2.map(
                    page,
                    frame.paddr(),
                    PageSize::Size4K,
                    perms,
                    MemType::WriteBack,
                )?;
                self.frames.insert(page, frame);
                Ok(())
            }
        }
    }

    /// Installs a fresh frame filled with `byte` at `gpa` with `perms` (host side, no fault).
    pub fn preinstall(&mut self, gpa: u64, byte: u8, perms: S2Perms) {
        let frame = self.pool.alloc_uninit().unwrap();
        // SAFETY: a fresh frame of the pool that nothing else references yet.
        unsafe { frame.ptr().write_bytes(byte, PAGE as usize) };
        self.stage2
            .map(
                gpa,
                frame.paddr(),
                PageSize::Size4K,
                perms,
                MemType::WriteBack,
            )
            .unwrap();
        self.frames.insert(gpa, frame);
    }

    /// First byte of the frame backing `gpa`.
    pub fn byte_at(&self, gpa: u64) -> Option<u8> {
        let f = self.frames.get(&(gpa & !(PAGE - 1)))?;
        let mut b = [0u8];
        f.read((gpa % PAGE) as usize, &mut b).ok()?;
        Some(b[0])
    }
}

/// `Some(reason)` when the KVM tests cannot run here.
pub fn skip_reason() -> Option<String> {
    guest_vm::vmm::check_host().err().map(|e| e.to_string())
}

/// Whether CI demands the KVM tests (`GUESTMEM_REQUIRE_KVM=1`): then a missing KVM fails the
/// test instead of skipping it.
pub fn kvm_required() -> bool {
    std::env::var("GUESTMEM_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// Returns early from a test that needs KVM when the host cannot run guests, printing
/// `SKIP: <reason>`; fails the test instead when `GUESTMEM_REQUIRE_KVM=1`.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if let Some(why) = common::skip_reason() {
            if common::kvm_required() {
                panic!("GUESTMEM_REQUIRE_KVM=1 but this host cannot run KVM guests: {why}");
            }
            println!("SKIP: {why}");
            return;
        }
    };
}
