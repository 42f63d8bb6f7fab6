//! virtio-blk over a DMA domain: valid I/O, malicious descriptors (each refused with zero bytes
//! written outside the assigned regions), pin/unpin through the device lifecycle, the fork
//! policy, and zero live frames at teardown. Host-side driver only: no /dev/kvm needed.

use guest_vm::virtio::demo_report;
use guest_vm::HostFrames;

#[test]
fn demo_report_serves_and_refuses() {
    let frames = HostFrames::new(64 << 20).unwrap();
    let r = demo_report(&frames).unwrap();
    println!("{r}");
    assert!(r.data_verified);
    assert_eq!(r.contained(), r.attacks.len());
    assert_eq!(r.bytes_written_outside(), 0);
    assert!(r.pinned_while_assigned && r.pinned_while_assigned_bulk && r.unpinned_after_teardown);
    assert_eq!(frames.pool.stats().live, 0);
}
