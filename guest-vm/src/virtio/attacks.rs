//! Malicious-driver scenarios against a `BlkRig`: each writes hostile descriptors or ring
//! values into guest memory, lets the device serve the queue, and measures what happened
//! (outcome, domain and device refusal counts, canary damage, bytes changed in the regions the
//! device must not have written).
//!
//! Invariants: every scenario leaves the driver and the queue in step (its used entries are
//! consumed, a corrupted avail index is restored), so a valid request can follow.

use std::fmt;

use ept::Stage2;
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

use super::blk::Outcome;
use super::disk::DiskBackend;
use super::driver::{RawDesc, DATA_OFF, STATUS_OFF, STATUS_UNSET};
use super::rig::BlkRig;
use crate::error::Result;

/// One hostile driver behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attack {
    /// A read whose data buffer is guest RAM outside every region (a canary page).
    OutsideDomain,
    /// A data buffer beyond the IOVA space altogether (1 TiB).
    BeyondIovaSpace,
    /// A write whose device-readable data lies outside the regions (a read leak attempt).
    ReadOutsideDomain,
    /// A buffer that starts inside the data region and crosses its end.
    CrossesRegionEnd,
    /// A buffer at `u64::MAX - 255` of 512 bytes (64-bit wrap-around).
    WrapAround,
    /// A chain whose first buffers are valid and whose third walks out of the regions.
    ChainWalksOut,
    /// An indirect descriptor table placed outside the regions (indirect descriptors are not
    /// negotiated: refused before the table is read).
    IndirectTableOutside,
    /// A read whose data buffer is the device-read-only region.
    WriteIntoReadOnly,
    /// Descriptor 1's next points back to descriptor 0.
    DescriptorLoop,
    /// A next index ≥ the queue size.
    NextOutOfRange,
    /// An avail-ring head index ≥ the queue size.
    HeadOutOfRange,
    /// The avail index moved by more than the queue size.
    AvailIndexJump,
}

impl Attack {
    pub const ALL: [Attack; 12] = [
        Attack::OutsideDomain,
        Attack::BeyondIovaSpace,
        Attack::ReadOutsideDomain,
        Attack::CrossesRegionEnd,
        Attack::WrapAround,
        Attack::ChainWalksOut,
        Attack::IndirectTableOutside,
        Attack::WriteIntoReadOnly,
        Attack::DescriptorLoop,
        Attack::NextOutOfRange,
        Attack::HeadOutOfRange,
        Attack::AvailIndexJump,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Attack::OutsideDomain => "buffer outside the domain",
            Attack::BeyondIovaSpace => "buffer beyond the IOVA space",
            Attack::ReadOutsideDomain => "device read outside the domain",
            Attack::CrossesRegionEnd => "length crossing a region's end",
            Attack::WrapAround => "64-bit wrap-around",
            Attack::ChainWalksOut => "chain walking out of the regions",
            Attack::IndirectTableOutside => "indirect table outside the domain",
            Attack::WriteIntoReadOnly => "device write into a read-only region",
            Attack::DescriptorLoop => "descriptor loop",
            Attack::NextOutOfRange => "next index >= queue size",
            Attack::HeadOutOfRange => "head index >= queue size",
            Attack::AvailIndexJump => "avail index jump > queue size",
        }
    }
}

/// What one attack did.
#[derive(Clone, Debug)]
pub struct AttackResult {
    pub attack: Attack,
    /// The device's verdict: a completion outcome, or the queue-level error text.
    pub outcome: std::result::Result<Outcome, String>,
    /// The status byte (`STATUS_UNSET` = not written).
    pub status: u8,
    /// Refusals the DMA domain counted during the attack.
    pub domain_refused: u64,
    /// Chains the device refused during the attack.
    pub device_refused: u64,
    /// Canary bytes changed (must be 0).
    pub canary_damage: u64,
    /// Bytes changed in in-region buffers the refused request named (must be 0), and in the
    /// read-only region.
    pub region_damage: u64,
    /// Disk bytes changed (must be 0).
    pub disk_damage: u64,
}

impl AttackResult {
    /// Refused with nothing written anywhere.
    pub fn contained(&self) -> bool {
        let refused = match &self.outcome {
            Ok(Outcome::Refused(_)) | Err(_) => true,
            Ok(Outcome::Status(_)) => false,
        };
        refused
            && self.status == STATUS_UNSET
            && self.canary_damage == 0
            && self.region_damage == 0
            && self.disk_damage == 0
    }
}

impl fmt::Display for AttackResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match &self.outcome {
            Ok(Outcome::Refused(r)) => format!("refused ({})", short(r)),
            Ok(Outcome::Status(s)) => format!("COMPLETED status {s}"),
            Err(_) => "queue refused (whole batch)".to_string(),
        };
        write!(
            f,
            "{:<38} {:<34} domain refusals {} device refusals {} bytes written outside {}",
            self.attack.name(),
            verdict,
            self.domain_refused,
            self.device_refused,
            self.canary_damage + self.region_damage + self.disk_damage
        )
    }
}

fn short(r: &super::blk::Refusal) -> String {
    use super::blk::Refusal::*;
    match r {
        BadHead(h) => format!("bad head {h}"),
        BrokenChain => "broken chain".into(),
        NoStatus => "no status byte".into(),
        Dma(_) => "DMA domain".into(),
        Indirect => "indirect, not negotiated".into(),
    }
}

const MARK: u8 = 0x5a;

fn diff(a: &[u8], b: &[u8]) -> u64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as u64
}

/// Runs `attack` against `rig` and measures it.
pub fn run<D: DiskBackend, G: Stage2 + Send + 'static>(
    rig: &mut BlkRig<D, G>,
    attack: Attack,
    disk_snapshot: impl Fn(&D) -> Vec<u8>,
) -> Result<AttackResult> {
    let l = rig.layout;
    let (data, data_len) = l.data();
    let (ro, ro_len) = l.ro();
    let hdr = data;
    let status = data + STATUS_OFF;
    let buf = data + DATA_OFF;
    let canary = l.canaries()[1];
    let ram = rig.drv.ram();
    // Request header (IN or OUT at sector 0), unset status, marked in-region buffers.
    let write_hdr = |t: u32| -> Result<()> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        ram.write(hdr, &h)?;
        ram.write(status, &[STATUS_UNSET])
    };
    ram.fill(buf, (data_len - DATA_OFF) as usize, MARK)?;
    ram.fill(ro, ro_len as usize, MARK)?;
    let before_data = read_vec(rig, buf, (data_len - DATA_OFF) as usize)?;
    let before_ro = read_vec(rig, ro, ro_len as usize)?;
    let before_disk = disk_snapshot(rig.dev.disk());
    let dom0 = rig.dev.dma().domain().stats().refused;
    let dev0 = rig.dev.stats().refused;

    let st = RawDesc::writable(status, 1, None);
    let h = RawDesc::readable(hdr, 16, None);
    let mut restore_avail = false;
    match attack {
        Attack::OutsideDomain => {
            write_hdr(VIRTIO_BLK_T_IN)?;
            rig.drv
                .submit_chain(&[h, RawDesc::writable(canary, 512, None), st])?;
        }
        Attack::BeyondIovaSpace => {
            write_hdr(VIRTIO_BLK_T_IN)?;
            rig.drv
                .submit_chain(&[h, RawDesc::writable(1 << 40, 512, None), st])?;
        }
        Attack::ReadOutsideDomain => {
            write_hdr(VIRTIO_BLK_T_OUT)?;
            rig.drv
                .submit_chain(&[h, RawDesc::readable(canary, 512, None), st])?;
        }
        Attack::CrossesRegionEnd => {
            write_hdr(VIRTIO_BLK_T_IN)?;
            rig.drv
                .submit_chain(&[h, RawDesc::writable(data + data_len - 512, 1024, None), st])?;
        }
        Attack::WrapAround => {
            write_hdr(VIRTIO_BLK_T_IN)?;
            rig.drv
                .submit_chain(&[h, RawDesc::writable(u64::MAX - 255, 512, None), st])?;
        }
        Attack::ChainWalksOut => {
            write_hdr(VIRTIO_BLK_T_IN)?;
            rig.drv.submit_chain(&[
                h,
                RawDesc::writable(buf, 512, None),
                RawDesc::writable(buf + 512, 512, None),
                RawDesc::writable(canary + 512, 512, None),
                st,
            ])?;
        }
        Attack::IndirectTableOutside => {
            write_hdr(VIRTIO_BLK_T_IN)?;
            // The "table" in the canary page: its bytes would read as descriptors if reached.
            rig.drv.set_desc(
                0,
                RawDesc {
                    addr: hdr,
                    len: 16,
                    flags: VRING_DESC_F_NEXT as u16,
                    next: 1,
                },
            )?;
            rig.drv.set_desc(
                1,
                RawDesc {
                    addr: canary,
                    len: 3 * 16,
                    flags: VRING_DESC_F_INDIRECT as u16,
                    next: 0,
                },
            )?;
            rig.drv.publish(0)?;
        }
        Attack::WriteIntoReadOnly => {
            write_hdr(VIRTIO_BLK_T_IN)?;
            rig.drv
                .submit_chain(&[h, RawDesc::writable(ro, 512, None), st])?;
        }
        Attack::DescriptorLoop => {
            write_hdr(VIRTIO_BLK_T_IN)?;
            rig.drv.set_desc(0, RawDesc::readable(hdr, 16, Some(1)))?;
            rig.drv.set_desc(
                1,
                RawDesc {
                    addr: buf,
                    len: 512,
                    flags: (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
                    next: 0,
                },
            )?;
            rig.drv.publish(0)?;
        }
        Attack::NextOutOfRange => {
            write_hdr(VIRTIO_BLK_T_IN)?;
            rig.drv.set_desc(0, RawDesc::readable(hdr, 16, Some(1)))?;
            rig.drv.set_desc(
                1,
                RawDesc {
                    addr: buf,
                    len: 512,
                    flags: (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
                    next: rig.drv.queue().size + 7,
                },
            )?;
            rig.drv.publish(0)?;
        }
        Attack::HeadOutOfRange => {
            write_hdr(VIRTIO_BLK_T_IN)?;
            rig.drv
                .submit_chain(&[h, RawDesc::writable(buf, 512, None), st])?;
            // Overwrite the published head with an index past the queue.
            let slot = u64::from(rig.drv.avail_idx().wrapping_sub(1) % rig.drv.queue().size);
            let bad = rig.drv.queue().size.wrapping_mul(40);
            rig.drv.ram().write(
                rig.drv.queue().avail_ring + 4 + 2 * slot,
                &bad.to_le_bytes(),
            )?;
        }
        Attack::AvailIndexJump => {
            write_hdr(VIRTIO_BLK_T_IN)?;
            rig.drv
                .submit_chain(&[h, RawDesc::writable(buf, 512, None), st])?;
            let idx = rig.drv.avail_idx();
            rig.drv
                .set_avail_idx(idx.wrapping_add(rig.drv.queue().size * 4))?;
            restore_avail = true;
        }
    }
    let outcome = match rig.dev.process_queue() {
        Ok((mut done, _)) if done.len() == 1 => Ok(done.remove(0).outcome),
        Ok((done, _)) => Err(format!("{} completions", done.len())),
        Err(e) => Err(e.to_string()),
    };
    if restore_avail {
        // The driver takes its request back: the avail index stops before it.
        let idx = rig.drv.avail_idx().wrapping_sub(1);
        rig.drv.set_avail_idx(idx)?;
        rig.drv.rewind_avail(1);
    }
    rig.drv.take_used()?;
    let mut s = [0u8];
    rig.drv.ram().read(status, &mut s)?;
    let after_data = read_vec(rig, buf, (data_len - DATA_OFF) as usize)?;
    let after_ro = read_vec(rig, ro, ro_len as usize)?;
    Ok(AttackResult {
        attack,
        outcome,
        status: s[0],
        domain_refused: rig.dev.dma().domain().stats().refused - dom0,
        device_refused: rig.dev.stats().refused - dev0,
        canary_damage: rig.canary_damage()?,
        region_damage: diff(&before_data, &after_data) + diff(&before_ro, &after_ro),
        disk_damage: diff(&before_disk, &disk_snapshot(rig.dev.disk())),
    })
}

fn read_vec<D: DiskBackend, G: Stage2 + Send + 'static>(
    rig: &BlkRig<D, G>,
    gpa: u64,
    len: usize,
) -> Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    rig.drv.ram().read(gpa, &mut v)?;
    Ok(v)
}
