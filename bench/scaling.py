#!/usr/bin/env python3
"""How amqp-rpc's throughput grows with daemons on one queue and with service.concurrency.

(a) daemons: 1, 2 and 4 amqp-rpcd processes consuming the same queue (a queue per daemon
    count, all started at the beginning), driven by `amqp-rpc bench` at --concurrency calls in
    flight, with a cheap body (--light-arg, fib(10)) and a CPU-heavy one (--heavy-arg). fib(n)
    above 1500 runs on the blocking pool, at most `service.concurrency` at once per daemon.
    Each daemon's share of the work is read from its /metrics (amqp_rpc_requests_total) before
    and after every run.
(b) concurrency: one daemon with AMQP_RPC__SERVICE__CONCURRENCY = 1, 2, 4 (a queue each), on
    the heavy body, same load.

Every daemon runs config.toml as shipped (confirmed replies, log level info, prefetch 64), with
its own HTTP port for /metrics. Each round runs every configuration once: (a) light, then (a)
heavy, then (b); the tables show medians over --runs rounds.

    python3 bench/scaling.py --duration 10s --warmup 2s --runs 3
    python3 bench/scaling.py --calibrate 10 20000 50000 100000   # time one call per n

--calibrate runs one daemon at 1 call in flight for each n and prints the p50 and the daemon's
CPU per call, to pick a --heavy-arg whose call costs 1-3 ms. A heavy n above fib.max_n
(100000 in config.toml) raises max_n for these daemons.

Builds nothing: run `cargo build --release --bins --examples` first. Python 3 stdlib only.
Markdown tables go to stdout, per-run lines to stderr.
"""
import argparse
import math
import os
import shutil
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C  # noqa: E402  (the servers, /proc helpers and formatting of compare.py)

MAX_N_SHIPPED = 100_000


class Daemon:
    """One amqp-rpcd on `queue` with its /metrics on a free port."""

    def __init__(self, queue, url, extra_env):
        self.port = C.free_port()
        env = dict(os.environ, AMQP_RPC__AMQP__URL=url, AMQP_RPC__SERVICE__QUEUE=queue,
                   AMQP_RPC__SERVICE__QUEUE_TYPE='classic',
                   AMQP_RPC__HTTP__LISTEN=f'127.0.0.1:{self.port}', **extra_env)
        env.pop('RUST_LOG', None)
        self.server = C.Server('amqp-rpcd', [C.RPCD, '--config', C.CONFIG], env,
                               lambda _: self._get('/readyz') is not None)

    def _get(self, path):
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{self.port}{path}', timeout=2) as r:
                return r.read().decode() if r.status == 200 else None
        except OSError:
            return None

    @property
    def pid(self):
        return self.server.pid

    def requests_total(self):
        """Sum of amqp_rpc_requests_total over all labels (None when /metrics fails)."""
        text = self._get('/metrics')
        if text is None:
            return None
        return sum(float(line.rsplit(None, 1)[1]) for line in text.splitlines()
                   if line.startswith('amqp_rpc_requests_total{'))

    def stop(self):
        self.server.stop()


def start_group(n, queue, url, extra_env):
    group = [Daemon(queue, url, extra_env) for _ in range(n)]
    C.log(f'{n} amqp-rpcd on {queue} {extra_env or ""} (pids '
          f'{", ".join(str(d.pid) for d in group)})')
    return group


def measure(queue, arg, conc, a, group, broker):
    """One `amqp-rpc bench` run; its report plus CPU figures and each daemon's requests."""
    argv = [C.RPC, 'bench', '--no-retry', '--queue', queue, '--arg', str(arg),
            '--concurrency', str(conc), '--duration', C.fmt_dur(a.duration),
            '--warmup', C.fmt_dur(a.warmup), '--json']
    req0 = [d.requests_total() for d in group]
    window = C.CpuWindow([d.pid for d in group], broker)
    rep = C.run_json(argv, dict(os.environ, AMQP_URL=a.url), a.duration + a.warmup + 120)
    rep.update(window.close())
    rep['daemon_cpu_pct'] = rep.pop('procs_cpu_pct')
    req1 = [d.requests_total() for d in group]
    rep['daemon_requests'] = [None if x is None or y is None else y - x
                              for x, y in zip(req0, req1)]
    p = rep['daemon_cpu_pct']
    rep['daemon_us_per_call'] = (None if p is None or not rep['calls_per_sec']
                                 else p / 100.0 * 1e6 / rep['calls_per_sec'])
    return rep


def run_line(label, i, a, rep):
    shares = '/'.join('?' if x is None else f'{x:.0f}' for x in rep['daemon_requests'])
    C.log(f'{label:<34} run {i + 1}/{a.runs} {rep["calls_per_sec"]:>8.0f} calls/s  '
          f'p50 {rep["p50_us"]:>6}us  p99 {rep["p99_us"]:>6}us  err {rep["errors"]}  '
          f'daemons {C.f_pct(rep["daemon_cpu_pct"])} broker {C.f_pct(rep["broker_cpu_pct"])} '
          f'client {C.f_pct(rep["client_cpu_pct"])} machine '
          f'{C.f_pct(rep["machine_busy_pct"])}  steal {C.f_pct(rep["steal_pct"])}  '
          f'requests per daemon {shares}')
    if rep['errors']:
        C.log(f'  error kinds: {rep.get("error_kinds")}')


# --- report -------------------------------------------------------------------------------

def summary(runs):
    m = {k: C.med([r.get(k) for r in runs]) for k in
         ('calls_per_sec', 'p50_us', 'p99_us', 'daemon_cpu_pct', 'broker_cpu_pct',
          'client_cpu_pct', 'machine_busy_pct', 'daemon_us_per_call')}
    m['errors'] = sum(r['errors'] for r in runs)
    cps = [r['calls_per_sec'] for r in runs]
    m['range'] = f'{C.f_int(min(cps))}–{C.f_int(max(cps))}'
    per = [sum(r['daemon_requests'][i] or 0 for r in runs)
           for i in range(len(runs[0]['daemon_requests']))]
    total = sum(per)
    m['shares'] = ('–' if not total or len(per) < 2
                   else ' / '.join(f'{100.0 * x / total:.0f}%' for x in per))
    return m


def f_x(x):
    return '–' if x is None else f'{x:.2f}×'


def f_us(x):
    return '–' if x is None else f'{x:,.0f}'


def digits_of_fib(n):
    """Decimal digits of fib(n) (Binet), for the reply size."""
    if n < 2:
        return 1
    return int(n * math.log10((1 + 5 ** 0.5) / 2) - math.log10(5) / 2) + 1


def core_note():
    n = os.cpu_count()
    return (f'The machine has {n} cores, shared by the daemons, the RabbitMQ broker and the '
            f'load generator: scaling beyond {n} (daemons × CPU-heavy calls at once) is bounded '
            'by those shared cores, not by amqp-rpcd.')


def report(res, a, parts):
    out = []
    p = out.append
    runs = f'median of {a.runs} run{"s" if a.runs != 1 else ""}'
    timing = f'{C.fmt_dur(a.duration)} measured after {C.fmt_dur(a.warmup)} warm-up'
    common = ('Latencies in µs. CPU in % of one core over the whole bench run (warm-up '
              'included); "daemons" is the sum over all amqp-rpcd processes, "machine" all CPU '
              'use. calls/s range is min–max of the runs. ')
    if 'daemons' in parts:
        p(f'## Daemons on one queue ({a.concurrency} in flight, {runs}, {timing}, classic '
          'queue, config.toml as shipped)')
        p('')
        p(core_note())
        p('')
        p(common + 'Share of requests per daemon: from each daemon\'s '
          '`amqp_rpc_requests_total`, summed over the runs.')
        p('')
        p('| call | daemons | calls/s | × 1 daemon | calls/s range | p50 | p99 | share per '
          'daemon | daemons CPU | CPU/call (µs) | broker CPU | client CPU | machine | errors |')
        p('|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|')
        for arg in (a.light_arg, a.heavy_arg):
            base = res.get(('daemons', arg, a.daemons[0]))
            base = base and summary(base)
            for k in a.daemons:
                rs = res.get(('daemons', arg, k))
                if not rs:
                    continue
                m = summary(rs)
                p(f"| fib({arg}) | {k} | {C.f_int(m['calls_per_sec'])} | "
                  f"{f_x(base and m['calls_per_sec'] / base['calls_per_sec'])} | "
                  f"{m['range']} | {C.f_int(m['p50_us'])} | {C.f_int(m['p99_us'])} | "
                  f"{m['shares']} | {C.f_pct(m['daemon_cpu_pct'])} | "
                  f"{f_us(m['daemon_us_per_call'])} | {C.f_pct(m['broker_cpu_pct'])} | "
                  f"{C.f_pct(m['client_cpu_pct'])} | {C.f_pct(m['machine_busy_pct'])} | "
                  f"{m['errors']} |")
        p('')
    if 'concurrency' in parts:
        p(f'## `service.concurrency`, one daemon (fib({a.heavy_arg}), {a.concurrency} in '
          f'flight, {runs}, {timing})')
        p('')
        p(core_note())
        p('')
        p(common.rstrip())
        p('')
        p('| service.concurrency | calls/s | × concurrency 1 | calls/s range | p50 | p99 | '
          'daemon CPU | CPU/call (µs) | broker CPU | client CPU | machine | errors |')
        p('|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
        base = res.get(('conc', a.heavy_arg, a.service_concurrency[0]))
        base = base and summary(base)
        for sc in a.service_concurrency:
            rs = res.get(('conc', a.heavy_arg, sc))
            if not rs:
                continue
            m = summary(rs)
            p(f"| {sc} | {C.f_int(m['calls_per_sec'])} | "
              f"{f_x(base and m['calls_per_sec'] / base['calls_per_sec'])} | {m['range']} | "
              f"{C.f_int(m['p50_us'])} | {C.f_int(m['p99_us'])} | "
              f"{C.f_pct(m['daemon_cpu_pct'])} | {f_us(m['daemon_us_per_call'])} | "
              f"{C.f_pct(m['broker_cpu_pct'])} | {C.f_pct(m['client_cpu_pct'])} | "
              f"{C.f_pct(m['machine_busy_pct'])} | {m['errors']} |")
        p('')
    return '\n'.join(out)


def calibrate(a, broker, tag):
    """One daemon, one call in flight, each n in turn: how long does one call take?"""
    queue = f'bench_scale_cal_{tag}'
    max_n = max(a.calibrate)
    env = {'AMQP_RPC__FIB__MAX_N': str(max_n)} if max_n > MAX_N_SHIPPED else {}
    group = []
    res = {}
    try:
        group = start_group(1, queue, a.url, env)
        for i in range(a.runs):
            for n in a.calibrate:
                rep = measure(queue, n, 1, a, group, broker)
                res.setdefault(n, []).append(rep)
                run_line(f'calibrate fib({n}), 1 in flight', i, a, rep)
    finally:
        for d in group:
            d.stop()
        C.delete_queues([queue])
    out = [f'## Cost of one fib(n) call (1 in flight, one daemon, median of {a.runs} runs, '
           f'{C.fmt_dur(a.duration)} measured after {C.fmt_dur(a.warmup)} warm-up)', '',
           'Extra = the row\'s figure minus the first row\'s: about the time fib(n) and its '
           'longer reply add to one call.', '',
           '| n | reply digits | calls/s | p50 (µs) | extra p50 (µs) | daemon CPU/call (µs) | '
           'extra CPU/call (µs) |',
           '|---:|---:|---:|---:|---:|---:|---:|']
    first = summary(res[a.calibrate[0]])
    for n in a.calibrate:
        m = summary(res[n])
        ex_cpu = (None if m['daemon_us_per_call'] is None or first['daemon_us_per_call'] is None
                  else m['daemon_us_per_call'] - first['daemon_us_per_call'])
        out.append(f"| {n} | {digits_of_fib(n):,} | {C.f_int(m['calls_per_sec'])} | "
                   f"{C.f_int(m['p50_us'])} | {C.f_int(m['p50_us'] - first['p50_us'])} | "
                   f"{f_us(m['daemon_us_per_call'])} | {f_us(ex_cpu)} |")
    out.append('')
    return '\n'.join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n\n', 1)[1])
    ap.add_argument('--url', default=os.environ.get('AMQP_URL', C.DEFAULT_URL))
    ap.add_argument('--parts', nargs='+', choices=['daemons', 'concurrency'],
                    default=['daemons', 'concurrency'])
    ap.add_argument('--daemons', type=int, nargs='+', default=[1, 2, 4],
                    help='daemon counts for part (a) (default: 1 2 4)')
    ap.add_argument('--service-concurrency', type=int, nargs='+', default=[1, 2, 4],
                    help='AMQP_RPC__SERVICE__CONCURRENCY values for part (b) (default: 1 2 4)')
    ap.add_argument('--concurrency', type=int, default=64,
                    help='calls in flight (default 64)')
    ap.add_argument('--light-arg', type=int, default=10, help='cheap fib n (default 10)')
    ap.add_argument('--heavy-arg', type=int, default=100_000,
                    help='CPU-heavy fib n (default 100000, the shipped max_n)')
    ap.add_argument('--runs', type=int, default=3, help='rounds (default 3)')
    ap.add_argument('--duration', type=C.parse_duration, default=10.0,
                    help='measured, e.g. 10s (default)')
    ap.add_argument('--warmup', type=C.parse_duration, default=2.0,
                    help='unrecorded, e.g. 2s (default)')
    ap.add_argument('--calibrate', type=int, nargs='+', metavar='N',
                    help='only time one fib(N) call for each N (1 in flight), and exit')
    a = ap.parse_args()

    missing = [x for x in (C.RPCD, C.RPC) if not os.access(x, os.X_OK)]
    if missing:
        C.log('missing binaries:\n  ' + '\n  '.join(missing) +
              '\nbuild them first:  cargo build --release --bins --examples')
        return 2
    if not shutil.which('rabbitmqctl'):
        C.log('note: rabbitmqctl not found; queues will not be deleted at the end')
    broker = C.broker_pid(a.url)
    if broker is None:
        C.log('note: broker pid not found; broker CPU will not be reported')
    tag = f'{os.getpid()}_{int(time.time())}'
    t_begin = time.monotonic()
    if a.calibrate:
        print(calibrate(a, broker, tag))
        print(f'_Run took {(time.monotonic() - t_begin) / 60:.1f} min._')
        return 0

    heavy_env = ({'AMQP_RPC__FIB__MAX_N': str(a.heavy_arg)}
                 if a.heavy_arg > MAX_N_SHIPPED else {})
    groups = {}  # (part, k) -> (queue, [Daemon])
    res = {}
    try:
        if 'daemons' in a.parts:
            for k in a.daemons:
                q = f'bench_scale_d{k}_{tag}'
                groups[('daemons', k)] = (q, start_group(k, q, a.url, heavy_env))
        if 'concurrency' in a.parts:
            for sc in a.service_concurrency:
                q = f'bench_scale_c{sc}_{tag}'
                env = dict(heavy_env, AMQP_RPC__SERVICE__CONCURRENCY=str(sc))
                groups[('conc', sc)] = (q, start_group(1, q, a.url, env))
        for i in range(a.runs):
            if 'daemons' in a.parts:
                for arg in (a.light_arg, a.heavy_arg):
                    for k in a.daemons:
                        q, group = groups[('daemons', k)]
                        rep = measure(q, arg, a.concurrency, a, group, broker)
                        res.setdefault(('daemons', arg, k), []).append(rep)
                        run_line(f'fib({arg}), {k} daemon{"s" if k > 1 else ""}', i, a, rep)
            if 'concurrency' in a.parts:
                for sc in a.service_concurrency:
                    q, group = groups[('conc', sc)]
                    rep = measure(q, a.heavy_arg, a.concurrency, a, group, broker)
                    res.setdefault(('conc', a.heavy_arg, sc), []).append(rep)
                    run_line(f'fib({a.heavy_arg}), service.concurrency {sc}', i, a, rep)
    finally:
        for _, group in groups.values():
            for d in group:
                d.stop()
        C.delete_queues([q for q, _ in groups.values()])
    print(report(res, a, a.parts))
    print(f'_Run took {(time.monotonic() - t_begin) / 60:.1f} min._')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
