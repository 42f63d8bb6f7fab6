//! `ShellPool` and `Guest::fork_from`: children forked into shells built ahead run isolated,
//! a pool dropped with unused shells leaves no thread, fd or frame behind, bad arguments are
//! typed errors, and 1,000 held children are torn down with 0 frames live. Skips with a printed
//! reason without root or /dev/kvm.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use guest_vm::guest::pool::MAX_POOL_SIZE;
use guest_vm::guest::ShellPool;
use guest_vm::vmm::x86_64::layout::DATA_GPA;
use guest_vm::vmm::{GuestArgs, VmExit};
use guest_vm::workload::programs;
use guest_vm::{Error, Guest, HostFrames, PAGE_SIZE};

/// The tests count this process's threads and fds: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const MEM: u64 = 4 << 20;
const PAGES: u64 = 64;

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

/// This process's threads named `name`, once the count equals `want` or after 5 s. Counted by
/// name, not in total: the test harness starts a thread for each test, so the total moves while
/// a test runs. Polled: a new thread names itself when it starts, and a joined one leaves
/// `/proc` a moment after the join returns.
fn threads_named(name: &str, want: usize) -> usize {
    let named = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim_end() == name)
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = named();
        if n == want || std::time::Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A parent running the write loop over `PAGES` pages from `DATA_GPA`, stopped at its entry
/// after one run (so its pages are written), and the entry state.
fn parent(frames: &HostFrames) -> (Guest, guest_vm::VcpuState) {
    let mut g = Guest::new(frames, MEM).unwrap();
    let args = GuestArgs {
        rdi: DATA_GPA,
        rcx: PAGES,
        rdx: PAGE_SIZE,
        rax: 7,
        ..Default::default()
    };
    g.vm_mut().load(&programs::write_loop(), args).unwrap();
    let entry = g.snapshot().unwrap();
    assert!(matches!(g.vm_mut().run().unwrap(), VmExit::Done(7)));
    (g, entry)
}

#[test]
fn children_from_a_pool_run_and_every_frame_comes_back() {
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let frames = HostFrames::new(64 << 20).unwrap();
    {
        let (parent, entry) = parent(&frames);
        let parent_live = frames.pool.stats().live;
        let pool = ShellPool::new(3, MEM).unwrap();
        assert_eq!(pool.wait_full(Duration::from_secs(30)), 3);
        let mut children = Vec::new();
        // More children than the pool holds: later takes may find it empty (misses).
        for _ in 0..6 {
            children.push(parent.fork_from(&pool, &entry).unwrap());
        }
        for c in &mut children {
            assert!(matches!(c.vm_mut().run().unwrap(), VmExit::Done(7)));
            assert!(
                c.vmar().fault_stats().copies >= PAGES,
                "each child copied its pages"
            );
        }
        assert!(frames.pool.stats().live >= parent_live + 6 * PAGES);
        let st = pool.stats();
        assert_eq!(st.taken, 6);
        assert!(st.built >= 3 && st.ready <= 3, "{st:?}");
        drop(children);
        assert_eq!(frames.pool.stats().live, parent_live);
        drop(pool);
        // A plain fork still works beside the pool.
        let mut c = parent.fork(&entry).unwrap();
        assert!(matches!(c.vm_mut().run().unwrap(), VmExit::Done(7)));
    }
    assert_eq!(frames.pool.stats().live, 0, "frames live at teardown");
}

#[test]
fn a_pool_dropped_with_unused_shells_leaves_nothing() {
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let fds = count("/proc/self/fd");
    assert_eq!(threads_named("uffd-faults", 0), 0);
    assert_eq!(threads_named("shell-refill", 0), 0);
    let pool = ShellPool::new(5, MEM).unwrap();
    assert_eq!(pool.wait_full(Duration::from_secs(30)), 5);
    // 5 fault threads waiting for a resolver + the refill thread.
    assert_eq!(threads_named("uffd-faults", 5), 5);
    assert_eq!(threads_named("shell-refill", 1), 1);
    assert!(count("/proc/self/fd") > fds + 5 * 4);
    // A shell taken and dropped unused is clean too.
    drop(pool.take().unwrap());
    drop(pool);
    assert_eq!(threads_named("uffd-faults", 0), 0, "fault threads joined");
    assert_eq!(threads_named("shell-refill", 0), 0, "refill thread joined");
    assert_eq!(count("/proc/self/fd"), fds, "fds closed");
}

#[test]
fn bad_pool_arguments_are_typed_errors() {
    let bad = |r: guest_vm::Result<ShellPool>| matches!(r, Err(Error::InvalidArgs(_)));
    assert!(bad(ShellPool::new(0, MEM)));
    assert!(bad(ShellPool::new(MAX_POOL_SIZE + 1, MEM)));
    assert!(bad(ShellPool::new(1, 0)));
    assert!(bad(ShellPool::new(1, MEM + 1)));
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let frames = HostFrames::new(16 << 20).unwrap();
    let (parent, entry) = parent(&frames);
    let other = ShellPool::new(1, 2 * MEM).unwrap();
    assert!(matches!(
        parent.fork_from(&other, &entry),
        Err(Error::InvalidArgs(_))
    ));
}

#[test]
fn a_thousand_forked_children_are_torn_down_with_no_frame_live() {
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // 8 fds per child (/dev/kvm, VM, vCPU, 2 userfaultfds, pagemap, 2 eventfds): the fd
    // limit is the one that binds first here; the children's kernel memory (≈ 190 KB each
    // at this size) does not.
    let nofile = guest_vm::sys::limits::raise_nofile(1000 * 8 + 16 * 8 + 256).unwrap();
    let n = 1000.min((nofile.saturating_sub(16 * 8 + 256) / 8) as usize);
    if n < 1000 {
        println!("RLIMIT_NOFILE hard limit {nofile}: {n} children instead of 1000");
    }
    let frames = HostFrames::new(64 << 20).unwrap();
    {
        let (parent, entry) = parent(&frames);
        let parent_live = frames.pool.stats().live;
        let pool = ShellPool::new(16, MEM).unwrap();
        let mut children = Vec::with_capacity(n);
        for _ in 0..n {
            children.push(parent.fork_from(&pool, &entry).unwrap());
        }
        // Held, not run — except every 100th, so some hold private frames at teardown.
        let mut ran = 0;
        for c in children.iter_mut().step_by(100) {
            assert!(matches!(c.vm_mut().run().unwrap(), VmExit::Done(7)));
            ran += 1;
        }
        assert!(frames.pool.stats().live >= parent_live + ran * PAGES);
        assert_eq!(pool.stats().taken, n as u64);
        drop(children);
        assert_eq!(frames.pool.stats().live, parent_live);
        drop(pool);
    }
    assert_eq!(frames.pool.stats().live, 0, "frames live at teardown");
}
