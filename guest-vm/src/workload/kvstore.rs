//! The host side of the guest "container" workload: drives the key-value store guest
//! (`guest/kvstore.rs`, built by `build.rs`) through its mailbox protocol.
//!
//! Protocol (must match `guest/kvstore.rs`): the guest calls hypercall `HC_NEXT`; the VMM
//! answers with the op in `rax` (0 = stop) after writing the request into the mailbox page at
//! `MAILBOX_GPA`; when the guest calls `HC_NEXT` again, the response to the previous request
//! is in the mailbox's response half. The table lives at `DATA_GPA` and spans
//! `buckets * BUCKET_SIZE` bytes of guest RAM.
//!
//! Invariants: one request is in flight at a time; every guest answer is read through the
//! fault path (`read_guest`), so the driver works on a freshly forked VM whose mailbox page is
//! not installed yet; a guest that stops answering (done, fault, shutdown) is an error value.

use std::borrow::BorrowMut;

use crate::error::{Error, Result};
use crate::vmm::hypercall::HC_NEXT;
use crate::vmm::x86_64::layout::{DATA_GPA, MAILBOX_GPA, PDPT_GPA, PD_GPA, PML4_GPA, STACK_TOP};
use crate::vmm::{GuestArgs, GuestVm, VmExit};

/// The guest program, a static ELF.
pub const KVSTORE_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kvstore.elf"));

/// Pages a child may hold beyond the table pages it wrote: the mailbox page, the guest's stack
/// page and the three page-table pages (PML4, PDPT, PD) KVM writes accessed/dirty bits into.
pub const EXTRA_PAGES_MAX: u64 = 5;

/// The pages `EXTRA_PAGES_MAX` stands for.
pub fn named_extra_pages() -> [(u64, &'static str); 5] {
    [
        (MAILBOX_GPA, "mailbox"),
        (STACK_TOP - ept::PAGE_SIZE, "guest stack"),
        (PML4_GPA, "PML4"),
        (PDPT_GPA, "PDPT"),
        (PD_GPA, "PD"),
    ]
}

pub const BUCKET_SIZE: u64 = 64;
pub const VALUE_MAX: usize = 48;
const RESPONSE_OFF: u64 = 0x800;

pub const OP_PUT: u64 = 1;
pub const OP_GET: u64 = 2;
pub const OP_DEL: u64 = 3;
pub const OP_FILL: u64 = 4;
pub const OP_CHECKSUM: u64 = 5;
pub const OP_COUNT: u64 = 6;

/// Status codes of a response.
pub const ST_OK: u64 = 0;
pub const ST_NOT_FOUND: u64 = 1;
pub const ST_FULL: u64 = 2;
pub const ST_BAD_REQUEST: u64 = 3;

/// One request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: u64,
    pub key: u64,
    pub arg: u64,
    pub data: Vec<u8>,
}

/// The guest's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u64,
    pub value: u64,
    pub data: Vec<u8>,
}

/// The value the guest's FILL stores for `key` (same formula as the guest).
pub fn fill_value(key: u64) -> [u8; VALUE_MAX] {
    let mut out = [0u8; VALUE_MAX];
    let mut x = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5bd1_e995;
    for chunk in out.chunks_mut(8) {
        x ^= x >> 29;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    out
}

/// Guest RAM the store needs for `buckets` buckets.
pub fn memory_for(buckets: u64) -> u64 {
    (DATA_GPA + buckets * BUCKET_SIZE).next_multiple_of(2 << 20)
}

/// A running key-value store guest, over a bare `GuestVm` or a `Guest` (anything that lends
/// a `GuestVm`).
pub struct KvStore<V: BorrowMut<GuestVm> = GuestVm> {
    vm: V,
    /// The guest is stopped at `HC_NEXT`, waiting for a request.
    waiting: bool,
}

impl<V: BorrowMut<GuestVm>> KvStore<V> {
    /// Loads the store into `vm` (fresh) with a table of `buckets` (power of two) buckets and
    /// runs it to its first request.
    pub fn boot(mut vm: V, buckets: u64) -> Result<Self> {
        if !buckets.is_power_of_two() || memory_for(buckets) > vm.borrow().reservation().size() {
            return Err(Error::InvalidArgs(format!(
                "{buckets} buckets: not a power of two or more than guest memory holds"
            )));
        }
        // The SDK's entry registers (guest/ABI.md): memory size, heap, and the bucket count as
        // the program argument (`rcx`, the SDK's `boot_arg`).
        let mem = vm.borrow().reservation().size();
        vm.borrow_mut().load_elf(
            KVSTORE_ELF,
            GuestArgs {
                rdi: mem,
                rsi: DATA_GPA,
                rdx: mem,
                rcx: buckets,
                ..Default::default()
            },
        )?;
        let mut kv = KvStore { vm, waiting: false };
        kv.wait_next()?;
        Ok(kv)
    }

    /// Wraps a VM that is stopped at the store's `HC_NEXT` (a restored or forked snapshot).
    pub fn resume(vm: V) -> Self {
        KvStore { vm, waiting: true }
    }

    pub fn vm(&self) -> &GuestVm {
        self.vm.borrow()
    }

    pub fn vm_mut(&mut self) -> &mut GuestVm {
        self.vm.borrow_mut()
    }

    /// The guest this store runs in.
    pub fn inner(&self) -> &V {
        &self.vm
    }

    pub fn inner_mut(&mut self) -> &mut V {
        &mut self.vm
    }

    pub fn into_inner(self) -> V {
        self.vm
    }

    fn wait_next(&mut self) -> Result<()> {
        loop {
            match self.vm.borrow_mut().run()? {
                VmExit::Hypercall { nr: HC_NEXT, .. } => {
                    self.waiting = true;
                    return Ok(());
                }
                VmExit::Report(_) => continue,
                other => {
                    self.waiting = false;
                    return Err(Error::BadState(format!(
                        "key-value guest stopped instead of asking for work: {other:?}"
                    )));
                }
            }
        }
    }

    /// Sends one request and returns the guest's answer.
    pub fn call(&mut self, req: &Request) -> Result<Response> {
        if !self.waiting {
            return Err(Error::BadState("key-value guest is not waiting".into()));
        }
        if req.op == 0 || req.data.len() > VALUE_MAX {
            return Err(Error::InvalidArgs(format!("bad request {req:?}")));
        }
        let mut mb = [0u8; 24 + VALUE_MAX];
        mb[0..8].copy_from_slice(&req.key.to_le_bytes());
        mb[8..16].copy_from_slice(&req.arg.to_le_bytes());
        mb[16..24].copy_from_slice(&(req.data.len() as u64).to_le_bytes());
        mb[24..24 + req.data.len()].copy_from_slice(&req.data);
        self.vm.borrow().write_guest(MAILBOX_GPA, &mb)?;
        self.vm.borrow_mut().set_hypercall_result(req.op)?;
        self.waiting = false;
        self.wait_next()?;
        let mut r = [0u8; 24 + VALUE_MAX];
        self.vm
            .borrow()
            .read_guest(MAILBOX_GPA + RESPONSE_OFF, &mut r)?;
        let word = |i: usize| u64::from_le_bytes(r[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let len = (word(2) as usize).min(VALUE_MAX);
        Ok(Response {
            status: word(0),
            value: word(1),
            data: r[24..24 + len].to_vec(),
        })
    }

    pub fn put(&mut self, key: u64, value: &[u8]) -> Result<u64> {
        Ok(self
            .call(&Request {
                op: OP_PUT,
                key,
                arg: 0,
                data: value.to_vec(),
            })?
            .status)
    }

    /// `Some(value)` or `None` when absent.
    pub fn get(&mut self, key: u64) -> Result<Option<Vec<u8>>> {
        let r = self.call(&Request {
            op: OP_GET,
            key,
            arg: 0,
            data: vec![],
        })?;
        Ok((r.status == ST_OK).then_some(r.data))
    }

    pub fn delete(&mut self, key: u64) -> Result<bool> {
        let r = self.call(&Request {
            op: OP_DEL,
            key,
            arg: 0,
            data: vec![],
        })?;
        Ok(r.status == ST_OK)
    }

    /// Inserts keys `first..first+count` with `fill_value(key)`; returns the live count.
    pub fn fill(&mut self, first: u64, count: u64) -> Result<u64> {
        let r = self.call(&Request {
            op: OP_FILL,
            key: first,
            arg: count,
            data: vec![],
        })?;
        if r.status != ST_OK {
            return Err(Error::BadState(format!("FILL status {}", r.status)));
        }
        Ok(r.value)
    }

    /// Checksum of the whole table, computed by the guest.
    pub fn checksum(&mut self) -> Result<u64> {
        Ok(self
            .call(&Request {
                op: OP_CHECKSUM,
                key: 0,
                arg: 0,
                data: vec![],
            })?
            .value)
    }

    pub fn count(&mut self) -> Result<u64> {
        Ok(self
            .call(&Request {
                op: OP_COUNT,
                key: 0,
                arg: 0,
                data: vec![],
            })?
            .value)
    }

    /// Tells the guest there is no more work; it reports done.
    pub fn finish(mut self) -> Result<V> {
        if self.waiting {
            self.vm.borrow_mut().set_hypercall_result(0)?;
            match self.vm.borrow_mut().run()? {
                // `main` returned 0: the SDK's `done(0)` (HC_DONE).
                VmExit::Exit(0) => {}
                other => {
                    return Err(Error::BadState(format!(
                        "key-value guest did not finish cleanly: {other:?}"
                    )))
                }
            }
        }
        Ok(self.vm)
    }
}
