//! The `http` fuzz target in a guest (`guest/targets/http.rs`: an HTTP/1.1 request parsed by
//! `httparse`, a planted crash behind the method `PWN`). Built with SanitizerCoverage by
//! guest-vm's build.rs (`http.elf`), or here with `cargo build --release --example http`
//! (httparse is a dev-dependency of the SDK: a crates.io no_std crate in a guest).
#![no_std]
#![no_main]

extern crate alloc;

use guest_sdk as sdk;

#[path = "../../targets/http.rs"]
mod http;

sdk::main!(main);

fn main() -> u64 {
    let state = http::setup();
    sdk::log!("http: {} coverage guards", sdk::cov::guards());
    sdk::snapshot_here().unwrap_or_else(|_| sdk::crash("snapshot_here refused"));
    let input = sdk::input(16 << 10);
    match http::run(&state, &input) {
        Ok(status) => status,
        Err(why) => sdk::crash(why),
    }
}
