//! `Reservation`: the host range behind one KVM memslot, and the userfaultfd watching it.
//!
//! The range is an anonymous `PROT_READ|PROT_WRITE` `MAP_PRIVATE|MAP_NORESERVE` mapping (not
//! PROT_NONE: a PROT_NONE page fails KVM's permission check before userfaultfd sees it,
//! KVM-FAULTS.md Q9), registered with userfaultfd MISSING, so every first touch of a page — by
//! the guest, by KVM's own page walk, or by the VMM — becomes a userfaultfd event with its
//! address.
//!
//! This file is the one writer of the memslot's host range: installing a frame
//! (`install_frame`, for `KvmStage2`), putting an anonymous piece back (`restore`), write
//! protection (`write_protect`), and poisoning a page after a refused fault (`poison` /
//! `unpoison`, for the fault thread). Addresses are typed: the guest side speaks [`Gpa`], the
//! host side [`Hva`], frames [`MemfdOffset`].
//!
//! Invariants:
//! - the mapping lives exactly as long as this value (unmapped on drop); every piece of it is
//!   either an anonymous MISSING-registered reservation piece, a memfd frame installed by
//!   `install_frame` (registered WP), or a poisoned page (`poison`) after a failed resolution,
//!   until `unpoison`;
//! - anonymous pieces never hold data: a MISSING fault is only ever answered by installing a
//!   frame over the page (never by `UFFDIO_COPY`/zeropage into the anonymous piece);
//! - guest memory is never borrowed as a Rust reference: it is reached through system calls
//!   (`process_vm_readv/writev`), volatile accessors (vm-memory) and KVM, which is what makes
//!   replacing pieces of the mapping sound.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use crate::addr::{Gpa, Hva, MemfdOffset};
use crate::error::{Error, Result};
use crate::sys::mmap::{Backing, MapFlags, Mmap, Prot};
use crate::sys::uffd::{Protection, RegisterMode, Uffd, Wake};
use ept::PAGE_SIZE;

/// The host range of one memslot; shared (`Arc`) by the Stage2 backend, the fault thread and
/// the VM.
#[derive(Debug)]
pub struct Reservation {
    map: Mmap,
    gpa_base: Gpa,
    uffd: Arc<Uffd>,
}

impl Reservation {
    /// Reserves `size` bytes (multiple of 4 KiB) for guest-physical `[gpa_base, gpa_base+size)`
    /// and registers them with `uffd` in MISSING mode.
    pub fn new(gpa_base: Gpa, size: u64, uffd: Arc<Uffd>) -> Result<Self> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) || !gpa_base.0.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Misaligned {
                gpa: gpa_base.0,
                len: size,
            });
        }
        let map = Mmap::new(
            size,
            Prot::ReadWrite,
            Backing::Anonymous,
            MapFlags::NORESERVE,
        )?;
        let r = Reservation {
            map,
            gpa_base,
            uffd,
        };
        r.uffd.register(r.map.addr(), size, RegisterMode::MISSING)?;
        Ok(r)
    }

    /// Host address of the start of the range (the memslot's `userspace_addr`).
    pub fn hva(&self) -> Hva {
        Hva(self.map.addr())
    }

    pub fn size(&self) -> u64 {
        self.map.len()
    }

    /// Guest-physical address of the start of the range.
    pub fn gpa_base(&self) -> Gpa {
        self.gpa_base
    }

    pub fn uffd(&self) -> &Arc<Uffd> {
        &self.uffd
    }

    /// The guest-physical address behind host address `hva`, if it lies in this range.
    pub fn gpa_of(&self, hva: Hva) -> Option<Gpa> {
        let off = hva.0.checked_sub(self.map.addr())?;
        (off < self.size()).then(|| Gpa(self.gpa_base.0 + off))
    }

    /// The host address of `[gpa, gpa+len)`, if the whole range lies in this reservation.
    pub fn hva_of(&self, gpa: Gpa, len: u64) -> Option<Hva> {
        let off = gpa.0.checked_sub(self.gpa_base.0)?;
        (off.checked_add(len)? <= self.size()).then_some(Hva(self.map.addr() + off))
    }

    /// The host address of the page-aligned, non-empty range `[gpa, gpa+len)`.
    fn piece(&self, gpa: Gpa, len: u64) -> Result<Hva> {
        if len == 0 || !gpa.0.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Misaligned { gpa: gpa.0, len });
        }
        self.hva_of(gpa, len)
            .ok_or(Error::OutsideGuest { gpa: gpa.0, len })
    }

    /// Installs `len` bytes of the frame memfd `memfd` from `frame` at `gpa`: a `MAP_SHARED`
    /// read-write mapping registered WP, write-protected unless `writable` (read-only installs
    /// are populated first: write protection applies to present PTEs).
    pub(crate) fn install_frame(
        &self,
        gpa: Gpa,
        len: u64,
        memfd: BorrowedFd<'_>,
        frame: MemfdOffset,
        writable: bool,
    ) -> Result<()> {
        let hva = self.piece(gpa, len)?;
        let flags = if writable {
            MapFlags::empty()
        } else {
            MapFlags::POPULATE
        };
        let backing = Backing::Shared {
            fd: memfd,
            offset: frame.0,
        };
        // SAFETY: guest memory is never borrowed as a reference (module invariants).
        unsafe {
            self.map.replace(
                "mmap(MAP_SHARED|MAP_FIXED frame)",
                hva.0,
                len,
                Prot::ReadWrite,
                backing,
                flags,
            )?
        };
        // Registering can split VMAs too: ENOMEM there is the same map-count limit.
        self.uffd
            .register(hva.0, len, RegisterMode::WP)
            .map_err(|e| match e {
                Error::Sys { what, err } => crate::sys::mmap::map_error(what, err),
                other => other,
            })?;
        if !writable {
            self.uffd
                .writeprotect(hva.0, len, Protection::Protect, Wake::Wake)?;
        }
        Ok(())
    }

    /// Sets or clears uffd write protection of the installed range `[gpa, gpa+len)`.
    pub(crate) fn write_protect(&self, gpa: Gpa, len: u64, prot: Protection) -> Result<()> {
        let hva = self.piece(gpa, len)?;
        self.uffd.writeprotect(hva.0, len, prot, Wake::Wake)
    }

    /// Puts an anonymous MISSING-registered piece back over `[gpa, gpa+len)` (page aligned).
    pub(crate) fn restore(&self, gpa: Gpa, len: u64) -> Result<()> {
        let hva = self.piece(gpa, len)?;
        // SAFETY: guest memory is never borrowed as a reference (module invariants).
        unsafe {
            self.map.replace(
                "mmap(anonymous piece)",
                hva.0,
                len,
                Prot::ReadWrite,
                Backing::Anonymous,
                MapFlags::NORESERVE,
            )?
        };
        self.uffd.register(hva.0, len, RegisterMode::MISSING)
    }

    /// Makes the page at `hva` fail with a plain fault, so a vCPU that retries the access gets
    /// `KVM_RUN = -EFAULT` (CPL3) instead of blocking forever on an unresolvable userfaultfd
    /// event. Used after a resolver error. A not-present page becomes a PROT_NONE piece; an
    /// installed page that refused a write (`installed`) keeps its frame but becomes
    /// PROT_READ (the Stage2 record stays true). `unpoison` undoes either.
    pub(crate) fn poison(&self, hva: Hva, installed: bool) -> Result<()> {
        let page = hva.0 & !(PAGE_SIZE - 1);
        if self.gpa_of(Hva(page)).is_none() {
            return Err(Error::InvalidArgs(format!("poison {:#x} outside", hva.0)));
        }
        if installed {
            // SAFETY: guest memory is never borrowed as a reference (module invariants).
            unsafe {
                self.map
                    .protect("poison guest page", page, PAGE_SIZE, Prot::Read)
            }
        } else {
            // SAFETY: as above.
            unsafe {
                self.map.replace(
                    "poison guest page",
                    page,
                    PAGE_SIZE,
                    Prot::None,
                    Backing::Anonymous,
                    MapFlags::NORESERVE,
                )
            }
        }
    }

    /// Undoes `poison(hva, installed)`: the page faults through userfaultfd again.
    pub(crate) fn unpoison(&self, hva: Hva, installed: bool) -> Result<()> {
        let page = hva.0 & !(PAGE_SIZE - 1);
        let gpa = self
            .gpa_of(Hva(page))
            .ok_or_else(|| Error::InvalidArgs(format!("unpoison {:#x} outside", hva.0)))?;
        if installed {
            // SAFETY: guest memory is never borrowed as a reference (module invariants). The
            // uffd-WP bit survives mprotect.
            unsafe {
                self.map
                    .protect("unpoison guest page", page, PAGE_SIZE, Prot::ReadWrite)
            }
        } else {
            self.restore(gpa, PAGE_SIZE)
        }
    }

    /// The host mapping itself, for benchmarks that replace a piece of guest memory with a
    /// kernel mechanism they compare against (`Mmap::replace` is `unsafe`; such a caller
    /// breaks this type's invariants for that piece on purpose and must not hand it back to
    /// the memory model).
    pub fn host_mapping(&self) -> &Mmap {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_translate_both_ways_and_stay_inside() {
        let uffd = Arc::new(Uffd::open().unwrap());
        let r = Reservation::new(Gpa(0x10_0000), 16 * PAGE_SIZE, uffd).unwrap();
        let hva = r.hva_of(Gpa(0x10_1000), PAGE_SIZE).unwrap();
        assert_eq!(hva, r.hva().add(PAGE_SIZE));
        assert_eq!(r.gpa_of(hva), Some(Gpa(0x10_1000)));
        assert_eq!(r.hva_of(Gpa(0xf_f000), PAGE_SIZE), None);
        assert_eq!(r.hva_of(Gpa(0x10_0000), 17 * PAGE_SIZE), None);
        assert_eq!(r.hva_of(Gpa(0x10_0000), u64::MAX), None);
        assert_eq!(r.gpa_of(r.hva().add(16 * PAGE_SIZE)), None);
        assert!(matches!(
            r.restore(Gpa(0x10_0001), PAGE_SIZE),
            Err(Error::Misaligned { .. })
        ));
        assert!(matches!(
            r.restore(Gpa(0x20_0000), PAGE_SIZE),
            Err(Error::OutsideGuest { .. })
        ));
        assert!(Reservation::new(Gpa(1), PAGE_SIZE, r.uffd().clone()).is_err());
    }
}
