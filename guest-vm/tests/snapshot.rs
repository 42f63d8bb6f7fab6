//! Snapshot files on the product path: a key-value store guest saved to a file and restored
//! lazily (no page read before it runs), serving a checked stream; restored guests fork and
//! reset; eager restore; a chain of three diffs restores byte-exact; the committed fixtures of
//! formats 1.0, 1.1 and 1.2 restore (1.2 also as a 1.1 reader reads it); a working set stored in the file (1.1) cuts the demand faults
//! of a cold restore's first run to at most a tenth; and every bad input is a typed error (or,
//! for a page read while the guest runs, a stopped guest with a report). Fails without KVM
//! under `GUESTMEM_REQUIRE_KVM=1`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use guest_vm::snapshot::format::{Header, SectionKind, HEADER_LEN};
use guest_vm::snapshot::{self, Prefetch, RestoreOptions, SaveOptions, SnapshotError};
use guest_vm::workload::kvstore::{fill_value, memory_for, KvStore};
use guest_vm::workload::model::TableModel;
use guest_vm::workload::streams::{self, FILL_FIRST};
use guest_vm::{Guest, HostFrames, PAGE_SIZE};

const BUCKETS: u64 = 1 << 12;
const KEYS: u64 = 2000;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("gm-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn file(&self, n: &str) -> PathBuf {
        self.0.join(n)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn frames() -> HostFrames {
    HostFrames::new(64 << 20).unwrap()
}

/// Boots the store, fills it, saves it to `path`; returns the model of its table.
fn save_filled(frames: &HostFrames, path: &Path) -> TableModel {
    let mut kv = KvStore::boot(Guest::new(frames, memory_for(BUCKETS)).unwrap(), BUCKETS).unwrap();
    kv.fill(FILL_FIRST, KEYS).unwrap();
    let state = kv.inner().snapshot().unwrap();
    let stats = snapshot::save(kv.inner(), &state, path, &SaveOptions::default()).unwrap();
    assert!(stats.data_pages > 0 && !stats.diff);
    let mut model = TableModel::new(BUCKETS);
    model.fill(FILL_FIRST, KEYS);
    model
}

fn restore(frames: &HostFrames, paths: &[PathBuf]) -> Result<snapshot::Restored, SnapshotError> {
    snapshot::restore(frames, paths, RestoreOptions::default())
}

#[test]
fn saved_guest_restores_lazily_serves_forks_and_resets() {
    require_kvm!();
    let dir = TempDir::new("lazy");
    let path = dir.file("kv.gms");
    let frames = frames();
    let model = save_filled(&frames, &path);
    let r = restore(&frames, std::slice::from_ref(&path)).unwrap();
    assert_eq!(
        r.chain.pages_read.load(Ordering::Relaxed),
        0,
        "nothing read before the run"
    );
    assert_eq!(r.guest.installed_pages(), 0);
    let chain = r.chain.clone();
    let state = r.state.clone();
    let mut kv = KvStore::resume(r.guest);
    let mut m = model.clone();
    let ops = streams::stream(1, 300, KEYS, 1);
    streams::serve_checked(&mut kv, &mut m, &ops, 1).unwrap();
    streams::check_table(&mut kv, &m, "restored").unwrap();
    assert!(chain.pages_read.load(Ordering::Relaxed) > 0);
    assert!(chain.failures().is_empty());
    // A restored guest forks (SnapshotAtLeastOnWrite over the pager) and resets like any other.
    let mut guest = kv.into_inner();
    guest.reset(&state).unwrap();
    let child = guest.fork(&state).unwrap();
    let mut ckv = KvStore::resume(child);
    let mut cm = model.clone();
    streams::serve_checked(&mut ckv, &mut cm, &streams::stream(2, 200, KEYS, 1), 2).unwrap();
    streams::check_table(&mut ckv, &cm, "fork of restored").unwrap();
    let mut kv = KvStore::resume(guest);
    let mut m = model.clone();
    streams::serve_checked(&mut kv, &mut m, &ops, 1).unwrap();
    streams::check_table(&mut kv, &m, "reset restored").unwrap();
}

#[test]
fn eager_restore_reads_every_stored_page_first() {
    require_kvm!();
    let dir = TempDir::new("eager");
    let path = dir.file("kv.gms");
    let frames = frames();
    let model = save_filled(&frames, &path);
    let opts = RestoreOptions {
        eager: true,
        verify: true,
        ..RestoreOptions::default()
    };
    let r = snapshot::restore(&frames, std::slice::from_ref(&path), opts).unwrap();
    let stored = r.chain.layers[0].data_pages;
    assert_eq!(r.chain.pages_read.load(Ordering::Relaxed), stored);
    // Fault-around may install never-saved (zero) neighbours too.
    assert!(r.guest.installed_pages() >= stored);
    let mut kv = KvStore::resume(r.guest);
    streams::check_table(&mut kv, &model, "eager").unwrap();
    assert_eq!(
        kv.get(FILL_FIRST).unwrap().as_deref(),
        Some(&fill_value(FILL_FIRST)[..])
    );
}

/// Whole guest memory, read through the Vmar.
fn memory(g: &Guest) -> Vec<u8> {
    let mut buf = vec![0u8; g.mem_size() as usize];
    g.vmar().read(0, &mut buf).unwrap();
    buf
}

#[test]
fn a_chain_of_three_diffs_restores_byte_exact() {
    require_kvm!();
    let dir = TempDir::new("chain");
    let frames = frames();
    const CHAIN_BUCKETS: u64 = 1 << 14; // 1 MiB table: a diff is a fraction of it
    let g = Guest::new(&frames, memory_for(CHAIN_BUCKETS)).unwrap();
    let mut kv = KvStore::boot(g, CHAIN_BUCKETS).unwrap();
    kv.fill(FILL_FIRST, KEYS).unwrap();
    let mut model = TableModel::new(CHAIN_BUCKETS);
    model.fill(FILL_FIRST, KEYS);
    let mut paths = vec![dir.file("base.gms")];
    let mut opts = SaveOptions {
        mark_reset_point: true,
        ..SaveOptions::default()
    };
    let state = kv.inner().snapshot().unwrap();
    let full = snapshot::save(kv.inner(), &state, &paths[0], &opts).unwrap();
    for i in 1..=3u64 {
        let ops = streams::stream(i, 150, KEYS, 1);
        streams::serve_checked(&mut kv, &mut model, &ops, i).unwrap();
        opts.diff_base = Some(snapshot::save::base_identity(paths.last().unwrap()).unwrap());
        let p = dir.file(&format!("diff{i}.gms"));
        let state = kv.inner().snapshot().unwrap();
        let st = snapshot::save(kv.inner(), &state, &p, &opts).unwrap();
        assert!(
            st.diff && st.data_pages + st.zero_pages < full.data_pages / 2,
            "{st:?}"
        );
        paths.push(p);
    }
    let reference = memory(kv.inner());
    let r = restore(&frames, &paths).unwrap();
    assert_eq!(memory(&r.guest), reference, "chain restores byte-exact");
    let mut rkv = KvStore::resume(r.guest);
    streams::check_table(&mut rkv, &model, "chain").unwrap();
    // A diff whose base is missing, or given the wrong base, is refused before any VM.
    assert!(matches!(
        restore(&frames, &paths[1..2]),
        Err(SnapshotError::BaseMissing { .. })
    ));
    assert!(matches!(
        restore(&frames, &[paths[0].clone(), paths[2].clone()]),
        Err(SnapshotError::BaseMismatch { .. })
    ));
}

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/snapshot-v1.0.gms"
);
/// Written once per released format by
/// `guest-vm snapshot save --out tests/fixtures/snapshot-v1.0.gms --table-mib 1 --keys 20`.
const FIXTURE_BUCKETS: u64 = (1 << 20) / guest_vm::workload::kvstore::BUCKET_SIZE;
const FIXTURE_KEYS: u64 = 20;

#[test]
fn committed_fixture_of_format_1_0_restores() {
    require_kvm!();
    let frames = frames();
    let r = restore(&frames, &[PathBuf::from(FIXTURE)]).unwrap();
    assert_eq!(
        (
            r.chain.layers[0].header.major,
            r.chain.layers[0].header.minor
        ),
        (1, 0)
    );
    assert_eq!(r.guest.mem_size(), 2 << 20);
    let mut model = TableModel::new(FIXTURE_BUCKETS);
    model.fill(FILL_FIRST, FIXTURE_KEYS);
    let mut kv = KvStore::resume(r.guest);
    streams::check_table(&mut kv, &model, "fixture").unwrap();
    let ops = streams::stream(5, 200, FIXTURE_KEYS, 1);
    streams::serve_checked(&mut kv, &mut model, &ops, 5).unwrap();
}

/// The recorded stream of the 1.2 fixture's working set (its `--working-set-seed` and
/// `--requests`).
const FIXTURE_WS_SEED: u64 = 5;
const FIXTURE_WS_REQUESTS: u64 = 50;

/// userfaultfd faults (missing + write-protect) `g` has taken so far.
fn demand_faults(g: &Guest) -> u64 {
    let s = g.vm().fault_stats();
    s.missing + s.wp
}

/// A restore's prefetch installs every page of `set` and at most `MERGE_GAP` gap pages
/// between two of its runs (runs that close are merged into one span).
fn assert_prefetched(prefetched: u64, set: &vmo::WorkingSet) {
    let gaps = (set.runs().len() as u64).saturating_sub(1) * snapshot::restore::MERGE_GAP;
    assert!(
        (set.len() as u64..=set.len() as u64 + gaps).contains(&prefetched),
        "prefetched {prefetched} for {} pages in {} runs",
        set.len(),
        set.runs().len()
    );
}

const FIXTURE_1_2: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/snapshot-v1.2.gms"
);

/// Written by `guest-vm snapshot save --out tests/fixtures/snapshot-v1.2.gms --table-mib 1
/// --keys 20 --working-set-seed 5 --requests 50`: the working set recorded from stream 5 and
/// the index chunks. (1.1 was a development version that never shipped — its identity covered
/// the working-set entry, which a 1.0 program refuses — so 1.2 is the first release after 1.0.)
#[test]
fn committed_fixture_of_format_1_2_restores_with_its_working_set() {
    require_kvm!();
    let frames = frames();
    let r = restore(&frames, &[PathBuf::from(FIXTURE_1_2)]).unwrap();
    let h = &r.chain.layers[0].header;
    assert_eq!((h.major, h.minor), (1, 2));
    assert!(h.index_chunks.is_some());
    let set = r.chain.layers[0]
        .working_set
        .clone()
        .expect("a working set");
    assert!(!set.is_empty() && set.written() > 0, "{set:?}");
    assert_prefetched(r.prefetched, &set);
    assert!(r.guest.installed_pages() >= r.prefetched);
    let mut model = TableModel::new(FIXTURE_BUCKETS);
    model.fill(FILL_FIRST, FIXTURE_KEYS);
    let before = demand_faults(&r.guest);
    let mut kv = KvStore::resume(r.guest);
    let ops = streams::stream(FIXTURE_WS_SEED, FIXTURE_WS_REQUESTS, FIXTURE_KEYS, 1);
    streams::serve_checked(&mut kv, &mut model, &ops, FIXTURE_WS_SEED).unwrap();
    // The recorded stream again: every page it touches was prefetched.
    assert_eq!(demand_faults(kv.inner()) - before, 0);
    streams::check_table(&mut kv, &model, "fixture 1.2").unwrap();
    // Prefetch off: nothing installed before the run.
    let off = RestoreOptions {
        prefetch: Prefetch::Off,
        ..RestoreOptions::default()
    };
    let r = snapshot::restore(&frames, &[PathBuf::from(FIXTURE_1_2)], off).unwrap();
    assert_eq!((r.prefetched, r.guest.installed_pages()), (0, 0));
}

/// The 1.2 fixture as a 1.0 reader sees it: the header re-encoded with the four required
/// sections only (the working set and the index chunks skipped) and the recorded identity
/// unchanged — so the whole-index check at open also proves that the identity a 1.0 reader
/// recomputes is the one recorded — restores the same memory.
#[test]
fn committed_fixture_of_format_1_2_reads_as_a_1_0_reader_sees_it() {
    require_kvm!();
    let frames = frames();
    let dir = TempDir::new("v12");
    let as_1_0 = dir.file("as-1.0.gms");
    let mut bytes = std::fs::read(FIXTURE_1_2).unwrap();
    let mut h = header_of(Path::new(FIXTURE_1_2));
    assert!(h.index_chunks.is_some() && h.working_set.is_some());
    h.index_chunks = None;
    h.working_set = None;
    bytes[..HEADER_LEN].copy_from_slice(&h.encode(true));
    std::fs::write(&as_1_0, bytes).unwrap();
    let mut memories = Vec::new();
    for (path, has_set) in [(PathBuf::from(FIXTURE_1_2), true), (as_1_0, false)] {
        let r = restore(&frames, std::slice::from_ref(&path)).unwrap();
        let layer = &r.chain.layers[0];
        assert_eq!((layer.header.major, layer.header.minor), (1, 2));
        assert_eq!(layer.working_set.is_some(), has_set);
        let mut model = TableModel::new(FIXTURE_BUCKETS);
        model.fill(FILL_FIRST, FIXTURE_KEYS);
        let mut kv = KvStore::resume(r.guest);
        let ops = streams::stream(FIXTURE_WS_SEED, FIXTURE_WS_REQUESTS, FIXTURE_KEYS, 1);
        streams::serve_checked(&mut kv, &mut model, &ops, FIXTURE_WS_SEED).unwrap();
        streams::check_table(&mut kv, &model, "fixture 1.2").unwrap();
        let f = snapshot::SnapshotFile::open(&path).unwrap();
        f.verify_pages().unwrap();
        memories.push(memory(kv.inner()));
    }
    assert!(
        memories[0] == memories[1],
        "the two readings restore different memory"
    );
}

#[test]
fn a_stored_working_set_cuts_the_demand_faults_of_a_cold_restore_tenfold() {
    require_kvm!();
    let dir = TempDir::new("ws");
    let frames = frames();
    const WS_BUCKETS: u64 = 1 << 16; // a 4 MiB table: a run touches pages all over it
    const REQUESTS: u64 = 300;
    let g = Guest::new(&frames, memory_for(WS_BUCKETS)).unwrap();
    let mut kv = KvStore::boot(g, WS_BUCKETS).unwrap();
    kv.fill(FILL_FIRST, KEYS).unwrap();
    let mut model = TableModel::new(WS_BUCKETS);
    model.fill(FILL_FIRST, KEYS);
    let state = kv.inner().snapshot().unwrap();
    let plain = dir.file("plain.gms");
    snapshot::save(kv.inner(), &state, &plain, &SaveOptions::default()).unwrap();
    let ops = streams::stream(3, REQUESTS, KEYS, 1);
    // First cold restore: no working set in the file; its first run is recorded.
    let r = restore(&frames, std::slice::from_ref(&plain)).unwrap();
    assert_eq!(r.prefetched, 0);
    r.guest.vmar().set_recording(true);
    let mut first = KvStore::resume(r.guest);
    let mut m1 = model.clone();
    streams::serve_checked(&mut first, &mut m1, &ops, 3).unwrap();
    let first_faults = demand_faults(first.inner());
    let set = first.inner().vmar().recorded();
    drop(first);
    assert!(first_faults >= 20, "a cold run faults: {first_faults}");
    // The same memory saved again, now carrying that first run's working set.
    let with_ws = dir.file("ws.gms");
    let opts = SaveOptions {
        working_set: Some(set.clone()),
        ..SaveOptions::default()
    };
    let st = snapshot::save(kv.inner(), &state, &with_ws, &opts).unwrap();
    assert_eq!(st.working_set_pages, set.len() as u64);
    // Second cold restore (a fresh guest, nothing installed): the set is prefetched first.
    let r = restore(&frames, std::slice::from_ref(&with_ws)).unwrap();
    assert_prefetched(r.prefetched, &set);
    let mut second = KvStore::resume(r.guest);
    let mut m2 = model.clone();
    streams::serve_checked(&mut second, &mut m2, &ops, 3).unwrap();
    let second_faults = demand_faults(second.inner());
    streams::check_table(&mut second, &m2, "prefetched restore").unwrap();
    eprintln!(
        "demand faults: first cold restore {first_faults}, second (working set of {} pages \
         prefetched) {second_faults}",
        set.len()
    );
    assert!(
        second_faults * 10 <= first_faults,
        "second cold restore took {second_faults} demand faults, the first {first_faults}"
    );
    // The restored guest still resets to the file's memory (prefetched writes included).
    let mut g = second.into_inner();
    g.reset(&state).unwrap();
    let mut kv2 = KvStore::resume(g);
    streams::check_table(&mut kv2, &model, "reset after prefetch").unwrap();
    // A corrupt working-set section is refused before any VM; a set naming pages outside the
    // guest cannot be saved.
    let h = header_of(&with_ws);
    let ws = h.working_set.expect("working-set section");
    let bad = dir.file("bad-ws.gms");
    std::fs::copy(&with_ws, &bad).unwrap();
    flip(&bad, ws.offset + ws.length / 2);
    match snapshot::SnapshotFile::open(&bad).map(drop) {
        Err(SnapshotError::SectionChecksum { section, .. }) => assert_eq!(section, "working-set"),
        other => panic!("{other:?}"),
    }
    let mut outside = vmo::WorkingSet::default();
    outside.note(kv.inner().mem_size(), 1, false);
    let opts = SaveOptions {
        working_set: Some(outside),
        ..SaveOptions::default()
    };
    let e = snapshot::save(kv.inner(), &state, &dir.file("out.gms"), &opts).unwrap_err();
    assert!(matches!(e, SnapshotError::Unsupported(_)), "{e}");
}

/// Rewrites `path`'s header through `f`, with a valid CRC and identity.
fn rewrite_header(path: &Path, f: impl FnOnce(&mut Header)) {
    let mut bytes = std::fs::read(path).unwrap();
    let mut hb = [0u8; HEADER_LEN];
    hb.copy_from_slice(&bytes[..HEADER_LEN]);
    let mut h = Header::decode(&hb).unwrap();
    let idx = h.section(SectionKind::PageIndex);
    let index = bytes[idx.offset as usize..idx.end() as usize].to_vec();
    f(&mut h);
    h.identity = h.compute_identity(&index);
    bytes[..HEADER_LEN].copy_from_slice(&h.encode(true));
    std::fs::write(path, bytes).unwrap();
}

fn flip(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

fn header_of(path: &Path) -> Header {
    let bytes = std::fs::read(path).unwrap();
    let mut hb = [0u8; HEADER_LEN];
    hb.copy_from_slice(&bytes[..HEADER_LEN]);
    Header::decode(&hb).unwrap()
}

#[test]
fn bad_files_are_typed_errors_before_any_vm_or_a_stopped_guest() {
    require_kvm!();
    let dir = TempDir::new("bad");
    let good = dir.file("good.gms");
    let frames = frames();
    save_filled(&frames, &good);
    let h = header_of(&good);
    let copy = |name: &str| {
        let p = dir.file(name);
        std::fs::copy(&good, &p).unwrap();
        p
    };
    let open = |p: &Path| snapshot::SnapshotFile::open(p).map(drop);
    // Truncated: inside the header, and inside the pages.
    let p = copy("short-header.gms");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(100)
        .unwrap();
    assert!(matches!(
        open(&p),
        Err(SnapshotError::Truncated { what: "header", .. })
    ));
    let p = copy("short.gms");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 5000)
        .unwrap();
    let e = open(&p).unwrap_err();
    assert!(matches!(e, SnapshotError::Truncated { .. }), "{e}");
    // A flipped byte: header, index, layout, vCPU.
    let p = copy("hdr.gms");
    flip(&p, 33);
    assert!(matches!(
        open(&p),
        Err(SnapshotError::HeaderChecksum { .. })
    ));
    let p = copy("magic.gms");
    flip(&p, 1);
    assert!(matches!(open(&p), Err(SnapshotError::BadMagic { .. })));
    for (kind, name) in [
        (SectionKind::IndexChunks, "index-chunks"),
        (SectionKind::Layout, "layout"),
        (SectionKind::Vcpu, "vcpu"),
    ] {
        let p = copy(&format!("{name}.gms"));
        flip(&p, h.section(kind).offset + h.section(kind).length / 2);
        match open(&p) {
            Err(SnapshotError::SectionChecksum { section, .. }) => assert_eq!(section, name),
            other => panic!("{name}: {:?}", other.map(|_| ())),
        }
    }
    // A flipped byte in the page index of a 1.2 file: its chunk is checked on first use, so
    // the open succeeds; `--verify` (the whole section's CRC) and any lookup in that chunk are
    // typed errors. (A 1.0 / 1.1 file's index is checked at open: the fixtures' tests.)
    let p = copy("page-index.gms");
    let s = h.section(SectionKind::PageIndex);
    flip(&p, s.offset + s.length / 2);
    let f = snapshot::SnapshotFile::open(&p).unwrap();
    match f.verify_pages() {
        Err(SnapshotError::SectionChecksum { section, .. }) => assert_eq!(section, "page-index"),
        other => panic!("page-index verify: {other:?}"),
    }
    let lookups: Vec<_> = (0..h.mem_size / PAGE_SIZE).map(|p| f.slot(0, p)).collect();
    assert!(
        lookups
            .iter()
            .any(|r| matches!(r, Err(SnapshotError::IndexChunkChecksum { .. }))),
        "no lookup met the flipped chunk"
    );
    // Restored anyway, the guest stops at the first page read that meets it, with the report.
    drop(f);
    let r = restore(&frames, std::slice::from_ref(&p)).unwrap();
    let chain = r.chain.clone();
    let mut kv = KvStore::resume(r.guest);
    assert!(kv.get(FILL_FIRST).is_err());
    let failures = chain.take_failures();
    assert!(
        failures
            .iter()
            .any(|e| matches!(e, SnapshotError::IndexChunkChecksum { .. })),
        "{failures:?}"
    );
    // Page-count / size mismatch (consistent CRCs, one page missing from the page section).
    let p = copy("count.gms");
    rewrite_header(&p, |h| {
        let mut s = h.section(SectionKind::Pages);
        s.length -= PAGE_SIZE;
        h.set_section(SectionKind::Pages, s);
    });
    assert!(matches!(
        open(&p),
        Err(SnapshotError::PageCountMismatch { .. })
    ));
    // Unknown major: the error names both versions.
    let p = copy("major.gms");
    rewrite_header(&p, |h| h.major = 7);
    let e = open(&p).unwrap_err();
    assert!(matches!(
        e,
        SnapshotError::UnsupportedVersion {
            found_major: 7,
            supported_major: 1,
            ..
        }
    ));
    assert!(
        e.to_string()
            .contains(&format!("7.{}", snapshot::FORMAT_MINOR))
            && e.to_string().contains("1.x"),
        "{e}"
    );
    // Not a regular file.
    for p in [dir.0.clone(), PathBuf::from("/dev/null")] {
        let e = open(&p).unwrap_err();
        assert!(matches!(e, SnapshotError::NotRegularFile { .. }), "{e}");
    }
    let e = open(&dir.file("absent.gms")).unwrap_err();
    assert!(matches!(e, SnapshotError::Io { what: "stat", .. }), "{e}");
}

#[test]
fn a_corrupt_or_changed_page_stops_the_guest_with_a_report() {
    require_kvm!();
    let dir = TempDir::new("page");
    let good = dir.file("good.gms");
    let frames = frames();
    save_filled(&frames, &good);
    let h = header_of(&good);
    let pages = h.section(SectionKind::Pages);
    let p = dir.file("page.gms");
    std::fs::copy(&good, &p).unwrap();
    // Flip a byte in every stored page: whatever the guest touches first is corrupt.
    let mut bytes = std::fs::read(&p).unwrap();
    for off in (pages.offset..pages.end()).step_by(PAGE_SIZE as usize) {
        bytes[off as usize + 17] ^= 1;
    }
    std::fs::write(&p, bytes).unwrap();
    // Checked up front with --verify.
    let verify = RestoreOptions {
        verify: true,
        ..RestoreOptions::default()
    };
    let e = snapshot::restore(&frames, std::slice::from_ref(&p), verify)
        .map(drop)
        .unwrap_err();
    assert!(matches!(e, SnapshotError::PageChecksum { .. }), "{e}");
    // Lazily: the restore succeeds, the guest stops at the first read, the host goes on.
    let r = restore(&frames, std::slice::from_ref(&p)).unwrap();
    let chain = r.chain.clone();
    let mut kv = KvStore::resume(r.guest);
    // The first touch is the VMM's own (the request into the mailbox) or the guest's: either
    // the access fails or the guest is stopped by the refused fault.
    let e = kv.get(FILL_FIRST).unwrap_err();
    assert!(
        kv.vm().stopped_by().is_some() || matches!(e, guest_vm::Error::Vmo(vmo::Error::Io)),
        "{e}"
    );
    let failures = chain.take_failures();
    assert!(
        matches!(failures.first(), Some(SnapshotError::PageChecksum { .. })),
        "{failures:?}"
    );
    // A file changed while restored: the next page read refuses it.
    let p2 = dir.file("changing.gms");
    std::fs::copy(&good, &p2).unwrap();
    let r = restore(&frames, std::slice::from_ref(&p2)).unwrap();
    let chain = r.chain.clone();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let f = std::fs::OpenOptions::new().append(true).open(&p2).unwrap();
    std::io::Write::write_all(&mut &f, b"x").unwrap();
    drop(f);
    let mut kv = KvStore::resume(r.guest);
    assert!(kv.get(FILL_FIRST).is_err());
    let failures = chain.take_failures();
    assert!(
        matches!(failures.first(), Some(SnapshotError::FileChanged { .. })),
        "{failures:?}"
    );
    // Another guest of the same host keeps working.
    let r = restore(&frames, std::slice::from_ref(&good)).unwrap();
    let mut kv = KvStore::resume(r.guest);
    assert_eq!(
        kv.get(FILL_FIRST).unwrap().as_deref(),
        Some(&fill_value(FILL_FIRST)[..])
    );
}

#[test]
fn save_onto_a_full_disk_is_no_space_and_leaves_no_file() {
    require_kvm!();
    let dir = TempDir::new("full");
    let mnt = dir.file("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "mounting a tiny tmpfs (needs root)");
    let frames = frames();
    let mut kv = KvStore::boot(Guest::new(&frames, memory_for(BUCKETS)).unwrap(), BUCKETS).unwrap();
    kv.fill(FILL_FIRST, KEYS).unwrap();
    let state = kv.inner().snapshot().unwrap();
    let target = mnt.join("kv.gms");
    let e = snapshot::save(kv.inner(), &state, &target, &SaveOptions::default()).unwrap_err();
    let left: Vec<_> = std::fs::read_dir(&mnt).unwrap().collect();
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    assert!(matches!(e, SnapshotError::NoSpace { .. }), "{e}");
    assert!(left.is_empty(), "no partial file: {left:?}");
    // Saving onto a directory is refused.
    let e = snapshot::save(kv.inner(), &state, &dir.0, &SaveOptions::default()).unwrap_err();
    assert!(matches!(e, SnapshotError::NotRegularFile { .. }), "{e}");
}
