//! INTERIM second-level table (4 KiB leaves only) for EPT and NPT entry formats, implementing
//! `ept::Stage2`. It exists only so the backends and the fault path can run before
//! `ept::EptTable` / `ept::NptTable` land; it is replaced by them, not extended.
//!
//! Owns its table frames (from `frames`), freed on drop. Invariants: table (non-leaf) entries
//! always carry full permissions (EPT RWX; NPT P|RW|US) so that only leaves restrict access;
//! `map` accepts only 4 KiB pages (`NotSupported` otherwise); operations never flush hardware,
//! they set `flush_pending` when a present leaf was removed or downgraded.

use alloc::vec::Vec;

use ept::{Error, FlushScope, MemType, PageSize, S2Perms, Stage2, Translation};

use crate::frames;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Format {
    /// Intel EPT: R=bit0 W=bit1 X=bit2, memory type bits 5:3.
    Ept,
    /// AMD NPT (long-mode page table format): P, RW, US (required), NX=bit63.
    Npt,
}

const ADDR: u64 = 0x000F_FFFF_FFFF_F000;
const NPT_NX: u64 = 1 << 63;

pub struct Table {
    fmt: Format,
    root: u64,
    frames: Vec<u64>,
    pending: bool,
}

impl Table {
    pub fn new(fmt: Format) -> Result<Self, Error> {
        let root = frames::alloc_zeroed().ok_or(Error::NoMemory)?;
        Ok(Table { fmt, root, frames: alloc::vec![root], pending: false })
    }

    /// Physical address of the top-level table (EPTP / nCR3 base).
    pub fn root(&self) -> u64 {
        self.root
    }

    fn leaf(&self, pa: u64, perms: S2Perms) -> u64 {
        match self.fmt {
            Format::Ept => {
                let mut e = pa | (6 << 3);
                if perms.contains(S2Perms::READ) {
                    e |= 1;
                }
                if perms.contains(S2Perms::WRITE) {
                    e |= 2;
                }
                if perms.contains(S2Perms::EXEC) {
                    e |= 4;
                }
                e
            }
            Format::Npt => {
                let mut e = pa | 1 | 4;
                if perms.contains(S2Perms::WRITE) {
                    e |= 2;
                }
                if !perms.contains(S2Perms::EXEC) {
                    e |= NPT_NX;
                }
                e
            }
        }
    }

    fn decode(&self, e: u64) -> Option<(u64, S2Perms)> {
        match self.fmt {
            Format::Ept => {
                if e & 7 == 0 {
                    return None;
                }
                let mut p = S2Perms::empty();
                p.set(S2Perms::READ, e & 1 != 0);
                p.set(S2Perms::WRITE, e & 2 != 0);
                p.set(S2Perms::EXEC, e & 4 != 0);
                Some((e & ADDR, p))
            }
            Format::Npt => {
                if e & 1 == 0 {
                    return None;
                }
                let mut p = S2Perms::READ;
                p.set(S2Perms::WRITE, e & 2 != 0);
                p.set(S2Perms::EXEC, e & NPT_NX == 0);
                Some((e & ADDR, p))
            }
        }
    }

    /// Pointer to the level-1 entry for `gpa`; creates missing tables when `create`.
    fn walk(&mut self, gpa: u64, create: bool) -> Result<Option<*mut u64>, Error> {
        let mut table = self.root;
        for level in (2..=4).rev() {
            let idx = ((gpa >> (12 + 9 * (level - 1))) & 511) as usize;
            let entry = unsafe { (table as *mut u64).add(idx) };
            let e = unsafe { entry.read_volatile() };
            if e & 1 == 0 && (self.fmt == Format::Npt || e & 7 == 0) {
                if !create {
                    return Ok(None);
                }
                let f = frames::alloc_zeroed().ok_or(Error::NoMemory)?;
                self.frames.push(f);
                unsafe { entry.write_volatile(f | 7) };
                table = f;
            } else {
                table = e & ADDR;
            }
        }
        let idx = ((gpa >> 12) & 511) as usize;
        Ok(Some(unsafe { (table as *mut u64).add(idx) }))
    }

    fn check(gpa: u64, len: u64) -> Result<(), Error> {
        if gpa % 4096 != 0 || len % 4096 != 0 || len == 0 {
            return Err(Error::InvalidArgs);
        }
        match gpa.checked_add(len) {
            Some(end) if end <= ept::GPA_LIMIT => Ok(()),
            _ => Err(Error::OutOfRange),
        }
    }
}

impl Stage2 for Table {
    fn map(&mut self, gpa: u64, pa: u64, size: PageSize, perms: S2Perms, _mt: MemType) -> Result<Option<Translation>, Error> {
        if size != PageSize::Size4K {
            return Err(Error::NotSupported);
        }
        Self::check(gpa, 4096)?;
        if pa % 4096 != 0 || pa >= ept::PA_LIMIT || !perms.contains(S2Perms::READ) {
            return Err(Error::InvalidArgs);
        }
        let old = self.query(gpa);
        let e = self.walk(gpa, true)?.ok_or(Error::NoMemory)?;
        let leaf = self.leaf(pa, perms);
        unsafe { e.write_volatile(leaf) };
        if let Some(o) = old {
            if o.pa != pa || !perms.contains(o.perms) {
                self.pending = true;
            }
        }
        Ok(old)
    }

    fn unmap(&mut self, gpa: u64, len: u64) -> Result<u64, Error> {
        Self::check(gpa, len)?;
        let mut n = 0;
        let mut a = gpa;
        while a < gpa + len {
            if let Some(e) = self.walk(a, false)? {
                if self.decode(unsafe { e.read_volatile() }).is_some() {
                    unsafe { e.write_volatile(0) };
                    n += 1;
                    self.pending = true;
                }
            }
            a += 4096;
        }
        Ok(n)
    }

    fn protect(&mut self, gpa: u64, len: u64, perms: S2Perms) -> Result<u64, Error> {
        Self::check(gpa, len)?;
        let mut n = 0;
        let mut a = gpa;
        while a < gpa + len {
            if let Some(e) = self.walk(a, false)? {
                if let Some((pa, old)) = self.decode(unsafe { e.read_volatile() }) {
                    let leaf = self.leaf(pa, perms);
                    unsafe { e.write_volatile(leaf) };
                    if !perms.contains(old) {
                        self.pending = true;
                    }
                    n += 1;
                }
            }
            a += 4096;
        }
        Ok(n)
    }

    fn query(&self, gpa: u64) -> Option<Translation> {
        let mut table = self.root;
        for level in (2..=4).rev() {
            let idx = ((gpa >> (12 + 9 * (level - 1))) & 511) as usize;
            let e = unsafe { (table as *const u64).add(idx).read_volatile() };
            if e & 7 == 0 {
                return None;
            }
            table = e & ADDR;
        }
        let e = unsafe { (table as *const u64).add(((gpa >> 12) & 511) as usize).read_volatile() };
        let (pa, perms) = self.decode(e)?;
        Some(Translation {
            gpa: gpa & !0xFFF,
            pa,
            size: PageSize::Size4K,
            perms,
            mem_type: MemType::WriteBack,
            accessed: false,
            dirty: false,
        })
    }

    fn flush(&mut self, _scope: FlushScope) {
        // The hardware flush (INVEPT / TLB_CONTROL) is issued by the vCPU backend.
        self.pending = false;
    }

    fn flush_pending(&self) -> bool {
        self.pending
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        for &f in &self.frames {
            frames::free(f);
        }
    }
}
