//! `PageTable`'s invariants as code (`check_invariants`), and the debug-build tripwire that
//! runs them after structural changes. The invariants themselves are listed in `table.rs`'s
//! module doc; this file adds one about accessed/dirty state: a table built with
//! `AccessDirty::Disabled` holds no leaf with its dirty bit set (neither the MMU nor this crate
//! writes it there); the permission summaries of `summary.rs` (a non-leaf entry's claim
//! about the perms of the leaves below it, as seen from that entry, is true; no leaf carries
//! summary bits); and the write gates of `gate.rs` (a non-leaf entry grants `RWX` or
//! `RWX - WRITE`, nothing else).

use core::sync::atomic::Ordering;

use super::{PageTable, ENTRIES, RETIRED_LINK};
use crate::entry::{EntryFormat, ADDRESS_MASK};
use crate::phys::PhysMem;
use crate::AccessDirty;

impl<E: EntryFormat, M: PhysMem> PageTable<E, M> {
    /// Checks the module's invariants: the frames linked in the tree number `table_frames()`,
    /// every non-root table holds a present entry, the retired chain holds `retired_frames()`
    /// frames, no frame is both linked and retired (or linked twice), a table without
    /// accessed/dirty maintenance holds no dirty leaf, every permission summary in a non-leaf
    /// entry is true (`summary.rs`) and every gate is open or closed to writes only
    /// (`gate.rs`). The first violation, described.
    pub fn check_invariants(&self) -> Result<(), alloc::string::String> {
        let mut linked = alloc::collections::BTreeSet::new();
        linked.insert(self.root);
        self.check_subtree(self.root, 4, &mut linked)?;
        self.check_summaries(self.root, 4)?;
        if linked.len() != self.attached {
            return Err(alloc::format!(
                "{} frames linked, table_frames() = {}",
                linked.len(),
                self.attached
            ));
        }
        let mut retired = 0;
        let mut next = self.retired_head;
        while let Some(frame) = next {
            if linked.contains(&frame) {
                return Err(alloc::format!(
                    "frame {frame:#x} is both linked and retired"
                ));
            }
            retired += 1;
            if retired > self.retired {
                return Err(alloc::format!("retired chain longer than {}", self.retired));
            }
            let link = self.slot(frame, 0).load(Ordering::Relaxed);
            next = (link & RETIRED_LINK != 0).then_some(link & ADDRESS_MASK);
        }
        if retired != self.retired {
            return Err(alloc::format!(
                "{retired} frames retired, retired_frames() = {}",
                self.retired
            ));
        }
        Ok(())
    }

    fn check_subtree(
        &self,
        table: u64,
        level: usize,
        linked: &mut alloc::collections::BTreeSet<u64>,
    ) -> Result<(), alloc::string::String> {
        let mut present = false;
        for i in 0..ENTRIES {
            let e = self.load(table, i);
            if !e.is_present() {
                continue;
            }
            present = true;
            if e.is_leaf(level) {
                if self.ad == AccessDirty::Disabled && e.dirty() {
                    return Err(alloc::format!(
                        "dirty level-{level} leaf {i} in table {table:#x} without A/D"
                    ));
                }
            } else if level > 1 {
                let child = e.table_address();
                if !linked.insert(child) {
                    return Err(alloc::format!("table {child:#x} linked twice"));
                }
                self.check_subtree(child, level - 1, linked)?;
            }
        }
        if !present && table != self.root {
            return Err(alloc::format!(
                "empty level-{level} table {table:#x} still linked"
            ));
        }
        Ok(())
    }

    /// `check_invariants` in debug builds (up to `DEBUG_CHECK_MAX_FRAMES` frames), panicking
    /// with the violation.
    pub(super) fn debug_check(&self) {
        #[cfg(debug_assertions)]
        if self.attached + self.retired <= super::DEBUG_CHECK_MAX_FRAMES {
            if let Err(e) = self.check_invariants() {
                panic!("PageTable invariant violated: {e}");
            }
        }
    }
}
