//! The hypercalls of the guest ABI (`ABI.md`): `out 0x11, al` with the number in `al`, the
//! arguments in `rdi`, `rsi`, `rdx` and the result in `rax` (`HC_ERR` = refused).

use alloc::vec::Vec;
use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

pub const HC_DONE: u64 = 0;
pub const HC_LOG: u64 = 1;
pub const HC_SNAPSHOT: u64 = 4;
pub const HC_INPUT: u64 = 5;
pub const HC_CRASH: u64 = 6;
/// The result of a refused call.
pub const HC_ERR: u64 = u64::MAX;
/// Longest `log` message / `crash` reason the host accepts.
pub const LOG_MAX: usize = 4096;

/// A hypercall the host refused (it answered `HC_ERR`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HcError;

pub(crate) static MEM_SIZE: AtomicU64 = AtomicU64::new(0);
pub(crate) static HEAP_START: AtomicU64 = AtomicU64::new(0);
pub(crate) static HEAP_END: AtomicU64 = AtomicU64::new(0);
pub(crate) static BOOT_ARG: AtomicU64 = AtomicU64::new(0);

/// Raw hypercall `nr(a, b, c)`.
#[inline]
pub fn hypercall(nr: u64, a: u64, b: u64, c: u64) -> u64 {
    let ret;
    // SAFETY: port output to the VMM's hypercall port (IOPL=3 permits it at CPL3); the host
    // may write guest memory the arguments name (no `nomem`), and changes only `rax`.
    unsafe {
        asm!("out 0x11, al", inlateout("rax") nr => ret, in("rdi") a, in("rsi") b, in("rdx") c,
             options(nostack))
    };
    ret
}

/// Logs `msg` (chunks of `LOG_MAX`); the host prints it with the guest's output.
pub fn log(msg: &[u8]) {
    for chunk in msg.chunks(LOG_MAX) {
        hypercall(HC_LOG, chunk.as_ptr() as u64, chunk.len() as u64, 0);
    }
}

/// The fork / reset point: the host snapshots the guest here. Returns in the parent and in
/// every child (and again after each reset). Refused when called twice.
pub fn snapshot_here() -> Result<(), HcError> {
    match hypercall(HC_SNAPSHOT, 0, 0, 0) {
        HC_ERR => Err(HcError),
        _ => Ok(()),
    }
}

/// Asks the host for this run's input, written into `buf` (truncated to it); returns the
/// bytes written (0 after the first call). Refused before `snapshot_here`.
pub fn next_input(buf: &mut [u8]) -> Result<usize, HcError> {
    match hypercall(HC_INPUT, buf.as_mut_ptr() as u64, buf.len() as u64, 0) {
        HC_ERR => Err(HcError),
        n => Ok(n as usize),
    }
}

/// `next_input` into a new buffer of `max` bytes; a refused call crashes the guest.
pub fn input(max: usize) -> Vec<u8> {
    let mut buf = alloc::vec![0u8; max];
    match next_input(&mut buf) {
        Ok(n) => buf.truncate(n),
        Err(HcError) => crash("next_input refused (called before snapshot_here?)"),
    }
    buf
}

/// Finishes the run with `status`.
pub fn done(status: u64) -> ! {
    loop {
        hypercall(HC_DONE, status, 0, 0);
    }
}

/// Ends the run as a crash with `reason` (the panic handler's exit).
pub fn crash(reason: &str) -> ! {
    let r = &reason.as_bytes()[..reason.len().min(LOG_MAX)];
    loop {
        hypercall(HC_CRASH, r.as_ptr() as u64, r.len() as u64, 0);
    }
}

/// The guest's memory size in bytes (from the entry registers).
pub fn mem_size() -> u64 {
    MEM_SIZE.load(Ordering::Relaxed)
}

/// The program argument the host passed in `rcx` at entry (0 from `guest-vm run` / `fork`;
/// the kvstore guest's bucket count).
pub fn boot_arg() -> u64 {
    BOOT_ARG.load(Ordering::Relaxed)
}

/// The heap the allocator serves: `[start, end)`.
pub fn heap_range() -> (u64, u64) {
    (
        HEAP_START.load(Ordering::Relaxed),
        HEAP_END.load(Ordering::Relaxed),
    )
}

/// A fixed 512-byte message buffer for `log!` and the panic handler (truncates silently).
pub struct MsgBuf {
    buf: [u8; 512],
    len: usize,
}

impl MsgBuf {
    pub const fn new() -> Self {
        MsgBuf {
            buf: [0; 512],
            len: 0,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub fn as_str(&self) -> &str {
        // Truncation may split a character: keep the valid prefix.
        match core::str::from_utf8(self.as_bytes()) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&self.buf[..e.valid_up_to()]).unwrap_or(""),
        }
    }
}

impl Default for MsgBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Write for MsgBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}
