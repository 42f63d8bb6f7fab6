//! `SnapshotFile`: one snapshot file opened read-only and fully checked — everything but the
//! page bytes — before anything uses it; afterwards it serves page reads for the pagers.
//!
//! `open` checks, in order: the path is a regular file; the header (CRC, magic, major, arch,
//! page size, features; `format.rs`); every section lies inside the file (else `Truncated`);
//! the metadata sections' CRCs (a 1.0 / 1.1 page index's in the same pass that checks its
//! entries and hashes the identity; a 1.2 file's chunk table only, its index chunks being
//! checked on first use and the identity by `verify_pages` — `index/`); the vCPU and layout
//! sections parse; the index is sorted, names known Vmos and pages inside them, and its stored-page count matches the page section's
//! length (`PageCountMismatch`); an optional working-set section (format 1.1) passes its CRC
//! and parses into runs inside the layout's mappings. `verify_pages` also hashes every stored page
//! (`--verify`).
//!
//! Immutability (what makes `SnapshotAtLeastOnWrite` exact for a restored guest): the file is
//! held open read-only for as long as a pager uses it; the saver never writes an existing file
//! in place (it renames a new one over the name, which leaves this open file untouched). Every
//! read (one page, or one run of pages back to back in the file: `read_run`) `fstat`s the held
//! descriptor first and refuses the read (`FileChanged`) if size, mtime or ctime moved since
//! `open` — ctime cannot be set back by any user, so any write through any descriptor is caught
//! at the next read; and every page is checked against its hash before it is used. Not
//! detectable: a write that lands between the `fstat` and the `pread` and keeps each page's
//! hash (i.e. none that changes the pages' bytes, barring an xxh3 collision).

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::error::{SnapResult, SnapshotError};
use super::format::{page_hash, Header, Identity, SectionKind, HEADER_LEN, PAGE};
use super::index::PageIndex;
pub use super::index::Slot;
use super::sections::{decode, LayoutSection, VcpuSection, WorkingSetSection};
use crate::vmm::vcpu_state::VcpuState;

/// Size, times and identity of the open file, compared at every page read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// An open, checked snapshot file.
pub struct SnapshotFile {
    path: PathBuf,
    file: File,
    stamp: Stamp,
    pub header: Header,
    pub layout: LayoutSection,
    vcpu: Vec<u8>,
    index: PageIndex,
    /// Stored (data) pages and zero entries.
    pub data_pages: u64,
    pub zero_pages: u64,
    /// The pages the guest touched in its first run after the snapshot point, if recorded.
    pub working_set: Option<vmo::WorkingSet>,
}

fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "directory"
    } else if ft.is_symlink() {
        "symbolic link"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> SnapResult<()> {
    file.read_exact_at(buf, offset)
        .map_err(|e| SnapshotError::io("read", path, e))
}

impl SnapshotFile {
    /// Opens and checks `path` (see the module documentation).
    pub fn open(path: &Path) -> SnapResult<SnapshotFile> {
        let meta = std::fs::metadata(path).map_err(|e| SnapshotError::io("stat", path, e))?;
        if !meta.file_type().is_file() {
            return Err(SnapshotError::NotRegularFile {
                path: path.to_path_buf(),
                kind: kind_of(meta.file_type()),
            });
        }
        let file = File::open(path).map_err(|e| SnapshotError::io("open", path, e))?;
        let meta = file
            .metadata()
            .map_err(|e| SnapshotError::io("fstat", path, e))?;
        if !meta.file_type().is_file() {
            return Err(SnapshotError::NotRegularFile {
                path: path.to_path_buf(),
                kind: kind_of(meta.file_type()),
            });
        }
        let stamp = Stamp::of(&meta);
        let size = stamp.size;
        if size < HEADER_LEN as u64 {
            return Err(SnapshotError::Truncated {
                what: "header",
                need: HEADER_LEN as u64,
                have: size,
            });
        }
        let mut hb = [0u8; HEADER_LEN];
        read_exact_at(&file, path, &mut hb, 0)?;
        let header = Header::decode(&hb)?;
        for kind in header.present() {
            let s = header.section(kind);
            if s.offset.checked_add(s.length).is_none_or(|e| e > size) {
                return Err(SnapshotError::Truncated {
                    what: kind.name(),
                    need: s.end(),
                    have: size,
                });
            }
        }
        let section = |kind: SectionKind| -> SnapResult<Vec<u8>> {
            let s = header.section(kind);
            let mut buf = vec![0u8; s.length as usize];
            read_exact_at(&file, path, &mut buf, s.offset)?;
            let computed = crc32fast::hash(&buf);
            if computed != s.crc32 {
                return Err(SnapshotError::SectionChecksum {
                    section: kind.name(),
                    stored: s.crc32,
                    computed,
                });
            }
            Ok(buf)
        };
        let pages_section = header.section(SectionKind::Pages);
        let index_section = header.section(SectionKind::PageIndex);
        // 1.2: only the chunk table now (the chunks on first use, the identity by `verify`).
        let (mut index, identity) = match header.index_chunks {
            Some(_) => {
                let table = section(SectionKind::IndexChunks)?;
                let ix = PageIndex::chunked(&table, index_section, pages_section.offset)?;
                (ix, header.identity)
            }
            None => PageIndex::load(
                &file,
                path,
                index_section,
                header.identity_hasher(),
                pages_section.offset,
            )?,
        };
        let layout_bytes = section(SectionKind::Layout)?;
        let vcpu = section(SectionKind::Vcpu)?;
        let ws_bytes = match header.working_set {
            Some(_) => Some(section(SectionKind::WorkingSet)?),
            None => None,
        };
        let layout: LayoutSection = decode("layout", &layout_bytes)?;
        layout
            .validate()
            .map_err(|detail| SnapshotError::Malformed {
                section: "layout",
                detail,
            })?;
        if layout.mem_size != header.mem_size {
            return Err(SnapshotError::Malformed {
                section: "layout",
                detail: format!(
                    "guest size {:#x}, header says {:#x}",
                    layout.mem_size, header.mem_size
                ),
            });
        }
        // Parse the vCPU state now so a bad one is refused before any VM exists.
        decode::<VcpuSection>("vcpu", &vcpu)?;
        let working_set = match ws_bytes {
            Some(b) => Some(
                decode::<WorkingSetSection>("working-set", &b)?
                    .check(&layout)
                    .map_err(|detail| SnapshotError::Malformed {
                        section: "working-set",
                        detail,
                    })?,
            ),
            None => None,
        };
        if identity != header.identity {
            return Err(SnapshotError::Malformed {
                section: "header",
                detail: format!("identity {} recorded, {identity} computed", header.identity),
            });
        }
        index.check_layout(&layout)?;
        let (data_pages, zero_pages) = (index.data_pages, index.zero_pages);
        if data_pages.checked_mul(PAGE) != Some(pages_section.length)
            || !pages_section.offset.is_multiple_of(PAGE)
        {
            return Err(SnapshotError::PageCountMismatch {
                index_data_pages: data_pages,
                page_section_bytes: pages_section.length,
            });
        }
        Ok(SnapshotFile {
            path: path.to_path_buf(),
            file,
            stamp,
            header,
            layout,
            vcpu,
            index,
            data_pages,
            zero_pages,
            working_set,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn identity(&self) -> Identity {
        self.header.identity
    }

    /// The saved vCPU state (parsed once already by `open`).
    pub fn vcpu_state(&self) -> SnapResult<VcpuState> {
        Ok(decode::<VcpuSection>("vcpu", &self.vcpu)?.into_state())
    }

    /// Where page `page` of Vmo `vmo` is in this file, if the file has it.
    /// (A format 1.2 index chunk is read and checked on its first lookup: its errors.)
    pub fn slot(&self, vmo: u32, page: u64) -> SnapResult<Option<Slot>> {
        self.index.slot(vmo, page, &|o, b| self.read_run(o, b))
    }

    /// Every (page, slot) this file has for Vmo `vmo`, by page.
    pub fn pages_of(&self, vmo: u32) -> SnapResult<Vec<(u64, Slot)>> {
        self.index.pages_of(vmo, &|o, b| self.read_run(o, b))
    }

    /// The stored pages of Vmo `vmo` among its pages `[first, end)`, as one file range:
    /// `(offset, pages)` (`index/`).
    pub fn data_run(&self, vmo: u32, first: u64, end: u64) -> SnapResult<Option<(u64, u64)>> {
        self.index
            .data_run(vmo, first, end, &|o, b| self.read_run(o, b))
    }

    /// Reads `buf.len()` bytes at `offset` with one `pread`, after checking that the file has
    /// not changed since `open`. The caller checks each page's hash (`check_page`) before use.
    pub fn read_run(&self, offset: u64, buf: &mut [u8]) -> SnapResult<()> {
        self.check_unchanged()?;
        read_exact_at(&self.file, &self.path, buf, offset)
    }

    /// `PageChecksum` unless `page_bytes` hash to `hash`.
    pub fn check_page(vmo: u32, page: u64, hash: u64, page_bytes: &[u8]) -> SnapResult<()> {
        let computed = page_hash(page_bytes);
        if computed != hash {
            return Err(SnapshotError::PageChecksum {
                vmo,
                page,
                stored: hash,
                computed,
            });
        }
        Ok(())
    }

    /// Reads and verifies one stored page (and that the file has not changed since `open`).
    pub fn read_page(
        &self,
        vmo: u32,
        page: u64,
        offset: u64,
        hash: u64,
        buf: &mut [u8],
    ) -> SnapResult<()> {
        self.read_run(offset, buf)?;
        Self::check_page(vmo, page, hash, buf)
    }

    /// `FileChanged` if the open file's size or times moved since `open`.
    pub fn check_unchanged(&self) -> SnapResult<()> {
        let m = self
            .file
            .metadata()
            .map_err(|e| SnapshotError::io("fstat", &self.path, e))?;
        let now = Stamp::of(&m);
        if now != self.stamp {
            return Err(SnapshotError::FileChanged {
                path: self.path.clone(),
                detail: format!(
                    "size {} → {}, mtime {:?} → {:?}, ctime {:?} → {:?}",
                    self.stamp.size,
                    now.size,
                    self.stamp.mtime,
                    now.mtime,
                    self.stamp.ctime,
                    now.ctime
                ),
            });
        }
        Ok(())
    }

    /// Checks everything now (the `--verify` option): a 1.2 file's whole index (its section
    /// CRC, the identity, every chunk), then every stored page's hash; the first bad one is
    /// the error.
    pub fn verify_pages(&self) -> SnapResult<()> {
        if self.index.is_chunked() {
            let (_, identity) = PageIndex::load(
                &self.file,
                &self.path,
                self.header.section(SectionKind::PageIndex),
                self.header.identity_hasher(),
                self.header.section(SectionKind::Pages).offset,
            )?;
            if identity != self.header.identity {
                return Err(SnapshotError::Malformed {
                    section: "header",
                    detail: format!(
                        "identity {} recorded, {identity} computed",
                        self.header.identity
                    ),
                });
            }
        }
        let mut buf = vec![0u8; PAGE as usize];
        for vmo in 0..self.layout.vmos.len() as u32 {
            for (page, slot) in self.pages_of(vmo)? {
                if let Slot::Data { offset, hash } = slot {
                    self.read_page(vmo, page, offset, hash, &mut buf)?;
                }
            }
        }
        Ok(())
    }
}
