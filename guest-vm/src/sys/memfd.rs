//! The frame memfd's file operations: create and size it, punch a freed frame's memory out,
//! and read how much of it the kernel holds.
//!
//! Invariant: every function takes a descriptor this process owns; none touches memory.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::error::{last_os, Result};

/// A new memfd named `name` of `len` bytes (sparse: no memory is used until written).
pub fn create(name: &CStr, len: u64) -> Result<OwnedFd> {
    // SAFETY: `name` is a valid C string; the flags are valid.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(last_os("memfd_create"));
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: a valid descriptor and a plain length.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(last_os("ftruncate(memfd)"));
    }
    Ok(fd)
}

/// Gives the memory of `[offset, offset+len)` back to the kernel (`FALLOC_FL_PUNCH_HOLE`); the
/// range reads as zeros afterwards. The file size does not change.
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<()> {
    // SAFETY: a valid descriptor and plain integer arguments.
    let r = unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        return Err(last_os("fallocate(PUNCH_HOLE)"));
    }
    Ok(())
}

/// Bytes of the file the kernel actually holds.
pub fn resident_bytes(fd: BorrowedFd<'_>) -> Result<u64> {
    // SAFETY: `stat` is plain data, so all-zero is a valid value to pass as an out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a properly sized out-parameter.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(last_os("fstat(memfd)"));
    }
    Ok(st.st_blocks as u64 * 512)
}
