#!/usr/bin/env python3
"""Price trace export: amqp-rpcd and `amqp-rpc bench` with OTLP export on, against both as shipped.

Systems (each its own amqp-rpcd --config config.toml on its own queue, all started once and
kept for the whole run; each driven by `amqp-rpc bench --queue Q --arg ARG --json`, fib(10)):
  off           daemon and CLI as shipped (telemetry off): the reference of every ratio
  on            daemon and CLI with OTEL_TRACES_EXPORTER=otlp and OTEL_EXPORTER_OTLP_ENDPOINT
                at the sink below (the CLI makes a client and a send span per call, the daemon
                a server and a handler span per request); the batch processor's settings
                (OTEL_BSP_*) at their defaults, so spans past its full queue are dropped
  off_baseline  with --baseline DIR: DIR/amqp-rpcd and DIR/amqp-rpc (a build of an older
                commit) with telemetry off, to show whether the change moved the off path;
                the daemon reads DIR/../../config.toml when there is one, else no config file

The sink is a small OTLP/HTTP receiver in a process of its own (this script, `--sink-serve`):
it answers POST /v1/traces with 200 and an empty application/x-protobuf body, and counts the
requests and bytes it got (GET /stats), read before and after each `on` run. The OTEL_*
variables of this script's environment are removed for off and off_baseline; `on` keeps
them, except the ones that would send its spans elsewhere or turn export off. RUST_LOG is
removed for all (it would override log.level).

For each concurrency the systems run in alternating rounds (off, on, off_baseline, off, on,
...), --runs rounds; the table shows medians, and each system's calls/s against off's run of
the same round (the median of those ratios, the rounds' values in parentheses).

Builds nothing: run `cargo build --release --bins` first. Python 3 stdlib only. Markdown
tables go to stdout, per-run lines to stderr.

    python3 bench/traces.py --duration 8s --warmup 2s --runs 3 --concurrency 1 64
    python3 bench/traces.py --baseline ../pre-otel/target/release    # the off path before
    python3 bench/traces.py --duration 2s --warmup 1s --runs 1         # a quick check
    OTEL_BSP_MAX_QUEUE_SIZE=65536 python3 bench/traces.py          # `on` with a larger queue
"""
import argparse
import http.server
import json
import os
import shutil
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    CONFIG, DEFAULT_URL, RPC, RPCD, CpuWindow, Server, broker_pid, delete_queues, f_int, f_pct,
    f_ratio, fmt_dur, free_port, log, med, parse_duration, ratio, run_json)

NAMES = {'off': 'off', 'on': 'on', 'on_sampled': 'on, sampled', 'off_baseline': 'off_baseline'}
# The systems that export.
ON = ('on', 'on_sampled')
# OTEL_* variables `on` does not take from this script's environment: they would send its
# spans somewhere other than the sink, in another protocol, or not at all.
ON_DROP = ('OTEL_EXPORTER_OTLP_TRACES_ENDPOINT', 'OTEL_EXPORTER_OTLP_PROTOCOL',
           'OTEL_EXPORTER_OTLP_TRACES_PROTOCOL', 'OTEL_SDK_DISABLED', 'OTEL_TRACES_SAMPLER',
           'OTEL_TRACES_SAMPLER_ARG')


# The ratio of on_sampled (--sampled), set once the arguments are read.
SAMPLED = [None]


# --- the sink -----------------------------------------------------------------------------

def serve_sink(port):
    """Run the OTLP/HTTP sink on 127.0.0.1:`port` until killed (the `--sink-serve` mode)."""
    lock = threading.Lock()
    stats = {'requests': 0, 'bytes': 0, 'other': 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'  # keep-alive, as the exporter's HTTP client expects

        def body(self):
            if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
                n, parts = 0, []
                while True:
                    size = int(self.rfile.readline().split(b';')[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b'\r\n', b'\n', b''):
                            pass
                        return n
                    n += len(self.rfile.read(size))
                    self.rfile.readline()
            return len(self.rfile.read(int(self.headers.get('Content-Length') or 0)))

        def reply(self, status, ctype, data=b''):
            self.send_response(status)
            self.send_header('Content-Type', ctype)
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            n = self.body()
            if self.path.split('?')[0] != '/v1/traces':
                with lock:
                    stats['other'] += 1
                return self.reply(404, 'text/plain')
            with lock:
                stats['requests'] += 1
                stats['bytes'] += n
            self.reply(200, 'application/x-protobuf')

        def do_GET(self):
            if self.path != '/stats':
                return self.reply(404, 'text/plain')
            with lock:
                data = json.dumps(stats).encode()
            self.reply(200, 'application/json', data)

        def log_message(self, *_):
            pass

    srv = http.server.ThreadingHTTPServer(('127.0.0.1', port), Handler)
    srv.daemon_threads = True
    srv.serve_forever()


def sink_stats(port):
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/stats', timeout=5) as r:
        return json.loads(r.read())


def start_sink():
    port = free_port()

    def ready(_):
        try:
            sink_stats(port)
            return True
        except OSError:
            return False
    srv = Server('otlp-sink', [sys.executable, os.path.abspath(__file__), '--sink-serve',
                               str(port)], dict(os.environ), ready)
    srv.port = port
    return srv


# --- servers and clients ------------------------------------------------------------------

def child_env(system, url, sink_url):
    env = {k: v for k, v in os.environ.items() if system in ON or not k.startswith('OTEL_')}
    env.pop('RUST_LOG', None)
    env['AMQP_URL'] = url
    if system in ON:
        for k in ON_DROP:
            env.pop(k, None)
        env.update(OTEL_TRACES_EXPORTER='otlp', OTEL_EXPORTER_OTLP_ENDPOINT=sink_url)
    if system == 'on_sampled':
        # Traces start at the CLI; the daemon follows the caller's sampled flag.
        env.update(OTEL_TRACES_SAMPLER='parentbased_traceidratio',
                   OTEL_TRACES_SAMPLER_ARG=str(SAMPLED[0]))
    return env


def binaries(system, baseline):
    if system == 'off_baseline':
        return os.path.join(baseline, 'amqp-rpcd'), os.path.join(baseline, 'amqp-rpc')
    return RPCD, RPC


def baseline_config(baseline):
    """The config.toml of the baseline's own checkout (DIR/../../config.toml), if any: this
    checkout's may have sections an older daemon rejects."""
    p = os.path.join(os.path.abspath(baseline), '..', '..', 'config.toml')
    return os.path.normpath(p) if os.path.isfile(p) else None


def start_rpcd(system, queue, url, sink_url, baseline):
    port = free_port()
    env = dict(child_env(system, url, sink_url), AMQP_RPC__AMQP__URL=url,
               AMQP_RPC__SERVICE__QUEUE=queue, AMQP_RPC__SERVICE__QUEUE_TYPE='classic',
               AMQP_RPC__HTTP__LISTEN=f'127.0.0.1:{port}')
    rpcd, _ = binaries(system, baseline)
    config = baseline_config(baseline) if system == 'off_baseline' else CONFIG
    argv = [rpcd] + (['--config', config] if config else [])

    def ready(_):
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=1) as r:
                return r.status == 200
        except OSError:
            return False
    srv = Server(f'amqp-rpcd-{system}', argv, env, ready)
    srv.config = config
    return srv


def measure(system, queue, conc, a, env, daemon, broker, sink):
    """One bench run: its JSON, plus CPU per call of the daemon, the CLI and the broker, and
    for `on` what the sink received during the run."""
    _, rpc = binaries(system, a.baseline)
    argv = [rpc, 'bench', '--queue', queue, '--arg', a.arg, '--concurrency', str(conc),
            '--duration', fmt_dur(a.duration), '--warmup', fmt_dur(a.warmup), '--json']
    s0 = sink_stats(sink.port) if system in ON else None
    window = CpuWindow([daemon.pid], broker)
    sink_window = CpuWindow([sink.pid], None) if s0 is not None else None
    rep = run_json(argv, env, a.duration + a.warmup + 120)
    rep.update(window.close())
    rep['daemon_cpu_pct'] = rep.pop('procs_cpu_pct')
    rep['sink_cpu_pct'] = sink_window.close()['procs_cpu_pct'] if sink_window else None
    if s0 is not None:
        s1 = sink_stats(sink.port)
        rep['sink_requests'] = s1['requests'] - s0['requests']
        rep['sink_kib'] = (s1['bytes'] - s0['bytes']) / 1024
        rep['sink_kib_per_sec'] = rep['sink_kib'] / rep['wall_secs']
    # CPU per call: the process's CPU over the whole bench run (warm-up and connect included)
    # ÷ the measured rate, in µs, as features.py does; the client is this script's waited-for
    # children, i.e. the bench process. The sink shares the machine with the rest.
    for who in ('daemon', 'broker', 'client', 'sink'):
        p = rep[f'{who}_cpu_pct']
        rep[f'{who}_us_per_call'] = (None if p is None or not rep['calls_per_sec']
                                     else p / 100.0 * 1e6 / rep['calls_per_sec'])
    return rep


def warnings_of(srv, limit=5):
    """The WARN and ERROR lines of a daemon's log (its last 4000 characters)."""
    lines = [x for x in srv.log().splitlines() if ' WARN ' in x or ' ERROR ' in x
             or '"level":"WARN"' in x or '"level":"ERROR"' in x]
    return lines[-limit:]


# --- report -------------------------------------------------------------------------------

def f_us(x):
    return '–' if x is None else f'{x:,.1f}'


def f_kib(x):
    return '–' if x is None else f'{x:,.0f}'


def report(results, systems, a, meta):
    out = []
    p = out.append
    p(f'## Cost of trace export (median of {a.runs} round{"s" if a.runs != 1 else ""}, '
      f'{fmt_dur(a.duration)} measured after {fmt_dur(a.warmup)} warm-up, fib({a.arg}), '
      'classic queue)')
    p('')
    p('Latencies in µs. "vs off": this system\'s calls/s ÷ off\'s in the same round, median '
      '(each round\'s in parentheses). CPU per call in µs: the process\'s CPU over the whole '
      'bench run (warm-up and connect included) ÷ the measured calls/s; "CLI" is the '
      '`amqp-rpc bench` process, "broker" the RabbitMQ node. The sink columns are what the '
      'OTLP sink received during each `on` run (export requests and KiB per run, KiB/s over '
      'the run\'s wall time, and the sink process\'s own CPU per call, which shares the '
      'machine with the others); the batch processor drops spans when its queue '
      '(OTEL_BSP_MAX_QUEUE_SIZE, 2048 by default) is full, so they are what was exported, '
      'not what was made. '
      f"steal: the share of the machine's CPU time the hypervisor gave to other guests. "
      f'The machine has {os.cpu_count()} cores.')
    if meta.get('on_otel'):
        p('')
        p(f"`on` also had: {', '.join(meta['on_otel'])}.")
    if meta.get('baseline'):
        p('')
        p(f"off_baseline: `{meta['baseline']}` (config: {meta['baseline_config'] or 'none'}).")
    if meta.get('discarded'):
        p('')
        p(f"Rounds discarded and run again because a run saw more than {a.max_steal:g}% steal: "
          f"{meta['discarded']}.")
    for c in a.concurrency:
        base = {r['round']: r['calls_per_sec'] for r in results.get(('off', c), [])}
        p('')
        p(f'### {c} in flight')
        p('')
        p('| system | calls/s | vs off (per round) | p50 µs | p99 µs | daemon CPU µs/call | '
          'CLI CPU µs/call | broker CPU µs/call | sink requests/run | sink KiB/run | '
          'sink KiB/s | sink CPU µs/call | steal | errors |')
        p('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
        for s in systems:
            runs = results.get((s, c))
            if not runs:
                continue
            m = {k: med([r.get(k) for r in runs]) for k in
                 ('calls_per_sec', 'p50_us', 'p99_us', 'daemon_us_per_call',
                  'client_us_per_call', 'broker_us_per_call', 'sink_requests', 'sink_kib',
                  'sink_kib_per_sec', 'sink_us_per_call', 'steal_pct')}
            if s == 'off':
                vs = 'reference'
            else:
                rs = [ratio(r['calls_per_sec'], base.get(r['round'])) for r in runs]
                vs = (f"{f_ratio(med(rs))} ("
                      + ', '.join('–' if x is None else f'{x:.2f}' for x in rs) + ')')
            p(f"| {NAMES[s]} | {f_int(m['calls_per_sec'])} | {vs} | {f_int(m['p50_us'])} | "
              f"{f_int(m['p99_us'])} | {f_us(m['daemon_us_per_call'])} | "
              f"{f_us(m['client_us_per_call'])} | {f_us(m['broker_us_per_call'])} | "
              f"{f_int(m['sink_requests'])} | {f_kib(m['sink_kib'])} | "
              f"{f_kib(m['sink_kib_per_sec'])} | {f_us(m['sink_us_per_call'])} | "
              f"{f_pct(m['steal_pct'])} | "
              f"{sum(r['errors'] for r in runs)} |")
    if 'late' in meta:
        p('')
        req, kib = meta['late']
        p(f'Outside the `on` runs the sink got {req} more export request'
          f'{"" if req == 1 else "s"} ({kib:,.0f} KiB in all): what the daemon exported after '
          'a run had ended (its batch processor sends every OTEL_BSP_SCHEDULE_DELAY, 5 s by '
          'default, or when a batch is full), while the other systems ran.')
    p('')
    return '\n'.join(out)


# --- main ---------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n\n', 1)[1])
    ap.add_argument('--url', default=os.environ.get('AMQP_URL', DEFAULT_URL))
    ap.add_argument('--concurrency', type=int, nargs='+', default=[1, 64],
                    help='calls in flight (default: 1 64)')
    ap.add_argument('--runs', type=int, default=3, help='rounds per concurrency (default 3)')
    ap.add_argument('--duration', type=parse_duration, default=8.0,
                    help='measured, e.g. 8s (default)')
    ap.add_argument('--warmup', type=parse_duration, default=2.0,
                    help='unrecorded, e.g. 2s (default)')
    ap.add_argument('--arg', default='10', help='fib(n) of each call (default 10)')
    ap.add_argument('--baseline', metavar='DIR', default=None,
                    help='also measure DIR/amqp-rpcd and DIR/amqp-rpc with telemetry off '
                         '(off_baseline), e.g. the target/release of an older commit')
    ap.add_argument('--sampled', type=float, default=None, metavar='RATIO',
                    help='also measure export with a parentbased_traceidratio sampler keeping '
                         'RATIO of the traces (on_sampled), e.g. 0.1')
    ap.add_argument('--max-steal', type=float, default=None, metavar='PCT',
                    help='repeat a round (every system once) in which any run saw more than '
                         'PCT%% CPU steal, up to --steal-retries times (default: keep all)')
    ap.add_argument('--steal-retries', type=int, default=5,
                    help='repeats of one round at most, with --max-steal (default: 5)')
    ap.add_argument('--sink-serve', type=int, metavar='PORT', help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.sink_serve:
        serve_sink(a.sink_serve)
        return 0

    systems = ['off', 'on'] + (['on_sampled'] if a.sampled else []) + (
        ['off_baseline'] if a.baseline else [])
    SAMPLED[0] = a.sampled
    need = [RPCD, RPC] + (list(binaries('off_baseline', a.baseline)) if a.baseline else [])
    missing = [x for x in need if not os.access(x, os.X_OK)]
    if missing:
        log('missing binaries:\n  ' + '\n  '.join(missing) +
            '\nbuild them first:  cargo build --release --bins')
        return 2
    if not shutil.which('rabbitmqctl'):
        log('note: rabbitmqctl not found; queues will not be deleted at the end')
    tag = f'{os.getpid()}_{int(time.time())}'
    queues = {s: f'bench_traces_{s}_{tag}' for s in systems}
    broker = broker_pid(a.url)
    if broker is None:
        log('note: broker pid not found; broker CPU will not be reported')
    meta = {'on_otel': sorted(f'{k}={v}' for k, v in os.environ.items()
                              if k.startswith('OTEL_') and k not in ON_DROP
                              and k not in ('OTEL_TRACES_EXPORTER',
                                            'OTEL_EXPORTER_OTLP_ENDPOINT'))}
    if a.baseline:
        meta['baseline'] = os.path.abspath(a.baseline)
        meta['baseline_config'] = baseline_config(a.baseline)

    sink = None
    daemons = {}
    results = {}
    t_begin = time.monotonic()
    try:
        sink = start_sink()
        sink_url = f'http://127.0.0.1:{sink.port}'
        log(f'OTLP sink on {sink_url} (pid {sink.pid})')
        envs = {s: child_env(s, a.url, sink_url) for s in systems}
        for s in systems:
            daemons[s] = start_rpcd(s, queues[s], a.url, sink_url, a.baseline)
            log(f'{NAMES[s]}: amqp-rpcd serving on {queues[s]} (pid {daemons[s].pid}, '
                f'config {daemons[s].config or "none"})')
        if meta['on_otel']:
            log(f"on: also {' '.join(meta['on_otel'])}")

        round_no = 0
        for c in a.concurrency:
            for i in range(a.runs):
                for attempt in range(a.steal_retries + 1):
                    round_no += 1
                    round_ = {}
                    for s in systems:
                        rep = measure(s, queues[s], c, a, envs[s], daemons[s], broker, sink)
                        rep['round'] = round_no
                        round_[s] = rep
                        sink_txt = ''
                        if s in ON:
                            sink_txt = (f"  sink {rep['sink_requests']} req "
                                        f"{rep['sink_kib']:.0f} KiB "
                                        f"{f_us(rep['sink_us_per_call'])} µs/call")
                            if not rep['sink_kib']:
                                log('  warning: the sink got nothing during this run')
                        log(f'c={c:<4} run {i + 1}/{a.runs} {NAMES[s]:<12} '
                            f"{rep['calls_per_sec']:>9.0f} calls/s  p50 {rep['p50_us']:>6}us  "
                            f"p99 {rep['p99_us']:>6}us  err {rep['errors']}  "
                            f"daemon {f_us(rep['daemon_us_per_call'])} "
                            f"cli {f_us(rep['client_us_per_call'])} "
                            f"broker {f_us(rep['broker_us_per_call'])} µs/call  "
                            f"steal {f_pct(rep['steal_pct'])}{sink_txt}")
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
        # The `on` daemon's last batch leaves up to OTEL_BSP_SCHEDULE_DELAY after its run.
        time.sleep(6)
        total = sink_stats(sink.port)
        on_runs = [r for (s, _), rs in results.items() if s in ON for r in rs]
        meta['late'] = (total['requests'] - sum(r['sink_requests'] for r in on_runs),
                        total['bytes'] / 1024 - sum(r['sink_kib'] for r in on_runs))
        if total['other']:
            log(f"note: the sink got {total['other']} requests on paths other than /v1/traces")
        for s, d in daemons.items():
            for line in warnings_of(d):
                log(f'{NAMES[s]} daemon: {line}')
    finally:
        for d in daemons.values():
            d.stop()
        if sink:
            sink.stop()
        delete_queues(queues.values())
    took = time.monotonic() - t_begin
    print(report(results, systems, a, meta))
    print(f'_Run took {took / 60:.1f} min._')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
