//! KVM guest containers backed by a `vmo::Vmar`.
//!
//! Not implemented yet: placeholder library so the workspace has its final shape.
