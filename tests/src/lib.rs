//! Cross-crate test helpers (the software guest CPU, backend conformance suite).
//!
//! Empty until the Vmar exists; the suite's cases live under `tests/tests/`.
