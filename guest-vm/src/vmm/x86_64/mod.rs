//! The x86-64 half of the VMM: what a guest's machine looks like when it starts.
//!
//! - [`layout`]: the guest-physical layout (GDT, page tables, code, stack, mailbox, data);
//! - [`boot`]: the boot image (one GDT table from which both the bytes written to guest memory
//!   and KVM's segment registers are derived, identity-mapping page tables) and the register
//!   state of a CPL3 program in 64-bit long mode.

pub mod boot;
pub mod layout;
