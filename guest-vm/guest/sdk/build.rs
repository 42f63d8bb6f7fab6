//! Hands the guest linker script to this crate's examples and (as `DEP_GUEST_SDK_LINKER_SCRIPT`)
//! to the build script of a guest crate that depends on the SDK (see guest/ABI.md, "Building
//! your own guest").
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it");
    let ld = format!("{dir}/linker.ld");
    println!("cargo:rerun-if-changed={ld}");
    println!("cargo:rustc-link-arg-examples=-Wl,-T,{ld}");
    println!("cargo:linker_script={ld}");
}
