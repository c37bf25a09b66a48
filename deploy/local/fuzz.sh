#!/usr/bin/env bash
# The fuzz targets of fuzz/ (cargo fuzz, libFuzzer), a short run of each: what a delivery
# can carry into the daemon's decision, and what a reply can carry into the client.
#
#   deploy/local/fuzz.sh                 # FUZZ_SECS (default 30) per target
#   FUZZ_SECS=600 deploy/local/fuzz.sh   # a longer hunt
#
# Built optimized with debug assertions and overflow checks (cargo fuzz's default). Needs a
# nightly toolchain (cargo fuzz instruments with -Z flags) and cargo-fuzz, installed
# from crates.io when missing. New inputs go to a scratch corpus, so the repository's
# fuzz/corpus stays as committed; a crash stops the run with the input's path
# (fuzz/artifacts/TARGET/crash-*): copy it into fuzz/regressions/TARGET/, where the unit
# tests of src/fuzzing.rs replay it on every test run, and fix the bug.
set -euo pipefail
cd "$(dirname "$0")/../.."

secs=${FUZZ_SECS:-30}
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz: no nightly toolchain (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz from crates.io"
    cargo install --locked cargo-fuzz
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in delivery reply; do
    mkdir -p "$scratch/$target"
    echo "fuzz: $target for ${secs}s"
    log="$scratch/$target.log"
    if ! cargo +nightly fuzz run "$target" "$scratch/$target" "fuzz/corpus/$target" \
        -- -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
        tail -60 "$log" >&2
        echo "fuzz: $target failed (a crash leaves its input in fuzz/artifacts/$target/)" >&2
        exit 1
    fi
    grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::new_units_added)' "$log" || true
done
echo "fuzz: no failure"
