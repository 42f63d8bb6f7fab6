//! Forking a running guest: the child's address space is `vmo::Vmar::fork` of the parent's
//! (every frame shared copy-on-write, an empty second-level table), its vCPU a copy of the
//! parent's architectural state with RAX = the child number (the parent's RAX becomes 0).
//!
//! Invariants: the parent is stopped at its fork hypercall while this runs; the parent's
//! write-protected entries are flushed (INVEPT by the EPT hook, TLB_CONTROL handed to the SVM
//! vCPU) before it runs again; children start with nothing installed.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::guest::Guest;
use crate::virt::vcpu::Backend;

/// Forks guest `p` into two children appended to `guests`; returns their indices.
pub(crate) fn fork(
    backend: &mut dyn Backend,
    guests: &mut Vec<Guest>,
    p: usize,
) -> Result<[usize; 2], String> {
    let parent_state = guests[p].vcpu.state();
    let mut out = [0; 2];
    for k in 1..=2u64 {
        let table = backend.new_stage2().map_err(|e| format!("stage2: {e}"))?;
        let ctx = table.context();
        let space = guests[p]
            .space
            .fork(table)
            .map_err(|e| format!("fork: {e}"))?;
        let mut st = parent_state;
        st.gprs.rax = k;
        let vcpu = backend.new_vcpu(&st, ctx)?;
        guests.push(Guest::runnable(
            format!("{}.child{}", guests[p].name, k),
            space,
            vcpu,
        ));
        out[k as usize - 1] = guests.len() - 1;
    }
    // The parent's writable entries were downgraded by the fork.
    guests[p].vcpu.gprs().rax = 0;
    let v = guests[p].space.take_tlb_control();
    if v != 0 {
        guests[p].vcpu.tlb_control(v);
    }
    Ok(out)
}
