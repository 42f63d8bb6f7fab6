//! The kernel's own mechanisms the benchmark compares our paths with, measured in the same
//! process on the same machine:
//! - `linux_fork`: `fork()` of this process while it holds `size` bytes of resident anonymous
//!   memory; the child calls `_exit(0)`; the time runs until `waitpid` returns;
//! - `private_memfd_vm`: the Firecracker restore model — a new KVM VM + vCPU whose memslot is
//!   a `MAP_PRIVATE` mapping of a memfd holding the snapshot (kernel copy-on-write);
//! - `Overlay`: replaces part of a guest's memslot host range with plain anonymous memory
//!   (KVM + the kernel's page fault, no userfaultfd) or with a `MAP_PRIVATE` memfd mapping;
//! - `CopyServer` (`uffd_copy_overlay`): the post-copy / lazy-restore mechanism — an anonymous
//!   overlay registered MISSING with a userfaultfd of its own, whose handler thread answers
//!   every fault with `UFFDIO_COPY` of a filled page;
//! - `memcpy_4k`: copying one 4 KiB page.
//!
//! Invariants: every mapping made here is unmapped by its owner's `Drop`, and a `CopyServer`'s
//! thread is stopped and joined by its `finish` or `Drop`; overlays only ever cover a range
//! inside a live reservation of the caller's guest.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use guest_vm::sys::memfd;
use guest_vm::sys::mmap::{Backing, MapFlags, Mmap, Prot};
use guest_vm::sys::uffd::{RegisterMode, Uffd, Wake};
use guest_vm::vmm::vcpu_state::VcpuState;
use guest_vm::{Error, Gpa, Guest, Result, PAGE_SIZE};

/// `len` bytes of anonymous memory with every page written (resident).
pub fn resident_anon(len: u64) -> Result<Mmap> {
    let m = Mmap::new(len, Prot::ReadWrite, Backing::Anonymous, MapFlags::empty())?;
    for off in (0..len).step_by(PAGE_SIZE as usize) {
        // SAFETY: `off < len`, inside the fresh read-write mapping nothing else uses.
        unsafe { m.as_ptr().add(off as usize).write_volatile(1) };
    }
    Ok(m)
}

fn last_os(what: &'static str) -> Error {
    Error::Sys {
        what,
        err: std::io::Error::last_os_error(),
    }
}

/// One `fork()` + child `_exit(0)` + `waitpid`, timed.
pub fn linux_fork() -> Result<Duration> {
    let t = Instant::now();
    // SAFETY: the child only calls the async-signal-safe `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_os("fork"));
    }
    if pid == 0 {
        // SAFETY: terminating the child without running any parent state.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return Err(last_os("waitpid"));
    }
    Ok(t.elapsed())
}

/// A memfd of `len` bytes whose every page is written (the "snapshot file").
pub fn filled_memfd(len: u64) -> Result<OwnedFd> {
    let fd = memfd::create(c"bench-snapshot", len)?;
    let m = Mmap::new(
        len,
        Prot::ReadWrite,
        Backing::Shared {
            fd: fd.as_fd(),
            offset: 0,
        },
        MapFlags::empty(),
    )?;
    for off in (0..len).step_by(PAGE_SIZE as usize) {
        // SAFETY: `off < len`, inside the fresh read-write mapping nothing else uses.
        unsafe { m.as_ptr().add(off as usize).write_volatile(0x5a) };
    }
    Ok(fd)
}

/// A VM restored the Firecracker way: memslot = `MAP_PRIVATE` view of `memfd`.
pub struct PrivateVm {
    _vcpu: VcpuFd,
    _vm: VmFd,
    _mem: Mmap,
}

/// Creates a VM + vCPU over a private mapping of `memfd` (`len` bytes) and restores `state`.
pub fn private_memfd_vm(
    kvm: &Kvm,
    memfd: &OwnedFd,
    len: u64,
    state: &VcpuState,
) -> Result<PrivateVm> {
    let kvm_err = |what| move |err| Error::Kvm { what, err };
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let mem = Mmap::new(
        len,
        Prot::ReadWrite,
        Backing::Private {
            fd: memfd.as_fd(),
            offset: 0,
        },
        MapFlags::NORESERVE,
    )?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: len,
        userspace_addr: mem.addr(),
    };
    // SAFETY: the mapping outlives the VM (both owned by `PrivateVm`, VM dropped first).
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    state.restore(&vcpu)?;
    Ok(PrivateVm {
        _vcpu: vcpu,
        _vm: vm,
        _mem: mem,
    })
}

/// How an `Overlay` backs a range of a guest's memslot.
#[derive(Clone, Copy, Debug)]
pub enum OverlayKind {
    /// Anonymous private memory: KVM faults go to the kernel's page-fault path only.
    Anonymous,
    /// A `MAP_PRIVATE` view of a filled memfd: guest writes are kernel copy-on-write.
    PrivateMemfd,
}

/// Replaces guest-physical `[gpa, gpa+len)` of `guest`'s memslot with kernel-managed memory
/// (see `OverlayKind`). The guest's Vmar does not know; use it only for ranges the guest's
/// Vmar never installed, and drop the guest afterwards.
pub fn overlay(guest: &Guest, gpa: u64, len: u64, kind: OverlayKind) -> Result<Option<OwnedFd>> {
    let res = guest.vm().reservation();
    let hva = res
        .hva_of(Gpa(gpa), len)
        .ok_or(Error::OutsideGuest { gpa, len })?;
    let fd = match kind {
        OverlayKind::Anonymous => None,
        OverlayKind::PrivateMemfd => Some(filled_memfd(len)?),
    };
    let backing = match &fd {
        None => Backing::Anonymous,
        Some(f) => Backing::Private {
            fd: f.as_fd(),
            offset: 0,
        },
    };
    // SAFETY: guest memory is never borrowed as a reference (the reservation's invariant);
    // the range lies inside the guest's own reservation, whose Drop unmaps it with the rest.
    unsafe {
        res.host_mapping().replace(
            "mmap(overlay)",
            hva.raw(),
            len,
            Prot::ReadWrite,
            backing,
            MapFlags::NORESERVE,
        )?
    };
    Ok(fd)
}

/// A running `UFFDIO_COPY` fault server over one overlay (see `uffd_copy_overlay`).
pub struct CopyServer {
    stop: EventFd,
    handle: Option<JoinHandle<Result<u64>>>,
    /// The page every fault is filled from; outlives the thread (joined first).
    _src: Mmap,
}

/// Replaces `[gpa, gpa+len)` of `guest` with an anonymous `Overlay` registered MISSING with a
/// new userfaultfd, served by a thread that answers each fault with `UFFDIO_COPY` of a filled
/// page (which wakes the faulter). Same caveats as `overlay`. On a copy error the thread
/// exits and closes its userfaultfd, so blocked faulters fall back to kernel faults instead of
/// hanging; `finish` reports the error.
pub fn uffd_copy_overlay(guest: &Guest, gpa: u64, len: u64) -> Result<CopyServer> {
    overlay(guest, gpa, len, OverlayKind::Anonymous)?;
    let hva = guest
        .vm()
        .reservation()
        .hva_of(Gpa(gpa), len)
        .ok_or(Error::OutsideGuest { gpa, len })?;
    let uffd = Uffd::open()?;
    uffd.register(hva.raw(), len, RegisterMode::MISSING)?;
    let src = resident_anon(PAGE_SIZE)?;
    let src_addr = src.addr();
    let sys = |what| move |err| Error::Sys { what, err };
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(sys("eventfd"))?;
    let stop_rx = stop.try_clone().map_err(sys("eventfd clone"))?;
    let handle = std::thread::Builder::new()
        .name("uffd-copy".into())
        .spawn(move || serve_copies(uffd, src_addr, &stop_rx))
        .map_err(sys("spawn UFFDIO_COPY thread"))?;
    Ok(CopyServer {
        stop,
        handle: Some(handle),
        _src: src,
    })
}

impl CopyServer {
    /// Stops the thread; returns the number of pages it copied, or its error.
    pub fn finish(mut self) -> Result<u64> {
        self.join()
    }

    fn join(&mut self) -> Result<u64> {
        let _ = self.stop.write(1);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::BadState("UFFDIO_COPY thread panicked".into())),
            None => Ok(0),
        }
    }
}

impl Drop for CopyServer {
    fn drop(&mut self) {
        let _ = self.join();
    }
}

/// The `CopyServer` thread: owns the userfaultfd (dropping it on return releases any blocked
/// faulter) and copies the page at `src` into every faulting page until `stop` fires.
fn serve_copies(uffd: Uffd, src: u64, stop: &EventFd) -> Result<u64> {
    let mut events = Vec::new();
    let mut copies = 0;
    loop {
        let mut fds = [uffd.raw(), stop.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `fds` is an array of two initialized pollfds that outlives the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Sys {
                what: "poll(userfaultfd)",
                err,
            });
        }
        if fds[1].revents != 0 {
            return Ok(copies);
        }
        uffd.read_faults(&mut events)?;
        for pf in &events {
            uffd.copy(pf.addr & !(PAGE_SIZE - 1), src, PAGE_SIZE, Wake::Wake)?;
            copies += 1;
        }
    }
}

/// Copying `pages` 4 KiB pages scattered over a `mib` MiB buffer into another (both resident,
/// larger than the caches, a different spread each round): median time for the whole set.
pub fn memcpy_scattered(pages: usize, mib: usize) -> Result<Duration> {
    let len = mib << 20;
    // Both buffers written first (resident: a calloc'd page would fault on its first write).
    let src = vec![0x5au8; len];
    let mut dst = vec![0xa5u8; len];
    let page = PAGE_SIZE as usize;
    let slots = len / page;
    let step = (slots / pages.max(1)).max(1);
    let mut samples = Vec::new();
    for round in 0..21 {
        let t = Instant::now();
        for i in 0..pages {
            let k = ((i * step + round * 7) % slots) * page;
            dst[k..k + page].copy_from_slice(&src[k..k + page]);
        }
        std::hint::black_box(&mut dst);
        samples.push(t.elapsed());
    }
    samples.sort();
    Ok(samples[samples.len() / 2])
}

/// Median-free single sample: copying one 4 KiB page `n` times between distinct resident
/// pages; returns the time per copy.
pub fn memcpy_4k(n: usize) -> Duration {
    let src = vec![0x5au8; PAGE_SIZE as usize * 64];
    let mut dst = vec![0u8; PAGE_SIZE as usize * 64];
    let t = Instant::now();
    for i in 0..n {
        let k = (i % 64) * PAGE_SIZE as usize;
        dst[k..k + PAGE_SIZE as usize].copy_from_slice(&src[k..k + PAGE_SIZE as usize]);
        std::hint::black_box(&mut dst);
    }
    t.elapsed() / n.max(1) as u32
}
