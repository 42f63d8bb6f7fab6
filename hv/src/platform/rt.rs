//! Freestanding runtime glue the precompiled core expects from libc and the panic runtime:
//! mem* functions, `rust_eh_personality`, and the panic handler (report on serial, FAIL verdict).
//!
//! Invariant: the mem* functions are written with `rep movsb/stosb` or plain byte loops that
//! cannot be turned back into calls to themselves.

use core::arch::asm;

/// # Safety
/// C semantics: the pointers are valid for `n` bytes (and, for memcpy, do not overlap).
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
    dst
}

/// # Safety
/// C semantics: the pointers are valid for `n` bytes (and, for memcpy, do not overlap).
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
    } else if n > 0 {
        asm!("std", "rep movsb", "cld",
            inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
            options(nostack));
    }
    dst
}

/// # Safety
/// C semantics: the pointers are valid for `n` bytes (and, for memcpy, do not overlap).
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags));
    dst
}

/// # Safety
/// C semantics: the pointers are valid for `n` bytes (and, for memcpy, do not overlap).
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let (x, y) = (
            core::ptr::read_volatile(a.add(i)),
            core::ptr::read_volatile(b.add(i)),
        );
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// C semantics: the pointers are valid for `n` bytes (and, for memcpy, do not overlap).
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}

#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::platform::serial::print_fmt_unlocked(format_args!("\nHYPERVISOR PANIC: {info}\n"));
    crate::platform::shutdown::finish_unlocked(false, "hypervisor panic")
}

/// The precompiled `alloc` has landing pads that call this; with `panic = "abort"` nothing
/// unwinds, so reaching it is a bug.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    crate::platform::serial::print_fmt_unlocked(format_args!("\n_Unwind_Resume reached\n"));
    crate::platform::shutdown::finish_unlocked(false, "unwind attempted")
}
