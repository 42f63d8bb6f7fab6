//! COM1 (0x3F8) serial output: the hypervisor's only console.
//!
//! Owns the UART. Invariant: `init` runs once before the first print; every byte is written only
//! after the transmit holding register is empty, and `flush` returns only when the transmitter is
//! completely idle (LSR.TEMT), so nothing is lost when an emulator stops right after the last line.

use core::fmt::{self, Write};
use spin::Mutex;

use super::cpu::{inb, outb};

const COM1: u16 = 0x3F8;

pub struct Serial;

static SERIAL: Mutex<Serial> = Mutex::new(Serial);

pub fn init() {
    outb(COM1 + 1, 0x00); // no interrupts
    outb(COM1 + 3, 0x80); // DLAB
    outb(COM1, 0x01); // 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 2, 0xC7); // FIFO on, cleared
    outb(COM1 + 4, 0x03); // DTR | RTS
}

fn put(byte: u8) {
    while inb(COM1 + 5) & 0x20 == 0 {}
    outb(COM1, byte);
}

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                put(b'\r');
            }
            put(b);
        }
        Ok(())
    }
}

/// Waits until the UART has sent every byte (LSR.TEMT).
pub fn flush() {
    while inb(COM1 + 5) & 0x40 == 0 {}
}

pub fn print_fmt(args: fmt::Arguments) {
    let _ = SERIAL.lock().write_fmt(args);
}

/// Prints from a context that may have interrupted a print (exceptions, panics): bypasses the lock.
pub fn print_fmt_unlocked(args: fmt::Arguments) {
    let _ = Serial.write_fmt(args);
}

/// Prints a line to COM1 (takes the serial lock). A path-scoped macro: import it as
/// `crate::platform::serial::println`.
macro_rules! println {
    () => { $crate::platform::serial::print_fmt(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::platform::serial::print_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}

pub(crate) use println;
