//! The 4-level second-level page table, written once and generic over the entry format
//! (`EntryFormat`: EPT or NPT) and over where table frames come from (`PhysMem`).
//!
//! This module owns the table frames: it allocates them from its `PhysMem`, links them, and
//! frees them. Invariants:
//! - every non-root table frame in the tree holds at least one present entry (frames that become
//!   empty on `unmap` are unlinked at once; `map` never links a table it does not fill);
//! - a frame unlinked from the tree is *retired*, not freed: the CPU may still hold it in its
//!   paging-structure caches until the next invalidation. Retired frames are chained through
//!   their first entry (a 4 KiB-aligned address with bit 11 as "has next", which no format reads
//!   as present) and returned to the `PhysMem` by `release_retired`, which the owner calls right
//!   after the invalidation (`Stage2::flush`);
//! - `table_frames()` is exactly the number of frames linked in the tree (root included) and
//!   `retired_frames()` the number awaiting release; together they are every frame this table
//!   holds from its `PhysMem`;
//! - a failed operation leaves a consistent table: `map` allocates all the frames it needs before
//!   linking any; `unmap`/`protect` split large pages first (a split replaces a leaf by an
//!   equivalent table, so translations never change) and change entries only once every split
//!   succeeded;
//! - entries are read and written as `AtomicU64` so a concurrent hardware update of accessed /
//!   dirty bits is never torn; permission changes and splits use compare-and-swap so those bits
//!   are not lost;
//! - dirty bit = "this leaf may have been written since the last harvest" (`dirty.rs`): with
//!   `AccessDirty::Enabled`, a leaf installed writable by `map`, or made writable by `protect`,
//!   is installed with its dirty bit set (the model installs write permission only for writes it
//!   knows about); a `map` replacing a dirty leaf by one for the same frame keeps the bit; with
//!   `AccessDirty::Disabled` the bit is never set. Only `harvest_dirty` clears it;
//! - a non-leaf entry may claim, in bits 55:52 (ignored by the hardware), that every leaf below
//!   it has one set of perms as seen from that entry (`summary.rs`); every claim is true, and
//!   `protect` skips the subtrees whose claim equals the perms it sets;
//! - a non-leaf entry's permission bits (its *gate*) are all set, or all but write (`gate.rs`):
//!   a closed gate write-protects its whole subtree at once, so a leaf's effective perms are
//!   its raw perms ∩ the gates above it. Everything this table reports (`query`,
//!   `for_each_leaf`, `map`'s old leaf, `hw_touch`) is effective perms, and whatever makes a
//!   leaf writable opens the gates on its path first (`push_down`), keeping every other page's
//!   effective perms.
//!
//! Arguments are validated before anything is touched; bad input is an `Error`, never a panic.
//!
//! Sub-modules: `check` (the invariants as code), `dirty` (dirty harvest and the MMU's A/D
//! updates, `hw_touch`), `gate` (write gates in non-leaf entries and their push-down),
//! `protect` (`protect`: subtree skipping and hierarchical write-protect), `summary` (the
//! permission summaries in non-leaf entries).
//!
//! `check_invariants` walks the tree and the retired chain and checks the frame counts and the
//! no-empty-table rule: O(table frames × 512). Debug builds run it after every operation that
//! links or unlinks table frames (a map that allocated tables, a split, an unmap, a release)
//! while the table holds at most `DEBUG_CHECK_MAX_FRAMES` frames, so guests with large tables
//! stay linear; the model tests run it after every step.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::entry::{level_size, EntryFormat, ADDRESS_MASK};
use crate::phys::PhysMem;
use crate::{
    AccessDirty, Error, MemType, PageSize, S2Perms, Translation, GPA_LIMIT, PAGE_SIZE, PA_LIMIT,
};

mod check;
mod dirty;
mod gate;
mod protect;
mod summary;

use summary::{set_summary, uniform, Claim};

pub use dirty::Harvested;

const ENTRIES: usize = 512;
/// Table frames above which debug builds skip the automatic `check_invariants`.
pub const DEBUG_CHECK_MAX_FRAMES: usize = 64;
/// Marks the first entry of a retired frame as linking to another retired frame.
const RETIRED_LINK: u64 = 1 << 11;

/// Index of `addr`'s entry in the table at `level`.
fn index(addr: u64, level: usize) -> usize {
    ((addr >> (12 + 9 * (level as u32 - 1))) & 0x1ff) as usize
}

fn page_size_of(level: usize) -> PageSize {
    match level {
        1 => PageSize::Size4K,
        2 => PageSize::Size2M,
        _ => PageSize::Size1G,
    }
}

/// Validates a page-aligned range and returns its end. `InvalidArgs` for misalignment or
/// `len == 0`; `OutOfRange` when `gpa + len` overflows or exceeds `GPA_LIMIT`.
pub fn check_range(gpa: u64, len: u64) -> Result<u64, Error> {
    if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || len == 0 {
        return Err(Error::InvalidArgs);
    }
    match gpa.checked_add(len) {
        Some(end) if end <= GPA_LIMIT => Ok(end),
        _ => Err(Error::OutOfRange),
    }
}

/// What `unmap_in` did to one table.
struct Unmapped {
    /// 4 KiB pages unmapped below this table.
    removed: u64,
    /// Index of the last entry of this table that was cleared, if any.
    last_cleared: Option<usize>,
}

/// A 4-level table of `E` entries in frames from `M`.
pub struct PageTable<E: EntryFormat, M: PhysMem> {
    mem: M,
    root: u64,
    attached: usize,
    retired_head: Option<u64>,
    retired: usize,
    ad: AccessDirty,
    _format: PhantomData<fn() -> E>,
}

impl<E: EntryFormat, M: PhysMem> PageTable<E, M> {
    /// An empty table whose leaves carry accessed/dirty state (`AccessDirty::Enabled`);
    /// allocates the root frame (`NoMemory` if that fails).
    pub fn new(mem: M) -> Result<Self, Error> {
        Self::with_access_dirty(mem, AccessDirty::Enabled)
    }

    /// An empty table; `ad` says whether the MMU walking it maintains accessed/dirty bits
    /// (EPT: the EPTP's A/D enable). `NoMemory` if the root frame cannot be allocated.
    pub fn with_access_dirty(mem: M, ad: AccessDirty) -> Result<Self, Error> {
        let root = mem.alloc_frame().ok_or(Error::NoMemory)?;
        Ok(PageTable {
            mem,
            root,
            attached: 1,
            retired_head: None,
            retired: 0,
            ad,
            _format: PhantomData,
        })
    }

    /// Whether this table's leaves carry accessed/dirty state.
    pub fn access_dirty(&self) -> AccessDirty {
        self.ad
    }

    /// `e` marked dirty when it grants write and the table tracks dirty state (a leaf
    /// installed or made writable counts as written until the next harvest).
    fn dirty_if_writable(&self, e: E) -> E {
        if self.ad == AccessDirty::Enabled && e.perms().contains(S2Perms::WRITE) {
            E::from_raw(e.raw() | E::DIRTY_BIT)
        } else {
            e
        }
    }

    /// Physical address of the root (PML4) frame.
    pub fn root(&self) -> u64 {
        self.root
    }
    /// The frame source.
    pub fn phys_mem(&self) -> &M {
        &self.mem
    }
    /// Table frames linked in the tree, root included.
    pub fn table_frames(&self) -> usize {
        self.attached
    }
    /// Unlinked table frames waiting for `release_retired` (i.e. for an invalidation).
    pub fn retired_frames(&self) -> usize {
        self.retired
    }

    fn slot(&self, table: u64, i: usize) -> &AtomicU64 {
        let base = self.mem.frame_ptr(table);
        // SAFETY: `table` is a frame this table allocated and still holds; `PhysMem` guarantees
        // 512 aligned u64s behind the pointer, and `i < 512`.
        unsafe { &*(base.add(i & (ENTRIES - 1)) as *const AtomicU64) }
    }

    fn load(&self, table: u64, i: usize) -> E {
        E::from_raw(self.slot(table, i).load(Ordering::Acquire))
    }

    /// The translation of the leaf `e` at `level` under gates `above` (their AND: the leaf's
    /// effective perms are its own ∩ `above`, `gate.rs`).
    fn translation(e: E, level: usize, gpa: u64, above: S2Perms) -> Translation {
        Translation {
            gpa: gpa & !(level_size(level) - 1),
            pa: e.leaf_address(level),
            size: page_size_of(level),
            perms: e.perms() & above,
            mem_type: e.mem_type(level),
            accessed: e.accessed(),
            dirty: e.dirty(),
        }
    }

    /// Installs a leaf of `size` at `gpa` → `pa`. Replaces (and returns, with its effective
    /// perms) an existing leaf of the same size at `gpa`; any other overlap is `AlreadyExists`.
    /// A writable leaf opens the closed gates on its path first (`gate.rs`). Errors: `gpa`/`pa` not aligned
    /// to `size` → `InvalidArgs`; `gpa + size > 2^48` or `pa >= 2^52` → `OutOfRange`;
    /// unrepresentable perms or memory type → `InvalidArgs` / `NotSupported`; no frame for a
    /// new table → `NoMemory` (nothing changed).
    pub fn map(
        &mut self,
        gpa: u64,
        pa: u64,
        size: PageSize,
        perms: S2Perms,
        mem_type: MemType,
    ) -> Result<Option<Translation>, Error> {
        let bytes = size.bytes();
        if !gpa.is_multiple_of(bytes) || !pa.is_multiple_of(bytes) {
            return Err(Error::InvalidArgs);
        }
        // `gpa` is size-aligned and GPA_LIMIT is a multiple of every size.
        if gpa >= GPA_LIMIT || pa >= PA_LIMIT {
            return Err(Error::OutOfRange);
        }
        E::check(perms, mem_type)?;
        let target = size.level();
        let leaf = self.dirty_if_writable(E::leaf(target, pa, perms, mem_type));

        let mut table = self.root;
        let mut level = 4;
        let mut above = S2Perms::RWX;
        // The non-leaf entries walked through, whose claims take the new leaf once it is in.
        let mut path = [(0u64, 0usize); 3];
        let mut walked = 0;
        while level > target {
            let mut e = self.load(table, index(gpa, level));
            if !e.is_present() {
                break;
            }
            if e.is_leaf(level) {
                return Err(Error::AlreadyExists);
            }
            if perms.contains(S2Perms::WRITE) && !gate::is_open(e) {
                // A writable leaf below a closed gate: open it, keeping the other pages'
                // effective perms (`gate.rs`). Harmless if the map then fails.
                self.push_down(table, index(gpa, level), level);
                e = self.load(table, index(gpa, level));
            }
            above &= gate::gate(e);
            path[walked] = (table, index(gpa, level));
            walked += 1;
            table = e.table_address();
            level -= 1;
        }

        if level == target {
            let slot = self.slot(table, index(gpa, level));
            let old = E::from_raw(slot.load(Ordering::Acquire));
            if !old.is_present() {
                slot.store(leaf.raw(), Ordering::Release);
                self.claim_new_leaf(&path[..walked], perms);
                return Ok(None);
            }
            if !old.is_leaf(level) {
                return Err(Error::AlreadyExists);
            }
            let old = E::from_raw(slot.swap(leaf.raw(), Ordering::AcqRel));
            if old.dirty() && old.leaf_address(level) == pa {
                // Same frame: its unharvested writes stay visible to the next harvest.
                slot.fetch_or(E::DIRTY_BIT, Ordering::AcqRel);
            }
            self.claim_new_leaf(&path[..walked], perms);
            return Ok(Some(Self::translation(old, level, gpa, above)));
        }

        // Tables are missing for levels `level - 1` down to `target`: allocate them all first.
        let needed = level - target;
        let mut frames = [0u64; 3];
        for i in 0..needed {
            match self.mem.alloc_frame() {
                Some(f) => frames[i] = f,
                None => {
                    for &f in &frames[..i] {
                        // SAFETY: allocated just above, never linked.
                        unsafe { self.mem.free_frame(f) };
                    }
                    return Err(Error::NoMemory);
                }
            }
        }
        // frames[i] is the new table at level `level - 1 - i`; fill bottom-up, link last.
        self.slot(frames[needed - 1], index(gpa, target))
            .store(leaf.raw(), Ordering::Relaxed);
        // Each new table holds only the new leaf: its pointer claims the leaf's perms.
        let summary = uniform(perms);
        for i in (0..needed - 1).rev() {
            let lvl = level - 1 - i;
            self.slot(frames[i], index(gpa, lvl)).store(
                E::table_pointer(frames[i + 1]).raw() | summary,
                Ordering::Relaxed,
            );
        }
        self.slot(table, index(gpa, level)).store(
            E::table_pointer(frames[0]).raw() | summary,
            Ordering::Release,
        );
        self.attached += needed;
        self.claim_new_leaf(&path[..walked], perms);
        self.debug_check();
        Ok(None)
    }

    /// Merges a leaf with `perms`, just mapped below every entry of `path`, into their claims
    /// (`summary.rs`). An `OrWrite` claim is kept only when the new leaf is its witness: the
    /// leaf it replaced may have been the previous one.
    fn claim_new_leaf(&self, path: &[(u64, usize)], perms: S2Perms) {
        for &(table, i) in path {
            let slot = self.slot(table, i);
            let Some(claim) = Claim::of(slot.load(Ordering::Acquire)) else {
                continue;
            };
            let merged = claim
                .merge(Claim::Exact(perms))
                .filter(|m| !matches!(m, Claim::OrWrite(_)) || perms.contains(S2Perms::WRITE));
            if merged != Some(claim) {
                set_summary(slot, Claim::bits(merged));
            }
        }
    }

    /// The leaf translating `gpa`, if any, with its effective perms (`None` for addresses at
    /// or beyond 2^48).
    pub fn query(&self, gpa: u64) -> Option<Translation> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        let mut table = self.root;
        let mut level = 4;
        let mut above = S2Perms::RWX;
        loop {
            let e = self.load(table, index(gpa, level));
            if !e.is_present() {
                return None;
            }
            if e.is_leaf(level) {
                return Some(Self::translation(e, level, gpa, above));
            }
            if level == 1 {
                return None;
            }
            above &= gate::gate(e);
            table = e.table_address();
            level -= 1;
        }
    }

    /// Splits large leaves until none straddles `addr` (4 KiB-aligned). A straddling leaf is
    /// split only when `wanted(leaf, its effective perms)` says so. Translations are unchanged
    /// (the new table's gate is open and its leaves keep the split leaf's raw perms, so the
    /// gates above still apply).
    fn split_at(&mut self, addr: u64, wanted: &dyn Fn(E, S2Perms) -> bool) -> Result<(), Error> {
        if addr >= GPA_LIMIT {
            return Ok(());
        }
        let mut table = self.root;
        let mut level = 4;
        let mut above = S2Perms::RWX;
        while level > 1 {
            let slot_index = index(addr, level);
            let e = self.load(table, slot_index);
            if !e.is_present() {
                return Ok(());
            }
            if e.is_leaf(level) {
                if addr.is_multiple_of(level_size(level)) || !wanted(e, e.perms() & above) {
                    return Ok(());
                }
                let new = self.mem.alloc_frame().ok_or(Error::NoMemory)?;
                let slot = self.slot(table, slot_index);
                loop {
                    let cur = slot.load(Ordering::Acquire);
                    let cur_e = E::from_raw(cur);
                    for (i, child) in self.entries(new).iter().enumerate() {
                        child.store(cur_e.split_child(level, i as u64).raw(), Ordering::Relaxed);
                    }
                    // All 512 children have the split leaf's perms (`summary.rs`).
                    let ptr = E::table_pointer(new).raw() | uniform(cur_e.perms());
                    if slot
                        .compare_exchange(cur, ptr, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        break;
                    }
                }
                self.attached += 1;
                table = new;
            } else {
                above &= gate::gate(e);
                table = e.table_address();
            }
            level -= 1;
        }
        Ok(())
    }

    /// The 512 entries of `table`.
    fn entries(&self, table: u64) -> &[AtomicU64] {
        let base = self.mem.frame_ptr(table);
        // SAFETY: as in `slot`: a frame this table holds, 512 aligned u64s.
        unsafe { core::slice::from_raw_parts(base as *const AtomicU64, ENTRIES) }
    }

    /// Whether `table` has no present entry. The scan starts at `hint` (the last entry
    /// cleared) and wraps: a neighbour is the likeliest present entry, so page-by-page unmaps
    /// stop after a step or two.
    fn table_is_empty(&self, table: u64, hint: usize) -> bool {
        let entries = self.entries(table);
        let hint = hint % ENTRIES;
        let present = |e: &AtomicU64| E::from_raw(e.load(Ordering::Relaxed)).is_present();
        !entries[hint..].iter().any(present) && !entries[..hint].iter().any(present)
    }

    fn retire(&mut self, frame: u64) {
        let link = match self.retired_head {
            Some(next) => next | RETIRED_LINK,
            None => 0,
        };
        self.slot(frame, 0).store(link, Ordering::Relaxed);
        self.retired_head = Some(frame);
        self.retired += 1;
        self.attached -= 1;
    }

    /// Returns every retired frame to the `PhysMem`. Call only after the hardware's cached
    /// translations for this table were invalidated.
    pub fn release_retired(&mut self) {
        let released = self.retired > 0;
        let mut next = self.retired_head.take();
        while let Some(frame) = next {
            let link = self.slot(frame, 0).load(Ordering::Relaxed);
            next = (link & RETIRED_LINK != 0).then_some(link & ADDRESS_MASK);
            // SAFETY: retired frames are unlinked and, per this method's contract, no longer
            // cached by hardware.
            unsafe { self.mem.free_frame(frame) };
        }
        self.retired = 0;
        if released {
            self.debug_check();
        }
    }

    /// Removes every translation in `[gpa, gpa + len)`, splitting large leaves that straddle
    /// the ends, and unlinks table frames that become empty. Returns the number of 4 KiB pages
    /// that were mapped. Errors: see `check_range`; `NoMemory` when a split needs a frame
    /// (then nothing was unmapped).
    pub fn unmap(&mut self, gpa: u64, len: u64) -> Result<u64, Error> {
        let end = check_range(gpa, len)?;
        self.split_at(gpa, &|_, _| true)?;
        self.split_at(end, &|_, _| true)?;
        let removed = self.unmap_in(self.root, 4, gpa, end).removed;
        self.debug_check();
        Ok(removed)
    }

    fn unmap_in(&mut self, table: u64, level: usize, start: u64, end: u64) -> Unmapped {
        let size = level_size(level);
        let mut out = Unmapped {
            removed: 0,
            last_cleared: None,
        };
        let mut addr = start;
        while addr < end {
            let entry_base = addr & !(size - 1);
            let entry_end = entry_base + size;
            let sub_end = end.min(entry_end);
            let i = index(addr, level);
            let e = self.load(table, i);
            if e.is_present() {
                if e.is_leaf(level) {
                    // Straddling leaves were split, so this one lies inside the range.
                    self.slot(table, i).swap(0, Ordering::AcqRel);
                    out.removed += size / PAGE_SIZE;
                    out.last_cleared = Some(i);
                } else if level > 1 {
                    let child = e.table_address();
                    let sub = self.unmap_in(child, level - 1, addr, sub_end);
                    out.removed += sub.removed;
                    let covered = addr == entry_base && sub_end == entry_end;
                    // The child can only have become empty if one of its entries was cleared.
                    let empty = covered
                        || sub
                            .last_cleared
                            .is_some_and(|hint| self.table_is_empty(child, hint));
                    if empty {
                        self.slot(table, i).store(0, Ordering::Release);
                        self.retire(child);
                        out.last_cleared = Some(i);
                    } else if sub.removed > 0
                        && matches!(
                            Claim::of(self.load(table, i).raw()),
                            Some(Claim::OrWrite(_))
                        )
                    {
                        // The removed leaves may have held the claim's only witness.
                        let now = self.table_claim(child, level - 1);
                        set_summary(self.slot(table, i), Claim::bits(now));
                    }
                }
            }
            addr = entry_end;
        }
        out
    }

    /// Calls `f` with every leaf that intersects `[gpa, gpa + len)`, in address order (whole
    /// leaves: a large leaf may start before `gpa`), with its effective perms. Errors: see `check_range`.
    pub fn for_each_leaf(
        &self,
        gpa: u64,
        len: u64,
        mut f: impl FnMut(Translation),
    ) -> Result<(), Error> {
        let end = check_range(gpa, len)?;
        self.walk_in(self.root, 4, gpa, end, S2Perms::RWX, &mut f);
        Ok(())
    }

    fn walk_in(
        &self,
        table: u64,
        level: usize,
        start: u64,
        end: u64,
        above: S2Perms,
        f: &mut dyn FnMut(Translation),
    ) {
        let size = level_size(level);
        let mut addr = start;
        while addr < end {
            let entry_base = addr & !(size - 1);
            let entry_end = entry_base + size;
            let e = self.load(table, index(addr, level));
            if e.is_present() {
                if e.is_leaf(level) {
                    f(Self::translation(e, level, entry_base, above));
                } else if level > 1 {
                    let sub_end = end.min(entry_end);
                    let through = above & gate::gate(e);
                    self.walk_in(e.table_address(), level - 1, addr, sub_end, through, f);
                }
            }
            addr = entry_end;
        }
    }

    fn free_subtree(&mut self, table: u64, level: usize) {
        if level > 1 {
            for i in 0..ENTRIES {
                let e = self.load(table, i);
                if e.is_present() && !e.is_leaf(level) {
                    self.free_subtree(e.table_address(), level - 1);
                }
            }
        }
        // SAFETY: the table is being dropped; its frames are no longer used.
        unsafe { self.mem.free_frame(table) };
    }
}

impl<E: EntryFormat, M: PhysMem> Drop for PageTable<E, M> {
    /// Frees every table frame, linked or retired. The owner must have stopped the hardware
    /// from using this table (no running vCPU with it loaded).
    fn drop(&mut self) {
        self.release_retired();
        self.free_subtree(self.root, 4);
        self.attached = 0;
    }
}

impl<E: EntryFormat, M: PhysMem> core::fmt::Debug for PageTable<E, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PageTable")
            .field("root", &format_args!("{:#x}", self.root))
            .field("table_frames", &self.attached)
            .field("retired_frames", &self.retired)
            .finish()
    }
}
