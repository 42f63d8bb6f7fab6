//! Boot: the entry code (boot.s: multiboot2 header, PVH note, 32-bit entries, long mode, the
//! identity map, the GDT) and the boot information it hands to `hv_main` — which protocol
//! started the kernel, the memory map its loader reported (usable RAM, and every area with its
//! E820 type for a guest's own map) and the boot modules (multiboot2 `module2`: where each lies
//! and its command line, copied out so the boot information may be overwritten later).
//!
//! Invariants: boot.s enters `hv_main(magic, info)` with paging on (VA == PA below 4 GiB),
//! SSE usable, interrupts off and .bss zero; `info` is the physical address of the multiboot2
//! information (magic `multiboot2::MAGIC`) or of the PVH `hvm_start_info` (magic `PVH_MAGIC`),
//! which the loader placed in RAM that this kernel neither frees nor overwrites before
//! `memory_map` has read it (the frame allocator starts above `MemoryMap::info_end`).

use multiboot2::{BootInformation, BootInformationHeader};

core::arch::global_asm!(include_str!("boot.s"));

/// The hvm_start_info magic; boot.s also puts it in EAX on the PVH entry.
pub const PVH_MAGIC: u32 = 0x336e_c578;

/// Areas kept from the loader's map (usable ones, and all of them with their types).
pub const MAX_AREAS: usize = 32;
/// Boot modules kept (GRUB `module2` lines; the Linux guest needs two: kernel and initramfs).
pub const MAX_MODULES: usize = 4;
/// Bytes of a module's command line kept (longer lines are refused, not cut).
pub const MODULE_CMDLINE_MAX: usize = 1024;

/// The E820 type of usable RAM (every other type is something the OS must leave alone).
pub const E820_RAM: u32 = 1;

/// One boot module the loader placed in RAM: `[start, end)` and its command line.
#[derive(Clone, Copy)]
pub struct BootModule {
    pub start: u64,
    pub end: u64,
    cmdline: [u8; MODULE_CMDLINE_MAX],
    cmdline_len: usize,
}

impl BootModule {
    /// The module's command line (the words after the file name on its `module2` line).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// The module's bytes.
    ///
    /// # Safety
    /// Nothing has overwritten or reused the module's RAM since boot (the frame allocator
    /// never hands it out: `frames::init` excludes every module).
    pub unsafe fn bytes(&self) -> &'static [u8] {
        // SAFETY: the loader placed the module at [start, end) in identity-mapped RAM below
        // 4 GiB; the caller promises it is intact and nobody writes it.
        unsafe {
            core::slice::from_raw_parts(self.start as *const u8, (self.end - self.start) as usize)
        }
    }
}

/// Which boot protocol started the kernel.
pub fn protocol(magic: u32) -> &'static str {
    match magic {
        multiboot2::MAGIC => "multiboot2",
        PVH_MAGIC => "PVH",
        _ => "unknown",
    }
}

/// The usable RAM the boot loader reported, its whole map with types, the boot modules, and
/// where its boot information ends.
pub struct MemoryMap {
    areas: [(u64, u64); MAX_AREAS],
    count: usize,
    all: [(u64, u64, u32); MAX_AREAS],
    all_count: usize,
    modules: [Option<BootModule>; MAX_MODULES],
    module_count: usize,
    /// First byte after the boot information (nothing below it may be handed out).
    pub info_end: u64,
}

impl MemoryMap {
    /// The usable areas as `[start, end)` physical ranges, in the loader's order.
    pub fn areas(&self) -> &[(u64, u64)] {
        &self.areas[..self.count]
    }

    /// Every area of the loader's map as `(start, end, E820 type)`, in the loader's order.
    pub fn all_areas(&self) -> &[(u64, u64, u32)] {
        &self.all[..self.all_count]
    }

    /// The boot modules, in the loader's order.
    pub fn modules(&self) -> impl Iterator<Item = &BootModule> {
        self.modules[..self.module_count].iter().flatten()
    }

    fn push_area(&mut self, start: u64, end: u64, typ: u32) {
        if typ == E820_RAM && self.count < MAX_AREAS {
            self.areas[self.count] = (start, end);
            self.count += 1;
        }
        if self.all_count < MAX_AREAS {
            self.all[self.all_count] = (start, end, typ);
            self.all_count += 1;
        }
    }
}

/// Reads the usable RAM areas from the boot information. Returns an error string when the
/// boot information is unusable.
pub fn memory_map(magic: u32, info: u32) -> Result<MemoryMap, &'static str> {
    let mut map = MemoryMap {
        areas: [(0, 0); MAX_AREAS],
        count: 0,
        all: [(0, 0, 0); MAX_AREAS],
        all_count: 0,
        modules: [None; MAX_MODULES],
        module_count: 0,
        info_end: 0,
    };
    if magic == multiboot2::MAGIC {
        // SAFETY: boot.s passes the EBX the loader gave with this magic: the address of a
        // multiboot2 information structure in identity-mapped RAM that nothing has reused
        // (module invariant); `load` checks its header and size before using it.
        let mbi = unsafe { BootInformation::load(info as usize as *const BootInformationHeader) }
            .map_err(|_| "multiboot2 boot information is malformed")?;
        let mmap = mbi.memory_map_tag().ok_or("no multiboot2 memory map")?;
        map.info_end = mbi.end_address() as u64;
        for area in mmap.memory_areas() {
            // Multiboot2's area types are E820's (1 available, 2 reserved, 3 ACPI, 4 NVS, 5 bad).
            map.push_area(
                area.start_address(),
                area.end_address(),
                u32::from(area.typ()),
            );
        }
        for m in mbi.module_tags() {
            if map.module_count == MAX_MODULES {
                return Err("more boot modules than hv takes");
            }
            let line = m
                .cmdline()
                .map_err(|_| "a boot module's command line is not UTF-8")?;
            if line.len() > MODULE_CMDLINE_MAX {
                return Err("a boot module's command line is longer than hv takes");
            }
            if m.end_address() < m.start_address() {
                return Err("a boot module ends before it starts");
            }
            let mut module = BootModule {
                start: m.start_address() as u64,
                end: m.end_address() as u64,
                cmdline: [0; MODULE_CMDLINE_MAX],
                cmdline_len: line.len(),
            };
            module.cmdline[..line.len()].copy_from_slice(line.as_bytes());
            map.modules[map.module_count] = Some(module);
            map.module_count += 1;
        }
    } else if magic == PVH_MAGIC {
        // struct hvm_start_info: magic, version, flags, nr_modules (u32), modlist, cmdline,
        // rsdp (u64), then (version >= 1) memmap_paddr (u64), memmap_entries (u32).
        let p = info as u64;
        // SAFETY: the PVH loader placed hvm_start_info and the memory map it points to in
        // identity-mapped RAM below 4 GiB that nothing has reused (module invariant); only
        // offsets inside those structures are read, unaligned-tolerant.
        let rd32 = |a: u64| unsafe { (a as *const u32).read_unaligned() };
        // SAFETY: as for `rd32`.
        let rd64 = |a: u64| unsafe { (a as *const u64).read_unaligned() };
        if rd32(p) != PVH_MAGIC || rd32(p + 4) < 1 {
            return Err("PVH start info without a memory map (version < 1)");
        }
        let (table, entries) = (rd64(p + 40), rd32(p + 48) as u64);
        for i in 0..entries {
            // struct hvm_memmap_table_entry: addr, size (u64), type (u32), reserved (u32).
            let e = table + i * 24;
            map.push_area(rd64(e), rd64(e) + rd64(e + 8), rd32(e + 16));
        }
        map.info_end = (p + 56).max(table + entries * 24);
    } else {
        return Err("unknown boot protocol (neither multiboot2 nor PVH)");
    }
    Ok(map)
}
