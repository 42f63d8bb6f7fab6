//! Copy-back reset of a page set (the *restore* policy): return to the reset point while
//! keeping private frames in place, so a reused child does not pay a copy-on-write fault for
//! every page it writes again.
//!
//! A reset has two phases, so that a failure of the translations' owner changes nothing:
//! - `plan_restore` decides, for every slot that may differ from the reset point (`changed`,
//!   `kept`, and the slots a dirty harvest reports as written), one of:
//!   - *refill*: the slot holds a private frame; its bytes become the reset point's (or zeros
//!     where the reset point had no page and no pager backs the Vmo), the frame stays — and so
//!     does its translation, writable;
//!   - *revert*: the slot goes back to the reset point's frame (shared again) or to empty: the
//!     frame is replaced, so its translations must be dropped first (the caller does that
//!     between the phases);
//! - `apply_restore` carries the plan out; it cannot fail.
//!
//! Invariants: a frame is refilled only while private (a frame shared with a later snapshot
//! child is reverted instead, never written in place); after `apply_restore`, `changed` is
//! empty and `kept` holds exactly the refilled slots plus earlier kept slots that were not
//! touched, so every slot that differs from the reset point is still known to a later reset.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use super::Pages;
use crate::{Error, Frame, Result, PAGE_BYTES};

/// What `apply_restore` will do; see the module documentation.
pub(crate) struct RestorePlan {
    /// (slot, the reset point's frame to copy from, or `None` for zeros).
    refill: Vec<(u64, Option<Frame>)>,
    /// Slots that go back to the reset point's frame or to empty (ascending).
    pub revert: Vec<u64>,
}

impl RestorePlan {
    pub fn refilled(&self) -> u64 {
        self.refill.len() as u64
    }
}

impl Pages {
    /// Plans a copy-back reset; `written` are slots written through translations since the
    /// last harvest. `Ok(None)`: this page set cannot be restored in place (its size changed
    /// since the reset point) and must be reset by dropping. No reset point or pinned pages →
    /// `BadState`, as for `reset`.
    pub fn plan_restore(&mut self, written: &[u64]) -> Result<Option<RestorePlan>> {
        let point = self.reset_point.as_ref().ok_or(Error::BadState)?;
        if self.any_pinned() {
            return Err(Error::BadState);
        }
        if point.size != self.size {
            return Ok(None);
        }
        let limit = self.page_count();
        let mut todo: BTreeSet<u64> = self.changed.clone();
        todo.extend(written.iter().copied().filter(|&i| i < limit));
        let mut plan = RestorePlan {
            refill: Vec::new(),
            revert: Vec::new(),
        };
        for idx in todo {
            let saved = self
                .reset_point
                .as_ref()
                .and_then(|p| p.array.load(idx).map(|f| (*f).clone()));
            let Some(now) = self.array.load(idx).map(|f| f.paddr()) else {
                if saved.is_some() {
                    plan.revert.push(idx);
                }
                continue;
            };
            if saved.as_ref().map(Frame::paddr) == Some(now) {
                continue;
            }
            let zero_ok = saved.is_some() || self.source.pager.is_none();
            if zero_ok && self.is_private(idx) {
                plan.refill.push((idx, saved));
            } else {
                plan.revert.push(idx);
            }
        }
        Ok(Some(plan))
    }

    /// Carries out `plan` (the caller has dropped the translations of `plan.revert`). Returns
    /// the frames replaced, for the caller to drop outside its locks.
    pub fn apply_restore(&mut self, plan: RestorePlan) -> Vec<Frame> {
        for (idx, src) in &plan.refill {
            if let Some(frame) = self.array.load(*idx).map(|f| (*f).clone()) {
                match src {
                    Some(src) => frame.copy_from(src),
                    None => {
                        // A whole page inside the frame: cannot fail.
                        let _ = frame.fill_zero(0, PAGE_BYTES);
                    }
                }
                self.kept.insert(*idx);
            }
        }
        let mut old = Vec::new();
        for &idx in &plan.revert {
            let saved = self
                .reset_point
                .as_ref()
                .and_then(|p| p.array.load(idx).map(|f| (*f).clone()));
            let prev = match saved {
                Some(frame) => {
                    let prev = self.array.store(idx, frame);
                    if prev.is_none() {
                        self.committed += 1;
                    }
                    prev
                }
                None => {
                    let prev = self.array.remove(idx);
                    if prev.is_some() {
                        self.committed -= 1;
                    }
                    prev
                }
            };
            old.extend(prev);
            self.kept.remove(&idx);
        }
        self.changed.clear();
        self.debug_check();
        old
    }
}

#[cfg(test)]
mod tests {
    use super::super::Pages;
    use crate::{FramePool, PAGE_SIZE};

    fn byte(p: &Pages, idx: u64) -> Option<u8> {
        let mut b = [0u8; 1];
        p.get(idx).map(|f| {
            f.read(0, &mut b).unwrap();
            b[0]
        })
    }

    #[test]
    fn refill_keeps_private_frames_and_reverts_the_rest() {
        let pool = FramePool::heap();
        let mut p = Pages::new(8 * PAGE_SIZE, None);
        for idx in 0..3 {
            let (f, _) = p.commit(&pool, idx, false).unwrap();
            f.write(0, &[idx as u8 + 1]).unwrap();
        }
        p.set_reset_point();
        // Slot 0: copied on write (private now); slot 1: removed; slot 5: fresh commit.
        let (f0, o) = p.private(&pool, 0, false, &mut |_| Ok(())).unwrap();
        assert!(o.replaced);
        f0.write(0, &[0xee]).unwrap();
        assert!(p.remove(1).unwrap().is_some());
        let (f5, _) = p.commit(&pool, 5, false).unwrap();
        f5.write(0, &[0x55]).unwrap();
        let (a0, a5) = (f0.paddr(), f5.paddr());
        drop((f0, f5));
        let plan = p.plan_restore(&[]).unwrap().unwrap();
        assert_eq!(plan.refilled(), 2, "slots 0 and 5 stay, refilled");
        assert_eq!(plan.revert, alloc::vec![1]);
        let old = p.apply_restore(plan);
        assert!(old.is_empty(), "slot 1 was empty, nothing replaced");
        assert_eq!(
            (byte(&p, 0), byte(&p, 1), byte(&p, 2)),
            (Some(1), Some(2), Some(3))
        );
        assert_eq!(byte(&p, 5), Some(0), "a fresh page reads as zeros again");
        assert_eq!(p.get(0).unwrap().paddr(), a0, "the private frame stayed");
        assert_eq!(p.get(5).unwrap().paddr(), a5);
        assert_eq!(
            p.changed(),
            alloc::vec![0, 5],
            "kept slots are still known to a reset"
        );
        p.check_invariants().unwrap();

        // Next iteration: only slot 0 is written (in place, as a harvest would report).
        p.get(0).unwrap().write(0, &[0x77]).unwrap();
        let plan = p.plan_restore(&[0]).unwrap().unwrap();
        assert_eq!((plan.refilled(), plan.revert.len()), (1, 0));
        drop(p.apply_restore(plan));
        assert_eq!(byte(&p, 0), Some(1));
        p.check_invariants().unwrap();

        // A drop reset after restores still returns every slot to the reset point's frame.
        drop(p.reset().unwrap());
        assert!(p.changed().is_empty());
        assert_ne!(p.get(0).unwrap().paddr(), a0);
        assert_eq!(byte(&p, 5), None);
        p.check_invariants().unwrap();
    }

    #[test]
    fn a_frame_shared_with_a_later_snapshot_is_reverted_not_written() {
        let pool = FramePool::heap();
        let mut p = Pages::new(2 * PAGE_SIZE, None);
        p.commit(&pool, 0, false).unwrap().0.write(0, &[1]).unwrap();
        p.set_reset_point();
        p.private(&pool, 0, false, &mut |_| Ok(()))
            .unwrap()
            .0
            .write(0, &[2])
            .unwrap();
        let child = p.snapshot(0, 2, 2 * PAGE_SIZE);
        let plan = p.plan_restore(&[0]).unwrap().unwrap();
        assert_eq!((plan.refilled(), plan.revert.clone()), (0, alloc::vec![0]));
        drop(p.apply_restore(plan));
        assert_eq!(byte(&p, 0), Some(1));
        assert_eq!(
            byte(&child, 0),
            Some(2),
            "the snapshot child keeps what it saw"
        );
        p.check_invariants().unwrap();
    }

    #[test]
    fn a_resized_set_cannot_be_restored_in_place() {
        let pool = FramePool::heap();
        let mut p = Pages::new(2 * PAGE_SIZE, None);
        p.commit(&pool, 0, false).unwrap();
        p.set_reset_point();
        drop(p.resize(PAGE_SIZE).unwrap());
        assert!(p.plan_restore(&[]).unwrap().is_none());
        let mut q = Pages::new(PAGE_SIZE, None);
        assert!(q.plan_restore(&[]).is_err(), "no reset point");
    }
}
