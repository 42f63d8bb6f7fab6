//! virtio-blk refuses indirect descriptors unread: `VIRTIO_RING_F_INDIRECT_DESC` is not
//! offered, so a chain that uses one is malformed (virtio 1.2 §2.7.5.3.1) and is returned with
//! length 0 before any table is read through the DMA domain. Host-side driver, no /dev/kvm.

use guest_vm::virtio::driver::{RawDesc, DATA_OFF, STATUS_OFF, STATUS_UNSET};
use guest_vm::virtio::{Outcome, Refusal};
use guest_vm::HostFrames;
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::bindings::virtio_ring::{VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT};

mod virtio_common;
use virtio_common::{guest, mem_rig, pattern, OK};

/// The 16 bytes of a split-ring descriptor, as a driver writes them into an indirect table.
fn desc_bytes(d: RawDesc) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&d.addr.to_le_bytes());
    b[8..12].copy_from_slice(&d.len.to_le_bytes());
    b[12..14].copy_from_slice(&d.flags.to_le_bytes());
    b[14..16].copy_from_slice(&d.next.to_le_bytes());
    b
}

/// VIRTIO_RING_F_INDIRECT_DESC is not offered, so a driver must not set VIRTQ_DESC_F_INDIRECT
/// (virtio 1.2 §2.7.5.3.1). A chain that does — the indirect descriptor as its head, or after a
/// direct one; its table inside a region (otherwise a well-formed IN or OUT request), outside
/// the regions, or beyond the IOVA space — is refused whole: returned with length 0, the
/// table never read (no domain refusal even for the out-of-domain tables), no header, data,
/// status or disk byte moved; the device keeps serving.
#[test]
fn indirect_descriptors_are_refused_without_the_feature() {
    const MARK: u8 = 0x3c;
    let frames = HostFrames::new(64 << 20).unwrap();
    {
        let g = guest(&frames);
        let mut rig = mem_rig(&frames, &g);
        assert_eq!(
            rig.dev.features() & (1 << VIRTIO_RING_F_INDIRECT_DESC),
            0,
            "not offered"
        );
        let l = rig.layout;
        let (hdr, st, buf) = (l.data().0, l.data().0 + STATUS_OFF, l.data().0 + DATA_OFF);
        // Indirect tables: in the data region (device-readable), a canary page, past the IOVAs.
        let in_region = l.data().0 + 2048;
        let canary = l.canaries()[3];
        let (ro, _) = l.ro();
        let on_disk = pattern(21, 512);
        let w = rig.drv.write_sectors(&mut rig.dev, 5, &on_disk).unwrap();
        assert_eq!(w.status, OK);
        rig.drv.ram().write(ro, &pattern(22, 512)).unwrap();
        let indirect = |table: u64, entries: u32| RawDesc {
            addr: table,
            len: 16 * entries,
            flags: VRING_DESC_F_INDIRECT as u16,
            next: 0,
        };
        let in_table = [
            RawDesc::readable(hdr, 16, Some(1)),
            RawDesc::writable(buf, 512, Some(2)),
            RawDesc::writable(st, 1, None),
        ];
        let out_table = [
            RawDesc::readable(hdr, 16, Some(1)),
            RawDesc::readable(ro, 512, Some(2)),
            RawDesc::writable(st, 1, None),
        ];
        // (what, request type, table contents written at `in_region`, main-table chain)
        let cases: [(&str, u32, &[RawDesc], Vec<RawDesc>); 5] = [
            (
                "IN, indirect head, table in a region",
                VIRTIO_BLK_T_IN,
                &in_table,
                vec![indirect(in_region, 3)],
            ),
            (
                "OUT, indirect head, table in a region",
                VIRTIO_BLK_T_OUT,
                &out_table,
                vec![indirect(in_region, 3)],
            ),
            (
                "IN, direct header then indirect, table in a region",
                VIRTIO_BLK_T_IN,
                &in_table[1..],
                vec![RawDesc::readable(hdr, 16, None), indirect(in_region, 2)],
            ),
            (
                "IN, table outside the regions",
                VIRTIO_BLK_T_IN,
                &in_table,
                vec![indirect(canary, 3)],
            ),
            (
                "IN, table beyond the IOVA space",
                VIRTIO_BLK_T_IN,
                &in_table,
                vec![RawDesc::readable(hdr, 16, None), indirect(1 << 40, 2)],
            ),
        ];
        for (i, (what, req_type, table, chain)) in cases.into_iter().enumerate() {
            let ram = rig.drv.ram();
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&req_type.to_le_bytes());
            h[8..16].copy_from_slice(&5u64.to_le_bytes());
            ram.write(hdr, &h).unwrap();
            ram.write(st, &[STATUS_UNSET]).unwrap();
            ram.fill(buf, 512, MARK).unwrap();
            for (j, d) in table.iter().enumerate() {
                ram.write(in_region + 16 * j as u64, &desc_bytes(*d))
                    .unwrap();
            }
            let dom0 = rig.dev.dma().domain().stats().refused;
            let dev0 = rig.dev.stats();
            rig.drv.submit_chain(&chain).unwrap();
            let r = rig.drv.complete(&mut rig.dev, 512).unwrap();
            assert_eq!(
                r.completion.outcome,
                Outcome::Refused(Refusal::Indirect),
                "{what}"
            );
            assert_eq!(
                r.used,
                vec![(0, 0)],
                "{what}: head returned, nothing written"
            );
            assert_eq!(r.status, STATUS_UNSET, "{what}: no status byte");
            assert!(r.data.iter().all(|&b| b == MARK), "{what}: data untouched");
            assert_eq!(
                &rig.dev.disk().bytes()[5 * 512..6 * 512],
                &on_disk[..],
                "{what}"
            );
            assert_eq!(
                rig.dev.dma().domain().stats().refused,
                dom0,
                "{what}: the table was never read"
            );
            let dev = rig.dev.stats();
            assert_eq!(dev.refused, dev0.refused + 1, "{what}");
            assert_eq!(
                (dev.served, dev.bytes_read, dev.bytes_written),
                (dev0.served, dev0.bytes_read, dev0.bytes_written),
                "{what}: no request executed"
            );
            assert_eq!(rig.canary_damage().unwrap(), 0, "{what}");
            // The same request with direct descriptors is served.
            let data = pattern(30 + i as u8, 512);
            assert_eq!(
                rig.drv
                    .write_sectors(&mut rig.dev, 40 + i as u64, &data)
                    .unwrap()
                    .status,
                OK
            );
            let back = rig
                .drv
                .read_sectors(&mut rig.dev, 40 + i as u64, 1)
                .unwrap();
            assert_eq!((back.status, back.data), (OK, data), "{what}");
        }
        assert_eq!(rig.dev.dma().domain().stats().refused, 0);
        assert_eq!(rig.dev.stats().refused, 5);
    }
    assert_eq!(frames.pool.stats().live, 0);
}
