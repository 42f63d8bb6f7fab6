//! Host CPU primitives: port I/O, MSRs, control registers, CPUID, descriptor-table pointers,
//! and the host GDT's TSS slot. Imports nothing of this kernel: every other module may use it.
//!
//! Invariants: interrupts stay disabled for the hypervisor's whole life (the precompiled core
//! uses the red zone), so nothing here can be interrupted half-way. The GDT layout is fixed by
//! boot.s: 0x08 code64, 0x10 data, 0x18 TSS. The kernel runs at CPL0 with VA == PA below 4 GiB,
//! which is what makes the privileged instructions below executable and their memory operands
//! valid.
//!
//! Soundness, argued once for the wrappers: port I/O touches no memory Rust knows about (the
//! ports used are the UART and the emulators' exit devices); RDMSR/WRMSR and the CR moves are
//! only ever given the architectural registers the callers name, and the values written keep
//! the state the rest of the kernel relies on (paging, PAE, SSE, long mode) — callers that
//! change bits (VMX's CR0/CR4 fixed bits, EFER.SVME/NXE) only add what the hardware requires.
//! A fault from any of them would be a host exception, which ends the run (traps.rs).

use core::arch::asm;

pub const SEL_CODE: u16 = 0x08;
pub const SEL_DATA: u16 = 0x10;
pub const SEL_TSS: u16 = 0x18;

pub fn outb(port: u16, v: u8) {
    // SAFETY: port output at CPL0 accesses no Rust-visible memory (see the module doc).
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}
pub fn outw(port: u16, v: u16) {
    // SAFETY: port output at CPL0 accesses no Rust-visible memory (see the module doc).
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    }
}
pub fn outl(port: u16, v: u32) {
    // SAFETY: port output at CPL0 accesses no Rust-visible memory (see the module doc).
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port input at CPL0 accesses no Rust-visible memory (see the module doc).
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}
pub fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: port input at CPL0 accesses no Rust-visible memory (see the module doc).
    unsafe {
        asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack, preserves_flags))
    }
    v
}
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: port input at CPL0 accesses no Rust-visible memory (see the module doc).
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDMSR at CPL0 only reads a register; callers pass MSRs the CPU implements
    // (checked through CPUID or the VMX capability chain before they are read).
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    ((hi as u64) << 32) | lo as u64
}
pub fn wrmsr(msr: u32, v: u64) {
    // SAFETY: WRMSR at CPL0; callers only set bits the rest of the kernel expects (EFER.NXE,
    // EFER.SVME, VM_HSAVE_PA, IA32_FEATURE_CONTROL's lock/enable), see the module doc.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack, preserves_flags))
    }
}

pub fn cr0() -> u64 {
    let v;
    // SAFETY: reading CR0 at CPL0 has no side effect.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}
pub fn set_cr0(v: u64) {
    // SAFETY: the only caller (VMX init) keeps PG/PE/NE and adds the VMX fixed-1 bits, so
    // paging and the identity map stay as they were.
    unsafe { asm!("mov cr0, {}", in(reg) v, options(nostack, preserves_flags)) }
}
pub fn cr3() -> u64 {
    let v;
    // SAFETY: reading CR3 at CPL0 has no side effect.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}
pub fn cr4() -> u64 {
    let v;
    // SAFETY: reading CR4 at CPL0 has no side effect.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}
pub fn set_cr4(v: u64) {
    // SAFETY: the only caller (VMX init) keeps PAE/OSFXSR/OSXMMEXCPT and adds VMXE and the
    // VMX fixed-1 bits, so paging and SSE stay usable.
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nostack, preserves_flags)) }
}
pub fn cr2() -> u64 {
    let v;
    // SAFETY: reading CR2 at CPL0 has no side effect.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
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
const EFER_NXE: u64 = 1 << 11;

/// Pseudo-descriptor as stored by SGDT/SIDT and loaded by LIDT.
#[repr(C, packed)]
pub struct DescPtr {
    pub limit: u16,
    pub base: u64,
}

pub fn sgdt() -> DescPtr {
    let mut p = DescPtr { limit: 0, base: 0 };
    // SAFETY: SGDT stores 10 bytes at the operand, which is `p` (10 bytes, packed, writable).
    unsafe { asm!("sgdt [{}]", in(reg) &mut p, options(nostack, preserves_flags)) }
    p
}
pub fn sidt() -> DescPtr {
    let mut p = DescPtr { limit: 0, base: 0 };
    // SAFETY: SIDT stores 10 bytes at the operand, which is `p` (10 bytes, packed, writable).
    unsafe { asm!("sidt [{}]", in(reg) &mut p, options(nostack, preserves_flags)) }
    p
}

#[repr(C, align(16))]
struct Tss([u8; 104]);
static mut TSS: Tss = Tss([0; 104]);

extern "C" {
    /// boot.s's GDT: null, code64, data, and the two-slot TSS descriptor at 0x18.
    static mut hv_gdt: [u64; 5];
}

/// Address of the host TSS (HOST_TR_BASE / guest TR base).
pub fn tss_base() -> u64 {
    core::ptr::addr_of!(TSS) as u64
}

/// Sets EFER.NXE (NPT leaves use the NX bit, which is reserved unless the host enables it),
/// fills the GDT's TSS descriptor and loads TR. Runs once, at boot, before any VM entry.
pub fn init_tables() {
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_NXE);
    let base = tss_base();
    let limit = 103u64;
    let lo = (limit & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (0x89u64 << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56);
    // SAFETY: `hv_gdt` is boot.s's 5-entry GDT in .data; slots 3 and 4 are the TSS descriptor,
    // which nothing else reads or writes (boot.s left it zero, no TR is loaded yet). One CPU,
    // interrupts off: no concurrent access. LTR then loads the descriptor just written (an
    // available 64-bit TSS of limit 103 at `TSS`, a static that lives forever).
    unsafe {
        let gdt = core::ptr::addr_of_mut!(hv_gdt);
        (*gdt)[3] = lo;
        (*gdt)[4] = base >> 32;
        asm!("ltr {0:x}", in(reg) SEL_TSS, options(nostack, preserves_flags));
    }
}
