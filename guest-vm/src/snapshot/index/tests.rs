//! Unit tests of the page index: lookups in both modes against hand-built indexes (zero
//! entries between data, across ordinal blocks and chunks), and every malformed input as a
//! typed error — checksums before entry checks, a bad chunk at each of its lookups.

use super::chunks::{ChunkTable, CHUNK_ENTRIES, CHUNK_RECORD, TABLE_HEAD};
use super::*;
use crate::snapshot::format::Header;
use crate::snapshot::sections::{MappingDesc, VmoDesc};
use std::io::Write;

fn layout(vmo_pages: &[u64]) -> LayoutSection {
    LayoutSection {
        mem_size: vmo_pages.iter().sum::<u64>() * PAGE,
        vmos: vmo_pages
            .iter()
            .map(|p| VmoDesc { size: p * PAGE })
            .collect(),
        mappings: Vec::<MappingDesc>::new(),
    }
}

fn entries(list: &[(u32, u64, bool)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, &(vmo, page, zero)) in list.iter().enumerate() {
        IndexEntry {
            vmo,
            flags: if zero { ENTRY_ZERO } else { 0 },
            page,
            hash: 1000 + i as u64,
        }
        .encode(&mut v);
    }
    v
}

/// Loads `bytes` as a whole index at file offset 0, CRC correct unless `crc` is given.
fn load(bytes: &[u8], crc: Option<u32>) -> SnapResult<PageIndex> {
    let path = std::env::temp_dir().join(format!(
        "gm-index-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(bytes))
        .expect("write test index");
    let file = std::fs::File::open(&path).expect("open test index");
    let s = Section {
        offset: 0,
        length: bytes.len() as u64,
        crc32: crc.unwrap_or_else(|| crc32fast::hash(bytes)),
    };
    let h = Header::new(1 << 20, None).identity_hasher();
    let r = PageIndex::load(&file, &path, s, h, 1 << 20);
    let _ = std::fs::remove_file(&path);
    r.map(|(i, _)| i)
}

/// The same index in chunked mode, its chunks read from `bytes`.
fn chunked(bytes: &[u8]) -> SnapResult<PageIndex> {
    let s = Section {
        offset: 0,
        length: bytes.len() as u64,
        crc32: crc32fast::hash(bytes),
    };
    PageIndex::chunked(&ChunkTable::encode(bytes), s, 1 << 20)
}

fn reader(bytes: &[u8]) -> impl Fn(u64, &mut [u8]) -> SnapResult<()> + '_ {
    move |o, b| {
        b.copy_from_slice(&bytes[o as usize..o as usize + b.len()]);
        Ok(())
    }
}

#[test]
fn lookups_decode_on_demand_with_zero_entries_between_data_in_both_modes() {
    let mut list = vec![(0, 3, false), (0, 5, true), (0, 9, false)];
    // Enough entries that ordinals cross blocks and chunks.
    list.extend((0..9000).map(|p| (1, p * 2, p % 3 == 0)));
    let bytes = entries(&list);
    let read = reader(&bytes);
    let l = layout(&[16, 20000]);
    let mut whole = load(&bytes, None).unwrap();
    whole.check_layout(&l).unwrap();
    let mut lazy = chunked(&bytes).unwrap();
    lazy.check_layout(&l).unwrap();
    assert!(lazy.is_chunked() && !whole.is_chunked());
    let base = 1 << 20;
    for ix in [&whole, &lazy] {
        assert_eq!(ix.data_pages + ix.zero_pages, list.len() as u64);
        assert_eq!(
            ix.slot(0, 3, &read).unwrap(),
            Some(Slot::Data {
                offset: base,
                hash: 1000
            })
        );
        assert_eq!(ix.slot(0, 5, &read).unwrap(), Some(Slot::Zero));
        assert_eq!(ix.slot(0, 4, &read).unwrap(), None);
        assert_eq!(ix.slot(2, 0, &read).unwrap(), None);
        // Entry 3 + p is (1, 2p); the data before it: 2 in vmo 0, plus p - ceil(p / 3).
        for p in [0u64, 500, 4093, 4094, 8999] {
            let k = 2 + p - p.div_ceil(3);
            let want = match p % 3 {
                0 => Slot::Zero,
                _ => Slot::Data {
                    offset: base + k * PAGE,
                    hash: 1003 + p,
                },
            };
            assert_eq!(ix.slot(1, 2 * p, &read).unwrap(), Some(want), "page {p}");
        }
        let all = ix.pages_of(1, &read).unwrap();
        assert_eq!(all.len(), 9000);
        assert!(all
            .iter()
            .all(|&(pg, s)| ix.slot(1, pg, &read).unwrap() == Some(s)));
        // Pages [2, 10) of vmo 0: the data entries 3 and 9, back to back in the file.
        assert_eq!(ix.data_run(0, 2, 10, &read).unwrap(), Some((base, 2)));
        assert_eq!(ix.data_run(0, 5, 6, &read).unwrap(), None);
    }
}

#[test]
fn malformed_entries_are_typed_errors_and_checksums_come_first() {
    let sorted = entries(&[(0, 1, false), (0, 2, false)]);
    let unsorted = entries(&[(0, 2, false), (0, 1, false)]);
    assert!(matches!(
        load(&unsorted, None),
        Err(SnapshotError::BadIndexEntry { entry: 1, .. })
    ));
    assert!(matches!(
        load(&unsorted, Some(7)),
        Err(SnapshotError::SectionChecksum { .. })
    ));
    let mut flags = sorted.clone();
    flags[4] = 2;
    assert!(matches!(
        load(&flags, None),
        Err(SnapshotError::BadIndexEntry { entry: 0, .. })
    ));
    assert!(matches!(
        load(&sorted[..30], None),
        Err(SnapshotError::Malformed { .. })
    ));
    let mut ix = load(&sorted, None).unwrap();
    assert!(matches!(
        ix.check_layout(&layout(&[2])),
        Err(SnapshotError::BadIndexEntry { entry: 1, .. })
    ));
    let mut ix = load(&entries(&[(0, 1, false), (3, 0, false)]), None).unwrap();
    assert!(matches!(
        ix.check_layout(&layout(&[2])),
        Err(SnapshotError::BadIndexEntry { entry: 1, .. })
    ));
}

#[test]
fn a_bad_chunk_is_a_typed_error_at_its_first_lookup() {
    let list: Vec<_> = (0..5000).map(|p| (0, p, false)).collect();
    let good = entries(&list);
    let l = layout(&[5000]);
    // A flipped byte in chunk 1: chunk 0 still serves, chunk 1 fails its CRC every time.
    let mut ix = chunked(&good).unwrap();
    ix.check_layout(&l).unwrap();
    let mut flipped = good.clone();
    flipped[CHUNK_ENTRIES * INDEX_ENTRY_LEN + 100] ^= 0x5a;
    let read = reader(&flipped);
    assert!(ix.slot(0, 10, &read).unwrap().is_some());
    for _ in 0..2 {
        assert!(matches!(
            ix.slot(0, 4500, &read),
            Err(SnapshotError::IndexChunkChecksum { chunk: 1, .. })
        ));
    }
    // Well-checksummed but wrong entries: a page past its Vmo, a table that lies.
    let mut ix = chunked(&good).unwrap();
    ix.check_layout(&layout(&[4500])).unwrap();
    let read = reader(&good);
    assert!(matches!(
        ix.slot(0, 4200, &read),
        Err(SnapshotError::BadIndexEntry { .. })
    ));
    let s = Section {
        offset: 0,
        length: good.len() as u64,
        crc32: 0,
    };
    let mut table = ChunkTable::encode(&good);
    table[8] ^= 1; // the data count
    assert!(matches!(
        PageIndex::chunked(&table, s, 0),
        Err(SnapshotError::Malformed { .. })
    ));
    let mut table = ChunkTable::encode(&good);
    table[TABLE_HEAD + CHUNK_RECORD + 8] ^= 1; // chunk 1's first page
    let mut ix = PageIndex::chunked(&table, s, 0).unwrap();
    ix.check_layout(&l).unwrap();
    assert!(matches!(
        ix.slot(0, 4500, &read),
        Err(SnapshotError::BadIndexEntry { .. })
    ));
}
