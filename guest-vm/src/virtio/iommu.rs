//! `DomainIommu`: vm-memory's `Iommu` implemented by a `vmo::DmaDomain`, and `DmaMemory`, the
//! `IommuMemory` a virtio device uses as its only view of guest memory.
//!
//! Address spaces:
//! - IOVA: what a device finds in its virtqueue (ring addresses, descriptor buffers); the
//!   domain's assigned regions (this crate assigns them at IOVA = GPA, see `dma_region`);
//! - "physical": the host frame memfd (`HostFrames`), addressed by frame `Paddr` — the
//!   `IommuMemory` backend is one `GuestMemoryMmap` region over the whole memfd at address 0.
//!
//! Invariants:
//! - the IOMMU is always enabled: every access through `DmaMemory` (descriptor table, avail and
//!   used rings, buffers) calls `DmaDomain::translate` for its whole range first;
//! - there is no IOTLB cache: each translation builds a private `Iotlb` holding exactly the
//!   translated range, so nothing survives an `unassign` and every access is counted by the
//!   domain;
//! - a refused translation (outside every region, across a region's end, 64-bit wrap-around,
//!   against the device perms) yields `iommu::Error::CannotResolve` and touches nothing: the
//!   domain checks the whole range before anything is read or written.

use std::fmt;
use std::fs::File;
use std::sync::Arc;

use ept::Stage2;
use vm_memory::iommu::{Error as IommuError, IotlbIterator, IovaRange};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, Iommu, IommuMemory, Iotlb,
    MmapRegion, Permissions,
};
use vmo::{DevicePerms, DmaDomain};

use crate::error::{Error, Result};
use crate::memory::frames::{HostFrames, MemfdFrameAlloc};

/// The guest memory a device sees: IOVAs translated by its `DmaDomain` into the frame memfd.
pub type DmaMemory<S> = IommuMemory<GuestMemoryMmap, DomainIommu<S>>;

/// vm-memory `Iommu` backed by a `DmaDomain`; see the module documentation.
pub struct DomainIommu<S: Stage2 + Send + 'static> {
    domain: Arc<DmaDomain<S>>,
    frames: Arc<MemfdFrameAlloc>,
}

impl<S: Stage2 + Send + 'static> fmt::Debug for DomainIommu<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainIommu")
            .field("regions", &self.domain.regions())
            .field("stats", &self.domain.stats())
            .finish()
    }
}

fn device_perms(access: Permissions) -> DevicePerms {
    match access {
        // A bare existence probe still needs the region to be readable.
        Permissions::No | Permissions::Read => DevicePerms::READ,
        Permissions::Write => DevicePerms::WRITE,
        Permissions::ReadWrite => DevicePerms::READ | DevicePerms::WRITE,
    }
}

fn cannot(iova: GuestAddress, length: usize, reason: String) -> IommuError {
    IommuError::CannotResolve {
        iova_range: IovaRange { base: iova, length },
        reason,
    }
}

impl<S: Stage2 + Send + 'static> DomainIommu<S> {
    pub fn new(domain: Arc<DmaDomain<S>>, frames: &HostFrames) -> Self {
        DomainIommu {
            domain,
            frames: frames.alloc.clone(),
        }
    }

    pub fn domain(&self) -> &Arc<DmaDomain<S>> {
        &self.domain
    }
}

impl<S: Stage2 + Send + 'static> Iommu for DomainIommu<S> {
    type IotlbGuard<'a>
        = Box<Iotlb>
    where
        Self: 'a;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> std::result::Result<IotlbIterator<Box<Iotlb>>, IommuError> {
        let perms = device_perms(access);
        let segments = self
            .domain
            .translate(iova.0, length as u64, perms)
            .map_err(|e| cannot(iova, length, format!("DMA domain refused: {e:?}")))?;
        // Segments carry frame addresses: memfd offsets, the backend's address space.
        let capacity = self.frames.capacity() as usize;
        let mut iotlb = Iotlb::new();
        let mut at = iova.0;
        for seg in segments {
            let pa = seg.pa as usize;
            if pa >= capacity || seg.len > capacity - pa {
                return Err(IommuError::IommuMisconfigured {
                    reason: format!(
                        "segment {:p}+{} is not a frame of the pool",
                        seg.host, seg.len
                    ),
                });
            }
            iotlb.set_mapping(GuestAddress(at), GuestAddress(pa as u64), seg.len, access)?;
            at += seg.len as u64;
        }
        Iotlb::lookup(Box::new(iotlb), iova, length, access).map_err(|fails| {
            cannot(
                iova,
                length,
                format!(
                    "incomplete translation: misses {:?}, access failures {:?}",
                    fails.misses, fails.access_fails
                ),
            )
        })
    }
}

/// A device's memory view: IOMMU enabled, translated by `domain` into `frames`' memfd.
pub fn dma_memory<S: Stage2 + Send + 'static>(
    frames: &HostFrames,
    domain: Arc<DmaDomain<S>>,
) -> Result<DmaMemory<S>> {
    // A second shared mapping of the frame memfd (coherent with the pool's own mapping).
    let file = File::from(
        frames
            .alloc
            .memfd()
            .try_clone_to_owned()
            .map_err(|err| Error::Sys {
                what: "dup(frame memfd)",
                err,
            })?,
    );
    let size = frames.alloc.capacity() as usize;
    let region = MmapRegion::from_file(FileOffset::new(file, 0), size)
        .map_err(|e| Error::InvalidArgs(format!("vm-memory region over the frame memfd: {e}")))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| Error::InvalidArgs("frame memfd region overflows".into()))?;
    let backend = GuestMemoryMmap::from_regions(vec![region])
        .map_err(|e| Error::InvalidArgs(format!("vm-memory backend: {e}")))?;
    Ok(IommuMemory::new(
        backend,
        DomainIommu::new(domain, frames),
        true,
        (),
    ))
}
