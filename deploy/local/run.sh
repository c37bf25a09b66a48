#!/usr/bin/env bash
# Build and run amqp-rpcd locally, in the foreground, against a local RabbitMQ.
#
#   deploy/local/run.sh [extra amqp-rpcd args...]
#
# AMQP_URL (optional) overrides the broker URL of config.toml; when unset the
# shipped config applies and the default local broker is ensured.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

# Remember whether the user chose the broker before broker.sh sets a default.
user_amqp_url=${AMQP_URL+set}

# shellcheck source=deploy/local/broker.sh
source deploy/local/broker.sh
ensure_broker || exit 1

echo "==> cargo build --release --bins"
cargo build --release --bins

if [[ -n $user_amqp_url ]]; then
    export AMQP_RPC__AMQP__URL="$AMQP_URL"
fi

cat <<'USAGE'

==> amqp-rpcd is starting in the foreground (Ctrl-C to stop). From another shell:

    target/release/amqp-rpc call fib 30
    target/release/amqp-rpc bench --concurrency 8 --duration 10s
    curl -s http://127.0.0.1:9090/metrics      # Prometheus metrics

USAGE

exec target/release/amqp-rpcd --config config.toml "$@"
