#!/usr/bin/env python3
"""Compare amqp-rpc with a bare lapin echo and the RabbitMQ tutorial's pika RPC, in one run.

Systems (each on its own, uniquely named queue of the broker at AMQP_URL):
  rpc   target/release/amqp-rpcd --config config.toml, driven by `amqp-rpc bench` (fib, --arg)
  bare  target/release/examples/bare_echo server, driven by `bare_echo bench` (echoes the body)
  rpc_thread  rpc with lapin's socket loop on its own thread on both sides (amqp.io_thread)
  bare_task   bare with the socket loop as a task on both sides (--io-task); not the reference
  pika  tests/interop/tutorial_server.py (prefetch 1, recursive fib), driven by
        bench/pika_bench.py (N tutorial clients, one process each)

For each concurrency the systems run in alternating order (rpc, bare, pika, rpc, bare, pika,
...), --runs times each; the tables show the median of calls/s, p50 and p99 per system, plus
the CPU used by each server process and by the broker during the runs, and the resident memory
of the servers at the end.

Builds nothing: run `cargo build --release --bins --examples` first. Python 3 stdlib only
(the pika system needs the `pika` package, like tests/interop).

    python3 bench/compare.py                                    # everything, defaults
    python3 bench/compare.py --duration 8s --warmup 2s --concurrency 1 64
    python3 bench/compare.py --queue-type quorum                # amqp-rpc only (see --help)
    python3 bench/compare.py --max-steal 10      # repeat rounds a noisy host disturbed
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402  (features.py and scaling.py reach these as compare.X)
    BARE, CONFIG, DEFAULT_URL, ROOT, RPC, RPCD, CpuWindow, Server, broker_pid, delete_queues,
    f_int, f_mib, f_pct, f_ratio, fmt_dur, free_port, log, med, parse_duration, proc_rss_kib,
    ratio, run_json)

TUTORIAL_SERVER = os.path.join(ROOT, 'tests/interop/tutorial_server.py')
PIKA_BENCH = os.path.join(ROOT, 'bench/pika_bench.py')
NAMES = {'rpc': 'amqp-rpc', 'bare': 'bare echo', 'pika': 'pika tutorial',
         'rpc_thread': 'amqp-rpc, io thread', 'bare_task': 'bare, io task'}


# --- servers ------------------------------------------------------------------------------

def start_rpcd(queue, queue_type, url, io_thread=False):
    port = free_port()
    env = dict(os.environ, AMQP_RPC__AMQP__URL=url, AMQP_RPC__SERVICE__QUEUE=queue,
               AMQP_RPC__SERVICE__QUEUE_TYPE=queue_type,
               AMQP_RPC__HTTP__LISTEN=f'127.0.0.1:{port}')
    if io_thread:
        env['AMQP_RPC__AMQP__IO_THREAD'] = 'true'

    def ready(_):
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=1) as r:
                return r.status == 200
        except OSError:
            return False
    return Server('amqp-rpcd', [RPCD, '--config', CONFIG], env, ready)


def start_bare(queue, url, io_task=False):
    env = dict(os.environ, AMQP_URL=url)
    flags = ['--io-task'] if io_task else []
    return Server('bare_echo', [BARE, 'server', '--queue', queue] + flags, env,
                  lambda s: 'bare echo serving' in s.log())


def start_pika_server(queue, host, port):
    env = dict(os.environ, AMQP_HOST=host, AMQP_PORT=str(port), RPC_QUEUE=queue)
    # The tutorial server prints a line per request, so its stdout goes to /dev/null; it is
    # ready when its queue has a consumer.
    return Server('tutorial_server', [sys.executable, TUTORIAL_SERVER], env,
                  lambda s: queue_consumers(queue, host, port) >= 1)


CONSUMERS = """
import sys, pika
c = pika.BlockingConnection(pika.ConnectionParameters(host=sys.argv[2], port=int(sys.argv[3])))
print(c.channel().queue_declare(queue=sys.argv[1], passive=True).method.consumer_count)
"""


def queue_consumers(queue, host, port):
    r = subprocess.run([sys.executable, '-c', CONSUMERS, queue, host, str(port)],
                       capture_output=True, text=True, timeout=30)
    try:
        return int(r.stdout.strip())
    except ValueError:
        return 0


# --- one measured run ---------------------------------------------------------------------

def run_client(system, queue, conc, a, url, host, port):
    common = ['--concurrency', str(conc), '--duration', fmt_dur(a.duration),
              '--warmup', fmt_dur(a.warmup), '--json']
    env = dict(os.environ, AMQP_URL=url)
    if system in ('rpc', 'rpc_thread'):
        argv = [RPC, 'bench', '--queue', queue, '--arg', a.arg] + common
        argv += ['--io-thread'] if system == 'rpc_thread' else []
    elif system in ('bare', 'bare_task'):
        argv = [BARE, 'bench', '--queue', queue, '--arg', a.arg] + common
        argv += ['--io-task'] if system == 'bare_task' else []
    else:
        argv = [sys.executable, PIKA_BENCH, '--queue', queue, '--arg', a.arg] + common
        env.update(AMQP_HOST=host, AMQP_PORT=str(port))
    return run_json(argv, env, a.duration + a.warmup + 120)


def measure(system, queue, conc, a, url, host, port, server_pid, broker):
    """Run one bench; add CPU of the server, the broker, the client and the machine."""
    window = CpuWindow([server_pid] if server_pid else [], broker)
    rep = run_client(system, queue, conc, a, url, host, port)
    rep.update(window.close())
    rep['server_cpu_pct'] = rep.pop('procs_cpu_pct')
    rep['server_rss_kib'] = proc_rss_kib(server_pid) if server_pid else None
    return rep


# --- report -------------------------------------------------------------------------------

def verdict(ok):
    return '–' if ok is None else ('**met**' if ok else '**not met**')


def report(results, concs, systems, a, meta):
    out = []
    p = out.append
    p(f"## Results ({meta['queue_type']} queue, median of {a.runs} runs, "
      f"{fmt_dur(a.duration)} measured after {fmt_dur(a.warmup)} warm-up, arg {a.arg})")
    p('')
    p('Latencies in µs. CPU in % of one core over the whole client run (warm-up included); '
      f"the machine has {os.cpu_count()} cores, so 100% × {os.cpu_count()} is all of it. "
      '"server" is amqp-rpcd, the bare echo server or the tutorial server; "client" is the '
      'bench process (all its processes for pika); "machine" is all CPU use, including '
      'other programs. "steal" is the share of the machine\'s CPU time the hypervisor gave to '
      'other guests (high steal means a noisy run). '
      'RSS is the server\'s VmRSS after its last run at that concurrency. '
      'calls/s range is min–max of the runs.')
    if meta.get('discarded'):
        p('')
        p(f"Rounds discarded and run again because a run saw more than {a.max_steal:g}% steal: "
          f"{meta['discarded']}.")
    p('')
    p('| conc | system | calls/s | calls/s range | p50 | p99 | errors | server CPU | '
      'broker CPU | client CPU | machine | steal | server RSS |')
    p('|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    med_tab = {}
    for c in concs:
        for s in systems:
            runs = results.get((s, c))
            if not runs:
                continue
            m = {k: med([r.get(k) for r in runs]) for k in
                 ('calls_per_sec', 'p50_us', 'p99_us', 'server_cpu_pct', 'broker_cpu_pct',
                  'client_cpu_pct', 'machine_busy_pct', 'steal_pct')}
            m['errors'] = sum(r['errors'] for r in runs)
            m['rss'] = runs[-1].get('server_rss_kib')
            cps = [r['calls_per_sec'] for r in runs]
            med_tab[(s, c)] = m
            p(f"| {c} | {NAMES[s]} | {f_int(m['calls_per_sec'])} | "
              f"{f_int(min(cps))}–{f_int(max(cps))} | {f_int(m['p50_us'])} | "
              f"{f_int(m['p99_us'])} | {m['errors']} | {f_pct(m['server_cpu_pct'])} | "
              f"{f_pct(m['broker_cpu_pct'])} | {f_pct(m['client_cpu_pct'])} | "
              f"{f_pct(m['machine_busy_pct'])} | {f_pct(m['steal_pct'])} | "
              f"{f_mib(m['rss'])} |")
    p('')

    for other, title in (('bare', 'bare echo'), ('pika', 'pika tutorial'),
                         ('rpc_thread', 'amqp-rpc with lapin\'s I/O thread'),
                         ('bare_task', 'bare echo with the socket loop as a task')):
        if other not in systems:
            continue
        p(f'## amqp-rpc ÷ {title} (medians)')
        p('')
        p('| conc | calls/s | p50 | p99 |')
        p('|---:|---:|---:|---:|')
        for c in concs:
            r, o = med_tab.get(('rpc', c)), med_tab.get((other, c))
            if r and o:
                p(f"| {c} | {f_ratio(ratio(r['calls_per_sec'], o['calls_per_sec']))} | "
                  f"{f_ratio(ratio(r['p50_us'], o['p50_us']))} | "
                  f"{f_ratio(ratio(r['p99_us'], o['p99_us']))} |")
        p('')

    def get(s, c, k):
        m = med_tab.get((s, c))
        return m and m[k]
    targets = [
        ('64 in flight: amqp-rpc calls/s ≥ 1.2× bare echo', 1.2, '≥',
         ratio(get('rpc', 64, 'calls_per_sec'), get('bare', 64, 'calls_per_sec'))),
        ('one at a time: amqp-rpc p50 ≤ 1.15× bare echo', 1.15, '≤',
         ratio(get('rpc', 1, 'p50_us'), get('bare', 1, 'p50_us'))),
        ('one at a time: amqp-rpc p99 ≤ 2× bare echo', 2.0, '≤',
         ratio(get('rpc', 1, 'p99_us'), get('bare', 1, 'p99_us'))),
        ('8 callers: amqp-rpc calls/s ≥ 10× pika tutorial', 10.0, '≥',
         ratio(get('rpc', 8, 'calls_per_sec'), get('pika', 8, 'calls_per_sec'))),
    ]
    if all(v is None for *_, v in targets):
        return '\n'.join(out)
    p('## Targets')
    p('')
    p('| target | measured | verdict |')
    p('|---|---:|---|')
    for name, goal, op, v in targets:
        ok = None if v is None else (v >= goal if op == '≥' else v <= goal)
        p(f'| {name} | {f_ratio(v)} | {verdict(ok)} |')
    p('')
    return '\n'.join(out)


# --- main ---------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n\n', 1)[1])
    ap.add_argument('--url', default=os.environ.get('AMQP_URL', DEFAULT_URL))
    ap.add_argument('--concurrency', type=int, nargs='+', default=[1, 8, 64, 256],
                    help='calls in flight (default: 1 8 64 256)')
    ap.add_argument('--pika-concurrency', type=int, nargs='*', default=[1, 8],
                    help='concurrencies at which the pika system runs, as that many client '
                         'processes (default: 1 8; empty list: never)')
    ap.add_argument('--systems', nargs='+', choices=['rpc', 'bare', 'pika', 'rpc_thread',
                                                     'bare_task'],
                    default=['rpc', 'bare', 'pika'])
    ap.add_argument('--runs', type=int, default=3, help='runs per system and concurrency')
    ap.add_argument('--duration', type=parse_duration, default=5.0, help='measured, e.g. 5s')
    ap.add_argument('--warmup', type=parse_duration, default=1.0, help='unrecorded, e.g. 1s')
    ap.add_argument('--arg', default='10', help='request body: fib(n) for rpc and pika; '
                                                'echoed by bare')
    ap.add_argument('--queue-type', choices=['classic', 'quorum'], default='classic',
                    help='amqp-rpcd service.queue_type. With quorum only amqp-rpc is measured:'
                         ' the bare echo server and the tutorial server declare classic '
                         'non-durable queues and would fail with PRECONDITION_FAILED on a '
                         'quorum queue.')
    ap.add_argument('--max-steal', type=float, default=None, metavar='PCT',
                    help='repeat a round (every system once) in which any run saw more than '
                         'PCT%% CPU steal, up to --steal-retries times; on a shared host, '
                         'steal is what makes neighbouring runs disagree (default: keep all)')
    ap.add_argument('--steal-retries', type=int, default=5,
                    help='repeats of one round at most, with --max-steal (default: 5)')
    a = ap.parse_args()

    missing = [p for p in (RPCD, RPC, BARE) if not os.access(p, os.X_OK)]
    if missing:
        log('missing binaries:\n  ' + '\n  '.join(missing) +
            '\nbuild them first:  cargo build --release --bins --examples')
        return 2
    systems = list(a.systems)
    if a.queue_type == 'quorum':
        dropped = [s for s in systems if s not in ('rpc', 'rpc_thread')]
        if dropped:
            log(f'quorum: measuring amqp-rpc only (skipping {", ".join(dropped)})')
        systems = [s for s in systems if s in ('rpc', 'rpc_thread')] or ['rpc']
    if 'pika' in systems:
        try:
            subprocess.run([sys.executable, '-c', 'import pika'], check=True,
                           capture_output=True)
        except subprocess.CalledProcessError:
            log('python module pika missing (pip install pika); skipping the pika system')
            systems.remove('pika')
    if not shutil.which('rabbitmqctl'):
        log('note: rabbitmqctl not found; queues will not be deleted at the end')

    u = urllib.parse.urlparse(a.url.split(',')[0])
    host, port = u.hostname or 'localhost', u.port or 5672
    tag = f'{os.getpid()}_{int(time.time())}'
    queues = {s: f'bench_{s}_{tag}' for s in systems}
    broker = broker_pid(a.url)
    if broker is None:
        log('note: broker pid not found; broker CPU will not be reported')

    meta = {'queue_type': a.queue_type}
    servers = {}
    results = {}
    t_begin = time.monotonic()
    try:
        for s in systems:
            if s in ('rpc', 'rpc_thread'):
                servers[s] = start_rpcd(queues[s], a.queue_type, a.url, s == 'rpc_thread')
            elif s in ('bare', 'bare_task'):
                servers[s] = start_bare(queues[s], a.url, s == 'bare_task')
            else:
                servers[s] = start_pika_server(queues[s], host, port)
            log(f'{NAMES[s]} serving on {queues[s]} (pid {servers[s].pid})')

        for c in a.concurrency:
            sys_c = [s for s in systems if s != 'pika' or c in (a.pika_concurrency or [])]
            for i in range(a.runs):
                for attempt in range(a.steal_retries + 1):
                    round_ = {}
                    for s in sys_c:
                        srv = servers[s]
                        rep = measure(s, queues[s], c, a, a.url, host, port,
                                      srv.pid, broker)
                        round_[s] = rep
                        log(f'c={c:<4} run {i + 1}/{a.runs} {NAMES[s]:<18} '
                            f"{rep['calls_per_sec']:>9.0f} calls/s  p50 {rep['p50_us']:>6}us  "
                            f"p99 {rep['p99_us']:>6}us  err {rep['errors']}  "
                            f"srv {f_pct(rep['server_cpu_pct'])} "
                            f"broker {f_pct(rep['broker_cpu_pct'])} "
                            f"client {f_pct(rep['client_cpu_pct'])} "
                            f"machine {f_pct(rep['machine_busy_pct'])} "
                            f"steal {f_pct(rep['steal_pct'])}")
                        if rep['errors']:
                            log(f"  error kinds: {rep.get('error_kinds')}")
                    stolen = max((r['steal_pct'] or 0) for r in round_.values())
                    if (a.max_steal is None or stolen <= a.max_steal
                            or attempt == a.steal_retries):
                        break
                    # The whole round again, so the systems stay measured side by side.
                    meta['discarded'] = meta.get('discarded', 0) + 1
                    log(f'  round discarded: steal {stolen:.0f}% > {a.max_steal:g}%')
                for s, rep in round_.items():
                    results.setdefault((s, c), []).append(rep)
    finally:
        for s, srv in servers.items():
            srv.stop()
        delete_queues(queues.values())
    took = time.monotonic() - t_begin
    print(report(results, a.concurrency, systems, a, meta))
    print(f'_Run took {took / 60:.1f} min._')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
