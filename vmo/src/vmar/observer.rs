//! `MappingObserver`: how a Vmo's page changes reach the second-level entries of one mapping.
//!
//! A mapping registers one observer with its Vmo. When the Vmo drops or replaces frames
//! (decommit, resize, a write that broke copy-on-write, reset) the observer unmaps the
//! affected guest-physical range; when the Vmo's frames become shared (a snapshot child was
//! made) it removes write permission. Invariants: it only takes the space's stage2 lock (see
//! the lock order in `mod.rs`), it never installs anything, and it flushes once per call unless
//! the operation in progress (fork) defers the flush to its own end.

use alloc::sync::Weak;

use ept::Stage2;

use super::{Space, VmPerms};
use crate::vmo::{RangeChange, VmoObserver};

pub(crate) struct MappingObserver<S: Stage2 + Send + 'static> {
    pub space: Weak<Space<S>>,
    pub gpa: u64,
    pub vmo_offset: u64,
    pub len: u64,
    pub perms: VmPerms,
}

impl<S: Stage2 + Send + 'static> VmoObserver for MappingObserver<S> {
    fn ranges_changed(&self, ranges: &[(u64, u64)], change: RangeChange) {
        let Some(space) = self.space.upgrade() else {
            return;
        };
        let read_only = (self.perms - VmPerms::WRITE).to_stage2();
        let mut stage2 = space.stage2.lock();
        for &(offset, len) in ranges {
            let start = offset.max(self.vmo_offset);
            let end = offset.saturating_add(len).min(self.vmo_offset + self.len);
            if start >= end {
                continue;
            }
            let gpa = self.gpa + (start - self.vmo_offset);
            // Entries are only ever 4 KiB here, so neither call needs a table frame and the
            // only possible errors are range errors, which the clipping above rules out.
            let _ = match change {
                RangeChange::Unmap => stage2.unmap(gpa, end - start),
                RangeChange::WriteProtect if self.perms.contains(VmPerms::WRITE) => {
                    stage2.protect(gpa, end - start, read_only)
                }
                RangeChange::WriteProtect => Ok(0),
            };
        }
        space.flush_if_pending(&mut stage2);
    }
}
