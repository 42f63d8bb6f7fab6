//! A guest's physical address space and THE fault-resolution function every backend calls.
//!
//! INTERIM: until `vmo::Vmar` lands, this file holds a small stand-in with the same shape
//! (mappings with permissions, lazily committed frames from `vmo::FramePool`, copy-on-write
//! fork, `handle_fault(FaultInfo)` that installs through the `ept::Stage2` trait). When vmo's
//! Vmar lands, `Space` wraps it and `handle_fault` becomes `Vmar::handle_fault`; callers
//! (scenario.rs) do not change.
//!
//! Invariants: nothing is installed in the second-level table except by `handle_fault` (no
//! pre-mapping); a frame shared by a fork is never mapped writable in any table (fork
//! downgrades the parent's entries, children start empty); a write to a shared frame installs a
//! private copy (or upgrades in place when the writer holds the last reference); bad guest
//! accesses come back as `FaultError`, never a panic.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use ept::{Access, FaultInfo, MemType, PageSize, S2Perms, Stage2};
use vmo::{Frame, FramePool};

const PAGE: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultError {
    /// No mapping covers the address.
    NotMapped,
    /// A mapping exists but does not allow this access.
    AccessDenied { perms: S2Perms },
    NoMemory,
    Stage2(ept::Error),
}

impl core::fmt::Display for FaultError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FaultError::NotMapped => write!(f, "no mapping covers this guest-physical address"),
            FaultError::AccessDenied { perms } => write!(f, "access denied (mapping allows {:?})", perms),
            FaultError::NoMemory => write!(f, "out of memory"),
            FaultError::Stage2(e) => write!(f, "second-level table: {}", e),
        }
    }
}

/// How a fault was resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// A new zero frame was committed and mapped.
    Committed,
    /// A committed frame was mapped (read-only if shared).
    Mapped,
    /// A shared frame was copied for a writer.
    Copied,
    /// A shared frame's last holder was given write access without a copy.
    Upgraded,
    /// The table already allowed the access (raced or stale TLB): only a flush was needed.
    Spurious,
}

struct Mapping {
    gpa: u64,
    pages: u64,
    perms: S2Perms,
    name: &'static str,
    frames: BTreeMap<u64, Frame>,
}

/// Fault counters of one space.
#[derive(Clone, Copy, Default, Debug)]
pub struct FaultStats {
    pub committed: u64,
    pub mapped: u64,
    pub copied: u64,
    pub upgraded: u64,
    pub spurious: u64,
}

pub struct Space {
    maps: Vec<Mapping>,
    stage2: Box<dyn Stage2>,
    pool: FramePool,
    pub stats: FaultStats,
}

impl Space {
    pub fn new(pool: FramePool, stage2: Box<dyn Stage2>) -> Self {
        Space { maps: Vec::new(), stage2, pool, stats: FaultStats::default() }
    }

    /// Maps `pages` lazily committed pages at `gpa` with `perms` (no overlap allowed).
    pub fn map(&mut self, gpa: u64, pages: u64, perms: S2Perms, name: &'static str) -> Result<(), vmo::Error> {
        let end = gpa.checked_add(pages * PAGE).ok_or(vmo::Error::OutOfRange)?;
        if gpa % PAGE != 0 || pages == 0 {
            return Err(vmo::Error::InvalidArgs);
        }
        if self.maps.iter().any(|m| gpa < m.gpa + m.pages * PAGE && m.gpa < end) {
            return Err(vmo::Error::AlreadyExists);
        }
        self.maps.push(Mapping { gpa, pages, perms, name, frames: BTreeMap::new() });
        Ok(())
    }

    fn find(&self, gpa: u64) -> Option<usize> {
        self.maps.iter().position(|m| gpa >= m.gpa && gpa < m.gpa + m.pages * PAGE)
    }

    /// Name of the mapping covering `gpa`.
    pub fn mapping_name(&self, gpa: u64) -> Option<&'static str> {
        self.find(gpa).map(|i| self.maps[i].name)
    }

    /// Host-side write into guest memory (commits pages; bypasses guest permissions). Used to
    /// load payloads; installs nothing in the second-level table.
    pub fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), vmo::Error> {
        let mut done = 0usize;
        while done < data.len() {
            let a = gpa + done as u64;
            let i = self.find(a).ok_or(vmo::Error::NotFound)?;
            let m = &mut self.maps[i];
            let idx = (a - m.gpa) / PAGE;
            let off = (a % PAGE) as usize;
            let n = (PAGE as usize - off).min(data.len() - done);
            if !m.frames.contains_key(&idx) {
                m.frames.insert(idx, self.pool.alloc_zeroed()?);
            }
            let f = m.frames.get_mut(&idx).ok_or(vmo::Error::NotFound)?;
            if f.ref_count() > 1 {
                *f = self.pool.copy_of(f)?;
            }
            f.write(off, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Host-side read of guest memory (uncommitted pages read as zeros).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), vmo::Error> {
        let mut done = 0usize;
        while done < buf.len() {
            let a = gpa + done as u64;
            let i = self.find(a).ok_or(vmo::Error::NotFound)?;
            let m = &self.maps[i];
            let off = (a % PAGE) as usize;
            let n = (PAGE as usize - off).min(buf.len() - done);
            match m.frames.get(&((a - m.gpa) / PAGE)) {
                Some(f) => f.read(off, &mut buf[done..done + n])?,
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }

    pub fn read_u64(&self, gpa: u64) -> Result<u64, vmo::Error> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Physical frame currently backing `gpa`, if committed.
    pub fn frame_of(&self, gpa: u64) -> Option<u64> {
        let m = &self.maps[self.find(gpa)?];
        m.frames.get(&((gpa - m.gpa) / PAGE)).map(|f| f.paddr())
    }

    /// Whether the second-level table currently translates `gpa`.
    pub fn installed(&self, gpa: u64) -> Option<ept::Translation> {
        self.stage2.query(gpa)
    }

    /// THE fault path: find the mapping, check permissions, commit or copy the page, install
    /// it through `Stage2`. The caller flushes the hardware TLB afterwards.
    pub fn handle_fault(&mut self, fault: &FaultInfo) -> Result<Resolution, FaultError> {
        let i = self.find(fault.gpa).ok_or(FaultError::NotMapped)?;
        let pool = self.pool.clone();
        let m = &mut self.maps[i];
        let need = {
            let mut p = S2Perms::empty();
            p.set(S2Perms::READ, fault.access.contains(Access::READ));
            p.set(S2Perms::WRITE, fault.access.contains(Access::WRITE));
            p.set(S2Perms::EXEC, fault.access.contains(Access::EXEC));
            p
        };
        if !m.perms.contains(need) {
            return Err(FaultError::AccessDenied { perms: m.perms });
        }
        let page_gpa = fault.gpa & !(PAGE - 1);
        let idx = (page_gpa - m.gpa) / PAGE;
        let write = need.contains(S2Perms::WRITE);
        let installed = self.stage2.query(page_gpa);

        let (res, frame_pa, perms) = match m.frames.get_mut(&idx) {
            None => {
                let f = pool.alloc_zeroed().map_err(|_| FaultError::NoMemory)?;
                let pa = f.paddr();
                m.frames.insert(idx, f);
                (Resolution::Committed, pa, m.perms)
            }
            Some(f) if write && f.ref_count() > 1 => {
                let copy = pool.copy_of(f).map_err(|_| FaultError::NoMemory)?;
                let pa = copy.paddr();
                *f = copy;
                (Resolution::Copied, pa, m.perms)
            }
            Some(f) => {
                let shared = f.ref_count() > 1;
                let perms = if shared { m.perms - S2Perms::WRITE } else { m.perms };
                let res = match installed {
                    Some(t) if t.pa == f.paddr() && t.perms.contains(need) => Resolution::Spurious,
                    Some(t) if t.pa == f.paddr() && write => Resolution::Upgraded,
                    _ => Resolution::Mapped,
                };
                (res, f.paddr(), perms)
            }
        };
        match res {
            Resolution::Committed => self.stats.committed += 1,
            Resolution::Mapped => self.stats.mapped += 1,
            Resolution::Copied => self.stats.copied += 1,
            Resolution::Upgraded => self.stats.upgraded += 1,
            Resolution::Spurious => self.stats.spurious += 1,
        }
        if res != Resolution::Spurious {
            self.stage2
                .map(page_gpa, frame_pa, PageSize::Size4K, perms, MemType::WriteBack)
                .map_err(FaultError::Stage2)?;
        }
        self.stage2.flush(ept::FlushScope::Context);
        Ok(res)
    }

    /// Copy-on-write fork: the child gets the same mappings sharing every committed frame and an
    /// empty second-level table (its pages arrive through faults); the parent's installed
    /// writable entries are downgraded to read-only (the caller flushes the parent's TLB).
    pub fn fork(&mut self, child_stage2: Box<dyn Stage2>) -> Result<Space, FaultError> {
        let mut maps = Vec::new();
        for m in &self.maps {
            if m.perms.contains(S2Perms::WRITE) {
                self.stage2
                    .protect(m.gpa, m.pages * PAGE, m.perms - S2Perms::WRITE)
                    .map_err(FaultError::Stage2)?;
            }
            maps.push(Mapping { gpa: m.gpa, pages: m.pages, perms: m.perms, name: m.name, frames: m.frames.clone() });
        }
        self.stage2.flush(ept::FlushScope::Context);
        Ok(Space { maps, stage2: child_stage2, pool: self.pool.clone(), stats: FaultStats::default() })
    }
}
