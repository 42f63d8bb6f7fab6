//! hv: a bare-metal type-1 hypervisor kernel.
//!
//! Boots through multiboot2 (GRUB ISO; QEMU or Bochs) or PVH (`qemu -kernel`), then picks a
//! virtualization backend by CPUID (AMD SVM + NPT, or Intel VMX + EPT) and runs the guest
//! scenario. Every guest page reaches the second-level tables through a fault; forks share
//! frames copy-on-write. The run ends with one `HV-VERDICT:` line on COM1 and an emulator exit.
//!
//! Three floors, each importing only the floors below it:
//! - `platform` — the bare machine: boot, runtime, heap, frames, serial, CPU primitives,
//!   traps, shutdown.
//! - `virt` — hardware virtualization, vendor-neutral above (`Vcpu`, `Backend`, `HvTable`) and
//!   the vendors beside each other below (`vmx`, `svm`).
//! - `scenario` — what this kernel runs on a backend: the guests, their address spaces, fork,
//!   the checks and the verdict.
//!
//! This file only wires them: `hv_main` (called by boot.s) initialises the platform, picks the
//! backend and hands it to the scenario.
#![no_std]
#![no_main]

extern crate alloc;

pub mod platform;
pub mod scenario;
pub mod virt;

use platform::serial::{self, println};
use platform::{boot, cpu, frames, heap, shutdown, traps};
use virt::{svm, vmx};

const HEAP_SIZE: u64 = 16 << 20;

#[no_mangle]
extern "C" fn hv_main(magic: u32, mbi: u32) -> ! {
    serial::init();
    println!(
        "hv: hypervisor kernel starting (boot protocol: {})",
        boot::protocol(magic)
    );
    cpu::init_tables();
    traps::init();
    let map = match boot::memory_map(magic, mbi) {
        Ok(m) => m,
        Err(e) => shutdown::finish(false, e),
    };
    // A bzImage among the boot modules selects the Linux guest; hv then keeps only its window
    // of RAM (the rest is the guest's) and a larger heap (the guest RAM's page records).
    let linux = scenario::linux::plan(&map);
    let (limit, heap_size) = match &linux {
        Some(Ok(plan)) => (plan.window_end, plan.heap_size),
        _ => (u64::MAX, HEAP_SIZE),
    };
    let mem = match frames::init(&map, heap_size, limit) {
        Ok(m) => m,
        Err(e) => shutdown::finish(false, e),
    };
    // SAFETY: `frames::init` reserved this region for the heap (the frame allocator never
    // hands it out); this is the only call, before the first allocation.
    unsafe { heap::init(mem.heap_start, mem.heap_size) };
    println!(
        "hv: heap {} MiB at {:#x}, {} free frames ({} MiB)",
        mem.heap_size >> 20,
        mem.heap_start,
        mem.frames_total,
        mem.frames_total * 4 / 1024
    );
    let svm = cpu::has_svm_npt();
    let vmx = cpu::has_vmx();
    println!("hv: cpu: svm+npt={} vmx={}", svm, vmx);
    let result = if let Some(plan) = linux {
        match plan {
            Err(e) => Err(e),
            Ok(plan) if svm => {
                println!("backend: svm (AMD SVM + nested paging); scenario: linux");
                match svm::init() {
                    Ok(mut b) => scenario::linux::run(&mut b, &map, &plan),
                    Err(e) => Err(alloc::format!("svm init: {e}")),
                }
            }
            Ok(plan) if vmx => {
                println!("backend: vmx (Intel VT-x + EPT); scenario: linux");
                match vmx::init() {
                    Ok(mut b) => scenario::linux::run(&mut b, &map, &plan),
                    Err(e) => Err(alloc::format!("vmx init: {e}")),
                }
            }
            Ok(_) => Err(alloc::string::String::from(
                "no usable virtualization extension (need SVM+NPT or VMX)",
            )),
        }
    } else if svm {
        println!("backend: svm (AMD SVM + nested paging)");
        match svm::init() {
            Ok(mut b) => scenario::run(&mut b),
            Err(e) => Err(alloc::format!("svm init: {e}")),
        }
    } else if vmx {
        println!("backend: vmx (Intel VT-x + EPT)");
        match vmx::init() {
            Ok(mut b) => scenario::run(&mut b),
            Err(e) => Err(alloc::format!("vmx init: {e}")),
        }
    } else {
        Err(alloc::string::String::from(
            "no usable virtualization extension (need SVM+NPT or VMX)",
        ))
    };
    match result {
        Ok(detail) => shutdown::finish(true, &detail),
        Err(detail) => shutdown::finish(false, &detail),
    }
}
