//! `PageIndex`: the page-index section of one open snapshot file, decoded entry by entry on
//! demand — nothing per stored page is built — in one of two modes:
//!
//! - **Whole** (files of format 1.0 / 1.1, which have no chunk table): `load` reads the
//!   section in pieces of about 1 MiB and, in the same pass over each piece while it is in
//!   cache, feeds the section's CRC-32 and the file identity (xxh3-128 of the header, then the
//!   index) and checks each entry (known flags, (Vmo, page) strictly increasing). A violation
//!   is only reported once the CRC has matched: no decision is taken on unverified bytes. The
//!   bytes are kept; with no zero entries the k-th entry is the k-th stored page, otherwise the
//!   data entries before every block of `BLOCK` entries are counted once (8 bytes per 256).
//! - **Chunked** (format 1.2: the file has an index-chunks section, `ChunkTable`): `open`
//!   reads and checks only that table — CRC, then its counts against the index section and the
//!   page section, first keys strictly increasing — so the open costs the same at every guest
//!   size. A chunk of `CHUNK_ENTRIES` entries is read (one `pread`, after the file's
//!   change check) on its first lookup, checked against its own CRC-32
//!   (`IndexChunkChecksum`), then entry by entry — known flags, strictly increasing, first key
//!   and data count as the table says, last key below the next chunk's first key, Vmo and page
//!   inside the layout (`BadIndexEntry`) — and kept. The whole-section CRC and the identity
//!   are still written (so a 1.1 reader reads a 1.2 file) and checked by `verify_all`
//!   (`--verify`), not at open: the header CRC covers the recorded identity, the chunk CRCs
//!   the index it names. A corrupt chunk found while the guest runs fails that page read: the
//!   guest stops with the typed error in `Chain::failures`.
//!
//! Children: [`chunks`] — the 1.2 chunk table (`ChunkTable`, encode / decode) and the checks
//! of one chunk's entries; `tests` — the unit tests of both modes.
//!
//! Layout checks in whole mode (Vmo known, page inside it) need only the last entry of each
//! Vmo's stretch (`check_layout`), because the entries are sorted.
//!
//! Invariants: a lookup only decodes bytes that passed their checksum and the entry checks
//! (the whole section's in whole mode, the chunk's in chunked mode); in whole mode `by_vmo[v]`
//! is the range of Vmo `v`'s entries and `data_before[b]` counts the data entries before entry
//! `b × BLOCK`; in chunked mode a chunk's `data_before` counts the data entries before it, and
//! the table's counts add up to the index and page sections (checked at open).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::OnceLock;

use super::error::{SnapResult, SnapshotError};
use super::format::{
    u32_at, u64_at, Identity, IndexEntry, Section, ENTRY_ZERO, INDEX_ENTRY_LEN, PAGE,
};
use super::sections::LayoutSection;

mod chunks;
use chunks::{check_chunk, Chunk};
pub use chunks::{ChunkTable, CHUNK_ENTRIES};

/// Entries per block of the data-ordinal table (whole mode).
const BLOCK: usize = 256;
/// Entries per read (and per checking piece) in whole mode: just under 1 MiB.
const PIECE_ENTRIES: usize = (1 << 20) / INDEX_ENTRY_LEN;
/// Where a page of one Vmo is in one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Stored at this file offset with this hash.
    Data { offset: u64, hash: u64 },
    /// Recorded as all zeros.
    Zero,
}

enum Mode {
    /// The whole section in memory (module documentation).
    Whole {
        bytes: Vec<u8>,
        by_vmo: Vec<(usize, usize)>,
        data_before: Vec<u64>,
    },
    /// Chunks read and checked on first use.
    Chunked {
        offset: u64,
        chunks: Vec<Chunk>,
        loaded: Vec<OnceLock<Box<[u8]>>>,
        /// Pages per layout Vmo (for the entry checks).
        vmo_pages: Vec<u64>,
    },
}

/// Reads file bytes for a lazily loaded chunk (the file's change check included).
pub type ReadAt<'a> = &'a dyn Fn(u64, &mut [u8]) -> SnapResult<()>;

/// The checked page index of one file (module documentation).
pub struct PageIndex {
    mode: Mode,
    /// Per stretch of one Vmo as found by a whole `load`: (vmo, start, end); consumed by
    /// `check_layout`.
    stretches: Vec<(u32, usize, usize)>,
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

fn entry_in(bytes: &[u8], i: usize) -> IndexEntry {
    IndexEntry::decode(&bytes[i * INDEX_ENTRY_LEN..(i + 1) * INDEX_ENTRY_LEN])
}

fn key_in(bytes: &[u8], i: usize) -> (u32, u64) {
    let at = i * INDEX_ENTRY_LEN;
    (u32_at(bytes, at), u64_at(bytes, at + 8))
}

/// The first position in `bytes[lo..hi)` (sorted entries) whose key is ≥ `key`.
fn lower_bound_in(bytes: &[u8], mut lo: usize, mut hi: usize, key: (u32, u64)) -> usize {
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if key_in(bytes, mid) < key {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

impl PageIndex {
    /// Reads and checks a whole index section `s` of `file` (module documentation);
    /// `identity` is the identity hasher already fed with the header. Returns the index and
    /// the identity computed over header + index.
    pub fn load(
        file: &std::fs::File,
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
        if let Some(v) = violation {
            return Err(v);
        }
        let identity = Identity(identity.digest128().to_le_bytes());
        let mode = Mode::Whole {
            bytes,
            by_vmo: Vec::new(),
            data_before,
        };
        Ok((
            PageIndex {
                mode,
                stretches,
                pages_at,
                data_pages: data,
                zero_pages: zeros,
            },
            identity,
        ))
    }

    /// A chunked index (format 1.2) over index section `s`, from its chunk table's bytes
    /// (their section CRC already matched). Reads nothing else.
    pub fn chunked(table: &[u8], s: Section, pages_at: u64) -> SnapResult<PageIndex> {
        let (chunks, data, zeros) = ChunkTable::decode(table, s.length)?;
        let loaded = (0..chunks.len()).map(|_| OnceLock::new()).collect();
        Ok(PageIndex {
            mode: Mode::Chunked {
                offset: s.offset,
                chunks,
                loaded,
                vmo_pages: Vec::new(),
            },
            stretches: Vec::new(),
            pages_at,
            data_pages: data,
            zero_pages: zeros,
        })
    }

    /// Whether entries are checked chunk by chunk on first use (format 1.2).
    pub fn is_chunked(&self) -> bool {
        matches!(self.mode, Mode::Chunked { .. })
    }

    /// Checks the entries against the parsed layout (whole mode: every Vmo known, every page
    /// inside its Vmo — with sorted entries, the last of each Vmo's stretch — and builds the
    /// per-Vmo ranges; chunked mode: keeps the Vmo sizes for the chunk checks).
    pub fn check_layout(&mut self, layout: &LayoutSection) -> SnapResult<()> {
        let stretches = std::mem::take(&mut self.stretches);
        match &mut self.mode {
            Mode::Chunked { vmo_pages, .. } => {
                *vmo_pages = layout.vmos.iter().map(|v| v.size / PAGE).collect();
            }
            Mode::Whole { bytes, by_vmo, .. } => {
                let mut ranges = vec![(0, 0); layout.vmos.len()];
                for (vmo, start, end) in stretches {
                    let Some(desc) = layout.vmos.get(vmo as usize) else {
                        return Err(bad(start, format!("vmo {vmo} of {}", layout.vmos.len())));
                    };
                    let last = entry_in(bytes, end - 1);
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
                    ranges[vmo as usize] = (start, end);
                }
                *by_vmo = ranges;
            }
        }
        Ok(())
    }

    /// The bytes of chunk `c` (read and checked on first use), in chunked mode.
    fn chunk_bytes(&self, c: usize, read: ReadAt) -> SnapResult<&[u8]> {
        let Mode::Chunked {
            offset,
            chunks,
            loaded,
            vmo_pages,
        } = &self.mode
        else {
            return Err(SnapshotError::Unsupported("not a chunked index".into()));
        };
        if let Some(b) = loaded[c].get() {
            return Ok(b);
        }
        let ch = chunks[c];
        let first = c * CHUNK_ENTRIES;
        let mut b = vec![0u8; ch.entries as usize * INDEX_ENTRY_LEN].into_boxed_slice();
        read(*offset + (first * INDEX_ENTRY_LEN) as u64, &mut b)?;
        let computed = crc32fast::hash(&b);
        if computed != ch.crc32 {
            return Err(SnapshotError::IndexChunkChecksum {
                chunk: c as u64,
                first_entry: first as u64,
                stored: ch.crc32,
                computed,
            });
        }
        let next = chunks.get(c + 1);
        let data_after = next.map_or(self.data_pages, |n| n.data_before);
        check_chunk(c, &ch, next.map(|n| n.first), data_after, &b, vmo_pages)?;
        let _ = loaded[c].set(b);
        loaded[c]
            .get()
            .map(|b| &b[..])
            .ok_or(SnapshotError::Unsupported("chunk cache".into()))
    }

    /// In chunked mode, the chunk whose key range holds `key` (the last one whose first key
    /// is ≤ `key`), if any.
    fn chunk_of(chunks: &[Chunk], key: (u32, u64)) -> Option<usize> {
        chunks.partition_point(|c| c.first <= key).checked_sub(1)
    }

    /// The data-entry ordinal of entry `j` of `bytes` whose first entry has ordinal `base`
    /// (scanning from `from`, whose ordinal is `base`).
    fn ordinal_from(bytes: &[u8], from: usize, j: usize, base: u64) -> u64 {
        base + (from..j).filter(|&k| !entry_in(bytes, k).is_zero()).count() as u64
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

    /// Where page `page` of Vmo `vmo` is, if the index has it (`read` loads a chunk).
    pub fn slot(&self, vmo: u32, page: u64, read: ReadAt) -> SnapResult<Option<Slot>> {
        let key = (vmo, page);
        match &self.mode {
            Mode::Whole {
                bytes,
                by_vmo,
                data_before,
            } => {
                let Some(&(start, end)) = by_vmo.get(vmo as usize) else {
                    return Ok(None);
                };
                let i = lower_bound_in(bytes, start, end, key);
                if i == end || key_in(bytes, i) != key {
                    return Ok(None);
                }
                let ordinal = if self.zero_pages == 0 {
                    i as u64
                } else {
                    let b = i / BLOCK;
                    Self::ordinal_from(bytes, b * BLOCK, i, data_before[b])
                };
                Ok(Some(self.slot_of(entry_in(bytes, i), ordinal)))
            }
            Mode::Chunked { chunks, .. } => {
                let Some(c) = Self::chunk_of(chunks, key) else {
                    return Ok(None);
                };
                let bytes = self.chunk_bytes(c, read)?;
                let n = chunks[c].entries as usize;
                let j = lower_bound_in(bytes, 0, n, key);
                if j == n || key_in(bytes, j) != key {
                    return Ok(None);
                }
                let ordinal = Self::ordinal_from(bytes, 0, j, chunks[c].data_before);
                Ok(Some(self.slot_of(entry_in(bytes, j), ordinal)))
            }
        }
    }

    /// Every (page, slot) of Vmo `vmo`, by page.
    pub fn pages_of(&self, vmo: u32, read: ReadAt) -> SnapResult<Vec<(u64, Slot)>> {
        let mut out = Vec::new();
        let mut push = |bytes: &[u8], from: usize, to: usize, mut k: u64| {
            for i in from..to {
                let e = entry_in(bytes, i);
                if e.vmo == vmo {
                    out.push((e.page, self.slot_of(e, k)));
                }
                k += u64::from(!e.is_zero());
            }
        };
        match &self.mode {
            Mode::Whole {
                bytes,
                by_vmo,
                data_before,
            } => {
                let (start, end) = by_vmo.get(vmo as usize).copied().unwrap_or((0, 0));
                if start < end {
                    let b = start / BLOCK;
                    let k = Self::ordinal_from(bytes, b * BLOCK, start, data_before[b]);
                    push(bytes, start, end, k);
                }
            }
            Mode::Chunked { chunks, .. } => {
                let first = Self::chunk_of(chunks, (vmo, 0)).unwrap_or(0);
                for (c, ch) in chunks.iter().enumerate().skip(first) {
                    if ch.first > (vmo, u64::MAX) {
                        break;
                    }
                    let bytes = self.chunk_bytes(c, read)?;
                    push(bytes, 0, ch.entries as usize, ch.data_before);
                }
            }
        }
        Ok(out)
    }

    /// The stored pages of Vmo `vmo` among pages `[first, end)` (in chunked mode, those in
    /// the chunk that holds `first`): they lie back to back in the file, so they are one byte
    /// range — `(file offset, pages)`, or `None` if there are none.
    pub fn data_run(
        &self,
        vmo: u32,
        first: u64,
        end: u64,
        read: ReadAt,
    ) -> SnapResult<Option<(u64, u64)>> {
        let (bytes, lo, hi, base, from) = match &self.mode {
            Mode::Whole {
                bytes,
                by_vmo,
                data_before,
            } => {
                let Some(&(start, stop)) = by_vmo.get(vmo as usize) else {
                    return Ok(None);
                };
                let a = lower_bound_in(bytes, start, stop, (vmo, first));
                let b = a / BLOCK;
                (
                    &bytes[..],
                    a,
                    stop,
                    data_before.get(b).copied().unwrap_or(0),
                    b * BLOCK,
                )
            }
            Mode::Chunked { chunks, .. } => {
                if chunks.is_empty() {
                    return Ok(None);
                }
                // A `first` below every chunk's first key starts in chunk 0.
                let c = Self::chunk_of(chunks, (vmo, first)).unwrap_or(0);
                let bytes = self.chunk_bytes(c, read)?;
                let n = chunks[c].entries as usize;
                let a = lower_bound_in(bytes, 0, n, (vmo, first));
                (bytes, a, n, chunks[c].data_before, 0)
            }
        };
        let b = lower_bound_in(bytes, lo, hi, (vmo, end));
        let k = Self::ordinal_from(bytes, from, lo, base);
        let n = (lo..b).filter(|&j| !entry_in(bytes, j).is_zero()).count() as u64;
        Ok((n > 0).then(|| (self.pages_at + k * PAGE, n)))
    }
}

#[cfg(test)]
mod tests;
