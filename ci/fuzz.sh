#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, cargo-fuzz + libFuzzer with AddressSanitizer) for a bounded
# time over its committed corpus, and fails on any crash, leak or timeout. Installs cargo-fuzz
# when it is missing (nothing is skipped).
#
# Knobs: FUZZ_SECONDS (per target, default 30), FUZZ_TARGETS (default: all four),
# FUZZ_SANITIZER (default address; `none` if ASan cannot link on the toolchain).
# New inputs found during the run go to a scratch corpus, never into fuzz/corpus/.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH="${FUZZ_SECONDS:-30}"
TARGETS="${FUZZ_TARGETS:-ept_decode ept_table vmar_model virtio_blk}"
SANITIZER="${FUZZ_SANITIZER:-address}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

declare -A MAX_LEN=([ept_decode]=32 [ept_table]=2048 [vmar_model]=2048 [virtio_blk]=512)

cd fuzz
echo "== fuzz: building targets (sanitizer: $SANITIZER)"
nice -n 10 cargo fuzz build -s "$SANITIZER"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for t in $TARGETS; do
    mkdir -p "$scratch/$t"
    echo "== fuzz: $t for ${SECONDS_EACH}s"
    log="$scratch/$t.log"
    # -timeout: one input taking over 10 s is a hang; -rss_limit_mb bounds memory.
    if ! nice -n 10 cargo fuzz run -s "$SANITIZER" "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -max_len="${MAX_LEN[$t]}" -len_control=0 -timeout=10 \
        -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "FAIL: fuzz target $t crashed (reproducer in fuzz/artifacts/$t/)"
        exit 1
    fi
    grep -E "^stat::(number_of_executed_units|average_exec_per_sec)|^Done" "$log" || true
done
echo "== fuzz: every target ran ${SECONDS_EACH}s without a crash"
