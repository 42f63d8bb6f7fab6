//! The Linux primitives of the KVM backend: the only files of the crate that call `mmap`,
//! `mprotect`, `munmap` or `ioctl` on host memory.
//!
//! - [`mmap`]: one owner of host mappings — `Mmap` (a mapping this process owns, unmapped on
//!   drop), fixed replacements inside one, `protect`, and the `vm.max_map_count` handling;
//! - [`memfd`]: the frame memfd's file operations (create, punch a hole, resident size);
//! - [`uffd`]: userfaultfd — open, register (named modes), write-protect (named modes), wake,
//!   copy, read events.
//!
//! Nothing here knows about guests or the memory model.

pub mod memfd;
pub mod mmap;
pub mod uffd;
