//! The guest-physical layout every guest of this VMM boots with.
//!
//! ```text
//! 0x0800        GDT (null, kernel code/data, user code 0x1b, user data 0x23, TSS 0x28)
//! 0x1000        PML4        0x2000 PDPT        0x3000.. one PD per GiB (2 MiB pages, U/S=1)
//! 0x10000       code (CODE_GPA), up to STACK_TOP - STACK_SIZE
//! 0x80000       top of the CPL3 stack (STACK_TOP), grows down; above it the coverage map
//!               (COV_GPA, COV_SIZE: SDK guests' edge counters, a shared Vmo when fuzzing)
//! 0x90000       workload mailbox page (MAILBOX_GPA)
//! 0x100000..    data (DATA_GPA): free for the workload
//! ```
//! Invariants (checked at compile time below): the regions are in this order and do not
//! overlap; everything the boot image writes lies below `DATA_GPA`; the page directories of
//! `MAX_MEM` fit between `PD_GPA` and `CODE_GPA`.

use ept::PAGE_SIZE;

pub const GDT_GPA: u64 = 0x800;
pub const PML4_GPA: u64 = 0x1000;
pub const PDPT_GPA: u64 = 0x2000;
pub const PD_GPA: u64 = 0x3000;
/// Most guest RAM the boot page tables map (one PD page per GiB between 0x3000 and 0x10000).
pub const MAX_MEM: u64 = 8 << 30;
pub const CODE_GPA: u64 = 0x10000;
pub const STACK_TOP: u64 = 0x80000;
pub const STACK_SIZE: u64 = 0x10000;
/// The coverage map of SDK guests built with SanitizerCoverage (`guest/ABI.md`).
pub const COV_GPA: u64 = 0x80000;
pub const COV_SIZE: u64 = 0x10000;
/// Where the coverage window's comparison log starts (edge counters before it; the SDK's
/// `cov.rs` writes the same layout).
pub const COV_CMP_OFF: u64 = 0x4000;
/// Bytes per slot of the comparison log (size word, two operands; the first slot's room holds
/// the count of comparisons logged).
pub const COV_CMP_SLOT_BYTES: u64 = 24;
/// Flag in a comparison slot's size word: the first operand is a compile-time constant (the
/// SDK's `cov::CMP_CONST`).
pub const COV_CMP_CONST: u64 = 0x100;
pub const MAILBOX_GPA: u64 = 0x90000;
pub const DATA_GPA: u64 = 0x100000;

const _: () = assert!(GDT_GPA + 8 * 7 <= PML4_GPA);
const _: () = assert!(PML4_GPA + PAGE_SIZE == PDPT_GPA && PDPT_GPA + PAGE_SIZE == PD_GPA);
const _: () = assert!(PD_GPA + (MAX_MEM >> 30) * PAGE_SIZE <= CODE_GPA);
const _: () = assert!(CODE_GPA < STACK_TOP - STACK_SIZE);
const _: () = assert!(STACK_TOP <= MAILBOX_GPA && MAILBOX_GPA + PAGE_SIZE <= DATA_GPA);
const _: () = assert!(STACK_TOP <= COV_GPA && COV_GPA + COV_SIZE <= MAILBOX_GPA);
