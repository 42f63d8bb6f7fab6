//! `BlkRig`: a virtio-blk device attached to a guest address space in the standard layout, with
//! its host-side driver and canary pages — the wiring shared by the demo and the tests.
//!
//! Layout from `base` (page aligned; pages): canary | ring (desc table + avail ring, device
//! READ) | canary | used (used ring, device READ|WRITE) | canary | data (4 pages, device
//! READ|WRITE) | canary | ro (driver→device data, device READ) | canary | bulk (2 pages, device
//! READ|WRITE) | canary. ring, used, data and ro are CONTIGUOUS|DMA Vmos; bulk is a
//! DMA|RESIZABLE Vmo (a scatter-gather buffer: separate frames, so it can be decommitted,
//! shrunk and snapshotted once unassigned — a contiguous Vmo never can). All are mapped into
//! the guest and assigned at IOVA = GPA; canaries are ordinary guest RAM filled with `CANARY`,
//! mapped in the guest and never assigned.
//!
//! Invariants: the guest Vmar must map RAM over `[base, base + RIG_PAGES pages)` before
//! `attach` (the regions replace pieces of it); the domain covers the guest's whole range and
//! holds only the five regions.

use ept::{EptTable, HeapPhysMem, Stage2};
use vmo::{DevicePerms, Vmar, Vmo, VmoFlags};

use super::blk::{QueueConfig, VirtioBlk};
use super::disk::DiskBackend;
use super::dma_region::DeviceDma;
use super::driver::{BlkDriver, GuestRam};
use crate::error::{Error, Result};
use crate::memory::frames::HostFrames;
use ept::PAGE_SIZE;

/// The DMA domain's translation table: EPT format (what VT-d second-level tables use).
pub type DomainTable = EptTable<HeapPhysMem>;

/// Pages the layout spans.
pub const RIG_PAGES: u64 = 15;
/// Queue size the rig's driver uses.
pub const QUEUE_SIZE: u16 = 16;
/// Canary fill byte.
pub const CANARY: u8 = 0xc5;

/// GPAs of the standard layout; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkLayout {
    pub base: u64,
}

impl BlkLayout {
    const P: u64 = PAGE_SIZE;

    pub fn ring(&self) -> (u64, u64) {
        (self.base + Self::P, Self::P)
    }
    pub fn used(&self) -> (u64, u64) {
        (self.base + 3 * Self::P, Self::P)
    }
    pub fn data(&self) -> (u64, u64) {
        (self.base + 5 * Self::P, 4 * Self::P)
    }
    pub fn ro(&self) -> (u64, u64) {
        (self.base + 10 * Self::P, Self::P)
    }
    pub fn bulk(&self) -> (u64, u64) {
        (self.base + 12 * Self::P, 2 * Self::P)
    }
    /// Canary pages: before and after every region.
    pub fn canaries(&self) -> [u64; 6] {
        [0, 2, 4, 9, 11, 14].map(|p| self.base + p * Self::P)
    }
    pub fn queue(&self) -> QueueConfig {
        QueueConfig {
            size: QUEUE_SIZE,
            desc_table: self.ring().0,
            avail_ring: self.ring().0 + 0x800,
            used_ring: self.used().0,
        }
    }
    /// (name, gpa, len, device perms) of the regions.
    pub fn regions(&self) -> [(&'static str, u64, u64, DevicePerms); 5] {
        let rw = DevicePerms::READ | DevicePerms::WRITE;
        [
            ("ring", self.ring().0, self.ring().1, DevicePerms::READ),
            ("used", self.used().0, self.used().1, rw),
            ("data", self.data().0, self.data().1, rw),
            ("ro", self.ro().0, self.ro().1, DevicePerms::READ),
            ("bulk", self.bulk().0, self.bulk().1, rw),
        ]
    }
}

/// A device, its driver and its layout.
pub struct BlkRig<D: DiskBackend, G: Stage2 + Send + 'static> {
    pub drv: BlkDriver<G>,
    pub dev: VirtioBlk<D, DomainTable>,
    pub layout: BlkLayout,
}

fn new_dma<G: Stage2 + Send + 'static>(
    frames: &HostFrames,
    guest: &Vmar<G>,
) -> Result<DeviceDma<DomainTable>> {
    let (_, size) = guest.range()?;
    let table = DomainTable::new(HeapPhysMem::new())
        .map_err(|e| Error::InvalidArgs(format!("DMA domain table: {e:?}")))?;
    DeviceDma::new(frames, size, table)
}

impl<D: DiskBackend, G: Stage2 + Send + 'static> BlkRig<D, G> {
    /// Creates the four regions (fresh CONTIGUOUS|DMA Vmos mapped over the guest's RAM at the
    /// layout's GPAs), a device over `disk` and a driver; fills the canaries and activates the
    /// queue.
    pub fn attach(
        frames: &HostFrames,
        guest: &Vmar<G>,
        base: u64,
        disk: D,
        id: &str,
    ) -> Result<Self> {
        let layout = BlkLayout { base };
        let mut dma = new_dma(frames, guest)?;
        for (name, gpa, len, perms) in layout.regions() {
            if name == "bulk" {
                let vmo = Vmo::new(&frames.pool, len, VmoFlags::DMA | VmoFlags::RESIZABLE)?;
                dma.add_vmo(guest, name, &vmo, gpa, perms)?;
            } else {
                dma.add_contiguous(guest, name, gpa, len, perms)?;
            }
        }
        Self::finish(frames, guest, layout, dma, disk, id)
    }

    /// Like `attach`, for a guest whose regions are already mapped at the layout's GPAs (a
    /// fork's private copies): assigns them to a fresh domain.
    pub fn adopt(
        frames: &HostFrames,
        guest: &Vmar<G>,
        base: u64,
        disk: D,
        id: &str,
    ) -> Result<Self> {
        let layout = BlkLayout { base };
        let mut dma = new_dma(frames, guest)?;
        for (name, gpa, len, perms) in layout.regions() {
            dma.adopt_mapped(guest, name, gpa, len, perms)?;
        }
        Self::finish(frames, guest, layout, dma, disk, id)
    }

    fn finish(
        frames: &HostFrames,
        guest: &Vmar<G>,
        layout: BlkLayout,
        dma: DeviceDma<DomainTable>,
        disk: D,
        id: &str,
    ) -> Result<Self> {
        let mut dev = VirtioBlk::new(dma, disk, id)?;
        let ram = GuestRam::new(guest, frames);
        let (buf, buf_len) = layout.data();
        let drv = BlkDriver::new(ram, layout.queue(), buf, buf_len)?;
        dev.activate(layout.queue())?;
        let rig = BlkRig { drv, dev, layout };
        rig.fill_canaries()?;
        Ok(rig)
    }

    pub fn fill_canaries(&self) -> Result<()> {
        for c in self.layout.canaries() {
            self.drv.ram().fill(c, PAGE_SIZE as usize, CANARY)?;
        }
        Ok(())
    }

    /// Bytes of the canary pages that no longer hold `CANARY` (0 = nothing written outside
    /// the regions).
    pub fn canary_damage(&self) -> Result<u64> {
        let mut bad = 0;
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for c in self.layout.canaries() {
            self.drv.ram().read(c, &mut page)?;
            bad += page.iter().filter(|&&b| b != CANARY).count() as u64;
        }
        Ok(bad)
    }
}
