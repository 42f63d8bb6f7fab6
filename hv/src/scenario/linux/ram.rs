//! Guest RAM as the memory model holds it: `GuestRam`, a `vmo::FrameAlloc` that hands each RAM
//! range of the layout out once, as one contiguous run at its own physical address, and
//! `GuestMemory`, the contiguous Vmos over those runs mapped at the identical guest-physical
//! addresses in the guest's Vmar (so guest-physical = host-physical and the emulator's DMA
//! lands where the guest expects).
//!
//! Invariants: a range is handed out at most once, whole; `alloc_frame` never succeeds (guest
//! RAM has no free frames to give, so nothing in it is ever copied or moved); the frames are
//! outside hv's window, so hv's own allocator never hands them out; freeing gives nothing back
//! to the machine (the pool's counters still account for every frame).

use alloc::sync::Arc;
use alloc::vec::Vec;

use ept::PAGE_SIZE;
use vmo::{FramePool, MapOptions, Paddr, VmPerms, Vmar, Vmo};

use crate::virt::stage2::HvTable;

/// The guest RAM ranges, each handed out once (`alloc_contiguous` of exactly its frames).
pub struct GuestRam {
    ranges: Vec<(u64, u64)>,
    handed: spin::Mutex<Vec<bool>>,
}

// SAFETY: each range is page aligned, below 4 GiB (identity mapped by hv, so the address is a
// valid pointer to its bytes), disjoint from the others and from every frame hv's own allocator
// hands out (it lies outside hv's window), and is handed out once: no address is handed out
// twice, and nobody but the frames' holders writes them. The lock makes it thread safe.
unsafe impl vmo::FrameAlloc for GuestRam {
    fn alloc_frame(&self) -> Option<Paddr> {
        None
    }
    fn alloc_contiguous(&self, count: usize) -> Option<Paddr> {
        let mut handed = self.handed.lock();
        let i = self
            .ranges
            .iter()
            .enumerate()
            .position(|(i, &(s, e))| !handed[i] && (e - s) / PAGE_SIZE == count as u64)?;
        handed[i] = true;
        Some(self.ranges[i].0)
    }
    fn free_frame(&self, _pa: Paddr) {
        // The machine's RAM: nothing to give back (the pool counts the free).
    }
    fn frame_ptr(&self, pa: Paddr) -> *mut u8 {
        pa as *mut u8
    }
}

/// The guest's RAM: one contiguous Vmo per range, each mapped RWX at its own address.
pub struct GuestMemory {
    pub pool: FramePool,
    pub vmos: Vec<Vmo>,
}

impl GuestMemory {
    /// Makes the Vmos over `ranges` (zero-filled) and maps them into `vmar`.
    pub fn new(ranges: &[(u64, u64)], vmar: &Vmar<HvTable>) -> Result<Self, vmo::Error> {
        let pool = FramePool::new(Arc::new(GuestRam {
            ranges: ranges.to_vec(),
            handed: spin::Mutex::new(alloc::vec![false; ranges.len()]),
        }));
        let mut vmos = Vec::new();
        for &(start, end) in ranges {
            let vmo = Vmo::new_contiguous(&pool, end - start, false)?;
            if vmo.contiguous_base() != Some(start) {
                return Err(vmo::Error::BadState);
            }
            vmar.map(
                &vmo,
                0,
                end - start,
                MapOptions::specific(start, VmPerms::RWX),
            )?;
            vmos.push(vmo);
        }
        Ok(GuestMemory { pool, vmos })
    }

    /// Copies `data` into guest RAM at `gpa` (through the Vmo's own write path).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), vmo::Error> {
        let end = gpa
            .checked_add(data.len() as u64)
            .ok_or(vmo::Error::OutOfRange)?;
        let vmo = self
            .vmos
            .iter()
            .find(|v| {
                let base = v.contiguous_base().unwrap_or(u64::MAX);
                base <= gpa && end <= base.saturating_add(v.size())
            })
            .ok_or(vmo::Error::OutOfRange)?;
        vmo.write(gpa - vmo.contiguous_base().unwrap_or(0), data)
    }
}
