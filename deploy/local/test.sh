#!/usr/bin/env bash
# Full local check: formatting, clippy, build, tests (unit, integration,
# interop with the Python tutorial scripts, doc tests).
#
#   deploy/local/test.sh [test filter / extra test-runner args...]
#
# The checks and doc tests run once; the test suite runs once per broker in
# AMQP_RPC_TEST_BROKERS (default "3.10 4.3"), one after the other:
#   3.10  the host's RabbitMQ (ensured via deploy/local/broker.sh; AMQP_URL
#         overrides), its private test nodes booted from the host's install;
#   4.3   RabbitMQ 4.3 in a debootstrap folder (deploy/local/rabbitmq4.sh:
#         built on first use, about half a minute; needs root), a shared node on
#         127.0.0.1:5674 and the private test nodes booted in the folder too.
# Every process started in the folder is stopped when this script exits.
#
# Needs python3 with pika (installed with pip if missing) and, for the other
# languages' interop tests, what deploy/local/interop-deps.sh installs.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

step() { printf '\n==================== %s ====================\n' "$*"; }
banner() {
    printf '\n####################################################################\n'
    printf '####  %s\n' "$*"
    printf '####################################################################\n'
}

: "${AMQP_RPC_TEST_BROKERS:=3.10 4.3}"
read -r -a brokers <<<"$AMQP_RPC_TEST_BROKERS"
for b in "${brokers[@]}"; do
    case $b in
        3.10 | 4.3) ;;
        *)
            echo "AMQP_RPC_TEST_BROKERS: unknown broker '$b' (known: 3.10 4.3)" >&2
            exit 2
            ;;
    esac
done
if [ ${#brokers[@]} -eq 0 ]; then
    echo "AMQP_RPC_TEST_BROKERS is empty (known: 3.10 4.3)" >&2
    exit 2
fi
export RUST_BACKTRACE=1

# The brokers are checked first, so one that cannot run fails the run before
# minutes of clippy and builds. The host's 3.10 is never started or stopped
# here unless broker.sh finds no broker at all; its environment is kept for
# its pass.
if [[ " ${brokers[*]} " == *" 3.10 "* ]]; then
    step "broker 3.10 (the host's RabbitMQ)"
    # shellcheck source=deploy/local/broker.sh
    source deploy/local/broker.sh
    ensure_broker || exit 1
    env_310=(AMQP_URL="$AMQP_URL" AMQP_HOST="$AMQP_HOST" AMQP_PORT="$AMQP_PORT")
fi
if [[ " ${brokers[*]} " == *" 4.3 "* ]]; then
    step "broker 4.3 (chroot folder, deploy/local/rabbitmq4.sh)"
    # shellcheck source=deploy/local/rabbitmq4.sh
    source deploy/local/rabbitmq4.sh
    # Whatever happens from here on (failure, Ctrl-C, success), nothing keeps
    # running in the folder: the shared node, private test nodes a killed test
    # left behind, their epmd. INT/TERM go through exit so the trap runs.
    trap rabbitmq4_stop EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    # The folder is built (about half a minute, once) and prepared now; its node
    # boots only for its own pass, so the 3.10 pass (and its memory test) runs
    # without an idle 4.3 node next to it.
    t0=$SECONDS
    rabbitmq4_build || exit 1
    rabbitmq4_prepare || exit 1
    echo "rabbitmq4: $RABBITMQ4_ROOT ready after $((SECONDS - t0)) s"
fi

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

# The tutorials' RPC programs in Perl, Node, PHP, Ruby and Go (tests/interop_langs.rs):
# their runtimes and AMQP libraries, from Debian and npm, only what is missing.
step "interop runtimes (perl, node, php, ruby, go)"
deploy/local/interop-deps.sh

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo build --bins"
cargo build --bins

step "deploy artifacts (Kubernetes, systemd, Docker, Grafana)"
deploy/validate.sh

if cargo nextest --version >/dev/null 2>&1; then
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
fi

# One pass of the suite against the broker whose environment the caller put in
# place; returns non-zero if anything failed. (It runs as an `if` condition,
# where `set -e` is off: every status is checked by hand.)
run_suite() {
    local status=0
    if cargo nextest --version >/dev/null 2>&1; then
        if [ $# -eq 0 ]; then
            # Memory is measured on a quiet machine, like a benchmark: alone, before the rest.
            step "cargo nextest run -E 'binary(memory)' (alone)"
            cargo nextest run -E 'binary(memory)' || status=1
            # The cluster tests boot three private RabbitMQ nodes each (never the shared one);
            # .config/nextest.toml runs them one at a time, next to the rest of the suite.
            step "cargo nextest run --no-fail-fast -E 'not binary(memory)'"
            cargo nextest run --no-fail-fast -E 'not binary(memory)' || status=1
        else
            step "cargo nextest run --no-fail-fast $*"
            cargo nextest run --no-fail-fast "$@" || status=1
        fi
    else
        step "cargo test --no-fail-fast $* (cargo-nextest not installed)"
        cargo test --no-fail-fast "$@" || status=1
    fi
    return $status
}

# Every selected broker gets its pass, even after another one failed: CI then
# shows all that broke, per broker. The run fails if any pass did.
unset NEXTEST_TEST_THREADS
results=()
failed=0
for b in "${brokers[@]}"; do
    banner "RabbitMQ $b"
    case $b in
        3.10) pass_env=("${env_310[@]}") ;;
        4.3)
            t0=$SECONDS
            rabbitmq4_start || exit 1
            echo "rabbitmq4: node up after $((SECONDS - t0)) s"
            pass_env=(
                AMQP_URL="$AMQP_URL" AMQP_HOST="$AMQP_HOST" AMQP_PORT="$AMQP_PORT"
                AMQP_RPC_TEST_RABBITMQ_ROOT="$AMQP_RPC_TEST_RABBITMQ_ROOT"
                AMQP_RPC_TEST_RABBITMQ_EPMD_PORT="$AMQP_RPC_TEST_RABBITMQ_EPMD_PORT"
            )
            ;;
    esac
    echo "${pass_env[0]}"
    t0=$SECONDS
    if (
        # 3.10's pass must not see 4.3's folder (its private nodes would boot there).
        unset AMQP_RPC_TEST_RABBITMQ_ROOT AMQP_RPC_TEST_RABBITMQ_EPMD_PORT
        export "${pass_env[@]}"
        run_suite "$@"
    ); then
        results+=("RabbitMQ $b: passed ($((SECONDS - t0)) s)")
    else
        results+=("RabbitMQ $b: FAILED ($((SECONDS - t0)) s)")
        failed=1
    fi
    if [[ $b == 4.3 ]]; then
        # Also ends private nodes a killed test left behind in the folder.
        rabbitmq4_stop
    fi
    banner "${results[-1]}"
done

# The fuzz targets, a short run each (deploy/local/fuzz.sh; FUZZ_SECS, default 30).
if [ $# -eq 0 ]; then
    banner "fuzz"
    if deploy/local/fuzz.sh; then
        results+=("fuzz: no failure in ${FUZZ_SECS:-30} s per target")
    else
        results+=("fuzz: FAILED")
        failed=1
    fi
fi

step "summary"
printf '%s\n' "${results[@]}"
if [ $failed -ne 0 ]; then
    exit 1
fi
step "all checks passed"
