//! The guest memory model: frames, Vmos and Vmars (see `../shared/docs/DESIGN.md`).
//!
//! `no_std` + `alloc`; the `std` feature (default) adds host-only helpers (file-backed pager).
//!
//! - [`frame`]: `Frame` (a counted handle to one physical frame), `FrameAlloc` (the unsafe
//!   trait a frame source implements), `FramePool` (exact allocation accounting);
//! - [`vmo`]: `Vmo` — page sets (copy-on-write XArray), slices, snapshot children, pager,
//!   pins, rights, reset points (drop and copy-back restore);
//! - [`vmar`]: `Vmar` — regions, mappings, the single fault path, fork / reset, dirty
//!   tracking, bulk prefault and prefetch, the model's own reads and writes, the copy-back
//!   reset's adaptive hot set;
//! - [`pager`]: the `Pager` contract (and the file-backed pager with `std`);
//! - [`dma`]: `DmaDomain`, the IOVA space devices reach guest memory through;
//! - `sync`: the locks and protocol atomics (spin's, or shuttle's under the `shuttle` feature
//!   for the interleaving tests).
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod dma;
pub mod frame;
pub mod pager;
mod sync;
pub mod vmar;
pub mod vmo;

pub use dma::{DevicePerms, DmaDomain, DmaSegment, DmaStats};
pub use frame::{Frame, FrameAlloc, FramePool, FrameStats, HeapFrameAlloc, Paddr};

/// The workspace's one page size (a frame, a second-level page): `ept::PAGE_SIZE`.
pub use ept::PAGE_SIZE;
/// `PAGE_SIZE` as a `usize`, for buffer and array lengths.
pub const PAGE_BYTES: usize = PAGE_SIZE as usize;
pub use pager::Pager;
pub use vmar::{
    FaultOutcome, FaultStats, HotSetPolicy, HotSetStats, MapOptions, MappingInfo, Placement,
    ResetPolicy, Resolution, VmPerms, Vmar, WorkingSet, DEFAULT_FAULT_AROUND, MAX_FAULT_AROUND,
};
pub use vmo::{
    ChildKind, FaultAccess, FaultedPage, PageOrigin, RangeChange, RestoreStats, Rights, Vmo,
    VmoFlags, VmoObserver,
};

/// Errors of the memory model; the meanings follow Zircon's status codes (CONTRACTS.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Misaligned or zero length, bad flag combination, malformed request.
    InvalidArgs,
    /// The handle lacks a right the operation needs, or perms exceed what is allowed.
    AccessDenied,
    /// Nothing mapped / no such object at that address.
    NotFound,
    /// The range is already occupied.
    AlreadyExists,
    /// No frame or no free address range.
    NoMemory,
    /// Offset or range beyond the object, or arithmetic overflow.
    OutOfRange,
    /// The object is in a state that forbids the operation (pinned, destroyed, ...).
    BadState,
    /// The object kind does not support the operation.
    NotSupported,
    /// The operation would have to wait (pager I/O) and was asked not to.
    ShouldWait,
    /// A pager could not produce or store a page.
    Io,
    /// A second-level table operation failed.
    Stage2(ept::Error),
}

impl From<ept::Error> for Error {
    fn from(e: ept::Error) -> Self {
        Error::Stage2(e)
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Stage2(e) => write!(f, "second-level table: {e}"),
            other => write!(f, "{other:?}"),
        }
    }
}

pub type Result<T> = core::result::Result<T, Error>;
