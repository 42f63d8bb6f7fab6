//! The guest "container" workload: an in-memory key-value store, a `no_std` Rust program on the
//! guest SDK (`guest/sdk/`: entry, memory functions, panic handler, allocator) that runs at
//! CPL3 inside a `GuestVm`. Built by `guest-vm/build.rs` against the SDK into a static ELF
//! linked by the SDK's `linker.ld`, loaded by the VMM with linux-loader.
//!
//! Memory: the hash table is the program's first (and only) heap allocation, so it starts at
//! the heap's start (`DATA_GPA`, 1 MiB) and spans `buckets * 64` bytes (`buckets` is the SDK's
//! `boot_arg`, `rcx` at entry, a power of two); open addressing with linear probing and
//! tombstones. The heap is untouched guest RAM at entry, so the table starts zeroed (all
//! buckets `EMPTY`) without a pass writing it. Requests and responses travel through the
//! mailbox page at `MAILBOX_GPA`; the guest asks for the next request with hypercall `HC_NEXT`,
//! whose return value is the op (0 = no more work: the guest returns 0, the SDK's `done(0)`).
//!
//! Every request is validated; a bad request gets a status code, never a guest crash.
#![no_std]
#![no_main]

extern crate alloc;

use guest_sdk as sdk;

sdk::main!(main);

const HC_NEXT: u64 = 3;
const MAILBOX: usize = 0x9_0000;
const RESPONSE: usize = MAILBOX + 0x800;
const VALUE_MAX: usize = 48;

const OP_PUT: u64 = 1;
const OP_GET: u64 = 2;
const OP_DEL: u64 = 3;
const OP_FILL: u64 = 4;
const OP_CHECKSUM: u64 = 5;
const OP_COUNT: u64 = 6;

const ST_OK: u64 = 0;
const ST_NOT_FOUND: u64 = 1;
const ST_FULL: u64 = 2;
const ST_BAD_REQUEST: u64 = 3;

const EMPTY: u32 = 0;
const USED: u32 = 1;
const DELETED: u32 = 2;

#[repr(C)]
struct Request {
    key: u64,
    arg: u64,
    len: u64,
    data: [u8; VALUE_MAX],
}

#[repr(C)]
struct Response {
    status: u64,
    value: u64,
    len: u64,
    data: [u8; VALUE_MAX],
}

#[repr(C)]
struct Bucket {
    key: u64,
    len: u32,
    state: u32,
    val: [u8; VALUE_MAX],
}

fn hcall(nr: u64) -> u64 {
    sdk::hypercall::hypercall(nr, 0, 0, 0)
}

/// The value FILL stores for `key` (the host checks GET results against the same formula).
fn fill_value(key: u64, out: &mut [u8; VALUE_MAX]) {
    let mut x = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5bd1_e995;
    for chunk in out.chunks_mut(8) {
        x ^= x >> 29;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

struct Table {
    base: *mut Bucket,
    mask: u64,
    live: u64,
}

impl Table {
    fn slot(&self, i: u64) -> &'static mut Bucket {
        // SAFETY: `i & mask` < buckets; the table is one heap allocation of `buckets` buckets.
        unsafe { &mut *self.base.add((i & self.mask) as usize) }
    }

    fn hash(key: u64) -> u64 {
        let h = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^ (h >> 32)
    }

    fn find(&self, key: u64) -> Option<&'static mut Bucket> {
        let h = Self::hash(key);
        for i in 0..=self.mask {
            let b = self.slot(h + i);
            match b.state {
                EMPTY => return None,
                USED if b.key == key => return Some(b),
                _ => {}
            }
        }
        None
    }

    fn put(&mut self, key: u64, val: &[u8]) -> u64 {
        if let Some(b) = self.find(key) {
            b.val[..val.len()].copy_from_slice(val);
            b.len = val.len() as u32;
            return ST_OK;
        }
        let h = Self::hash(key);
        for i in 0..=self.mask {
            let b = self.slot(h + i);
            if b.state != USED {
                b.key = key;
                b.len = val.len() as u32;
                b.val[..val.len()].copy_from_slice(val);
                b.state = USED;
                self.live += 1;
                return ST_OK;
            }
        }
        ST_FULL
    }

    fn checksum(&self) -> u64 {
        let mut sum = 0u64;
        for i in 0..=self.mask {
            let b = self.slot(i);
            if b.state == USED {
                let mut h = b.key.wrapping_mul(0x100_0000_01b3);
                for &byte in &b.val[..b.len as usize] {
                    h = (h ^ byte as u64).wrapping_mul(0x100_0000_01b3);
                }
                sum = sum.wrapping_add(h);
            }
        }
        sum
    }
}

fn main() -> u64 {
    let buckets = sdk::boot_arg();
    if buckets == 0 || !buckets.is_power_of_two() {
        sdk::crash("kvstore: the bucket count (boot_arg) is not a power of two");
    }
    let layout = (buckets as usize)
        .checked_mul(core::mem::size_of::<Bucket>())
        .and_then(|bytes| core::alloc::Layout::from_size_align(bytes, 64).ok())
        .unwrap_or_else(|| sdk::crash("kvstore: table too large"));
    // SAFETY: a non-zero size; the block is the heap's first allocation, never freed, and
    // untouched guest RAM (zero: every bucket EMPTY).
    let base = unsafe { alloc::alloc::alloc(layout) } as *mut Bucket;
    if base.is_null() {
        sdk::crash("kvstore: the table does not fit in guest memory");
    }
    let mut t = Table {
        base,
        mask: buckets - 1,
        live: 0,
    };
    loop {
        let op = hcall(HC_NEXT);
        // SAFETY: the mailbox page is guest RAM reserved for requests and responses.
        let (req, resp) = unsafe {
            (
                &*(MAILBOX as *const Request),
                &mut *(RESPONSE as *mut Response),
            )
        };
        resp.value = 0;
        resp.len = 0;
        resp.status = match op {
            0 => return 0,
            OP_PUT if req.len as usize <= VALUE_MAX => {
                t.put(req.key, &req.data[..req.len as usize])
            }
            OP_GET => match t.find(req.key) {
                Some(b) => {
                    resp.len = b.len as u64;
                    resp.data[..b.len as usize].copy_from_slice(&b.val[..b.len as usize]);
                    ST_OK
                }
                None => ST_NOT_FOUND,
            },
            OP_DEL => match t.find(req.key) {
                Some(b) => {
                    b.state = DELETED;
                    t.live -= 1;
                    ST_OK
                }
                None => ST_NOT_FOUND,
            },
            OP_FILL => {
                let mut v = [0u8; VALUE_MAX];
                let mut st = ST_OK;
                for k in req.key..req.key.wrapping_add(req.arg) {
                    fill_value(k, &mut v);
                    st = t.put(k, &v);
                    if st != ST_OK {
                        break;
                    }
                }
                resp.value = t.live;
                st
            }
            OP_CHECKSUM => {
                resp.value = t.checksum();
                ST_OK
            }
            OP_COUNT => {
                resp.value = t.live;
                ST_OK
            }
            _ => ST_BAD_REQUEST,
        };
    }
}
