//! The `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap` (Linux ≥ 6.7): which pages of a range an
//! async write-protecting userfaultfd saw written, re-arming them in the same walk.
//!
//! `struct pm_scan_arg` / `struct page_region` and the `PAGE_IS_*` / `PM_SCAN_*` constants come
//! from `linux-raw-sys`; the ioctl number (`_IOWR('f', 16, struct pm_scan_arg)` of
//! `<linux/fs.h>`, which linux-raw-sys does not export) is computed here, and both the number and
//! the struct sizes are checked at compile time.
//!
//! Invariants:
//! - the descriptor is this process's own pagemap, opened once; a scan reads and changes only
//!   page-table state of this process (no page contents);
//! - [`Pagemap::harvest_written`] always asks for `PM_SCAN_CHECK_WPASYNC`: a range that is not
//!   entirely registered write-protect on an `Flavor::AsyncWp` userfaultfd is refused with
//!   `EPERM` instead of being silently skipped or half-scanned;
//! - the scan reports exactly the pages it re-armed (`PM_SCAN_WP_MATCHING`); when the result
//!   buffer fills, the kernel stops at `walk_end` and the next call resumes there, so no page
//!   is re-armed without being reported.

use std::fs::File;
use std::os::fd::AsRawFd;

use linux_raw_sys::general as g;

use crate::error::{Error, Result};
use ept::PAGE_SIZE;

/// `_IOC(dir, type, nr, size)` of `<asm-generic/ioctl.h>` (x86-64 layout).
const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (ty << 8) | nr
}
const IOC_READ_WRITE: u32 = 3;
/// `PAGEMAP_SCAN = _IOWR(PAGEMAP_MAGIC 'f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u32 = ioc(
    IOC_READ_WRITE,
    b'f' as u32,
    16,
    std::mem::size_of::<g::pm_scan_arg>(),
);
// The layouts `<linux/fs.h>` defines (12 and 3 `__u64`s) and the number they give.
const _: () = assert!(std::mem::size_of::<g::pm_scan_arg>() == 96);
const _: () = assert!(std::mem::size_of::<g::page_region>() == 24);
const _: () = assert!(PAGEMAP_SCAN == 0xC060_6610);

/// Result regions per ioctl call (written pages coalesce into runs, so one call is usual).
const REGIONS: usize = 128;

/// This process's `/proc/self/pagemap`, for `PAGEMAP_SCAN`.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    pub fn open() -> Result<Self> {
        let file = File::open("/proc/self/pagemap").map_err(|err| Error::Sys {
            what: "open(/proc/self/pagemap)",
            err,
        })?;
        Ok(Pagemap { file })
    }

    /// Appends to `out` the written page runs `[start, end)` (host addresses, ascending) of
    /// the page-aligned range `[addr, addr+len)` and write-protects exactly those pages
    /// again, so the next write to any of them is seen by the next scan. Every page of the
    /// range must be registered write-protect on an async userfaultfd (`EPERM` otherwise).
    pub fn harvest_written(&self, addr: u64, len: u64, out: &mut Vec<(u64, u64)>) -> Result<()> {
        if !addr.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidArgs(format!(
                "PAGEMAP_SCAN of {addr:#x}+{len:#x}: not page aligned"
            )));
        }
        let end = addr
            .checked_add(len)
            .ok_or_else(|| Error::InvalidArgs(format!("PAGEMAP_SCAN of {addr:#x}+{len:#x}")))?;
        let mut regions = [g::page_region {
            start: 0,
            end: 0,
            categories: 0,
        }; REGIONS];
        let mut at = addr;
        while at < end {
            let written = g::PAGE_IS_WRITTEN as u64;
            let mut arg = g::pm_scan_arg {
                size: std::mem::size_of::<g::pm_scan_arg>() as u64,
                flags: (g::PM_SCAN_WP_MATCHING | g::PM_SCAN_CHECK_WPASYNC) as u64,
                start: at,
                end,
                walk_end: 0,
                vec: regions.as_mut_ptr() as u64,
                vec_len: REGIONS as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: written,
                category_anyof_mask: 0,
                return_mask: written,
            };
            // SAFETY: valid descriptor; `arg` is a properly sized `pm_scan_arg` whose `vec`
            // points at `REGIONS` writable `page_region`s that outlive the call.
            let n = unsafe { libc::ioctl(self.file.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
            if n < 0 {
                return Err(Error::Sys {
                    what: "ioctl(PAGEMAP_SCAN)",
                    err: std::io::Error::last_os_error(),
                });
            }
            for r in &regions[..(n as usize).min(REGIONS)] {
                out.push((r.start, r.end));
            }
            if arg.walk_end <= at {
                return Err(Error::Sys {
                    what: "ioctl(PAGEMAP_SCAN) made no progress",
                    err: std::io::Error::from_raw_os_error(libc::EIO),
                });
            }
            at = arg.walk_end;
        }
        Ok(())
    }
}
