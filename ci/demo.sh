#!/usr/bin/env bash
# The README's first command: runs the project's main job, `guest-vm demo`, on a fresh machine
# of this kind (Debian 12, root, /dev/kvm, rustup with the toolchain rust-toolchain.toml names).
# It boots the key-value store guest under KVM, snapshots it, forks concurrent children, checks
# isolation and reset, and prints a report ending in a VERDICT line; the exit status is the
# verdict. Extra arguments go to `guest-vm demo` (e.g. `ci/demo.sh --children 8 --json`).
set -euo pipefail
cd "$(dirname "$0")/.."

# Nothing beyond the Rust toolchain is needed: the guest program is built by guest-vm/build.rs
# with the host rustc, and every crate comes from crates.io through cargo.
ci/setup.sh

if [ "$(id -u)" -ne 0 ]; then
    echo "demo: must run as root (KVM guests here need /dev/kvm and kernel-mode userfaultfd)" >&2
    exit 1
fi
if [ ! -e /dev/kvm ]; then
    echo "demo: /dev/kvm is missing: this machine cannot run KVM guests" >&2
    exit 1
fi

exec cargo run --release --locked -p guest-vm -- demo "$@"
