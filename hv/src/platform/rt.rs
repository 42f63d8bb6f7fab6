//! Freestanding runtime glue the precompiled core expects from libc and the panic runtime:
//! mem* functions, `rust_eh_personality`, and the panic handler (report on serial, FAIL verdict).
//!
//! Invariant: the mem* functions are written with `rep movsb/stosb` or volatile byte loops that
//! cannot be turned back into calls to themselves; they run with DF clear (boot.s's `cld`) and
//! leave it clear.

use core::arch::asm;

/// # Safety
/// C semantics: the pointers are valid for `n` bytes (and, for memcpy, do not overlap).
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's C contract (valid, for memcpy non-overlapping, `n`-byte ranges);
    // DF is clear (boot.s runs `cld`, and nothing leaves it set).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C semantics: the pointers are valid for `n` bytes (they may overlap).
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: valid `n`-byte ranges (the caller's C contract); a forward copy is correct
        // when `dst` is below `src` or past the end of the source.
        unsafe {
            asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
        }
    } else if n > 0 {
        // SAFETY: valid `n`-byte ranges with `dst` inside the source: copying backwards from
        // the last byte (`n - 1` is in bounds) reads every source byte before it is
        // overwritten; DF is set only inside this block and cleared again.
        unsafe {
            asm!("std", "rep movsb", "cld",
                inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
                options(nostack));
        }
    }
    dst
}

/// # Safety
/// C semantics: `dst` is valid for `n` bytes of writes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's C contract (`dst` valid for `n` bytes of writes); DF is clear.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C semantics: both pointers are valid for `n` bytes of reads.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: `i < n` and both pointers are valid for `n` bytes (the caller's C contract).
        // Volatile reads keep the compiler from turning this loop back into a memcmp call.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// C semantics: both pointers are valid for `n` bytes of reads.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the same contract as `memcmp`, which the caller upholds.
    unsafe { memcmp(a, b, n) }
}

#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    super::serial::print_fmt_unlocked(format_args!("\nHYPERVISOR PANIC: {info}\n"));
    super::shutdown::finish_unlocked(false, "hypervisor panic")
}

/// The precompiled `alloc` has landing pads that call this; with `panic = "abort"` nothing
/// unwinds, so reaching it is a bug.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    super::serial::print_fmt_unlocked(format_args!("\n_Unwind_Resume reached\n"));
    super::shutdown::finish_unlocked(false, "unwind attempted")
}
