//! `MappingObserver`: how a Vmo's page changes reach the second-level entries of one mapping.
//!
//! A mapping registers one observer with its Vmo. When the Vmo drops or replaces frames
//! (decommit, resize, a write that broke copy-on-write, reset) the observer unmaps the
//! affected guest-physical range; when the Vmo's frames become shared (a snapshot child was
//! made) it removes write permission. Invariants: it only takes the space's stage2 lock (see
//! the lock order in `mod.rs`), it never installs anything, it flushes once per call unless
//! the operation in progress (fork) defers the flush to its own end, and it reports a backend
//! failure to the Vmo, which then does not make the change (see `vmo/observer.rs`).

use alloc::sync::Weak;

use ept::Stage2;

use super::{Space, VmPerms};
use crate::vmo::{RangeChange, VmoObserver};
use crate::Result;

pub(crate) struct MappingObserver<S: Stage2 + Send + 'static> {
    pub space: Weak<Space<S>>,
    pub gpa: u64,
    pub vmo_offset: u64,
    pub len: u64,
    pub perms: VmPerms,
}

impl<S: Stage2 + Send + 'static> VmoObserver for MappingObserver<S> {
    fn ranges_changed(&self, ranges: &[(u64, u64)], change: RangeChange) -> Result<()> {
        let Some(space) = self.space.upgrade() else {
            return Ok(());
        };
        let read_only = (self.perms - VmPerms::WRITE).to_stage2();
        let mut stage2 = space.stage2.lock();
        let mut result = Ok(());
        for &(offset, len) in ranges {
            let start = offset.max(self.vmo_offset);
            let end = offset.saturating_add(len).min(self.vmo_offset + self.len);
            if start >= end {
                continue;
            }
            let gpa = self.gpa + (start - self.vmo_offset);
            let step = match change {
                RangeChange::Unmap => stage2.unmap(gpa, end - start),
                RangeChange::WriteProtect if self.perms.contains(VmPerms::WRITE) => {
                    stage2.protect(gpa, end - start, read_only)
                }
                RangeChange::WriteProtect => Ok(0),
            };
            // A backend failure (the KVM backend's mmap / userfaultfd steps) stops the change.
            if let Err(e) = step {
                result = Err(e.into());
                break;
            }
        }
        // What was removed or downgraded before a failure is flushed all the same.
        space.flush_if_pending(&mut stage2);
        result
    }
}
