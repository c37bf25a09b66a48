#!/usr/bin/env python3
"""amqp-rpc's client embedded in a `#[tokio::main]` application against a bare lapin client
in the same application (bench/embedded/), calling `amqp-rpcd`'s fib(10).

Starts `target/release/amqp-rpcd` (no config file: the shipped defaults) on a queue of its
own, then runs `target/release/examples/embedded_bench` against it with the daemon and the
broker watched for CPU, and passes every other argument through (`--systems`,
`--concurrency`, `--rounds`, `--duration`, `--warmup`, `--json`; see
`embedded_bench --help`). The tables (medians; each system's calls/s against the first
system's in the same round) come on stdout, one line per run on stderr.

Builds nothing: `cargo build --release --bins --examples` first. Python 3 stdlib only.

    python3 bench/embedded.py                                         # lib vs bare, 1 and 64
    python3 bench/embedded.py --rounds 5 --duration 8s
    python3 bench/embedded.py --systems lib,bare,bare+task,bare+task+confirm+meta,lib+thread
    TOKIO_WORKER_THREADS=1 python3 bench/embedded.py                  # one runtime worker
"""
import os
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    DEFAULT_URL, ROOT, RPCD, Server, broker_pid, delete_queues, free_port, log)

EMBEDDED = os.path.join(ROOT, 'target/release/examples/embedded_bench')


def start_rpcd(queue, url):
    port = free_port()
    env = dict(os.environ, AMQP_RPC__AMQP__URL=url, AMQP_RPC__SERVICE__QUEUE=queue,
               AMQP_RPC__HTTP__LISTEN=f'127.0.0.1:{port}')

    def ready(_):
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=1) as r:
                return r.status == 200
        except OSError:
            return False
    return Server('amqp-rpcd', [RPCD], env, ready)


def main():
    args = sys.argv[1:]
    if any(a in ('-h', '--help') for a in args):
        print(__doc__)
        subprocess.run([EMBEDDED, '--help'])
        return
    url = os.environ.get('AMQP_URL', DEFAULT_URL)
    queue = f'bench_embedded_{os.getpid()}_{int(time.time())}'
    daemon = start_rpcd(queue, url)
    watch = ['--watch', f'daemon={daemon.pid}']
    broker = broker_pid(url)
    if broker:
        watch += ['--watch', f'broker={broker}']
    log(f'amqp-rpcd {daemon.pid} on {queue}; broker {broker}; '
        f'TOKIO_WORKER_THREADS={os.environ.get("TOKIO_WORKER_THREADS", "(default)")}')
    try:
        r = subprocess.run([EMBEDDED, '--url', url, '--queue', queue] + watch + args,
                           cwd=ROOT)
    finally:
        daemon.stop()
        delete_queues([queue])
    sys.exit(r.returncode)


if __name__ == '__main__':
    main()
