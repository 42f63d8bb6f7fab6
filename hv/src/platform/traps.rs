//! Host exceptions: the IDT over the 32 entry stubs of traps.s, and `hv_exception`, the one
//! handler they call.
//!
//! Invariants: interrupts are off for the kernel's whole life, so the IDT only ever delivers
//! CPU exceptions; an exception in the host is a hypervisor bug, so the handler reports it on
//! COM1 without taking the serial lock (it may have interrupted a print) and ends the run with a
//! failing verdict — it never returns. `init` runs once at boot, before anything can fault on
//! purpose.

use core::arch::asm;

use super::cpu::{self, DescPtr, SEL_CODE};

core::arch::global_asm!(include_str!("traps.s"));

#[repr(C)]
#[derive(Clone, Copy)]
struct IdtGate {
    off_lo: u16,
    sel: u16,
    ist: u8,
    attr: u8,
    off_mid: u16,
    off_hi: u32,
    zero: u32,
}
const _: () = assert!(core::mem::size_of::<IdtGate>() == 16);

/// Present, DPL0, 64-bit interrupt gate.
const GATE_INTERRUPT: u8 = 0x8E;

#[repr(C, align(16))]
struct Idt([IdtGate; 32]);
static mut IDT: Idt = Idt([IdtGate {
    off_lo: 0,
    sel: 0,
    ist: 0,
    attr: 0,
    off_mid: 0,
    off_hi: 0,
    zero: 0,
}; 32]);

extern "C" {
    /// traps.s: the address of the entry stub of each vector 0..32.
    static hv_isr_table: [u64; 32];
}

/// Installs the exception IDT (one interrupt gate per vector 0..32, all on the boot stack).
pub fn init() {
    // SAFETY: `IDT` is only touched here, once, on the only CPU with interrupts off, so the
    // `&mut` is unique; `hv_isr_table` is immutable data in traps.s holding 32 stub addresses.
    // LIDT then points the CPU at `IDT`, a static that lives forever, whose gates all name
    // valid code-segment entry points (the stubs, which never return into the faulting code).
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        let table = &*core::ptr::addr_of!(hv_isr_table);
        for (i, gate) in idt.0.iter_mut().enumerate() {
            let h = table[i];
            *gate = IdtGate {
                off_lo: h as u16,
                sel: SEL_CODE,
                ist: 0,
                attr: GATE_INTERRUPT,
                off_mid: (h >> 16) as u16,
                off_hi: (h >> 32) as u32,
                zero: 0,
            };
        }
        let p = DescPtr {
            limit: (core::mem::size_of::<Idt>() - 1) as u16,
            base: idt as *const Idt as u64,
        };
        asm!("lidt [{}]", in(reg) &p, options(nostack, preserves_flags));
    }
}

/// What the exception stubs leave on the stack.
#[repr(C)]
pub struct ExceptionFrame {
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// A host exception is a hypervisor bug: report it and end the run with a failing verdict.
#[no_mangle]
extern "C" fn hv_exception(f: &ExceptionFrame) -> ! {
    let cr2 = cpu::cr2();
    super::serial::print_fmt_unlocked(format_args!(
        "\nHOST EXCEPTION vector {} error {:#x} rip {:#x} rsp {:#x} cr2 {:#x}\n",
        f.vector, f.error, f.rip, f.rsp, cr2
    ));
    super::shutdown::finish_unlocked(false, "host exception")
}
