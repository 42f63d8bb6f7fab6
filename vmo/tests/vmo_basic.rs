//! Vmo basics: lazy commit, read/write at any offset, rights, flags, bad input, pin, resize,
//! decommit, the counting pager and the file pager.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vmo::{ChildKind, Error, FramePool, Pager, Rights, Vmo, VmoFlags, PAGE_BYTES, PAGE_SIZE};

const P: u64 = PAGE_SIZE;

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn vmo_is_send_and_sync() {
    assert_send_sync::<Vmo>();
    assert_send_sync::<FramePool>();
}

#[test]
fn pages_commit_lazily_and_read_zero() {
    let pool = FramePool::heap();
    let vmo = Vmo::new(&pool, 16 * P, VmoFlags::empty()).unwrap();
    let mut buf = vec![0xffu8; 3 * P as usize];
    vmo.read(P, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(
        vmo.committed_bytes(),
        0,
        "reads of anonymous pages do not commit"
    );
    assert_eq!(pool.stats().live, 0);
    vmo.write(P + 10, b"hello").unwrap();
    assert_eq!(vmo.committed_bytes(), P);
    let mut out = [0u8; 5];
    vmo.read(P + 10, &mut out).unwrap();
    assert_eq!(&out, b"hello");
    drop(vmo);
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn write_across_pages_and_unaligned() {
    let pool = FramePool::heap();
    let vmo = Vmo::new(&pool, 8 * P, VmoFlags::empty()).unwrap();
    let data: Vec<u8> = (0..(3 * P as usize + 77))
        .map(|i| (i % 251) as u8)
        .collect();
    vmo.write(P - 13, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    vmo.read(P - 13, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(vmo.committed_bytes(), 5 * P);
    vmo.clear(P - 13, data.len() as u64).unwrap();
    vmo.read(P - 13, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    // Whole pages were decommitted; the partial head and tail stay committed with zeros.
    assert_eq!(vmo.committed_bytes(), 2 * P);
    drop(vmo);
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn bad_input_is_an_error() {
    let pool = FramePool::heap();
    let vmo = Vmo::new(&pool, 4 * P, VmoFlags::empty()).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(vmo.read(4 * P - 4, &mut buf), Err(Error::OutOfRange));
    assert_eq!(vmo.read(u64::MAX - 2, &mut buf), Err(Error::OutOfRange));
    assert_eq!(vmo.write(u64::MAX, &buf), Err(Error::OutOfRange));
    assert_eq!(vmo.commit(2 * P, 3 * P), Err(Error::OutOfRange));
    assert_eq!(vmo.decommit(u64::MAX - P, 2 * P), Err(Error::OutOfRange));
    assert_eq!(vmo.resize(P), Err(Error::NotSupported), "not RESIZABLE");
    assert_eq!(
        vmo.create_child(ChildKind::Snapshot, 1, P).unwrap_err(),
        Error::InvalidArgs
    );
    assert_eq!(
        vmo.create_child(ChildKind::Snapshot, !(P - 1), 2 * P)
            .unwrap_err(),
        Error::OutOfRange
    );
    assert_eq!(
        vmo.create_child(ChildKind::Slice, 2 * P, 4 * P)
            .unwrap_err(),
        Error::OutOfRange
    );
    assert_eq!(vmo.unpin(0, P), Err(Error::BadState));
    assert_eq!(vmo.pin(0, 0), Err(Error::InvalidArgs));
    assert_eq!(vmo.try_commit_page(u64::MAX), Err(Error::OutOfRange));
    assert_eq!(
        Vmo::new(&pool, u64::MAX, VmoFlags::empty()).unwrap_err(),
        Error::OutOfRange
    );
    assert_eq!(
        Vmo::new(&pool, P, VmoFlags::CONTIGUOUS).unwrap_err(),
        Error::InvalidArgs
    );
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn rights_are_checked_on_every_operation() {
    let pool = FramePool::heap();
    let vmo = Vmo::new(&pool, 4 * P, VmoFlags::RESIZABLE).unwrap();
    let ro = vmo.duplicate(Rights::READ | Rights::MAP).unwrap();
    let mut buf = [0u8; 4];
    ro.read(0, &mut buf).unwrap();
    assert_eq!(ro.write(0, &buf), Err(Error::AccessDenied));
    assert_eq!(ro.clear(0, 4), Err(Error::AccessDenied));
    assert_eq!(ro.commit(0, P), Err(Error::AccessDenied));
    assert_eq!(ro.decommit(0, P), Err(Error::AccessDenied));
    assert_eq!(ro.resize(P), Err(Error::AccessDenied));
    assert_eq!(
        ro.duplicate(Rights::READ).unwrap_err(),
        Error::AccessDenied,
        "no DUPLICATE"
    );
    assert_eq!(
        ro.create_child(ChildKind::Snapshot, 0, P).unwrap_err(),
        Error::AccessDenied
    );
    let wo = vmo.duplicate(Rights::WRITE | Rights::DUPLICATE).unwrap();
    assert_eq!(wo.read(0, &mut buf), Err(Error::AccessDenied));
    assert_eq!(
        wo.duplicate(Rights::WRITE | Rights::READ).unwrap_err(),
        Error::AccessDenied,
        "no escalation"
    );
    assert_eq!(
        wo.fault_page(0, vmo::FaultAccess::Read, |_, _, _| Ok(())),
        Err(Error::AccessDenied)
    );
}

#[test]
fn resize_shrinks_and_grows() {
    let pool = FramePool::heap();
    let vmo = Vmo::new(&pool, 8 * P, VmoFlags::RESIZABLE).unwrap();
    vmo.write(0, &vec![7u8; 8 * P as usize]).unwrap();
    assert_eq!(pool.stats().live, 8);
    vmo.resize(3 * P + 1).unwrap();
    assert_eq!(vmo.size(), 4 * P, "rounded up to pages");
    assert_eq!(pool.stats().live, 4);
    vmo.resize(10 * P).unwrap();
    let mut b = [1u8; 1];
    vmo.read(9 * P, &mut b).unwrap();
    assert_eq!(b[0], 0, "grown tail reads zeros");
    vmo.pin(2 * P, P).unwrap();
    assert_eq!(
        vmo.resize(P),
        Err(Error::BadState),
        "pinned page in the tail"
    );
    vmo.unpin(2 * P, P).unwrap();
    vmo.resize(P).unwrap();
    drop(vmo);
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn pin_commits_and_blocks_decommit_and_snapshot() {
    let pool = FramePool::heap();
    let vmo = Vmo::new(&pool, 4 * P, VmoFlags::DMA).unwrap();
    vmo.pin(P, 2 * P).unwrap();
    assert_eq!(vmo.committed_bytes(), 2 * P);
    assert_eq!(vmo.decommit(0, 4 * P), Err(Error::BadState));
    assert_eq!(
        vmo.create_child(ChildKind::Snapshot, 0, 4 * P).unwrap_err(),
        Error::BadState
    );
    // A snapshot of a window without pinned pages is fine.
    vmo.create_child(ChildKind::Snapshot, 3 * P, P).unwrap();
    vmo.pin(P, P).unwrap(); // pins nest
    vmo.unpin(P, 2 * P).unwrap();
    assert_eq!(
        vmo.decommit(P, P),
        Err(Error::BadState),
        "still pinned once"
    );
    vmo.unpin(P, P).unwrap();
    vmo.decommit(0, 4 * P).unwrap();
    vmo.create_child(ChildKind::Snapshot, 0, 4 * P).unwrap();
    assert_eq!(vmo.committed_bytes(), 0);
    drop(vmo);
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn contiguous_vmo_is_committed_and_contiguous() {
    let pool = FramePool::heap();
    let vmo = Vmo::new_contiguous(&pool, 5 * P, true).unwrap();
    assert!(vmo.flags().contains(VmoFlags::CONTIGUOUS | VmoFlags::DMA));
    assert_eq!(vmo.committed_bytes(), 5 * P);
    let base = vmo.contiguous_base().unwrap();
    for i in 0..5 {
        assert_eq!(
            vmo.committed_frame(i * P).unwrap().unwrap().paddr(),
            base + i * P
        );
    }
    assert_eq!(vmo.decommit(0, P), Err(Error::NotSupported));
    assert_eq!(
        vmo.create_child(ChildKind::Snapshot, 0, P).unwrap_err(),
        Error::NotSupported
    );
    assert_eq!(
        vmo.create_child(ChildKind::SnapshotAtLeastOnWrite, 0, P)
            .unwrap_err(),
        Error::NotSupported
    );
    vmo.clear(0, 5 * P).unwrap();
    assert_eq!(
        vmo.committed_bytes(),
        5 * P,
        "clear keeps contiguous frames"
    );
    drop(vmo);
    assert_eq!(pool.stats().live, 0);
}

/// A pager over an in-memory image that counts every call.
#[derive(Default)]
struct CountingPager {
    commits: AtomicU64,
    overwrites: AtomicU64,
    updates: AtomicU64,
    decommits: AtomicU64,
}

impl Pager for CountingPager {
    fn commit_page(&self, idx: u64, buf: &mut [u8; PAGE_BYTES]) -> vmo::Result<()> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        buf.fill(idx as u8 + 1);
        Ok(())
    }
    fn commit_overwrite(&self, _idx: u64) -> vmo::Result<()> {
        self.overwrites.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn update_page(&self, _idx: u64) -> vmo::Result<()> {
        self.updates.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn decommit_page(&self, _idx: u64, _data: &[u8; PAGE_BYTES]) -> vmo::Result<()> {
        self.decommits.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn pager_calls_are_the_right_ones() {
    let pool = FramePool::heap();
    let pager = Arc::new(CountingPager::default());
    let vmo = Vmo::new_paged(&pool, 8 * P, VmoFlags::empty(), pager.clone()).unwrap();
    let mut b = [0u8; 2];
    vmo.read(2 * P + 5, &mut b).unwrap();
    assert_eq!(b, [3, 3], "page 2 comes from the pager");
    assert_eq!(pager.commits.load(Ordering::SeqCst), 1);
    assert_eq!(vmo.try_commit_page(5), Err(Error::ShouldWait), "needs I/O");
    assert!(vmo.try_commit_page(2).is_ok(), "already committed");
    // A full-page write in the middle of a range: head and tail commit normally.
    vmo.write(3 * P + 100, &vec![9u8; 2 * P as usize]).unwrap();
    assert_eq!(
        pager.overwrites.load(Ordering::SeqCst),
        1,
        "page 4 is overwritten whole"
    );
    assert_eq!(
        pager.commits.load(Ordering::SeqCst),
        3,
        "pages 3 and 5 read first"
    );
    assert_eq!(
        pager.updates.load(Ordering::SeqCst),
        3,
        "every written page is marked dirty"
    );
    vmo.decommit(0, 8 * P).unwrap();
    assert_eq!(
        pager.decommits.load(Ordering::SeqCst),
        4,
        "each committed page handed back"
    );
    assert_eq!(
        vmo.create_child(ChildKind::Snapshot, 0, P).unwrap_err(),
        Error::NotSupported
    );
    let child = vmo
        .create_child(ChildKind::SnapshotAtLeastOnWrite, P, 2 * P)
        .unwrap();
    child.read(0, &mut b).unwrap();
    assert_eq!(b, [2, 2], "child page 0 is parent page 1");
    child.write(0, b"x").unwrap();
    assert_eq!(
        pager.updates.load(Ordering::SeqCst),
        3,
        "a child never writes back"
    );
    drop((vmo, child));
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn file_pager_reads_and_writes_back() {
    use std::io::{Read, Seek, Write};
    let mut file = tempfile();
    let image: Vec<u8> = (0..(3 * P as usize + 100)).map(|i| (i / 7) as u8).collect();
    file.write_all(&image).unwrap();
    let pool = FramePool::heap();
    let pager = Arc::new(vmo::pager::FilePager::new(file.try_clone().unwrap()));
    let vmo = Vmo::new_paged(&pool, 6 * P, VmoFlags::empty(), pager.clone()).unwrap();
    let mut back = vec![0u8; image.len() + 50];
    vmo.read(0, &mut back).unwrap();
    assert_eq!(&back[..image.len()], &image[..]);
    assert!(
        back[image.len()..].iter().all(|&b| b == 0),
        "past the file's end reads zeros"
    );
    vmo.write(P + 1, b"patched").unwrap();
    assert_eq!(pager.dirty_pages(), vec![1]);
    vmo.decommit(0, 6 * P).unwrap();
    assert!(pager.dirty_pages().is_empty());
    let mut now = Vec::new();
    file.rewind().unwrap();
    file.read_to_end(&mut now).unwrap();
    assert_eq!(&now[P as usize + 1..P as usize + 8], b"patched");
    assert_eq!(
        now[0..P as usize],
        image[0..P as usize],
        "clean pages are not rewritten"
    );
    drop(vmo);
    assert_eq!(pool.stats().live, 0);
}

fn tempfile() -> std::fs::File {
    let path = std::env::temp_dir().join(format!(
        "vmo-pager-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}
