//! Ending the run on either emulator: the verdict line (`HV-VERDICT: PASS|FAIL <detail>`,
//! whatever decided it), then every exit device we know.
//!
//! QEMU: isa-debug-exit at port 0xF4 (exit code 2v+1: 0x10 → 33 pass, 0x11 → 35 fail).
//! Bochs: the bytes "Shutdown" to port 0x8900 (Bochs exits with 1 either way, so the serial
//! verdict line is what counts). Then ACPI-style 0x604 for good measure, then halt forever.
//! Invariant: the verdict line is fully transmitted (LSR.TEMT) before any exit port is touched;
//! nothing after `finish` runs (the CPU halts with interrupts off).

use super::cpu::{outb, outl, outw};
use super::serial;

/// QEMU's isa-debug-exit device (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`).
const QEMU_DEBUG_EXIT: u16 = 0xF4;
/// Bochs' shutdown port: writing the bytes "Shutdown" ends the simulation.
const BOCHS_SHUTDOWN: u16 = 0x8900;
/// QEMU/Bochs ACPI PM1a control (SLP_EN | SLP_TYP 0): power off on machines that have it.
const ACPI_PM1A_CNT: u16 = 0x604;

pub const VERDICT_PREFIX: &str = "HV-VERDICT:";

fn ports(pass: bool) -> ! {
    serial::flush();
    outl(QEMU_DEBUG_EXIT, if pass { 0x10 } else { 0x11 });
    for b in b"Shutdown" {
        outb(BOCHS_SHUTDOWN, *b);
    }
    outw(ACPI_PM1A_CNT, 0x2000);
    loop {
        // SAFETY: CLI; HLT only stops this (the only) CPU; no memory or Rust state is touched.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) }
    }
}

/// Prints `HV-VERDICT: PASS|FAIL <detail>` and ends the run.
pub fn finish(pass: bool, detail: &str) -> ! {
    serial::println!(
        "{} {} {}",
        VERDICT_PREFIX,
        if pass { "PASS" } else { "FAIL" },
        detail
    );
    ports(pass)
}

/// As `finish`, for exception and panic context (does not take the serial lock).
pub fn finish_unlocked(pass: bool, detail: &str) -> ! {
    serial::print_fmt_unlocked(format_args!(
        "{} {} {}\n",
        VERDICT_PREFIX,
        if pass { "PASS" } else { "FAIL" },
        detail
    ));
    ports(pass)
}
