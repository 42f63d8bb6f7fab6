//! The userfaultfd syscall layer: open (a named [`Flavor`]), API handshake, register,
//! unregister, write-protect, wake, copy, read events. Types and ioctl numbers come from `linux-raw-sys` (no bindgen / libclang
//! needed); each number is also recomputed from its `_IOWR`/`_IOR`/`_IO` definition in
//! `<linux/userfaultfd.h>` and checked against the bindings at compile time.
//! Modes are named: [`RegisterMode`] (MISSING / WP), [`Protection`] and [`Wake`].
//!
//! Invariants:
//! - the descriptor is opened without `UFFD_USER_MODE_ONLY`, because KVM's accesses to guest
//!   memory (page walks, emulation, get_user_pages) are kernel-mode faults (KVM-FAULTS.md §3);
//! - the API handshake requires the flavor's [`Features`] — always `PAGEFAULT_FLAG_WP` and
//!   `WP_HUGETLBFS_SHMEM` (write-protect of memfd `MAP_SHARED` mappings); `Flavor::Sync` adds
//!   `THREAD_ID` (who faulted), `Flavor::AsyncWp` adds `WP_ASYNC` (the kernel resolves a write
//!   to a write-protected page itself, clearing the protection, and sends no message: the
//!   page's state is read back with `PAGEMAP_SCAN`, sys/pagemap.rs) and `WP_UNPOPULATED`
//!   (which the kernel implies for `WP_ASYNC`). Without them `open` fails with
//!   `Error::UffdUnavailable`;
//! - **hazard:** `WP_ASYNC` is a property of the whole descriptor: write protection on an
//!   `AsyncWp` descriptor never stops a write. Memory whose writes must reach the memory model
//!   (shared copy-on-write frames) is never registered on one (reservation.rs);
//! - the descriptor is non-blocking; readers wait with `poll`;
//! - `copy` (`UFFDIO_COPY`) is for ranges a caller registered itself (the benchmark's
//!   post-copy baseline); a `Reservation` is never answered with it (reservation.rs).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use linux_raw_sys::general as g;
use linux_raw_sys::ioctl as io;

use crate::error::{Error, Result};

// <linux/userfaultfd.h>, `struct uffdio_writeprotect.mode`; linux-raw-sys does not export
// these two bits.
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

/// `_IOC(dir, type, nr, size)` of `<asm-generic/ioctl.h>` (x86-64 layout).
const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (ty << 8) | nr
}
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
const UFFDIO: u32 = 0xAA;
const fn iowr<T>(nr: u32) -> u32 {
    ioc(IOC_READ | IOC_WRITE, UFFDIO, nr, std::mem::size_of::<T>())
}
const fn ior<T>(nr: u32) -> u32 {
    ioc(IOC_READ, UFFDIO, nr, std::mem::size_of::<T>())
}

// The bindings' numbers are what the header defines.
const _: () = assert!(io::UFFDIO_API == iowr::<g::uffdio_api>(0x3F));
const _: () = assert!(io::UFFDIO_REGISTER == iowr::<g::uffdio_register>(0x00));
const _: () = assert!(io::UFFDIO_UNREGISTER == ior::<g::uffdio_range>(0x01));
const _: () = assert!(io::UFFDIO_WAKE == ior::<g::uffdio_range>(0x02));
const _: () = assert!(io::UFFDIO_COPY == iowr::<g::uffdio_copy>(0x03));
const _: () = assert!(io::UFFDIO_WRITEPROTECT == iowr::<g::uffdio_writeprotect>(0x06));
/// `USERFAULTFD_IOC_NEW = _IO(0xAA, 0x00)` of `<linux/userfaultfd.h>` (the `/dev/userfaultfd`
/// ioctl; linux-raw-sys does not export it).
const USERFAULTFD_IOC_NEW: u32 = ioc(IOC_NONE, UFFDIO, 0x00, 0);

bitflags::bitflags! {
    /// `UFFDIO_REGISTER` modes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RegisterMode: u64 {
        /// Faults on missing pages (anonymous reservation pieces) become events.
        const MISSING = g::UFFDIO_REGISTER_MODE_MISSING as u64;
        /// Writes to write-protected pages become events.
        const WP = g::UFFDIO_REGISTER_MODE_WP as u64;
    }
}

bitflags::bitflags! {
    /// `UFFDIO_API` features a descriptor is opened with (see the module invariants).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Features: u64 {
        /// WP events carry the WP flag (write-protect mode at all).
        const PAGEFAULT_FLAG_WP = g::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64;
        /// Write-protect of shmem (memfd) and hugetlbfs mappings.
        const WP_HUGETLBFS_SHMEM = g::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64;
        /// Events carry the faulting thread's id.
        const THREAD_ID = g::UFFD_FEATURE_THREAD_ID as u64;
        /// Write-protect works on not-yet-populated (anonymous) PTEs too.
        const WP_UNPOPULATED = g::UFFD_FEATURE_WP_UNPOPULATED as u64;
        /// The kernel resolves WP faults itself (no event): write tracking, not interception.
        const WP_ASYNC = g::UFFD_FEATURE_WP_ASYNC as u64;
    }
}

/// The two kinds of descriptor the KVM backend uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Every fault is an event a thread must answer (MISSING pieces, writes to shared frames).
    Sync,
    /// Write protection only tracks writes (`WP_ASYNC`): no events, ever.
    AsyncWp,
}

impl Flavor {
    /// The features this flavor requires.
    pub fn features(self) -> Features {
        let wp = Features::PAGEFAULT_FLAG_WP | Features::WP_HUGETLBFS_SHMEM;
        match self {
            Flavor::Sync => wp | Features::THREAD_ID,
            Flavor::AsyncWp => wp | Features::WP_ASYNC | Features::WP_UNPOPULATED,
        }
    }
}

/// What `writeprotect` does to a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// Set write protection: a later write raises a WP event.
    Protect,
    /// Clear write protection.
    Unprotect,
}

/// Whether an ioctl that resolves pages also wakes the threads blocked on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    Wake,
    DontWake,
}

/// One page-fault event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    /// Faulting host virtual address (exact byte unless the kernel rounds it).
    pub addr: u64,
    /// The access was a write.
    pub write: bool,
    /// The fault is a write-protect fault (the page is installed but uffd-WP protected).
    pub wp: bool,
    /// Thread id of the faulting thread.
    pub tid: u32,
}

/// A userfaultfd descriptor.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    flavor: Flavor,
}

fn ioctl_err(what: &'static str) -> Error {
    Error::Sys {
        what,
        err: std::io::Error::last_os_error(),
    }
}

impl Uffd {
    /// Opens a synchronous userfaultfd (`Flavor::Sync`): the fault channel.
    pub fn open() -> Result<Self> {
        Self::open_flavor(Flavor::Sync)
    }

    /// Opens a write-tracking userfaultfd (`Flavor::AsyncWp`); see the module's hazard.
    pub fn open_async_wp() -> Result<Self> {
        Self::open_flavor(Flavor::AsyncWp)
    }

    /// Opens a userfaultfd of `flavor` with exactly its features.
    pub fn open_flavor(flavor: Flavor) -> Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: plain syscall with integer flags.
        let mut raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as i32;
        if raw < 0 {
            let sys_err = std::io::Error::last_os_error();
            // /dev/userfaultfd grants kernel-mode faults to whoever may open it.
            raw = open_dev_userfaultfd(flags).map_err(|dev_err| {
                Error::UffdUnavailable(format!(
                    "userfaultfd(2) failed ({sys_err}) and /dev/userfaultfd failed ({dev_err}); \
                     run as root or set vm.unprivileged_userfaultfd=1"
                ))
            })?;
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let want = flavor.features().bits();
        let mut api = g::uffdio_api {
            api: g::UFFD_API as u64,
            features: want,
            ioctls: 0,
        };
        // SAFETY: valid descriptor and a properly sized argument.
        if unsafe { libc::ioctl(fd.as_raw_fd(), io::UFFDIO_API as _, &mut api) } != 0 {
            return Err(Error::UffdUnavailable(format!(
                "UFFDIO_API with features {want:#x} ({flavor:?}) refused: {}",
                std::io::Error::last_os_error()
            )));
        }
        if api.features & want != want {
            return Err(Error::UffdUnavailable(format!(
                "kernel lacks userfaultfd features {:#x} (has {:#x})",
                want, api.features
            )));
        }
        Ok(Uffd { fd, flavor })
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// Registers `[addr, addr+len)` (all of it must be mapped) in `mode`.
    pub fn register(&self, addr: u64, len: u64, mode: RegisterMode) -> Result<()> {
        let mut reg = g::uffdio_register {
            range: g::uffdio_range { start: addr, len },
            mode: mode.bits(),
            ioctls: 0,
        };
        // SAFETY: valid descriptor and argument.
        if unsafe { libc::ioctl(self.raw(), io::UFFDIO_REGISTER as _, &mut reg) } != 0 {
            return Err(ioctl_err("UFFDIO_REGISTER"));
        }
        Ok(())
    }

    /// Unregisters `[addr, addr+len)` (all of it must be mapped; pieces registered on no
    /// descriptor are fine, pieces registered on another one are `EINVAL`). The kernel clears
    /// this descriptor's write protection of the range as it goes.
    pub fn unregister(&self, addr: u64, len: u64) -> Result<()> {
        let mut range = g::uffdio_range { start: addr, len };
        // SAFETY: valid descriptor and argument.
        if unsafe { libc::ioctl(self.raw(), io::UFFDIO_UNREGISTER as _, &mut range) } != 0 {
            return Err(ioctl_err("UFFDIO_UNREGISTER"));
        }
        Ok(())
    }

    /// Sets or clears write protection of `[addr, addr+len)`. Clearing also wakes threads
    /// blocked on the range unless `Wake::DontWake` (which the kernel refuses, `EINVAL`,
    /// together with `Protection::Protect`).
    pub fn writeprotect(&self, addr: u64, len: u64, prot: Protection, wake: Wake) -> Result<()> {
        let mut mode = 0;
        if prot == Protection::Protect {
            mode |= UFFDIO_WRITEPROTECT_MODE_WP;
        }
        if wake == Wake::DontWake {
            mode |= UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut arg = g::uffdio_writeprotect {
            range: g::uffdio_range { start: addr, len },
            mode,
        };
        // SAFETY: valid descriptor and argument.
        if unsafe { libc::ioctl(self.raw(), io::UFFDIO_WRITEPROTECT as _, &mut arg) } != 0 {
            return Err(ioctl_err("UFFDIO_WRITEPROTECT"));
        }
        Ok(())
    }

    /// Wakes threads blocked on faults in `[addr, addr+len)`.
    pub fn wake(&self, addr: u64, len: u64) -> Result<()> {
        let mut arg = g::uffdio_range { start: addr, len };
        // SAFETY: valid descriptor and argument.
        if unsafe { libc::ioctl(self.raw(), io::UFFDIO_WAKE as _, &mut arg) } != 0 {
            return Err(ioctl_err("UFFDIO_WAKE"));
        }
        Ok(())
    }

    /// Fills the missing pages `[dst, dst+len)` with a copy of `[src, src+len)` of this process
    /// (`UFFDIO_COPY`; both page aligned, `dst` registered MISSING) and wakes the threads
    /// blocked on them unless `Wake::DontWake`. A page already present is an error (`EEXIST`).
    pub fn copy(&self, dst: u64, src: u64, len: u64, wake: Wake) -> Result<()> {
        let mut arg = g::uffdio_copy {
            dst,
            src,
            len,
            mode: if wake == Wake::DontWake {
                g::UFFDIO_COPY_MODE_DONTWAKE as u64
            } else {
                0
            },
            copy: 0,
        };
        // SAFETY: valid descriptor and argument; the kernel checks both ranges.
        if unsafe { libc::ioctl(self.raw(), io::UFFDIO_COPY as _, &mut arg) } != 0 {
            return Err(ioctl_err("UFFDIO_COPY"));
        }
        Ok(())
    }

    /// Reads pending page-fault events into `out` (clearing it first); other event kinds are
    /// skipped. Returns without blocking when none are pending.
    pub fn read_faults(&self, out: &mut Vec<PageFault>) -> Result<()> {
        out.clear();
        const N: usize = 32;
        // SAFETY: uffd_msg is plain data; zeroed is a valid value.
        let mut msgs: [g::uffd_msg; N] = unsafe { std::mem::zeroed() };
        // SAFETY: the buffer is valid for N messages.
        let n = unsafe {
            libc::read(
                self.raw(),
                msgs.as_mut_ptr().cast(),
                std::mem::size_of_val(&msgs),
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(());
            }
            return Err(Error::Sys {
                what: "read(userfaultfd)",
                err,
            });
        }
        let count = n as usize / std::mem::size_of::<g::uffd_msg>();
        for m in &msgs[..count] {
            if m.event as u32 != g::UFFD_EVENT_PAGEFAULT {
                continue;
            }
            // SAFETY: the event says the union holds a page fault.
            let pf = unsafe { m.arg.pagefault };
            out.push(PageFault {
                addr: pf.address,
                write: pf.flags & g::UFFD_PAGEFAULT_FLAG_WRITE as u64 != 0,
                wp: pf.flags & g::UFFD_PAGEFAULT_FLAG_WP as u64 != 0,
                // SAFETY: THREAD_ID was negotiated, so the kernel fills `ptid`.
                tid: unsafe { pf.feat.ptid },
            });
        }
        Ok(())
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn open_dev_userfaultfd(flags: i32) -> std::io::Result<i32> {
    use std::os::unix::fs::OpenOptionsExt;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")?;
    // SAFETY: valid descriptor; the ioctl takes the flags as an integer.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}
