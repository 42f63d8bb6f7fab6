//! The guest program and the guest-physical layout it runs in.
//!
//! Owns the program bytes (program.s, assembled into the kernel image as data), its hypercall
//! ABI and roles, the layout constants, the values the program writes (what the checks
//! expect), and `load`, which builds a guest: one RAM Vmo whose parts are mapped into the
//! guest's Vmar with per-region permissions; the guest's own page tables and code are written
//! into the Vmo (committing pages, installing nothing in the second-level table); returns the
//! initial vCPU state.
//! Invariant: the layout below matches the addresses hard-coded in program.s.

use ept::PAGE_SIZE;

use super::space::Space;
use crate::virt::vcpu::{Gprs, VcpuState};
use vmo::{FramePool, VmPerms, Vmo, VmoFlags};

core::arch::global_asm!(include_str!("program.s"));

extern "C" {
    static hv_guest_start: u8;
    static hv_guest_hypercall: u8;
    static hv_guest_end: u8;
}

/// Guest page tables (PML4, PDPT, PD): identity map of the first GiB with 2 MiB pages.
pub const PT_BASE: u64 = 0x1000;
pub const CODE_BASE: u64 = 0x10000;
pub const CODE_PAGES: u64 = 2;
pub const STACK_BASE: u64 = 0x20000;
pub const STACK_PAGES: u64 = 4;
pub const DATA_BASE: u64 = 0x100000;
pub const DATA_PAGES: u64 = 32;
/// BIG: 16 MiB the main guest writes completely (one qword per page) before it forks, so the
/// fork write-protects a fully written guest; the parent writes `BIG_PARENT_VALUE` at
/// `BIG_BASE + 8` after the fork (the children keep 0 there).
pub const BIG_BASE: u64 = 0x40_0000;
pub const BIG_PAGES: u64 = 4096;
pub const BIG_PARENT_VALUE: u64 = 0xFEED_0000_0000_0001;
/// An address the guest's own page tables translate but no mapping covers.
pub const OOB_PROBE: u64 = 0x3000_0000;
pub const SEED: u64 = 0x5EED_5EED_0000_0000;
/// Multiplier of the children's pattern: child k writes (gpa + k) * GOLDEN.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
/// Pages each child writes, and where child k starts (in pages from DATA_BASE).
pub const CHILD_PAGES: u64 = 12;
pub fn child_first_page(k: u64) -> u64 {
    (k - 1) * 8
}

pub const HC_REPORT: u64 = 1;
pub const HC_FORK: u64 = 2;
pub const HC_YIELD: u64 = 3;
pub const TAG_FILLED: u64 = 1;
pub const TAG_CHILD: u64 = 2;
pub const TAG_PARENT_AFTER: u64 = 3;
pub const TAG_SURVIVED: u64 = 0xBAD;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    Main = 0,
    OutOfBounds = 1,
    WriteReadOnly = 2,
    ReadCorruptedEntry = 3,
}

/// Expected value of the qword at `gpa` in the parent's snapshot.
pub fn parent_value(gpa: u64) -> u64 {
    gpa ^ SEED
}

/// Expected value of the qword at `gpa` as child `k` sees it after its writes.
pub fn child_value(k: u64, gpa: u64) -> u64 {
    let page = (gpa - DATA_BASE) / PAGE_SIZE;
    let first = child_first_page(k);
    if page >= first && page < first + CHILD_PAGES {
        (gpa + k).wrapping_mul(GOLDEN)
    } else {
        parent_value(gpa)
    }
}

/// Wrapping sum of `value(gpa)` over DATA (what the guest's checksum routine computes).
pub fn checksum(value: impl Fn(u64) -> u64) -> u64 {
    (0..DATA_PAGES * 512).fold(0u64, |s, i| s.wrapping_add(value(DATA_BASE + i * 8)))
}

fn payload() -> (&'static [u8], usize) {
    // SAFETY: the three symbols are labels of program.s in one read-only section, in the order
    // start <= hypercall < end, so `[start, end)` is immutable data of the kernel image that
    // lives forever; only their addresses are taken.
    unsafe {
        let start = core::ptr::addr_of!(hv_guest_start);
        let len = core::ptr::addr_of!(hv_guest_end) as usize - start as usize;
        let hc = core::ptr::addr_of!(hv_guest_hypercall) as usize - start as usize;
        (core::slice::from_raw_parts(start, len), hc)
    }
}

/// Size of the guest's address space (its root Vmar).
pub const GUEST_PHYS_SIZE: u64 = 1 << 30;

/// The regions: (guest-physical base, pages, permissions). They are consecutive in the RAM Vmo.
pub const REGIONS: [(u64, u64, VmPerms); 5] = [
    (PT_BASE, 3, VmPerms::RW),
    (CODE_BASE, CODE_PAGES, VmPerms::READ.union(VmPerms::EXEC)),
    (STACK_BASE, STACK_PAGES, VmPerms::RW),
    (DATA_BASE, DATA_PAGES, VmPerms::RW),
    (BIG_BASE, BIG_PAGES, VmPerms::RW),
];

/// Offset in the RAM Vmo of guest-physical `gpa` (which must lie in a region).
fn ram_offset(gpa: u64) -> u64 {
    let mut off = 0;
    for (base, pages, _) in REGIONS {
        if gpa >= base && gpa < base + pages * PAGE_SIZE {
            return off + (gpa - base);
        }
        off += pages * PAGE_SIZE;
    }
    u64::MAX
}

/// Creates the guest's RAM Vmo, maps the regions, writes page tables and code, and returns
/// the entry state.
pub fn load(
    pool: &FramePool,
    space: &Space,
    role: Role,
    hypercall: [u8; 3],
) -> Result<VcpuState, vmo::Error> {
    let total: u64 = REGIONS.iter().map(|r| r.1).sum();
    let ram = Vmo::new(pool, total * PAGE_SIZE, VmoFlags::empty())?;
    let mut off = 0;
    for (base, pages, perms) in REGIONS {
        space.map(&ram, off, base, pages, perms)?;
        off += pages * PAGE_SIZE;
    }

    // PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] = 2 MiB page i (P|RW|PS, A and D preset so the
    // guest's walks need not write its tables).
    ram.write(
        ram_offset(PT_BASE),
        &((PT_BASE + PAGE_SIZE) | 0x23).to_le_bytes(),
    )?;
    ram.write(
        ram_offset(PT_BASE + PAGE_SIZE),
        &((PT_BASE + 2 * PAGE_SIZE) | 0x23).to_le_bytes(),
    )?;
    let mut pd = [0u8; PAGE_SIZE as usize];
    for i in 0..512u64 {
        pd[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&((i << 21) | 0xE3).to_le_bytes());
    }
    ram.write(ram_offset(PT_BASE + 2 * PAGE_SIZE), &pd)?;

    let (code, hc_off) = payload();
    if code.len() as u64 > CODE_PAGES * PAGE_SIZE {
        return Err(vmo::Error::OutOfRange);
    }
    ram.write(ram_offset(CODE_BASE), code)?;
    ram.write(ram_offset(CODE_BASE) + hc_off as u64, &hypercall)?;

    let gprs = Gprs {
        rdi: role as u64,
        ..Gprs::default()
    };
    Ok(VcpuState {
        gprs,
        rip: CODE_BASE,
        rsp: STACK_BASE + STACK_PAGES * PAGE_SIZE,
        rflags: 0x2,
        cr0: 0x8001_0033, // PG | WP | NE | ET | MP | PE
        cr3: PT_BASE,
        cr4: 0x620,  // PAE | OSFXSR | OSXMMEXCPT
        efer: 0x500, // LME | LMA
    })
}
