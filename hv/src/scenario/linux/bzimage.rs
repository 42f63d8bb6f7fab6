//! A Linux `bzImage` as the x86 boot protocol describes it (Documentation/arch/x86/boot.rst):
//! the checks that decide whether hv can boot it, where its protected-mode kernel starts, and
//! the boot parameters ("zero page") hv hands it.
//!
//! Invariants: `parse` reads only inside the file and refuses, with a reason, anything that is
//! not a relocatable bzImage of boot protocol 2.12 or later whose setup header and
//! protected-mode part lie inside the file; `zero_page` copies the image's own setup header
//! (protocol rule: the loader starts from it) and fills only the fields this loader owns.

use alloc::vec::Vec;

/// Offsets in the file and in `struct boot_params` (the setup header sits at the same offset in
/// both).
const SETUP_SECTS: usize = 0x1F1;
const BOOT_FLAG: usize = 0x1FE;
const JUMP_END: usize = 0x201;
const HEADER_MAGIC: usize = 0x202;
const VERSION: usize = 0x206;
const TYPE_OF_LOADER: usize = 0x210;
const LOADFLAGS: usize = 0x211;
const CODE32_START: usize = 0x214;
const RAMDISK_IMAGE: usize = 0x218;
const RAMDISK_SIZE: usize = 0x21C;
const CMD_LINE_PTR: usize = 0x228;
const INITRD_ADDR_MAX: usize = 0x22C;
const KERNEL_ALIGNMENT: usize = 0x230;
const RELOCATABLE_KERNEL: usize = 0x234;
const CMDLINE_SIZE: usize = 0x238;
const INIT_SIZE: usize = 0x260;
/// Fields of `boot_params` outside the setup header.
const ACPI_RSDP_ADDR: usize = 0x070;
const E820_ENTRIES: usize = 0x1E8;
const E820_TABLE: usize = 0x2D0;
const E820_MAX: usize = 128;

/// loadflags bit 0: the protected-mode kernel is loaded high (a bzImage).
const LOADED_HIGH: u8 = 1 << 0;
/// The oldest protocol with everything this loader uses (init_size: 2.10, xloadflags: 2.12).
const MIN_PROTOCOL: u16 = 0x020C;
/// type_of_loader: 0xFF, "undefined" (the protocol's value for loaders without an ID).
const LOADER_UNDEFINED: u8 = 0xFF;

/// A bzImage that passed the checks.
pub struct BzImage<'a> {
    file: &'a [u8],
    /// Boot protocol version (major in the high byte).
    pub protocol: u16,
    /// End of the setup header (exclusive), as the image's jump instruction states it.
    header_end: usize,
    /// Offset of the protected-mode kernel in the file.
    pm_offset: usize,
    /// Bytes of memory the kernel needs from its load address while it decompresses and starts.
    pub init_size: u64,
    /// Alignment its load address needs.
    pub alignment: u64,
    /// Longest command line it takes (without the terminating NUL).
    pub cmdline_max: usize,
    /// Highest address the initramfs may end at.
    pub initrd_max: u64,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Checks `file` and reads what booting it needs.
pub fn parse(file: &[u8]) -> Result<BzImage<'_>, &'static str> {
    if file.len() < INIT_SIZE + 4 {
        return Err("too short to be a bzImage");
    }
    if &file[HEADER_MAGIC..HEADER_MAGIC + 4] != b"HdrS" || u16_at(file, BOOT_FLAG) != 0xAA55 {
        return Err("not a Linux bzImage (no HdrS setup header)");
    }
    let protocol = u16_at(file, VERSION);
    if protocol < MIN_PROTOCOL {
        return Err("boot protocol older than 2.12");
    }
    if file[LOADFLAGS] & LOADED_HIGH == 0 {
        return Err("not a bzImage (the kernel is not loaded high)");
    }
    if file[RELOCATABLE_KERNEL] == 0 {
        return Err("the kernel is not relocatable (it would have to load where hv lives)");
    }
    let header_end = HEADER_MAGIC + file[JUMP_END] as usize;
    let sects = match file[SETUP_SECTS] {
        0 => 4,
        n => n as usize,
    };
    let pm_offset = (sects + 1) * 512;
    if header_end <= INIT_SIZE + 4 || header_end > 0x1000 || pm_offset >= file.len() {
        return Err("setup header or kernel outside the file");
    }
    let alignment = u64::from(u32_at(file, KERNEL_ALIGNMENT));
    if !alignment.is_power_of_two() || alignment < 4096 {
        return Err("kernel alignment is not a power of two of at least 4 KiB");
    }
    Ok(BzImage {
        file,
        protocol,
        header_end,
        pm_offset,
        init_size: u64::from(u32_at(file, INIT_SIZE)),
        alignment,
        cmdline_max: u32_at(file, CMDLINE_SIZE) as usize,
        initrd_max: u64::from(u32_at(file, INITRD_ADDR_MAX)),
    })
}

/// Where the loader put things, for the zero page.
pub struct BootParams<'a> {
    pub kernel_at: u32,
    pub cmdline_at: u32,
    pub initrd_at: u32,
    pub initrd_len: u32,
    /// The ACPI RSDP if hv found it (0: the kernel searches the BIOS area itself).
    pub rsdp: u64,
    /// The guest's memory map as (start, end, E820 type), sorted.
    pub e820: &'a [(u64, u64, u32)],
}

impl BzImage<'_> {
    /// The protected-mode kernel: the bytes to place at the load address.
    pub fn protected_mode(&self) -> &[u8] {
        &self.file[self.pm_offset..]
    }

    /// The boot parameters page for `p`. Fails when the memory map has more entries than the
    /// protocol's table holds.
    pub fn zero_page(&self, p: &BootParams<'_>) -> Result<Vec<u8>, &'static str> {
        if p.e820.len() > E820_MAX {
            return Err("guest memory map has more than 128 entries");
        }
        let mut zp = alloc::vec![0u8; 4096];
        zp[SETUP_SECTS..self.header_end].copy_from_slice(&self.file[SETUP_SECTS..self.header_end]);
        zp[TYPE_OF_LOADER] = LOADER_UNDEFINED;
        put32(&mut zp, CODE32_START, p.kernel_at);
        put32(&mut zp, RAMDISK_IMAGE, p.initrd_at);
        put32(&mut zp, RAMDISK_SIZE, p.initrd_len);
        put32(&mut zp, CMD_LINE_PTR, p.cmdline_at);
        put64(&mut zp, ACPI_RSDP_ADDR, p.rsdp);
        zp[E820_ENTRIES] = p.e820.len() as u8;
        for (i, &(start, end, typ)) in p.e820.iter().enumerate() {
            let e = E820_TABLE + i * 20;
            put64(&mut zp, e, start);
            put64(&mut zp, e + 8, end - start);
            put32(&mut zp, e + 16, typ);
        }
        Ok(zp)
    }
}
