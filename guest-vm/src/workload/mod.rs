//! What runs inside a guest, and its host side.
//!
//! - [`kvstore`]: the key-value store guest (`guest/kvstore.rs`, a `no_std` Rust program
//!   built by `build.rs`) and `KvStore`, its host-side driver (mailbox protocol);
//! - [`model`]: `TableModel`, a host replica of the guest's hash table (what every answer is
//!   checked against, and which table pages a request stream writes);
//! - [`streams`]: checked request streams (fill, random mixes) run against a guest and the
//!   model at once;
//! - [`fleet`]: fork N children of a snapshot and run them concurrently, each on its own vCPU
//!   thread;
//! - [`programs`]: small hand-encoded test programs (write / read / increment loops, a
//!   hypercall probe).
//!
//! Floors: `programs` and `kvstore` use only `vmm`; `model` uses `kvstore`; `streams` both;
//! `fleet` all three and `guest`.

pub mod fleet;
pub mod kvstore;
pub mod model;
pub mod programs;
pub mod streams;
