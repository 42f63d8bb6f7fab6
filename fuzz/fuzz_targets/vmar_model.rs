//! Fuzz target `vmar_model`: the Vmar model test (`conformance::model`) on fuzzer-chosen
//! operation sequences — map / unmap / protect / sub-VMARs / fork / reset / guest and host
//! reads and writes / commit / decommit / resize / handle_fault on the software EPT or NPT
//! backend (first byte), checked against the byte-level reference after every operation, with
//! every object dropped and zero data and table frames live at the end. Any divergence panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    conformance::model::run_bytes(data);
});
