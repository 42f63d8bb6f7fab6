//! # guest-sdk: write a program that runs inside a guest-vm guest
//!
//! A `no_std` crate (with `alloc`) for guest programs: the entry point, the hypercall wrappers
//! of the guest ABI, a bump allocator over the guest heap, a panic handler that reports the
//! panic with `crash`, and the memory functions the compiler expects. The ABI itself (loading,
//! CPU state, hypercalls, what the host does when a guest misbehaves) is documented once, in
//! `guest-vm/guest/ABI.md`, included below.
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! use guest_sdk as sdk;
//! sdk::main!(main);
//! fn main() -> u64 {
//!     sdk::log!("booted with {} MiB", sdk::mem_size() >> 20);
//!     sdk::snapshot_here().expect("the host takes its snapshot here");
//!     let input = sdk::input(4096);
//!     input.len() as u64 // done(status)
//! }
//! ```
//!
//! Modules: [`hypercall`] (the calls), [`heap`] (the global allocator), [`cov`] (edge
//! coverage for fuzzing), `rt` (entry, panic handler, `memcpy` & co.). Invariant: the SDK never returns to the host except through
//! `done` or `crash`; both loop if the host resumes the guest anyway.
#![doc = include_str!("../../ABI.md")]
#![no_std]

pub extern crate alloc;

pub mod cov;
pub mod heap;
pub mod hypercall;
mod rt;

pub use hypercall::{
    boot_arg, crash, done, heap_range, input, log, mem_size, next_input, snapshot_here, HcError,
};

/// Declares the guest's main function: `fn() -> u64` (the value is the `done` status) or
/// `fn() -> !`. The SDK's `_start` sets up the heap and calls it.
#[macro_export]
macro_rules! main {
    ($f:path) => {
        #[no_mangle]
        pub extern "C" fn __guest_sdk_main() -> u64 {
            $f()
        }
    };
}

/// `format!`-style logging through the `log` hypercall (one message per call, truncated at
/// 512 bytes; no allocation).
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {{
        let mut w = $crate::hypercall::MsgBuf::new();
        let _ = core::fmt::Write::write_fmt(&mut w, format_args!($($arg)*));
        $crate::hypercall::log(w.as_bytes());
    }};
}
