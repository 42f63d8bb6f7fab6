//! Second-level page tables for hypervisors: Intel EPT and AMD NPT behind one `Stage2` trait.
//!
//! `no_std` + `alloc`. The table walker is written once, generic over the entry format
//! (`EptEntry`, `NptEntry`) and over `PhysMem` (where table frames come from). Fault decoding
//! (EPT violation, NPF) produces one `FaultInfo` that the memory model's single fault path
//! consumes. Privileged instructions (INVEPT) compile only with the `hw` feature.
//!
//! - [`stage2`]: the `Stage2` trait (map / map_run / unmap / protect / query / flush /
//!   harvest_dirty) and its contracts — the one seam to the memory model;
//! - [`table`]: `PageTable`, the generic 4-level walker (splits, protect summaries, dirty
//!   harvest, invariant checks in its children);
//! - [`entry`]: the EPT and NPT entry formats (`EntryFormat`), `Eptp`, `AccessDirty`;
//! - [`backend`]: `Stage2Table` = a table + an `Invalidate`; `EptTable`, `NptTable`;
//! - [`phys`]: `PhysMem` (where table frames come from) and `HeapPhysMem` for host tests;
//! - [`fault`]: EPT-violation / NPF decoding into `FaultInfo`;
//! - [`invalidate`], [`vmx`], [`svm`]: TLB invalidation hooks, INVEPT descriptors, SVM
//!   TLB_CONTROL.
#![no_std]

extern crate alloc;

pub mod backend;
pub mod entry;
pub mod fault;
pub mod invalidate;
pub mod phys;
pub mod stage2;
pub mod svm;
pub mod table;
pub mod vmx;

pub use backend::{EptTable, NptTable, Stage2Table};
pub use entry::ept::{EptEntry, Eptp};
pub use entry::npt::NptEntry;
pub use entry::EntryFormat;
pub use fault::{decode_npf, decode_svm_exit, decode_vmx_exit, DecodeError};
pub use fault::{Access, FaultInfo, FaultKind};
pub use invalidate::{CountingInvalidate, Invalidate};
pub use phys::{HeapPhysMem, PhysMem};
pub use stage2::{FlushScope, Stage2, Translation, WriteTracking};
pub use svm::{NptTlbControl, TlbControl};
pub use table::{Harvested, PageTable};
pub use vmx::{InveptDescriptor, InveptKind};

/// Size of the smallest page and of a page-table frame.
pub const PAGE_SIZE: u64 = 4096;
/// Guest-physical addresses a 4-level table translates: below 2^48.
pub const GPA_LIMIT: u64 = 1 << 48;
/// Host-physical addresses an entry can hold: below 2^52.
pub const PA_LIMIT: u64 = 1 << 52;

/// Errors of this crate; the meanings follow Zircon's status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Misaligned address or length, zero length, unrepresentable permissions.
    InvalidArgs,
    /// Address or range beyond what the table can translate (2^48) or an entry can hold (2^52),
    /// or `addr + len` overflows.
    OutOfRange,
    /// `map` over an existing translation of a different size or placement.
    AlreadyExists,
    /// The `PhysMem` could not provide a table frame.
    NoMemory,
    /// The backend cannot express the request (e.g. execute-only on NPT).
    NotSupported,
    /// A backend's host operation failed (mmap / mprotect / ioctl: the KVM backend, or a test
    /// backend failing on demand). The backend's state is unchanged unless the operation's doc
    /// says otherwise. The table backends of this crate never return it.
    Backend(BackendFailure),
}

/// Which host operation of a `Stage2` backend failed, and how (`Error::Backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendFailure {
    /// The host operation, e.g. `"mmap"`, `"UFFDIO_WRITEPROTECT"`.
    pub op: &'static str,
    /// The OS error number (`errno`), or 0 when the failure has none.
    pub errno: i32,
}

impl core::fmt::Display for BackendFailure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} failed (errno {})", self.op, self.errno)
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let s = match self {
            Error::Backend(failure) => return write!(f, "backend: {failure}"),
            Error::InvalidArgs => "invalid arguments",
            Error::OutOfRange => "out of range",
            Error::AlreadyExists => "already mapped",
            Error::NoMemory => "no memory for a page-table frame",
            Error::NotSupported => "not supported by this backend",
        };
        f.write_str(s)
    }
}

/// Whether the MMU maintains the accessed / dirty bits of a table's leaves while it walks them.
///
/// NPT always does (bits 5 and 6). EPT does only when the EPTP enables it (bit 6, allowed when
/// IA32_VMX_EPT_VPID_CAP bit 21 is set): with `Disabled`, bits 8 and 9 of EPT entries are
/// ignored by the CPU and never set, so writes cannot be tracked through the table
/// (`Stage2::harvest_dirty` is then `NotSupported`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessDirty {
    /// The MMU sets A on every access through a leaf and D on every write.
    Enabled,
    /// The MMU leaves bits 8/9 alone (EPT without the EPTP's A/D enable).
    Disabled,
}

/// The three page sizes a 4-level table maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    Size4K,
    Size2M,
    Size1G,
}

impl PageSize {
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size1G => 1 << 30,
        }
    }
    /// Table level whose leaf maps this size (1 = PT, 2 = PD, 3 = PDPT).
    pub const fn level(self) -> usize {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }
}

bitflags::bitflags! {
    /// Second-level permissions of a guest-physical page. WRITE and EXEC each require READ on
    /// NPT; EPT can also express execute-only (when the CPU reports the capability).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct S2Perms: u8 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const EXEC = 1 << 2;
        const RW = Self::READ.bits() | Self::WRITE.bits();
        const RWX = Self::READ.bits() | Self::WRITE.bits() | Self::EXEC.bits();
    }
}

/// Memory type of a leaf (EPT bits 5:3; NPT expresses it through PWT/PCD/PAT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemType {
    Uncacheable = 0,
    WriteCombining = 1,
    WriteThrough = 4,
    WriteProtected = 5,
    WriteBack = 6,
}
