//! Cross-crate test support: second-level backends behind one `Backend` trait, and a software
//! "guest CPU" that touches guest-physical memory only the way hardware does — through the
//! `Stage2` translation, raising a `FaultInfo` into `Vmar::handle_fault` and retrying when the
//! entry is missing or lacks permission.
//!
//! The conformance suite (`tests/tests/*.rs`) is generic over `Backend`, so the same cases run
//! on `EptTable`, `NptTable` and guest-vm's `KvmStage2` (where /dev/kvm and root are available).
//! Backends that can leave pages untracked (KVM, `Stage2::set_write_tracking`) also report
//! that state (`Backend::write_tracking`, `Backend::untracked_reported`) for the hot-set cases.
//! Shared helpers: `harvest` (a dirty harvest through the seam, with the caller's flush),
//! `writable_pages`, and `Rng` (a deterministic schedule).
//!
//! Invariants of `SoftCpu`: the translation is looked up and the frame accessed under the
//! Stage2 lock, so (like a TLB that the unmapper flushes) an access never reaches a frame that
//! was unmapped and freed before it; every access it performs goes through the backend's
//! `Backend::translate` (the MMU's walk: on Ept/Npt it sets accessed, and dirty on a write,
//! exactly as hardware does) and every write through `Backend::guest_write` (the path whose
//! writes the backend's dirty tracking sees), so dirty harvests observe the software guest
//! as they would a real one.

pub mod inject;
pub mod model;

use std::sync::Arc;

use ept::{
    Access, AccessDirty, FaultInfo, FaultKind, HeapPhysMem, S2Perms, Stage2, Translation,
    WriteTracking,
};
use vmo::{FramePool, Resolution, Vmar};

/// A second-level backend the conformance suite can run on.
pub trait Backend: Sized {
    type S: BackendTable<Backend = Self>;
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

    /// The MMU's walk for a guest `access` to `gpa`: the leaf translating it, after whatever
    /// the hardware records on the way (Ept/Npt: `Stage2Table::hw_touch` sets accessed, and
    /// dirty on a permitted write). `SoftCpu` calls it for every access; the caller checks
    /// the permissions. Default: a plain `query` (a backend whose hardware records nothing in
    /// the table).
    fn translate(s: &mut Self::S, gpa: u64, access: Access) -> Option<Translation> {
        let _ = access;
        s.query(gpa)
    }

    /// Performs a guest write of `data` at `gpa` (inside one page) that `translate` resolved
    /// to the writable leaf `t`. Default: copies into the frame through the pool's pointer
    /// (Ept/Npt: the dirty bit was already set by `translate`). A backend whose dirty tracking
    /// only sees writes through another mapping (KVM: the memslot's host mapping) overrides it
    /// to write there. Called with the Stage2 lock held (so the frame cannot be freed under it).
    fn guest_write(s: &mut Self::S, pool: &FramePool, t: Translation, gpa: u64, data: &[u8]) {
        frame_write(s, pool, t, gpa, data)
    }

    /// The backend's write tracking of the writable page at `gpa` (`None`: nothing writable
    /// installed there, or a backend that never leaves a page untracked).
    fn write_tracking(s: &Self::S, gpa: u64) -> Option<WriteTracking> {
        let _ = (s, gpa);
        None
    }

    /// Pages the backend's harvests reported as untracked so far, without scanning them
    /// (`None`: a backend with no untracked pages).
    fn untracked_reported(s: &Self::S) -> Option<u64> {
        let _ = s;
        None
    }
}

/// A guest write of `data` at `gpa` (inside one page) into the frame of the writable leaf `t`,
/// through the pool's pointer: what `Backend::guest_write` does unless a backend overrides it.
/// Called with the Stage2 lock held (so the frame cannot be freed under it).
pub fn frame_write<S>(_s: &mut S, pool: &FramePool, t: Translation, gpa: u64, data: &[u8]) {
    assert!(
        (gpa & 0xfff) as usize + data.len() <= 0x1000,
        "guest_write crosses a page"
    );
    let ptr = pool.allocator().frame_ptr(t.pa_of(gpa) & !0xfff);
    // SAFETY: `t` is installed (so the frame is allocated) and the caller holds the Stage2
    // lock, under which frames are unmapped before being freed; the write stays inside
    // the page (checked above).
    unsafe {
        core::ptr::copy_nonoverlapping(data.as_ptr(), ptr.add((gpa & 0xfff) as usize), data.len())
    }
}

/// A backend's table type, naming its backend, so code generic over the table (`SoftCpu` over
/// a `Vmar<S>`) reaches the backend's hooks (`Backend::translate`, `Backend::guest_write`).
pub trait BackendTable: Stage2 + Send + 'static + Sized {
    type Backend: Backend<S = Self>;
}

impl BackendTable for ept::EptTable<HeapPhysMem> {
    type Backend = Ept;
}
impl BackendTable for ept::NptTable<HeapPhysMem> {
    type Backend = Npt;
}
impl BackendTable for guest_vm::KvmStage2 {
    type Backend = Kvm;
}

pub struct Ept;
pub struct Npt;

impl Backend for Ept {
    type S = ept::EptTable<HeapPhysMem>;
    const NAME: &'static str = "ept";
    /// An EPT table with A/D enabled in its EPTP (the CPU the suite emulates has it), so
    /// guest writes can be harvested.
    fn stage2(_pool: &FramePool) -> Self::S {
        let hook = ept::CountingInvalidate::default();
        ept::EptTable::with_invalidate(HeapPhysMem::new(), hook, AccessDirty::Enabled)
            .expect("root table frame")
    }
    fn table_frames(s: &Self::S) -> Option<usize> {
        Some(s.table_frames())
    }
    fn flushes(s: &Self::S) -> u64 {
        s.flush_count()
    }
    fn translate(s: &mut Self::S, gpa: u64, access: Access) -> Option<Translation> {
        s.hw_touch(gpa, access)
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
    fn translate(s: &mut Self::S, gpa: u64, access: Access) -> Option<Translation> {
        s.hw_touch(gpa, access)
    }
}

/// guest-vm's KVM backend: `KvmStage2` installs memfd frames into a userfaultfd-registered
/// reservation with `mmap(MAP_FIXED)`. The software CPU reads the frames through the pool, so the
/// suite checks the backend's bookkeeping and mmap/unmap/protect behaviour with every Vmar case;
/// guest-vm's own tests drive the same backend with real KVM guests.
pub struct Kvm;

/// Address space each KVM-backend table reserves (covers every root the suite creates).
const KVM_RESERVATION: u64 = 16 << 30;

/// The memfd frame allocators the KVM backend's pools use, by pool.
type MemfdAllocs = std::sync::Mutex<Vec<(usize, Arc<guest_vm::MemfdFrameAlloc>)>>;

fn memfd_allocs() -> &'static MemfdAllocs {
    static ALLOCS: std::sync::OnceLock<MemfdAllocs> = std::sync::OnceLock::new();
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
    /// The guest writes through its memslot mapping (where KVM's own writes land), so the
    /// backend's userfaultfd WP_ASYNC tracker sees them as it sees a vCPU's.
    fn guest_write(s: &mut Self::S, _pool: &FramePool, _t: Translation, gpa: u64, data: &[u8]) {
        let hva = s
            .reservation()
            .hva_of(guest_vm::Gpa(gpa), data.len() as u64)
            .expect("gpa inside the memslot reservation");
        // Every writer of the host range applies the deferred write-protects there first.
        s.reservation()
            .seal_range(guest_vm::Gpa(gpa), data.len() as u64)
            .expect("seal before a host write");
        // SAFETY: [gpa, gpa+len) lies in one page `translate` found installed writable; the
        // reservation maps it (MAP_SHARED of the frame's memfd offset) and the caller holds the
        // Stage2 lock, so it is not remapped during the copy.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), hva.as_mut_ptr::<u8>(), data.len()) }
    }
    fn table_frames(_s: &Self::S) -> Option<usize> {
        None
    }
    fn flushes(s: &Self::S) -> u64 {
        s.stats().flushes
    }
    fn write_tracking(s: &Self::S, gpa: u64) -> Option<WriteTracking> {
        s.write_tracking(gpa)
    }
    fn untracked_reported(s: &Self::S) -> Option<u64> {
        Some(s.stats().untracked_reported)
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

/// xorshift64*: a deterministic schedule for the randomized cases, without a dependency.
pub struct Rng(pub u64);
impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One dirty harvest of `[gpa, gpa + len)` through the `Stage2` seam, with the flush the
/// contract asks of the caller; checks that the count matches and the pages ascend.
pub fn harvest<S: Stage2 + Send + 'static>(
    vmar: &Vmar<S>,
    gpa: u64,
    len: u64,
) -> Result<Vec<u64>, ept::Error> {
    vmar.with_stage2(|s| {
        let mut dirty = Vec::new();
        let n = s.harvest_dirty(gpa, len, &mut dirty)?;
        assert_eq!(n, dirty.len() as u64, "harvest count vs pages appended");
        assert!(
            dirty.windows(2).all(|w| w[0] < w[1]),
            "harvest not ascending"
        );
        if s.flush_pending() {
            s.flush(ept::FlushScope::Context);
        }
        Ok(dirty)
    })
}

/// The pages of `[gpa, gpa + pages * 4 KiB)` with a writable translation installed.
pub fn writable_pages<S: Stage2 + Send + 'static>(
    vmar: &Vmar<S>,
    gpa: u64,
    pages: u64,
) -> std::collections::BTreeSet<u64> {
    vmar.with_stage2(|s| {
        (0..pages)
            .map(|i| gpa + i * 0x1000)
            .filter(|&p| s.query(p).is_some_and(|t| t.perms.contains(S2Perms::WRITE)))
            .collect()
    })
}

/// Why a guest access did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFault {
    pub gpa: u64,
    pub access: Access,
    pub error: vmo::Error,
}

/// What one page access of the software CPU does with the bytes.
enum Io<'b> {
    Read(&'b mut [u8]),
    Write(&'b [u8]),
}

/// A software vCPU over one Vmar: every access goes through the Stage2 translation.
pub struct SoftCpu<'a, S: Stage2 + Send + 'static> {
    pub vmar: &'a Vmar<S>,
    pub pool: &'a FramePool,
    /// Faults this CPU raised (resolved or not).
    pub faults: u64,
    /// The MMU's walk and the write path (a backend's hooks, or the plain defaults).
    translate: fn(&mut S, u64, Access) -> Option<Translation>,
    write: fn(&mut S, &FramePool, Translation, u64, &[u8]),
}

impl<'a, S: BackendTable> SoftCpu<'a, S> {
    /// A CPU using the backend's hooks (`Backend::translate`, `Backend::guest_write`).
    pub fn new(vmar: &'a Vmar<S>, pool: &'a FramePool) -> Self {
        SoftCpu {
            vmar,
            pool,
            faults: 0,
            translate: S::Backend::translate,
            write: S::Backend::guest_write,
        }
    }
}

impl<'a, S: Stage2 + Send + 'static> SoftCpu<'a, S> {
    /// A CPU over any table (wrappers of the model and injection runs): translation by
    /// `query`, writes into the frame (no accessed/dirty emulation).
    pub fn plain(vmar: &'a Vmar<S>, pool: &'a FramePool) -> Self {
        SoftCpu {
            vmar,
            pool,
            faults: 0,
            translate: |s, gpa, _| s.query(gpa),
            write: frame_write,
        }
    }

    /// One access inside one page: the backend's walk (`Backend::translate`), then the bytes
    /// are read from the frame or written through `Backend::guest_write`.
    fn access(
        &mut self,
        gpa: u64,
        access: Access,
        mut io: Io<'_>,
    ) -> Result<Option<Resolution>, GuestFault> {
        let need = match access {
            a if a.contains(Access::WRITE) => S2Perms::WRITE,
            a if a.contains(Access::EXEC) => S2Perms::EXEC,
            _ => S2Perms::READ,
        };
        let mut last = None;
        for _attempt in 0..4 {
            let pool = self.pool;
            let io = &mut io;
            let done = self
                .vmar
                .with_stage2(|s2| match (self.translate)(s2, gpa, access) {
                    Some(t) if t.perms.contains(need) => {
                        match io {
                            Io::Write(data) => (self.write)(s2, pool, t, gpa, data),
                            Io::Read(buf) => {
                                let ptr = pool.allocator().frame_ptr(t.pa_of(gpa) & !0xfff);
                                // SAFETY: the frame is installed, hence allocated, and cannot be
                                // freed while we hold the stage2 lock (frames are unmapped under it
                                // before being freed); callers keep `buf` inside the page.
                                unsafe {
                                    core::ptr::copy_nonoverlapping(
                                        ptr.add((gpa & 0xfff) as usize),
                                        buf.as_mut_ptr(),
                                        buf.len(),
                                    )
                                }
                            }
                        }
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
            self.access(at, Access::READ, Io::Read(&mut buf[done..done + n]))?;
            done += n;
        }
        Ok(())
    }

    pub fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestFault> {
        let mut done = 0;
        while done < data.len() {
            let at = gpa + done as u64;
            let n = ((0x1000 - (at & 0xfff)) as usize).min(data.len() - done);
            self.access(at, Access::WRITE, Io::Write(&data[done..done + n]))?;
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
        let mut b = [0u8];
        self.access(gpa, Access::EXEC | Access::READ, Io::Read(&mut b))?;
        Ok(b[0])
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
