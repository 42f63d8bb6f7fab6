//! Streaming fault-around on the product path: a guest writing through fresh memory page after
//! page takes far fewer userfaultfd faults with the window on, every byte lands, and a forked
//! child writing through the parent's (shared) pages still copies only what it writes — the
//! window never turns into speculative copies. Skips with a printed reason without KVM (fails
//! under `GUESTMEM_REQUIRE_KVM=1`).

mod common;

use guest_vm::vmm::x86_64::layout::DATA_GPA;
use guest_vm::vmm::{GuestArgs, VmExit};
use guest_vm::workload::programs;
use guest_vm::{Guest, HostFrames};

const PAGES: u64 = 1024;

fn writer(frames: &HostFrames, count: u64, stride: u64) -> Guest {
    let mut g = Guest::new(frames, 8 << 20).unwrap();
    let args = GuestArgs {
        rdi: DATA_GPA,
        rcx: count,
        rdx: stride,
        rax: 0x61,
        ..Default::default()
    };
    g.vm_mut().load(&programs::write_loop(), args).unwrap();
    g
}

#[test]
fn streaming_writes_take_fewer_faults_and_forks_copy_only_their_writes() {
    require_kvm!();
    let frames = HostFrames::new(64 << 20).unwrap();
    {
        let mut plain = writer(&frames, PAGES, 4096);
        assert_eq!(plain.vm_mut().run().unwrap(), VmExit::Done(0x61));
        let plain_faults = plain.vm().fault_stats().missing;

        let mut g = writer(&frames, PAGES, 4096);
        g.set_stream_fault_around(32);
        let entry = g.snapshot().unwrap();
        assert_eq!(g.vm_mut().run().unwrap(), VmExit::Done(0x61));
        let faults = g.vm().fault_stats().missing;
        println!("{PAGES} streamed pages: {plain_faults} uffd faults without, {faults} with a 32-page window");
        assert!(faults * 4 < plain_faults, "{faults} vs {plain_faults}");
        for i in [0, 1, PAGES / 2, PAGES - 1] {
            let mut b = [0u8];
            g.vm().read_guest(DATA_GPA + i * 4096, &mut b).unwrap();
            assert_eq!(b[0], 0x61, "page {i}");
        }
        // Speculation stops at the end of the stream: at most one window beyond it.
        let committed = g.vmar().fault_stats().commits;
        assert!(committed <= plain.vmar().fault_stats().commits + 32);

        // A child writing every other page of the shared data copies exactly those pages.
        let mut child = g.fork(&entry).unwrap();
        let mut regs = child.vm_mut().vcpu().unwrap().get_regs().unwrap();
        regs.rcx = PAGES / 2;
        regs.rdx = 2 * 4096;
        child.vm_mut().vcpu().unwrap().set_regs(&regs).unwrap();
        assert_eq!(child.vm_mut().run().unwrap(), VmExit::Done(0x61));
        let st = child.vmar().fault_stats();
        println!("child: {st:?}");
        assert_eq!(st.copies, PAGES / 2, "exactly the pages it wrote");
    }
    assert_eq!(frames.pool.stats().live, 0);
}
