//! The VMCB (AMD APM vol. 2, appendix B): field offsets and typed access to one 4 KiB VMCB
//! page. Owns nothing but the layout; `Vmcb` is a thin view over a frame the SVM backend owns.
//!
//! Invariant: every offset here is from APM Table B-1 (control area, 0x000-0x3FF) or Table B-2
//! (state save area, starting at 0x400); accesses are volatile because the processor reads and
//! writes the page on VMRUN / #VMEXIT.

// Control area.
pub const INTERCEPT_EXCEPTIONS: usize = 0x008;
pub const INTERCEPT_MISC1: usize = 0x00C;
pub const INTERCEPT_MISC2: usize = 0x010;
pub const IOPM_BASE_PA: usize = 0x040;
pub const MSRPM_BASE_PA: usize = 0x048;
pub const GUEST_ASID: usize = 0x058;
pub const TLB_CONTROL: usize = 0x05C;
pub const EXITCODE: usize = 0x070;
pub const EXITINFO1: usize = 0x078;
pub const EXITINFO2: usize = 0x080;
pub const EXITINTINFO: usize = 0x088;
pub const NP_ENABLE: usize = 0x090;
pub const EVENTINJ: usize = 0x0A8;
pub const N_CR3: usize = 0x0B0;
pub const VMCB_CLEAN: usize = 0x0C0;
pub const NEXT_RIP: usize = 0x0C8;

// State save area (0x400 + offset of Table B-2).
pub const ES: usize = 0x400;
pub const CS: usize = 0x410;
pub const SS: usize = 0x420;
pub const DS: usize = 0x430;
pub const FS: usize = 0x440;
pub const GS: usize = 0x450;
pub const GDTR: usize = 0x460;
pub const LDTR: usize = 0x470;
pub const IDTR: usize = 0x480;
pub const TR: usize = 0x490;
pub const CPL: usize = 0x4CB;
pub const EFER: usize = 0x4D0;
pub const CR4: usize = 0x548;
pub const CR3: usize = 0x550;
pub const CR0: usize = 0x558;
pub const DR7: usize = 0x560;
pub const DR6: usize = 0x568;
pub const RFLAGS: usize = 0x570;
pub const RIP: usize = 0x578;
pub const RSP: usize = 0x5D8;
pub const RAX: usize = 0x5F8;
pub const CR2: usize = 0x640;
pub const G_PAT: usize = 0x668;

// INTERCEPT_MISC1 bits.
pub const INTERCEPT_HLT: u32 = 1 << 24;
pub const INTERCEPT_IOIO_PROT: u32 = 1 << 27;
pub const INTERCEPT_SHUTDOWN: u32 = 1 << 31;
// INTERCEPT_MISC2 bits.
pub const INTERCEPT_VMRUN: u32 = 1 << 0;
pub const INTERCEPT_VMMCALL: u32 = 1 << 1;

// Exit codes.
pub const EXIT_EXCP_BASE: u64 = 0x40;
pub const EXIT_HLT: u64 = 0x78;
pub const EXIT_IOIO: u64 = 0x7B;
pub const EXIT_SHUTDOWN: u64 = 0x7F;
pub const EXIT_VMMCALL: u64 = 0x81;
pub const EXIT_NPF: u64 = 0x400;
pub const EXIT_INVALID: u64 = u64::MAX;

/// A view over one VMCB page (identity mapped, so the pointer is the physical address).
pub struct Vmcb {
    pa: u64,
}

impl Vmcb {
    /// # Safety
    /// `pa` is a zeroed, 4 KiB-aligned frame owned by the caller for the view's lifetime.
    pub unsafe fn new(pa: u64) -> Self {
        Vmcb { pa }
    }
    pub fn pa(&self) -> u64 {
        self.pa
    }
    pub fn r64(&self, off: usize) -> u64 {
        unsafe { ((self.pa as usize + off) as *const u64).read_volatile() }
    }
    pub fn w64(&mut self, off: usize, v: u64) {
        unsafe { ((self.pa as usize + off) as *mut u64).write_volatile(v) }
    }
    pub fn w32(&mut self, off: usize, v: u32) {
        unsafe { ((self.pa as usize + off) as *mut u32).write_volatile(v) }
    }
    pub fn w8(&mut self, off: usize, v: u8) {
        unsafe { ((self.pa as usize + off) as *mut u8).write_volatile(v) }
    }
    /// A segment register in the state save area: selector, attributes (descriptor bits 40-47
    /// in 7:0 and 52-55 in 11:8), limit, base.
    pub fn seg(&mut self, off: usize, sel: u16, attr: u16, limit: u32, base: u64) {
        unsafe {
            let p = (self.pa as usize + off) as *mut u8;
            (p as *mut u16).write_volatile(sel);
            (p.add(2) as *mut u16).write_volatile(attr);
            (p.add(4) as *mut u32).write_volatile(limit);
            (p.add(8) as *mut u64).write_volatile(base);
        }
    }
}
