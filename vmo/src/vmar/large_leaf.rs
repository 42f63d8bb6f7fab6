//! The fault path's large-leaf step: a fault on a not-present page of a physically contiguous
//! Vmo installs the whole 2 MiB block around it as one `PageSize::Size2M` leaf, where the
//! Vmo's frames allow it (`Vmar::handle_fault` calls `install_large` before the 4 KiB install).
//!
//! A block qualifies when all of these hold; otherwise the fault takes the 4 KiB path:
//! - the mapping's Vmo is `CONTIGUOUS` (frames committed at creation, never decommitted,
//!   copied or shared with a child, so a 2 MiB leaf stays valid for the mapping's life);
//! - the 2 MiB-aligned guest-physical block lies wholly inside the mapping and the Vmo, and
//!   the frame behind its first page is 2 MiB aligned (contiguity gives the other 511);
//! - dirty tracking is off (a writable large leaf would report one write fault for 512 pages);
//! - the backend accepts the leaf: `AlreadyExists` (some page of the block is installed
//!   already) and `NotSupported` fall back to the 4 KiB path.
//!
//! Invariant (as for every install): the leaf is installed while the Vmo's page lock is held,
//! over frames that lock shows are the Vmo's own, private and writable; an error installs
//! nothing.

use core::sync::atomic::Ordering;

use ept::{MemType, PageSize, S2Perms, Stage2};

use super::tree::Mapping;
use super::{Vmar, PAGE_SIZE};
use crate::{Error, FaultAccess, PageOrigin, Result, VmoFlags};

/// Bytes and pages of a large leaf.
const LARGE: u64 = PageSize::Size2M.bytes();
const LARGE_PAGES: u64 = LARGE / PAGE_SIZE;

impl<S: Stage2 + Send + 'static> Vmar<S> {
    /// Installs the 2 MiB block around `page` as one leaf if it qualifies (module doc).
    /// Returns the frame of `page`, the perms and the origin, or `None` for the 4 KiB path.
    pub(super) fn install_large(
        &self,
        m: &Mapping<S>,
        page: u64,
        access: FaultAccess,
    ) -> Result<Option<(u64, S2Perms, PageOrigin)>> {
        if !m.vmo.flags().contains(VmoFlags::CONTIGUOUS) || self.space.dirty.lock().is_some() {
            return Ok(None);
        }
        let block = page & !(LARGE - 1);
        let vmo_end = m
            .base
            .saturating_add(m.vmo.size().saturating_sub(m.vmo_offset));
        let inside = block >= m.base
            && block
                .checked_add(LARGE)
                .is_some_and(|end| end <= m.end() && end <= vmo_end);
        if !inside {
            return Ok(None);
        }
        let Some(base) = m.vmo.contiguous_base() else {
            return Ok(None);
        };
        let block_pa = base + m.vmo_offset + (block - m.base);
        if !block_pa.is_multiple_of(LARGE) {
            return Ok(None);
        }
        let perms = m.perms.to_stage2();
        let index = ((page - block) / PAGE_SIZE) as usize;
        let installed = m
            .vmo
            .fault_pages(m.vmo_page(block), LARGE_PAGES, access, |run| {
                let contiguous = run.len() as u64 == LARGE_PAGES
                    && run.iter().enumerate().all(|(i, p)| {
                        p.writable && p.frame.paddr() == block_pa + i as u64 * PAGE_SIZE
                    });
                if !contiguous {
                    return Ok(None);
                }
                let mut stage2 = self.space.stage2.lock();
                match stage2.map(block, block_pa, PageSize::Size2M, perms, MemType::WriteBack) {
                    Ok(_) => {
                        self.space.flush_if_pending(&mut stage2);
                        Ok(Some(run[index].origin))
                    }
                    Err(ept::Error::AlreadyExists | ept::Error::NotSupported) => Ok(None),
                    Err(e) => Err(Error::from(e)),
                }
            })?
            .flatten();
        Ok(installed.map(|origin| {
            self.space
                .counters
                .large_leaves
                .fetch_add(1, Ordering::Relaxed);
            (block_pa + (page - block), perms, origin)
        }))
    }
}
