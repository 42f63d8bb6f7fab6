//! Restoring a guest from a snapshot file or a chain (a base and diffs over it, base first).
//!
//! `open_chain` opens and checks every file (`SnapshotFile::open`) and the chain itself: the
//! first file is a full snapshot, each later one a diff whose recorded base identity is the
//! previous file's identity, all with the same layout — every refusal is a typed error before
//! any VM exists. `restore` then builds one pager-backed Vmo per layout Vmo (`FilePager` over
//! the chain), maps them as recorded (`allow_faults`: pager Vmos), creates the VM, restores the
//! newest file's vCPU state and makes the restored memory the guest's reset point (so `reset`
//! returns to the snapshot and a diff saved later is relative to the newest file). No page is
//! read unless `eager` (then every stored page is read and installed before the guest runs),
//! `verify` (every stored page's hash is checked up front), or the newest file carries a
//! working set (format 1.1) and `prefetch` is `Prefetch::Recorded` (the default): then, after
//! the reset point is set, that set is installed in bulk before the guest runs
//! (`Guest::prefetch_spans`: runs less than `MERGE_GAP` pages apart merged into spans, each
//! span one `Vmar::prefault` for read whose pages the pager reads with one `pread` per layer
//! — `pager.rs` read-ahead — then the runs the recorded run wrote re-installed writable), so
//! the guest's first run takes a demand fault only for pages outside the recorded set (and
//! its gaps).
//!
//! The restored guest forks like any other: its Vmos are pager-backed, so `Vmar::fork` makes
//! `SnapshotAtLeastOnWrite` children, exact here because the files never change (`file.rs`).

use std::path::PathBuf;
use std::sync::Arc;

use vmo::{MapOptions, VmPerms, Vmo, VmoFlags};

use super::error::{SnapResult, SnapshotError};
use super::file::{Slot, SnapshotFile};
use super::format::PAGE;
use super::pager::{Chain, FilePager};
use crate::guest::Guest;
use crate::memory::frames::HostFrames;
use crate::vmm::vcpu_state::VcpuState;

/// Runs of the working set at most this many pages apart are prefetched as one span (the gap
/// pages too: a few extra page reads cost less than another install and read).
pub const MERGE_GAP: u64 = 8;

/// What a restore does with the working set the newest file carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prefetch {
    /// Install it in bulk before the guest runs.
    #[default]
    Recorded,
    /// Leave it: every page arrives on demand.
    Off,
}

/// How to restore.
#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreOptions {
    /// Read and install every stored page before the guest runs.
    pub eager: bool,
    /// Check every stored page's hash before the guest runs.
    pub verify: bool,
    /// Prefetch the newest file's working set, if it has one.
    pub prefetch: Prefetch,
}

/// A restored guest, its vCPU state (what `reset` and `fork` take) and its file chain.
pub struct Restored {
    pub guest: Guest,
    pub state: VcpuState,
    pub chain: Arc<Chain>,
    /// Pages installed from the newest file's working set before the guest ran (with the gap
    /// pages between runs merged into one span: at most `MERGE_GAP` per gap).
    pub prefetched: u64,
}

/// Opens `paths` (base first) and checks that they form a chain (module documentation).
pub fn open_chain(paths: &[PathBuf]) -> SnapResult<Vec<SnapshotFile>> {
    let mut layers: Vec<SnapshotFile> = Vec::with_capacity(paths.len());
    for path in paths {
        let f = SnapshotFile::open(path)?;
        match layers.last() {
            None if f.header.is_diff() => {
                return Err(SnapshotError::BaseMissing {
                    diff: path.clone(),
                    base: f.header.base,
                })
            }
            None => {}
            Some(prev) => {
                if !f.header.is_diff() {
                    return Err(SnapshotError::LayoutMismatch {
                        path: path.clone(),
                        detail: "a full snapshot cannot follow another layer".into(),
                    });
                }
                if f.header.base != prev.identity() {
                    return Err(SnapshotError::BaseMismatch {
                        diff: path.clone(),
                        expected: f.header.base,
                        found: prev.identity(),
                    });
                }
                if f.layout.vmos != prev.layout.vmos || f.layout.mem_size != prev.layout.mem_size {
                    return Err(SnapshotError::LayoutMismatch {
                        path: path.clone(),
                        detail: format!(
                            "{} vmos / {:#x} bytes over {} vmos / {:#x} bytes",
                            f.layout.vmos.len(),
                            f.layout.mem_size,
                            prev.layout.vmos.len(),
                            prev.layout.mem_size
                        ),
                    });
                }
            }
        }
        layers.push(f);
    }
    if layers.is_empty() {
        return Err(SnapshotError::Unsupported("no snapshot file given".into()));
    }
    Ok(layers)
}

/// Restores the chain `paths` (base first) into a new guest (module documentation).
pub fn restore(
    frames: &HostFrames,
    paths: &[PathBuf],
    opts: RestoreOptions,
) -> SnapResult<Restored> {
    let layers = open_chain(paths)?;
    if opts.verify {
        for l in &layers {
            l.verify_pages()?;
        }
    }
    restore_layers(frames, layers, opts)
}

/// `restore` over files already opened and checked by `open_chain`.
pub fn restore_layers(
    frames: &HostFrames,
    layers: Vec<SnapshotFile>,
    opts: RestoreOptions,
) -> SnapResult<Restored> {
    let newest = layers
        .last()
        .ok_or_else(|| SnapshotError::Unsupported("no snapshot file given".into()))?;
    let state = newest.vcpu_state()?;
    let layout = newest.layout.clone();
    let working_set = match opts.prefetch {
        Prefetch::Recorded => newest.working_set.clone(),
        Prefetch::Off => None,
    };
    let chain = Chain::new(layers);
    let mut vmos = Vec::with_capacity(layout.vmos.len());
    for (id, desc) in layout.vmos.iter().enumerate() {
        let pager = Arc::new(FilePager::new(chain.clone(), id as u32));
        vmos.push(Vmo::new_paged(
            &frames.pool,
            desc.size,
            VmoFlags::empty(),
            pager,
        )?);
    }
    let mut guest = Guest::with_layout(frames, layout.mem_size, |vmar| {
        for m in &layout.mappings {
            let perms = VmPerms::from_bits_truncate(m.perms);
            let mut o = MapOptions::specific(m.base, perms).allow_faults();
            if m.shared {
                o = o.shared();
            }
            vmar.map(&vmos[m.vmo as usize], m.vmo_offset, m.len, o)?;
        }
        Ok(())
    })?;
    if opts.eager {
        for m in &layout.mappings {
            let (first, last) = (m.vmo_offset / PAGE, (m.vmo_offset + m.len) / PAGE);
            for page in first..last {
                if let Some((_, Slot::Data { .. })) = chain.lookup(m.vmo, page)? {
                    if let Err(e) = guest.prefault(m.base + (page - first) * PAGE, PAGE, false) {
                        let typed = chain.take_failures().into_iter().next();
                        return Err(typed.unwrap_or(SnapshotError::Guest(e)));
                    }
                }
            }
        }
    }
    guest.vm_mut().restore_state(&state)?;
    guest.set_reset_point()?;
    // After the reset point: the reset point write-protects every installed page, which would
    // turn each prefetched write into a fault again.
    let mut prefetched = 0;
    if let Some(set) = &working_set {
        prefetched = guest.prefetch_spans(set, true, MERGE_GAP).map_err(|e| {
            let typed = chain.take_failures().into_iter().next();
            typed.unwrap_or(SnapshotError::Guest(e))
        })?;
    }
    Ok(Restored {
        guest,
        state,
        chain,
        prefetched,
    })
}
