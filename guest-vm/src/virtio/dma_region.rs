//! `DeviceDma`: a device's DMA domain and the guest regions assigned to it.
//!
//! A DMA region is a DMA Vmo (normally CONTIGUOUS|DMA, from the guest's frame pool) that is
//! both mapped into the guest's `Vmar` (so a guest driver — or a host-side driver writing guest
//! memory — sees the same bytes as the device) and assigned to the device's `DmaDomain` at
//! IOVA = GPA with the device's perms (the guest driver puts GPAs in its descriptors, the
//! identity convention of an IOMMU domain that exposes only the assigned ranges).
//!
//! Invariants:
//! - a region is pinned exactly while it is assigned; `teardown` (or drop) unassigns every
//!   region, after which decommit / resize / snapshot of its Vmo work again;
//! - the guest mapping is private (not `shared`), so `Vmar::fork` gives the child an eager,
//!   unpinned copy (the DMA fork policy) and never shares a pinned page copy-on-write;
//! - nothing but the assigned regions is reachable through the domain: guest RAM around a
//!   region stays mapped in the guest and unreachable by the device.

use std::sync::Arc;

use ept::Stage2;
use vmo::{DevicePerms, DmaDomain, MapOptions, Placement, VmPerms, Vmar, Vmo, VmoFlags};

use crate::error::{Error, Result};
use crate::memory::frames::HostFrames;
use ept::PAGE_SIZE;

/// One region assigned to a device.
#[derive(Clone, Debug)]
pub struct DmaRegion {
    /// What the region holds (for reports).
    pub name: String,
    pub vmo: Vmo,
    /// Guest-physical address = IOVA.
    pub gpa: u64,
    pub len: u64,
    pub perms: DevicePerms,
}

/// A device's DMA domain and its assigned regions; see the module documentation.
pub struct DeviceDma<D: Stage2 + Send + 'static> {
    frames: HostFrames,
    domain: Arc<DmaDomain<D>>,
    regions: Vec<DmaRegion>,
}

impl<D: Stage2 + Send + 'static> DeviceDma<D> {
    /// An empty domain of `iova_size` bytes translated by `stage2` (e.g. an `ept::EptTable`,
    /// the VT-d second-level format), over `frames`' pool.
    pub fn new(frames: &HostFrames, iova_size: u64, stage2: D) -> Result<Self> {
        Ok(DeviceDma {
            frames: frames.clone(),
            domain: Arc::new(DmaDomain::new(&frames.pool, iova_size, stage2)?),
            regions: Vec::new(),
        })
    }

    pub fn domain(&self) -> &Arc<DmaDomain<D>> {
        &self.domain
    }

    pub fn frames(&self) -> &HostFrames {
        &self.frames
    }

    pub fn regions(&self) -> &[DmaRegion] {
        &self.regions
    }

    /// The region named `name`.
    pub fn region(&self, name: &str) -> Option<&DmaRegion> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// Allocates a CONTIGUOUS|DMA Vmo of `len` bytes, maps it read-write into `guest` at `gpa`
    /// (replacing whatever RAM was mapped there) and assigns it at IOVA `gpa` with `perms`.
    pub fn add_contiguous<G: Stage2 + Send + 'static>(
        &mut self,
        guest: &Vmar<G>,
        name: &str,
        gpa: u64,
        len: u64,
        perms: DevicePerms,
    ) -> Result<&DmaRegion> {
        let vmo = Vmo::new_contiguous(&self.frames.pool, len, true)?;
        self.add_vmo(guest, name, &vmo, gpa, perms)
    }

    /// Maps an existing DMA Vmo (whole) read-write into `guest` at `gpa` and assigns it.
    pub fn add_vmo<G: Stage2 + Send + 'static>(
        &mut self,
        guest: &Vmar<G>,
        name: &str,
        vmo: &Vmo,
        gpa: u64,
        perms: DevicePerms,
    ) -> Result<&DmaRegion> {
        if !vmo.flags().contains(VmoFlags::DMA) {
            return Err(Error::InvalidArgs(format!("region {name}: not a DMA Vmo")));
        }
        let len = vmo.size();
        let mut opts = MapOptions::specific(gpa, VmPerms::RW);
        opts.placement = Placement::SpecificOverwrite(gpa);
        if vmo.flags().contains(VmoFlags::RESIZABLE) {
            opts = opts.allow_faults();
        }
        guest.map(vmo, 0, len, opts)?;
        self.assign(name, vmo, gpa, len, perms)
    }

    /// Assigns the DMA Vmo already mapped in `guest` at `[gpa, gpa + len)` (e.g. a fork's
    /// private copy of a parent's region) at IOVA `gpa`.
    pub fn adopt_mapped<G: Stage2 + Send + 'static>(
        &mut self,
        guest: &Vmar<G>,
        name: &str,
        gpa: u64,
        len: u64,
        perms: DevicePerms,
    ) -> Result<&DmaRegion> {
        let m = guest.query(gpa)?;
        let end = gpa
            .checked_add(len)
            .ok_or(Error::Vmo(vmo::Error::OutOfRange))?;
        if m.base != gpa || end > m.base + m.len {
            return Err(Error::InvalidArgs(format!(
                "region {name}: {gpa:#x}+{len:#x} is not one mapping (mapping {:#x}+{:#x})",
                m.base, m.len
            )));
        }
        if m.vmo_offset != 0 {
            return Err(Error::InvalidArgs(format!(
                "region {name}: mapping starts at Vmo offset {:#x}",
                m.vmo_offset
            )));
        }
        self.assign(name, &m.vmo, gpa, len, perms)
    }

    fn assign(
        &mut self,
        name: &str,
        vmo: &Vmo,
        gpa: u64,
        len: u64,
        perms: DevicePerms,
    ) -> Result<&DmaRegion> {
        if !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidArgs(format!(
                "region {name}: length {len:#x}"
            )));
        }
        self.domain.assign(vmo, 0, len, gpa, perms)?;
        let i = self.regions.len();
        self.regions.push(DmaRegion {
            name: name.to_string(),
            vmo: vmo.clone(),
            gpa,
            len,
            perms,
        });
        Ok(&self.regions[i])
    }

    /// Unassigns (unpins) every region; the guest keeps its mappings. Idempotent.
    pub fn teardown(&mut self) -> Result<()> {
        let mut first_err = None;
        for r in self.regions.drain(..) {
            if let Err(e) = self.domain.unassign(r.gpa) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

impl<D: Stage2 + Send + 'static> Drop for DeviceDma<D> {
    fn drop(&mut self) {
        // Every region was assigned by `assign`; unassigning cannot fail for them, and the
        // domain's own drop unpins whatever remains.
        let _ = self.teardown();
    }
}
