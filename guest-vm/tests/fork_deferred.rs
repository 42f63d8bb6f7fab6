//! The parent's deferred write-protect at a fork (`Reservation::defer_read_only` / `seal`):
//! after `Guest::fork` the parent's frames are shared but its host mapping is still writable
//! on the async tracker until a writer seals it. These tests write the parent through every
//! write path — the VMM's memslot write (`write_slot`), a host write through the memory model
//! (`Vmar::write`), the vCPU (`run`), the vm-memory view (`guest_memory`) — and check that
//! no child ever sees one of them (and that the parent never sees a child's), and that a
//! template parent forking children without running never pays the write-protect (counted
//! by `SealStats`, not timed). Skips with a printed reason without root or /dev/kvm.

mod common;

use guest_vm::memory::reservation::SealStats;
use guest_vm::vmm::vcpu_state::VcpuState;
use guest_vm::vmm::x86_64::layout::DATA_GPA;
use guest_vm::vmm::{GuestArgs, VmExit};
use guest_vm::workload::programs;
use guest_vm::{Guest, HostFrames};

const N: u64 = 64;
const PAGE: u64 = 4096;

fn args(value: u8) -> GuestArgs {
    GuestArgs {
        rdi: DATA_GPA,
        rcx: N,
        rdx: PAGE,
        rax: u64::from(value),
        ..Default::default()
    }
}

fn seal_stats(g: &Guest) -> SealStats {
    g.vm().reservation().seal_stats()
}

/// First byte of each of the N pages as `read` (gpa, buffer) reads it.
fn first_bytes(read: impl Fn(u64, &mut [u8])) -> Vec<u8> {
    (0..N)
        .map(|i| {
            let mut b = [0u8];
            read(DATA_GPA + i * PAGE, &mut b);
            b[0]
        })
        .collect()
}

/// Through the memory model.
fn bytes(g: &Guest) -> Vec<u8> {
    first_bytes(|gpa, b| g.vmar().read(gpa, b).unwrap())
}

/// Through the guest's memslot (the host mapping KVM uses).
fn slot_bytes(g: &Guest) -> Vec<u8> {
    first_bytes(|gpa, b| g.vm().read_slot(gpa, b).unwrap())
}

/// Runs the write loop over the N pages with `value` (from the loaded entry `state`).
fn run_writes(g: &mut Guest, entry: &VcpuState, value: u8) {
    let mut st = entry.clone();
    st.regs.rax = u64::from(value);
    g.vm_mut().restore_state(&st).unwrap();
    assert_eq!(g.vm_mut().run().unwrap(), VmExit::Done(value));
}

/// A guest that ran the write loop over the N pages with 7: (guest, its entry state, its
/// state after the run).
fn written_parent(frames: &HostFrames) -> (Guest, VcpuState, VcpuState) {
    let mut parent = Guest::new(frames, 4 << 20).unwrap();
    parent
        .vm_mut()
        .load(&programs::write_loop(), args(7))
        .unwrap();
    let entry = parent.snapshot().unwrap();
    assert_eq!(parent.vm_mut().run().unwrap(), VmExit::Done(7));
    let state = parent.snapshot().unwrap();
    (parent, entry, state)
}

fn assert_all(seen: &[u8], want: u8, what: &str) {
    assert!(seen.iter().all(|&b| b == want), "{what}: {seen:?}");
}

#[test]
fn parent_writes_after_a_fork_never_reach_a_child_by_any_path() {
    require_kvm!();
    let frames = HostFrames::new(64 << 20).unwrap();
    {
        let (mut parent, entry, state) = written_parent(&frames);
        let installed = parent.installed_pages();
        let before = seal_stats(&parent);

        let mut child = parent.fork(&state).unwrap();
        let st = seal_stats(&parent);
        assert!(
            st.pending_pages >= N && st.pending_pages <= installed,
            "the fork deferred the write-protect of the written pages: {st:?}"
        );
        assert_eq!(st.sealed_pages, before.sealed_pages, "and paid none of it");

        // 1. The VMM's memslot write (process_vm_writev): seals just the page it writes, and
        //    the write is a WP event that copies it.
        let wp = parent.vm().fault_stats().wp;
        parent.vm().write_slot(DATA_GPA, &[0xA1]).unwrap();
        let st = seal_stats(&parent);
        assert_eq!(st.sealed_pages, before.sealed_pages + 1, "{st:?}");
        assert_eq!(
            parent.vm().fault_stats().wp,
            wp + 1,
            "a WP event, not a write in place"
        );
        // 2. A host write through the memory model (copy-on-write in the Vmo).
        parent.vmar().write(DATA_GPA + PAGE, &[0xA2]).unwrap();
        let mut want = vec![7u8; N as usize];
        want[0] = 0xA1;
        want[1] = 0xA2;
        assert_eq!(bytes(&parent), want);
        assert_eq!(slot_bytes(&parent), want);
        assert_all(&bytes(&child), 7, "child after the parent's host writes");
        assert_all(&slot_bytes(&child), 7, "child's memslot after them");

        // 3. The vCPU: the run seals everything left first.
        let pending = seal_stats(&parent).pending_pages;
        let sealed = seal_stats(&parent).sealed_pages;
        run_writes(&mut parent, &entry, 9);
        assert_all(&bytes(&parent), 9, "parent after its run");
        assert_all(&bytes(&child), 7, "child after the parent's run");
        assert_all(
            &slot_bytes(&child),
            7,
            "child's memslot after the parent's run",
        );
        let st = seal_stats(&parent);
        assert_eq!(st.pending_pages, 0, "{st:?}");
        assert_eq!(st.sealed_pages, sealed + pending, "{st:?}");

        // 4. The vm-memory view, after a second fork deferred the write-protect again.
        let child2 = parent.fork(&state).unwrap();
        assert!(seal_stats(&parent).pending_pages >= N);
        {
            use vm_memory::{Bytes, GuestAddress};
            let mem = parent.vm().guest_memory().unwrap();
            assert_eq!(
                seal_stats(&parent).pending_pages,
                0,
                "the view sealed first"
            );
            mem.write_slice(&[0xA3], GuestAddress(DATA_GPA + 2 * PAGE))
                .unwrap();
        }
        assert_eq!(bytes(&parent)[2], 0xA3);
        assert_all(&bytes(&child2), 9, "second child after the view's write");
        assert_all(&slot_bytes(&child2), 9, "second child's memslot");
        assert_all(&bytes(&child), 7, "first child still the first snapshot");

        // And the other way: a child's writes never reach the parent.
        run_writes(&mut child, &entry, 5);
        assert_all(&bytes(&child), 5, "child after its run");
        let mut want = vec![9u8; N as usize];
        want[2] = 0xA3;
        assert_eq!(bytes(&parent), want);
        assert_all(&bytes(&child2), 9, "second child after the first's run");
        drop((child, child2));
        assert_eq!(bytes(&parent), want);
    }
    assert_eq!(frames.pool.stats().live, 0, "every frame returned");
}

#[test]
fn a_template_parent_that_only_forks_never_pays_the_write_protect() {
    require_kvm!();
    const CHILDREN: u8 = 8;
    let frames = HostFrames::new(64 << 20).unwrap();
    {
        let (mut parent, entry, state) = written_parent(&frames);
        let sealed = seal_stats(&parent).sealed_pages;
        let mut children = Vec::new();
        let mut deferred = None;
        for i in 0..CHILDREN {
            children.push(parent.fork(&state).unwrap());
            let st = seal_stats(&parent);
            assert_eq!(st.sealed_pages, sealed, "fork {i}: nothing sealed: {st:?}");
            // The first fork defers every written page; later ones find nothing writable.
            assert_eq!(
                *deferred.get_or_insert(st.deferred_pages),
                st.deferred_pages
            );
            assert_eq!(st.pending_pages, st.deferred_pages, "fork {i}: {st:?}");
        }
        assert!(deferred.unwrap() >= N);
        // Every child writes its own value; the parent (never run) keeps the snapshot.
        for (i, c) in children.iter_mut().enumerate() {
            run_writes(c, &entry, 10 + i as u8);
        }
        for (i, c) in children.iter().enumerate() {
            assert_all(&bytes(c), 10 + i as u8, &format!("child {i}"));
        }
        assert_all(&bytes(&parent), 7, "template parent");
        assert_eq!(
            seal_stats(&parent).sealed_pages,
            sealed,
            "still nothing paid"
        );
        drop(children);
        // The parent runs again: only now is the write-protect paid, once.
        let pending = seal_stats(&parent).pending_pages;
        run_writes(&mut parent, &entry, 3);
        let st = seal_stats(&parent);
        assert_eq!((st.pending_pages, st.sealed_pages), (0, sealed + pending));
        assert_all(&bytes(&parent), 3, "parent after its run");
    }
    assert_eq!(frames.pool.stats().live, 0, "every frame returned");
}
