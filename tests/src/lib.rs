//! Cross-crate test support: second-level backends behind one `Backend` trait, and a software
//! "guest CPU" that touches guest-physical memory only the way hardware does — through the
//! `Stage2` translation, raising a `FaultInfo` into `Vmar::handle_fault` and retrying when the
//! entry is missing or lacks permission.
//!
//! The conformance suite (`tests/tests/*.rs`) is generic over `Backend`, so the same cases run
//! on `EptTable`, `NptTable` and guest-vm's `KvmStage2` (where /dev/kvm and root are available).
//!
//! Invariant of `SoftCpu`: the translation is looked up and the frame accessed under the
//! Stage2 lock, so (like a TLB that the unmapper flushes) an access never reaches a frame that
//! was unmapped and freed before it.

pub mod inject;
pub mod model;

use std::sync::Arc;

use ept::{Access, FaultInfo, FaultKind, HeapPhysMem, S2Perms, Stage2};
use vmo::{FramePool, Resolution, Vmar};

/// A second-level backend the conformance suite can run on.
pub trait Backend {
    type S: Stage2 + Send + 'static;
    const NAME: &'static str;
    /// Why this backend cannot run here (it is then skipped with that reason, or fails when
    /// the environment demands it); `Ok` when it can.
    fn available() -> Result<(), String> {
        Ok(())
    }
    /// A fresh frame pool the backend can translate to.
    fn pool() -> FramePool {
        FramePool::heap()
    }
    /// An empty table for frames of `pool`.
    fn stage2(pool: &FramePool) -> Self::S;
    /// Table frames the backend currently holds (for leak checks); `None` if it has none.
    fn table_frames(s: &Self::S) -> Option<usize>;
    /// TLB flushes issued so far.
    fn flushes(s: &Self::S) -> u64;
}

pub struct Ept;
pub struct Npt;

impl Backend for Ept {
    type S = ept::EptTable<HeapPhysMem>;
    const NAME: &'static str = "ept";
    fn stage2(_pool: &FramePool) -> Self::S {
        ept::EptTable::new(HeapPhysMem::new()).expect("root table frame")
    }
    fn table_frames(s: &Self::S) -> Option<usize> {
        Some(s.table_frames())
    }
    fn flushes(s: &Self::S) -> u64 {
        s.flush_count()
    }
}

impl Backend for Npt {
    type S = ept::NptTable<HeapPhysMem>;
    const NAME: &'static str = "npt";
    fn stage2(_pool: &FramePool) -> Self::S {
        ept::NptTable::new(HeapPhysMem::new()).expect("root table frame")
    }
    fn table_frames(s: &Self::S) -> Option<usize> {
        Some(s.table_frames())
    }
    fn flushes(s: &Self::S) -> u64 {
        s.flush_count()
    }
}

/// guest-vm's KVM backend: `KvmStage2` installs memfd frames into a userfaultfd-registered
/// reservation with `mmap(MAP_FIXED)`. The software CPU reads the frames through the pool, so the
/// suite checks the backend's bookkeeping and mmap/unmap/protect behaviour with every Vmar case;
/// guest-vm's own tests drive the same backend with real KVM guests.
pub struct Kvm;

/// Address space each KVM-backend table reserves (covers every root the suite creates).
const KVM_RESERVATION: u64 = 16 << 30;

fn memfd_allocs() -> &'static std::sync::Mutex<Vec<(usize, Arc<guest_vm::MemfdFrameAlloc>)>> {
    static ALLOCS: std::sync::OnceLock<
        std::sync::Mutex<Vec<(usize, Arc<guest_vm::MemfdFrameAlloc>)>>,
    > = std::sync::OnceLock::new();
    ALLOCS.get_or_init(Default::default)
}

fn pool_key(pool: &FramePool) -> usize {
    Arc::as_ptr(pool.allocator()) as *const () as usize
}

impl Backend for Kvm {
    type S = guest_vm::KvmStage2;
    const NAME: &'static str = "kvm";
    fn available() -> Result<(), String> {
        guest_vm::vmm::check_host().map_err(|e| e.to_string())
    }
    fn pool() -> FramePool {
        let alloc =
            Arc::new(guest_vm::MemfdFrameAlloc::new(KVM_RESERVATION).expect("memfd frame pool"));
        let pool = FramePool::new(alloc.clone());
        memfd_allocs()
            .lock()
            .unwrap()
            .push((pool_key(&pool), alloc));
        pool
    }
    fn stage2(pool: &FramePool) -> Self::S {
        let key = pool_key(pool);
        let alloc = memfd_allocs()
            .lock()
            .unwrap()
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, a)| a.clone())
            .expect("pool made by Kvm::pool");
        let uffd = Arc::new(guest_vm::sys::uffd::Uffd::open().expect("userfaultfd"));
        let res = Arc::new(
            guest_vm::Reservation::new(guest_vm::Gpa(0), KVM_RESERVATION, uffd)
                .expect("reservation"),
        );
        guest_vm::KvmStage2::new(res, alloc)
    }
    fn table_frames(_s: &Self::S) -> Option<usize> {
        None
    }
    fn flushes(s: &Self::S) -> u64 {
        s.stats().flushes
    }
}

/// Runs `f` if backend `B` is available; otherwise prints why it is skipped, or fails when
/// `GUESTMEM_REQUIRE_KVM` is set (CI: nothing may be skipped).
pub fn run_if_available<B: Backend>(test: &str, f: impl FnOnce()) {
    match B::available() {
        Ok(()) => f(),
        Err(why) if std::env::var_os("GUESTMEM_REQUIRE_KVM").is_some() => {
            panic!(
                "{test} on {}: backend unavailable ({why}) and GUESTMEM_REQUIRE_KVM is set",
                B::NAME
            )
        }
        Err(why) => println!("SKIP: {test} on {}: {why}", B::NAME),
    }
}

/// Why a guest access did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFault {
    pub gpa: u64,
    pub access: Access,
    pub error: vmo::Error,
}

/// A software vCPU over one Vmar: every access goes through the Stage2 translation.
pub struct SoftCpu<'a, S: Stage2 + Send + 'static> {
    pub vmar: &'a Vmar<S>,
    pub pool: &'a FramePool,
    /// Faults this CPU raised (resolved or not).
    pub faults: u64,
}

impl<'a, S: Stage2 + Send + 'static> SoftCpu<'a, S> {
    pub fn new(vmar: &'a Vmar<S>, pool: &'a FramePool) -> Self {
        SoftCpu {
            vmar,
            pool,
            faults: 0,
        }
    }

    /// One access of `len` bytes inside one page; `f` gets the host pointer.
    fn access(
        &mut self,
        gpa: u64,
        access: Access,
        f: &mut dyn FnMut(*mut u8),
    ) -> Result<Option<Resolution>, GuestFault> {
        let need = match access {
            a if a.contains(Access::WRITE) => S2Perms::WRITE,
            a if a.contains(Access::EXEC) => S2Perms::EXEC,
            _ => S2Perms::READ,
        };
        let mut last = None;
        for _attempt in 0..4 {
            let pool = self.pool;
            let done = self.vmar.with_stage2(|s2| match s2.query(gpa) {
                Some(t) if t.perms.contains(need) => {
                    let ptr = pool.allocator().frame_ptr(t.pa_of(gpa) & !0xfff);
                    // SAFETY: the frame is installed, hence allocated, and cannot be freed while
                    // we hold the stage2 lock (frames are unmapped under it before being freed).
                    f(unsafe { ptr.add((gpa & 0xfff) as usize) });
                    None
                }
                Some(_) => Some(FaultKind::Permission),
                None => Some(FaultKind::NotPresent),
            });
            let Some(kind) = done else { return Ok(last) };
            self.faults += 1;
            let fault = FaultInfo::new(gpa, access, kind);
            match self.vmar.handle_fault(fault) {
                Ok(r) => last = Some(r),
                Err(error) => return Err(GuestFault { gpa, access, error }),
            }
        }
        panic!("fault at {gpa:#x} ({access:?}) resolved but the retry still faults");
    }

    pub fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestFault> {
        let mut done = 0;
        while done < buf.len() {
            let at = gpa + done as u64;
            let n = ((0x1000 - (at & 0xfff)) as usize).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            self.access(at, Access::READ, &mut |p| {
                // SAFETY: `p..p+n` stays inside the page.
                unsafe { core::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), n) }
            })?;
            done += n;
        }
        Ok(())
    }

    pub fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestFault> {
        let mut done = 0;
        while done < data.len() {
            let at = gpa + done as u64;
            let n = ((0x1000 - (at & 0xfff)) as usize).min(data.len() - done);
            let src = &data[done..done + n];
            self.access(at, Access::WRITE, &mut |p| {
                // SAFETY: `p..p+n` stays inside the page.
                unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), p, n) }
            })?;
            done += n;
        }
        Ok(())
    }

    pub fn read_u8(&mut self, gpa: u64) -> Result<u8, GuestFault> {
        let mut b = [0u8];
        self.read(gpa, &mut b)?;
        Ok(b[0])
    }

    pub fn write_u8(&mut self, gpa: u64, v: u8) -> Result<(), GuestFault> {
        self.write(gpa, &[v])
    }

    /// An instruction fetch of one byte.
    pub fn fetch(&mut self, gpa: u64) -> Result<u8, GuestFault> {
        let mut b = 0u8;
        self.access(gpa, Access::EXEC | Access::READ, &mut |p| {
            // SAFETY: one byte inside the page.
            b = unsafe { *p }
        })?;
        Ok(b)
    }
}

/// Instantiates a generic test function `fn name<B: Backend>()` once per backend.
#[macro_export]
macro_rules! for_each_backend {
    ($($name:ident),* $(,)?) => {
        mod ept_backend {
            $( #[test] fn $name() { super::$name::<$crate::Ept>() } )*
        }
        mod npt_backend {
            $( #[test] fn $name() { super::$name::<$crate::Npt>() } )*
        }
        mod kvm_backend {
            $( #[test] fn $name() {
                $crate::run_if_available::<$crate::Kvm>(stringify!($name), super::$name::<$crate::Kvm>)
            } )*
        }
    };
}
