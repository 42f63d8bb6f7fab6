#!/usr/bin/env bash
# Installs what the build and the tests need. Idempotent; safe to run on every CI run.
set -euo pipefail
cd "$(dirname "$0")/.."

# The toolchain rust-toolchain.toml names must be installed (it cannot be downloaded here).
if ! cargo --version >/dev/null 2>&1; then
    echo "setup: cargo with the toolchain from rust-toolchain.toml is not usable" >&2
    exit 1
fi

need_pkgs=()
for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "setup: installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_pkgs[@]}"
fi
