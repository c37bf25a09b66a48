#!/usr/bin/env bash
# Make sure a RabbitMQ broker is reachable for local runs and tests.
#
# Sourced by deploy/local/run.sh and deploy/local/test.sh, which then call
# `ensure_broker`; running this file directly calls it for you.
#
#   AMQP_URL  broker to use (default amqp://guest:guest@127.0.0.1:5672/%2f).
#             May hold several comma-separated URLs; the first one is checked.
#
# If the broker answers, it is used as is. Otherwise, and only for the default
# local node (127.0.0.1 / localhost, port 5672), rabbitmq-server is
# installed (root only, via apt-get) and started. Any other unreachable broker
# is an error: we never start nodes on other hosts or ports.
#
# The stock configuration lets the `guest` user log in from loopback only,
# which is exactly what the local default URL needs; nothing is changed there.
#
# On success AMQP_URL is exported, plus AMQP_HOST / AMQP_PORT (unless already
# set) for tests/interop/tutorial_*.py.
set -euo pipefail

: "${AMQP_URL:=amqp://guest:guest@127.0.0.1:5672/%2f}"

# Seconds to wait for a freshly started node to open its port.
: "${BROKER_START_TIMEOUT_S:=90}"
# Seconds to keep retrying a port that accepts TCP but stays silent.
: "${BROKER_SILENT_TIMEOUT_S:=10}"

_broker_log() { printf 'broker: %s\n' "$*" >&2; }

# Split the first URL of AMQP_URL into BROKER_SCHEME, BROKER_HOST, BROKER_PORT.
_broker_parse_url() {
    local url rest authority hostport
    url=${AMQP_URL%%,*}
    # trim surrounding whitespace ("url1, url2")
    url=${url#"${url%%[![:space:]]*}"}
    url=${url%"${url##*[![:space:]]}"}
    if [[ $url == *://* ]]; then
        BROKER_SCHEME=${url%%://*}
        rest=${url#*://}
    else
        BROKER_SCHEME=amqp
        rest=$url
    fi
    BROKER_SCHEME=${BROKER_SCHEME,,}
    authority=${rest%%[/?#]*}
    hostport=${authority##*@}          # drop user:pass@
    BROKER_PORT=
    if [[ $hostport == \[* ]]; then    # [ipv6]:port
        BROKER_HOST=${hostport%%]*}
        BROKER_HOST=${BROKER_HOST#[}
        rest=${hostport#*]}
        [[ $rest == :* ]] && BROKER_PORT=${rest#:}
    elif [[ $hostport == *:* ]]; then
        BROKER_HOST=${hostport%%:*}
        BROKER_PORT=${hostport#*:}
    else
        BROKER_HOST=$hostport
    fi
    [[ -n $BROKER_HOST ]] || BROKER_HOST=localhost
    if [[ -z $BROKER_PORT ]]; then
        if [[ $BROKER_SCHEME == amqps ]]; then BROKER_PORT=5671; else BROKER_PORT=5672; fi
    fi
    if ! [[ $BROKER_PORT =~ ^[0-9]+$ ]]; then
        _broker_log "cannot parse a port out of AMQP_URL ($url)"
        return 1
    fi
}

# Plain TCP connect, 2 s budget.
_broker_tcp_open() {
    # shellcheck disable=SC2016  # expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# TCP connect and, for plain amqp, send the AMQP 0-9-1 protocol header and
# expect a method frame (type 0x01, connection.start) back. A broker that does
# not speak 0-9-1 answers with its own "AMQP..." header instead. (The broker
# logs the abandoned connection as closed abruptly; that is harmless.)
# Sets BROKER_REPLY to the first reply byte in hex ("" if none came).
_broker_ready() {
    local host=$1 port=$2
    BROKER_REPLY=
    if [[ $BROKER_SCHEME == amqps ]]; then
        _broker_tcp_open "$host" "$port"   # TLS: a TCP connect is all we check
        return
    fi
    # shellcheck disable=SC2016  # expanded by the inner bash
    BROKER_REPLY=$(timeout 2 bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        printf "AMQP\x00\x00\x09\x01" >&3 || exit 1
        head -c 1 <&3 | od -An -tx1 | tr -d " \n"
    ' _ "$host" "$port" 2>/dev/null) || true
    [[ $BROKER_REPLY == 01 ]]
}

_broker_is_local() {
    case $1 in
        127.0.0.1 | localhost) return 0 ;;
        *) return 1 ;;
    esac
}

_broker_find() { # name -> path on PATH or in the sbin dirs
    local p
    if p=$(command -v "$1" 2>/dev/null); then printf '%s\n' "$p"; return 0; fi
    for p in /usr/sbin/"$1" /usr/local/sbin/"$1" /sbin/"$1"; do
        [[ -x $p ]] && { printf '%s\n' "$p"; return 0; }
    done
    return 1
}

_broker_dump_log() {
    local log
    # shellcheck disable=SC2012  # newest file; names are rabbit's own
    log=$(ls -t /var/log/rabbitmq/*.log 2>/dev/null | head -n 1 || true)
    if [[ -n $log ]]; then
        _broker_log "last 50 lines of $log:"
        tail -n 50 "$log" >&2 || true
    else
        _broker_log "no log found in /var/log/rabbitmq/"
    fi
}

_broker_install() {
    if [[ $(id -u) -ne 0 ]]; then
        _broker_log "rabbitmq-server is not installed and we are not root, so it cannot be installed here."
        _broker_log "install and start it yourself, e.g.:"
        _broker_log "    sudo apt-get update && sudo apt-get install -y rabbitmq-server"
        _broker_log "    sudo service rabbitmq-server start"
        _broker_log "or point AMQP_URL at a reachable broker."
        return 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        _broker_log "rabbitmq-server is not installed and apt-get is unavailable; install RabbitMQ manually or set AMQP_URL"
        return 1
    fi
    _broker_log "installing rabbitmq-server with apt-get"
    apt-get update || { _broker_log "apt-get update failed"; return 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server \
        || { _broker_log "apt-get install rabbitmq-server failed"; return 1; }
}

# Wait up to $3 seconds (wall clock) for the broker to answer.
_broker_wait() {
    local host=$1 port=$2 deadline=$((SECONDS + $3))
    while ((SECONDS < deadline)); do
        _broker_ready "$host" "$port" && return 0
        sleep 1
    done
    _broker_ready "$host" "$port"
}

_broker_start_local() {
    local host=$1 port=$2 server ctl
    if ! server=$(_broker_find rabbitmq-server); then
        _broker_install || return 1
        server=$(_broker_find rabbitmq-server) || {
            _broker_log "rabbitmq-server still not found after installation"
            return 1
        }
        # The package's postinst may have started the node already.
        if _broker_wait "$host" "$port" 5; then
            _broker_log "started by the package installation"
            return 0
        fi
    fi

    # A node may already run with a listener that does not cover host:port
    # (e.g. bound to another address): starting a second one cannot help.
    if ctl=$(_broker_find rabbitmqctl) && timeout 30 "$ctl" -q ping >/dev/null 2>&1; then
        _broker_log "a local RabbitMQ node is running, but $host:$port does not reach it;"
        _broker_log "check its listeners ('rabbitmq-diagnostics listeners') or set AMQP_URL accordingly"
        return 1
    fi

    _broker_log "starting RabbitMQ: $server -detached"
    if ! "$server" -detached; then
        _broker_log "'rabbitmq-server -detached' failed; trying 'service rabbitmq-server start'"
        if command -v service >/dev/null 2>&1; then
            service rabbitmq-server start || _broker_log "'service rabbitmq-server start' failed"
        else
            _broker_log "no 'service' command either"
        fi
    fi

    _broker_log "waiting up to ${BROKER_START_TIMEOUT_S}s for $host:$port"
    if ! _broker_wait "$host" "$port" "$BROKER_START_TIMEOUT_S"; then
        _broker_log "RabbitMQ did not come up on $host:$port"
        _broker_dump_log
        return 1
    fi
    if ctl=$(_broker_find rabbitmqctl); then
        if ! timeout 60 "$ctl" await_startup >/dev/null; then
            _broker_log "'rabbitmqctl await_startup' failed"
            _broker_dump_log
            return 1
        fi
    fi
}

ensure_broker() {
    _broker_parse_url || return 1
    local host=$BROKER_HOST port=$BROKER_PORT

    if _broker_ready "$host" "$port"; then
        _broker_log "using $host:$port"
    elif [[ -n $BROKER_REPLY ]]; then
        _broker_log "$host:$port answers, but not as an AMQP 0-9-1 broker (first reply byte 0x$BROKER_REPLY); check AMQP_URL"
        return 1
    elif _broker_tcp_open "$host" "$port"; then
        # Accepts connections but stays silent: an overloaded broker, or some
        # other service. (RabbitMQ opens its listener only once booted.) Give
        # it a little time, but never start a second node next to it.
        _broker_log "$host:$port accepts connections but does not answer the AMQP greeting; retrying for ${BROKER_SILENT_TIMEOUT_S}s"
        if ! _broker_wait "$host" "$port" "$BROKER_SILENT_TIMEOUT_S"; then
            _broker_log "$host:$port is open but never answered as an AMQP 0-9-1 broker; check AMQP_URL"
            return 1
        fi
        _broker_log "using $host:$port"
    elif ! _broker_is_local "$host"; then
        _broker_log "cannot reach $host:$port (from AMQP_URL); only a local broker on 127.0.0.1:5672 is started automatically"
        return 1
    elif [[ $port != 5672 || $BROKER_SCHEME == amqps ]]; then
        _broker_log "nothing listens on $host:$port (from AMQP_URL)."
        _broker_log "only the default local node (amqp on port 5672) is started automatically;"
        _broker_log "start your broker on port $port yourself, or unset AMQP_URL to use the default node."
        return 1
    else
        _broker_log "no broker on $host:$port; starting the local node"
        _broker_start_local "$host" "$port" || return 1
        _broker_log "using $host:$port"
    fi

    export AMQP_URL
    export AMQP_HOST="${AMQP_HOST:-$host}"
    export AMQP_PORT="${AMQP_PORT:-$port}"
}

# Run directly (not sourced): just ensure the broker.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    ensure_broker || exit 1
fi
