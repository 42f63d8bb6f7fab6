//! The fixed binary parts of a snapshot file: the 4 KiB header (with its section table) and
//! the page-index entries, encoded by hand in little-endian so that every version of this
//! program can read every header, whatever serde does.
//!
//! Header layout (offsets in bytes; everything little-endian):
//! ```text
//!    0  magic  "GMSNAPSH"          8   12 header_len u32 (4096)
//!    8  major u16, 10 minor u16       16 arch u32 (1 = x86-64)   20 page_size u32
//!   24  features u64 (bit 0: diff)   32 mem_size u64            40 section_count u32
//!   48  identity [16]                64 base identity [16] (zero unless a diff)
//!   80  section table: section_count × 32 bytes
//!       { kind u32, 0 u32, offset u64, length u64, crc32 u32, 0 u32 }
//!       kinds 1..=4 (vcpu, layout, page index, pages) are required, exactly once each;
//!       kind 5 (working set, since 1.1) and kind 6 (index chunks, since 1.2: the page
//!       index's per-chunk table, `index/`) are optional; unknown kinds are skipped
//! 4092  crc32 of bytes [0, 4092)
//! ```
//! The first 16 bytes and the CRC at 4092 never move in any version: a reader checks the CRC,
//! then the magic, then the major version, and only then reads the rest.
//!
//! Page-index entry (24 bytes): `{ vmo u32, flags u32 (bit 0: zero page, no data), page u64,
//! xxh3-64 of the page u64 }`, sorted by (vmo, page) without duplicates; the k-th entry that
//! has data is stored at `pages.offset + k × 4096`.
//!
//! Identity: xxh3-128 of the header (with the identity and the CRC zeroed, and with only the
//! four required sections in its table — what a 1.0 reader re-encodes) followed by the page
//! index — it names the file's content (every page's hash is in the index) for diffs, and is
//! the same whether or not the file carries the optional sections.

use super::error::{SnapResult, SnapshotError};
pub use super::identity::Identity;

pub const MAGIC: [u8; 8] = *b"GMSNAPSH";
/// The format major this program writes and reads; a different major is refused.
pub const FORMAT_MAJOR: u16 = 1;
/// The format minor this program writes; any minor of `FORMAT_MAJOR` is readable.
/// 1.0: the four required sections; 1.1 adds the optional working-set section; 1.2 the
/// optional index-chunks section (a reader that has it checks the index chunk by chunk, on
/// first use, instead of all at open).
pub const FORMAT_MINOR: u16 = 2;
pub const HEADER_LEN: usize = 4096;
pub const ARCH_X86_64: u32 = 1;
pub const PAGE: u64 = ept::PAGE_SIZE;
/// Feature bit: the file is a diff over the base named by `base`.
pub const FEATURE_DIFF: u64 = 1;
/// Feature bits this program understands.
pub const KNOWN_FEATURES: u64 = FEATURE_DIFF;
pub const INDEX_ENTRY_LEN: usize = 24;
/// Index flag: the page is all zeros (no data stored; overrides a base layer's page).
pub const ENTRY_ZERO: u32 = 1;

const CRC_AT: usize = HEADER_LEN - 4;
const SECTIONS_AT: usize = 80;
const SECTION_LEN: usize = 32;
const MAX_SECTIONS: usize = (CRC_AT - SECTIONS_AT) / SECTION_LEN;

/// The sections of a file, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum SectionKind {
    Vcpu = 1,
    Layout = 2,
    PageIndex = 3,
    Pages = 4,
    /// Optional (format 1.1): the pages the guest touched in its first run after the snapshot
    /// point, prefetched by a restore (`sections::WorkingSetSection`).
    WorkingSet = 5,
    /// Optional (format 1.2): per chunk of the page index, its first key, data-page count
    /// before it and CRC-32 (`index::ChunkTable`).
    IndexChunks = 6,
}

impl SectionKind {
    /// The required sections, in table order.
    pub const ALL: [SectionKind; 4] = [
        SectionKind::Vcpu,
        SectionKind::Layout,
        SectionKind::PageIndex,
        SectionKind::Pages,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Vcpu => "vcpu",
            SectionKind::Layout => "layout",
            SectionKind::PageIndex => "page-index",
            SectionKind::Pages => "pages",
            SectionKind::WorkingSet => "working-set",
            SectionKind::IndexChunks => "index-chunks",
        }
    }
}

/// One section-table entry. The pages section's checksum is 0: its pages carry their own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Section {
    pub offset: u64,
    pub length: u64,
    pub crc32: u32,
}

impl Section {
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// The decoded header.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Header {
    pub major: u16,
    pub minor: u16,
    pub arch: u32,
    pub page_size: u32,
    pub features: u64,
    pub mem_size: u64,
    pub identity: Identity,
    pub base: Identity,
    /// The required sections, indexed by `SectionKind as usize - 1`.
    pub sections: [Section; 4],
    /// The optional working-set section (format 1.1), if the file has one.
    pub working_set: Option<Section>,
    /// The optional index-chunks section (format 1.2), if the file has one.
    pub index_chunks: Option<Section>,
}

impl Header {
    pub fn new(mem_size: u64, base: Option<Identity>) -> Self {
        Header {
            major: FORMAT_MAJOR,
            minor: FORMAT_MINOR,
            arch: ARCH_X86_64,
            page_size: PAGE as u32,
            features: if base.is_some() { FEATURE_DIFF } else { 0 },
            mem_size,
            identity: Identity::default(),
            base: base.unwrap_or_default(),
            sections: [Section::default(); 4],
            working_set: None,
            index_chunks: None,
        }
    }

    pub fn is_diff(&self) -> bool {
        self.features & FEATURE_DIFF != 0
    }

    /// A section's table entry (an absent optional section reads as the empty default).
    pub fn section(&self, kind: SectionKind) -> Section {
        match kind {
            SectionKind::WorkingSet => self.working_set.unwrap_or_default(),
            SectionKind::IndexChunks => self.index_chunks.unwrap_or_default(),
            k => self.sections[k as usize - 1],
        }
    }

    pub fn set_section(&mut self, kind: SectionKind, s: Section) {
        match kind {
            SectionKind::WorkingSet => self.working_set = Some(s),
            SectionKind::IndexChunks => self.index_chunks = Some(s),
            k => self.sections[k as usize - 1] = s,
        }
    }

    /// The sections present in this header, in table order (required ones first).
    pub fn present(&self) -> Vec<SectionKind> {
        let mut v = SectionKind::ALL.to_vec();
        if self.working_set.is_some() {
            v.push(SectionKind::WorkingSet);
        }
        if self.index_chunks.is_some() {
            v.push(SectionKind::IndexChunks);
        }
        v
    }

    /// The header bytes; `with_identity` false zeroes the identity (the input of the hash).
    pub fn encode(&self, with_identity: bool) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.major.to_le_bytes());
        b[10..12].copy_from_slice(&self.minor.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..20].copy_from_slice(&self.arch.to_le_bytes());
        b[20..24].copy_from_slice(&self.page_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.features.to_le_bytes());
        b[32..40].copy_from_slice(&self.mem_size.to_le_bytes());
        let present = self.present();
        b[40..44].copy_from_slice(&(present.len() as u32).to_le_bytes());
        if with_identity {
            b[48..64].copy_from_slice(&self.identity.0);
        }
        b[64..80].copy_from_slice(&self.base.0);
        for (i, kind) in present.iter().enumerate() {
            let s = self.section(*kind);
            let at = SECTIONS_AT + i * SECTION_LEN;
            b[at..at + 4].copy_from_slice(&(*kind as u32).to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&s.offset.to_le_bytes());
            b[at + 16..at + 24].copy_from_slice(&s.length.to_le_bytes());
            b[at + 24..at + 28].copy_from_slice(&s.crc32.to_le_bytes());
        }
        if with_identity {
            let crc = crc32fast::hash(&b[..CRC_AT]);
            b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        }
        b
    }

    /// Decodes and checks a header: CRC, magic, major version, arch, page size, features,
    /// section table (each kind exactly once). Section bounds are checked by the caller,
    /// which knows the file size.
    pub fn decode(b: &[u8; HEADER_LEN]) -> SnapResult<Header> {
        let stored = u32_at(b, CRC_AT);
        let computed = crc32fast::hash(&b[..CRC_AT]);
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[0..8]);
        if magic != MAGIC {
            return Err(SnapshotError::BadMagic { found: magic });
        }
        let (major, minor) = (u16_at(b, 8), u16_at(b, 10));
        if stored != computed {
            return Err(SnapshotError::HeaderChecksum { stored, computed });
        }
        if major != FORMAT_MAJOR {
            return Err(SnapshotError::UnsupportedVersion {
                found_major: major,
                found_minor: minor,
                supported_major: FORMAT_MAJOR,
                supported_minor: FORMAT_MINOR,
            });
        }
        let header_len = u32_at(b, 12);
        if header_len as usize != HEADER_LEN {
            return Err(SnapshotError::Malformed {
                section: "header",
                detail: format!("header length {header_len}, expected {HEADER_LEN}"),
            });
        }
        let arch = u32_at(b, 16);
        if arch != ARCH_X86_64 {
            return Err(SnapshotError::WrongArch {
                found: arch,
                expected: ARCH_X86_64,
            });
        }
        let page_size = u32_at(b, 20);
        if u64::from(page_size) != PAGE {
            return Err(SnapshotError::WrongPageSize {
                found: page_size,
                expected: PAGE as u32,
            });
        }
        let features = u64_at(b, 24);
        if features & !KNOWN_FEATURES != 0 {
            return Err(SnapshotError::UnknownFeatures {
                bits: features & !KNOWN_FEATURES,
            });
        }
        let count = u32_at(b, 40) as usize;
        if count > MAX_SECTIONS {
            return Err(SnapshotError::Malformed {
                section: "header",
                detail: format!("{count} sections, at most {MAX_SECTIONS}"),
            });
        }
        // Required kinds 1..=4 at indices 0..4, the optional working set at 4, chunks at 5.
        let mut sections = [None; 6];
        for i in 0..count {
            let at = SECTIONS_AT + i * SECTION_LEN;
            let kind = u32_at(b, at);
            // Unknown kinds (a newer minor's optional sections) are skipped.
            let Some(k) = SectionKind::ALL
                .iter()
                .chain([SectionKind::WorkingSet, SectionKind::IndexChunks].iter())
                .find(|k| **k as u32 == kind)
            else {
                continue;
            };
            let slot = &mut sections[*k as usize - 1];
            if slot.is_some() {
                return Err(SnapshotError::MissingSection { section: k.name() });
            }
            *slot = Some(Section {
                offset: u64_at(b, at + 8),
                length: u64_at(b, at + 16),
                crc32: u32_at(b, at + 24),
            });
        }
        let mut out = [Section::default(); 4];
        for (i, s) in sections[..4].iter().enumerate() {
            out[i] = s.ok_or(SnapshotError::MissingSection {
                section: SectionKind::ALL[i].name(),
            })?;
        }
        let mut identity = [0u8; 16];
        identity.copy_from_slice(&b[48..64]);
        let mut base = [0u8; 16];
        base.copy_from_slice(&b[64..80]);
        Ok(Header {
            major,
            minor,
            arch,
            page_size,
            features,
            mem_size: u64_at(b, 32),
            identity: Identity(identity),
            base: Identity(base),
            sections: out,
            working_set: sections[4],
            index_chunks: sections[5],
        })
    }

    /// The identity of a file with this header and `index` bytes.
    pub fn compute_identity(&self, index: &[u8]) -> Identity {
        let mut h = self.identity_hasher();
        h.update(index);
        Identity(h.digest128().to_le_bytes())
    }

    /// The identity hash with this header fed in: feed it the index to get the identity.
    /// The header is hashed as a 1.0 reader re-encodes it — with the four required sections
    /// only, without the optional ones added since (the working set, a hint about the first
    /// run, and the index chunks, derived from the index the identity covers anyway) — so
    /// that every reader of major 1 computes the same identity for every file of major 1.
    pub fn identity_hasher(&self) -> xxhash_rust::xxh3::Xxh3 {
        let mut view = self.clone();
        view.working_set = None;
        view.index_chunks = None;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&view.encode(false));
        h
    }
}

/// One decoded page-index entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub vmo: u32,
    pub flags: u32,
    pub page: u64,
    pub hash: u64,
}

impl IndexEntry {
    pub fn is_zero(&self) -> bool {
        self.flags & ENTRY_ZERO != 0
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.vmo.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.page.to_le_bytes());
        out.extend_from_slice(&self.hash.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> IndexEntry {
        IndexEntry {
            vmo: u32_at(b, 0),
            flags: u32_at(b, 4),
            page: u64_at(b, 8),
            hash: u64_at(b, 16),
        }
    }
}

/// The checksum of one stored page.
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let mut h = Header::new(2 << 20, None);
        h.set_section(
            SectionKind::Pages,
            Section {
                offset: 8192,
                length: 4096,
                crc32: 0,
            },
        );
        h.identity = Identity([7; 16]);
        h
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        assert_eq!(Header::decode(&h.encode(true)).unwrap(), h);
    }

    #[test]
    fn flipped_header_byte_is_a_checksum_error() {
        let mut b = sample().encode(true);
        b[33] ^= 0x40;
        assert!(matches!(
            Header::decode(&b),
            Err(SnapshotError::HeaderChecksum { .. })
        ));
    }

    #[test]
    fn unknown_major_names_both_versions() {
        let mut h = sample();
        h.major = 9;
        h.minor = 3;
        let e = Header::decode(&h.encode(true)).unwrap_err();
        assert!(matches!(
            e,
            SnapshotError::UnsupportedVersion {
                found_major: 9,
                found_minor: 3,
                supported_major: FORMAT_MAJOR,
                ..
            }
        ));
        let msg = e.to_string();
        assert!(msg.contains("9.3") && msg.contains(&format!("{FORMAT_MAJOR}.")));
    }

    #[test]
    fn working_set_section_round_trips_and_is_optional() {
        let mut h = sample();
        assert_eq!(h.present().len(), 4);
        h.set_section(
            SectionKind::WorkingSet,
            Section {
                offset: 12288,
                length: 40,
                crc32: 9,
            },
        );
        let back = Header::decode(&h.encode(true)).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.working_set.map(|s| s.length), Some(40));
        assert_eq!(u32_at(&h.encode(true), 40), 5);
    }

    #[test]
    fn a_1_0_reader_skips_the_working_set() {
        // What a 1.0 reader does with a 1.1 header: it knows kinds 1..=4 only, skips kind 5.
        let mut h = sample();
        h.set_section(SectionKind::WorkingSet, Section::default());
        let b = h.encode(true);
        let kinds: Vec<u32> = (0..u32_at(&b, 40) as usize)
            .map(|i| u32_at(&b, SECTIONS_AT + i * SECTION_LEN))
            .collect();
        assert_eq!(kinds, [1, 2, 3, 4, 5]);
        // The first four entries are where 1.0 put them.
        let mut old = sample();
        old.working_set = None;
        assert_eq!(
            b[SECTIONS_AT..SECTIONS_AT + 4 * SECTION_LEN],
            old.encode(true)[SECTIONS_AT..SECTIONS_AT + 4 * SECTION_LEN]
        );
    }

    #[test]
    fn a_1_1_reader_skips_the_index_chunks() {
        // A 1.2 header: kinds 1..=4 where 1.0 put them, then 5 and 6, which a 1.1 reader
        // (knowing 1..=5) and a 1.0 reader (1..=4) skip.
        let mut h = sample();
        h.set_section(SectionKind::WorkingSet, Section::default());
        h.set_section(
            SectionKind::IndexChunks,
            Section {
                offset: 4096,
                length: 56,
                crc32: 3,
            },
        );
        let b = h.encode(true);
        let kinds: Vec<u32> = (0..u32_at(&b, 40) as usize)
            .map(|i| u32_at(&b, SECTIONS_AT + i * SECTION_LEN))
            .collect();
        assert_eq!(kinds, [1, 2, 3, 4, 5, 6]);
        let back = Header::decode(&b).unwrap();
        assert_eq!(back.index_chunks.map(|s| s.length), Some(56));
        assert_eq!(back, h);
        // What a 1.0 reader hashes for the identity: the header with kinds 1..=4 only (it
        // decodes no other kind, and re-encodes what it decoded).
        let mut as_1_0 = h.clone();
        as_1_0.working_set = None;
        as_1_0.index_chunks = None;
        assert_eq!(h.compute_identity(b"ix"), as_1_0.compute_identity(b"ix"));
        let mut plain = xxhash_rust::xxh3::Xxh3::new();
        plain.update(&as_1_0.encode(false));
        plain.update(b"ix");
        assert_eq!(h.compute_identity(b"ix").0, plain.digest128().to_le_bytes());
    }

    #[test]
    fn newer_minor_is_readable() {
        let mut h = sample();
        h.minor = FORMAT_MINOR + 5;
        assert_eq!(
            Header::decode(&h.encode(true)).unwrap().minor,
            FORMAT_MINOR + 5
        );
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut b = sample().encode(true);
        b[0] = b'X';
        assert!(matches!(
            Header::decode(&b),
            Err(SnapshotError::BadMagic { .. })
        ));
    }

    #[test]
    fn index_entry_round_trips() {
        let e = IndexEntry {
            vmo: 3,
            flags: ENTRY_ZERO,
            page: 0x1234_5678,
            hash: u64::MAX - 1,
        };
        let mut v = Vec::new();
        e.encode(&mut v);
        assert_eq!(v.len(), INDEX_ENTRY_LEN);
        assert_eq!(IndexEntry::decode(&v), e);
    }
}
