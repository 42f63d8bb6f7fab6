//! Loading a guest program: the boot image and the program's bytes are written through the
//! fault path (`write_guest`), then the vCPU is pointed at the entry in 64-bit CPL3.
//!
//! Invariant: a malformed ELF is an error before any byte reaches guest memory (linux-loader
//! parses and places it into a private staging memory first).

use super::x86_64::boot::{self, GuestArgs};
use super::x86_64::layout::{CODE_GPA, STACK_SIZE, STACK_TOP};
use super::GuestVm;
use crate::error::{kvm_err, Error, Result};

impl GuestVm {
    /// Writes the boot image (GDT, page tables, `code` at `CODE_GPA`) through the fault path
    /// and points the vCPU at `CODE_GPA` in 64-bit CPL3 with `args`.
    pub fn load(&mut self, code: &[u8], args: GuestArgs) -> Result<()> {
        for (gpa, bytes) in boot::boot_image(self.res.size(), code)? {
            self.write_guest(gpa, &bytes)?;
        }
        self.setup_long_mode(CODE_GPA, args)
    }

    /// Sets the vCPU to 64-bit long mode, CPL3, IOPL=3, paging from `PML4_GPA`, at `rip`.
    pub fn setup_long_mode(&mut self, rip: u64, args: GuestArgs) -> Result<()> {
        // Raw state: apply what waits in the sync area; the next restore is full.
        self.flush_pending()?;
        self.clean_since_restore = false;
        let sregs = self.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        self.vcpu
            .set_sregs(&boot::long_mode_sregs(sregs))
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        self.vcpu
            .set_regs(&boot::entry_regs(rip, args))
            .map_err(kvm_err("KVM_SET_REGS"))
    }

    /// Loads a static ELF guest program (linked inside `[CODE_GPA, STACK_TOP - STACK_SIZE)`)
    /// with linux-loader, writes it and the boot image through the fault path, and points the
    /// vCPU at its entry in 64-bit CPL3 with `args`.
    pub fn load_elf(&mut self, elf: &[u8], args: GuestArgs) -> Result<()> {
        use linux_loader::loader::{Elf, KernelLoader};
        use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
        let limit = STACK_TOP - STACK_SIZE;
        let staging = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), limit as usize)])
            .map_err(|e| Error::Payload(format!("staging memory: {e}")))?;
        let loaded = Elf::load(&staging, None, &mut std::io::Cursor::new(elf), None)
            .map_err(|e| Error::Payload(format!("ELF: {e}")))?;
        let entry = loaded.kernel_load.0;
        let end = loaded.kernel_end;
        if entry < CODE_GPA || entry >= end || end > limit {
            return Err(Error::Payload(format!(
                "ELF entry {entry:#x} / end {end:#x} outside [{CODE_GPA:#x}, {limit:#x})"
            )));
        }
        let mut image = vec![0u8; (end - CODE_GPA) as usize];
        staging
            .read_slice(&mut image, GuestAddress(CODE_GPA))
            .map_err(|e| Error::Payload(format!("staging read: {e}")))?;
        for (gpa, bytes) in boot::boot_image(self.res.size(), &image)? {
            self.write_guest(gpa, &bytes)?;
        }
        self.setup_long_mode(entry, args)
    }
}
