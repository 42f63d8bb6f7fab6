//! Edge coverage for fuzzing: a target compiled with SanitizerCoverage's `trace-pc-guard`
//! (`-C passes=sancov-module -C llvm-args=-sanitizer-coverage-level=3
//! -C llvm-args=-sanitizer-coverage-trace-pc-guard
//! -C llvm-args=-sanitizer-coverage-trace-compares`) calls `__sanitizer_cov_trace_pc_guard` on
//! every edge and `__sanitizer_cov_trace_*cmp*` on every comparison. The SDK counts edges in
//! the coverage map at `COV_GPA` and logs comparison operands after the counters (`ABI.md`):
//!
//! ```text
//! COV_GPA + [0, CMP_OFF)          8-bit edge counters (guard g counts at g % CMP_OFF)
//! COV_GPA + CMP_OFF               u64 count of comparisons logged (also those overwritten)
//! COV_GPA + CMP_OFF + 24 * (1+s)  slot s < CMP_SLOTS: u64 operand size in bytes (| CMP_CONST
//!                                 when the first operand is a compile-time constant; 0 = an
//!                                 empty slot), u64 first operand, u64 second operand
//! ```
//! A comparison goes to the slot its operands hash to, so a comparison repeated in a loop fills
//! one slot, not the log, and the newest of two that collide is kept. The fuzzing host maps the
//! whole window as a shared Vmo (not rolled back by reset, one per child), reads and zeroes it
//! per input, turns the constant operands into mutation tokens, and gives the operand pairs of
//! a corpus entry's run to LibAFL's input-to-state mutation (an input byte compared with a
//! magic value is replaced by it: how a magic value is found). The SDK itself is not
//! instrumented.
//!
//! Invariant: guard values are 1..CMP_OFF after `init` (0 = not numbered: ignored) and slot
//! indices are < CMP_SLOTS, so every byte the SDK writes lies inside the window.

/// Guest-physical (= virtual) address and size of the coverage map.
pub const COV_GPA: usize = 0x8_0000;
pub const COV_SIZE: usize = 0x1_0000;
/// Start of the comparison log inside the window (16,384 edge counters before it).
pub const CMP_OFF: usize = 0x4000;
/// Set in a slot's size word when its first operand is a compile-time constant (`const_cmp`,
/// `switch` cases).
pub const CMP_CONST: u64 = 0x100;
/// Bytes per slot of the comparison log: size word, two operands.
pub const CMP_SLOT_BYTES: usize = 24;
/// Slots the comparison log holds (the first slot's room holds the count).
pub const CMP_SLOTS: usize = (COV_SIZE - CMP_OFF) / CMP_SLOT_BYTES - 1;

extern "C" {
    static mut __guest_sdk_guards_start: u32;
    static mut __guest_sdk_guards_end: u32;
}

/// Numbers the guards of an instrumented program (called by `_start`; no-op otherwise).
pub(crate) fn init() {
    let start = &raw mut __guest_sdk_guards_start;
    let end = &raw mut __guest_sdk_guards_end;
    let n = (end as usize - start as usize) / 4;
    for i in 0..n {
        // SAFETY: `[start, end)` is the linker script's guard section, `n` u32s.
        unsafe { start.add(i).write_volatile((i % (CMP_OFF - 1) + 1) as u32) };
    }
}

/// How many guards the program has (0 without instrumentation).
pub fn guards() -> usize {
    (&raw mut __guest_sdk_guards_end as usize - &raw mut __guest_sdk_guards_start as usize) / 4
}

/// Called by LLVM at startup of an instrumented module; `init` has numbered the guards
/// already (the SDK does not run constructors), so nothing to do.
#[no_mangle]
extern "C" fn __sanitizer_cov_trace_pc_guard_init(_start: *mut u32, _stop: *mut u32) {}

/// Called by LLVM on every instrumented edge.
#[no_mangle]
extern "C" fn __sanitizer_cov_trace_pc_guard(guard: *mut u32) {
    // SAFETY: LLVM passes a pointer into the guard section.
    let g = unsafe { guard.read_volatile() } as usize;
    if g != 0 {
        let c = (COV_GPA + g % CMP_OFF) as *mut u8;
        // SAFETY: inside the coverage window (`g % CMP_OFF` < CMP_OFF), guest memory reserved
        // for it by the layout.
        unsafe { c.write_volatile(c.read_volatile().wrapping_add(1)) };
    }
}

/// Logs one comparison of two `size`-byte operands (`a` the constant when `size` has
/// `CMP_CONST`) in the slot they hash to.
fn record(size: u64, a: u64, b: u64) {
    let h = (a ^ b.rotate_left(29) ^ (size << 48)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let slot = ((h >> 32) as usize) % CMP_SLOTS;
    let count = (COV_GPA + CMP_OFF) as *mut u64;
    let rec = (COV_GPA + CMP_OFF + CMP_SLOT_BYTES * (1 + slot)) as *mut u64;
    // SAFETY: the count and the slot lie inside the coverage window (slot < CMP_SLOTS).
    unsafe {
        count.write_volatile(count.read_volatile().wrapping_add(1));
        rec.write_volatile(size);
        rec.add(1).write_volatile(a);
        rec.add(2).write_volatile(b);
    }
}

macro_rules! cmp_hooks {
    ($($name:ident, $const_name:ident, $t:ty, $size:expr;)*) => {$(
        #[no_mangle]
        extern "C" fn $name(a: $t, b: $t) {
            if a != b {
                record($size, a as u64, b as u64);
            }
        }
        /// `a` is the compile-time constant.
        #[no_mangle]
        extern "C" fn $const_name(a: $t, b: $t) {
            if a != b {
                record($size | CMP_CONST, a as u64, b as u64);
            }
        }
    )*};
}

cmp_hooks! {
    __sanitizer_cov_trace_cmp1, __sanitizer_cov_trace_const_cmp1, u8, 1;
    __sanitizer_cov_trace_cmp2, __sanitizer_cov_trace_const_cmp2, u16, 2;
    __sanitizer_cov_trace_cmp4, __sanitizer_cov_trace_const_cmp4, u32, 4;
    __sanitizer_cov_trace_cmp8, __sanitizer_cov_trace_const_cmp8, u64, 8;
}

/// `switch (val)` with `cases = [count, bit width, case values...]`: logs `val` against each of
/// the first 16 cases (constants).
#[no_mangle]
extern "C" fn __sanitizer_cov_trace_switch(val: u64, cases: *const u64) {
    // SAFETY: LLVM passes its case table: count, width, then `count` values.
    let (n, bits) = unsafe { (cases.read(), cases.add(1).read()) };
    for i in 0..n.min(16) as usize {
        // SAFETY: i < n, inside the table.
        let c = unsafe { cases.add(2 + i).read() };
        if c != val {
            record((bits / 8) | CMP_CONST, c, val);
        }
    }
}
