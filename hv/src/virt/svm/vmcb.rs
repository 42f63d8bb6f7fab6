//! The VMCB (AMD APM vol. 2, appendix B): field offsets and typed access to one 4 KiB VMCB
//! page. Owns nothing but the layout; `Vmcb` is a thin view over a frame the SVM backend owns.
//!
//! Invariant: every offset here is from APM Table B-1 (control area, 0x000-0x3FF) or Table B-2
//! (state save area, starting at 0x400); accesses are volatile because the processor reads and
//! writes the page on VMRUN / #VMEXIT. The exit codes are exit.rs.
//!
//! Soundness: a `Vmcb` is made only by `Vmcb::new` (unsafe), whose caller hands over a frame
//! it owns for the view's lifetime; every accessor checks that its access lies inside that
//! 4 KiB page and is aligned (all offsets below are), so no offset can reach outside it.

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
pub const INTERCEPT_MSR_PROT: u32 = 1 << 28;
pub const INTERCEPT_SHUTDOWN: u32 = 1 << 31;
// INTERCEPT_MISC2 bits.
pub const INTERCEPT_VMRUN: u32 = 1 << 0;
pub const INTERCEPT_VMMCALL: u32 = 1 << 1;

/// A view over one VMCB page (identity mapped, so the pointer is the physical address).
pub struct Vmcb {
    pa: u64,
}

/// Bytes of a VMCB.
const VMCB_SIZE: usize = 4096;

impl Vmcb {
    /// # Safety
    /// `pa` is a zeroed, 4 KiB-aligned frame owned by the caller for the view's lifetime.
    pub unsafe fn new(pa: u64) -> Self {
        Vmcb { pa }
    }
    pub fn pa(&self) -> u64 {
        self.pa
    }
    /// The address of a `T` at `off`, checked to lie inside the page and to be aligned.
    fn at<T>(&self, off: usize) -> *mut T {
        let size = core::mem::size_of::<T>();
        assert!(
            off.is_multiple_of(size) && off + size <= VMCB_SIZE,
            "VMCB offset {off:#x}"
        );
        (self.pa as usize + off) as *mut T
    }
    pub fn r64(&self, off: usize) -> u64 {
        // SAFETY: `at` checked that the u64 lies inside the page `new` was given (owned for
        // this view's lifetime) and is aligned.
        unsafe { self.at::<u64>(off).read_volatile() }
    }
    pub fn w64(&mut self, off: usize, v: u64) {
        // SAFETY: as for `r64`; `&mut self` keeps host writes to the page exclusive.
        unsafe { self.at::<u64>(off).write_volatile(v) }
    }
    pub fn w32(&mut self, off: usize, v: u32) {
        // SAFETY: as for `w64` (a u32 inside the page, aligned).
        unsafe { self.at::<u32>(off).write_volatile(v) }
    }
    pub fn w8(&mut self, off: usize, v: u8) {
        // SAFETY: as for `w64` (one byte inside the page).
        unsafe { self.at::<u8>(off).write_volatile(v) }
    }
    /// A segment register in the state save area: selector, attributes (descriptor bits 40-47
    /// in 7:0 and 52-55 in 11:8), limit, base.
    pub fn seg(&mut self, off: usize, sel: u16, attr: u16, limit: u32, base: u64) {
        let slot = self.at::<[u64; 2]>(off) as *mut u8;
        // SAFETY: `at` checked the 16-byte slot lies inside the page and is 8-byte aligned,
        // so the four fields at +0/+2/+4/+8 are inside it and each aligned for its width.
        unsafe {
            (slot as *mut u16).write_volatile(sel);
            (slot.add(2) as *mut u16).write_volatile(attr);
            (slot.add(4) as *mut u32).write_volatile(limit);
            (slot.add(8) as *mut u64).write_volatile(base);
        }
    }
}
