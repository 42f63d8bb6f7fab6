//! `SnapshotError`: everything that can be wrong with a snapshot file or its save / restore.
//!
//! One variant per thing a caller (or a user reading the message) handles differently; each
//! variant's doc comment is its message. Every check of a file that is read happens before any
//! VM is created, except a page's checksum, which is verified when the page is first read (then
//! the error is recorded by the pager and the guest is stopped; see `pager.rs`).
//!
//! Invariant: nothing in this module panics on bad input; a corrupt file is one of these values.

use std::fmt;
use std::io;
use std::path::PathBuf;

use super::identity::Identity;

/// Errors of snapshot save, open, restore and inspect.
#[derive(Debug)]
pub enum SnapshotError {
    /// An I/O operation on a snapshot file failed; `what` names the operation.
    Io {
        what: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    /// The device holding the snapshot is full (no partial file is left behind).
    NoSpace { path: PathBuf },
    /// The path names something that is not a regular file (a directory, a device, a fifo).
    NotRegularFile { path: PathBuf, kind: &'static str },
    /// The file ends before the named part does.
    Truncated {
        what: &'static str,
        need: u64,
        have: u64,
    },
    /// The file does not start with the snapshot magic: not a guestmem snapshot.
    BadMagic { found: [u8; 8] },
    /// The header's checksum does not match its bytes (the header is corrupt).
    HeaderChecksum { stored: u32, computed: u32 },
    /// The file's format major version is not one this program reads.
    UnsupportedVersion {
        found_major: u16,
        found_minor: u16,
        supported_major: u16,
        supported_minor: u16,
    },
    /// The snapshot was taken on another architecture.
    WrongArch { found: u32, expected: u32 },
    /// The snapshot's page size is not this host's.
    WrongPageSize { found: u32, expected: u32 },
    /// The header sets feature bits this program does not know (a newer major's feature).
    UnknownFeatures { bits: u64 },
    /// A section the format requires is absent from the section table, or present twice.
    MissingSection { section: &'static str },
    /// A section's bytes do not match the checksum in the section table.
    SectionChecksum {
        section: &'static str,
        stored: u32,
        computed: u32,
    },
    /// A metadata section parsed badly (its checksum was right: written by a broken saver).
    Malformed {
        section: &'static str,
        detail: String,
    },
    /// The page index and the page section disagree on how many pages the file holds.
    PageCountMismatch {
        index_data_pages: u64,
        page_section_bytes: u64,
    },
    /// A page-index entry is out of order, out of range, or names an unknown Vmo.
    BadIndexEntry { entry: u64, detail: String },
    /// A chunk of the page index (format 1.2, checked on first use) does not match its CRC.
    IndexChunkChecksum {
        chunk: u64,
        first_entry: u64,
        stored: u32,
        computed: u32,
    },
    /// A page's bytes do not match its checksum in the index.
    PageChecksum {
        vmo: u32,
        page: u64,
        stored: u64,
        computed: u64,
    },
    /// The file changed while a guest was restored from it (size, mtime or ctime moved).
    FileChanged { path: PathBuf, detail: String },
    /// A diff snapshot was given without the base it names.
    BaseMissing { diff: PathBuf, base: Identity },
    /// A diff's recorded base identity is not the identity of the file given as its base.
    BaseMismatch {
        diff: PathBuf,
        expected: Identity,
        found: Identity,
    },
    /// A layer of a chain does not describe the same memory layout as its base.
    LayoutMismatch { path: PathBuf, detail: String },
    /// The guest cannot be saved as asked (e.g. a diff of a Vmo with no reset point).
    Unsupported(String),
    /// The guest or VM failed (KVM, memory model) while saving or restoring.
    Guest(crate::Error),
}

impl From<crate::Error> for SnapshotError {
    fn from(e: crate::Error) -> Self {
        SnapshotError::Guest(e)
    }
}

impl From<vmo::Error> for SnapshotError {
    fn from(e: vmo::Error) -> Self {
        SnapshotError::Guest(crate::Error::Vmo(e))
    }
}

impl SnapshotError {
    /// An I/O error on `path`, mapped to `NoSpace` when the device is full.
    pub fn io(what: &'static str, path: &std::path::Path, err: io::Error) -> Self {
        if err.raw_os_error() == Some(libc::ENOSPC) || err.kind() == io::ErrorKind::StorageFull {
            return SnapshotError::NoSpace {
                path: path.to_path_buf(),
            };
        }
        SnapshotError::Io {
            what,
            path: path.to_path_buf(),
            err,
        }
    }
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use SnapshotError::*;
        match self {
            Io { what, path, err } => write!(f, "snapshot {}: {what}: {err}", path.display()),
            NoSpace { path } => write!(f, "snapshot {}: no space left on device", path.display()),
            NotRegularFile { path, kind } => {
                write!(
                    f,
                    "snapshot {}: is a {kind}, not a regular file",
                    path.display()
                )
            }
            Truncated { what, need, have } => write!(
                f,
                "snapshot truncated: {what} needs bytes up to {need}, the file has {have}"
            ),
            BadMagic { found } => write!(f, "not a guestmem snapshot (magic {found:02x?})"),
            HeaderChecksum { stored, computed } => write!(
                f,
                "snapshot header corrupt: checksum {stored:#010x} stored, {computed:#010x} computed"
            ),
            UnsupportedVersion {
                found_major,
                found_minor,
                supported_major,
                supported_minor,
            } => write!(
                f,
                "snapshot format {found_major}.{found_minor} is not supported: this program reads \
                 format {supported_major}.x (up to {supported_major}.{supported_minor})"
            ),
            WrongArch { found, expected } => {
                write!(f, "snapshot architecture {found}, this host is {expected}")
            }
            WrongPageSize { found, expected } => {
                write!(f, "snapshot page size {found}, this host uses {expected}")
            }
            UnknownFeatures { bits } => write!(f, "snapshot uses unknown feature bits {bits:#x}"),
            MissingSection { section } => {
                write!(
                    f,
                    "snapshot section table: `{section}` missing or duplicated"
                )
            }
            SectionChecksum {
                section,
                stored,
                computed,
            } => write!(
                f,
                "snapshot section `{section}` corrupt: checksum {stored:#010x} stored, \
                 {computed:#010x} computed"
            ),
            Malformed { section, detail } => {
                write!(f, "snapshot section `{section}` malformed: {detail}")
            }
            PageCountMismatch {
                index_data_pages,
                page_section_bytes,
            } => write!(
                f,
                "snapshot page count mismatch: the index lists {index_data_pages} stored pages, \
                 the page section holds {page_section_bytes} bytes"
            ),
            BadIndexEntry { entry, detail } => {
                write!(f, "snapshot page index entry {entry}: {detail}")
            }
            IndexChunkChecksum {
                chunk,
                first_entry,
                stored,
                computed,
            } => write!(
                f,
                "snapshot page index chunk {chunk} (entries from {first_entry}) corrupt: \
                 checksum {stored:#010x} stored, {computed:#010x} computed"
            ),
            PageChecksum {
                vmo,
                page,
                stored,
                computed,
            } => write!(
                f,
                "snapshot page {page} of vmo {vmo} corrupt: checksum {stored:#018x} stored, \
                 {computed:#018x} computed"
            ),
            FileChanged { path, detail } => write!(
                f,
                "snapshot {} changed while restored from: {detail}",
                path.display()
            ),
            BaseMissing { diff, base } => write!(
                f,
                "diff snapshot {} needs its base {base} (not given)",
                diff.display()
            ),
            BaseMismatch {
                diff,
                expected,
                found,
            } => write!(
                f,
                "diff snapshot {} is relative to base {expected}, the base given is {found}",
                diff.display()
            ),
            LayoutMismatch { path, detail } => write!(
                f,
                "snapshot {}: layout differs from its base: {detail}",
                path.display()
            ),
            Unsupported(s) => write!(f, "snapshot not supported: {s}"),
            Guest(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for SnapshotError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SnapshotError::Io { err, .. } => Some(err),
            SnapshotError::Guest(e) => Some(e),
            _ => None,
        }
    }
}

pub type SnapResult<T> = std::result::Result<T, SnapshotError>;
