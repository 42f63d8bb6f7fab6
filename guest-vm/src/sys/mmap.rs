//! One owner of host mappings: every `mmap`, `mprotect` and `munmap` of the crate is here.
//!
//! - [`Mmap`]: a mapping this process made and owns; `Drop` unmaps it. Constructed with a
//!   [`Prot`], a [`Backing`] (anonymous, or a shared / private file mapping at an offset) and
//!   [`MapFlags`];
//! - [`Mmap::replace`] swaps a page-aligned piece *inside* an owned mapping for a new mapping
//!   (`MAP_FIXED`), [`Mmap::protect`] changes a piece's protection: both check that the piece
//!   lies inside the mapping, so a `MAP_FIXED` can never hit memory the mapping does not own;
//! - [`max_map_count`], [`ensure_max_map_count`] and [`map_error`]: the `vm.max_map_count`
//!   handling (each scattered install can cost up to two VMAs; `ENOMEM` from `mmap` or from a
//!   VMA split almost always means the limit).
//!
//! Invariants: an `Mmap`'s range is mapped from `new` until `drop`, with pieces possibly
//! replaced but never unmapped in between; `replace`/`protect` never touch bytes outside the
//! mapping. They are `unsafe` because the bytes of the piece change under anyone who holds a
//! Rust reference into it: owners use them only for memory that is reached through raw
//! pointers and system calls (guest memory, frames), never through references.

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::error::{Error, Result};
use ept::PAGE_SIZE;

/// Protection of a mapping or a piece of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prot {
    None,
    Read,
    ReadWrite,
}

impl Prot {
    fn bits(self) -> libc::c_int {
        match self {
            Prot::None => libc::PROT_NONE,
            Prot::Read => libc::PROT_READ,
            Prot::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        }
    }
}

/// What a mapping's pages are.
#[derive(Clone, Copy, Debug)]
pub enum Backing<'fd> {
    /// Private anonymous memory (zero-filled on first touch).
    Anonymous,
    /// `MAP_SHARED` pages of a file from byte `offset` (writes reach the file).
    Shared { fd: BorrowedFd<'fd>, offset: u64 },
    /// `MAP_PRIVATE` pages of a file from byte `offset` (the kernel's copy-on-write).
    Private { fd: BorrowedFd<'fd>, offset: u64 },
}

impl Backing<'_> {
    fn flags_fd_off(self) -> (libc::c_int, libc::c_int, libc::off_t) {
        match self {
            Backing::Anonymous => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0),
            Backing::Shared { fd, offset } => {
                (libc::MAP_SHARED, fd.as_raw_fd(), offset as libc::off_t)
            }
            Backing::Private { fd, offset } => {
                (libc::MAP_PRIVATE, fd.as_raw_fd(), offset as libc::off_t)
            }
        }
    }
}

bitflags::bitflags! {
    /// Extra `mmap` flags.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct MapFlags: u8 {
        /// `MAP_NORESERVE`: no swap reservation (sparse guest memory, frame memfds).
        const NORESERVE = 1 << 0;
        /// `MAP_POPULATE`: fault every page in now (present PTEs, e.g. for write-protect).
        const POPULATE = 1 << 1;
    }
}

impl MapFlags {
    fn bits_libc(self) -> libc::c_int {
        let mut f = 0;
        if self.contains(MapFlags::NORESERVE) {
            f |= libc::MAP_NORESERVE;
        }
        if self.contains(MapFlags::POPULATE) {
            f |= libc::MAP_POPULATE;
        }
        f
    }
}

/// A host mapping owned by this value; see the module documentation.
#[derive(Debug)]
pub struct Mmap {
    addr: u64,
    len: u64,
}

impl Mmap {
    /// Maps `len` bytes (a non-zero multiple of 4 KiB) where the kernel chooses.
    pub fn new(len: u64, prot: Prot, backing: Backing<'_>, flags: MapFlags) -> Result<Self> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidArgs(format!(
                "mapping length {len:#x} is not a non-zero multiple of 4 KiB"
            )));
        }
        let (kind, fd, off) = backing.flags_fd_off();
        // SAFETY: no address hint and no MAP_FIXED, so the kernel picks a range that overlaps
        // nothing; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                prot.bits(),
                kind | flags.bits_libc(),
                fd,
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(map_error("mmap", std::io::Error::last_os_error()));
        }
        Ok(Mmap {
            addr: p as u64,
            len,
        })
    }

    /// Start of the mapping.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `[addr, addr+len)` is a non-empty page-aligned piece of this mapping.
    pub fn covers(&self, addr: u64, len: u64) -> bool {
        len > 0
            && addr.is_multiple_of(PAGE_SIZE)
            && len.is_multiple_of(PAGE_SIZE)
            && addr >= self.addr
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.addr + self.len)
    }

    fn check(&self, what: &'static str, addr: u64, len: u64) -> Result<()> {
        if self.covers(addr, len) {
            Ok(())
        } else {
            Err(Error::InvalidArgs(format!(
                "{what}: {addr:#x}+{len:#x} is not a page-aligned piece of the mapping at \
                 {:#x}+{:#x}",
                self.addr, self.len
            )))
        }
    }

    /// Replaces the piece `[addr, addr+len)` of this mapping by a new mapping (`MAP_FIXED`).
    /// `what` names the operation in errors; `ENOMEM` is reported as `MapCountLimit`.
    ///
    /// # Safety
    /// No Rust reference into the piece may be live: its bytes change under it.
    pub unsafe fn replace(
        &self,
        what: &'static str,
        addr: u64,
        len: u64,
        prot: Prot,
        backing: Backing<'_>,
        flags: MapFlags,
    ) -> Result<()> {
        self.check(what, addr, len)?;
        let (kind, fd, off) = backing.flags_fd_off();
        // SAFETY: `check` proved the piece lies inside our own mapping, so MAP_FIXED replaces
        // only memory this value owns; the caller promises no reference into it is live.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len as usize,
                prot.bits(),
                kind | flags.bits_libc() | libc::MAP_FIXED,
                fd,
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(map_error(what, std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Changes the protection of the piece `[addr, addr+len)` of this mapping.
    ///
    /// # Safety
    /// As for `replace`: taking away access under a live reference would make it fault.
    pub unsafe fn protect(
        &self,
        what: &'static str,
        addr: u64,
        len: u64,
        prot: Prot,
    ) -> Result<()> {
        self.check(what, addr, len)?;
        // SAFETY: `check` proved the piece lies inside our own mapping; the caller promises no
        // reference into it is live.
        if unsafe { libc::mprotect(addr as *mut libc::c_void, len as usize, prot.bits()) } != 0 {
            return Err(map_error(what, std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `new` and belongs to this value alone; it is unmapped
        // exactly once, here.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

/// `vm.max_map_count` as a number.
pub fn max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Raises `vm.max_map_count` to at least `min` (root only). Returns the value now in force.
pub fn ensure_max_map_count(min: u64) -> Result<u64> {
    let cur = max_map_count().unwrap_or(0);
    if cur >= min {
        return Ok(cur);
    }
    std::fs::write("/proc/sys/vm/max_map_count", min.to_string()).map_err(|e| {
        Error::MapCountLimit {
            limit: cur,
            detail: format!("writing /proc/sys/vm/max_map_count failed: {e}"),
        }
    })?;
    Ok(max_map_count().unwrap_or(min))
}

/// The error for a failed mapping operation: `ENOMEM` is reported as the map-count limit it
/// almost always is here (a VMA split or a new VMA over `vm.max_map_count`).
pub fn map_error(what: &'static str, err: std::io::Error) -> Error {
    if err.raw_os_error() == Some(libc::ENOMEM) {
        Error::MapCountLimit {
            limit: max_map_count().unwrap_or(0),
            detail: format!("{what}: {err}"),
        }
    } else {
        Error::Sys { what, err }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_outside_the_mapping_are_refused() {
        let m = Mmap::new(
            4 * PAGE_SIZE,
            Prot::ReadWrite,
            Backing::Anonymous,
            MapFlags::NORESERVE,
        )
        .unwrap();
        let a = m.addr();
        assert!(m.covers(a, 4 * PAGE_SIZE));
        assert!(!m.covers(a + PAGE_SIZE, 4 * PAGE_SIZE));
        assert!(!m.covers(a + 1, PAGE_SIZE));
        assert!(!m.covers(a, 0));
        assert!(!m.covers(u64::MAX - PAGE_SIZE + 1, PAGE_SIZE));
        // SAFETY: the test holds no reference into the mapping.
        unsafe {
            assert!(m
                .replace(
                    "t",
                    a + 3 * PAGE_SIZE,
                    2 * PAGE_SIZE,
                    Prot::Read,
                    Backing::Anonymous,
                    MapFlags::empty()
                )
                .is_err());
            assert!(m
                .protect("t", a - PAGE_SIZE, PAGE_SIZE, Prot::Read)
                .is_err());
            m.replace(
                "t",
                a + PAGE_SIZE,
                PAGE_SIZE,
                Prot::Read,
                Backing::Anonymous,
                MapFlags::empty(),
            )
            .unwrap();
            m.protect("t", a, PAGE_SIZE, Prot::None).unwrap();
        }
        assert!(Mmap::new(0, Prot::Read, Backing::Anonymous, MapFlags::empty()).is_err());
        assert!(Mmap::new(100, Prot::Read, Backing::Anonymous, MapFlags::empty()).is_err());
    }
}
