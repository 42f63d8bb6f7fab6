//! platform: the bare machine this kernel runs on, and nothing about virtualization. The floor
//! everything else stands on: no file here imports `virt` or `scenario`.
//!
//! One job per file:
//! - `boot` — boot.s (multiboot2 header, PVH note, 32-bit entries, long mode, identity map,
//!   GDT) and the boot information it hands over: protocol and usable RAM (`MemoryMap`).
//! - `rt` — the freestanding runtime the precompiled core expects: mem*, the panic handler,
//!   `rust_eh_personality`.
//! - `heap` — the global allocator over the region `frames` reserves at boot.
//! - `frames` — the physical frame allocator (identity mapped), also as `vmo::FrameAlloc` and
//!   `ept::PhysMem`.
//! - `serial` — COM1, the only console (`println!`).
//! - `cpu` — port I/O, MSRs, control registers, CPUID, descriptor pointers, the TSS slot.
//! - `traps` — the exception IDT (traps.s stubs) and the handler that ends the run.
//! - `shutdown` — the verdict line and the emulators' exit devices.
//! - `tsc` — the time-stamp counter and its rate (measured against the PIT).
//!
//! Inside the floor the arrows run one way: `traps`, `rt` → `shutdown` → `serial` → `cpu`;
//! `frames` → `boot`; `tsc` → `cpu`.

pub mod boot;
pub mod cpu;
pub mod frames;
pub mod heap;
pub mod rt;
pub mod serial;
pub mod shutdown;
pub mod traps;
pub mod tsc;
