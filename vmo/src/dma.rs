//! `DmaDomain`: a device's IOVA space. A device reaches guest memory only through regions
//! explicitly assigned to its domain; everything else is refused with a typed error, counted,
//! and touches nothing.
//!
//! Structure: the domain is itself a `Vmar` over the IOVA space, holding only the assigned
//! regions as shared mappings with the device's permissions, and translated by a `Stage2`
//! (an `EptTable` is the natural choice: VT-d second-level tables use the EPT format). Device
//! accesses are translated page by page through that table; a missing entry goes through the
//! same `Vmar::handle_fault` as a CPU fault, which refuses anything outside the regions.
//!
//! Invariants:
//! - an assigned range is pinned in its Vmo for as long as it is assigned (so its frames are
//!   committed, private, never moved, decommitted or shared copy-on-write);
//! - `translate` checks the whole `[iova, iova + len)` before returning anything: a request
//!   that is refused anywhere yields no segment at all;
//! - only Vmos created with the DMA flag and from the domain's frame pool can be assigned.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use ept::{Access, FaultInfo, FaultKind, S2Perms, Stage2};

use crate::vmar::{MapOptions, VmPerms, Vmar};
use crate::{Error, FramePool, Result, Vmo, VmoFlags, PAGE_SIZE};

bitflags::bitflags! {
    /// What a device may do to an assigned region.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct DevicePerms: u8 {
        /// The device reads guest memory (a driver-to-device buffer).
        const READ = 1 << 0;
        /// The device writes guest memory (a device-to-driver buffer).
        const WRITE = 1 << 1;
    }
}

/// One contiguous piece of a translated device access: contiguous both in host memory and in
/// frame (physical) addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaSegment {
    /// Host pointer to the first byte.
    pub host: *mut u8,
    /// Frame (physical) address of the first byte, as the pool's allocator numbers frames.
    pub pa: u64,
    pub len: usize,
}

struct Assignment {
    vmo: Vmo,
    vmo_offset: u64,
    len: u64,
    perms: DevicePerms,
}

/// Counters of one domain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaStats {
    /// Device accesses translated.
    pub translated: u64,
    /// Device accesses refused (the sum of the reasons below).
    pub refused: u64,
    /// … because the range is outside every assigned region or crosses a region's end.
    pub outside: u64,
    /// … because `iova + len` wraps around 64 bits.
    pub wrapped: u64,
    /// … because the region's device perms forbid the access.
    pub denied: u64,
    /// … for any other reason (malformed access, a frame that vanished).
    pub other: u64,
}

/// A device's view of guest memory.
pub struct DmaDomain<S: Stage2 + Send + 'static> {
    pool: FramePool,
    iova: Vmar<S>,
    assigned: crate::sync::Mutex<BTreeMap<u64, Assignment>>,
    /// Refusals by reason: outside, wrapped, denied, other (see `DmaStats`).
    refused: [AtomicU64; 4],
    translated: AtomicU64,
}

impl<S: Stage2 + Send + 'static> DmaDomain<S> {
    /// An empty domain of `iova_size` bytes translated by `stage2`; assigned Vmos must come
    /// from `pool`.
    pub fn new(pool: &FramePool, iova_size: u64, stage2: S) -> Result<Self> {
        Ok(DmaDomain {
            pool: pool.clone(),
            iova: Vmar::new_root(iova_size, stage2)?,
            assigned: crate::sync::Mutex::new(BTreeMap::new()),
            refused: Default::default(),
            translated: AtomicU64::new(0),
        })
    }

    /// Assigns `[vmo_offset, vmo_offset + len)` of a DMA Vmo at `iova` with `perms`, pinning
    /// it. Errors: NotSupported (not a DMA Vmo), InvalidArgs (misaligned, empty, other pool),
    /// AlreadyExists (overlaps an assigned region), OutOfRange (past the Vmo or the domain).
    pub fn assign(
        &self,
        vmo: &Vmo,
        vmo_offset: u64,
        len: u64,
        iova: u64,
        perms: DevicePerms,
    ) -> Result<()> {
        if !vmo.flags().contains(VmoFlags::DMA) {
            return Err(Error::NotSupported);
        }
        if !vmo.pool().same_pool(&self.pool) || perms.is_empty() {
            return Err(Error::InvalidArgs);
        }
        if len == 0
            || !len.is_multiple_of(PAGE_SIZE)
            || !vmo_offset.is_multiple_of(PAGE_SIZE)
            || !iova.is_multiple_of(PAGE_SIZE)
        {
            return Err(Error::InvalidArgs);
        }
        // The table entry needs READ even for a write-only device (neither EPT nor NPT can
        // express write-only); `translate` enforces the device perms exactly.
        let mut table_perms = VmPerms::READ;
        if perms.contains(DevicePerms::WRITE) {
            table_perms |= VmPerms::WRITE;
        }
        let mut assigned = self.assigned.lock();
        // The pin keeps the range committed and stops shrinking, so a resizable DMA Vmo is
        // safe to map here (hence `allow_faults`).
        vmo.pin(vmo_offset, len)?;
        if let Err(e) = self.iova.map(
            vmo,
            vmo_offset,
            len,
            MapOptions::specific(iova, table_perms)
                .shared()
                .allow_faults(),
        ) {
            vmo.unpin(vmo_offset, len)?;
            return Err(e);
        }
        assigned.insert(
            iova,
            Assignment {
                vmo: vmo.clone(),
                vmo_offset,
                len,
                perms,
            },
        );
        Ok(())
    }

    /// Removes the region assigned at `iova` and unpins it. NotFound if none starts there.
    pub fn unassign(&self, iova: u64) -> Result<()> {
        let mut assigned = self.assigned.lock();
        let a = assigned.get(&iova).ok_or(Error::NotFound)?;
        self.iova.unmap(iova, a.len)?;
        a.vmo.unpin(a.vmo_offset, a.len)?;
        assigned.remove(&iova);
        Ok(())
    }

    /// Regions currently assigned: (iova, len, perms).
    pub fn regions(&self) -> Vec<(u64, u64, DevicePerms)> {
        self.assigned
            .lock()
            .iter()
            .map(|(&i, a)| (i, a.len, a.perms))
            .collect()
    }

    pub fn stats(&self) -> DmaStats {
        let [outside, wrapped, denied, other] =
            self.refused.each_ref().map(|c| c.load(Ordering::Relaxed));
        DmaStats {
            translated: self.translated.load(Ordering::Relaxed),
            refused: outside + wrapped + denied + other,
            outside,
            wrapped,
            denied,
            other,
        }
    }

    fn refuse<T>(&self, e: Error) -> Result<T> {
        let reason = match e {
            Error::NotFound => 0,
            Error::OutOfRange => 1,
            Error::AccessDenied => 2,
            _ => 3,
        };
        self.refused[reason].fetch_add(1, Ordering::Relaxed);
        Err(e)
    }

    /// Translates a device access of `len` bytes at `iova` into host memory segments. The
    /// whole range must lie inside one assigned region whose perms allow `access`; otherwise
    /// the access is refused (NotFound outside every region or across a region's end,
    /// OutOfRange on arithmetic wrap-around, AccessDenied against the perms) and counted.
    /// The segments stay valid while the region is assigned.
    pub fn translate(&self, iova: u64, len: u64, access: DevicePerms) -> Result<Vec<DmaSegment>> {
        let Some(end) = iova.checked_add(len) else {
            return self.refuse(Error::OutOfRange);
        };
        if access.is_empty() || access.bits() & !DevicePerms::all().bits() != 0 {
            return self.refuse(Error::InvalidArgs);
        }
        {
            let assigned = self.assigned.lock();
            let Some((&start, a)) = assigned.range(..=iova).next_back() else {
                return self.refuse(Error::NotFound);
            };
            // Even a zero-length access must name an address inside the region.
            if iova >= start + a.len || end > start + a.len {
                return self.refuse(Error::NotFound);
            }
            if !a.perms.contains(access) {
                return self.refuse(Error::AccessDenied);
            }
        }
        if len == 0 {
            self.translated.fetch_add(1, Ordering::Relaxed);
            return Ok(Vec::new());
        }
        let (need, fault_access) = if access.contains(DevicePerms::WRITE) {
            (S2Perms::WRITE, Access::WRITE)
        } else {
            (S2Perms::READ, Access::READ)
        };
        let mut segments: Vec<DmaSegment> = Vec::new();
        let mut at = iova;
        while at < end {
            let page = at & !(PAGE_SIZE - 1);
            let n = (page + PAGE_SIZE).min(end) - at;
            let pa = match self.installed(page, need) {
                Some(pa) => pa,
                None => {
                    let kind = FaultKind::NotPresent;
                    match self
                        .iova
                        .handle_fault(FaultInfo::new(page, fault_access, kind))
                    {
                        Ok(r) => r.pa,
                        Err(e) => return self.refuse(e),
                    }
                }
            };
            let host = self.pool.allocator().frame_ptr(pa);
            if host.is_null() {
                return self.refuse(Error::BadState);
            }
            // SAFETY: `at - page` < PAGE_SIZE, inside the frame.
            let host = unsafe { host.add((at - page) as usize) };
            let pa = pa + (at - page);
            match segments.last_mut() {
                // Merge only when both the host and the frame addresses continue.
                Some(last)
                    if last.host.wrapping_add(last.len) == host
                        && last.pa + last.len as u64 == pa =>
                {
                    last.len += n as usize
                }
                _ => segments.push(DmaSegment {
                    host,
                    pa,
                    len: n as usize,
                }),
            }
            at += n;
        }
        self.translated.fetch_add(1, Ordering::Relaxed);
        Ok(segments)
    }

    fn installed(&self, page: u64, need: S2Perms) -> Option<u64> {
        self.iova.with_stage2(|s| {
            s.query(page)
                .filter(|t| t.perms.contains(need))
                .map(|t| t.pa_of(page))
        })
    }
}

impl<S: Stage2 + Send + 'static> Drop for DmaDomain<S> {
    fn drop(&mut self) {
        for (_, a) in core::mem::take(&mut *self.assigned.lock()) {
            // The range was pinned by `assign`; unpinning cannot fail for it.
            let _ = a.vmo.unpin(a.vmo_offset, a.len);
        }
    }
}
