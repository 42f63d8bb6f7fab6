//! Small hand-encoded x86-64 guest programs the tests and benchmarks run (each is a few
//! instructions at `CODE_GPA`, CPL3, ending with `out PORT_DONE, al`).
//!
//! Invariant: every program ends in `out PORT_DONE` followed by `jmp $`, so a run that gets
//! past its loop always exits to the VMM.

use crate::vmm::hypercall::{HC_REPORT, PORT_CALL, PORT_DONE};

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
