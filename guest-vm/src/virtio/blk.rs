//! `VirtioBlk`: a virtio block device (split virtqueue) over a `DiskBackend`, whose only view
//! of guest memory is its DMA domain.
//!
//! Built on rust-vmm: `virtio_queue::Queue` parses the rings and walks descriptor chains
//! (`iter`, `DescriptorChain`, `Reader`/`Writer`, `add_used`), over `DmaMemory` — vm-memory's
//! `IommuMemory` with `DomainIommu` — so every address the device touches (descriptor table,
//! avail ring, used ring, each buffer) is translated by the `DmaDomain` first.
//!
//! Requests (virtio 1.x §5.2.6): a 16-byte header `{type: le32, reserved: le32, sector: le64}`
//! in device-readable buffers, then data, then a 1-byte status as the last device-writable
//! byte. Supported: IN (read), OUT (write), FLUSH, GET_ID; sector size 512. Outcomes:
//! - OK / IOERR (data length not whole sectors, range past the capacity, backend error, short
//!   header) / UNSUPP (unknown type): the status byte is written, the chain is returned in the
//!   used ring with the number of bytes written;
//! - refused: the chain is malformed (head index ≥ queue size, a descriptor loop or a next
//!   index ≥ queue size — the walk stops there and the last descriptor still has NEXT —, no
//!   writable status byte, a descriptor with VIRTQ_DESC_F_INDIRECT) or the domain refused one
//!   of its buffers. Nothing is read from or written to the buffers; the head (if in range) is
//!   returned with length 0.
//!
//! Indirect descriptors: VIRTIO_RING_F_INDIRECT_DESC is not offered (`FEATURES`), so it is never
//! negotiated, and a driver MUST NOT set VIRTQ_DESC_F_INDIRECT (virtio 1.2 §2.7.5.3.1). The
//! device walks each chain's descriptors itself (`walk`) before handing it to virtio-queue —
//! whose `DescriptorChain` would follow an indirect table whatever was negotiated — and fails a
//! chain that has one (`Refusal::Indirect`): the table it names is never read, its buffers are
//! never touched. Smallest surface: Linux's virtio-blk uses indirect descriptors only when
//! offered. (`Reader::new`/`Writer::new` read the descriptors again; a driver that rewrites a
//! published descriptor in between — also forbidden — could still get a table followed, but
//! only through the domain, like every other access.)
//!
//! Invariants: all of a chain's buffers are translated (`Reader::new`/`Writer::new`) before the
//! first byte is moved, so a refused request writes nothing; a malicious driver gets a status
//! or a refusal, never a panic, and the device keeps serving the queue.

use std::fmt;
use std::io::{Read, Write};

use ept::Stage2;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress};

use super::disk::{DiskBackend, SECTOR_SIZE};
use super::dma_region::DeviceDma;
use super::iommu::{dma_memory, DmaMemory};
use crate::error::{Error, Result};

/// Largest queue the device offers.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// Feature bits offered: VERSION_1, ACCESS_PLATFORM (accesses go through the platform IOMMU,
/// i.e. the DMA domain), BLK_F_FLUSH. Not RING_F_INDIRECT_DESC: a chain with an indirect
/// descriptor is refused (see the module documentation).
pub const FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM) | (1 << VIRTIO_BLK_F_FLUSH);

// `walk` refuses every indirect descriptor; offering the feature needs a negotiated path first.
const _: () = assert!(FEATURES & (1 << VIRTIO_RING_F_INDIRECT_DESC) == 0);

/// The request header a driver puts first in a chain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct BlkReqHeader {
    pub req_type: u32,
    pub reserved: u32,
    pub sector: u64,
}

// SAFETY: plain old data, no padding (4 + 4 + 8 bytes), every bit pattern valid.
unsafe impl ByteValued for BlkReqHeader {}

/// Where the driver put one virtqueue's parts (IOVAs = GPAs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    pub size: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// Why a chain was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Nothing could be read at the head: index ≥ queue size, or its descriptor unreachable.
    BadHead(u16),
    /// The chain stopped while its last descriptor still has NEXT: a loop (more descriptors
    /// than the queue holds), a next index ≥ queue size, or a descriptor the domain refused.
    BrokenChain,
    /// The last descriptor is not a device-writable status byte.
    NoStatus,
    /// The DMA domain refused a buffer (outside the regions, across a region's end, 64-bit
    /// wrap-around, against the region's perms).
    Dma(String),
    /// A descriptor has VIRTQ_DESC_F_INDIRECT, but VIRTIO_RING_F_INDIRECT_DESC was not
    /// negotiated (it is never offered); the indirect table was not read.
    Indirect,
}

/// What became of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Status byte written with this VIRTIO_BLK_S_* value.
    Status(u8),
    Refused(Refusal),
}

/// One processed chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub head: u16,
    pub outcome: Outcome,
    /// Length put in the used ring (bytes written to device-writable buffers).
    pub used_len: u32,
}

/// Device counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkStats {
    /// Requests completed with VIRTIO_BLK_S_OK.
    pub served: u64,
    /// Requests completed with IOERR or UNSUPP.
    pub failed: u64,
    /// Chains refused (nothing read or written).
    pub refused: u64,
    /// Queue-level errors (avail index jumped more than the queue size, used ring write
    /// refused).
    pub queue_errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// A virtio-blk device; see the module documentation.
pub struct VirtioBlk<D: DiskBackend, S: Stage2 + Send + 'static> {
    // Field order is drop order: the memory view before the domain owner.
    mem: DmaMemory<S>,
    queue: Option<Queue>,
    disk: D,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    stats: BlkStats,
    dma: DeviceDma<S>,
}

impl<D: DiskBackend, S: Stage2 + Send + 'static> fmt::Debug for VirtioBlk<D, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioBlk")
            .field("capacity", &self.disk.capacity())
            .field("stats", &self.stats)
            .field("dma", &self.dma.domain().stats())
            .finish_non_exhaustive()
    }
}

impl<D: DiskBackend, S: Stage2 + Send + 'static> VirtioBlk<D, S> {
    /// A device over `disk` reaching guest memory only through `dma`; `id` is the GET_ID
    /// serial (truncated to 20 bytes).
    pub fn new(dma: DeviceDma<S>, disk: D, id: &str) -> Result<Self> {
        if disk.capacity() == 0 || !disk.capacity().is_multiple_of(SECTOR_SIZE) {
            return Err(Error::InvalidArgs(format!(
                "disk capacity {:#x} is not whole sectors",
                disk.capacity()
            )));
        }
        let mem = dma_memory(dma.frames(), dma.domain().clone())?;
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = id.len().min(serial.len());
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(VirtioBlk {
            mem,
            queue: None,
            disk,
            id: serial,
            stats: BlkStats::default(),
            dma,
        })
    }

    /// Capacity in 512-byte sectors (config space `capacity`).
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity() / SECTOR_SIZE
    }

    pub fn features(&self) -> u64 {
        FEATURES
    }

    pub fn stats(&self) -> BlkStats {
        self.stats
    }

    pub fn dma(&self) -> &DeviceDma<S> {
        &self.dma
    }

    pub fn dma_mut(&mut self) -> &mut DeviceDma<S> {
        &mut self.dma
    }

    pub fn disk(&self) -> &D {
        &self.disk
    }

    /// The device's memory view (for inspection; every access goes through the domain).
    pub fn memory(&self) -> &DmaMemory<S> {
        &self.mem
    }

    /// Driver OK: sets up the queue (replacing any previous one). Refused (InvalidArgs, and
    /// the device is left without a queue) unless the size is a power of two
    /// ≤ `MAX_QUEUE_SIZE`, the parts are aligned, and the descriptor table and avail ring are
    /// device-readable and the used ring device-writable through the domain.
    pub fn activate(&mut self, cfg: QueueConfig) -> Result<()> {
        // A refused configuration leaves the device without a queue (it needs a reset).
        self.queue = None;
        let bad = |what: &str, e: virtio_queue::Error| {
            Error::InvalidArgs(format!("virtqueue {what}: {e}"))
        };
        let mut q = Queue::new(MAX_QUEUE_SIZE).map_err(|e| bad("max size", e))?;
        q.try_set_size(cfg.size).map_err(|e| bad("size", e))?;
        q.try_set_desc_table_address(GuestAddress(cfg.desc_table))
            .map_err(|e| bad("descriptor table", e))?;
        q.try_set_avail_ring_address(GuestAddress(cfg.avail_ring))
            .map_err(|e| bad("avail ring", e))?;
        q.try_set_used_ring_address(GuestAddress(cfg.used_ring))
            .map_err(|e| bad("used ring", e))?;
        q.set_ready(true);
        if !q.is_valid(&self.mem) {
            return Err(Error::InvalidArgs(format!(
                "virtqueue {cfg:x?} is not inside the device's DMA regions with the right perms"
            )));
        }
        self.queue = Some(q);
        Ok(())
    }

    /// Device reset: forgets the queue (regions stay assigned).
    pub fn reset(&mut self) {
        self.queue = None;
    }

    /// Tears the device down: resets it and unassigns (unpins) every DMA region.
    pub fn teardown(&mut self) -> Result<()> {
        self.reset();
        self.dma.teardown()
    }

    /// Serves every available chain. Returns what became of each, and whether the driver
    /// should be notified. Errors: BadState when the queue is not active or the driver's
    /// avail index is corrupt (moved by more than the queue size; counted; nothing consumed).
    pub fn process_queue(&mut self) -> Result<(Vec<Completion>, bool)> {
        let Some(queue) = self.queue.as_mut() else {
            return Err(Error::BadState("virtio-blk queue not activated".into()));
        };
        let mem = &self.mem;
        let chains: Vec<DescriptorChain<&DmaMemory<S>>> = match queue.iter(mem) {
            Ok(it) => it.collect(),
            Err(e) => {
                self.stats.queue_errors += 1;
                return Err(Error::BadState(format!("virtqueue: {e}")));
            }
        };
        let desc_table = GuestAddress(queue.desc_table());
        let mut done = Vec::with_capacity(chains.len());
        for chain in chains {
            let head = chain.head_index();
            let (outcome, used_len) = serve(
                mem,
                &mut self.disk,
                &self.id,
                &mut self.stats,
                chain,
                desc_table,
                queue.size(),
            );
            match &outcome {
                Outcome::Status(s) if u32::from(*s) == VIRTIO_BLK_S_OK => self.stats.served += 1,
                Outcome::Status(_) => self.stats.failed += 1,
                Outcome::Refused(_) => self.stats.refused += 1,
            }
            // A head past the queue has no used-ring slot to return it in.
            if head < queue.size() && queue.add_used(mem, head, used_len).is_err() {
                self.stats.queue_errors += 1;
            }
            done.push(Completion {
                head,
                outcome,
                used_len,
            });
        }
        let notify = queue.needs_notification(mem).unwrap_or(true);
        Ok((done, notify))
    }
}

fn refused(r: Refusal) -> (Outcome, u32) {
    (Outcome::Refused(r), 0)
}

/// The descriptors of chain `head` in the table at `desc_table`, as `DescriptorChain` yields
/// them — at most `queue_size`; the walk stops before a next index ≥ `queue_size`, a descriptor
/// the domain refuses, or a byte total past 2^32 — except that a descriptor with
/// VIRTQ_DESC_F_INDIRECT is refused instead of followed (not negotiated; see the module
/// documentation). Each descriptor is read once, through the domain.
fn walk<S: Stage2 + Send + 'static>(
    mem: &DmaMemory<S>,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> std::result::Result<Vec<Descriptor>, Refusal> {
    let mut descs = Vec::new();
    let mut next = head;
    let mut bytes = 0u32;
    while descs.len() < usize::from(queue_size) && next < queue_size {
        let at = desc_table.checked_add(u64::from(next) * size_of::<Descriptor>() as u64);
        let Some(desc) = at.and_then(|a| mem.read_obj::<Descriptor>(a).ok()) else {
            break;
        };
        if desc.refers_to_indirect_table() {
            return Err(Refusal::Indirect);
        }
        let Some(total) = bytes.checked_add(desc.len()) else {
            break;
        };
        bytes = total;
        descs.push(desc);
        if !desc.has_next() {
            break;
        }
        next = desc.next();
    }
    Ok(descs)
}

/// Serves one chain: validates its shape, translates all its buffers, then moves data.
fn serve<D: DiskBackend, S: Stage2 + Send + 'static>(
    mem: &DmaMemory<S>,
    disk: &mut D,
    id: &[u8],
    stats: &mut BlkStats,
    chain: DescriptorChain<&DmaMemory<S>>,
    desc_table: GuestAddress,
    queue_size: u16,
) -> (Outcome, u32) {
    let head = chain.head_index();
    // Walked here, not by `DescriptorChain` (which follows indirect tables unasked).
    let descs = match walk(mem, desc_table, queue_size, head) {
        Ok(d) => d,
        Err(r) => return refused(r),
    };
    let Some(last) = descs.last() else {
        return refused(Refusal::BadHead(head));
    };
    if head >= queue_size {
        return refused(Refusal::BadHead(head));
    }
    if last.has_next() {
        return refused(Refusal::BrokenChain);
    }
    if !last.is_write_only() || last.len() == 0 {
        return refused(Refusal::NoStatus);
    }
    // Every buffer is translated here, before any byte moves.
    let mut reader: Reader<'_, ()> = match Reader::new(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => return refused(Refusal::Dma(format!("device-readable buffer: {e}"))),
    };
    let mut writer: Writer<'_, ()> = match Writer::new(mem, chain) {
        Ok(w) => w,
        Err(e) => return refused(Refusal::Dma(format!("device-writable buffer: {e}"))),
    };
    let data_len = writer.available_bytes() - 1;
    let mut status_w = match writer.split_at(data_len) {
        Ok(s) => s,
        Err(e) => return refused(Refusal::Dma(format!("status byte: {e}"))),
    };
    let (status, written) = match reader.read_obj::<BlkReqHeader>() {
        Ok(hdr) => request(disk, id, stats, hdr, &mut reader, &mut writer),
        Err(_) => (VIRTIO_BLK_S_IOERR, 0),
    };
    if status_w.write_all(&[status as u8]).is_err() {
        // Translated above, so this cannot be refused; report it as a DMA failure anyway.
        return refused(Refusal::Dma("status byte write failed".into()));
    }
    (Outcome::Status(status as u8), written + 1)
}

/// Executes one well-formed request; returns (VIRTIO_BLK_S_*, data bytes written).
fn request<D: DiskBackend>(
    disk: &mut D,
    id: &[u8],
    stats: &mut BlkStats,
    hdr: BlkReqHeader,
    reader: &mut Reader<'_, ()>,
    writer: &mut Writer<'_, ()>,
) -> (u32, u32) {
    let hdr = BlkReqHeader {
        req_type: u32::from_le(hdr.req_type),
        reserved: u32::from_le(hdr.reserved),
        sector: u64::from_le(hdr.sector),
    };
    let capacity = disk.capacity();
    let in_range = |len: usize| -> Option<u64> {
        let off = hdr.sector.checked_mul(SECTOR_SIZE)?;
        let end = off.checked_add(len as u64)?;
        ((len as u64).is_multiple_of(SECTOR_SIZE) && end <= capacity).then_some(off)
    };
    match hdr.req_type {
        VIRTIO_BLK_T_IN => {
            let len = writer.available_bytes();
            let Some(off) = in_range(len) else {
                return (VIRTIO_BLK_S_IOERR, 0);
            };
            let mut buf = vec![0u8; len];
            if disk.read_at(off, &mut buf).is_err() || writer.write_all(&buf).is_err() {
                return (VIRTIO_BLK_S_IOERR, writer.bytes_written() as u32);
            }
            stats.bytes_read += len as u64;
            (VIRTIO_BLK_S_OK, len as u32)
        }
        VIRTIO_BLK_T_OUT => {
            let len = reader.available_bytes();
            let Some(off) = in_range(len) else {
                return (VIRTIO_BLK_S_IOERR, 0);
            };
            let mut buf = vec![0u8; len];
            if reader.read_exact(&mut buf).is_err() || disk.write_at(off, &buf).is_err() {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            stats.bytes_written += len as u64;
            (VIRTIO_BLK_S_OK, 0)
        }
        VIRTIO_BLK_T_FLUSH => match disk.flush() {
            Ok(()) => (VIRTIO_BLK_S_OK, 0),
            Err(_) => (VIRTIO_BLK_S_IOERR, 0),
        },
        VIRTIO_BLK_T_GET_ID => {
            let n = writer.available_bytes().min(id.len());
            if writer.write_all(&id[..n]).is_err() {
                return (VIRTIO_BLK_S_IOERR, writer.bytes_written() as u32);
            }
            (VIRTIO_BLK_S_OK, n as u32)
        }
        _ => (VIRTIO_BLK_S_UNSUPP, 0),
    }
}

/// Names of VIRTIO_BLK_S_* values, for reports.
pub fn status_name(s: u8) -> &'static str {
    match u32::from(s) {
        VIRTIO_BLK_S_OK => "OK",
        VIRTIO_BLK_S_IOERR => "IOERR",
        VIRTIO_BLK_S_UNSUPP => "UNSUPP",
        _ => "?",
    }
}
