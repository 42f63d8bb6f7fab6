//! Snapshot files: a stopped `Guest` saved to one versioned, checksummed file; restored lazily
//! through a file `Pager` (the guest starts before any page is read); diffs that chain.
//!
//! A floor above `guest` (it uses `guest`, `vmm`, `memory`; nothing below imports it). One job
//! per file:
//! - [`format`]: the fixed header (magic, major/minor, arch, page size, features, section
//!   table, identity, CRC) and the page-index entries, encoded by hand;
//! - [`identity`]: `Identity`, the content hash diffs name their base by;
//! - [`sections`]: the vCPU, layout and working-set sections (serde + postcard);
//! - [`file`]: `SnapshotFile` — open + check everything before use; page reads; immutability;
//! - [`index`]: `PageIndex` — the page index kept as checked raw bytes, decoded on demand;
//! - [`pager`]: `Chain` (the files of a restored guest) and `FilePager` (`vmo::Pager`);
//! - [`save`]: full and diff saves (temporary name + rename, progress bar);
//! - [`restore`]: chain checks and the lazy / eager restore, working-set prefetch;
//! - [`inspect`]: the `inspect` report;
//! - [`error`]: `SnapshotError`, one typed variant per thing that can be wrong.
//!
//! Crates, and why: `crc32fast` (the CRC-32 of the header and metadata sections: the
//! Firecracker model of "state + CRC", SIMD-fast, no dependencies); `xxhash-rust` (xxh3-64 per
//! page — several GB/s, so checking each page at fault time costs far less than its read —
//! and xxh3-128 for the file identity diffs refer to); `serde` + `postcard` (the small structured
//! sections: compact, stable, `no_std`-grade wire format, strict decoding with trailing-byte
//! detection); `kvm-bindings`' `serde` feature (serializes KVM's own structures as their
//! bytes); `indicatif` (the save progress bar on a terminal).
//!
//! Compatibility policy: the header's first 16 bytes (magic, major, minor, header length) and
//! its CRC at byte 4092 never move. A minor bump only adds (new optional section kinds, which
//! older readers skip; new fields in free header space): every file of the same major stays
//! readable. A major bump is refused with `UnsupportedVersion`, naming the file's version and
//! the one this program reads. The identity hashes the header with the four required sections
//! only — as a 1.0 reader re-encodes it — so optional sections never change it. The test suite
//! keeps a committed fixture of every released format version (`tests/fixtures/
//! snapshot-v1.0.gms`, `snapshot-v1.2.gms`) and restores each (1.2 also as a 1.0 reader sees
//! it). Versions: 1.0 (vcpu, layout, page index, pages); 1.1, a development minor that never
//! shipped, added the optional working-set section (its identity covered that section's entry,
//! which a 1.0 reader refuses — 1.2 fixed the identity); 1.2 keeps the working set and adds the
//! optional index-chunks section — a CRC-32, first key and data count per 4096 index entries —
//! which lets a reader check the page index chunk by chunk on first use instead of all at open
//! (the index itself and its section CRC are unchanged, so a 1.0 reader reads a 1.2 file).
//!
//! Invariants: every file is fully checked (except page bytes, checked at each read or with
//! `verify`, and a 1.2 file's index chunks and identity, checked at the first lookup in each
//! chunk or with `verify`) before a VM is created; a failed page read stops only the guest that asked and is
//! reported through `Chain::failures`; a file is never modified once written.

pub mod error;
pub mod file;
pub mod format;
pub mod identity;
pub mod index;
pub mod inspect;
pub mod pager;
pub mod restore;
pub mod save;
pub mod sections;

pub use error::{SnapResult, SnapshotError};
pub use file::SnapshotFile;
pub use format::{Identity, FORMAT_MAJOR, FORMAT_MINOR};
pub use pager::{Chain, FilePager};
pub use restore::{open_chain, restore, Prefetch, RestoreOptions, Restored};
pub use save::{save, SaveOptions, SaveStats};
