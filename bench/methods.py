#!/usr/bin/env python3
"""Handler rows: an I/O-bound async method against its in-flight / latency bound, and a typed
JSON method against a raw-bytes method of the same work, on one daemon.

Starts `target/release/examples/bench_service serve` (bench/service.rs: methods `wait`,
`echo`, `echo_json`) on a queue of its own, then:

  io     `amqp-rpc bench --method wait --concurrency 256` (each call awaits --wait-ms, 20):
         calls/s against the bound concurrency / wait (256 / 0.020 s = 12,800 calls/s).
         The daemon's prefetch (--prefetch, default 512) must be at least the concurrency:
         it bounds the requests a daemon holds, so the shipped 64 caps the method at
         64 / 0.020 s = 3,200 calls/s (`--prefetch 64` shows it).
  json   at 64 in flight, in alternating rounds (ABBA), each round:
           cli raw      `amqp-rpc bench --method echo --arg '<the JSON line>'`
           cli json     `amqp-rpc bench --method echo_json --arg '<the same bytes>'`
                        (the daemon's JSON only: the CLI sends and takes raw bytes)
           typed raw    `bench_service load --method echo`  (Service::call_with)
           typed json   `bench_service load --method echo_json --typed`
                        (Service::call_json_with of a struct, reply decoded into one:
                        JSON on both sides, what an application pays)
         and the ratio json / raw of calls/s per round, for each client.

Builds nothing: `cargo build --release --bins --examples` first. Python 3 stdlib only.

    python3 bench/methods.py --duration 8s --runs 3           # both rows
    python3 bench/methods.py --rows io --prefetch 64          # the shipped prefetch's cap
"""
import argparse
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    DEFAULT_URL, ROOT, RPC, CpuWindow, Server, broker_pid, delete_queues, f_int, fmt_dur,
    free_port, log, machine_ticks, med, parse_duration, run_json)

BENCH_SERVICE = os.path.join(ROOT, 'target/release/examples/bench_service')
LINE = '{"order":"o-1234567","sku":"sku-7","qty":3,"note":"gift wrap"}'


def start_service(queue, url, prefetch, wait_ms):
    port = free_port()
    env = dict(os.environ, AMQP_RPC__AMQP__URL=url, AMQP_RPC__SERVICE__QUEUE=queue,
               AMQP_RPC__SERVICE__PREFETCH=str(prefetch),
               AMQP_RPC__HTTP__LISTEN=f'127.0.0.1:{port}')

    def ready(_):
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=1) as r:
                return r.status == 200
        except OSError:
            return False
    return Server('bench_service', [BENCH_SERVICE, 'serve', '--wait-ms', str(wait_ms)], env,
                  ready)


def cli_argv(args, queue, method, concurrency, body):
    return [RPC, 'bench', '--url', args.url, '--queue', queue, '--method', method, '--arg',
            body, '--concurrency', str(concurrency), '--duration', fmt_dur(args.duration),
            '--warmup', fmt_dur(args.warmup), '--no-retry', '--json']


def load_argv(args, queue, method, concurrency, typed):
    argv = [BENCH_SERVICE, 'load', '--url', args.url, '--queue', queue, '--method', method,
            '--concurrency', str(concurrency), '--duration', fmt_dur(args.duration),
            '--warmup', fmt_dur(args.warmup), '--json']
    return argv + (['--typed'] if typed else [])


def measure(argv, server, broker, timeout):
    window = CpuWindow([server.pid], broker)
    report = run_json(argv, dict(os.environ), timeout)
    cpu = window.close()
    cps = report['calls_per_sec']
    report['daemon_us_per_call'] = (cpu['procs_cpu_pct'] / 100 * 1e6 / cps
                                    if cps and cpu['procs_cpu_pct'] is not None else None)
    report['steal_pct'] = cpu['steal_pct']
    report['client_us_per_call'] = (cpu['client_cpu_pct'] / 100 * 1e6 / cps
                                    if cps and cpu['client_cpu_pct'] is not None else None)
    report['broker_us_per_call'] = (cpu['broker_cpu_pct'] / 100 * 1e6 / cps
                                    if cps and cpu['broker_cpu_pct'] is not None else None)
    ours = sum(x or 0 for x in (cpu['procs_cpu_pct'], cpu['broker_cpu_pct'],
                                cpu['client_cpu_pct']))
    report['others_pct'] = max(0.0, (cpu['machine_busy_pct'] or 0) - ours)
    report['machine_pct'] = cpu['machine_busy_pct']
    return report


def wait_quiet(pct, limit=600):
    """Wait (at most `limit` s) until the machine was less busy than `pct` % of one CPU
    over 2 s."""
    give_up = time.monotonic() + limit
    while time.monotonic() < give_up:
        b0, t0, _ = machine_ticks()
        time.sleep(2)
        b1, t1, _ = machine_ticks()
        if 100.0 * os.cpu_count() * (b1 - b0) / max(1, t1 - t0) < pct:
            return


def measure_quiet(argv, server, broker, timeout, args):
    """measure(), after --wait-quiet, repeated while other processes used more than
    --max-others."""
    for left in range(args.retries, -1, -1):
        if args.wait_quiet is not None:
            wait_quiet(args.wait_quiet)
        r = measure(argv, server, broker, timeout)
        if args.max_others is None or r['others_pct'] <= args.max_others or not left:
            return r
        log(f'  other processes used {r["others_pct"]:.0f}% of a CPU: repeating '
            f'({left - 1} repeats left)')
        time.sleep(5)


def show(name, r):
    log(f'  {name}: {r["calls_per_sec"]:,.0f} calls/s, p50 {r["p50_us"]} µs, '
        f'p99 {r["p99_us"]} µs, errors {r["errors"]} {r["error_kinds"] or ""}; per call: '
        f'client {r["client_us_per_call"] or 0:.0f} µs, daemon '
        f'{r["daemon_us_per_call"] or 0:.0f} µs, broker '
        f'{r["broker_us_per_call"] or 0:.0f} µs; machine {r["machine_pct"] or 0:.0f}% of a CPU, '
        f'other processes {r["others_pct"]:.0f}%, steal {r["steal_pct"] or 0:.0f}%')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--url', default=os.environ.get('AMQP_URL', DEFAULT_URL))
    ap.add_argument('--rows', nargs='+', default=['io', 'json'], choices=['io', 'json'])
    ap.add_argument('--duration', type=parse_duration, default=8.0)
    ap.add_argument('--warmup', type=parse_duration, default=1.0)
    ap.add_argument('--runs', type=int, default=3)
    ap.add_argument('--io-concurrency', type=int, nargs='+', default=[256])
    ap.add_argument('--json-concurrency', type=int, default=64)
    ap.add_argument('--wait-ms', type=int, default=20)
    ap.add_argument('--prefetch', type=int, default=512)
    ap.add_argument('--max-others', type=float, default=None,
                    help='repeat a run when other processes used more than this much CPU '
                         '(%% of one CPU): on a shared machine they are the noise')
    ap.add_argument('--retries', type=int, default=3)
    ap.add_argument('--wait-quiet', type=float, default=None,
                    help='before each run, wait (up to 10 min) until the whole machine used '
                         'less than this much CPU (%% of one CPU) for 2 s')
    args = ap.parse_args()

    queue = f'bench_methods_{os.getpid()}_{int(time.time())}'
    broker = broker_pid(args.url)
    timeout = args.duration + args.warmup + 60
    server = start_service(queue, args.url, args.prefetch, args.wait_ms)
    out = []
    try:
        for c in (args.io_concurrency if 'io' in args.rows else []):
            bound = c / (args.wait_ms / 1000)
            log(f'io: wait {args.wait_ms} ms at {c} in flight, prefetch {args.prefetch}; '
                f'bound {bound:,.0f} calls/s')
            runs = []
            for i in range(args.runs):
                r = measure_quiet(cli_argv(args, queue, 'wait', c, '10'), server, broker,
                                  timeout, args)
                show(f'run {i + 1}', r)
                runs.append(r)
            fractions = [r['calls_per_sec'] / bound for r in runs]
            out.append(f'\n### I/O-bound method: `wait` ({args.wait_ms} ms) at {c} in flight, '
                       f'prefetch {args.prefetch}\n')
            out.append('| bound | calls/s (median) | of the bound, per run | p50 µs | p99 µs '
                       '| daemon / broker µs per call | machine busy, % of a CPU '
                       '(other processes) | errors |')
            out.append('|---|---|---|---|---|---|---|---|')
            out.append(f'| {f_int(bound)} | {f_int(med([r["calls_per_sec"] for r in runs]))} '
                       f'| {med(fractions):.0%} ('
                       + ', '.join(f'{x:.0%}' for x in fractions) + ') '
                       f'| {f_int(med([r["p50_us"] for r in runs]))} '
                       f'| {f_int(med([r["p99_us"] for r in runs]))} '
                       f'| {med([r["daemon_us_per_call"] for r in runs]):.0f} / '
                       f'{med([r["broker_us_per_call"] for r in runs]):.0f} '
                       f'| {med([r["machine_pct"] for r in runs]):.0f}% '
                       f'({med([r["others_pct"] for r in runs]):.0f}%) '
                       f'| {sum(r["errors"] for r in runs)} |')
        if 'json' in args.rows:
            c = args.json_concurrency
            systems = {
                'cli raw': lambda: cli_argv(args, queue, 'echo', c, LINE),
                'cli json': lambda: cli_argv(args, queue, 'echo_json', c, LINE),
                'typed raw': lambda: load_argv(args, queue, 'echo', c, False),
                'typed json': lambda: load_argv(args, queue, 'echo_json', c, True),
            }
            names = list(systems)
            runs = {n: [] for n in names}
            log(f'json: echo vs echo_json at {c} in flight, body {LINE}')
            for i in range(args.runs):
                order = names if i % 2 == 0 else names[::-1]
                log(f'round {i + 1}: {", ".join(order)}')
                for n in order:
                    r = measure_quiet(systems[n](), server, broker, timeout, args)
                    show(n, r)
                    runs[n].append(r)
            out.append(f'\n### Typed JSON vs raw bytes: echo at {c} in flight, one daemon, '
                       f'{args.runs} alternating rounds\n')
            out.append('| client | raw calls/s | JSON calls/s | JSON / raw (per round) '
                       '| JSON cost | client µs/call raw / JSON | daemon µs/call raw / JSON '
                       '| p50 µs raw / JSON |')
            out.append('|---|---|---|---|---|---|---|---|')
            for client in ('cli', 'typed'):
                raw, js = runs[f'{client} raw'], runs[f'{client} json']
                ratios = [j['calls_per_sec'] / r['calls_per_sec'] for r, j in zip(raw, js)]
                label = ('`amqp-rpc bench` (daemon JSON only)' if client == 'cli' else
                         '`Service::call_json_with` (JSON both sides)')
                out.append(
                    f'| {label} | {f_int(med([r["calls_per_sec"] for r in raw]))} '
                    f'| {f_int(med([r["calls_per_sec"] for r in js]))} '
                    f'| {med(ratios):.2f}× (' + ', '.join(f'{x:.2f}' for x in ratios) + ') '
                    f'| {1 / med(ratios) - 1:+.0%} '
                    f'| {med([r["client_us_per_call"] for r in raw]):.0f} / '
                    f'{med([r["client_us_per_call"] for r in js]):.0f} '
                    f'| {med([r["daemon_us_per_call"] for r in raw]):.0f} / '
                    f'{med([r["daemon_us_per_call"] for r in js]):.0f} '
                    f'| {f_int(med([r["p50_us"] for r in raw]))} / '
                    f'{f_int(med([r["p50_us"] for r in js]))} |')
    finally:
        server.stop()
        delete_queues([queue])
    print('\n'.join(out))


if __name__ == '__main__':
    main()
