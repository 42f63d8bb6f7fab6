//! The index-chunks section of format 1.2 (`ChunkTable`): per `CHUNK_ENTRIES` page-index
//! entries, the chunk's first (Vmo, page), the data entries before it and its CRC-32 — what lets
//! `PageIndex` check the index one chunk at a time, on first use (`check_chunk`).
//!
//! Invariants: `ChunkTable::decode` accepts a table only if its counts add up to the index and
//! its records are in key order with non-decreasing data counts; `check_chunk` accepts a chunk's
//! bytes only if every entry has known flags, is in strictly increasing order from the table's
//! first key to below the next chunk's, names a layout Vmo and a page inside it, and the data
//! entries match the table's count.

use super::super::error::{SnapResult, SnapshotError};
use super::super::format::{u32_at, u64_at, IndexEntry, ENTRY_ZERO, INDEX_ENTRY_LEN};
use super::{bad, entry_in};

/// Entries per chunk of a 1.2 index (96 KiB; a 1 GiB full save has 64 chunks).
pub const CHUNK_ENTRIES: usize = 4096;
/// Bytes of the chunk table's own header and of one of its records.
pub(super) const TABLE_HEAD: usize = 24;
pub(super) const CHUNK_RECORD: usize = 32;

/// One chunk of a 1.2 index as its table records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Chunk {
    pub first: (u32, u64),
    pub entries: u32,
    pub data_before: u64,
    pub crc32: u32,
}

/// The index-chunks section (format 1.2), little-endian:
/// ```text
///  0 chunk_entries u32 (CHUNK_ENTRIES)   4 chunks u32   8 data entries u64   16 zero entries u64
/// 24 chunks × { first vmo u32, entries u32, first page u64, data entries before u64,
///               crc32 of the chunk's bytes u32, 0 u32 }
/// ```
pub struct ChunkTable;

impl ChunkTable {
    /// The table of `index` (the encoded entries, as a save writes them).
    pub fn encode(index: &[u8]) -> Vec<u8> {
        let chunks: Vec<&[u8]> = index.chunks(CHUNK_ENTRIES * INDEX_ENTRY_LEN).collect();
        let mut out = Vec::with_capacity(TABLE_HEAD + chunks.len() * CHUNK_RECORD);
        let zero = |e: &[u8]| IndexEntry::decode(e).is_zero();
        let zeros = index
            .chunks_exact(INDEX_ENTRY_LEN)
            .filter(|e| zero(e))
            .count() as u64;
        let total = (index.len() / INDEX_ENTRY_LEN) as u64;
        out.extend_from_slice(&(CHUNK_ENTRIES as u32).to_le_bytes());
        out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
        out.extend_from_slice(&(total - zeros).to_le_bytes());
        out.extend_from_slice(&zeros.to_le_bytes());
        let mut data = 0u64;
        for c in chunks {
            let e = IndexEntry::decode(c);
            out.extend_from_slice(&e.vmo.to_le_bytes());
            out.extend_from_slice(&((c.len() / INDEX_ENTRY_LEN) as u32).to_le_bytes());
            out.extend_from_slice(&e.page.to_le_bytes());
            out.extend_from_slice(&data.to_le_bytes());
            out.extend_from_slice(&crc32fast::hash(c).to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            data += c.chunks_exact(INDEX_ENTRY_LEN).filter(|e| !zero(e)).count() as u64;
        }
        out
    }

    /// Decodes and checks a table (its CRC already matched) against an index section of
    /// `index_len` bytes: (chunks, data entries, zero entries).
    pub(super) fn decode(b: &[u8], index_len: u64) -> SnapResult<(Vec<Chunk>, u64, u64)> {
        let malformed = |detail: String| SnapshotError::Malformed {
            section: "index-chunks",
            detail,
        };
        if b.len() < TABLE_HEAD {
            return Err(malformed(format!("{} bytes", b.len())));
        }
        let (per, count) = (u32_at(b, 0) as usize, u32_at(b, 4) as usize);
        let (data, zeros) = (u64_at(b, 8), u64_at(b, 16));
        if per != CHUNK_ENTRIES || b.len() != TABLE_HEAD + count * CHUNK_RECORD {
            return Err(malformed(format!(
                "{count} chunks of {per} entries in {} bytes",
                b.len()
            )));
        }
        let entries = index_len / INDEX_ENTRY_LEN as u64;
        if !index_len.is_multiple_of(INDEX_ENTRY_LEN as u64)
            || data.checked_add(zeros) != Some(entries)
            || count as u64 != entries.div_ceil(CHUNK_ENTRIES as u64)
        {
            return Err(malformed(format!(
                "{count} chunks, {data} + {zeros} entries, for an index of {index_len} bytes"
            )));
        }
        let mut out: Vec<Chunk> = Vec::with_capacity(count);
        for i in 0..count {
            let r = &b[TABLE_HEAD + i * CHUNK_RECORD..][..CHUNK_RECORD];
            let c = Chunk {
                first: (u32_at(r, 0), u64_at(r, 8)),
                entries: u32_at(r, 4),
                data_before: u64_at(r, 16),
                crc32: u32_at(r, 24),
            };
            let want = (entries - (i * CHUNK_ENTRIES) as u64).min(CHUNK_ENTRIES as u64);
            let ok = u64::from(c.entries) == want
                && out.last().is_none_or(|p| {
                    p.first < c.first
                        && c.data_before >= p.data_before
                        && c.data_before - p.data_before <= u64::from(p.entries)
                })
                && (i > 0 || c.data_before == 0)
                && c.data_before <= data;
            if !ok {
                return Err(malformed(format!("chunk {i} disagrees with the index")));
            }
            out.push(c);
        }
        if let Some(last) = out.last() {
            if data - last.data_before > u64::from(last.entries) {
                return Err(malformed("data count past the last chunk".into()));
            }
        }
        Ok((out, data, zeros))
    }
}

/// Checks the bytes `b` of chunk `c` (their CRC matched `ch`): every entry against the table
/// (`ch`, the next chunk's first key, the data count after the chunk) and the layout
/// (`vmo_pages`, pages per Vmo). The first violation is a `BadIndexEntry`.
pub(super) fn check_chunk(
    c: usize,
    ch: &Chunk,
    next_first: Option<(u32, u64)>,
    data_after: u64,
    b: &[u8],
    vmo_pages: &[u64],
) -> SnapResult<()> {
    let first = c * CHUNK_ENTRIES;
    let mut data = 0u64;
    let mut prev: Option<(u32, u64)> = None;
    for j in 0..ch.entries as usize {
        let e = entry_in(b, j);
        let i = first + j;
        if e.flags & !ENTRY_ZERO != 0 {
            return Err(bad(i, format!("unknown flags {:#x}", e.flags)));
        }
        let key = (e.vmo, e.page);
        if prev.is_some_and(|p| p >= key) || (j == 0 && key != ch.first) {
            return Err(bad(
                i,
                "out of order, duplicated or not the chunk's first".into(),
            ));
        }
        let Some(&pages) = vmo_pages.get(e.vmo as usize) else {
            return Err(bad(i, format!("vmo {} of {}", e.vmo, vmo_pages.len())));
        };
        if e.page >= pages {
            return Err(bad(
                i,
                format!(
                    "page {} past the end of vmo {} ({pages} pages)",
                    e.page, e.vmo
                ),
            ));
        }
        prev = Some(key);
        data += u64::from(!e.is_zero());
    }
    if prev.is_some_and(|p| next_first.is_some_and(|n| p >= n))
        || ch.data_before + data != data_after
    {
        return Err(bad(
            first,
            format!("chunk {c} disagrees with the chunk table"),
        ));
    }
    Ok(())
}
