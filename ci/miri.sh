#!/usr/bin/env bash
# Miri (undefined-behaviour checker) on the pure host-testable parts: the vmo unit tests (the
# region tree `vmar/tree.rs`, the page set `vmo/pages.rs`) and the ept table walker over
# `HeapPhysMem` (tests/golden.rs: map, split, protect, walk at every level; the proptest model,
# tests/errors.rs, the 1 GiB split test and the accessed/dirty harvest cases (2 MiB leaves: 512
# entries walked per step) take minutes each under Miri, so they stay out; the normal suite runs
# them).
# Installs the component when it is missing (nothing is skipped). About 2.5 minutes on 2
# cores, builds included.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo miri --version >/dev/null 2>&1; then
    echo "== installing miri"
    rustup component add miri rust-src
fi
cargo miri setup >/dev/null

echo "== miri: vmo unit tests (region tree, page set)"
cargo miri test -p vmo --lib --locked
echo "== miri: ept table walker (golden layouts over HeapPhysMem)"
cargo miri test -p ept --locked --test golden -- \
    --skip large_leaf_harvest_splits_at_the_range_ends --skip accessed_dirty_bits \
    --skip ept_without_ad_never_sets_or_harvests_dirty
