#!/usr/bin/env bash
# Soak (issue 16): amqp-rpcd and `amqp-rpc bench` at moderate load for SOAK_MINUTES (30),
# with every connection to the broker cut every CUT_SECS (60) and the broker restarted
# (stop_app / start_app) every RESTART_MINUTES (10). It runs on the RabbitMQ 4.3 node of
# deploy/local/rabbitmq4.sh (its own folder and ports: the host's broker is never touched).
# Every 10 s it prints the RSS of both processes; at the end the bench's JSON: every call
# accounted for, by outcome. A script, not a CI test: it takes half an hour.
#
#   cargo build --release --bins && bench/soak.sh
#   SOAK_MINUTES=3 CUT_SECS=20 RESTART_MINUTES=2 bench/soak.sh     # a short look
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${SOAK_MINUTES:-30}
cut=${CUT_SECS:-60}
restart=${RESTART_MINUTES:-10}
concurrency=${SOAK_CONCURRENCY:-8}

# shellcheck source=deploy/local/rabbitmq4.sh
source deploy/local/rabbitmq4.sh
trap rabbitmq4_stop EXIT
rabbitmq4_start
queue=soak_$$
AMQP_RPC__AMQP__URL=$AMQP_URL AMQP_RPC__SERVICE__QUEUE=$queue AMQP_RPC__HTTP__LISTEN=127.0.0.1:0 \
    AMQP_RPC__AMQP__RECONNECT_MAX_BACKOFF_SECS=2 target/release/amqp-rpcd >/tmp/soak-rpcd.log 2>&1 &
rpcd=$!
sleep 2
# fib is idempotent: calls cut mid-flight are retried within their 5 s deadline.
target/release/amqp-rpc bench --url "$AMQP_URL" --queue "$queue" --concurrency "$concurrency" \
    --duration "${minutes}m" --json >/tmp/soak-bench.json 2>/tmp/soak-bench.log &
bench=$!
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
start=$SECONDS
last_cut=$SECONDS
last_restart=$SECONDS
echo "t(s) rpcd_rss_kib bench_rss_kib event"
while kill -0 "$bench" 2>/dev/null; do
    sleep 10
    t=$((SECONDS - start))
    event=""
    if ((SECONDS - last_restart >= restart * 60)) && ((t < minutes * 60 - 30)); then
        rabbitmq4_ctl stop_app >/dev/null && rabbitmq4_ctl start_app >/dev/null
        last_restart=$SECONDS
        last_cut=$SECONDS
        event="broker restarted"
    elif ((SECONDS - last_cut >= cut)); then
        rabbitmq4_ctl close_all_connections "soak: cut" >/dev/null || true
        last_cut=$SECONDS
        event="connections cut"
    fi
    echo "$t $(rss $rpcd) $(rss $bench) $event"
done
wait "$bench" || true
kill "$rpcd" 2>/dev/null || true
wait "$rpcd" 2>/dev/null || true
echo "bench: $(tail -1 /tmp/soak-bench.json)"
