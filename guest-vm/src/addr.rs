//! Typed addresses where the three address spaces of the KVM backend meet.
//!
//! - [`Gpa`]: a guest-physical address (what the guest and the memory model see);
//! - [`Hva`]: a host-virtual address in this process (where a memslot's bytes live);
//! - [`MemfdOffset`]: a byte offset in the frame memfd (a frame's `vmo::Paddr` on this
//!   backend, and the `offset` argument of an install's `mmap`).
//!
//! A reservation turns a `Gpa` into an `Hva` and back; the Stage2 backend maps a `MemfdOffset`
//! at an `Hva`. Mixing them up does not compile. The `ept::Stage2` and `vmo` seams stay in
//! plain `u64` (they are shared with the bare-metal backends); conversion happens once, at the
//! seam.
//!
//! Invariant: these are plain values with no arithmetic beyond `add`/`offset_from`, which are
//! checked by the types that own a range (`Reservation`).

/// A guest-physical address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gpa(pub u64);

/// A host-virtual address in this process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hva(pub u64);

/// A byte offset in the frame memfd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemfdOffset(pub u64);

impl Gpa {
    pub const fn raw(self) -> u64 {
        self.0
    }
}

impl Hva {
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The address `bytes` further on (callers stay inside a mapping they own).
    pub const fn add(self, bytes: u64) -> Hva {
        Hva(self.0 + bytes)
    }

    pub fn as_mut_ptr<T>(self) -> *mut T {
        self.0 as *mut T
    }
}

impl MemfdOffset {
    pub const fn raw(self) -> u64 {
        self.0
    }
}
