//! KVM guest containers whose guest-physical memory is managed by the `vmo` memory model.
//!
//! This crate owns the KVM side of the project (see `../shared/docs/DESIGN.md`, "The KVM
//! backend", and `KVM-FAULTS.md` for the measured kernel behaviour it is built on):
//!
//! - [`memfd_pool`]: `MemfdFrameAlloc`, the `vmo::FrameAlloc` whose frames are 4 KiB offsets of
//!   one memfd (the "physical memory" of every guest of this process);
//! - [`reservation`]: the memslot's host range, an anonymous read-write `MAP_NORESERVE` mapping
//!   registered with userfaultfd;
//! - [`uffd`]: the thin userfaultfd syscall layer (no bindgen: `linux-raw-sys` types);
//! - [`kvm_stage2`]: `KvmStage2`, the `ept::Stage2` backend that installs memfd frames into the
//!   reservation with `mmap(MAP_SHARED|MAP_FIXED)` and write-protects with uffd-WP;
//! - [`fault_thread`]: the thread that turns userfaultfd events into `ept::FaultInfo`, hands them
//!   to one resolver (the product's resolver is `Vmar::handle_fault`), and wakes the faulter;
//! - [`guest`]: `Guest`, the product: a `vmo::Vmar` over `KvmStage2` whose `handle_fault` is
//!   the fault thread's resolver, plus its `GuestVm`; snapshot, fork, reset;
//! - [`vm`]: the VMM — KVM VM, memslot, one vCPU in 64-bit long mode running guest code at CPL3,
//!   exit dispatch;
//! - [`hypercall`]: the guest↔VMM port-I/O hypercall ABI;
//! - [`vcpu_state`]: complete vCPU state save/restore (the vCPU half of a snapshot);
//! - [`payload`]: the guest-physical layout, boot page tables, hand-encoded test programs;
//! - [`virtio`]: secure DMA — a virtio-blk device (virtio-queue over vm-memory's `IommuMemory`)
//!   that reaches guest memory only through its `vmo::DmaDomain`;
//! - [`workload`]: the key-value store guest (`guest/kvstore.rs`, a `no_std` Rust program
//!   built by `build.rs`) and its host-side driver;
//! - [`kvmodel`], [`streams`]: a host replica of the guest's table and checked request streams;
//! - [`fleet`]: fork N children and run them concurrently, each on its own vCPU thread;
//! - [`demo`], [`demo_print`], [`single`]: the `guest-vm demo` / `fork` / `run` jobs;
//! - [`bench`], [`bench_baseline`], [`bench_print`], [`measure`]: `guest-vm bench`.
//!
//! Errors: every fallible operation returns [`Error`]; bad guest behaviour (touching memory
//! outside its address space, bad hypercall arguments) is reported as a value, never a panic.

pub mod bench;
pub mod bench_baseline;
pub mod bench_print;
pub mod demo;
pub mod demo_print;
pub mod fault_thread;
pub mod fleet;
pub mod guest;
pub mod hypercall;
pub mod kvm_stage2;
pub mod kvmodel;
pub mod measure;
pub mod memfd_pool;
pub mod payload;
pub mod reservation;
pub mod single;
pub mod streams;
pub mod uffd;
pub mod vcpu_state;
pub mod virtio;
pub mod vm;
pub mod workload;

pub use fault_thread::{FaultError, FaultStats, FaultThread, Resolver};
pub use guest::Guest;
pub use kvm_stage2::KvmStage2;
pub use memfd_pool::{HostFrames, MemfdFrameAlloc};
pub use reservation::Reservation;
pub use vcpu_state::VcpuState;
pub use vm::{GuestVm, VmExit};

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
            Error::InvalidArgs(s) => write!(f, "invalid arguments: {s}"),
            Error::BadState(s) => write!(f, "bad state: {s}"),
            Error::Payload(s) => write!(f, "guest payload: {s}"),
            Error::Vmo(e) => write!(f, "memory model: {e}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for `Error::Sys` with the current `errno`.
pub(crate) fn last_os(what: &'static str) -> Error {
    Error::Sys {
        what,
        err: io::Error::last_os_error(),
    }
}

/// Size of one page / frame.
pub const PAGE_SIZE: u64 = 4096;
