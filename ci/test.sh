#!/usr/bin/env bash
# The project's test command: installs what the suite needs on a fresh machine of this kind
# (Debian 12, root, rustup with the nightly toolchain) and runs the whole suite.
# It fails (non-zero exit) as soon as any step or test fails; nothing is skipped silently.
set -euo pipefail
cd "$(dirname "$0")/.."

ci/setup.sh

echo "== host workspace: build, lint-free check of the hw (privileged) feature, tests"
cargo build --workspace --all-targets --locked
cargo check -p ept --features hw --locked
cargo test --workspace --locked
