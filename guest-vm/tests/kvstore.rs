//! The key-value store guest (a no_std Rust program built by build.rs) running under KVM with
//! every page demand-faulted through userfaultfd → test resolver → `KvmStage2`. Skips with a
//! printed reason without root or /dev/kvm.

mod common;

use std::time::Instant;

use common::TestMem;
use guest_vm::vmm::GuestVm;
use guest_vm::workload::kvstore::{fill_value, memory_for, KvStore, ST_OK};

#[test]
fn kvstore_builds_a_multi_mib_table_and_serves_requests() {
    require_kvm!();
    let buckets = 1 << 16; // 4 MiB table
    let mem_size = memory_for(buckets);
    let (mem, res) = TestMem::new(mem_size, 64 << 20);
    let vm = GuestVm::new(res, TestMem::resolver(&mem)).unwrap();
    let t = Instant::now();
    let mut kv = KvStore::boot(vm, buckets).unwrap();
    let boot = t.elapsed();
    let t = Instant::now();
    assert_eq!(kv.fill(1000, 40_000).unwrap(), 40_000);
    let fill = t.elapsed();
    for key in [1000u64, 1001, 20_000, 40_999] {
        assert_eq!(kv.get(key).unwrap().as_deref(), Some(&fill_value(key)[..]));
    }
    assert_eq!(kv.get(999).unwrap(), None);
    assert_eq!(kv.put(7, b"seven").unwrap(), ST_OK);
    assert_eq!(kv.get(7).unwrap().as_deref(), Some(&b"seven"[..]));
    assert!(kv.delete(1000).unwrap());
    assert!(!kv.delete(1000).unwrap());
    assert_eq!(kv.count().unwrap(), 40_000);
    let sum1 = kv.checksum().unwrap();
    assert_eq!(kv.checksum().unwrap(), sum1);
    // Bad requests are guest-visible statuses / host errors, not crashes.
    assert!(kv
        .call(&guest_vm::workload::kvstore::Request {
            op: 99,
            key: 0,
            arg: 0,
            data: vec![]
        })
        .is_ok_and(|r| r.status == guest_vm::workload::kvstore::ST_BAD_REQUEST));
    // vCPU state snapshot at a request boundary, restore after more writes: the guest resumes
    // at the same request loop (memory is not rolled back here: that is the Vmar's fork/reset).
    let state = kv.vm().save_state().unwrap();
    assert_eq!(kv.put(8, b"eight").unwrap(), ST_OK);
    kv.vm_mut().restore_state(&state).unwrap();
    assert_eq!(kv.get(8).unwrap().as_deref(), Some(&b"eight"[..]));
    let faults = kv.vm().fault_stats();
    let vm = kv.finish().unwrap();
    let m = mem.lock().unwrap();
    let s2 = m.stage2.stats();
    println!(
        "kvstore: boot {:.1} ms, fill 40000 keys over a 4 MiB table {:.1} ms; {} uffd faults \
         ({} missing, {} wp), {} pages installed, {} frames resident ({} KiB memfd)",
        boot.as_secs_f64() * 1e3,
        fill.as_secs_f64() * 1e3,
        faults.missing + faults.wp,
        faults.missing,
        faults.wp,
        m.stage2.mapped_pages(),
        m.pool.stats().live,
        m.alloc.resident_bytes().unwrap() / 1024
    );
    assert_eq!(faults.failed, 0);
    assert_eq!(s2.maps, m.stage2.mapped_pages());
    assert!(m.stage2.mapped_pages() >= buckets * 64 / 4096);
    drop(vm);
}
