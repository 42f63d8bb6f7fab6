//! The boot image and the long-mode register state of a guest program.
//!
//! - [`GDT`] is the one descriptor table: `boot_image` writes its encoded entries at
//!   `GDT_GPA`, and `long_mode_sregs` derives the KVM segment registers from the same entries,
//!   so the segment caches always agree with the table in guest memory;
//! - the page tables map exactly `[0, mem_size)` rounded up to 2 MiB, user-accessible and
//!   writable, so all guest code runs at CPL3 (the only native mode on PVM, PLATFORM.md).
//!
//! Invariants: `boot_image` writes only below `DATA_GPA` and refuses memory sizes the tables
//! cannot map and code that does not fit, with an error (never a panic).

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use super::layout::{
    CODE_GPA, DATA_GPA, GDT_GPA, MAX_MEM, PDPT_GPA, PD_GPA, PML4_GPA, STACK_SIZE, STACK_TOP,
};
use crate::error::{Error, Result};
use ept::PAGE_SIZE;

/// One segment descriptor, as the fields the SDM (Vol. 3A §3.4.5) and `kvm_segment` share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub base: u32,
    /// 20-bit limit (in 4 KiB units when `g`).
    pub limit: u32,
    /// Type field (code/data: accessed, R/W, C/E, code; system: 0xb = busy 64-bit TSS).
    pub type_: u8,
    /// Code/data (1) or system (0).
    pub s: bool,
    pub dpl: u8,
    pub present: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Default operation size 32-bit.
    pub db: bool,
    /// Granularity 4 KiB.
    pub g: bool,
}

impl Descriptor {
    const fn code_data(type_: u8, dpl: u8, l: bool, db: bool) -> Self {
        Descriptor {
            base: 0,
            limit: 0xf_ffff,
            type_,
            s: true,
            dpl,
            present: true,
            l,
            db,
            g: true,
        }
    }

    /// The 8-byte GDT entry (for a 64-bit TSS, its low half).
    pub const fn encode(&self) -> u64 {
        let b = self.base as u64;
        let l = self.limit as u64;
        (l & 0xffff)
            | ((b & 0xff_ffff) << 16)
            | ((self.type_ as u64 & 0xf) << 40)
            | ((self.s as u64) << 44)
            | ((self.dpl as u64 & 3) << 45)
            | ((self.present as u64) << 47)
            | (((l >> 16) & 0xf) << 48)
            | ((self.l as u64) << 53)
            | ((self.db as u64) << 54)
            | ((self.g as u64) << 55)
            | (((b >> 24) & 0xff) << 56)
    }

    /// The segment register KVM loads for `selector` referring to this entry.
    pub fn segment(&self, selector: u16) -> kvm_segment {
        let limit = if self.g {
            (self.limit << 12) | 0xfff
        } else {
            self.limit
        };
        kvm_segment {
            base: self.base as u64,
            limit,
            selector,
            type_: self.type_,
            present: self.present as u8,
            dpl: self.dpl,
            db: self.db as u8,
            s: self.s as u8,
            l: self.l as u8,
            g: self.g as u8,
            avl: 0,
            unusable: 0,
            padding: 0,
        }
    }
}

/// GDT slot of the kernel code segment (0x08), kernel data (0x10), user code (0x18 → selector
/// 0x1b with RPL 3), user data (0x20 → 0x23), TSS (0x28, two slots).
const KERNEL_CODE: usize = 1;
const KERNEL_DATA: usize = 2;
const USER_CODE: usize = 3;
const USER_DATA: usize = 4;
const TSS: usize = 5;

/// The descriptor table (slot 6 is the TSS descriptor's high half: base bits 63:32 = 0).
pub const GDT: [Option<Descriptor>; 7] = {
    let mut t = [None; 7];
    t[KERNEL_CODE] = Some(Descriptor::code_data(0xb, 0, true, false));
    t[KERNEL_DATA] = Some(Descriptor::code_data(0x3, 0, false, true));
    t[USER_CODE] = Some(Descriptor::code_data(0xb, 3, true, false));
    t[USER_DATA] = Some(Descriptor::code_data(0x3, 3, false, true));
    t[TSS] = Some(Descriptor {
        base: 0,
        limit: 0x67,
        type_: 0xb,
        s: false,
        dpl: 0,
        present: true,
        l: false,
        db: false,
        g: false,
    });
    t
};

const fn selector(slot: usize, rpl: u16) -> u16 {
    (slot as u16) << 3 | rpl
}

pub const SEL_USER_CODE: u16 = selector(USER_CODE, 3);
pub const SEL_USER_DATA: u16 = selector(USER_DATA, 3);
pub const SEL_TSS: u16 = selector(TSS, 0);

fn gdt_entry(slot: usize) -> Descriptor {
    GDT[slot].expect("the slots named above are filled")
}

/// The boot image: (gpa, bytes) pieces the VMM writes before the first run.
pub fn boot_image(mem_size: u64, code: &[u8]) -> Result<Vec<(u64, Vec<u8>)>> {
    if !(DATA_GPA..=MAX_MEM).contains(&mem_size) {
        return Err(Error::Payload(format!(
            "guest memory {mem_size:#x} must be between {DATA_GPA:#x} and {MAX_MEM:#x}"
        )));
    }
    if code.len() as u64 > STACK_TOP - STACK_SIZE - CODE_GPA {
        return Err(Error::Payload(format!(
            "guest code of {} bytes does not fit",
            code.len()
        )));
    }
    let mut out = Vec::new();
    let gdt: Vec<u8> = GDT
        .iter()
        .flat_map(|d| d.map_or(0, |d| d.encode()).to_le_bytes())
        .collect();
    out.push((GDT_GPA, gdt));
    // P | RW | U/S
    const FLAGS: u64 = 0x7;
    // PS (a 2 MiB page in a PD entry)
    const PS: u64 = 0x80;
    let gibs = mem_size.div_ceil(1 << 30);
    let mut pml4 = vec![0u8; PAGE_SIZE as usize];
    pml4[..8].copy_from_slice(&(PDPT_GPA | FLAGS).to_le_bytes());
    out.push((PML4_GPA, pml4));
    let mut pdpt = vec![0u8; PAGE_SIZE as usize];
    for g in 0..gibs {
        let e = (PD_GPA + g * PAGE_SIZE) | FLAGS;
        pdpt[g as usize * 8..][..8].copy_from_slice(&e.to_le_bytes());
    }
    out.push((PDPT_GPA, pdpt));
    let two_megs = mem_size.div_ceil(2 << 20);
    let mut pds = vec![0u8; (gibs * PAGE_SIZE) as usize];
    for i in 0..two_megs {
        let e = (i << 21) | FLAGS | PS;
        pds[i as usize * 8..][..8].copy_from_slice(&e.to_le_bytes());
    }
    out.push((PD_GPA, pds));
    out.push((CODE_GPA, code.to_vec()));
    Ok(out)
}

/// `sregs` switched to 64-bit long mode at CPL3 with paging from `PML4_GPA`, segments loaded
/// from [`GDT`].
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = gdt_entry(USER_CODE).segment(SEL_USER_CODE);
    let data = gdt_entry(USER_DATA).segment(SEL_USER_DATA);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt_entry(TSS).segment(SEL_TSS);
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    // PE | MP | ET | NE | PG
    sregs.cr0 = 0x8000_0033;
    // PAE | OSFXSR | OSXMMEXCPT (the guest's code may use SSE)
    sregs.cr4 = 0x20 | 0x200 | 0x400;
    sregs.cr3 = PML4_GPA;
    // LME | LMA
    sregs.efer = 0x500;
    sregs
}

/// The general registers of a program entered at `rip` with `args`, on the CPL3 stack, with
/// IOPL=3 (port I/O hypercalls).
pub fn entry_regs(rip: u64, args: GuestArgs) -> kvm_regs {
    kvm_regs {
        rip,
        rsp: STACK_TOP,
        // IOPL=3 | reserved bit 1
        rflags: 0x3002,
        rdi: args.rdi,
        rsi: args.rsi,
        rdx: args.rdx,
        rcx: args.rcx,
        rax: args.rax,
        ..Default::default()
    }
}

/// Initial registers of a guest program.
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestArgs {
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_encodes_to_the_architectural_entries() {
        // Hand-checked against SDM Vol. 3A Figure 3-8 (and what this VMM booted with before
        // the table existed).
        let want: [u64; 7] = [
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x00af_fb00_0000_ffff,
            0x00cf_f300_0000_ffff,
            0x0000_8b00_0000_0067,
            0,
        ];
        let got: Vec<u64> = GDT.iter().map(|d| d.map_or(0, |d| d.encode())).collect();
        assert_eq!(got, want);
        assert_eq!((SEL_USER_CODE, SEL_USER_DATA, SEL_TSS), (0x1b, 0x23, 0x28));
    }

    #[test]
    fn segments_derive_from_the_same_entries() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(
            (s.cs.type_, s.cs.dpl, s.cs.l, s.cs.db, s.cs.g),
            (11, 3, 1, 0, 1)
        );
        assert_eq!(s.cs.limit, 0xffff_ffff);
        assert_eq!((s.ss.type_, s.ss.dpl, s.ss.l, s.ss.db), (3, 3, 0, 1));
        assert_eq!((s.tr.type_, s.tr.s, s.tr.limit, s.tr.g), (11, 0, 0x67, 0));
        assert_eq!(s.gdt.limit, 7 * 8 - 1);
    }

    #[test]
    fn boot_image_maps_memory_and_refuses_what_does_not_fit() {
        let img = boot_image(3 << 30, &[0x90; 16]).unwrap();
        let pdpt = &img.iter().find(|(g, _)| *g == PDPT_GPA).unwrap().1;
        for g in 0..3u64 {
            let e = u64::from_le_bytes(pdpt[g as usize * 8..][..8].try_into().unwrap());
            assert_eq!(e, (PD_GPA + g * PAGE_SIZE) | 7);
        }
        let pds = &img.iter().find(|(g, _)| *g == PD_GPA).unwrap().1;
        assert_eq!(pds.len(), 3 * PAGE_SIZE as usize);
        let last = u64::from_le_bytes(pds[(3 * 512 - 1) * 8..][..8].try_into().unwrap());
        assert_eq!(last, ((3 * 512 - 1) << 21) | 0x87);
        for (gpa, bytes) in &img {
            assert!(
                gpa + bytes.len() as u64 <= DATA_GPA,
                "boot image writes below DATA_GPA"
            );
        }
        assert!(boot_image(DATA_GPA - PAGE_SIZE, &[]).is_err());
        assert!(boot_image(MAX_MEM + PAGE_SIZE, &[]).is_err());
        assert!(boot_image(
            1 << 30,
            &vec![0; (STACK_TOP - STACK_SIZE - CODE_GPA + 1) as usize]
        )
        .is_err());
    }
}
