//! KVM guest containers whose guest-physical memory is managed by the `vmo` memory model.
//!
//! The crate is built in floors; a module uses only the floors below it (DESIGN.md "The KVM
//! backend", KVM-FAULTS.md for the measured kernel behaviour it is built on):
//!
//! 0. [`error`] (`Error`, `Result`), [`addr`] (typed `Gpa` / `Hva` / `MemfdOffset`) and `sync`
//!    (the fault-thread protocol's locks: std normally, shuttle's under the test-only
//!    `shuttle` feature);
//! 1. [`sys`]: the Linux primitives — the only files that call `mmap`, `mprotect` or `ioctl`
//!    on host memory (`sys::mmap`, `sys::memfd`, `sys::uffd`);
//! 2. [`memory`]: the KVM second-level backend — memfd frames, the memslot reservation,
//!    `KvmStage2` (the `ept::Stage2` of this backend), and the fault thread with its
//!    `Resolver`;
//! 3. [`vmm`]: the KVM VM and its vCPU (`GuestVm`, `VmShell`, exits, kicks, hypercalls,
//!    vCPU state, the x86-64 layout and boot image), no memory policy;
//! 4. [`guest`]: `Guest` = `Vmar<KvmStage2>` + `GuestVm` — snapshot, fork (also from a
//!    `ShellPool` of VMs built ahead), reset, bulk prefault and working-set prefetch;
//!    `guest::program::Program`: a user's SDK guest under the guest ABI (`guest/ABI.md`);
//! 5. [`virtio`]: secure DMA — a virtio-blk device that reaches guest memory only through its
//!    `vmo::DmaDomain`;
//!    [`workload`]: what runs inside a guest and its host side (the key-value store, its
//!    model and request streams, the fleet of forked children, small test programs);
//!    [`snapshot`]: snapshot files — save a stopped `Guest` to a versioned, checksummed file,
//!    restore it lazily through a file `Pager`, diffs that chain.
//!
//! The `guest-vm` command line (`src/bin/guest-vm/`: demo, run, fork, bench) is a binary
//! target built on this library, not part of it.
//!
//! Errors: every fallible operation returns [`Error`]; bad guest behaviour (touching memory
//! outside its address space, bad hypercall arguments) is reported as a value, never a panic.

pub mod addr;
pub mod error;
pub mod guest;
pub mod memory;
pub mod snapshot;
mod sync;
pub mod sys;
pub mod virtio;
pub mod vmm;
pub mod workload;

pub use addr::{Gpa, Hva, MemfdOffset};
pub use error::{Error, Result};
pub use guest::{Guest, KVM_HOT_SET};
pub use memory::fault_thread::{FaultError, FaultStats, FaultThread, Resolver};
pub use memory::frames::{HostFrames, MemfdFrameAlloc};
pub use memory::reservation::Reservation;
pub use memory::stage2::KvmStage2;
pub use vmm::vcpu_state::VcpuState;
pub use vmm::{GuestArgs, GuestVm, VmExit};

/// Size of one page / frame: the workspace's one page-size constant.
pub use ept::PAGE_SIZE;
