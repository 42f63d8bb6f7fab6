//! A host-side virtio-blk driver: builds descriptors, the avail ring and request buffers in
//! guest memory exactly where a guest driver would, and reads the used ring back — through
//! the guest's CPU view (`GuestRam`, the Vmar's own fault path), never through the device's
//! DMA domain. Used by tests and the demo; it can also write deliberately malicious
//! descriptors (`set_desc`, `publish`, `set_avail_idx` take any value).
//!
//! Layout it assumes (all GPAs, = IOVAs): the descriptor table and avail ring in one region,
//! the used ring in another, and a request buffer area: header at `buf`, status byte at
//! `buf + 16`, data from `buf + 4096`.
//!
//! Invariants: `GuestRam` reaches only pages the guest's Vmar maps (an unmapped GPA is a typed
//! error); the driver keeps at most one request in flight (descriptors 0..=3).

use ept::{Access, FaultInfo, FaultKind, Stage2};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vmo::{FrameAlloc, Vmar};

use super::blk::{Completion, QueueConfig, VirtioBlk};
use super::disk::DiskBackend;
use crate::error::{Error, Result};
use crate::memory::frames::HostFrames;
use ept::PAGE_SIZE;

/// The guest's memory as its CPU sees it (the Vmar's fault path, like `Guest::prefault`).
pub struct GuestRam<G: Stage2 + Send + 'static> {
    vmar: Vmar<G>,
    frames: HostFrames,
}

impl<G: Stage2 + Send + 'static> GuestRam<G> {
    pub fn new(vmar: &Vmar<G>, frames: &HostFrames) -> Self {
        GuestRam {
            vmar: vmar.clone(),
            frames: frames.clone(),
        }
    }

    /// Host pointer to the page at `page` (resolved, and made writable when `write`).
    fn page(&self, page: u64, write: bool) -> Result<*mut u8> {
        let access = if write { Access::WRITE } else { Access::READ };
        let r = self
            .vmar
            .handle_fault(FaultInfo::new(page, access, FaultKind::NotPresent))?;
        let p = self.frames.alloc.frame_ptr(r.pa);
        if p.is_null() {
            return Err(Error::BadState(format!("gpa {page:#x}: frame {:#x}", r.pa)));
        }
        Ok(p)
    }

    fn each(
        &self,
        gpa: u64,
        len: usize,
        write: bool,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) -> Result<()> {
        let end = gpa
            .checked_add(len as u64)
            .ok_or_else(|| Error::InvalidArgs(format!("guest range {gpa:#x}+{len:#x} wraps")))?;
        let mut at = gpa;
        while at < end {
            let page = at & !(PAGE_SIZE - 1);
            let n = ((page + PAGE_SIZE).min(end) - at) as usize;
            let p = self.page(page, write)?;
            // SAFETY: `at - page` < PAGE_SIZE: inside the frame.
            f(
                unsafe { p.add((at - page) as usize) },
                (at - gpa) as usize,
                n,
            );
            at += n as u64;
        }
        Ok(())
    }

    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len();
        self.each(gpa, len, false, |p, off, n| {
            // SAFETY: `p` covers `n` bytes of a resolved frame; `buf[off..off+n]` is in bounds.
            unsafe { std::ptr::copy_nonoverlapping(p, buf[off..off + n].as_mut_ptr(), n) }
        })
    }

    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.each(gpa, data.len(), true, |p, off, n| {
            // SAFETY: as in `read`, for a frame resolved writable.
            unsafe { std::ptr::copy_nonoverlapping(data[off..off + n].as_ptr(), p, n) }
        })
    }

    pub fn fill(&self, gpa: u64, len: usize, byte: u8) -> Result<()> {
        self.each(gpa, len, true, |p, _, n| {
            // SAFETY: as in `write`.
            unsafe { std::ptr::write_bytes(p, byte, n) }
        })
    }

    pub fn read_u16(&self, gpa: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.read(gpa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
}

/// A split-ring descriptor as the driver writes it (any values, including bad ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl RawDesc {
    /// Device-readable, chained to `next` when given.
    pub fn readable(addr: u64, len: u32, next: Option<u16>) -> Self {
        Self::make(addr, len, 0, next)
    }

    /// Device-writable, chained to `next` when given.
    pub fn writable(addr: u64, len: u32, next: Option<u16>) -> Self {
        Self::make(addr, len, VRING_DESC_F_WRITE as u16, next)
    }

    fn make(addr: u64, len: u32, flags: u16, next: Option<u16>) -> Self {
        match next {
            Some(n) => RawDesc {
                addr,
                len,
                flags: flags | VRING_DESC_F_NEXT as u16,
                next: n,
            },
            None => RawDesc {
                addr,
                len,
                flags,
                next: 0,
            },
        }
    }
}

/// Offset of the status byte in the buffer area.
pub const STATUS_OFF: u64 = 16;
/// Offset of the data in the buffer area.
pub const DATA_OFF: u64 = 4096;
/// Status byte value before the device writes it.
pub const STATUS_UNSET: u8 = 0xff;

/// What the driver got back for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The device's completion (from `process_queue`).
    pub completion: Completion,
    /// The status byte in guest memory (`STATUS_UNSET` if the device did not write it).
    pub status: u8,
    /// Used-ring entries the driver saw: (id, len).
    pub used: Vec<(u32, u32)>,
    /// Data read back from the buffer area (IN / GET_ID).
    pub data: Vec<u8>,
}

/// The host-side driver; see the module documentation.
pub struct BlkDriver<G: Stage2 + Send + 'static> {
    ram: GuestRam<G>,
    q: QueueConfig,
    buf: u64,
    buf_len: u64,
    avail_idx: u16,
    used_seen: u16,
}

impl<G: Stage2 + Send + 'static> BlkDriver<G> {
    /// Initialises the rings (zeroed avail and used rings) for queue `q`; requests use the
    /// buffer area `[buf, buf + buf_len)` (at least two pages).
    pub fn new(ram: GuestRam<G>, q: QueueConfig, buf: u64, buf_len: u64) -> Result<Self> {
        if buf_len < 2 * PAGE_SIZE {
            return Err(Error::InvalidArgs(format!(
                "buffer area {buf_len:#x} too small"
            )));
        }
        let n = usize::from(q.size);
        ram.fill(q.desc_table, 16 * n, 0)?;
        ram.fill(q.avail_ring, 6 + 2 * n, 0)?;
        ram.fill(q.used_ring, 6 + 8 * n, 0)?;
        Ok(BlkDriver {
            ram,
            q,
            buf,
            buf_len,
            avail_idx: 0,
            used_seen: 0,
        })
    }

    pub fn queue(&self) -> QueueConfig {
        self.q
    }

    pub fn ram(&self) -> &GuestRam<G> {
        &self.ram
    }

    /// Data capacity of the buffer area, in bytes.
    pub fn max_data(&self) -> usize {
        (self.buf_len - DATA_OFF) as usize
    }

    pub fn buf(&self) -> u64 {
        self.buf
    }

    /// Writes descriptor `idx` (any index below the queue size; it is the driver's table).
    pub fn set_desc(&self, idx: u16, d: RawDesc) -> Result<()> {
        if idx >= self.q.size {
            return Err(Error::InvalidArgs(format!(
                "descriptor {idx} past the table"
            )));
        }
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        self.ram.write(self.q.desc_table + 16 * u64::from(idx), &b)
    }

    /// Puts `head` (any value) in the next avail slot and publishes it.
    pub fn publish(&mut self, head: u16) -> Result<()> {
        let slot = u64::from(self.avail_idx % self.q.size);
        self.ram
            .write(self.q.avail_ring + 4 + 2 * slot, &head.to_le_bytes())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx)
    }

    /// Writes the avail ring's idx field (a corrupt value to test the device; `restore` with
    /// `avail_idx()`).
    pub fn set_avail_idx(&mut self, idx: u16) -> Result<()> {
        self.ram.write(self.q.avail_ring + 2, &idx.to_le_bytes())
    }

    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Takes back the last `n` published entries (the driver's own count; the ring's idx
    /// field is the caller's to rewrite with `set_avail_idx`).
    pub fn rewind_avail(&mut self, n: u16) {
        self.avail_idx = self.avail_idx.wrapping_sub(n);
    }

    /// Used-ring entries added since the last call: (id, len).
    pub fn take_used(&mut self) -> Result<Vec<(u32, u32)>> {
        let idx = self.ram.read_u16(self.q.used_ring + 2)?;
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.q.size);
            let mut e = [0u8; 8];
            self.ram.read(self.q.used_ring + 4 + 8 * slot, &mut e)?;
            let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        Ok(out)
    }

    /// Builds a request in the buffer area with descriptors 0.. and publishes it: header,
    /// `out` data (device-readable), `in_len` bytes of device-writable data, status.
    pub fn submit(&mut self, req_type: u32, sector: u64, out: &[u8], in_len: usize) -> Result<u16> {
        if out.len() > self.max_data() || in_len > self.max_data() {
            return Err(Error::InvalidArgs(format!(
                "request data {}/{in_len} past the buffer area",
                out.len()
            )));
        }
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&req_type.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        self.ram.write(self.buf, &hdr)?;
        self.ram.write(self.buf + STATUS_OFF, &[STATUS_UNSET])?;
        let data = self.buf + DATA_OFF;
        let mut descs = vec![RawDesc::readable(self.buf, 16, None)];
        if !out.is_empty() {
            self.ram.write(data, out)?;
            descs.push(RawDesc::readable(data, out.len() as u32, None));
        }
        if in_len > 0 {
            self.ram.fill(data, in_len, 0)?;
            descs.push(RawDesc::writable(data, in_len as u32, None));
        }
        descs.push(RawDesc::writable(self.buf + STATUS_OFF, 1, None));
        self.submit_chain(&descs)
    }

    /// Writes `descs` as descriptors 0.. chained in order (NEXT set on all but the last) and
    /// publishes descriptor 0.
    pub fn submit_chain(&mut self, descs: &[RawDesc]) -> Result<u16> {
        let last = descs.len().saturating_sub(1);
        for (i, d) in descs.iter().enumerate() {
            let mut d = *d;
            if i < last {
                d.flags |= VRING_DESC_F_NEXT as u16;
                d.next = (i + 1) as u16;
            } else {
                d.flags &= !(VRING_DESC_F_NEXT as u16);
            }
            self.set_desc(i as u16, d)?;
        }
        self.publish(0)?;
        Ok(0)
    }

    /// Lets `dev` serve the queue and collects the single completion, the status byte and
    /// `data_len` bytes of the data area.
    pub fn complete<D: DiskBackend, S: Stage2 + Send + 'static>(
        &mut self,
        dev: &mut VirtioBlk<D, S>,
        data_len: usize,
    ) -> Result<Response> {
        let (mut done, _notify) = dev.process_queue()?;
        if done.len() != 1 {
            return Err(Error::BadState(format!(
                "expected one completion, got {}",
                done.len()
            )));
        }
        let completion = done.remove(0);
        let used = self.take_used()?;
        let mut status = [0u8];
        self.ram.read(self.buf + STATUS_OFF, &mut status)?;
        let mut data = vec![0u8; data_len];
        self.ram.read(self.buf + DATA_OFF, &mut data)?;
        Ok(Response {
            completion,
            status: status[0],
            used,
            data,
        })
    }

    /// Reads `sectors` sectors from `sector`.
    pub fn read_sectors<D: DiskBackend, S: Stage2 + Send + 'static>(
        &mut self,
        dev: &mut VirtioBlk<D, S>,
        sector: u64,
        sectors: usize,
    ) -> Result<Response> {
        let len = sectors * 512;
        self.submit(VIRTIO_BLK_T_IN, sector, &[], len)?;
        self.complete(dev, len)
    }

    /// Writes `data` (whole sectors) at `sector`.
    pub fn write_sectors<D: DiskBackend, S: Stage2 + Send + 'static>(
        &mut self,
        dev: &mut VirtioBlk<D, S>,
        sector: u64,
        data: &[u8],
    ) -> Result<Response> {
        self.submit(VIRTIO_BLK_T_OUT, sector, data, 0)?;
        self.complete(dev, 0)
    }

    pub fn flush<D: DiskBackend, S: Stage2 + Send + 'static>(
        &mut self,
        dev: &mut VirtioBlk<D, S>,
    ) -> Result<Response> {
        self.submit(VIRTIO_BLK_T_FLUSH, 0, &[], 0)?;
        self.complete(dev, 0)
    }

    pub fn get_id<D: DiskBackend, S: Stage2 + Send + 'static>(
        &mut self,
        dev: &mut VirtioBlk<D, S>,
    ) -> Result<Response> {
        self.submit(VIRTIO_BLK_T_GET_ID, 0, &[], 20)?;
        self.complete(dev, 20)
    }
}
