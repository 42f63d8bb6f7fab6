//! Ending the run on either emulator: the verdict line, then every exit device we know.
//!
//! QEMU: isa-debug-exit at port 0xF4 (exit code 2v+1: 0x10 → 33 pass, 0x11 → 35 fail).
//! Bochs: the bytes "Shutdown" to port 0x8900 (Bochs exits with 1 either way, so the serial
//! verdict line is what counts). Then ACPI-style 0x604 for good measure, then halt forever.
//! Invariant: the verdict line is fully transmitted (LSR.TEMT) before any exit port is touched.

use crate::platform::cpu::{outb, outl, outw};

pub const VERDICT_PREFIX: &str = "HV-VERDICT:";

fn ports(pass: bool) -> ! {
    crate::platform::serial::flush();
    outl(0xF4, if pass { 0x10 } else { 0x11 });
    for b in b"Shutdown" {
        outb(0x8900, *b);
    }
    outw(0x604, 0x2000);
    loop {
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) }
    }
}

/// Prints `HV-VERDICT: PASS|FAIL <detail>` and ends the run.
pub fn finish(pass: bool, detail: &str) -> ! {
    crate::println!(
        "{} {} {}",
        VERDICT_PREFIX,
        if pass { "PASS" } else { "FAIL" },
        detail
    );
    ports(pass)
}

/// As `finish`, for exception and panic context (does not take the serial lock).
pub fn finish_unlocked(pass: bool, detail: &str) -> ! {
    crate::platform::serial::print_fmt_unlocked(format_args!(
        "{} {} {}\n",
        VERDICT_PREFIX,
        if pass { "PASS" } else { "FAIL" },
        detail
    ));
    ports(pass)
}
