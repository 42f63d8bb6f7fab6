//! The pass-through guest's physical address space, computed from the loader's memory map:
//! guest-physical = host-physical everywhere, cut into three kinds of range below 4 GiB.
//! - **hv's window** `[1 MiB, window_end)`: hv's image, heap, frames and the boot modules. In
//!   no mapping and no second-level entry; the guest's E820 calls it reserved.
//! - **guest RAM**: the loader's usable RAM outside the window (and outside page 0), page
//!   aligned. Each range becomes a contiguous Vmo mapped at its own address; its pages arrive
//!   through `Vmar::handle_fault`.
//! - **pass-through**: everything else below 4 GiB (page 0 with the BIOS data, the legacy
//!   video/ROM hole, ACPI tables, the PCI hole with the APICs and device BARs): the machine's
//!   own firmware and devices, installed once as identity leaves, never guest RAM.
//!
//! Invariants: the three kinds are disjoint and together cover `[0, 4 GiB)`; every range is
//! page aligned, non-empty and sorted; the E820 map lists guest RAM as usable and nothing else
//! as usable. RAM above 4 GiB is not given to the guest.

use alloc::vec::Vec;

use ept::PAGE_SIZE;

use crate::platform::boot::E820_RAM;

/// Where hv's image starts (linker.ld) and the smallest window hv keeps for itself.
pub const WINDOW_START: u64 = 1 << 20;
pub const WINDOW_MIN_END: u64 = 64 << 20;
/// The window ends on a 2 MiB boundary, so guest RAM above it can take 2 MiB leaves.
const WINDOW_ALIGN: u64 = 2 << 20;
const FOUR_GIB: u64 = 1 << 32;
/// E820 type of an area the OS must leave alone.
const E820_RESERVED: u32 = 2;

/// The guest's physical address space.
pub struct Layout {
    /// hv's window `[start, end)`.
    pub window: (u64, u64),
    /// Guest RAM ranges `[start, end)`.
    pub ram: Vec<(u64, u64)>,
    /// Pass-through ranges `[start, end)`.
    pub passthrough: Vec<(u64, u64)>,
    /// The E820 map the guest gets: (start, end, type), sorted by start.
    pub e820: Vec<(u64, u64, u32)>,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// The end of hv's window: at least `WINDOW_MIN_END`, at least `needed` (past hv's image, the
/// boot modules, its heap and frames), 2 MiB aligned.
pub fn window_end(needed: u64) -> u64 {
    align_up(needed.max(WINDOW_MIN_END), WINDOW_ALIGN)
}

/// `ranges` (sorted, disjoint) without `[start, end)`.
fn subtract(ranges: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in ranges {
        if e <= start || s >= end {
            out.push((s, e));
            continue;
        }
        if s < start {
            out.push((s, start));
        }
        if e > end {
            out.push((end, e));
        }
    }
    out
}

/// The layout for the loader's `areas` (start, end, E820 type) with hv's window ending at
/// `window_end`.
pub fn build(areas: &[(u64, u64, u32)], window_end: u64) -> Result<Layout, &'static str> {
    let window = (WINDOW_START, window_end);
    let mut ram: Vec<(u64, u64)> = areas
        .iter()
        .filter(|a| a.2 == E820_RAM)
        .map(|&(s, e, _)| {
            (
                align_up(s.max(PAGE_SIZE), PAGE_SIZE),
                e.min(FOUR_GIB) & !(PAGE_SIZE - 1),
            )
        })
        .filter(|&(s, e)| s < e)
        .collect();
    ram.sort_unstable();
    if ram.windows(2).any(|w| w[0].1 > w[1].0) {
        return Err("the loader's usable areas overlap");
    }
    let ram = subtract(&ram, window.0, window.1);
    if ram.is_empty() {
        return Err("no usable RAM outside hv's window");
    }
    let mut passthrough = alloc::vec![(0, FOUR_GIB)];
    for &(s, e) in ram.iter().chain(core::iter::once(&window)) {
        passthrough = subtract(&passthrough, s, e);
    }
    let mut e820: Vec<(u64, u64, u32)> = areas
        .iter()
        .filter(|a| a.2 != E820_RAM && a.0 < a.1)
        .copied()
        .collect();
    e820.extend(ram.iter().map(|&(s, e)| (s, e, E820_RAM)));
    e820.push((window.0, window.1, E820_RESERVED));
    e820.push((0, PAGE_SIZE, E820_RESERVED));
    e820.sort_unstable_by_key(|a| a.0);
    Ok(Layout {
        window,
        ram,
        passthrough,
        e820,
    })
}

impl Layout {
    /// Bytes of guest RAM.
    pub fn ram_bytes(&self) -> u64 {
        self.ram.iter().map(|&(s, e)| e - s).sum()
    }

    /// Whether `gpa` lies in hv's window.
    pub fn in_window(&self, gpa: u64) -> bool {
        (self.window.0..self.window.1).contains(&gpa)
    }
}
