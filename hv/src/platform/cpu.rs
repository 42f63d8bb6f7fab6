//! Host CPU primitives: port I/O, MSRs, control registers, CPUID, and the host descriptor
//! tables (GDT TSS slot, IDT for exceptions).
//!
//! Invariants: interrupts stay disabled for the hypervisor's whole life (the precompiled core
//! uses the red zone), so the IDT only catches exceptions, each of which ends the run with a
//! report. The GDT layout is fixed by boot.s: 0x08 code64, 0x10 data, 0x18 TSS.

use core::arch::asm;

pub const SEL_CODE: u16 = 0x08;
pub const SEL_DATA: u16 = 0x10;
pub const SEL_TSS: u16 = 0x18;

pub fn outb(port: u16, v: u8) {
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}
pub fn outw(port: u16, v: u16) {
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    }
}
pub fn outl(port: u16, v: u32) {
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}
pub fn inb(port: u16) -> u8 {
    let v: u8;
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    ((hi as u64) << 32) | lo as u64
}
pub fn wrmsr(msr: u32, v: u64) {
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack, preserves_flags))
    }
}

pub fn cr0() -> u64 {
    let v;
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}
pub fn set_cr0(v: u64) {
    unsafe { asm!("mov cr0, {}", in(reg) v, options(nostack, preserves_flags)) }
}
pub fn cr3() -> u64 {
    let v;
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}
pub fn cr4() -> u64 {
    let v;
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}
pub fn set_cr4(v: u64) {
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nostack, preserves_flags)) }
}

pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

pub fn cpuid(leaf: u32, sub: u32) -> CpuidResult {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    CpuidResult {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// AMD SVM with nested paging: CPUID 8000_0001 ECX.SVM(2) and 8000_000A EDX.NP(0).
pub fn has_svm_npt() -> bool {
    if cpuid(0x8000_0000, 0).eax < 0x8000_000A {
        return false;
    }
    cpuid(0x8000_0001, 0).ecx & (1 << 2) != 0 && cpuid(0x8000_000A, 0).edx & 1 != 0
}

/// Intel VMX: CPUID 1 ECX.VMX(5). (EPT support is checked in the capability MSRs later.)
pub fn has_vmx() -> bool {
    cpuid(1, 0).ecx & (1 << 5) != 0
}

pub const MSR_EFER: u32 = 0xC000_0080;

/// Pseudo-descriptor as stored by SGDT/SIDT.
#[repr(C, packed)]
pub struct DescPtr {
    pub limit: u16,
    pub base: u64,
}

pub fn sgdt() -> DescPtr {
    let mut p = DescPtr { limit: 0, base: 0 };
    unsafe { asm!("sgdt [{}]", in(reg) &mut p, options(nostack, preserves_flags)) }
    p
}
pub fn sidt() -> DescPtr {
    let mut p = DescPtr { limit: 0, base: 0 };
    unsafe { asm!("sidt [{}]", in(reg) &mut p, options(nostack, preserves_flags)) }
    p
}

#[repr(C, align(16))]
struct Tss([u8; 104]);
static mut TSS: Tss = Tss([0; 104]);

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
    static mut hv_gdt: [u64; 5];
    static hv_isr_table: [u64; 32];
}

/// Address of the host TSS (HOST_TR_BASE / guest TR base).
pub fn tss_base() -> u64 {
    core::ptr::addr_of!(TSS) as u64
}

/// Fills the TSS descriptor, loads TR, installs the exception IDT, and sets EFER.NXE (NPT
/// leaves use the NX bit, which is reserved unless the host enables it).
pub fn init_tables() {
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | (1 << 11));
    unsafe {
        let base = tss_base();
        let limit = 103u64;
        let lo = (limit & 0xFFFF)
            | ((base & 0xFF_FFFF) << 16)
            | (0x89u64 << 40)
            | (((limit >> 16) & 0xF) << 48)
            | (((base >> 24) & 0xFF) << 56);
        let gdt = core::ptr::addr_of_mut!(hv_gdt);
        (*gdt)[3] = lo;
        (*gdt)[4] = base >> 32;
        asm!("ltr {0:x}", in(reg) SEL_TSS, options(nostack, preserves_flags));

        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        let table = &*core::ptr::addr_of!(hv_isr_table);
        for (i, gate) in idt.0.iter_mut().enumerate() {
            let h = table[i];
            *gate = IdtGate {
                off_lo: h as u16,
                sel: SEL_CODE,
                ist: 0,
                attr: 0x8E,
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
    let cr2: u64;
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) }
    crate::platform::serial::print_fmt_unlocked(format_args!(
        "\nHOST EXCEPTION vector {} error {:#x} rip {:#x} rsp {:#x} cr2 {:#x}\n",
        f.vector, f.error, f.rip, f.rsp, cr2
    ));
    crate::platform::shutdown::finish_unlocked(false, "host exception")
}
