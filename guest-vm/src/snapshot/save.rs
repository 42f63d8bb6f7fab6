//! Saving a stopped `Guest` into a snapshot file: full saves and diffs.
//!
//! What is written (layout in `format.rs`): the header (last, once every section is known), the
//! vCPU section, the layout section, the pages (page aligned, in (Vmo, page) order), the
//! page index, its chunk table (format 1.2, `index::ChunkTable`) and, when the caller recorded one (`SaveOptions::working_set`), the working-set
//! section: the pages the guest touched in its first run after this snapshot point (recorded
//! by the Vmar — e.g. in a fork of the saved guest, or in an earlier restore of the same
//! memory), which a restore prefetches. A *full* save stores every page that holds data — committed in the Vmo (its own
//! or shared copy-on-write frames), or, for a restored (pager-backed) Vmo, available from its
//! snapshot chain — and skips all-zero pages (absent = zero). A *diff* stores only the pages
//! changed since the Vmos' reset point (`Vmo::changed_pages`: pages written since the restore,
//! the fork, or the last `mark_reset_point` save), zero pages as zero entries, and records the
//! base's identity; its cost grows with the changed pages, not the guest.
//!
//! The caller guarantees what a diff is relative to: the reset point's memory must be the
//! base file's (true right after `restore` of that file, in a fork child of a guest saved at the
//! fork point, and after a save with `mark_reset_point`).
//!
//! Invariants: the file appears under its name only complete (written to a temporary name in
//! the same directory, fsynced, renamed; any failure removes the temporary file), an existing
//! file is never written in place (so a guest restored from it keeps an immutable file); a
//! full disk is `SnapshotError::NoSpace`.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, IsTerminal, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmo::{Vmar, Vmo};

use super::error::{SnapResult, SnapshotError};
use super::file::{Slot, SnapshotFile};
use super::format::{
    page_hash, Header, Identity, IndexEntry, Section, SectionKind, ENTRY_ZERO, HEADER_LEN, PAGE,
};
use super::index::ChunkTable;
use super::pager::Chain;
use super::sections::{
    encode, LayoutSection, MappingDesc, VcpuSection, VmoDesc, WorkingSetSection,
};
use crate::guest::Guest;
use crate::memory::stage2::KvmStage2;
use crate::vmm::vcpu_state::VcpuState;

/// How to save.
#[derive(Clone, Default)]
pub struct SaveOptions {
    /// Write a diff over this base (its identity is recorded; layouts must match).
    pub diff_base: Option<Identity>,
    /// The chain a restored guest's pager-backed Vmos read from (so a full save copies the
    /// pages it has without reading every page of the guest).
    pub source: Option<Arc<Chain>>,
    /// After saving, make the saved memory the guest's reset point (a later diff is then
    /// relative to this file; `reset` returns here).
    pub mark_reset_point: bool,
    /// Show a progress bar (only when stderr is a terminal).
    pub progress: bool,
    /// Store this working set (guest-physical pages of the first run after the snapshot
    /// point, `Vmar::recorded`) for restores to prefetch.
    pub working_set: Option<vmo::WorkingSet>,
}

/// What a save wrote.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SaveStats {
    pub identity: String,
    pub bytes: u64,
    pub data_pages: u64,
    pub zero_pages: u64,
    pub diff: bool,
    /// Pages of the stored working set (0 without one).
    pub working_set_pages: u64,
}

/// The guest's layout and its distinct Vmos, in address order.
pub fn layout_of(vmar: &Vmar<KvmStage2>, mem_size: u64) -> SnapResult<(LayoutSection, Vec<Vmo>)> {
    let mut vmos: Vec<Vmo> = Vec::new();
    let mut mappings = Vec::new();
    let mut gpa = 0;
    while gpa < mem_size {
        let info = match vmar.query(gpa) {
            Ok(info) => info,
            Err(vmo::Error::NotFound) => {
                gpa += PAGE;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let id = match vmos.iter().position(|v| v.same_object(&info.vmo)) {
            Some(i) => i,
            None => {
                vmos.push(info.vmo.clone());
                vmos.len() - 1
            }
        };
        mappings.push(MappingDesc {
            base: info.base,
            len: info.len,
            vmo: id as u32,
            vmo_offset: info.vmo_offset,
            perms: info.perms.bits(),
            shared: info.shared,
        });
        gpa = info.end();
    }
    let layout = LayoutSection {
        mem_size,
        vmos: vmos.iter().map(|v| VmoDesc { size: v.size() }).collect(),
        mappings,
    };
    Ok((layout, vmos))
}

/// The pages of Vmo `id` a save stores (before zero detection).
fn pages_to_save(vmo: &Vmo, id: u32, opts: &SaveOptions) -> SnapResult<Vec<u64>> {
    if opts.diff_base.is_some() {
        return Ok(vmo.changed_pages());
    }
    let n = vmo.size() / PAGE;
    if !vmo.is_pager_backed() {
        return Ok((0..n).filter(|&p| vmo.is_committed(p)).collect());
    }
    match &opts.source {
        Some(chain) => {
            let mut pages: std::collections::BTreeSet<u64> =
                (0..n).filter(|&p| vmo.is_committed(p)).collect();
            for layer in &chain.layers {
                pages.extend(layer.pages_of(id)?.into_iter().map(|(p, _)| p));
            }
            Ok(pages.into_iter().filter(|&p| p < n).collect())
        }
        None => Ok((0..n).collect()),
    }
}

/// Whether a changed page of a restored Vmo still holds what its chain has (a page committed
/// from the file by a read, or a zero fill): a diff need not store it. `hash` 0 = zero page.
fn unchanged(source: Option<&Chain>, vmo: u32, page: u64, hash: u64) -> bool {
    let Some(chain) = source else {
        return false;
    };
    match chain.lookup(vmo, page) {
        Ok(Some((_, Slot::Data { hash: h, .. }))) => hash != 0 && h == hash,
        Ok(Some((_, Slot::Zero)) | None) => hash == 0,
        // The chain cannot say what it holds: store the page.
        Err(_) => false,
    }
}

fn pad_to_page<W: Write + Seek>(w: &mut W, pos: &mut u64) -> std::io::Result<()> {
    let pad = pos.next_multiple_of(PAGE) - *pos;
    w.write_all(&vec![0u8; pad as usize])?;
    *pos += pad;
    Ok(())
}

/// Writes a whole snapshot into `w` (positioned at 0). I/O errors come back as `io::Error`
/// with `Err(Ok(..))`; model errors as `Err(Err(..))`.
fn write_snapshot<W: Write + Seek>(
    w: &mut W,
    guest: &Guest,
    state: &VcpuState,
    opts: &SaveOptions,
    bar: &indicatif::ProgressBar,
) -> Result<SaveStats, Result<std::io::Error, SnapshotError>> {
    let (layout, vmos) = layout_of(guest.vmar(), guest.mem_size()).map_err(Err)?;
    if let Some(set) = &opts.working_set {
        WorkingSetSection::from_set(set)
            .check(&layout)
            .map_err(|d| Err(SnapshotError::Unsupported(format!("working set: {d}"))))?;
    }
    let mut header = Header::new(guest.mem_size(), opts.diff_base);
    let vcpu = encode(&VcpuSection::from_state(state));
    let layout_bytes = encode(&layout);
    w.write_all(&[0u8; HEADER_LEN]).map_err(Ok)?;
    let mut pos = HEADER_LEN as u64;
    for (kind, bytes) in [
        (SectionKind::Vcpu, &vcpu),
        (SectionKind::Layout, &layout_bytes),
    ] {
        w.write_all(bytes).map_err(Ok)?;
        header.set_section(
            kind,
            Section {
                offset: pos,
                length: bytes.len() as u64,
                crc32: crc32fast::hash(bytes),
            },
        );
        pos += bytes.len() as u64;
    }
    pad_to_page(w, &mut pos).map_err(Ok)?;
    let pages_at = pos;
    let plan: Vec<Vec<u64>> = vmos
        .iter()
        .enumerate()
        .map(|(i, v)| pages_to_save(v, i as u32, opts))
        .collect::<SnapResult<_>>()
        .map_err(Err)?;
    bar.set_length(plan.iter().map(|p| p.len() as u64).sum());
    let mut index = Vec::new();
    let (mut data, mut zeros) = (0u64, 0u64);
    let mut buf = vec![0u8; PAGE as usize];
    for (id, (vmo, pages)) in vmos.iter().zip(&plan).enumerate() {
        for &page in pages {
            vmo.read(page * PAGE, &mut buf)
                .map_err(|e| Err(SnapshotError::from(e)))?;
            bar.inc(1);
            let zero = buf.iter().all(|&b| b == 0);
            if zero && opts.diff_base.is_none() {
                continue;
            }
            let hash = if zero { 0 } else { page_hash(&buf) };
            if opts.diff_base.is_some() && unchanged(opts.source.as_deref(), id as u32, page, hash)
            {
                continue;
            }
            let mut entry = IndexEntry {
                vmo: id as u32,
                flags: 0,
                page,
                hash: 0,
            };
            if zero {
                entry.flags = ENTRY_ZERO;
                zeros += 1;
            } else {
                entry.hash = hash;
                w.write_all(&buf).map_err(Ok)?;
                data += 1;
            }
            entry.encode(&mut index);
        }
    }
    pos += data * PAGE;
    header.set_section(
        SectionKind::Pages,
        Section {
            offset: pages_at,
            length: data * PAGE,
            crc32: 0,
        },
    );
    w.write_all(&index).map_err(Ok)?;
    header.set_section(
        SectionKind::PageIndex,
        Section {
            offset: pos,
            length: index.len() as u64,
            crc32: crc32fast::hash(&index),
        },
    );
    pos += index.len() as u64;
    let chunks = ChunkTable::encode(&index);
    w.write_all(&chunks).map_err(Ok)?;
    header.set_section(
        SectionKind::IndexChunks,
        Section {
            offset: pos,
            length: chunks.len() as u64,
            crc32: crc32fast::hash(&chunks),
        },
    );
    pos += chunks.len() as u64;
    if let Some(set) = &opts.working_set {
        let bytes = encode(&WorkingSetSection::from_set(set));
        w.write_all(&bytes).map_err(Ok)?;
        header.set_section(
            SectionKind::WorkingSet,
            Section {
                offset: pos,
                length: bytes.len() as u64,
                crc32: crc32fast::hash(&bytes),
            },
        );
        pos += bytes.len() as u64;
    }
    header.identity = header.compute_identity(&index);
    w.seek(SeekFrom::Start(0)).map_err(Ok)?;
    w.write_all(&header.encode(true)).map_err(Ok)?;
    w.flush().map_err(Ok)?;
    Ok(SaveStats {
        identity: header.identity.to_string(),
        bytes: pos,
        data_pages: data,
        zero_pages: zeros,
        diff: opts.diff_base.is_some(),
        working_set_pages: opts.working_set.as_ref().map_or(0, |s| s.len() as u64),
    })
}

/// Removes the temporary file unless the save completed.
struct TempFile {
    path: PathBuf,
    done: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn temp_name(path: &Path) -> SnapResult<PathBuf> {
    let name = path.file_name().ok_or_else(|| SnapshotError::Io {
        what: "save (no file name)",
        path: path.to_path_buf(),
        err: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".tmp-{}", std::process::id()));
    Ok(path.with_file_name(tmp))
}

/// Saves `guest` (stopped at an exit) with vCPU `state` into `path` (see the module doc).
pub fn save(
    guest: &Guest,
    state: &VcpuState,
    path: &Path,
    opts: &SaveOptions,
) -> SnapResult<SaveStats> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_file() {
            return Err(SnapshotError::NotRegularFile {
                path: path.to_path_buf(),
                kind: if m.is_dir() {
                    "directory"
                } else {
                    "special file"
                },
            });
        }
    }
    let tmp_path = temp_name(path)?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp_path)
        .map_err(|e| SnapshotError::io("create temporary file", &tmp_path, e))?;
    let mut tmp = TempFile {
        path: tmp_path.clone(),
        done: false,
    };
    let bar = if opts.progress && std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "saving {bar:40} {pos}/{len} pages ({elapsed}, eta {eta})",
        ) {
            b.set_style(style);
        }
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let stats = write_snapshot(&mut w, guest, state, opts, &bar).map_err(|e| match e {
        Ok(io) => SnapshotError::io("write", path, io),
        Err(e) => e,
    })?;
    bar.finish_and_clear();
    let file: File = w
        .into_inner()
        .map_err(|e| SnapshotError::io("write", path, e.into_error()))?;
    file.sync_all()
        .map_err(|e| SnapshotError::io("fsync", path, e))?;
    drop(file);
    std::fs::rename(&tmp_path, path).map_err(|e| SnapshotError::io("rename", path, e))?;
    tmp.done = true;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    if opts.mark_reset_point {
        guest.set_reset_point()?;
    }
    Ok(stats)
}

/// Opens the base of a diff and returns its identity (checking it is a snapshot).
pub fn base_identity(base: &Path) -> SnapResult<Identity> {
    Ok(SnapshotFile::open(base)?.identity())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that fails with ENOSPC after `room` bytes, like a full disk.
    struct FullDisk {
        inner: std::io::Cursor<Vec<u8>>,
        room: u64,
    }

    impl Write for FullDisk {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let pos = self.inner.position();
            if pos + buf.len() as u64 > self.room {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.inner.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Seek for FullDisk {
        fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
            self.inner.seek(to)
        }
    }

    #[test]
    fn enospc_maps_to_no_space() {
        let mut w = FullDisk {
            inner: std::io::Cursor::new(Vec::new()),
            room: 10,
        };
        let err = w.write_all(&[0u8; 64]).unwrap_err();
        let e = SnapshotError::io("write", Path::new("/x/snap"), err);
        assert!(matches!(e, SnapshotError::NoSpace { .. }), "{e}");
        assert!(e.to_string().contains("no space left"));
    }

    #[test]
    fn temp_name_is_hidden_beside_the_target() {
        let t = temp_name(Path::new("/a/b/snap.gms")).unwrap();
        assert_eq!(t.parent(), Some(Path::new("/a/b")));
        assert!(t
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".snap.gms.tmp-"));
    }
}
