//! The guest memory model: frames, Vmos and Vmars (see `../shared/docs/DESIGN.md`).
//!
//! Not implemented yet: this crate is a placeholder in the workspace so the layering
//! `ept` <- `vmo` <- {`hv`, `guest-vm`} exists from the start.
#![cfg_attr(not(feature = "std"), no_std)]
