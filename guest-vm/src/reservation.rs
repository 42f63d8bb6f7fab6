//! `Reservation`: the host range behind one KVM memslot, and the userfaultfd watching it.
//!
//! The range is an anonymous `PROT_READ|PROT_WRITE` `MAP_PRIVATE|MAP_NORESERVE` mapping (not
//! PROT_NONE: a PROT_NONE page fails KVM's permission check before userfaultfd sees it,
//! KVM-FAULTS.md Q9), registered with userfaultfd MISSING, so every first touch of a page — by
//! the guest, by KVM's own page walk, or by the VMM — becomes a userfaultfd event with its
//! address. `KvmStage2` replaces pieces of it with memfd frames and puts anonymous pieces back.
//!
//! Invariants:
//! - the mapping lives exactly as long as this value (unmapped on drop); every piece of it is
//!   either an anonymous MISSING-registered reservation piece, a memfd frame installed by
//!   `KvmStage2` (registered WP), or a poisoned page (`poison`) after a failed resolution,
//!   until `unpoison`;
//! - anonymous pieces never hold data: a MISSING fault is only ever answered by installing a
//!   frame over the page (never by `UFFDIO_COPY`/zeropage into the anonymous piece).

use std::sync::Arc;

use crate::uffd::Uffd;
use crate::{last_os, Error, Result, PAGE_SIZE};

/// The host range of one memslot; shared (`Arc`) by the Stage2 backend, the fault thread and
/// the VM.
#[derive(Debug)]
pub struct Reservation {
    hva: u64,
    size: u64,
    gpa_base: u64,
    uffd: Arc<Uffd>,
}

impl Reservation {
    /// Reserves `size` bytes (multiple of 4 KiB) for guest-physical `[gpa_base, gpa_base+size)`
    /// and registers them with `uffd` in MISSING mode.
    pub fn new(gpa_base: u64, size: u64, uffd: Arc<Uffd>) -> Result<Self> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) || !gpa_base.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidArgs(format!(
                "reservation gpa {gpa_base:#x} size {size:#x} not page aligned / empty"
            )));
        }
        // SAFETY: a fresh anonymous mapping; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_os("mmap(reservation)"));
        }
        let r = Reservation {
            hva: p as u64,
            size,
            gpa_base,
            uffd,
        };
        r.uffd.register(r.hva, size, true, false)?;
        Ok(r)
    }

    /// Host address of the start of the range (the memslot's `userspace_addr`).
    pub fn hva(&self) -> u64 {
        self.hva
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Guest-physical address of the start of the range.
    pub fn gpa_base(&self) -> u64 {
        self.gpa_base
    }

    pub fn uffd(&self) -> &Arc<Uffd> {
        &self.uffd
    }

    /// The guest-physical address behind host address `hva`, if it lies in this range.
    pub fn gpa_of(&self, hva: u64) -> Option<u64> {
        (hva >= self.hva && hva - self.hva < self.size).then(|| self.gpa_base + (hva - self.hva))
    }

    /// The host address of `[gpa, gpa+len)`, if the whole range lies in this reservation.
    pub fn hva_of(&self, gpa: u64, len: u64) -> Option<u64> {
        let off = gpa.checked_sub(self.gpa_base)?;
        (off.checked_add(len)? <= self.size).then_some(self.hva + off)
    }

    /// Puts an anonymous MISSING-registered piece back over `[gpa, gpa+len)` (page aligned).
    pub(crate) fn restore(&self, gpa: u64, len: u64) -> Result<()> {
        let hva = self
            .hva_of(gpa, len)
            .ok_or_else(|| Error::InvalidArgs(format!("restore {gpa:#x}+{len:#x} outside")))?;
        // SAFETY: the range lies inside our own mapping; MAP_FIXED replaces only it.
        let p = unsafe {
            libc::mmap(
                hva as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(crate::kvm_stage2::map_err("mmap(anonymous piece)"));
        }
        self.uffd.register(hva, len, true, false)
    }

    /// Makes the page at `hva` fail with a plain fault, so a vCPU that retries the access gets
    /// `KVM_RUN = -EFAULT` (CPL3) instead of blocking forever on an unresolvable userfaultfd
    /// event. Used after a resolver error. A not-present page becomes a PROT_NONE piece; an
    /// installed page that refused a write (`installed`) keeps its frame but becomes
    /// PROT_READ (the Stage2 record stays true). `unpoison` undoes either.
    pub(crate) fn poison(&self, hva: u64, installed: bool) -> Result<()> {
        let page = hva & !(PAGE_SIZE - 1);
        if self.gpa_of(page).is_none() {
            return Err(Error::InvalidArgs(format!("poison {hva:#x} outside")));
        }
        let ok = if installed {
            // SAFETY: the page lies inside our own mapping.
            unsafe {
                libc::mprotect(
                    page as *mut libc::c_void,
                    PAGE_SIZE as usize,
                    libc::PROT_READ,
                ) == 0
            }
        } else {
            // SAFETY: the page lies inside our own mapping; MAP_FIXED replaces only it.
            let p = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    PAGE_SIZE as usize,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            p != libc::MAP_FAILED
        };
        if !ok {
            return Err(last_os("poison guest page"));
        }
        Ok(())
    }

    /// Undoes `poison(hva, installed)`: the page faults through userfaultfd again.
    pub(crate) fn unpoison(&self, hva: u64, installed: bool) -> Result<()> {
        let page = hva & !(PAGE_SIZE - 1);
        let gpa = self
            .gpa_of(page)
            .ok_or_else(|| Error::InvalidArgs(format!("unpoison {hva:#x} outside")))?;
        if installed {
            // SAFETY: the page lies inside our own mapping. The uffd-WP bit survives mprotect.
            let r = unsafe {
                libc::mprotect(
                    page as *mut libc::c_void,
                    PAGE_SIZE as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            if r != 0 {
                return Err(last_os("unpoison guest page"));
            }
            Ok(())
        } else {
            self.restore(gpa, PAGE_SIZE)
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.hva as *mut libc::c_void, self.size as usize) };
    }
}
