//! Working-set recording and prefetch (DESIGN.md "Fast paths"; REAP / FaaSnap style): while
//! recording is on, the fault path notes every page it installs — the faulting page (written
//! if the fault was a write, as are pages streaming committed for it) and its fault-around
//! neighbours (read) — in a `WorkingSet`. A later fork of the same snapshot (or the same space
//! after a reset) hands that set to `prefetch`, which installs it in bulk through
//! `Vmar::prefault` before the guest runs: shared frames read-only (the safety rule holds: a
//! write still reaches the model first), or — with `copy_written` — the recorded run's written
//! pages copied ahead and installed writable, as a write fault would.
//!
//! `prefetch_spans` is the bulk variant for a space whose pages mostly still need committing
//! (a restore from a file): runs closer than `max_gap` pages inside one mapping are merged into
//! spans, each span is prefaulted for read in one go (one pager read-ahead and as few installs
//! as its frames allow — gap pages are committed and installed read-only too, as a read
//! fault-around would), then the written runs are prefaulted for write: a frame the first pass
//! committed is private and already installed writable (nothing left to do); a shared one is
//! copied and re-installed writable, as a write fault would.
//!
//! Invariant: recording only observes; a space records nothing unless `set_recording(true)`;
//! forks do not inherit it.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use ept::{Access, Stage2};

use super::{Vmar, PAGE_SIZE};
use crate::Result;

/// Pages a run touched: guest-physical page → whether it was written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkingSet {
    pages: BTreeMap<u64, bool>,
}

impl WorkingSet {
    /// Notes `count` pages from `first` (written or read; a written page stays written).
    pub fn note(&mut self, first: u64, count: u64, written: bool) {
        for i in 0..count {
            let Some(page) = i.checked_mul(PAGE_SIZE).and_then(|o| first.checked_add(o)) else {
                return;
            };
            *self.pages.entry(page & !(PAGE_SIZE - 1)).or_insert(false) |= written;
        }
    }

    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Pages recorded as written.
    pub fn written(&self) -> usize {
        self.pages.values().filter(|&&w| w).count()
    }

    /// Maximal runs of adjacent pages with the same written state: (start, pages, written).
    pub fn runs(&self) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for (&page, &written) in &self.pages {
            match out.last_mut() {
                Some((s, n, w)) if *w == written && *s + *n * PAGE_SIZE == page => *n += 1,
                _ => out.push((page, 1, written)),
            }
        }
        out
    }
}

impl<S: Stage2 + Send + 'static> Vmar<S> {
    /// Starts recording the pages the fault path installs (with an empty set), or stops and
    /// forgets the record. Applies to the whole space.
    pub fn set_recording(&self, on: bool) {
        *self.space.recording.lock() = on.then(WorkingSet::default);
    }

    /// The pages recorded since recording started (empty when it is off).
    pub fn recorded(&self) -> WorkingSet {
        self.space.recording.lock().clone().unwrap_or_default()
    }

    /// Installs `set` in bulk (`prefault` per run): read access for every page, so shared
    /// frames are installed read-only, except — when `copy_written` — the pages the recorded
    /// run wrote, which are resolved as writes (copied if shared, committed if empty).
    /// Returns the pages installed. Errors are `prefault`'s (a page outside every mapping of
    /// this handle's region is NotFound: the set belongs to a space of another layout).
    pub fn prefetch(&self, set: &WorkingSet, copy_written: bool) -> Result<u64> {
        let mut installed = 0;
        for (start, pages, written) in set.runs() {
            let access = if written && copy_written {
                Access::WRITE
            } else {
                Access::READ
            };
            installed += self.prefault(start, pages * PAGE_SIZE, access)?;
        }
        Ok(installed)
    }

    /// `prefetch` in two passes over merged spans (module documentation): returns the pages
    /// the first pass installed (the spans' pages that were not installed yet).
    pub fn prefetch_spans(
        &self,
        set: &WorkingSet,
        copy_written: bool,
        max_gap: u64,
    ) -> Result<u64> {
        let runs = set.runs();
        let mut spans: Vec<(u64, u64)> = Vec::new();
        {
            let tree = self.space.tree.read();
            for &(start, pages, _) in &runs {
                let end = start + pages * PAGE_SIZE;
                if let Some((s, e)) = spans.last_mut() {
                    let near = start - *e <= max_gap * PAGE_SIZE;
                    let same = tree
                        .mapping_at(*s)
                        .is_some_and(|m| m.base <= *s && end <= m.end());
                    if near && same {
                        *e = end;
                        continue;
                    }
                }
                spans.push((start, end));
            }
        }
        let mut installed = 0;
        for (start, end) in spans {
            installed += self.prefault(start, end - start, Access::READ)?;
        }
        if copy_written {
            for (start, pages, written) in runs {
                if written {
                    self.prefault(start, pages * PAGE_SIZE, Access::WRITE)?;
                }
            }
        }
        Ok(installed)
    }

    /// Fault path hook: notes the pages a resolved fault installed.
    pub(super) fn record_fault(&self, page: u64, written_pages: u64, pages: u64, write: bool) {
        if let Some(set) = self.space.recording.lock().as_mut() {
            set.note(page, written_pages, write);
            let rest = pages.saturating_sub(written_pages);
            set.note(page + written_pages * PAGE_SIZE, rest, false);
        }
    }
}
