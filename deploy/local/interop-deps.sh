#!/usr/bin/env bash
# Runtimes and AMQP client libraries for tests/interop_langs.rs: the RabbitMQ tutorials' RPC
# programs in Perl (AnyEvent::RabbitMQ), Node.js (amqplib), PHP (php-amqplib), Ruby (bunny)
# and Go (amqp091-go).
#
#   deploy/local/interop-deps.sh
#
# Idempotent and quick when everything is there: it apt-get installs only the Debian packages
# that are missing (needs root then), and npm installs amqplib only when the pinned version is
# not already in the cache. Node.js itself comes from Debian's `nodejs` package when no `node`
# is on PATH.
#
# The npm cache lives outside the repository: $AMQP_RPC_INTEROP_CACHE/npm, default
# /var/cache/amqp-rpc/npm (the tests read the same variable).
set -euo pipefail

# The version rabbitmq-tutorials' javascript-nodejs/package.json pins.
AMQPLIB_VERSION=0.10.9
cache=${AMQP_RPC_INTEROP_CACHE:-/var/cache/amqp-rpc}

debs=(
    perl libanyevent-rabbitmq-perl libnet-amqp-perl libuuid-tiny-perl
    php-cli php-amqplib
    ruby ruby-bunny
    golang-go golang-github-rabbitmq-amqp091-go-dev
)
command -v node >/dev/null 2>&1 || debs+=(nodejs)
command -v npm >/dev/null 2>&1 || debs+=(npm)

missing=()
for p in "${debs[@]}"; do
    if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "interop-deps: missing Debian packages: ${missing[*]} (run as root to install them)" >&2
        exit 1
    fi
    echo "interop-deps: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q "${missing[@]}"; then
        apt-get update -q
        apt-get install -y -q "${missing[@]}"
    fi
else
    echo "interop-deps: Debian packages present (${debs[*]})"
fi

npm_dir=$cache/npm
have=$(node -p "try { require('$npm_dir/node_modules/amqplib/package.json').version } catch (e) { '' }" 2>/dev/null || true)
if [ "$have" = "$AMQPLIB_VERSION" ]; then
    echo "interop-deps: amqplib $have present in $npm_dir"
else
    echo "interop-deps: npm install amqplib@$AMQPLIB_VERSION into $npm_dir"
    mkdir -p "$npm_dir"
    [ -f "$npm_dir/package.json" ] || echo '{ "name": "amqp-rpc-interop", "private": true }' >"$npm_dir/package.json"
    npm install --prefix "$npm_dir" --no-audit --no-fund --loglevel=error "amqplib@$AMQPLIB_VERSION"
fi

# One line each, so a failing run shows what it ran against.
perl -MAnyEvent::RabbitMQ -e 'print "interop-deps: perl $^V, AnyEvent::RabbitMQ $AnyEvent::RabbitMQ::VERSION\n"'
echo "interop-deps: node $(node --version), amqplib $(node -p "require('$npm_dir/node_modules/amqplib/package.json').version")"
php -r 'require "/usr/share/php/PhpAmqpLib/autoload.php"; echo "interop-deps: php ", PHP_VERSION, ", php-amqplib ", \PhpAmqpLib\Package::VERSION, "\n";'
ruby -e 'require "bunny"; puts "interop-deps: ruby #{RUBY_VERSION}, bunny #{Bunny::VERSION}"'
echo "interop-deps: $(go version), amqp091-go $(dpkg-query -W -f='${Version}' golang-github-rabbitmq-amqp091-go-dev)"
