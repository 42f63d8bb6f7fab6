//! Guest programs and the boot image: the guest-physical layout, the identity-mapping page
//! tables and GDT the VMM writes into guest memory, and small hand-encoded x86-64 programs.
//!
//! Layout (guest-physical, guest RAM starts at GPA 0):
//! ```text
//! 0x0800        GDT (null, kernel code/data, user code 0x1b, user data 0x23, TSS 0x28)
//! 0x1000        PML4        0x2000 PDPT        0x3000.. one PD per GiB (2 MiB pages, U/S=1)
//! 0x10000       code (CODE_GPA), up to STACK_TOP - STACK_SIZE
//! 0x80000       top of the CPL3 stack (STACK_TOP), grows down
//! 0x90000       workload mailbox page (MAILBOX_GPA)
//! 0x100000..    data (DATA_GPA): free for the workload
//! ```
//! Invariants: everything the boot image writes lies below `DATA_GPA`; the page tables map
//! exactly `[0, mem_size)` rounded up to 2 MiB, user-accessible and writable, so all guest
//! code runs at CPL3 (the only native mode on PVM, PLATFORM.md).

use crate::hypercall::{PORT_CALL, PORT_DONE};
use crate::{Error, Result};

pub const GDT_GPA: u64 = 0x800;
pub const PML4_GPA: u64 = 0x1000;
pub const PDPT_GPA: u64 = 0x2000;
pub const PD_GPA: u64 = 0x3000;
/// Most guest RAM the boot page tables map (one PD page per GiB between 0x3000 and 0x10000).
pub const MAX_MEM: u64 = 8 << 30;
pub const CODE_GPA: u64 = 0x10000;
pub const STACK_TOP: u64 = 0x80000;
pub const STACK_SIZE: u64 = 0x10000;
pub const MAILBOX_GPA: u64 = 0x90000;
pub const DATA_GPA: u64 = 0x100000;

pub const SEL_USER_CODE: u16 = 0x1b;
pub const SEL_USER_DATA: u16 = 0x23;
pub const SEL_TSS: u16 = 0x28;

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
    let gdt: [u64; 7] = [
        0,
        0x00af_9b00_0000_ffff, // 0x08 kernel code, 64-bit
        0x00cf_9300_0000_ffff, // 0x10 kernel data
        0x00af_fb00_0000_ffff, // 0x18 user code, 64-bit, DPL3
        0x00cf_f300_0000_ffff, // 0x20 user data, DPL3
        0x0000_8b00_0000_0067, // 0x28 TSS (busy, base 0, limit 0x67), low half
        0,                     // TSS high half
    ];
    out.push((GDT_GPA, gdt.iter().flat_map(|e| e.to_le_bytes()).collect()));
    // P | RW | U/S
    const FLAGS: u64 = 0x7;
    let gibs = mem_size.div_ceil(1 << 30);
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPT_GPA | FLAGS).to_le_bytes());
    out.push((PML4_GPA, pml4));
    let mut pdpt = vec![0u8; 4096];
    for g in 0..gibs {
        let e = (PD_GPA + g * 4096) | FLAGS;
        pdpt[g as usize * 8..][..8].copy_from_slice(&e.to_le_bytes());
    }
    out.push((PDPT_GPA, pdpt));
    let two_megs = mem_size.div_ceil(2 << 20);
    let mut pds = vec![0u8; gibs as usize * 4096];
    for i in 0..two_megs {
        // PS (2 MiB page)
        let e = (i << 21) | FLAGS | 0x80;
        pds[i as usize * 8..][..8].copy_from_slice(&e.to_le_bytes());
    }
    out.push((PD_GPA, pds));
    out.push((CODE_GPA, code.to_vec()));
    Ok(out)
}

/// `rdi` = address, `rcx` = count, `rdx` = stride: stores `al` at each address, then reports
/// done on `PORT_DONE` with `al`.
pub fn write_loop() -> Vec<u8> {
    vec![
        0x88,
        0x07, // wloop: mov [rdi], al
        0x48,
        0x01,
        0xd7, // add rdi, rdx
        0x48,
        0xff,
        0xc9, // dec rcx
        0x75,
        0xf6, // jnz wloop
        0xe6,
        PORT_DONE as u8, // out PORT_DONE, al
        0xeb,
        0xfe, // jmp $
    ]
}

/// `rdi` = address, `rcx` = count, `rdx` = stride: `al += [addr]` for each address, then
/// reports done with `al` (the byte sum).
pub fn read_loop() -> Vec<u8> {
    vec![
        0x02,
        0x07, // rloop: add al, [rdi]
        0x48,
        0x01,
        0xd7, // add rdi, rdx
        0x48,
        0xff,
        0xc9, // dec rcx
        0x75,
        0xf6, // jnz rloop
        0xe6,
        PORT_DONE as u8, // out PORT_DONE, al
        0xeb,
        0xfe, // jmp $
    ]
}

/// Reads then writes: `rdi` = address, `rcx` = count, `rdx` = stride; for each address
/// `[addr] += 1` (one read and one write per page), then done with `al`.
pub fn increment_loop() -> Vec<u8> {
    vec![
        0xfe,
        0x07, // iloop: inc byte [rdi]
        0x48,
        0x01,
        0xd7, // add rdi, rdx
        0x48,
        0xff,
        0xc9, // dec rcx
        0x75,
        0xf6, // jnz iloop
        0xe6,
        PORT_DONE as u8, // out PORT_DONE, al
        0xeb,
        0xfe, // jmp $
    ]
}

/// Hypercall round trip: calls `REPORT(rdi)` twice, the second time with the first call's
/// return value, then done with `al`.
pub fn hypercall_probe() -> Vec<u8> {
    use crate::hypercall::HC_REPORT;
    vec![
        0xb0,
        HC_REPORT, // mov al, HC_REPORT
        0xe6,
        PORT_CALL as u8, // out PORT_CALL, al
        0x48,
        0x89,
        0xc7, // mov rdi, rax
        0xb0,
        HC_REPORT, // mov al, HC_REPORT
        0xe6,
        PORT_CALL as u8, // out PORT_CALL, al
        0xe6,
        PORT_DONE as u8, // out PORT_DONE, al
        0xeb,
        0xfe, // jmp $
    ]
}
