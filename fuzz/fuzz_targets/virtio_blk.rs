//! Fuzz target `virtio_blk`: arbitrary descriptor tables, avail-ring entries and request
//! headers written into guest memory of the standard rig (`guest_vm::virtio::rig::BlkRig`:
//! device behind a `DmaDomain` over `EptTable`, no /dev/kvm), one request served per input.
//!
//! The rig (guest, device, domain, disk) is built once and reused by every input — only the
//! queue is reset and the driver's rings re-initialised — so inputs run at thousands per
//! second. Per input it checks that the device never panics and that nothing outside what it
//! may write changed: the canary pages around the regions, the device-read-only regions (the
//! ring with the descriptor table, and `ro`), guest RAM just past the rig; and that a refused
//! request (or a queue error) wrote nothing at all — the disk, the data and bulk regions and
//! the status byte unchanged.
#![no_main]

use std::cell::RefCell;

use ept::HeapPhysMem;
use guest_vm::virtio::driver::{BlkDriver, GuestRam, RawDesc};
use guest_vm::virtio::rig::{BlkRig, DomainTable, CANARY, QUEUE_SIZE, RIG_PAGES};
use guest_vm::virtio::{MemDisk, Outcome};
use guest_vm::HostFrames;
use libfuzzer_sys::fuzz_target;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vmo::{MapOptions, VmPerms, Vmar, Vmo, VmoFlags};

const P: u64 = 4096;
const GUEST: u64 = 2 << 20;
const BASE: u64 = 1 << 20;
const DISK: u64 = 64 << 10;
/// A guest page past the rig that nothing may write.
const AFTER: u64 = BASE + RIG_PAGES * P;
const MARK: u8 = 0x5a;

struct World {
    // Field order is drop order: the rig before the guest, the guest before the frames.
    rig: BlkRig<MemDisk, DomainTable>,
    guest: Vmar<DomainTable>,
    frames: HostFrames,
}

fn world() -> World {
    let frames = HostFrames::new(32 << 20).expect("memfd frames");
    let guest = Vmar::new_root(GUEST, DomainTable::new(HeapPhysMem::new()).unwrap()).unwrap();
    let ram = Vmo::new(&frames.pool, GUEST, VmoFlags::empty()).unwrap();
    guest
        .map(&ram, 0, GUEST, MapOptions::specific(0, VmPerms::RW))
        .unwrap();
    let rig = BlkRig::attach(&frames, &guest, BASE, MemDisk::new(DISK).unwrap(), "fuzz").unwrap();
    World { rig, guest, frames }
}

thread_local! {
    static WORLD: RefCell<Option<World>> = const { RefCell::new(None) };
}

struct In<'a>(&'a [u8], usize);

impl In<'_> {
    fn b(&mut self) -> u8 {
        let v = self.0.get(self.1).copied().unwrap_or(0);
        self.1 += 1;
        v
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.b(), self.b(), self.b(), self.b()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
}

/// A buffer address: mostly inside (or straddling) the rig's regions and canaries.
fn addr(inp: &mut In, w: &World) -> u64 {
    let l = w.rig.layout;
    let spots = [
        l.data().0,
        l.data().0 + 16,
        l.used().0,
        l.ro().0,
        l.bulk().0,
        l.ring().0,
        l.base,
        AFTER,
    ];
    match inp.b() % 8 {
        0..=4 => spots[inp.b() as usize % spots.len()] + u64::from(inp.b()) * 16,
        5 => l.data().0 + l.data().1 - u64::from(inp.b() % 32),
        6 => u64::MAX - u64::from(inp.b()),
        _ => inp.u64(),
    }
}

fn len(inp: &mut In) -> u32 {
    match inp.b() % 8 {
        0 => 0,
        1 => 1,
        2 => 16,
        3 => 512,
        4 => 4096,
        5 => 1 + u32::from(inp.b()) * 8,
        6 => u32::MAX - u32::from(inp.b()),
        _ => inp.u32() % (64 << 10),
    }
}

fn snapshot(w: &World, gpa: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    w.rig.drv.ram().read(gpa, &mut v).unwrap();
    v
}

fn one(w: &mut World, data: &[u8]) {
    let mut inp = In(data, 0);
    let l = w.rig.layout;
    // A fresh queue: the device forgets it, the driver zeroes its rings.
    w.rig.dev.reset();
    w.rig.dev.activate(l.queue()).unwrap();
    let ram = GuestRam::new(&w.guest, &w.frames);
    let (buf, buf_len) = l.data();
    w.rig.drv = BlkDriver::new(ram, l.queue(), buf, buf_len).unwrap();

    // A request header and status byte at the usual place, with fuzzed fields.
    let t = [
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        inp.u32(),
    ];
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&t[inp.b() as usize % 5].to_le_bytes());
    let sector = match inp.b() % 4 {
        0 => u64::from(inp.b()),
        1 => DISK / 512 - u64::from(inp.b() % 4),
        2 => u64::MAX - u64::from(inp.b()),
        _ => inp.u64(),
    };
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    w.rig.drv.ram().write(buf, &hdr).unwrap();
    w.rig.drv.ram().write(buf + 16, &[0xff]).unwrap();

    // Descriptors: a plausible chain, then fuzzed edits.
    let n = 1 + inp.b() as u16 % QUEUE_SIZE;
    for i in 0..n {
        let mut flags = 0u16;
        let f = inp.b();
        if i + 1 < n && f & 1 == 0 {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        if f & 2 != 0 {
            flags |= VRING_DESC_F_WRITE as u16;
        }
        if f & 0xf8 == 0x80 {
            flags |= VRING_DESC_F_INDIRECT as u16;
        }
        if f & 0xf0 == 0xf0 {
            flags = inp.b() as u16 | (inp.b() as u16) << 8;
        }
        let next = if f & 4 != 0 {
            inp.b() as u16 % (QUEUE_SIZE + 4)
        } else {
            i + 1
        };
        let d = RawDesc {
            addr: addr(&mut inp, w),
            len: len(&mut inp),
            flags,
            next,
        };
        w.rig.drv.set_desc(i, d).unwrap();
    }
    let head = if inp.b() % 8 == 0 { inp.b() as u16 } else { 0 };
    w.rig.drv.publish(head).unwrap();
    if inp.b() % 16 == 0 {
        let idx = inp.b() as u16 | (inp.b() as u16) << 8;
        w.rig.drv.set_avail_idx(idx).unwrap();
    }

    // What the device may not change.
    let ring = snapshot(w, l.ring().0, l.ring().1);
    let ro = snapshot(w, l.ro().0, l.ro().1);
    let data_before = snapshot(w, l.data().0, l.data().1);
    let bulk_before = snapshot(w, l.bulk().0, l.bulk().1);
    let disk_before = w.rig.dev.disk().bytes().to_vec();

    let result = w.rig.dev.process_queue();

    assert_eq!(w.rig.canary_damage().unwrap(), 0, "canary pages written");
    assert!(
        snapshot(w, l.ring().0, l.ring().1) == ring,
        "device wrote its read-only ring region"
    );
    assert!(
        snapshot(w, l.ro().0, l.ro().1) == ro,
        "device wrote the read-only region"
    );
    assert!(
        snapshot(w, AFTER, P).iter().all(|&b| b == MARK),
        "guest RAM past the rig written"
    );
    let wrote_nothing = match &result {
        Err(_) => true,
        Ok((done, _)) => done
            .iter()
            .all(|c| matches!(c.outcome, Outcome::Refused(_))),
    };
    if wrote_nothing {
        assert!(
            w.rig.dev.disk().bytes() == &disk_before[..],
            "a refused request changed the disk"
        );
        assert!(
            snapshot(w, l.data().0, l.data().1) == data_before,
            "a refused request wrote data"
        );
        assert!(
            snapshot(w, l.bulk().0, l.bulk().1) == bulk_before,
            "a refused request wrote bulk"
        );
    }
    if let Ok((done, _)) = &result {
        // One request published, but a fuzzed avail index may announce up to a queue's worth.
        assert!(
            done.len() <= usize::from(QUEUE_SIZE),
            "{} chains served",
            done.len()
        );
    }
    // Undo what a served request may legitimately have written, for the next input.
    w.rig
        .drv
        .ram()
        .fill(l.data().0, l.data().1 as usize, 0)
        .unwrap();
    w.rig
        .drv
        .ram()
        .fill(l.bulk().0, l.bulk().1 as usize, 0)
        .unwrap();
}

fuzz_target!(|data: &[u8]| {
    WORLD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let w = slot.get_or_insert_with(|| {
            let w = world();
            w.rig.drv.ram().fill(AFTER, P as usize, MARK).unwrap();
            assert_eq!(w.rig.canary_damage().unwrap(), 0);
            let _ = CANARY;
            w
        });
        one(w, data);
    });
});
