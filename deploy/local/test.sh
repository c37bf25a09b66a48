#!/usr/bin/env bash
# Full local check: formatting, clippy, build, tests (unit, integration,
# interop with the Python tutorial scripts, doc tests).
#
#   deploy/local/test.sh [test filter / extra test-runner args...]
#
# Needs a RabbitMQ broker (ensured via deploy/local/broker.sh; AMQP_URL
# overrides) and python3 with pika (installed with pip if missing).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

step() { printf '\n==================== %s ====================\n' "$*"; }

step "broker"
# shellcheck source=deploy/local/broker.sh
source deploy/local/broker.sh
ensure_broker || exit 1
export AMQP_URL
export RUST_BACKTRACE=1

step "python3 + pika"
if ! command -v python3 >/dev/null 2>&1; then
    echo "python3 is required for the interop tests (apt-get install -y python3 python3-pip)" >&2
    exit 1
fi
if python3 -c 'import pika' 2>/dev/null; then
    echo "pika $(python3 -c 'import pika; print(pika.__version__)') already installed"
else
    pika_req='pika>=1.3,<2'
    if ! pip_out=$(python3 -m pip install --quiet "$pika_req" 2>&1); then
        if grep -q externally-managed-environment <<<"$pip_out"; then
            echo "pip refused (externally-managed-environment); retrying with --break-system-packages"
            python3 -m pip install --quiet --break-system-packages "$pika_req"
        else
            printf '%s\n' "$pip_out" >&2
            echo "could not install $pika_req with pip" >&2
            exit 1
        fi
    fi
    python3 -c 'import pika; print("pika", pika.__version__, "installed")'
fi

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo build --bins"
cargo build --bins

step "deploy artifacts (Kubernetes, systemd, Docker, Grafana)"
deploy/validate.sh

if cargo nextest --version >/dev/null 2>&1; then
    unset NEXTEST_TEST_THREADS
    # Doc tests first (nextest does not run them), so the run closes on nextest's summary.
    # Arguments are forwarded only when they are plain name filters `cargo test` understands.
    doc_args=("$@")
    for arg in "$@"; do
        if [[ $arg == -* ]]; then
            echo "(runner options given; doc tests run without them)"
            doc_args=()
            break
        fi
    done
    step "cargo test --doc ${doc_args[*]}"
    cargo test --doc "${doc_args[@]}"

    if [ $# -eq 0 ]; then
        # Memory is measured on a quiet machine, like a benchmark: alone, before the rest.
        step "cargo nextest run -E 'binary(memory)' (alone)"
        cargo nextest run -E 'binary(memory)'
        # The cluster tests boot three private RabbitMQ nodes each (never the shared one);
        # .config/nextest.toml runs them one at a time, next to the rest of the suite.
        step "cargo nextest run --no-fail-fast -E 'not binary(memory)'"
        cargo nextest run --no-fail-fast -E 'not binary(memory)'
    else
        step "cargo nextest run --no-fail-fast $*"
        cargo nextest run --no-fail-fast "$@"
    fi
else
    step "cargo test --no-fail-fast $* (cargo-nextest not installed)"
    cargo test --no-fail-fast "$@"
fi

step "all checks passed"
