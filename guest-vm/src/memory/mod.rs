//! The KVM second-level backend (DESIGN.md "The KVM backend"): guest frames are offsets of one
//! memfd, a memslot's host range is a userfaultfd-watched reservation, and a second-level
//! translation is a host mapping of a frame inside it.
//!
//! - [`frames`]: `MemfdFrameAlloc`, the `vmo::FrameAlloc` whose frames are 4 KiB offsets of
//!   one memfd, and `HostFrames` (that allocator plus the counted `vmo::FramePool` over it);
//! - [`reservation`]: `Reservation`, the memslot's host range and its two userfaultfds (the
//!   synchronous fault channel; the async write tracker, which holds only writable installs,
//!   and the deferred write-protects a fork leaves there until the next writer seals them)
//!   — the one writer of that range (install a frame, move a range between read-only and
//!   writable, defer and seal a write-protect, arm and harvest write tracking, put an
//!   anonymous piece back, poison);
//! - `leaves`: `LeafIndex`, the record of installed leaves (with their tracking state) and
//!   the index of writable ones, as extents (pure bookkeeping, unit-tested beside it);
//! - `ranges`: `RangeSet` and `runs`, page-range bookkeeping for both;
//! - [`stage2`]: `KvmStage2`, the `ept::Stage2` backend (including `harvest_dirty`): keeps the
//!   `LeafIndex` true and asks the reservation to change the host range;
//! - [`fault_thread`]: the thread that turns userfaultfd events into `ept::FaultInfo`, hands
//!   them to a `Resolver` (the product's is the guest's `Vmar<KvmStage2>`), and wakes the
//!   faulter.
//!
//! Floors: `frames` and `reservation` use only `sys`; `stage2` uses both; `fault_thread` uses
//! `reservation` (and names `stage2` for the product resolver). Nothing here knows about KVM
//! VMs or vCPUs.

pub mod fault_thread;
pub mod frames;
mod leaves;
mod ranges;
pub mod reservation;
pub mod stage2;
