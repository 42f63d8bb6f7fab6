#!/usr/bin/env bash
# Miri (undefined-behaviour checker) on the pure host-testable parts: the vmo unit tests (the
# region tree `vmar/tree.rs`, the page set `vmo/pages.rs`) and the ept table walker over
# `HeapPhysMem` (the golden-layout tests and the deterministic large-page split
# test of tests/model.rs; the proptest cases and tests/errors.rs are too slow under Miri). Installs the component
# when it is missing (nothing is skipped). Bounded: about a minute on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo miri --version >/dev/null 2>&1; then
    echo "== installing miri"
    rustup component add miri rust-src
fi
cargo miri setup >/dev/null

echo "== miri: vmo unit tests (region tree, page set)"
cargo miri test -p vmo --lib --locked
echo "== miri: ept table walker (golden layouts, large-page splits)"
cargo miri test -p ept --locked --test golden
cargo miri test -p ept --locked --test model large_page_splits
