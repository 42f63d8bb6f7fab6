//! Byte-level access to a Vmo's contents from the host side: `read`, `write`, `clear` at any
//! offset and length.
//!
//! Invariants: a read never commits anonymous pages (uncommitted pages read as zeros) but does
//! commit pager pages; a write makes each touched page private first (copy-on-write), and a page
//! written whole is committed with `commit_overwrite` / a fresh frame instead of being read or
//! copied; translations of frames a write replaces or a clear drops are dropped *before* the
//! frames change, and a backend failure there returns the error with nothing written.

use alloc::vec::Vec;

use super::{check_range, RangeChange, Rights, Vmo, VmoFlags, PAGE_SIZE};
use crate::Result;

/// One piece of a byte range that lies inside one page.
struct Chunk {
    /// Root page index.
    idx: u64,
    /// Offset inside the page.
    in_page: usize,
    /// Offset inside the caller's buffer.
    buf_off: usize,
    len: usize,
}

/// Splits root bytes `[start, start + len)` into per-page chunks.
fn chunks(start: u64, len: u64) -> impl Iterator<Item = Chunk> {
    let end = start + len;
    let mut pos = start;
    core::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let in_page = pos % PAGE_SIZE;
        let n = (PAGE_SIZE - in_page).min(end - pos);
        let chunk = Chunk {
            idx: pos / PAGE_SIZE,
            in_page: in_page as usize,
            buf_off: (pos - start) as usize,
            len: n as usize,
        };
        pos += n;
        Some(chunk)
    })
}

impl Vmo {
    /// Copies `buf.len()` bytes at `offset` out of the Vmo.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.require(Rights::READ)?;
        check_range(offset, buf.len() as u64, self.size())?;
        let (_, base) = self.root();
        let mut pages = self.lock_root_pages();
        for c in chunks(base + offset, buf.len() as u64) {
            let dst = &mut buf[c.buf_off..c.buf_off + c.len];
            match pages.get(c.idx) {
                Some(frame) => frame.read(c.in_page, dst)?,
                None if pages.source.pager.is_some() => pages
                    .commit(&self.inner.pool, c.idx, false)?
                    .0
                    .read(c.in_page, dst)?,
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    /// Copies `data` into the Vmo at `offset`. Shared (copy-on-write) frames the write replaces
    /// lose their translations first, in one announcement; if that fails, nothing is written.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_counted(offset, data).map(drop)
    }

    /// `write`, also saying how many pages it committed and how many shared frames it copied
    /// (the Vmar counts them with its fault path's).
    pub(crate) fn write_counted(&self, offset: u64, data: &[u8]) -> Result<(u64, u64)> {
        self.require(Rights::WRITE)?;
        check_range(offset, data.len() as u64, self.size())?;
        let (_, base) = self.root();
        let mut pages = self.lock_root_pages();
        let start = base + offset;
        let len = data.len() as u64;
        let announced = shared_slots(&mut pages, chunks(start, len).map(|c| c.idx));
        self.unmap_pages(&announced)?;
        let (mut commits, mut copies) = (0, 0);
        for c in chunks(start, len) {
            let whole = c.len == PAGE_SIZE as usize;
            let (frame, origin) = pages.private(&self.inner.pool, c.idx, whole, &mut |idx| {
                self.unmap_unannounced(&announced, idx)
            })?;
            commits += origin.committed as u64;
            copies += (origin.copied || origin.replaced) as u64;
            frame.write(c.in_page, &data[c.buf_off..c.buf_off + c.len])?;
            pages.mark_dirty(c.idx)?;
        }
        Ok((commits, copies))
    }

    /// Zeroes `len` bytes at `offset`. Whole anonymous pages are decommitted (they read as zeros
    /// afterwards); partial, pinned, contiguous and pager pages are written with zeros. The
    /// translations of every frame this drops or replaces go first, in one announcement; if
    /// that fails, nothing changes. A later failure (no frame for a copy, pager) leaves the
    /// range partly cleared.
    pub fn clear(&self, offset: u64, len: u64) -> Result<()> {
        self.require(Rights::WRITE)?;
        check_range(offset, len, self.size())?;
        let (_, base) = self.root();
        let contiguous = self.inner.flags.contains(VmoFlags::CONTIGUOUS);
        let mut pages = self.lock_root_pages();
        let mut dropped = Vec::new();
        let mut written = Vec::new();
        for c in chunks(base + offset, len) {
            let whole = c.len == PAGE_SIZE as usize;
            if whole && pages.source.pager.is_none() && !contiguous && !pages.is_pinned(c.idx) {
                if pages.is_committed(c.idx) {
                    dropped.push(c.idx);
                }
            } else {
                written.push(c);
            }
        }
        let mut announced = shared_slots(&mut pages, written.iter().map(|c| c.idx));
        announced.extend_from_slice(&dropped);
        announced.sort_unstable();
        self.unmap_pages(&announced)?;
        let mut result = Ok(());
        for c in written {
            let whole = c.len == PAGE_SIZE as usize;
            let step = pages
                .private(&self.inner.pool, c.idx, whole, &mut |idx| {
                    self.unmap_unannounced(&announced, idx)
                })
                .and_then(|(frame, _)| {
                    frame.fill_zero(c.in_page, c.len)?;
                    pages.mark_dirty(c.idx)
                });
            if let Err(e) = step {
                result = Err(e);
                break;
            }
        }
        let mut freed = Vec::new();
        for idx in dropped {
            match pages.remove(idx) {
                Ok(Some(f)) => freed.push(f),
                Ok(None) => {}
                Err(e) => {
                    result = result.and(Err(e));
                }
            }
        }
        pages.debug_check();
        drop(pages);
        drop(freed);
        result
    }

    /// Drops every translation of the root pages `slots` (ascending indices), telling each
    /// observer once. An observer's failure is returned (the caller then keeps the frames).
    pub(super) fn unmap_pages(&self, slots: &[u64]) -> Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        let ranges: Vec<(u64, u64)> = runs(slots)
            .into_iter()
            .map(|(a, b)| (a * PAGE_SIZE, (b - a) * PAGE_SIZE))
            .collect();
        self.root_observers()
            .lock()
            .notify(&ranges, RangeChange::Unmap)
    }

    /// `before_replace` hook of a write: slot `idx`'s translations were dropped already if it
    /// is in `announced` (ascending); otherwise (a frame that became shared after the
    /// announcement was computed, which the lock rules out) they are dropped now.
    fn unmap_unannounced(&self, announced: &[u64], idx: u64) -> Result<()> {
        match announced.binary_search(&idx) {
            Ok(_) => Ok(()),
            Err(_) => self.unmap_pages(&[idx]),
        }
    }
}

/// The committed slots among `slots` whose frames are shared (a write must replace them),
/// ascending and without duplicates.
fn shared_slots(pages: &mut super::Pages, slots: impl Iterator<Item = u64>) -> Vec<u64> {
    let mut out: Vec<u64> = slots
        .filter(|&idx| pages.is_committed(idx) && !pages.is_private(idx))
        .collect();
    out.dedup();
    out
}

/// Coalesces ascending indices into half-open runs.
fn runs(sorted: &[u64]) -> alloc::vec::Vec<(u64, u64)> {
    let mut out: alloc::vec::Vec<(u64, u64)> = alloc::vec::Vec::new();
    for &i in sorted {
        match out.last_mut() {
            Some(last) if last.1 == i => last.1 = i + 1,
            _ => out.push((i, i + 1)),
        }
    }
    out
}
