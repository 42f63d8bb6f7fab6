//! Secure DMA for virtio devices (DESIGN.md, "Secure DMA to virtio devices"): a virtio-blk
//! device that reaches guest memory only through the regions assigned to its `DmaDomain`.
//!
//! One job per file:
//! - [`iommu`]: `DomainIommu` (vm-memory's `Iommu` over a `DmaDomain`) and `DmaMemory`
//!   (`IommuMemory` over the frame memfd), the device's only view of guest memory;
//! - [`dma_region`]: `DeviceDma`, the domain plus its regions — CONTIGUOUS|DMA Vmos mapped
//!   into the guest's Vmar and assigned (pinned) at IOVA = GPA;
//! - [`disk`]: `DiskBackend`, `MemDisk`, `FileDisk`;
//! - [`blk`]: `VirtioBlk`, the device (virtio-queue over `DmaMemory`);
//! - [`driver`]: `GuestRam` and `BlkDriver`, a host-side driver that writes rings and
//!   descriptors into guest memory like a guest driver (and can write malicious ones);
//! - [`attacks`]: the malicious-driver scenarios and what each one changed;
//! - [`rig`]: the standard layout (regions with canary pages around them) wiring the above;
//! - [`report`]: `demo_report`, the DMA section of the demo: valid and malicious requests
//!   served on the standard rig, with the domain's figures.
//!
//! Fork policy (from `vmo::Vmar::fork`): a DMA region mapped in the guest is copied eagerly
//! into the child, unpinned and unassigned; the child's device assigns the copies again
//! (`BlkRig::adopt`). A pinned page is never shared copy-on-write.

pub mod attacks;
pub mod blk;
pub mod disk;
pub mod dma_region;
pub mod driver;
pub mod iommu;
pub mod report;
pub mod rig;

pub use blk::{BlkStats, Completion, Outcome, QueueConfig, Refusal, VirtioBlk};
pub use disk::{DiskBackend, FileDisk, MemDisk, SECTOR_SIZE};
pub use dma_region::{DeviceDma, DmaRegion};
pub use driver::{BlkDriver, GuestRam, RawDesc};
pub use iommu::{dma_memory, DmaMemory, DomainIommu};
pub use report::{demo_report, demo_report_on, DmaDemoReport};
pub use rig::{BlkLayout, BlkRig, DomainTable};
