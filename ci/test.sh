#!/usr/bin/env bash
# The project's test command: installs what the suite needs on a fresh machine of this kind
# (Debian 12, root, rustup with the nightly toolchain) and runs the whole suite.
# It fails (non-zero exit) as soon as any step or test fails; nothing is skipped silently.
set -euo pipefail
cd "$(dirname "$0")/.."

# Everything the suite needs, so that nothing in it is skipped here: emulators and ISO tools for
# the bare-metal hypervisor boot test (tests/tests/hv_boot.rs → ci/hv-test.sh); AFL++ (afl-fuzz and
# its runtime object, which guest-vm's build.rs links into the fuzz bench's AFL++ harnesses, so it
# must be installed before the build) for the bench's fuzz-execs-*-aflpp rows and their test.
ci/setup.sh qemu-system-x86 bochs bochsbios vgabios bochs-term grub-pc-bin grub-common xorriso mtools bc cpio afl++

# In CI a test that would skip (no emulator, no /dev/kvm, not root) fails instead.
export GUESTMEM_REQUIRE_KVM=1 GUESTMEM_REQUIRE_EMULATORS=1

echo "== host workspace: build, clippy (every unsafe block documented), the hw (privileged) feature, tests"
cargo build --workspace --all-targets --locked
# The workspace denies clippy::undocumented_unsafe_blocks (Cargo.toml); hv's own clippy run is in
# ci/build-hv.sh (called by the hv_boot test).
cargo clippy --workspace --all-targets --locked
cargo clippy -p ept --features hw --locked
cargo test --workspace --locked

# Issue 16 reliability runs: the million-operation Vmar model run and the failure-injection
# sweeps (release), Miri on the pure parts, then every fuzz target for FUZZ_SECONDS each.
{ cargo test --release --locked -p conformance --test model_million --test inject && ci/miri.sh && ci/fuzz.sh; } || exit 1

# Issue 16 interleavings and soak: the shuttle exploration of the real vmo locks (random + PCT
# schedulers, GUESTMEM_SHUTTLE_ITERS executions each), the same for guest-vm's fault-thread /
# userfaultfd protocol with two vCPUs and the host (GUESTMEM_UFFD_SHUTTLE_ITERS each, ~5 s; its
# run is bounded to 30 s after the build), the 4-thread stress (GUESTMEM_STRESS_SECS), and the
# KVM soak (64 children x 100 fork/run/reset cycles with injected refusals and pager errors).
# About 2.5 minutes together on 2 cores, builds included.
{ GUESTMEM_SHUTTLE_ITERS=${GUESTMEM_SHUTTLE_ITERS:-4000} \
    cargo test --release --locked -p vmo --features shuttle --test interleave \
  && cargo test --release --locked -p guest-vm --features shuttle --test uffd_interleave --no-run \
  && GUESTMEM_SHUTTLE_ITERS=${GUESTMEM_UFFD_SHUTTLE_ITERS:-20000} timeout 30 \
    cargo test --release --locked -p guest-vm --features shuttle --test uffd_interleave -- --nocapture \
  && GUESTMEM_STRESS_SECS=${GUESTMEM_STRESS_SECS:-10} cargo test --release --locked -p vmo --test stress \
  && cargo test --release --locked -p conformance --test kvm_soak -- --nocapture; } || exit 1
