//! Boot: the entry code (boot.s: multiboot2 header, PVH note, 32-bit entries, long mode, the
//! identity map, the GDT) and the boot information it hands to `hv_main` — which protocol
//! started the kernel and the usable RAM its loader reported.
//!
//! Invariants: boot.s enters `hv_main(magic, info)` with paging on (VA == PA below 4 GiB),
//! SSE usable, interrupts off and .bss zero; `info` is the physical address of the multiboot2
//! information (magic `multiboot2::MAGIC`) or of the PVH `hvm_start_info` (magic `PVH_MAGIC`),
//! which the loader placed in RAM that this kernel neither frees nor overwrites before
//! `memory_map` has read it (the frame allocator starts above `MemoryMap::info_end`).

use multiboot2::{BootInformation, BootInformationHeader, MemoryAreaType};

core::arch::global_asm!(include_str!("boot.s"));

/// The hvm_start_info magic; boot.s also puts it in EAX on the PVH entry.
pub const PVH_MAGIC: u32 = 0x336e_c578;

/// Usable RAM areas kept from the loader's map (the rest is ignored).
pub const MAX_AREAS: usize = 32;

/// Which boot protocol started the kernel.
pub fn protocol(magic: u32) -> &'static str {
    match magic {
        multiboot2::MAGIC => "multiboot2",
        PVH_MAGIC => "PVH",
        _ => "unknown",
    }
}

/// The usable RAM the boot loader reported, and where its boot information ends.
pub struct MemoryMap {
    areas: [(u64, u64); MAX_AREAS],
    count: usize,
    /// First byte after the boot information (nothing below it may be handed out).
    pub info_end: u64,
}

impl MemoryMap {
    /// The usable areas as `[start, end)` physical ranges, in the loader's order.
    pub fn areas(&self) -> &[(u64, u64)] {
        &self.areas[..self.count]
    }
}

/// Reads the usable RAM areas from the boot information. Returns an error string when the
/// boot information is unusable.
pub fn memory_map(magic: u32, info: u32) -> Result<MemoryMap, &'static str> {
    let mut areas = [(0u64, 0u64); MAX_AREAS];
    let mut n = 0;
    let info_end;
    if magic == multiboot2::MAGIC {
        // SAFETY: boot.s passes the EBX the loader gave with this magic: the address of a
        // multiboot2 information structure in identity-mapped RAM that nothing has reused
        // (module invariant); `load` checks its header and size before using it.
        let mbi = unsafe { BootInformation::load(info as usize as *const BootInformationHeader) }
            .map_err(|_| "multiboot2 boot information is malformed")?;
        let mmap = mbi.memory_map_tag().ok_or("no multiboot2 memory map")?;
        info_end = mbi.end_address() as u64;
        for area in mmap.memory_areas() {
            if area.typ() == MemoryAreaType::Available && n < MAX_AREAS {
                areas[n] = (area.start_address(), area.end_address());
                n += 1;
            }
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
        let (map, entries) = (rd64(p + 40), rd32(p + 48) as u64);
        for i in 0..entries {
            // struct hvm_memmap_table_entry: addr, size (u64), type (u32), reserved (u32).
            let e = map + i * 24;
            if rd32(e + 16) == 1 && n < MAX_AREAS {
                areas[n] = (rd64(e), rd64(e) + rd64(e + 8));
                n += 1;
            }
        }
        info_end = (p + 56).max(map + entries * 24);
    } else {
        return Err("unknown boot protocol (neither multiboot2 nor PVH)");
    }
    Ok(MemoryMap {
        areas,
        count: n,
        info_end,
    })
}
