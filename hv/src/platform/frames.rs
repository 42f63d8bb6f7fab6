//! Physical frame allocator built from the boot memory map (multiboot2 through GRUB, or the PVH
//! hvm_start_info memory map through QEMU -kernel).
//!
//! Owns the RAM above the kernel image and the boot information, below the limit `init` is
//! given (all of it for the scenario; hv's window for the Linux guest) and outside the boot
//! modules: the heap is carved from the start of the largest usable region, the rest hands out
//! 4 KiB frames (a bump pointer over the
//! usable regions plus a free list threaded through freed frames). Frames are identity mapped
//! (VA == PA below 4 GiB), so a frame's pointer is its address.
//! Invariants: a frame is never handed out twice while allocated; counters are exact
//! (`allocated - freed == live`); nothing below 1 MiB, at or above the limit (at most 4 GiB)
//! or inside a boot module is used.

use spin::Mutex;

use super::boot::MemoryMap;

const FRAME: u64 = ept::PAGE_SIZE;
const MAX_REGIONS: usize = super::boot::MAX_AREAS;
const LIMIT: u64 = 1 << 32;

struct Inner {
    regions: [(u64, u64); MAX_REGIONS],
    count: usize,
    /// Index of the region the bump pointer is in, and the pointer.
    cur: usize,
    next: u64,
    /// Head of the list of freed frames (0 = empty); each freed frame stores the next address.
    free_head: u64,
    live: u64,
    allocated: u64,
    freed: u64,
    total: u64,
}

static FRAMES: Mutex<Inner> = Mutex::new(Inner {
    regions: [(0, 0); MAX_REGIONS],
    count: 0,
    cur: 0,
    next: 0,
    free_head: 0,
    live: 0,
    allocated: 0,
    freed: 0,
    total: 0,
});

extern "C" {
    static __kernel_end: u8;
}

/// Result of boot-time memory discovery.
pub struct BootMemory {
    pub heap_start: u64,
    pub heap_size: u64,
    pub frames_total: u64,
}

fn align_up(v: u64, a: u64) -> u64 {
    (v + a - 1) & !(a - 1)
}

/// First byte after hv's own image.
pub fn kernel_end() -> u64 {
    core::ptr::addr_of!(__kernel_end) as u64
}

/// Gives the usable RAM of `map` above the kernel image and the boot information, below
/// `limit` and outside every boot module, to the allocator, after reserving `heap_size` bytes
/// for the heap at the start of the largest area. Runs once, at boot.
pub fn init(map: &MemoryMap, heap_size: u64, limit: u64) -> Result<BootMemory, &'static str> {
    let info_end = map.info_end;
    let floor = align_up(kernel_end().max(info_end).max(1 << 20), FRAME);
    let limit = limit.min(LIMIT);

    let mut inner = FRAMES.lock();
    let mut best: Option<usize> = None;
    for &(a_start, a_end) in map.areas() {
        // The area between `floor` and `limit`, cut into the pieces no module overlaps.
        let mut start = align_up(a_start.max(floor), FRAME);
        let area_end = a_end.min(limit) & !(FRAME - 1);
        while start < area_end {
            // The first module (frame-rounded) reaching into [start, area_end) ends the piece.
            let block = map
                .modules()
                .map(|m| (m.start & !(FRAME - 1), align_up(m.end, FRAME)))
                .filter(|&(ms, me)| me > start && ms < area_end)
                .min_by_key(|&(ms, _)| ms);
            let (end, next) = match block {
                Some((ms, me)) => (ms.max(start), me),
                None => (area_end, area_end),
            };
            if end > start && inner.count < MAX_REGIONS {
                let i = inner.count;
                inner.regions[i] = (start, end);
                inner.count += 1;
                if best.is_none_or(|b| end - start > inner.regions[b].1 - inner.regions[b].0) {
                    best = Some(i);
                }
            }
            start = next;
        }
    }
    let best = best.ok_or("no usable RAM above the kernel")?;
    let (bs, be) = inner.regions[best];
    if be - bs < heap_size * 2 {
        return Err("not enough RAM for the heap");
    }
    inner.regions[best].0 = bs + heap_size;
    inner.total = (0..inner.count)
        .map(|i| (inner.regions[i].1 - inner.regions[i].0) / FRAME)
        .sum();
    inner.cur = 0;
    inner.next = inner.regions[0].0;
    Ok(BootMemory {
        heap_start: bs,
        heap_size,
        frames_total: inner.total,
    })
}

impl Inner {
    fn bump(&mut self, count: u64) -> Option<u64> {
        while self.cur < self.count {
            let end = self.regions[self.cur].1;
            if self.next + count * FRAME <= end {
                let pa = self.next;
                self.next += count * FRAME;
                return Some(pa);
            }
            self.cur += 1;
            if self.cur < self.count {
                self.next = self.regions[self.cur].0;
            }
        }
        None
    }
}

/// One frame (contents unspecified), or `None` when RAM is exhausted.
pub fn alloc() -> Option<u64> {
    let mut f = FRAMES.lock();
    let pa = if f.free_head != 0 {
        let pa = f.free_head;
        // SAFETY: `pa` heads the free list, so it is a freed frame of this allocator (owned by
        // nobody else, identity mapped, 4 KiB aligned) whose first qword `free` wrote; the lock
        // is held.
        f.free_head = unsafe { *(pa as *const u64) };
        pa
    } else {
        f.bump(1)?
    };
    f.live += 1;
    f.allocated += 1;
    Some(pa)
}

/// One zero-filled frame.
pub fn alloc_zeroed() -> Option<u64> {
    let pa = alloc()?;
    // SAFETY: `alloc` just handed out the 4 KiB frame at `pa` to this caller alone; it is
    // identity-mapped RAM (VA == PA), so the pointer is valid for 4096 bytes of writes.
    unsafe { core::ptr::write_bytes(pa as *mut u8, 0, FRAME as usize) };
    Some(pa)
}

/// `count` physically contiguous frames (from the bump region only).
pub fn alloc_contiguous(count: u64) -> Option<u64> {
    let mut f = FRAMES.lock();
    let pa = f.bump(count)?;
    f.live += count;
    f.allocated += count;
    Some(pa)
}

/// Gives a frame back.
///
/// # Safety
/// `pa` came from `alloc`, `alloc_zeroed` or `alloc_contiguous` (frames of a contiguous run are
/// freed one by one), is freed once, and neither software nor a hardware walker (VMCB, VMCS,
/// second-level table) uses it afterwards: its first qword becomes the free-list link.
pub unsafe fn free(pa: u64) {
    let mut f = FRAMES.lock();
    // SAFETY: by the caller's promise the frame is allocated, identity mapped and no longer
    // used, so the allocator may store its free-list link in it; the lock is held.
    unsafe { *(pa as *mut u64) = f.free_head };
    f.free_head = pa;
    f.live -= 1;
    f.freed += 1;
}

/// (live, allocated, freed, total) frame counts.
pub fn stats() -> (u64, u64, u64, u64) {
    let f = FRAMES.lock();
    (f.live, f.allocated, f.freed, f.total)
}

/// The allocator as the memory model (`vmo`) sees it.
pub struct PhysFrames;

// SAFETY: frames are 4 KiB aligned, never handed out twice while allocated (module
// invariants), only the free list writes them and only after `free`; RAM is identity mapped,
// so the address is a valid pointer to the frame's 4 KiB for as long as it is allocated.
unsafe impl vmo::FrameAlloc for PhysFrames {
    fn alloc_frame(&self) -> Option<vmo::Paddr> {
        alloc()
    }
    fn alloc_contiguous(&self, count: usize) -> Option<vmo::Paddr> {
        alloc_contiguous(count as u64)
    }
    fn free_frame(&self, pa: vmo::Paddr) {
        // SAFETY: vmo's `FramePool` (this impl's only user, in `scenario`) frees only frames it
        // obtained from `alloc_frame` / `alloc_contiguous` above, each once, after its last
        // user (mapping or second-level translation) is gone — the promise `frame_ptr`'s
        // users rely on too.
        unsafe { free(pa) }
    }
    fn frame_ptr(&self, pa: vmo::Paddr) -> *mut u8 {
        pa as *mut u8
    }
}

// SAFETY: frames come zeroed from `alloc_zeroed`, 4 KiB aligned, unique until freed, and are
// identity mapped, so the address is a valid pointer to 512 u64s.
unsafe impl ept::PhysMem for PhysFrames {
    fn alloc_frame(&self) -> Option<u64> {
        alloc_zeroed()
    }
    unsafe fn free_frame(&self, pa: u64) {
        // SAFETY: the caller promises `pa` came from `alloc_frame` (hence from `alloc`) and
        // is unused afterwards: exactly `free`'s contract.
        unsafe { free(pa) }
    }
    fn frame_ptr(&self, pa: u64) -> *mut u64 {
        pa as *mut u64
    }
}
