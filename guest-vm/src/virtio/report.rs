//! `demo_report`: what the CLI's demo shows about secure DMA — a virtio-blk device attached to a
//! guest's memory serves valid requests and refuses every malicious one, with the figures
//! (regions assigned, requests served / refused, domain translations / refusals, bytes written
//! outside the regions).
//!
//! Invariants: the demo tears its device down (every region unassigned and unpinned) before
//! returning; `demo_report` builds and drops its own guest address space, so it leaves no
//! frame of the caller's pool live.

use std::fmt;

use ept::{HeapPhysMem, Stage2};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use vmo::{ChildKind, DevicePerms, MapOptions, VmPerms, Vmar, Vmo, VmoFlags};

use super::attacks::{self, Attack, AttackResult};
use super::disk::MemDisk;
use super::rig::{BlkRig, DomainTable};
use crate::error::{Error, Result};
use crate::memory::frames::HostFrames;

/// Guest RAM of the standalone demo.
const DEMO_GUEST: u64 = 4 << 20;
/// Where the standalone demo puts the device's regions.
const DEMO_BASE: u64 = 1 << 20;
const DISK_BYTES: u64 = 1 << 20;
const DEVICE_ID: &str = "guest-vm-blk0";

/// The figures of one demo run.
#[derive(Clone, Debug)]
pub struct DmaDemoReport {
    /// (name, IOVA = GPA, length, device perms, contiguous) of the regions that were assigned.
    pub regions: Vec<(String, u64, u64, DevicePerms, bool)>,
    /// Requests completed with OK.
    pub served: u64,
    /// Requests completed with an error status (IOERR / UNSUPP), as a driver asked for.
    pub failed: u64,
    /// Chains refused by the device (malformed, or a buffer the domain refused).
    pub refused: u64,
    /// Queue-level refusals (corrupt avail index).
    pub queue_errors: u64,
    /// Device accesses the DMA domain translated / refused.
    pub dma_translated: u64,
    pub dma_refused: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Everything written through the queue read back identical.
    pub data_verified: bool,
    /// While assigned, decommitting the data region was refused with BadState.
    pub pinned_while_assigned: bool,
    /// While assigned, decommit / shrink / snapshot of the scatter-gather (bulk) region were
    /// refused with BadState.
    pub pinned_while_assigned_bulk: bool,
    /// After teardown, decommit / shrink / snapshot of the bulk region worked (unpinned).
    pub unpinned_after_teardown: bool,
    pub attacks: Vec<AttackResult>,
}

impl DmaDemoReport {
    /// Bytes any malicious request changed outside what the device may write (must be 0).
    pub fn bytes_written_outside(&self) -> u64 {
        self.attacks
            .iter()
            .map(|a| a.canary_damage + a.region_damage + a.disk_damage)
            .sum()
    }

    /// Attacks refused with nothing written.
    pub fn contained(&self) -> usize {
        self.attacks.iter().filter(|a| a.contained()).count()
    }
}

fn perms(p: DevicePerms) -> &'static str {
    match (
        p.contains(DevicePerms::READ),
        p.contains(DevicePerms::WRITE),
    ) {
        (true, true) => "RW",
        (true, false) => "R",
        (false, true) => "W",
        _ => "-",
    }
}

impl fmt::Display for DmaDemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "virtio-blk over a DMA domain (vm-memory IommuMemory + DmaDomain, IOVA = GPA): {} regions assigned",
            self.regions.len()
        )?;
        for (name, gpa, len, p, contiguous) in &self.regions {
            writeln!(
                f,
                "  region {name:<5} iova {gpa:#010x} len {len:#07x} device {:<2} {} Vmo, pinned while assigned",
                perms(*p),
                if *contiguous { "CONTIGUOUS|DMA" } else { "DMA|RESIZABLE (scatter-gather)" }
            )?;
        }
        writeln!(
            f,
            "  requests: {} served OK, {} completed with an error status, {} refused, {} queue-level refusals",
            self.served, self.failed, self.refused, self.queue_errors
        )?;
        writeln!(
            f,
            "  data: {} bytes read, {} bytes written, read-back {}",
            self.bytes_read,
            self.bytes_written,
            if self.data_verified {
                "identical"
            } else {
                "DIFFERENT"
            }
        )?;
        writeln!(
            f,
            "  DMA domain: {} accesses translated, {} refused",
            self.dma_translated, self.dma_refused
        )?;
        writeln!(
            f,
            "  malicious descriptors: {}/{} refused with nothing written; {} bytes written outside the assigned regions",
            self.contained(),
            self.attacks.len(),
            self.bytes_written_outside()
        )?;
        for a in &self.attacks {
            writeln!(f, "    {a}")?;
        }
        write!(
            f,
            "  pinning: decommit/shrink/snapshot while assigned {}; of the unassigned bulk region after teardown {}",
            if self.pinned_while_assigned && self.pinned_while_assigned_bulk {
                "refused (BadState)"
            } else {
                "ALLOWED"
            },
            if self.unpinned_after_teardown {
                "work"
            } else {
                "FAILED"
            }
        )
    }
}

/// Runs the demo on its own host-side guest address space (4 MiB of RAM over `frames`, no KVM
/// needed): attach a virtio-blk device over a 1 MiB in-memory disk, serve valid requests, run
/// every `Attack`, tear down.
pub fn demo_report(frames: &HostFrames) -> Result<DmaDemoReport> {
    let table = DomainTable::new(HeapPhysMem::new())
        .map_err(|e| Error::InvalidArgs(format!("guest table: {e:?}")))?;
    let guest = Vmar::new_root(DEMO_GUEST, table)?;
    let ram = Vmo::new(&frames.pool, DEMO_GUEST, VmoFlags::empty())?;
    guest.map(&ram, 0, DEMO_GUEST, MapOptions::specific(0, VmPerms::RW))?;
    demo_report_on(frames, &guest, DEMO_BASE)
}

/// Runs the demo against a guest's address space `guest` (e.g. `Guest::vmar()`), whose RAM
/// (from `frames`) must cover `[base, base + 60 KiB)`: the device's regions replace that RAM
/// and stay mapped in the guest (unassigned) afterwards.
pub fn demo_report_on<G: Stage2 + Send + 'static>(
    frames: &HostFrames,
    guest: &Vmar<G>,
    base: u64,
) -> Result<DmaDemoReport> {
    let disk = MemDisk::new(DISK_BYTES).map_err(|e| Error::InvalidArgs(e.to_string()))?;
    let mut rig = BlkRig::attach(frames, guest, base, disk, DEVICE_ID)?;
    let regions = rig
        .dev
        .dma()
        .regions()
        .iter()
        .map(|r| {
            let contiguous = r.vmo.flags().contains(VmoFlags::CONTIGUOUS);
            (r.name.clone(), r.gpa, r.len, r.perms, contiguous)
        })
        .collect();
    let mut verified = true;

    // Valid I/O: write, read back, flush, get-id; an error status past the capacity and for an
    // unknown type.
    let pattern: Vec<u8> = (0..8 * 512u32).map(|i| (i * 7 + 3) as u8).collect();
    let w = rig.drv.write_sectors(&mut rig.dev, 3, &pattern)?;
    let r = rig.drv.read_sectors(&mut rig.dev, 3, 8)?;
    verified &= w.status == VIRTIO_BLK_S_OK as u8 && r.status == VIRTIO_BLK_S_OK as u8;
    verified &= r.data == pattern;
    verified &= rig.drv.flush(&mut rig.dev)?.status == VIRTIO_BLK_S_OK as u8;
    let id = rig.drv.get_id(&mut rig.dev)?;
    verified &= id.data.starts_with(DEVICE_ID.as_bytes());
    let past = rig.drv.read_sectors(&mut rig.dev, DISK_BYTES / 512, 1)?;
    verified &= past.status == VIRTIO_BLK_S_IOERR as u8;
    rig.drv.submit(0xff, 0, &[], 0)?;
    verified &= rig.drv.complete(&mut rig.dev, 0)?.status == VIRTIO_BLK_S_UNSUPP as u8;

    // Every attack, each followed by a valid request.
    let mut results = Vec::new();
    for (i, attack) in Attack::ALL.into_iter().enumerate() {
        results.push(attacks::run(&mut rig, attack, |d: &MemDisk| {
            d.bytes().to_vec()
        })?);
        let sector = 100 + i as u64;
        let data = vec![i as u8 ^ 0xa5; 512];
        verified &=
            rig.drv.write_sectors(&mut rig.dev, sector, &data)?.status == VIRTIO_BLK_S_OK as u8;
        verified &= rig.drv.read_sectors(&mut rig.dev, sector, 1)?.data == data;
    }

    // Pinning through the device lifecycle.
    let data_vmo = rig
        .dev
        .dma()
        .region("data")
        .map(|r| r.vmo.clone())
        .ok_or_else(|| Error::BadState("no data region".into()))?;
    let bulk = rig
        .dev
        .dma()
        .region("bulk")
        .map(|r| r.vmo.clone())
        .ok_or_else(|| Error::BadState("no bulk region".into()))?;
    let bad = Err(vmo::Error::BadState);
    let pinned_while_assigned = data_vmo.decommit(0, 4096) == bad
        && data_vmo.create_child(ChildKind::Snapshot, 0, 4096).err() == Some(vmo::Error::BadState);
    let pinned_while_assigned_bulk = bulk.decommit(0, 4096) == bad
        && bulk.resize(4096) == bad
        && bulk.create_child(ChildKind::Snapshot, 0, 4096).err() == Some(vmo::Error::BadState);
    let stats = rig.dev.stats();
    let dma = rig.dev.dma().domain().stats();
    rig.dev.teardown()?;
    let unpinned_after_teardown = bulk.decommit(0, 4096).is_ok()
        && bulk.create_child(ChildKind::Snapshot, 0, 4096).is_ok()
        && bulk.resize(4096).is_ok();
    Ok(DmaDemoReport {
        regions,
        served: stats.served,
        failed: stats.failed,
        refused: stats.refused,
        queue_errors: stats.queue_errors,
        dma_translated: dma.translated,
        dma_refused: dma.refused,
        bytes_read: stats.bytes_read,
        bytes_written: stats.bytes_written,
        data_verified: verified,
        pinned_while_assigned,
        pinned_while_assigned_bulk,
        unpinned_after_teardown,
        attacks: results,
    })
}
