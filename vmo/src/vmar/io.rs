//! The memory model's own accesses to guest memory by guest-physical address: `Vmar::read` and
//! `Vmar::write` (a VMM reading a mailbox, a loader writing an image) go through the mappings'
//! Vmos — no second-level fault, no translation needed, copy-on-write exactly as a guest write.
//!
//! Invariants: an access is checked against the mappings it crosses before any byte moves
//! (unmapped → `NotFound`, outside the handle's region → `OutOfRange`, a mapping without READ /
//! WRITE → `AccessDenied`); a write replaces shared frames the way the fault path does (their
//! translations go first) and counts as a change for reset (`Vmo::write`), so a copy-back reset
//! restores what the VMM wrote as well as what the guest wrote; its commits and copies count in
//! `FaultStats` like the fault path's (the frames a guest holds privately stay countable).

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use ept::Stage2;

use super::tree::Tree;
use super::{VmPerms, Vmar};
use crate::{Error, Result, Vmo};

/// One piece of an access: the Vmo, its offset, and the range of the caller's buffer.
struct Piece {
    vmo: Vmo,
    offset: u64,
    from: usize,
    to: usize,
}

impl<S: Stage2 + Send + 'static> Vmar<S> {
    /// Reads `buf.len()` bytes at guest-physical `gpa` (inside this handle's region) through
    /// the mapped Vmos; pages never committed read as zeros (or the pager's data).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let tree = self.space.tree.read();
        for p in self.pieces(&tree, gpa, buf.len(), VmPerms::READ)? {
            p.vmo.read(p.offset, &mut buf[p.from..p.to])?;
        }
        Ok(())
    }

    /// Writes `data` at guest-physical `gpa` (inside this handle's region) through the mapped
    /// Vmos, as the guest would (copy-on-write, commit), without a second-level fault.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        let tree = self.space.tree.read();
        for p in self.pieces(&tree, gpa, data.len(), VmPerms::WRITE)? {
            let (commits, copies) = p.vmo.write_counted(p.offset, &data[p.from..p.to])?;
            let c = &self.space.counters;
            c.commits.fetch_add(commits, Ordering::Relaxed);
            c.copies.fetch_add(copies, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Splits `[gpa, gpa+len)` at mapping boundaries, checking every piece first.
    fn pieces(&self, tree: &Tree<S>, gpa: u64, len: usize, need: VmPerms) -> Result<Vec<Piece>> {
        let region = tree.region(self.region)?;
        let end = gpa.checked_add(len as u64).ok_or(Error::OutOfRange)?;
        if gpa < region.base || end > region.base + region.len {
            return Err(Error::OutOfRange);
        }
        let mut out = Vec::new();
        let mut at = gpa;
        while at < end {
            let m = tree.mapping_at(at).ok_or(Error::NotFound)?;
            if !m.perms.contains(need) {
                return Err(Error::AccessDenied);
            }
            let stop = end.min(m.end());
            out.push(Piece {
                vmo: m.vmo.clone(),
                offset: m.vmo_offset + (at - m.base),
                from: (at - gpa) as usize,
                to: (stop - gpa) as usize,
            });
            at = stop;
        }
        Ok(out)
    }
}
