//! The runtime: `_start` (the ELF entry), the panic handler, and the memory functions the
//! compiler emits calls to (no libc in a guest).
//!
//! `_start` keeps the stack the host set (`rsp` = 0x80000, 16-byte aligned), records the
//! memory size and heap from `rdi` / `rsi` / `rdx` and the program argument from `rcx` (the
//! four registers are `sdk_start`'s arguments as `_start` leaves them), calls the program's
//! `main!` function and passes its value to `done`.

use core::arch::{asm, global_asm};
use core::sync::atomic::Ordering;

use crate::hypercall::{crash, done, MsgBuf, BOOT_ARG, HEAP_END, HEAP_START, MEM_SIZE};

global_asm!(
    ".section .text.start, \"ax\"",
    ".global _start",
    "_start:",
    "call {start}",
    "ud2",
    start = sym sdk_start,
);

extern "C" {
    /// Defined by the program's `guest_sdk::main!`.
    fn __guest_sdk_main() -> u64;
}

extern "C" fn sdk_start(mem: u64, heap_start: u64, heap_end: u64, arg: u64) -> ! {
    MEM_SIZE.store(mem, Ordering::Relaxed);
    BOOT_ARG.store(arg, Ordering::Relaxed);
    HEAP_START.store(heap_start, Ordering::Relaxed);
    HEAP_END.store(heap_end, Ordering::Relaxed);
    crate::heap::HEAP.init(heap_start, heap_end);
    crate::cov::init();
    // SAFETY: `main!` defines the symbol as a safe `extern "C" fn() -> u64`.
    let status = unsafe { __guest_sdk_main() };
    done(status)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut w = MsgBuf::new();
    let _ = core::fmt::Write::write_fmt(&mut w, format_args!("{info}"));
    crash(w.as_str())
}

#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees valid, non-overlapping ranges.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags))
    };
    dst
}

#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: a forward copy is correct when dst does not start inside src.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: a backward copy with the direction flag set, then cleared.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _,
             inout("rsi") src.add(n - 1) => _, options(nostack))
    };
    dst
}

#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees a valid range.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags))
    };
    dst
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees valid ranges; volatile keeps this a plain loop (not a
        // call to memcmp itself).
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: as memcmp.
    unsafe { memcmp(a, b, n) }
}

#[no_mangle]
extern "C" fn rust_eh_personality() {}
