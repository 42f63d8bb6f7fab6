//! The Linux primitives of the KVM backend: the only files of the crate that call `mmap`,
//! `mprotect`, `munmap` or `ioctl` on host memory.
//!
//! - [`mmap`]: one owner of host mappings — `Mmap` (a mapping this process owns, unmapped on
//!   drop), fixed replacements inside one, `protect`, and the `vm.max_map_count` handling;
//! - [`memfd`]: the frame memfd's file operations (create, punch a hole, resident size);
//! - [`uffd`]: userfaultfd — open (named flavors: synchronous, or async write tracking),
//!   register / unregister (named modes), write-protect (named modes), wake, copy, read events;
//! - [`limits`]: raising `RLIMIT_NOFILE` for hosts of many guests;
//! - [`pagemap`]: `PAGEMAP_SCAN` on `/proc/self/pagemap` — which pages an async
//!   write-protecting userfaultfd saw written, re-arming them.
//!
//! Nothing here knows about guests or the memory model.

pub mod limits;
pub mod memfd;
pub mod mmap;
pub mod pagemap;
pub mod uffd;
