//! platform
pub mod cpu;
pub mod frames;
pub mod heap;
pub mod rt;
pub mod serial;
pub mod shutdown;

core::arch::global_asm!(include_str!("boot.s"));
