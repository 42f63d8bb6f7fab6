//! The snapshot-file rows of `guest-vm bench` (ids from issue 14), on guests of the smallest and
//! the biggest `--sizes` whose data pages are all written (every page holds data):
//!
//! - `save-vs-write` (per stored page): a full save of the biggest guest against writing the
//!   same number of bytes to a file with one `write` loop of 1 MiB buffers (both fsynced);
//! - `save-vs-write-new-file`: the same save against the same write loop into a *new* file
//!   renamed over the previous one afterwards — what a save must do (temporary name +
//!   rename, the old file never written in place), which on this host costs the kernel far
//!   more than overwriting an existing file (fresh page-cache pages instead of the ones the
//!   truncate just freed);
//! - `restore-first-run-1g` (per restore): a lazy restore plus the guest's first run (a write
//!   loop over 16 pages, which faults them in from the file) of the biggest guest, against the
//!   same for the smallest (the id names the 1 GiB / 64 MiB pair; `what` the sizes);
//! - `diff-save-pause-N` (per diff): the pause of a diff save with N dirty pages in the biggest
//!   guest against the same in the smallest (grows with dirty pages only).
//!
//! Files go to a directory under the system temporary directory, removed at the end.
//! Invariant: a save that stores fewer pages than the guest holds is an error, not a figure.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use guest_vm::snapshot::{self, RestoreOptions, SaveOptions, SnapshotError};
use guest_vm::vmm::x86_64::layout::DATA_GPA;
use guest_vm::workload::programs;
use guest_vm::{Error, Guest, HostFrames, Result, VcpuState, PAGE_SIZE};

use super::{guest_mem, loop_args, progress, row, run_done, BenchOptions, Row};
use crate::measure::{median, us};

/// Pages the first run writes.
const FIRST_RUN_PAGES: u64 = 16;

/// A snapshot error as the bench's error (a guest error stays itself).
pub(super) fn snap_err(e: SnapshotError) -> Error {
    match e {
        SnapshotError::Guest(e) => e,
        other => Error::BadState(other.to_string()),
    }
}

/// A guest of `mib` MiB of data (all written) with the write loop loaded, and its entry state.
fn filled(frames: &HostFrames, mib: u64) -> Result<(Guest, VcpuState, u64)> {
    let data = mib << 20;
    let mut g = Guest::new(frames, guest_mem(data))?;
    g.vm_mut()
        .load(&programs::write_loop(), loop_args(FIRST_RUN_PAGES))?;
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251 + 1) as u8).collect();
    let mut at = 0;
    while at < data {
        let n = chunk.len().min((data - at) as usize);
        g.vmar().write(DATA_GPA + at, &chunk[..n])?;
        at += n as u64;
    }
    let state = g.snapshot()?;
    Ok((g, state, data / PAGE_SIZE))
}

fn save(g: &Guest, s: &VcpuState, p: &Path, o: &SaveOptions) -> Result<snapshot::SaveStats> {
    snapshot::save(g, s, p, o).map_err(snap_err)
}

/// Where the write loop writes.
#[derive(Clone, Copy)]
enum Target {
    /// Truncates and rewrites the file at the path.
    Overwrite,
    /// Writes a new file beside it and renames it over the path (as a save does).
    NewFile,
}

/// µs to write `bytes` bytes to `path` in 1 MiB `write`s, then fsync (and rename, `NewFile`).
fn write_loop_us(path: &Path, bytes: u64, target: Target) -> Result<f64> {
    let sys = |err| Error::Sys {
        what: "bench write loop",
        err,
    };
    let buf = vec![0x5au8; 1 << 20];
    let tmp = path.with_extension("tmp");
    let t = Instant::now();
    let mut f = match target {
        Target::Overwrite => std::fs::File::create(path),
        Target::NewFile => std::fs::File::create(&tmp),
    }
    .map_err(sys)?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).map_err(sys)?;
        left -= n as u64;
    }
    f.sync_all().map_err(sys)?;
    drop(f);
    if let Target::NewFile = target {
        std::fs::rename(&tmp, path).map_err(sys)?;
    }
    Ok(us(t.elapsed()))
}

/// Restore + first run of `path`, µs.
fn restore_first_run(frames: &HostFrames, path: &Path) -> Result<f64> {
    let t = Instant::now();
    let mut r = snapshot::restore(frames, &[path.to_path_buf()], RestoreOptions::default())
        .map_err(snap_err)?;
    run_done(&mut r.guest)?;
    Ok(us(t.elapsed()))
}

/// Median pause (µs) of a diff save of `dirty` scattered pages in `g` (saved full at `base`).
fn diff_pause(
    g: &Guest,
    s: &VcpuState,
    dir: &Path,
    base: &Path,
    dirty: u64,
    reps: usize,
) -> Result<f64> {
    let id = snapshot::save::base_identity(base).map_err(snap_err)?;
    let opts = SaveOptions {
        diff_base: Some(id),
        ..SaveOptions::default()
    };
    let pages = (g.mem_size() - DATA_GPA) / PAGE_SIZE;
    let stride = (pages / dirty).max(1);
    let mut samples = Vec::new();
    for rep in 0..reps {
        for i in 0..dirty {
            let gpa = DATA_GPA + ((i * stride) % pages) * PAGE_SIZE;
            g.vmar().write(gpa, &[rep as u8 + 2])?;
        }
        let t = Instant::now();
        let st = save(g, s, &dir.join("diff.gms"), &opts)?;
        samples.push(us(t.elapsed()));
        if st.data_pages < dirty.min(pages) {
            return Err(Error::BadState(format!(
                "diff stored {} of {dirty} dirty pages",
                st.data_pages
            )));
        }
        g.vmar().reset()?;
    }
    Ok(median(&samples))
}

pub(super) fn snapshot_rows(
    o: &BenchOptions,
    frames: &HostFrames,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let small = o.sizes_mib.iter().copied().min().unwrap_or(64);
    let big = o.sizes_mib.iter().copied().max().unwrap_or(1024);
    let dir: PathBuf = std::env::temp_dir().join(format!("gm-bench-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| Error::Sys {
        what: "bench snapshot dir",
        err,
    })?;
    let reps = o.reps.clamp(1, 3);
    progress(&format!(
        "snapshot: save / restore / diff of {small} and {big} MiB guests"
    ));
    let mut first_run = Vec::new();
    let mut pauses: Vec<Vec<f64>> = Vec::new();
    let mut save_write = (0.0, 0.0, 0.0, 0);
    for (i, mib) in [small, big].into_iter().enumerate() {
        let (g, state, pages) = filled(frames, mib)?;
        let path = dir.join(format!("full-{mib}.gms"));
        let mark = SaveOptions {
            mark_reset_point: true,
            ..SaveOptions::default()
        };
        let (mut ours, mut base, mut fresh) = (Vec::new(), Vec::new(), Vec::new());
        let mut stored = 0;
        for _ in 0..reps {
            let t = Instant::now();
            stored = save(&g, &state, &path, &mark)?.data_pages;
            ours.push(us(t.elapsed()));
            let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            base.push(write_loop_us(
                &dir.join("plain.bin"),
                bytes,
                Target::Overwrite,
            )?);
        }
        if stored < pages {
            return Err(Error::BadState(format!(
                "saved {stored} of {pages} data pages"
            )));
        }
        if i == 1 {
            save_write = (median(&ours), median(&base), 0.0, stored);
        }
        let runs: Vec<f64> = (0..reps)
            .map(|_| restore_first_run(frames, &path))
            .collect::<Result<_>>()?;
        first_run.push(median(&runs));
        let mut p = Vec::new();
        for &d in &o.dirty {
            p.push(diff_pause(&g, &state, &dir, &path, d, reps)?);
        }
        pauses.push(p);
        // Last, so that freeing the replaced files' blocks does not land in the pauses above.
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        for _ in 0..reps {
            fresh.push(write_loop_us(
                &dir.join("fresh.bin"),
                bytes,
                Target::NewFile,
            )?);
        }
        if i == 1 {
            save_write.2 = median(&fresh);
        }
    }
    let (ours, base, fresh, stored) = save_write;
    rows.push(row(
        "save-vs-write",
        format!("full save of a {big} MiB guest ({stored} pages), per page"),
        "snapshot save",
        ours / stored as f64,
        "one write loop, same bytes",
        base / stored as f64,
    ));
    rows.push(row(
        "save-vs-write-new-file",
        format!("full save of a {big} MiB guest ({stored} pages), per page"),
        "snapshot save (temporary file + rename)",
        ours / stored as f64,
        "one write loop, same bytes, into a new file + rename",
        fresh / stored as f64,
    ));
    rows.push(row(
        "restore-first-run-1g",
        format!("lazy restore + first run ({FIRST_RUN_PAGES} pages), {big} MiB vs {small} MiB"),
        &format!("{big} MiB snapshot"),
        first_run[1],
        &format!("{small} MiB snapshot"),
        first_run[0],
    ));
    for (k, &d) in o.dirty.iter().enumerate() {
        rows.push(row(
            format!("diff-save-pause-{d}"),
            format!("diff save with {d} dirty pages, {big} MiB vs {small} MiB guest"),
            &format!("{big} MiB guest"),
            pauses[1][k],
            &format!("{small} MiB guest"),
            pauses[0][k],
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
