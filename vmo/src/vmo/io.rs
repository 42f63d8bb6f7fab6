//! Byte-level access to a Vmo's contents from the host side: `read`, `write`, `clear` at any
//! offset and length.
//!
//! Invariants: a read never commits anonymous pages (uncommitted pages read as zeros) but does
//! commit pager pages; a write makes each touched page private first (copy-on-write), and a page
//! written whole is committed with `commit_overwrite` / a fresh frame instead of being read or
//! copied; translations of frames a write replaced are dropped before the call returns.

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

    /// Copies `data` into the Vmo at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.require(Rights::WRITE)?;
        check_range(offset, data.len() as u64, self.size())?;
        let (_, base) = self.root();
        let mut pages = self.lock_root_pages();
        let mut replaced = Vec::new();
        let mut result = Ok(());
        for c in chunks(base + offset, data.len() as u64) {
            let whole = c.len == PAGE_SIZE as usize;
            let step = pages
                .private(&self.inner.pool, c.idx, whole)
                .and_then(|(frame, origin)| {
                    if origin.replaced {
                        replaced.push(c.idx);
                    }
                    frame.write(c.in_page, &data[c.buf_off..c.buf_off + c.len])?;
                    pages.mark_dirty(c.idx)
                });
            if let Err(e) = step {
                result = Err(e);
                break;
            }
        }
        self.unmap_pages(&replaced);
        result
    }

    /// Zeroes `len` bytes at `offset`. Whole anonymous pages are decommitted (they read as zeros
    /// afterwards); partial, pinned, contiguous and pager pages are written with zeros.
    pub fn clear(&self, offset: u64, len: u64) -> Result<()> {
        self.require(Rights::WRITE)?;
        check_range(offset, len, self.size())?;
        let (_, base) = self.root();
        let contiguous = self.inner.flags.contains(VmoFlags::CONTIGUOUS);
        let mut pages = self.lock_root_pages();
        let mut replaced = Vec::new();
        let mut dropped = Vec::new();
        let mut result = Ok(());
        for c in chunks(base + offset, len) {
            let whole = c.len == PAGE_SIZE as usize;
            if whole && pages.source.pager.is_none() && !contiguous && !pages.is_pinned(c.idx) {
                if pages.get(c.idx).is_some() {
                    dropped.push(c.idx);
                }
                continue;
            }
            let step = pages
                .private(&self.inner.pool, c.idx, whole)
                .and_then(|(frame, origin)| {
                    if origin.replaced {
                        replaced.push(c.idx);
                    }
                    frame.fill_zero(c.in_page, c.len)?;
                    pages.mark_dirty(c.idx)
                });
            if let Err(e) = step {
                result = Err(e);
                break;
            }
        }
        replaced.extend_from_slice(&dropped);
        replaced.sort_unstable();
        self.unmap_pages(&replaced);
        let mut freed = Vec::new();
        for idx in dropped {
            if let Ok(Some(f)) = pages.remove(idx) {
                freed.push(f);
            }
        }
        drop(pages);
        drop(freed);
        result
    }

    /// Drops every translation of the root pages `slots` (ascending indices), telling each
    /// observer once.
    pub(super) fn unmap_pages(&self, slots: &[u64]) {
        if slots.is_empty() {
            return;
        }
        let ranges: Vec<(u64, u64)> = runs(slots)
            .into_iter()
            .map(|(a, b)| (a * PAGE_SIZE, (b - a) * PAGE_SIZE))
            .collect();
        self.root_observers()
            .lock()
            .notify(&ranges, RangeChange::Unmap);
    }
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
