//! Observers of a Vmo's pages: whoever installed translations of them (a Vmar mapping) and must
//! drop or downgrade those translations when the Vmo changes under them.
//!
//! Invariants:
//! - a change is announced while the Vmo's page lock is held and before any affected frame can
//!   be freed, so no translation ever outlives its frame;
//! - ranges are byte offsets in the observed Vmo (a slice's observer gets slice coordinates);
//! - observers must not call back into the Vmo (they only touch their own Stage2);
//! - a change is announced *before* it happens, and an observer that fails (its backend could
//!   not drop or downgrade the translations) stops the announcement: the Vmo then returns the
//!   error without making the change, so a frame is never retired or shared while a translation
//!   of it may still be live or writable. Observers told before the failing one may already have
//!   dropped their translations, which is harmless (they refault).

use alloc::sync::Weak;
use alloc::vec::Vec;

/// What happened to a range of pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeChange {
    /// The pages' frames are gone or replaced: drop every translation of the range.
    Unmap,
    /// The pages' frames became shared (a snapshot child was made): remove write permission.
    WriteProtect,
}

pub trait VmoObserver: Send + Sync {
    /// The ranges `(offset, len)` of the observed Vmo are about to change (ascending,
    /// non-overlapping; one call per operation so the observer can flush once). An error means
    /// the observer could not drop / downgrade its translations: the change must not happen.
    fn ranges_changed(&self, ranges: &[(u64, u64)], change: RangeChange) -> crate::Result<()>;
}

/// Identifies one registration, for `Vmo::remove_observer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObserverId(pub(crate) u64);

struct Entry {
    id: ObserverId,
    observer: Weak<dyn VmoObserver>,
    /// Offset of the observed Vmo's byte 0 in the root page set (non-zero for slices).
    base: u64,
    /// Size of the observed window (a slice's size; `u64::MAX` for the root itself).
    window: u64,
}

#[derive(Default)]
pub(crate) struct Observers {
    entries: Vec<Entry>,
    next_id: u64,
}

impl Observers {
    pub fn add(&mut self, observer: Weak<dyn VmoObserver>, base: u64, window: u64) -> ObserverId {
        self.next_id += 1;
        let id = ObserverId(self.next_id);
        self.entries.retain(|e| e.observer.strong_count() > 0);
        self.entries.push(Entry {
            id,
            observer,
            base,
            window,
        });
        id
    }

    pub fn remove(&mut self, id: ObserverId) {
        self.entries.retain(|e| e.id != id);
    }

    /// Tells every observer whose window overlaps the root ranges `(start, len)`, clipped to
    /// its window and in its own coordinates. Stops at the first observer that fails.
    pub fn notify(&self, ranges: &[(u64, u64)], change: RangeChange) -> crate::Result<()> {
        for e in &self.entries {
            let w_start = e.base;
            let w_end = e.base.saturating_add(e.window);
            let clipped: Vec<(u64, u64)> = ranges
                .iter()
                .filter_map(|&(start, len)| {
                    let s = start.max(w_start);
                    let t = start.saturating_add(len).min(w_end);
                    (s < t).then(|| (s - e.base, t - s))
                })
                .collect();
            if clipped.is_empty() {
                continue;
            }
            if let Some(obs) = e.observer.upgrade() {
                obs.ranges_changed(&clipped, change)?;
            }
        }
        Ok(())
    }
}
