//! The VMM's own accesses to guest memory: `write_guest` / `read_guest`, the memslot path
//! `write_slot` / `read_slot`, and the vm-memory view.
//!
//! - With a [`MemoryAccess`] installed (the product installs its Vmar: `Vmar::read/write`),
//!   `read_guest` / `write_guest` go through the memory model directly: no userfaultfd round
//!   trip, no `mmap_lock`, copy-on-write exactly as a guest write;
//! - otherwise, and always for `read_slot` / `write_slot`, accesses go through the reservation
//!   with `process_vm_readv/writev`, so a page not yet installed raises the same userfaultfd
//!   event as a guest access (and is resolved by the same fault path), and an address the
//!   resolver refuses fails with an error instead of a signal.
//!
//! Invariants: no Rust reference into guest memory is ever created here (the reservation's
//! invariant that makes replacing its pieces sound); every path that writes through the
//! reservation (`write_slot`, the vm-memory view) first applies the reservation's deferred
//! write-protects over what it can write (`Reservation::seal_range` / `seal`), so a write to a
//! frame shared with a fork is a WP event, never a write in place.

use super::GuestVm;
use crate::addr::Gpa;
use crate::error::{Error, Result};

/// Reads and writes guest memory by guest-physical address without the memslot (the product:
/// the guest's `Vmar`).
pub trait MemoryAccess: Send {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> vmo::Result<()>;
    fn write(&self, gpa: u64, data: &[u8]) -> vmo::Result<()>;
}

impl<S: ept::Stage2 + Send + 'static> MemoryAccess for vmo::Vmar<S> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> vmo::Result<()> {
        vmo::Vmar::read(self, gpa, buf)
    }
    fn write(&self, gpa: u64, data: &[u8]) -> vmo::Result<()> {
        vmo::Vmar::write(self, gpa, data)
    }
}

impl GuestVm {
    /// Routes `read_guest` / `write_guest` through `access` from now on.
    pub fn set_memory_access(&mut self, access: impl MemoryAccess + 'static) {
        self.access = Some(Box::new(access));
    }

    /// Writes `data` at `gpa`: through the installed `MemoryAccess`, else as `write_slot`.
    /// Outside guest memory or refused: an error, never a signal.
    pub fn write_guest(&self, gpa: u64, data: &[u8]) -> Result<()> {
        match &self.access {
            Some(a) => a.write(gpa, data).map_err(Error::Vmo),
            None => self.write_slot(gpa, data),
        }
    }

    /// Reads `buf.len()` bytes at `gpa`; see `write_guest`.
    pub fn read_guest(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        match &self.access {
            Some(a) => a.read(gpa, buf).map_err(Error::Vmo),
            None => self.read_slot(gpa, buf),
        }
    }

    /// Writes `data` at `gpa` through the memslot's host range (pages not yet installed fault
    /// in through the resolver). Outside the memslot or refused by the resolver: an error.
    pub fn write_slot(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.host_access(gpa, data.as_ptr() as *mut u8, data.len(), true)
    }

    /// Reads `buf.len()` bytes at `gpa` through the memslot; see `write_slot`.
    pub fn read_slot(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.host_access(gpa, buf.as_mut_ptr(), buf.len(), false)
    }

    fn host_access(&self, gpa: u64, local: *mut u8, len: usize, write: bool) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let hva = self
            .res
            .hva_of(Gpa(gpa), len as u64)
            .ok_or(Error::OutsideGuest {
                gpa,
                len: len as u64,
            })?;
        if write {
            // Deferred write-protects of the pages written apply first (reservation.rs).
            self.res.seal_range(Gpa(gpa), len as u64)?;
        }
        let mut done = 0usize;
        while done < len {
            let l = libc::iovec {
                iov_base: local.wrapping_add(done).cast(),
                iov_len: len - done,
            };
            let r = libc::iovec {
                iov_base: hva.add(done as u64).as_mut_ptr(),
                iov_len: len - done,
            };
            // SAFETY: `l` describes the caller's own buffer of `len` bytes (we never write into
            // it for a write access); `r` lies inside the reservation and is checked by the
            // kernel, which fails with EFAULT instead of raising a signal.
            let n = unsafe {
                if write {
                    libc::process_vm_writev(libc::getpid(), &l, 1, &r, 1, 0)
                } else {
                    libc::process_vm_readv(libc::getpid(), &l, 1, &r, 1, 0)
                }
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Sys {
                    what: if write {
                        "write guest memory"
                    } else {
                        "read guest memory"
                    },
                    err,
                });
            }
            if n == 0 {
                return Err(Error::InvalidArgs(format!(
                    "guest memory at {:#x} is not accessible (refused by the resolver)",
                    gpa + done as u64
                )));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// A `vm-memory` view of guest RAM (the reservation). Accesses to pages not yet installed
    /// fault in through the resolver like guest accesses. Unlike `read_guest`/`write_guest`,
    /// an access the resolver refuses hits a poisoned page and raises SIGSEGV: use it only for
    /// ranges the memory model maps (devices check descriptors against the Vmar first).
    pub fn guest_memory(&self) -> Result<vm_memory::GuestMemoryMmap> {
        use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
        // The view can write anywhere: every deferred write-protect applies first.
        self.res.seal()?;
        // SAFETY: the reservation is a live mapping of exactly this size and these flags, and
        // it outlives every use through `self.res` (the view must not outlive the VM).
        let region = unsafe {
            MmapRegion::build_raw(
                self.res.hva().as_mut_ptr(),
                self.res.size() as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
        }
        .map_err(|e| Error::InvalidArgs(format!("vm-memory region: {e}")))?;
        let region = GuestRegionMmap::new(region, GuestAddress(self.res.gpa_base().raw()))
            .ok_or_else(|| Error::InvalidArgs("vm-memory region overflows".into()))?;
        GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| Error::InvalidArgs(format!("vm-memory: {e}")))
    }
}
