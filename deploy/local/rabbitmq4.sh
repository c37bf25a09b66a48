#!/usr/bin/env bash
# RabbitMQ 4.3 for the test suite, next to the host's own RabbitMQ (Debian 12 ships 3.10).
#
# Debian 12 has no RabbitMQ 4 package and there is no container engine here, so 4.3 runs from
# a folder made by debootstrap with Debian testing (forky), whose rabbitmq-server is 4.3 with
# its own Erlang. Nodes run in it with chroot(1), as the folder's own `rabbitmq` user, on ports
# of their own and with their own epmd: the host's epmd (4369) and node (5672) belong to 3.10,
# and nothing here ever touches them.
#
# Sourced by deploy/local/test.sh; also runnable directly:
#
#   deploy/local/rabbitmq4.sh build|prepare|start|stop|status
#
#   source deploy/local/rabbitmq4.sh
#   rabbitmq4_start        # build the folder if missing, prepare it, boot the shared node
#   rabbitmq4_stop         # stop every process running in the folder, unmount its proc
#
# Settings (environment):
#   RABBITMQ4_ROOT       the folder (default /var/cache/amqp-rpc/rabbitmq-forky)
#   RABBITMQ4_PORT       AMQP port of the shared node (default 5674)
#   RABBITMQ4_DIST_PORT  its Erlang distribution port (default 25674)
#   RABBITMQ4_EPMD_PORT  the folder's epmd, shared by every node in it (default 4374)
#
# After rabbitmq4_start: AMQP_URL, AMQP_HOST and AMQP_PORT name the shared node, and
# AMQP_RPC_TEST_RABBITMQ_ROOT / AMQP_RPC_TEST_RABBITMQ_EPMD_PORT make tests/common/broker.rs
# boot its private nodes in the folder too. Needs root (debootstrap, mount, chroot).
#
# Never bind-mount the host's /dev into the folder: removing the folder would then remove the
# host's device nodes. The folder gets device nodes of its own (mknod) and a proc mount that
# rabbitmq4_stop takes away again.
set -euo pipefail

: "${RABBITMQ4_ROOT:=/var/cache/amqp-rpc/rabbitmq-forky}"
: "${RABBITMQ4_PORT:=5674}"
: "${RABBITMQ4_DIST_PORT:=25674}"
: "${RABBITMQ4_EPMD_PORT:=4374}"
# Seconds the shared node may take to boot (a cold boot on 2 busy cores: ~10 s).
: "${RABBITMQ4_BOOT_TIMEOUT_S:=90}"

# Debian 12's debootstrap has no script for forky; sid's works for any testing suite.
_RABBITMQ4_SUITE=forky
_RABBITMQ4_MIRROR=http://deb.debian.org/debian
_RABBITMQ4_SCRIPT=/usr/share/debootstrap/scripts/sid
# The shared node's name and its directory as the node sees it (inside the folder).
_RABBITMQ4_NODE=amqprpc-suite@localhost
_RABBITMQ4_NODE_DIR=/srv/amqp-rpc-suite

_rabbitmq4_log() { printf 'rabbitmq4: %s\n' "$*" >&2; }

# debootstrap, mknod, mount and chroot all need root.
_rabbitmq4_need_root() {
    if [[ $(id -u) -ne 0 ]]; then
        _rabbitmq4_log "$1 needs root (RabbitMQ 4.3 runs chrooted in $RABBITMQ4_ROOT)"
        return 1
    fi
}

# Whether $1 holds a finished debootstrap with rabbitmq-server installed. debootstrap installs
# packages last, so a folder it did not finish fails this.
_rabbitmq4_complete() {
    local dir=$1
    [[ -x $dir/usr/lib/rabbitmq/bin/rabbitmq-server && -x $dir/usr/bin/erl ]] || return 1
    grep -A1 -x 'Package: rabbitmq-server' "$dir/var/lib/dpkg/status" 2>/dev/null \
        | grep -qx 'Status: install ok installed'
}

# Mount points at or below $1 (from our mount table; paths here never hold spaces).
_rabbitmq4_mounts_under() {
    local dir
    dir=$(realpath -m "$1")
    awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo
}

# Remove a folder left by an interrupted build, but only with nothing mounted in it (an
# interrupted debootstrap may leave its proc/sys mounts behind) and never across file systems.
_rabbitmq4_remove() {
    local dir=$1 mounts
    mounts=$(_rabbitmq4_mounts_under "$dir")
    if [[ -n $mounts ]]; then
        _rabbitmq4_log "not removing $dir: still mounted there: $mounts"
        return 1
    fi
    rm -rf --one-file-system -- "$dir"
}

# Build the folder unless it is there. A build goes to a temporary name and is renamed into
# place only once complete, so a half-built folder is never used.
rabbitmq4_build() {
    local root=$RABBITMQ4_ROOT cache tmp old t0=$SECONDS
    if _rabbitmq4_complete "$root"; then
        return 0
    fi
    if [[ -e $root ]]; then
        _rabbitmq4_log "$root exists but is not a finished build; remove it first"
        return 1
    fi
    _rabbitmq4_need_root "building the folder" || return 1
    cache=$(dirname "$root")
    mkdir -p "$cache"
    # A finished build made by hand under the conventional temporary name (the command below):
    # adopt it instead of spending another half minute and ~100 MB of downloads.
    old=$cache/forky.tmp
    if [[ -z $(_rabbitmq4_mounts_under "$old") ]] && _rabbitmq4_complete "$old"; then
        _rabbitmq4_log "adopting the finished build $old as $root"
        mv -T -- "$old" "$root"
        return 0
    fi
    if ! command -v debootstrap >/dev/null 2>&1; then
        _rabbitmq4_log "installing debootstrap with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >/dev/null \
            || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >/dev/null; } \
            || { _rabbitmq4_log "could not install debootstrap"; return 1; }
    fi
    for old in "$root".build.*; do
        [[ -e $old ]] || continue
        _rabbitmq4_log "removing the interrupted build $old"
        _rabbitmq4_remove "$old" || return 1
    done
    tmp=$root.build.$$
    _rabbitmq4_log "building $root: debootstrap $_RABBITMQ4_SUITE with rabbitmq-server (about half a minute)"
    if ! debootstrap --variant=minbase --include=rabbitmq-server \
        "$_RABBITMQ4_SUITE" "$tmp" "$_RABBITMQ4_MIRROR" "$_RABBITMQ4_SCRIPT" >"$cache/debootstrap.log" 2>&1; then
        _rabbitmq4_log "debootstrap failed; the end of $cache/debootstrap.log:"
        tail -n 30 "$cache/debootstrap.log" >&2
        _rabbitmq4_remove "$tmp" || true
        return 1
    fi
    if ! _rabbitmq4_complete "$tmp"; then
        _rabbitmq4_log "debootstrap finished but $tmp has no installed rabbitmq-server"
        return 1
    fi
    mv -T -- "$tmp" "$root"
    _rabbitmq4_log "built $root in $((SECONDS - t0)) s"
}

# uid and gid of the folder's `rabbitmq` user, from its own passwd (the host's uid 101 is
# someone else). Sets _RABBITMQ4_UID and _RABBITMQ4_GID.
_rabbitmq4_user() {
    local line
    line=$(grep '^rabbitmq:' "$RABBITMQ4_ROOT/etc/passwd") \
        || { _rabbitmq4_log "no rabbitmq user in $RABBITMQ4_ROOT/etc/passwd"; return 1; }
    IFS=: read -r _ _ _RABBITMQ4_UID _RABBITMQ4_GID _ <<<"$line"
}

# What a node in the folder needs from the system: name resolution for localhost (node names
# are name@localhost), device nodes, /proc (memory and CPU detection, the CLI), and one Erlang
# cookie shared by every node and CLI run in the folder. Idempotent.
rabbitmq4_prepare() {
    local root=$RABBITMQ4_ROOT spec name type major minor cookie value
    _rabbitmq4_complete "$root" || { _rabbitmq4_log "$root is not built"; return 1; }
    _rabbitmq4_need_root "preparing the folder" || return 1
    _rabbitmq4_user || return 1
    if ! grep -qw localhost "$root/etc/hosts" 2>/dev/null; then
        printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
    fi
    # debootstrap usually creates these already; make sure, as real nodes (never bind mounts).
    for spec in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
        IFS=: read -r name major minor <<<"$spec"
        type=$(stat -c %F "$root/dev/$name" 2>/dev/null || true)
        if [[ $type != "character special file" ]]; then
            rm -f -- "$root/dev/$name"
            mknod -m 666 "$root/dev/$name" c "$major" "$minor"
        fi
    done
    if ! mountpoint -q "$root/proc"; then
        mount -t proc proc "$root/proc"
    fi
    # The package makes the cookie on install; make it here if not, before nodes boot in
    # parallel and race to create it.
    cookie=$root/var/lib/rabbitmq/.erlang.cookie
    if [[ ! -s $cookie ]]; then
        # (No `tr | head` pipe: under pipefail its SIGPIPE would fail the function.)
        value=$(LC_ALL=C tr -dc '[:upper:]' < <(head -c 4096 /dev/urandom))
        printf '%s' "${value:0:20}" >"$cookie"
        chown "$_RABBITMQ4_UID:$_RABBITMQ4_GID" "$cookie"
        chmod 400 "$cookie"
    fi
}

# The command line that runs a command in the folder as its rabbitmq user, with a clean
# environment plus NAME=VALUE pairs; set in _RABBITMQ4_CMD (an array, so that setsid can run
# it):  _rabbitmq4_cmd [NAME=VALUE...] -- COMMAND [ARGS...]
_rabbitmq4_cmd() {
    local envs=()
    while [[ $1 != -- ]]; do
        envs+=("$1")
        shift
    done
    shift
    _RABBITMQ4_CMD=(
        /usr/sbin/chroot --userspec="$_RABBITMQ4_UID:$_RABBITMQ4_GID" --groups="$_RABBITMQ4_GID"
        "$RABBITMQ4_ROOT" /usr/bin/env -i
        PATH=/usr/sbin:/usr/bin:/bin HOME=/var/lib/rabbitmq LC_ALL=C.UTF-8
        ERL_EPMD_PORT="$RABBITMQ4_EPMD_PORT" ERL_EPMD_ADDRESS=127.0.0.1
        "${envs[@]}" "$@"
    )
}

# `rabbitmqctl -n <shared node> ARGS...` from the folder.
rabbitmq4_ctl() {
    _rabbitmq4_user || return 1
    _rabbitmq4_cmd -- /usr/lib/rabbitmq/bin/rabbitmqctl -n "$_RABBITMQ4_NODE" "$@"
    "${_RABBITMQ4_CMD[@]}"
}

# An AMQP 0-9-1 handshake starts: the header goes out, connection.start (frame type 1) comes
# back. The listener opens last in a boot, so this means the node is up.
_rabbitmq4_amqp_ready() {
    local reply
    # shellcheck disable=SC2016  # expanded by the inner bash
    reply=$(timeout 2 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "AMQP\x00\x00\x09\x01" >&3 || exit 1
        head -c 1 <&3 | od -An -tx1 | tr -d " \n"
    ' _ "$1" 2>/dev/null) || true
    [[ $reply == 01 ]]
}

# PIDs of every process whose root is the folder: the nodes, epmd, CLI runs, anything.
rabbitmq4_pids() {
    local root pid
    root=$(realpath "$RABBITMQ4_ROOT")
    for pid in /proc/[0-9]*; do
        [[ $(readlink "$pid/root" 2>/dev/null) == "$root" ]] && printf '%s\n' "${pid#/proc/}"
    done
    return 0
}

# Build, prepare and boot the shared node (fresh data each time), and export what the suite
# needs. A node of ours already answering on the port is used as it is.
rabbitmq4_start() {
    local t0 host_dir log pids
    rabbitmq4_build || return 1
    rabbitmq4_prepare || return 1
    export AMQP_RPC_TEST_RABBITMQ_ROOT=$RABBITMQ4_ROOT
    export AMQP_RPC_TEST_RABBITMQ_EPMD_PORT=$RABBITMQ4_EPMD_PORT
    export AMQP_URL=amqp://guest:guest@127.0.0.1:$RABBITMQ4_PORT/%2f
    export AMQP_HOST=127.0.0.1 AMQP_PORT=$RABBITMQ4_PORT
    if _rabbitmq4_amqp_ready "$RABBITMQ4_PORT"; then
        pids=$(rabbitmq4_pids)
        if [[ -z $pids ]]; then
            _rabbitmq4_log "127.0.0.1:$RABBITMQ4_PORT answers, but not from $RABBITMQ4_ROOT; set RABBITMQ4_PORT"
            return 1
        fi
        _rabbitmq4_log "using the running node on 127.0.0.1:$RABBITMQ4_PORT"
        return 0
    fi
    host_dir=$RABBITMQ4_ROOT$_RABBITMQ4_NODE_DIR
    log=$host_dir/console.log
    # Fresh state each run, like a new broker: nothing left over from a previous suite.
    rm -rf --one-file-system -- "$host_dir"
    mkdir -p "$host_dir"
    # Explicit config files: the package's /etc/rabbitmq in the folder is not ours to rely on
    # (and the host's pins 5672). Guest keeps its loopback-only login, which is all we need.
    printf 'listeners.tcp.1 = 127.0.0.1:%s\nloopback_users.guest = true\n' "$RABBITMQ4_PORT" \
        >"$host_dir/rabbitmq.conf"
    printf '[].\n' >"$host_dir/advanced.config"
    : >"$host_dir/enabled_plugins"
    : >"$host_dir/rabbitmq-env.conf"
    chown -R "$_RABBITMQ4_UID:$_RABBITMQ4_GID" "$host_dir"
    _rabbitmq4_log "starting $_RABBITMQ4_NODE on 127.0.0.1:$RABBITMQ4_PORT (dist $RABBITMQ4_DIST_PORT, epmd $RABBITMQ4_EPMD_PORT), log in $log"
    t0=$SECONDS
    local d=$_RABBITMQ4_NODE_DIR
    # In a session of its own, so a Ctrl-C in our terminal does not reach it half-way;
    # rabbitmq4_stop finds it through the folder, not through a PID kept here.
    _rabbitmq4_cmd \
        RABBITMQ_NODENAME="$_RABBITMQ4_NODE" \
        RABBITMQ_DIST_PORT="$RABBITMQ4_DIST_PORT" \
        RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
        RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$d/mnesia" \
        RABBITMQ_LOG_BASE="$d/log" \
        RABBITMQ_PID_FILE="$d/pid" \
        RABBITMQ_SERVER_START_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        ERL_CRASH_DUMP="$d/erl_crash.dump" \
        -- /usr/lib/rabbitmq/bin/rabbitmq-server
    setsid "${_RABBITMQ4_CMD[@]}" </dev/null >"$log" 2>&1 &
    while ! _rabbitmq4_amqp_ready "$RABBITMQ4_PORT"; do
        if ((SECONDS - t0 > RABBITMQ4_BOOT_TIMEOUT_S)); then
            _rabbitmq4_log "not up within ${RABBITMQ4_BOOT_TIMEOUT_S}s; the end of $log:"
            tail -n 40 "$log" >&2
            return 1
        fi
        sleep 0.2
    done
    _rabbitmq4_log "$(rabbitmq4_ctl version 2>/dev/null || echo '?') up in $((SECONDS - t0)) s: $AMQP_URL"
}

# Stop every process running in the folder (TERM, then KILL after 15 s) and unmount its proc.
# Safe to call when nothing runs; used by test.sh's exit trap.
rabbitmq4_stop() {
    local pids deadline
    [[ -d $RABBITMQ4_ROOT ]] || return 0
    pids=$(rabbitmq4_pids)
    if [[ -n $pids ]]; then
        _rabbitmq4_log "stopping $(wc -w <<<"$pids") process(es) in $RABBITMQ4_ROOT"
        # shellcheck disable=SC2086  # one PID per word
        kill -TERM $pids 2>/dev/null || true
        deadline=$((SECONDS + 15))
        while [[ -n $(rabbitmq4_pids) ]] && ((SECONDS < deadline)); do
            sleep 0.2
        done
        pids=$(rabbitmq4_pids)
        if [[ -n $pids ]]; then
            _rabbitmq4_log "still running after SIGTERM, killing: $(tr '\n' ' ' <<<"$pids")"
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
            sleep 0.5
        fi
    fi
    if mountpoint -q "$RABBITMQ4_ROOT/proc"; then
        umount "$RABBITMQ4_ROOT/proc" || umount -l "$RABBITMQ4_ROOT/proc"
    fi
}

rabbitmq4_status() {
    local pids
    pids=$(rabbitmq4_pids)
    if [[ -z $pids ]]; then
        echo "nothing runs in $RABBITMQ4_ROOT"
    else
        ps -o pid,user,etime,args -p "$(paste -sd, <<<"$pids")"
    fi
}

# Run directly (not sourced): one subcommand.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    case ${1:-} in
        build) rabbitmq4_build ;;
        prepare) rabbitmq4_prepare ;;
        start) rabbitmq4_start ;;
        stop) rabbitmq4_stop ;;
        status) rabbitmq4_status ;;
        *)
            echo "usage: $0 build|prepare|start|stop|status" >&2
            exit 2
            ;;
    esac
fi
