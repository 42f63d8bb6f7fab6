//! Children of a Vmo: snapshots (copy-on-write) and slices (shared windows), and the two
//! copies a Vmar fork makes (`fork_child`, and `deep_copy` for DMA memory).
//!
//! - `Snapshot`: behaves as an eager copy of `[offset, offset + size)`; afterwards neither side
//!   sees the other's writes. Refused on pinned (BadState), contiguous (NotSupported) and
//!   pager-backed (NotSupported) Vmos.
//! - `SnapshotAtLeastOnWrite`: the same structure, allowed on pager-backed Vmos; pages neither
//!   side committed still come from the pager, so the child may see the parent's written-back
//!   data for pages it has not written.
//! - `Slice`: a window onto the parent's pages, not copy-on-write; not on resizable parents; must
//!   lie inside the parent.
//!
//! A snapshot may extend past the parent's end (those pages read as zeros). Creating one marks
//! every translation of the parent's window read-only (its frames are now shared).

use alloc::sync::Arc;

use super::observer::Observers;
use super::pages::Pages;
use super::{check_range, page_round_up, Body, RangeChange, Rights, Vmo, VmoFlags, PAGE_SIZE};
use crate::{Error, Result, PAGE_BYTES};

/// The kind of child `create_child` makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildKind {
    Snapshot,
    SnapshotAtLeastOnWrite,
    Slice,
}

impl Vmo {
    /// A child of `size` bytes (rounded up to pages) at page-aligned `offset`. Needs READ and
    /// DUPLICATE. Snapshot children get this handle's rights plus WRITE; slices the same rights.
    pub fn create_child(&self, kind: ChildKind, offset: u64, size: u64) -> Result<Vmo> {
        self.create_child_with(kind, offset, size, VmoFlags::empty())
    }

    /// `create_child` with creation flags for the child (only RESIZABLE, for snapshots).
    pub fn create_child_with(
        &self,
        kind: ChildKind,
        offset: u64,
        size: u64,
        flags: VmoFlags,
    ) -> Result<Vmo> {
        self.require(Rights::READ | Rights::DUPLICATE)?;
        if !offset.is_multiple_of(PAGE_SIZE) || !VmoFlags::RESIZABLE.contains(flags) {
            return Err(Error::InvalidArgs);
        }
        let size = page_round_up(size)?;
        let end = offset.checked_add(size).ok_or(Error::OutOfRange)?;
        if end > super::MAX_VMO_SIZE {
            return Err(Error::OutOfRange);
        }
        match kind {
            ChildKind::Slice => self.make_slice(offset, size, flags),
            ChildKind::Snapshot | ChildKind::SnapshotAtLeastOnWrite => {
                self.make_snapshot(kind, offset, size, flags)
            }
        }
    }

    fn make_slice(&self, offset: u64, size: u64, flags: VmoFlags) -> Result<Vmo> {
        if self.inner.flags.contains(VmoFlags::RESIZABLE) {
            return Err(Error::NotSupported);
        }
        if flags.contains(VmoFlags::RESIZABLE) {
            return Err(Error::InvalidArgs);
        }
        check_range(offset, size, self.size())?;
        let (root, base) = match &self.inner.body {
            Body::Pages { .. } => (self.inner.clone(), 0),
            Body::Slice { root, offset, .. } => (root.clone(), *offset),
        };
        let body = Body::Slice {
            root,
            offset: base + offset,
            size,
        };
        Ok(Vmo::from_body(
            &self.inner.pool,
            self.inner.flags,
            body,
            self.rights,
        ))
    }

    fn make_snapshot(
        &self,
        kind: ChildKind,
        offset: u64,
        size: u64,
        flags: VmoFlags,
    ) -> Result<Vmo> {
        let (_, base) = self.root();
        let visible_end = (offset + size).min(self.size()).max(offset);
        let (first, last) = (
            (base + offset) / PAGE_SIZE,
            (base + visible_end) / PAGE_SIZE,
        );
        let pages = self.lock_root_pages();
        // Pins first: an assigned DMA Vmo reports BadState whatever else it is.
        if pages.any_pinned_in(first, last) {
            return Err(Error::BadState);
        }
        if self.inner.flags.contains(VmoFlags::CONTIGUOUS) {
            return Err(Error::NotSupported);
        }
        if pages.source.pager.is_some() && kind == ChildKind::Snapshot {
            return Err(Error::NotSupported);
        }
        let child_pages: Pages = pages.snapshot(first, last, size);
        if child_pages.committed_pages() > 0 {
            // The window's frames are shared now: no translation may keep writing them.
            // On a backend failure the child (and its frame references) is dropped unmade.
            self.notify(
                first * PAGE_SIZE,
                (last - first) * PAGE_SIZE,
                RangeChange::WriteProtect,
            )?;
        }
        drop(pages);
        let body = Body::Pages {
            pages: crate::sync::Mutex::new(child_pages),
            observers: crate::sync::Mutex::new(Observers::default()),
        };
        let child_flags = flags | (self.inner.flags & VmoFlags::DMA);
        Ok(Vmo {
            inner: Arc::new(super::VmoInner {
                pool: self.inner.pool.clone(),
                flags: child_flags,
                body,
            }),
            rights: self.rights | Rights::WRITE,
        })
    }

    /// The snapshot child a Vmar fork maps: the whole object, copy-on-write
    /// (`SnapshotAtLeastOnWrite` when pager-backed), with a reset point, same rights as this
    /// handle. Internal: the mapping's handle may lack DUPLICATE.
    pub(crate) fn fork_child(&self) -> Result<Vmo> {
        let full = self.restricted(Rights::ALL);
        let kind = if self.is_pager_backed() {
            ChildKind::SnapshotAtLeastOnWrite
        } else {
            ChildKind::Snapshot
        };
        let flags = self.inner.flags & VmoFlags::RESIZABLE;
        let child = full.create_child_with(kind, 0, self.size(), flags)?;
        child.set_reset_point()?;
        Ok(child.restricted(self.rights | Rights::WRITE))
    }

    /// An eager private copy of the whole object (the fork policy for DMA memory): a new
    /// anonymous (or contiguous) Vmo with the same flags and contents, nothing pinned.
    pub(crate) fn deep_copy(&self) -> Result<Vmo> {
        let size = self.size();
        let copy = if self.inner.flags.contains(VmoFlags::CONTIGUOUS) {
            Vmo::new_contiguous(
                &self.inner.pool,
                size,
                self.inner.flags.contains(VmoFlags::DMA),
            )?
        } else {
            Vmo::new(
                &self.inner.pool,
                size,
                self.inner.flags & !VmoFlags::CONTIGUOUS,
            )?
        };
        let (first, last) = self.root_page_span(0, size);
        let (_, base) = self.root();
        let committed = self.lock_root_pages().committed_in(first, last);
        let mut buf = alloc::vec![0u8; PAGE_BYTES];
        for idx in committed {
            let offset = idx * PAGE_SIZE - base;
            self.restricted(Rights::READ).read(offset, &mut buf)?;
            copy.write(offset, &buf)?;
        }
        Ok(copy.restricted(self.rights | Rights::WRITE))
    }
}
