//! The guest "container" workload: an in-memory key-value store, a `no_std` Rust program that
//! runs at CPL3 inside a `GuestVm`. Built by `guest-vm/build.rs` with the host toolchain into a
//! static ELF linked at 0x10000 (see `linker.ld`), loaded by the VMM with linux-loader.
//!
//! Memory: the hash table starts at `TABLE_GPA` (1 MiB) and spans `buckets * 64` bytes
//! (`buckets` arrives in `rdi`, a power of two); open addressing with linear probing and
//! tombstones. Requests and responses travel through the mailbox page at `MAILBOX_GPA`; the
//! guest asks for the next request with hypercall `HC_NEXT`, whose return value is the op
//! (0 = no more work: the guest reports done).
//!
//! Every request is validated; a bad request gets a status code, never a guest crash.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};

const PORT_DONE: u16 = 0x10;
const HC_NEXT: u64 = 3;
const MAILBOX: usize = 0x9_0000;
const RESPONSE: usize = MAILBOX + 0x800;
const TABLE: usize = 0x10_0000;
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

global_asm!(
    ".section .text.start, \"ax\"",
    ".global _start",
    "_start:",
    "mov rsp, 0x80000",
    "call {main}",
    "ud2",
    main = sym kmain,
);

fn hcall(nr: u64) -> u64 {
    let ret;
    // SAFETY: port output to the VMM's hypercall port; IOPL=3 permits it at CPL3.
    unsafe { asm!("out 0x11, al", inlateout("rax") nr => ret, options(nostack)) };
    ret
}

fn done(status: u8) -> ! {
    loop {
        // SAFETY: port output to the VMM's done port.
        unsafe { asm!("out dx, al", in("dx") PORT_DONE, in("al") status, options(nostack)) };
    }
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
        // SAFETY: `i & mask` < buckets; the table lies in guest RAM the VMM sized for it.
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

extern "C" fn kmain(buckets: u64) -> ! {
    if buckets == 0 || !buckets.is_power_of_two() {
        done(0xee);
    }
    let mut t = Table {
        base: TABLE as *mut Bucket,
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
            0 => done(0),
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

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    done(0xfe)
}

// The precompiled core expects the C memory functions; without libc the guest provides them.
// String instructions keep the compiler from turning these loops back into calls to themselves.

#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees valid, non-overlapping ranges.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags))
    };
    dst
}

#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is correct when dst does not start inside src.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backward copy with the direction flag set, then cleared.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _,
             inout("rsi") src.add(n - 1) => _, options(nostack))
    };
    dst
}

#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees a valid range.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags))
    };
    dst
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees valid ranges; volatile keeps this a plain loop.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: as memcmp.
    unsafe { memcmp(a, b, n) }
}

#[no_mangle]
extern "C" fn rust_eh_personality() {}
