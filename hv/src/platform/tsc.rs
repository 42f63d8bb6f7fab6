//! The time-stamp counter and its rate, measured once against the PIT (channel 2, the
//! speaker gate), so run-time figures can be printed in microseconds.
//!
//! Invariant: `calibrate` runs on the boot CPU before any guest does (it reprograms PIT
//! channel 2, which a guest owns afterwards) and returns `None` rather than spinning forever
//! when no PIT answers.

use super::cpu::{inb, outb};

/// PIT input clock (Hz) and the gate of channel 2 (port 0x61: bit 0 gate, bit 1 speaker data,
/// bit 5 channel 2 output).
const PIT_HZ: u64 = 1_193_182;
const PORT_GATE: u16 = 0x61;
const PORT_CMD: u16 = 0x43;
const PORT_CH2: u16 = 0x42;
/// Measure over 10 ms.
const WINDOW_MS: u64 = 10;
/// Polls of the output bit before giving up (far more than 10 ms at any emulated speed).
const MAX_POLLS: u64 = 200_000_000;

/// The counter now.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads a counter; it touches no memory and CR4.TSD is clear in this kernel.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks per millisecond, measured over a 10 ms PIT one-shot; `None` without a PIT.
pub fn calibrate() -> Option<u64> {
    let count = PIT_HZ * WINDOW_MS / 1000;
    // Gate high, speaker off; channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count).
    outb(PORT_GATE, (inb(PORT_GATE) & !0x02) | 0x01);
    outb(PORT_CMD, 0xB0);
    outb(PORT_CH2, (count & 0xFF) as u8);
    outb(PORT_CH2, (count >> 8) as u8);
    let start = rdtsc();
    for _ in 0..MAX_POLLS {
        if inb(PORT_GATE) & 0x20 != 0 {
            let ticks = rdtsc() - start;
            return (ticks > 0).then_some(ticks / WINDOW_MS);
        }
    }
    None
}
