//! virtio-blk over a DMA domain: valid I/O, malicious descriptors (each refused with zero bytes
//! written outside the assigned regions; indirect descriptors: `virtio_indirect.rs`), pin/unpin through the device lifecycle, the fork policy, and zero live frames
//! at teardown. The driver is host-side (it writes rings and descriptors into guest memory
//! through the guest's Vmar, like a guest driver): no /dev/kvm.

use ept::{Access, FaultInfo, FaultKind, HeapPhysMem, Stage2};
use guest_vm::virtio::attacks::{self, Attack};
use guest_vm::virtio::driver::{RawDesc, DATA_OFF, STATUS_OFF, STATUS_UNSET};
use guest_vm::virtio::rig::{BlkRig, DomainTable, CANARY, RIG_PAGES};
use guest_vm::virtio::{demo_report, FileDisk, MemDisk, Outcome, QueueConfig, Refusal};
use guest_vm::HostFrames;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vmo::{ChildKind, Error as VmoError, Vmar, Vmo, VmoFlags};

mod virtio_common;
use virtio_common::{guest, mem_rig, pattern, BASE, DISK, GUEST, OK};

const P: u64 = 4096;

/// The pa behind `gpa` in `vmar` (resolving it for a read).
fn frame_of<S: Stage2 + Send + 'static>(vmar: &Vmar<S>, gpa: u64) -> u64 {
    vmar.handle_fault(FaultInfo::new(gpa, Access::READ, FaultKind::NotPresent))
        .unwrap()
        .pa
}

#[test]
fn valid_io_through_the_queue() {
    let frames = HostFrames::new(64 << 20).unwrap();
    {
        let g = guest(&frames);
        let mut rig = mem_rig(&frames, &g);
        assert_eq!(rig.dev.capacity_sectors(), DISK / 512);
        let data = pattern(1, 8 * 512);
        let w = rig.drv.write_sectors(&mut rig.dev, 10, &data).unwrap();
        assert_eq!((w.status, w.used.as_slice()), (OK, &[(0, 1)][..]));
        assert_eq!(&rig.dev.disk().bytes()[10 * 512..18 * 512], &data[..]);
        let r = rig.drv.read_sectors(&mut rig.dev, 10, 8).unwrap();
        assert_eq!(r.status, OK);
        assert_eq!(r.data, data);
        assert_eq!(r.used, vec![(0, 8 * 512 + 1)], "used len = data + status");
        let f = rig.drv.flush(&mut rig.dev).unwrap();
        assert_eq!(f.status, OK);
        assert_eq!(guest_vm::virtio::DiskBackend::flushes(rig.dev.disk()), 1);
        let id = rig.drv.get_id(&mut rig.dev).unwrap();
        assert_eq!(id.status, OK);
        assert_eq!(&id.data[..9], b"vblk-test");
        assert!(id.data[9..].iter().all(|&b| b == 0));

        // Error statuses, as a driver asked for them.
        let past = rig
            .drv
            .read_sectors(&mut rig.dev, DISK / 512 - 1, 2)
            .unwrap();
        assert_eq!(past.status, VIRTIO_BLK_S_IOERR as u8, "past the capacity");
        let huge = rig
            .drv
            .read_sectors(&mut rig.dev, u64::MAX / 256, 1)
            .unwrap();
        assert_eq!(
            huge.status, VIRTIO_BLK_S_IOERR as u8,
            "sector * 512 overflows"
        );
        rig.drv.submit(VIRTIO_BLK_T_OUT, 0, &[1; 100], 0).unwrap();
        let partial = rig.drv.complete(&mut rig.dev, 0).unwrap();
        assert_eq!(
            partial.status, VIRTIO_BLK_S_IOERR as u8,
            "not whole sectors"
        );
        rig.drv.submit(42, 0, &[], 0).unwrap();
        let unsupp = rig.drv.complete(&mut rig.dev, 0).unwrap();
        assert_eq!(unsupp.status, VIRTIO_BLK_S_UNSUPP as u8);

        // Scatter-gather: OUT data from the read-only region, IN data split over the data and
        // bulk (non-contiguous DMA) regions.
        let l = rig.layout;
        let (hdr, st) = (l.data().0, l.data().0 + STATUS_OFF);
        let out = pattern(9, 2 * 512);
        rig.drv.ram().write(l.ro().0, &out).unwrap();
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        h[8..16].copy_from_slice(&200u64.to_le_bytes());
        rig.drv.ram().write(hdr, &h).unwrap();
        rig.drv
            .submit_chain(&[
                RawDesc::readable(hdr, 16, None),
                RawDesc::readable(l.ro().0, 1024, None),
                RawDesc::writable(st, 1, None),
            ])
            .unwrap();
        assert_eq!(rig.drv.complete(&mut rig.dev, 0).unwrap().status, OK);
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        rig.drv.ram().write(hdr, &h).unwrap();
        let bulk = l.bulk().0;
        rig.drv
            .submit_chain(&[
                RawDesc::readable(hdr, 16, None),
                RawDesc::writable(l.data().0 + DATA_OFF, 512, None),
                RawDesc::writable(bulk + P - 256, 512, None), // across the bulk Vmo's pages
                RawDesc::writable(st, 1, None),
            ])
            .unwrap();
        let r = rig.drv.complete(&mut rig.dev, 512).unwrap();
        assert_eq!((r.status, r.used[0].1), (OK, 1025));
        assert_eq!(r.data, out[..512]);
        let mut second = vec![0u8; 512];
        rig.drv.ram().read(bulk + P - 256, &mut second).unwrap();
        assert_eq!(second, out[512..]);

        // Everything went through the domain, nothing was refused, canaries intact.
        let dma = rig.dev.dma().domain().stats();
        assert!(dma.translated > 20, "{dma:?}");
        assert_eq!(dma.refused, 0);
        assert_eq!(rig.dev.stats().refused, 0);
        assert_eq!(rig.canary_damage().unwrap(), 0);
        // The guest sees what the device wrote, at the same GPAs (same frames).
        let mut via_guest = vec![0u8; 512];
        rig.drv
            .ram()
            .read(l.data().0 + DATA_OFF, &mut via_guest)
            .unwrap();
        assert_eq!(via_guest, out[..512]);
    }
    assert_eq!(frames.pool.stats().live, 0);
}

#[test]
fn file_backed_disk() {
    let frames = HostFrames::new(64 << 20).unwrap();
    let path = std::env::temp_dir().join(format!("virtio-blk-test-{}.img", std::process::id()));
    {
        let g = guest(&frames);
        let disk = FileDisk::create(&path, 256 * 512).unwrap();
        let mut rig = BlkRig::attach(&frames, &g, BASE, disk, "file0").unwrap();
        let data = pattern(7, 4 * 512);
        assert_eq!(
            rig.drv
                .write_sectors(&mut rig.dev, 250, &data)
                .unwrap()
                .status,
            OK
        );
        assert_eq!(rig.drv.flush(&mut rig.dev).unwrap().status, OK);
        assert_eq!(
            rig.drv.read_sectors(&mut rig.dev, 250, 4).unwrap().data,
            data
        );
        let past = rig.drv.read_sectors(&mut rig.dev, 253, 4).unwrap();
        assert_eq!(past.status, VIRTIO_BLK_S_IOERR as u8);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[250 * 512..254 * 512], &data[..]);
        // Reopened, the image serves the same bytes.
        drop(rig);
        let disk = FileDisk::open(&path).unwrap();
        let mut rig = BlkRig::attach(&frames, &g, BASE, disk, "file0").unwrap();
        assert_eq!(
            rig.drv.read_sectors(&mut rig.dev, 250, 4).unwrap().data,
            data
        );
    }
    let _ = std::fs::remove_file(&path);
    assert_eq!(frames.pool.stats().live, 0);
}

#[test]
fn malicious_descriptors_are_refused_and_contained() {
    let frames = HostFrames::new(64 << 20).unwrap();
    {
        let g = guest(&frames);
        let mut rig = mem_rig(&frames, &g);
        let mut dma_refusals = 0;
        for (i, attack) in Attack::ALL.into_iter().enumerate() {
            let r = attacks::run(&mut rig, attack, |d: &MemDisk| d.bytes().to_vec()).unwrap();
            println!("{r}");
            assert!(r.contained(), "{r:?}");
            assert_eq!(r.status, STATUS_UNSET, "{attack:?}: no status written");
            assert_eq!(r.canary_damage, 0, "{attack:?}");
            assert_eq!(r.region_damage, 0, "{attack:?}");
            assert_eq!(r.disk_damage, 0, "{attack:?}");
            let expect_dma = !matches!(
                attack,
                Attack::DescriptorLoop
                    | Attack::NextOutOfRange
                    | Attack::HeadOutOfRange
                    | Attack::AvailIndexJump
                    | Attack::IndirectTableOutside
            );
            if expect_dma {
                assert_eq!(r.domain_refused, 1, "{attack:?}: refused by the domain");
            } else {
                assert_eq!(r.domain_refused, 0, "{attack:?}: refused before any DMA");
            }
            dma_refusals += r.domain_refused;
            match (attack, &r.outcome) {
                (Attack::DescriptorLoop | Attack::NextOutOfRange, o) => {
                    assert_eq!(o, &Ok(Outcome::Refused(Refusal::BrokenChain)))
                }
                (Attack::HeadOutOfRange, Ok(Outcome::Refused(Refusal::BadHead(h)))) => {
                    assert!(*h >= 16)
                }
                (Attack::AvailIndexJump, Err(_)) => {}
                (Attack::IndirectTableOutside, o) => {
                    assert_eq!(o, &Ok(Outcome::Refused(Refusal::Indirect)))
                }
                (_, Ok(Outcome::Refused(Refusal::Dma(_)))) => {}
                (a, o) => panic!("{a:?}: unexpected {o:?}"),
            }
            // The device still serves valid requests.
            let data = pattern(i as u8, 512);
            let sector = 30 + i as u64;
            assert_eq!(
                rig.drv
                    .write_sectors(&mut rig.dev, sector, &data)
                    .unwrap()
                    .status,
                OK
            );
            let back = rig.drv.read_sectors(&mut rig.dev, sector, 1).unwrap();
            assert_eq!((back.status, back.data), (OK, data), "{attack:?}");
        }
        let dma = rig.dev.dma().domain().stats();
        assert_eq!(
            dma.refused, dma_refusals,
            "every DMA refusal is counted in the domain"
        );
        assert_eq!(dma.refused, 7);
        assert_eq!(rig.dev.stats().refused, 11);
        assert_eq!(rig.dev.stats().queue_errors, 1);
        assert_eq!(rig.canary_damage().unwrap(), 0);
    }
    assert_eq!(frames.pool.stats().live, 0);
}

#[test]
fn rings_outside_the_domain_or_perms_are_refused_at_activation() {
    let frames = HostFrames::new(64 << 20).unwrap();
    {
        let g = guest(&frames);
        let mut rig = mem_rig(&frames, &g);
        let good = rig.layout.queue();
        let canary = rig.layout.canaries()[0];
        let bad = [
            QueueConfig {
                desc_table: canary,
                ..good
            }, // descriptor table outside the domain
            QueueConfig {
                avail_ring: 1 << 40,
                ..good
            }, // avail ring beyond the IOVA space
            QueueConfig {
                used_ring: rig.layout.ring().0 + 0xc00,
                ..good
            }, // used ring in a device-read-only region
            QueueConfig {
                desc_table: rig.layout.ring().0 + P - 16,
                ..good
            }, // descriptor table crossing the region's end
            QueueConfig {
                desc_table: u64::MAX - 15,
                ..good
            }, // wrap-around
            QueueConfig { size: 24, ..good },   // not a power of two
            QueueConfig { size: 1024, ..good }, // past the device's maximum
        ];
        for (i, cfg) in bad.iter().enumerate() {
            assert!(rig.dev.activate(*cfg).is_err(), "case {i}: {cfg:x?}");
        }
        assert_eq!(rig.dev.dma().domain().stats().refused, 5);
        assert_eq!(rig.canary_damage().unwrap(), 0);
        // A failed activation leaves the device without a queue: the driver must set it again.
        assert!(rig.dev.process_queue().is_err());
        rig.dev.activate(good).unwrap();
        let data = pattern(3, 512);
        assert_eq!(
            rig.drv
                .write_sectors(&mut rig.dev, 1, &data)
                .unwrap()
                .status,
            OK
        );
    }
    assert_eq!(frames.pool.stats().live, 0);
}

#[test]
fn pins_follow_the_device_lifecycle() {
    let frames = HostFrames::new(64 << 20).unwrap();
    {
        let g = guest(&frames);
        let mut rig = mem_rig(&frames, &g);
        let region = |n: &str| rig.dev.dma().region(n).unwrap().vmo.clone();
        let (data, bulk) = (region("data"), region("bulk"));
        assert!(data.flags().contains(VmoFlags::CONTIGUOUS | VmoFlags::DMA));
        assert!(bulk.flags().contains(VmoFlags::DMA | VmoFlags::RESIZABLE));
        assert!(data.has_pins() && bulk.has_pins());
        let bs = Err(VmoError::BadState);
        // While assigned (and serving).
        assert_eq!(data.decommit(0, P), bs);
        assert_eq!(
            data.create_child(ChildKind::Snapshot, 0, P).err(),
            Some(VmoError::BadState)
        );
        assert_eq!(bulk.decommit(0, P), bs);
        assert_eq!(bulk.resize(P), bs);
        assert_eq!(
            bulk.create_child(ChildKind::Snapshot, 0, P).err(),
            Some(VmoError::BadState)
        );
        assert_eq!(
            rig.drv
                .write_sectors(&mut rig.dev, 0, &[7; 512])
                .unwrap()
                .status,
            OK
        );
        // Teardown: every region unassigned and unpinned; the device reaches nothing.
        rig.dev.teardown().unwrap();
        assert!(rig.dev.dma().regions().is_empty());
        assert!(rig.dev.dma().domain().regions().is_empty());
        assert!(!data.has_pins() && !bulk.has_pins());
        assert!(rig.dev.process_queue().is_err(), "no queue after teardown");
        assert!(
            rig.dev.activate(rig.layout.queue()).is_err(),
            "rings unreachable"
        );
        // Now they work (a contiguous Vmo keeps its frames: decommit / snapshot of it are
        // NotSupported by construction, not by a pin).
        bulk.create_child(ChildKind::Snapshot, 0, 2 * P).unwrap();
        bulk.decommit(0, P).unwrap();
        bulk.resize(P).unwrap();
        assert_eq!(data.decommit(0, P), Err(VmoError::NotSupported));
        // The guest still maps the regions and reads them as before.
        let mut b = [0u8; 4];
        rig.drv.ram().read(rig.layout.data().0, &mut b).unwrap();
        // Teardown is idempotent.
        rig.dev.teardown().unwrap();
        drop(rig);
    }
    assert_eq!(frames.pool.stats().live, 0);
}

#[test]
fn fork_copies_dma_regions_unpinned_and_unassigned() {
    let frames = HostFrames::new(64 << 20).unwrap();
    {
        let g = guest(&frames);
        let mut parent = mem_rig(&frames, &g);
        let before = pattern(5, 4 * 512);
        // Leave recognisable bytes in the data region (a completed read).
        parent
            .drv
            .write_sectors(&mut parent.dev, 0, &before)
            .unwrap();
        parent.drv.read_sectors(&mut parent.dev, 0, 4).unwrap();
        let l = parent.layout;

        let child = g
            .fork(DomainTable::new(HeapPhysMem::new()).unwrap())
            .unwrap();
        for (name, gpa, len, _) in l.regions() {
            let pm = g.query(gpa).unwrap();
            let cm = child.query(gpa).unwrap();
            assert!(!cm.vmo.same_object(&pm.vmo), "{name}: private copy");
            assert!(pm.vmo.has_pins(), "{name}: parent still assigned");
            assert!(!cm.vmo.has_pins(), "{name}: child copy unpinned");
            assert!(cm.vmo.flags().contains(VmoFlags::DMA));
            assert_eq!(
                pm.vmo.flags().contains(VmoFlags::CONTIGUOUS),
                cm.vmo.flags().contains(VmoFlags::CONTIGUOUS)
            );
            if let (Some(a), Some(b)) = (pm.vmo.contiguous_base(), cm.vmo.contiguous_base()) {
                assert_ne!(a, b, "{name}: different frames");
            }
            // Never shared copy-on-write: every page has its own frame in the child.
            for off in (0..len).step_by(P as usize) {
                assert_ne!(
                    frame_of(&g, gpa + off),
                    frame_of(&child, gpa + off),
                    "{name}+{off:#x}"
                );
            }
        }
        // Ordinary RAM, by contrast, is shared copy-on-write after the fork.
        let canary = l.canaries()[0];
        assert_eq!(frame_of(&g, canary), frame_of(&child, canary));

        // The child's copies are unassigned: a fresh device for the child assigns them.
        let mut kid =
            BlkRig::adopt(&frames, &child, BASE, MemDisk::new(DISK).unwrap(), "kid").unwrap();
        let mut at_fork = vec![0u8; before.len()];
        kid.drv
            .ram()
            .read(l.data().0 + DATA_OFF, &mut at_fork)
            .unwrap();
        assert_eq!(
            at_fork, before,
            "the copy holds the parent's bytes at the fork"
        );
        for (name, gpa, ..) in l.regions() {
            assert!(
                child.query(gpa).unwrap().vmo.has_pins(),
                "{name}: pinned by the child"
            );
        }
        let kid_data = pattern(6, 2 * 512);
        assert_eq!(
            kid.drv
                .write_sectors(&mut kid.dev, 4, &kid_data)
                .unwrap()
                .status,
            OK
        );
        assert_eq!(
            kid.drv.read_sectors(&mut kid.dev, 4, 2).unwrap().data,
            kid_data
        );
        assert_eq!(kid.canary_damage().unwrap(), 0);
        // The parent's memory and device are untouched by the child's I/O.
        let mut parent_view = vec![0u8; before.len()];
        parent
            .drv
            .ram()
            .read(l.data().0 + DATA_OFF, &mut parent_view)
            .unwrap();
        assert_eq!(parent_view, before);
        assert_eq!(
            parent.drv.read_sectors(&mut parent.dev, 0, 4).unwrap().data,
            before
        );
        assert_eq!(parent.canary_damage().unwrap(), 0);
        // Two domains, disjoint frames: the parent's device cannot reach the child's copies.
        assert_eq!(parent.dev.dma().domain().stats().refused, 0);
        assert_eq!(kid.dev.dma().domain().stats().refused, 0);
        drop(kid);
        drop(child);
        drop(parent);
    }
    assert_eq!(frames.pool.stats().live, 0);
}

#[test]
fn regions_need_guest_ram_and_dma_vmos() {
    let frames = HostFrames::new(64 << 20).unwrap();
    {
        let g = guest(&frames);
        // Past the guest's end: mapping the regions fails, nothing stays pinned or assigned.
        let past = GUEST - (RIG_PAGES - 2) * P;
        assert!(BlkRig::attach(&frames, &g, past, MemDisk::new(DISK).unwrap(), "x").is_err());
        // A plain (non-DMA) Vmo cannot be a region.
        let mut dma = guest_vm::virtio::DeviceDma::new(
            &frames,
            GUEST,
            DomainTable::new(HeapPhysMem::new()).unwrap(),
        )
        .unwrap();
        let plain = Vmo::new(&frames.pool, P, VmoFlags::empty()).unwrap();
        assert!(dma
            .add_vmo(&g, "plain", &plain, BASE, vmo::DevicePerms::READ)
            .is_err());
        assert!(dma.regions().is_empty());
        // Bad disks are typed errors.
        assert!(MemDisk::new(1000).is_err());
        assert!(MemDisk::new(0).is_err());
    }
    assert_eq!(frames.pool.stats().live, 0);
}

#[test]
fn demo_report_serves_and_refuses() {
    let frames = HostFrames::new(64 << 20).unwrap();
    let r = demo_report(&frames).unwrap();
    println!("{r}");
    assert!(r.data_verified);
    assert_eq!(r.regions.len(), 5);
    assert_eq!(r.contained(), r.attacks.len());
    assert_eq!(r.bytes_written_outside(), 0);
    assert!(r.served > 0 && r.refused > 0 && r.dma_refused > 0);
    assert!(r.pinned_while_assigned && r.pinned_while_assigned_bulk && r.unpinned_after_teardown);
    assert_eq!(frames.pool.stats().live, 0);
}

/// The same device attached to a KVM guest's memory (`Guest`: a `Vmar<KvmStage2>` over the
/// memslot): the guest's own view of RAM (`read_guest`, the memslot's host range) shows what
/// the device wrote and the canaries untouched after every attack. Skips without KVM (fails
/// under `GUESTMEM_REQUIRE_KVM=1`).
#[test]
fn on_a_kvm_guest() {
    if let Err(e) = guest_vm::vmm::check_host() {
        if std::env::var("GUESTMEM_REQUIRE_KVM").is_ok_and(|v| v == "1") {
            panic!("GUESTMEM_REQUIRE_KVM=1 but KVM is unavailable: {e}");
        }
        println!("SKIP: {e}");
        return;
    }
    let frames = HostFrames::new(64 << 20).unwrap();
    {
        let guest = guest_vm::Guest::new(&frames, GUEST).unwrap();
        let mut rig = BlkRig::attach(
            &frames,
            guest.vmar(),
            BASE,
            MemDisk::new(DISK).unwrap(),
            "kvm-blk",
        )
        .unwrap();
        let data = pattern(11, 2 * 512);
        assert_eq!(
            rig.drv
                .write_sectors(&mut rig.dev, 7, &data)
                .unwrap()
                .status,
            OK
        );
        assert_eq!(rig.drv.read_sectors(&mut rig.dev, 7, 2).unwrap().data, data);
        let mut seen = vec![0u8; data.len()];
        guest
            .vm()
            .read_slot(rig.layout.data().0 + DATA_OFF, &mut seen)
            .unwrap();
        assert_eq!(
            seen, data,
            "the guest's memslot shows the device's DMA writes"
        );
        for attack in Attack::ALL {
            let r = attacks::run(&mut rig, attack, |d: &MemDisk| d.bytes().to_vec()).unwrap();
            assert!(r.contained(), "{r:?}");
            for c in rig.layout.canaries() {
                let mut page = vec![0u8; P as usize];
                guest.vm().read_slot(c, &mut page).unwrap();
                assert!(
                    page.iter().all(|&b| b == CANARY),
                    "{attack:?}: canary {c:#x}"
                );
            }
        }
        let report = guest_vm::virtio::demo_report_on(&frames, guest.vmar(), 2 * BASE).unwrap();
        assert_eq!(report.contained(), report.attacks.len());
        assert!(report.data_verified);
        drop(rig);
        drop(guest);
    }
    assert_eq!(frames.pool.stats().live, 0);
}

/// `DmaMemory` on its own (vm-memory `Bytes` / `GuestMemory` through `IommuMemory`): only the
/// assigned ranges translate, with the device perms; a refused access moves no byte.
#[test]
fn iommu_memory_translates_only_assigned_ranges() {
    use guest_vm::virtio::{dma_memory, DeviceDma};
    use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
    let frames = HostFrames::new(64 << 20).unwrap();
    {
        let g = guest(&frames);
        let mut dma = DeviceDma::new(
            &frames,
            GUEST,
            DomainTable::new(HeapPhysMem::new()).unwrap(),
        )
        .unwrap();
        let rw = vmo::DevicePerms::READ | vmo::DevicePerms::WRITE;
        dma.add_contiguous(&g, "rw", BASE, 2 * P, rw).unwrap();
        dma.add_contiguous(&g, "ro", BASE + 3 * P, P, vmo::DevicePerms::READ)
            .unwrap();
        let mem = dma_memory(&frames, dma.domain().clone()).unwrap();
        let ram = guest_vm::virtio::GuestRam::new(&g, &frames);
        ram.fill(BASE + 2 * P, P as usize, CANARY).unwrap();

        mem.write_slice(b"device", GuestAddress(BASE + P - 3))
            .unwrap();
        let mut b = [0u8; 6];
        ram.read(BASE + P - 3, &mut b).unwrap();
        assert_eq!(
            &b, b"device",
            "the guest sees the device's write across pages"
        );
        assert!(mem.check_range(GuestAddress(BASE), 2 * P as usize, Permissions::ReadWrite));
        assert!(mem.check_range(GuestAddress(BASE + 3 * P), P as usize, Permissions::Read));
        assert!(!mem.check_range(GuestAddress(BASE + 3 * P), 1, Permissions::Write));
        assert!(!mem.check_range(GuestAddress(BASE + 2 * P), 1, Permissions::Read));
        // Refused: across the region's end, outside, wrap-around, against perms.
        let big = vec![0xeeu8; 2 * P as usize];
        assert!(mem.write_slice(&big, GuestAddress(BASE + P)).is_err());
        assert!(mem.write_slice(&[1], GuestAddress(BASE + 2 * P)).is_err());
        assert!(mem
            .write_slice(&[1; 64], GuestAddress(u64::MAX - 31))
            .is_err());
        assert!(mem.write_slice(&[1], GuestAddress(BASE + 3 * P)).is_err());
        assert!(mem.read_obj::<u64>(GuestAddress(1 << 41)).is_err());
        let mut page = vec![0u8; P as usize];
        ram.read(BASE + 2 * P, &mut page).unwrap();
        assert!(page.iter().all(|&x| x == CANARY), "no byte moved");
        ram.read(BASE + P, &mut page).unwrap();
        assert!(
            page[3..].iter().all(|&x| x == 0),
            "the refused write left the region alone"
        );
        assert_eq!(dma.domain().stats().refused, 7);
        // After unassign, the same addresses are refused.
        dma.teardown().unwrap();
        assert!(mem.read_obj::<u8>(GuestAddress(BASE)).is_err());
        drop(mem);
    }
    assert_eq!(frames.pool.stats().live, 0);
}
