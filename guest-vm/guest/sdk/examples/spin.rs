//! An example guest that never reaches `snapshot_here` (it logs, then loops): `guest-vm fork`
//! must stop it at its time limit with a clear error.
#![no_std]
#![no_main]

use guest_sdk as sdk;

sdk::main!(main);

fn main() -> u64 {
    sdk::log!("spin: looping forever before any snapshot_here");
    let mut x = 0u64;
    loop {
        // SAFETY: a volatile write to a local.
        unsafe { core::ptr::write_volatile(&mut x, x.wrapping_add(1)) };
    }
}
