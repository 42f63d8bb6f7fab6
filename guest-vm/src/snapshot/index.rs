//! `PageIndex`: the page-index section of one open snapshot file, kept as its checked raw bytes
//! and decoded entry by entry on demand — nothing per stored page is built, so opening a file
//! costs one pass over its index and no allocation that grows with the guest beyond the bytes.
//!
//! `load` reads the section in pieces of about 1 MiB and, in the same pass over each piece
//! while it is in cache, feeds the section's CRC-32 and the file identity (xxh3-128 of the
//! header, then the index) and checks each entry: known flags, (Vmo, page) strictly increasing.
//! A violation is only reported once the CRC has matched (a damaged section is a
//! `SectionChecksum`, a well-checksummed but malformed one a `BadIndexEntry`): no decision is
//! taken on bytes whose checksum has not been verified. Because the entries are sorted, the
//! layout checks (Vmo known, page inside it) need only the last entry of each Vmo's stretch
//! (`check_layout`, after the layout section is parsed).
//!
//! Lookups binary-search a Vmo's stretch of entries in the raw bytes. A stored page's file
//! offset is `pages_at + k × 4096` for the k-th data entry: with no zero entries (every full
//! save) k is the entry's position; otherwise the data entries before every block of
//! `BLOCK` entries are counted once at load (8 bytes per 256 entries) and k is found with at
//! most `BLOCK - 1` flag reads.
//!
//! Invariants once `load` and `check_layout` succeeded: `bytes` is the section exactly as its
//! CRC and the file identity cover it; every entry has known flags, is in strictly increasing
//! (Vmo, page) order, names a layout Vmo and a page inside it; `by_vmo[v]` is the range of
//! Vmo `v`'s entries; `data_before[b]` counts the data entries before entry `b × BLOCK`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::error::{SnapResult, SnapshotError};
use super::format::{Identity, IndexEntry, Section, ENTRY_ZERO, INDEX_ENTRY_LEN, PAGE};
use super::sections::LayoutSection;

/// Entries per block of the data-ordinal table.
const BLOCK: usize = 256;
/// Entries per read (and per checking piece): just under 1 MiB.
const PIECE_ENTRIES: usize = (1 << 20) / INDEX_ENTRY_LEN;

/// Where a page of one Vmo is in one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Stored at this file offset with this hash.
    Data { offset: u64, hash: u64 },
    /// Recorded as all zeros.
    Zero,
}

/// The checked page index of one file (module documentation).
pub struct PageIndex {
    bytes: Vec<u8>,
    /// Per layout Vmo: its entries `[start, end)`.
    by_vmo: Vec<(usize, usize)>,
    /// Per stretch of one Vmo as found by `load`: (vmo, start, end); consumed by `check_layout`.
    stretches: Vec<(u32, usize, usize)>,
    data_before: Vec<u64>,
    pages_at: u64,
    pub data_pages: u64,
    pub zero_pages: u64,
}

fn bad(entry: usize, detail: String) -> SnapshotError {
    SnapshotError::BadIndexEntry {
        entry: entry as u64,
        detail,
    }
}

impl PageIndex {
    /// Reads and checks the index section `s` of `file` (module documentation); `identity`
    /// is the identity hasher already fed with the header. Returns the index and the identity
    /// computed over header + index.
    pub fn load(
        file: &File,
        path: &Path,
        s: Section,
        mut identity: xxhash_rust::xxh3::Xxh3,
        pages_at: u64,
    ) -> SnapResult<(PageIndex, Identity)> {
        let len = usize::try_from(s.length).map_err(|_| SnapshotError::Malformed {
            section: "page-index",
            detail: format!("{} bytes", s.length),
        })?;
        let mut bytes = vec![0u8; len];
        let mut crc = crc32fast::Hasher::new();
        let mut violation: Option<SnapshotError> = None;
        if !len.is_multiple_of(INDEX_ENTRY_LEN) {
            violation = Some(SnapshotError::Malformed {
                section: "page-index",
                detail: format!("{len} bytes is not a whole number of entries"),
            });
        }
        let (mut data, mut zeros) = (0u64, 0u64);
        let mut data_before = Vec::with_capacity(len / INDEX_ENTRY_LEN / BLOCK + 1);
        let mut stretches: Vec<(u32, usize, usize)> = Vec::new();
        let mut prev: Option<(u32, u64)> = None;
        let piece = PIECE_ENTRIES * INDEX_ENTRY_LEN;
        let mut at = 0;
        while at < len {
            let end = (at + piece).min(len);
            file.read_exact_at(&mut bytes[at..end], s.offset + at as u64)
                .map_err(|e| SnapshotError::io("read", path, e))?;
            let chunk = &bytes[at..end];
            crc.update(chunk);
            identity.update(chunk);
            let first = at / INDEX_ENTRY_LEN;
            for (j, raw) in chunk.chunks_exact(INDEX_ENTRY_LEN).enumerate() {
                let i = first + j;
                if i.is_multiple_of(BLOCK) {
                    data_before.push(data);
                }
                let e = IndexEntry::decode(raw);
                if violation.is_none() {
                    if e.flags & !ENTRY_ZERO != 0 {
                        violation = Some(bad(i, format!("unknown flags {:#x}", e.flags)));
                    } else if prev.is_some_and(|p| p >= (e.vmo, e.page)) {
                        violation = Some(bad(i, "out of order or duplicated".into()));
                    }
                }
                if prev.is_none_or(|(v, _)| v != e.vmo) {
                    stretches.push((e.vmo, i, i + 1));
                } else if let Some(last) = stretches.last_mut() {
                    last.2 = i + 1;
                }
                prev = Some((e.vmo, e.page));
                if e.is_zero() {
                    zeros += 1;
                } else {
                    data += 1;
                }
            }
            at = end;
        }
        let computed = crc.finalize();
        if computed != s.crc32 {
            return Err(SnapshotError::SectionChecksum {
                section: "page-index",
                stored: s.crc32,
                computed,
            });
        }
        let identity = Identity(identity.digest128().to_le_bytes());
        if let Some(v) = violation {
            return Err(v);
        }
        Ok((
            PageIndex {
                bytes,
                by_vmo: Vec::new(),
                stretches,
                data_before,
                pages_at,
                data_pages: data,
                zero_pages: zeros,
            },
            identity,
        ))
    }

    /// Checks the entries against the parsed layout (every Vmo known, every page inside its
    /// Vmo: with sorted entries, the last of each Vmo's stretch) and builds the per-Vmo ranges.
    pub fn check_layout(&mut self, layout: &LayoutSection) -> SnapResult<()> {
        let mut by_vmo = vec![(0, 0); layout.vmos.len()];
        for &(vmo, start, end) in &self.stretches {
            let Some(desc) = layout.vmos.get(vmo as usize) else {
                return Err(bad(start, format!("vmo {vmo} of {}", layout.vmos.len())));
            };
            let last = self.entry(end - 1);
            if last.page >= desc.size / PAGE {
                return Err(bad(
                    end - 1,
                    format!(
                        "page {} past the end of vmo {vmo} ({} pages)",
                        last.page,
                        desc.size / PAGE
                    ),
                ));
            }
            by_vmo[vmo as usize] = (start, end);
        }
        self.stretches = Vec::new();
        self.by_vmo = by_vmo;
        Ok(())
    }

    fn entry(&self, i: usize) -> IndexEntry {
        IndexEntry::decode(&self.bytes[i * INDEX_ENTRY_LEN..(i + 1) * INDEX_ENTRY_LEN])
    }

    fn page_at(&self, i: usize) -> u64 {
        let at = i * INDEX_ENTRY_LEN + 8;
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bytes[at..at + 8]);
        u64::from_le_bytes(b)
    }

    /// The number of data entries before entry `i`.
    fn ordinal(&self, i: usize) -> u64 {
        if self.zero_pages == 0 {
            return i as u64;
        }
        let b = i / BLOCK;
        let before = (b * BLOCK..i).filter(|&j| !self.entry(j).is_zero()).count();
        self.data_before[b] + before as u64
    }

    fn slot_of(&self, e: IndexEntry, ordinal: u64) -> Slot {
        if e.is_zero() {
            Slot::Zero
        } else {
            Slot::Data {
                offset: self.pages_at + ordinal * PAGE,
                hash: e.hash,
            }
        }
    }

    /// The position of the first entry of Vmo `vmo` with a page ≥ `page` (its stretch's end
    /// if none), and whether that entry is `page` itself.
    fn lower_bound(&self, vmo: u32, page: u64) -> Option<(usize, bool)> {
        let &(start, end) = self.by_vmo.get(vmo as usize)?;
        let (mut lo, mut hi) = (start, end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.page_at(mid) < page {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Some((lo, lo < end && self.page_at(lo) == page))
    }

    /// Where page `page` of Vmo `vmo` is, if the index has it.
    pub fn slot(&self, vmo: u32, page: u64) -> Option<Slot> {
        let (i, hit) = self.lower_bound(vmo, page)?;
        hit.then(|| self.slot_of(self.entry(i), self.ordinal(i)))
    }

    /// Every (page, slot) of Vmo `vmo`, by page.
    pub fn pages_of(&self, vmo: u32) -> impl Iterator<Item = (u64, Slot)> + '_ {
        let (start, end) = self.by_vmo.get(vmo as usize).copied().unwrap_or((0, 0));
        let first = if start < end { self.ordinal(start) } else { 0 };
        (start..end).scan(first, move |k, i| {
            let e = self.entry(i);
            let slot = self.slot_of(e, *k);
            *k += u64::from(!e.is_zero());
            Some((e.page, slot))
        })
    }

    /// The stored pages of Vmo `vmo` among pages `[first, end)`: they lie back to back in the
    /// file, so they are one byte range — `(file offset, pages)`, or `None` if there are none.
    pub fn data_run(&self, vmo: u32, first: u64, end: u64) -> Option<(u64, u64)> {
        let (a, _) = self.lower_bound(vmo, first)?;
        let (b, _) = self.lower_bound(vmo, end)?;
        let k = self.ordinal(a);
        let n = if self.zero_pages == 0 {
            (b - a) as u64
        } else {
            (a..b).filter(|&j| !self.entry(j).is_zero()).count() as u64
        };
        (n > 0).then(|| (self.pages_at + k * PAGE, n))
    }
}

#[cfg(test)]
mod tests {
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

    /// Loads `bytes` as an index at file offset 0, CRC correct unless `crc` is given.
    fn load(bytes: &[u8], crc: Option<u32>) -> SnapResult<PageIndex> {
        let path = std::env::temp_dir().join(format!(
            "gm-index-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(bytes))
            .expect("write test index");
        let file = File::open(&path).expect("open test index");
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

    #[test]
    fn lookups_decode_on_demand_with_zero_entries_between_data() {
        let mut list = vec![(0, 3, false), (0, 5, true), (0, 9, false)];
        // Enough entries that ordinals cross blocks.
        list.extend((0..600).map(|p| (1, p * 2, p % 3 == 0)));
        let mut ix = load(&entries(&list), None).unwrap();
        ix.check_layout(&layout(&[16, 2000])).unwrap();
        let base = 1 << 20;
        assert_eq!(
            ix.slot(0, 3),
            Some(Slot::Data {
                offset: base,
                hash: 1000
            })
        );
        assert_eq!(ix.slot(0, 5), Some(Slot::Zero));
        assert_eq!(ix.slot(0, 4), None);
        assert_eq!(ix.slot(2, 0), None);
        // Entry 3 + p is (1, 2p); the data before it: 2 in vmo 0, plus p - ceil(p / 3).
        let p = 500u64;
        let k = 2 + p - p.div_ceil(3);
        assert_eq!(
            ix.slot(1, 2 * p),
            Some(Slot::Data {
                offset: base + k * PAGE,
                hash: 1003 + p
            })
        );
        let all: Vec<_> = ix.pages_of(1).collect();
        assert_eq!(all.len(), 600);
        assert!(all.iter().all(|&(pg, s)| ix.slot(1, pg) == Some(s)));
        assert_eq!(ix.data_pages + ix.zero_pages, list.len() as u64);
        // Pages [2, 10) of vmo 0: the data entries 3 and 9, back to back in the file.
        assert_eq!(ix.data_run(0, 2, 10), Some((base, 2)));
        assert_eq!(ix.data_run(0, 5, 6), None);
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
}
