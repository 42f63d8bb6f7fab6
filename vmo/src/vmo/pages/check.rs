//! The page set's invariants as code (see the parent module's list): `check_invariants`
//! describes the first violation it finds; `debug_check` runs it in debug builds for page sets
//! up to `DEBUG_CHECK_MAX_PAGES` pages and panics on a violation.

use alloc::format;
use alloc::string::String;

use super::Pages;
use crate::PAGE_SIZE;

impl Pages {
    /// Checks the module's invariants; the first violation found, described.
    pub fn check_invariants(&self) -> core::result::Result<(), String> {
        if !self.size.is_multiple_of(PAGE_SIZE) || self.size > super::super::MAX_VMO_SIZE {
            return Err(format!("size {:#x}", self.size));
        }
        // A slot past the end would make `committed` exceed the slots counted inside.
        let pages = self.page_count();
        let occupied = self.array.range(0..pages).count() as u64;
        if occupied != self.committed {
            return Err(format!(
                "committed {} but {occupied} slots occupied below {pages}",
                self.committed
            ));
        }
        for (&idx, &count) in &self.pinned {
            if count == 0 || idx >= pages || !self.is_committed(idx) {
                return Err(format!("pinned slot {idx} (count {count}) not committed"));
            }
        }
        match &self.reset_point {
            None if !self.changed.is_empty() || !self.kept.is_empty() => {
                return Err(format!(
                    "{} changed / {} kept slots without a reset point",
                    self.changed.len(),
                    self.kept.len()
                ))
            }
            None => {}
            Some(point) => {
                let saved = point.array.range(0..point.size / PAGE_SIZE).count() as u64;
                if saved != point.committed || !point.size.is_multiple_of(PAGE_SIZE) {
                    return Err(format!(
                        "reset point: committed {} but {saved} slots, size {:#x}",
                        point.committed, point.size
                    ));
                }
                // Every slot that differs from the reset point is known to a reset.
                let span = pages.max(point.size / PAGE_SIZE);
                for idx in 0..span {
                    let now = self.array.load(idx).map(|f| f.paddr());
                    let then = point.array.load(idx).map(|f| f.paddr());
                    if now != then && !self.changed.contains(&idx) && !self.kept.contains(&idx) {
                        return Err(format!("slot {idx} differs from the reset point unnoticed"));
                    }
                }
            }
        }
        Ok(())
    }

    /// `check_invariants` in debug builds (Vmos up to `DEBUG_CHECK_MAX_PAGES` pages, and reset
    /// points no larger), panicking with the violation.
    pub fn debug_check(&self) {
        #[cfg(debug_assertions)]
        if self.page_count() <= super::DEBUG_CHECK_MAX_PAGES
            && self
                .reset_point
                .as_ref()
                .is_none_or(|p| p.size / PAGE_SIZE <= super::DEBUG_CHECK_MAX_PAGES)
        {
            if let Err(e) = self.check_invariants() {
                panic!("Pages invariant violated: {e}");
            }
        }
    }
}
