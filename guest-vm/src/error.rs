//! `Error` and `Result` of the KVM backend and the VMM.
//!
//! One enum for the crate, with a variant per kind of failure a caller handles differently;
//! each variant's doc comment says what happened. System-call failures carry the operation
//! they belong to and the OS error (`Sys`), KVM ioctls the ioctl name (`Kvm`). Nothing here
//! panics: bad guest behaviour and bad caller input are values of this type.

use std::fmt;
use std::io;

/// Errors of the KVM backend and VMM.
#[derive(Debug)]
pub enum Error {
    /// A system call failed; `what` names the operation.
    Sys { what: &'static str, err: io::Error },
    /// A KVM ioctl failed; `what` names the operation.
    Kvm {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    /// `/dev/kvm` is missing or not usable by this process.
    KvmUnavailable(String),
    /// userfaultfd is missing, refused (not root, `vm.unprivileged_userfaultfd=0`), or lacks a
    /// feature this backend needs (write-protect on shmem).
    UffdUnavailable(String),
    /// The process ran into `vm.max_map_count` (each scattered 4 KiB install costs up to two
    /// VMAs) and could not raise it (not root, or the sysctl write failed).
    MapCountLimit { limit: u64, detail: String },
    /// A guest-physical range lies outside the guest's memory (the memslot).
    OutsideGuest { gpa: u64, len: u64 },
    /// A guest-physical address or length is not page aligned, or a range is empty.
    Misaligned { gpa: u64, len: u64 },
    /// Misaligned address or length, out-of-range address, bad configuration.
    InvalidArgs(String),
    /// The VM or vCPU is in a state that forbids the operation (e.g. stopped by a guest fault).
    BadState(String),
    /// The guest image does not fit the guest memory layout.
    Payload(String),
    /// The memory model (Vmo / Vmar) refused an operation.
    Vmo(vmo::Error),
}

impl From<vmo::Error> for Error {
    fn from(e: vmo::Error) -> Self {
        Error::Vmo(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Sys { what, err } => write!(f, "{what}: {err}"),
            Error::Kvm { what, err } => write!(f, "KVM {what}: {err}"),
            Error::KvmUnavailable(s) => write!(f, "KVM unavailable: {s}"),
            Error::UffdUnavailable(s) => write!(f, "userfaultfd unavailable: {s}"),
            Error::MapCountLimit { limit, detail } => write!(
                f,
                "vm.max_map_count ({limit}) exhausted and not raised: {detail}; run as root or \
                 `sysctl -w vm.max_map_count=1048576`"
            ),
            Error::OutsideGuest { gpa, len } => {
                write!(
                    f,
                    "invalid arguments: guest range {gpa:#x}+{len:#x} outside guest memory"
                )
            }
            Error::Misaligned { gpa, len } => write!(
                f,
                "invalid arguments: guest range {gpa:#x}+{len:#x} not page aligned / empty"
            ),
            Error::InvalidArgs(s) => write!(f, "invalid arguments: {s}"),
            Error::BadState(s) => write!(f, "bad state: {s}"),
            Error::Payload(s) => write!(f, "guest payload: {s}"),
            Error::Vmo(e) => write!(f, "memory model: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Sys { err, .. } => Some(err),
            Error::Kvm { err, .. } => Some(err),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for `Error::Sys` with the current `errno`.
pub(crate) fn last_os(what: &'static str) -> Error {
    Error::Sys {
        what,
        err: io::Error::last_os_error(),
    }
}

/// Shorthand for `Error::Kvm` from a kvm-ioctls result.
pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |err| Error::Kvm { what, err }
}
