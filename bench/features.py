#!/usr/bin/env python3
"""Price each safety feature: two ladders of configurations, measured in alternating rounds.

Client ladder (every row against the plain bare echo server, one queue):
  bare client            bare_echo bench
  + confirms             bare_echo bench --confirms              (awaits each publish confirm)
  + mandatory            bare_echo bench --confirms --mandatory
  + deadline metadata    bare_echo bench --confirms --mandatory --deadline
  amqp-rpc client        amqp-rpc bench --no-retry --arg ARG     (the bare server echoes ARG)
  amqp-rpc, io thread    amqp-rpc bench --no-retry --io-thread   (lapin's own I/O thread)
  bare client, io task   bare_echo bench --io-task               (socket loop as a task)

Server ladder (every row driven by the plain bare client, `bare_echo bench`):
  bare server            bare_echo server                        (same run as "bare client")
  bare server, pipelined bare_echo server --pipelined            (acks from a task per request)
  + confirms             bare_echo server --confirms             (ack after the reply's confirm)
  amqp-rpcd, no confirms amqp-rpcd, AMQP_RPC__SERVICE__CONFIRM_REPLIES=false
  amqp-rpcd, log warn    amqp-rpcd, AMQP_RPC__LOG__LEVEL=warn    (no per-request span)
  amqp-rpcd as shipped   amqp-rpcd --config config.toml
  amqp-rpcd, io thread   amqp-rpcd, AMQP_RPC__AMQP__IO_THREAD=true
  bare server, io task   bare_echo server --io-task

The bare client sends no `type`, so amqp-rpcd runs its default method, fib, on the body: the
bare client accepts any reply. Each server has its own queue; all run for the whole script.
For each concurrency, every configuration runs once per round, in the order above, for --runs
rounds; the tables show the median of each figure and its change against the ladder's first
row, then the cost of each feature as the change between two neighbouring rows.

Builds nothing: run `cargo build --release --bins --examples` first. Python 3 stdlib only.
Markdown tables go to stdout, per-run lines to stderr.

    python3 bench/features.py --duration 10s --warmup 2s --runs 3 --concurrency 1 64
    python3 bench/features.py --duration 2s --warmup 1s --runs 1      # a quick check
"""
import argparse
import os
import shutil
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C  # noqa: E402  (the servers, /proc helpers and formatting of compare.py)

# id: (ladder, label, server id, client kind, client flags)
CONFIGS = [
    ('bare', 'bare client / bare server', 'bare', 'bare', []),
    ('c_conf', '+ confirms', 'bare', 'bare', ['--confirms']),
    ('c_mand', '+ mandatory', 'bare', 'bare', ['--confirms', '--mandatory']),
    ('c_dead', '+ deadline metadata', 'bare', 'bare', ['--confirms', '--mandatory', '--deadline']),
    ('c_rpc', 'amqp-rpc client', 'bare', 'rpc', []),
    ('c_rpc_thread', 'amqp-rpc client, io thread', 'bare', 'rpc', ['--io-thread']),
    ('c_task', 'bare client, io task', 'bare', 'bare', ['--io-task']),
    ('s_pipe', 'bare server, pipelined acks', 'bare_pipe', 'bare', []),
    ('s_conf', 'bare server + confirms', 'bare_conf', 'bare', []),
    ('s_rpcd_noconf', 'amqp-rpcd, confirm_replies = false', 'rpcd_noconf', 'bare', []),
    ('s_rpcd_warn', 'amqp-rpcd, log level warn', 'rpcd_warn', 'bare', []),
    ('s_rpcd', 'amqp-rpcd as shipped', 'rpcd', 'bare', []),
    ('s_rpcd_thread', 'amqp-rpcd, io_thread = true', 'rpcd_thread', 'bare', []),
    ('s_task', 'bare server, io task', 'bare_task', 'bare', []),
]
LABEL = {c[0]: c[1] for c in CONFIGS}
CLIENT_LADDER = ['bare', 'c_conf', 'c_mand', 'c_dead', 'c_rpc', 'c_rpc_thread', 'c_task']
SERVER_LADDER = ['bare', 's_pipe', 's_conf', 's_rpcd_noconf', 's_rpcd_warn', 's_rpcd',
                 's_rpcd_thread', 's_task']
CLIENT_LABEL = {'bare': 'bare client', 'c_conf': '+ confirms', 'c_mand': '+ mandatory',
                'c_dead': '+ deadline metadata', 'c_rpc': 'amqp-rpc client (`--no-retry`)',
                'c_rpc_thread': 'amqp-rpc client, socket loop on lapin\'s thread (`--io-thread`)',
                'c_task': 'bare client, socket loop as a task (`--io-task`)'}
SERVER_LABEL = {'bare': 'bare server',
                's_pipe': 'bare server, acks from a task per request (`--pipelined`)',
                's_conf': '+ confirmed replies (`--confirms`)',
                's_rpcd_noconf': 'amqp-rpcd, `confirm_replies = false`',
                's_rpcd_warn': 'amqp-rpcd, `log.level = warn`',
                's_rpcd': 'amqp-rpcd as shipped',
                's_rpcd_thread': 'amqp-rpcd, socket loop on lapin\'s thread (`io_thread = true`)',
                's_task': 'bare server, socket loop as a task (`--io-task`)'}
# (feature, row without it, row with it)
CLIENT_COSTS = [
    ('publisher confirms, awaited per call', 'bare', 'c_conf'),
    ('mandatory publish', 'c_conf', 'c_mand'),
    ('deadline metadata (header, expiration, message_id, type, content_type)', 'c_mand',
     'c_dead'),
    ('rest of the amqp-rpc client, against the bare client with all three', 'c_dead', 'c_rpc'),
    ('amqp-rpc client, all in, against the bare client', 'bare', 'c_rpc'),
    ('socket loop as a task instead of lapin\'s thread, amqp-rpc client', 'c_rpc_thread',
     'c_rpc'),
    ('socket loop as a task instead of lapin\'s thread, bare client', 'bare', 'c_task'),
]
SERVER_COSTS = [
    ('acks from a task per request (pipelining, not a safety feature), bare server', 'bare',
     's_pipe'),
    ('confirmed replies, bare server (pipelined)', 's_pipe', 's_conf'),
    ('amqp-rpcd without reply confirms, against the pipelined bare server', 's_pipe',
     's_rpcd_noconf'),
    ('confirmed replies (`confirm_replies = true`), amqp-rpcd', 's_rpcd_noconf', 's_rpcd'),
    ('per-request tracing span (`log.level = info`), amqp-rpcd', 's_rpcd_warn', 's_rpcd'),
    ('amqp-rpcd as shipped, against the bare server with confirmed replies', 's_conf',
     's_rpcd'),
    ('amqp-rpcd as shipped, against the plain bare server', 'bare', 's_rpcd'),
    ('socket loop as a task instead of lapin\'s thread, amqp-rpcd', 's_rpcd_thread', 's_rpcd'),
    ('socket loop as a task instead of lapin\'s thread, bare server', 'bare', 's_task'),
]
SERVER_NAMES = {'bare': 'bare echo server', 'bare_pipe': 'bare echo server --pipelined',
                'bare_conf': 'bare echo server --confirms',
                'rpcd_noconf': 'amqp-rpcd confirm_replies=false',
                'rpcd_warn': 'amqp-rpcd log.level=warn', 'rpcd': 'amqp-rpcd as shipped',
                'rpcd_thread': 'amqp-rpcd io_thread=true', 'bare_task': 'bare echo server --io-task'}


def start_rpcd(queue, url, extra_env):
    """amqp-rpcd --config config.toml on `queue`, its HTTP listener on a free port."""
    port = C.free_port()
    env = dict(os.environ, AMQP_RPC__AMQP__URL=url, AMQP_RPC__SERVICE__QUEUE=queue,
               AMQP_RPC__SERVICE__QUEUE_TYPE='classic',
               AMQP_RPC__HTTP__LISTEN=f'127.0.0.1:{port}', **extra_env)
    env.pop('RUST_LOG', None)  # RUST_LOG would override log.level

    def ready(_):
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=1) as r:
                return r.status == 200
        except OSError:
            return False
    srv = C.Server('amqp-rpcd', [C.RPCD, '--config', C.CONFIG], env, ready)
    srv.metrics_port = port
    return srv


def error_replies(srv):
    """amqp-rpcd's answered requests with an outcome other than ok (None: not amqp-rpcd).

    The bare client takes any reply as success, so this is how an error reply is noticed."""
    port = getattr(srv, 'metrics_port', None)
    if port is None:
        return None
    try:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    return sum(float(line.rsplit(None, 1)[1]) for line in text.splitlines()
               if line.startswith('amqp_rpc_requests_total{')
               and 'outcome="ok"' not in line)


def start_bare(queue, url, flags):
    env = dict(os.environ, AMQP_URL=url)
    return C.Server('bare_echo', [C.BARE, 'server', '--queue', queue] + flags, env,
                    lambda s: 'bare echo serving' in s.log())


def client_argv(kind, flags, queue, conc, a):
    common = ['--queue', queue, '--arg', a.arg, '--concurrency', str(conc),
              '--duration', C.fmt_dur(a.duration), '--warmup', C.fmt_dur(a.warmup), '--json']
    if kind == 'rpc':
        return [C.RPC, 'bench', '--no-retry'] + common + flags
    return [C.BARE, 'bench'] + common + flags


def measure(argv, url, a, srv, broker):
    """Run one bench process; its JSON report plus CPU of server, broker, client, machine."""
    e0 = error_replies(srv)
    window = C.CpuWindow([srv.pid], broker)
    rep = C.run_json(argv, dict(os.environ, AMQP_URL=url), a.duration + a.warmup + 120)
    rep.update(window.close())
    rep['server_cpu_pct'] = rep.pop('procs_cpu_pct')
    e1 = error_replies(srv)
    if e0 is not None and e1 is not None and e1 > e0:
        # Counted with the warm-up; still, any error reply makes the row suspect.
        rep['errors'] += int(e1 - e0)
        rep.setdefault('error_kinds', {})['error replies (server /metrics)'] = int(e1 - e0)
    # CPU per call: the CPU share over the whole run (warm-up and connect included) divided by
    # the measured rate, in µs; assumes the warm-up ran at about the measured rate.
    for who in ('server', 'broker', 'client'):
        p = rep[f'{who}_cpu_pct']
        rep[f'{who}_us_per_call'] = (None if p is None or not rep['calls_per_sec']
                                     else p / 100.0 * 1e6 / rep['calls_per_sec'])
    return rep


# --- report -------------------------------------------------------------------------------

KEYS = ('calls_per_sec', 'p50_us', 'p99_us', 'server_cpu_pct', 'broker_cpu_pct',
        'client_cpu_pct', 'machine_busy_pct', 'server_us_per_call', 'broker_us_per_call',
        'client_us_per_call', 'steal_pct')


def medians(runs):
    m = {k: C.med([r.get(k) for r in runs]) for k in KEYS}
    m['errors'] = sum(r['errors'] for r in runs)
    cps = [r['calls_per_sec'] for r in runs]
    m['range'] = (min(cps), max(cps))
    return m


def change(new, old):
    """Relative change in %, signed."""
    if new is None or not old:
        return None
    return 100.0 * (new - old) / old


def f_chg(x):
    if x is None:
        return '–'
    if abs(x) < 0.5:
        return '±0%'
    return f'{x:+.0f}%'


def f_us(x):
    return '–' if x is None else f'{x:,.0f}'


def ladder_table(p, title, rows, labels, med_tab, c):
    base = med_tab.get((rows[0], c))
    p(title)
    p('')
    p('| configuration | calls/s | Δ calls/s | p50 | Δ p50 | p99 | Δ p99 | server CPU/call | '
      'client CPU/call | broker CPU/call | steal | errors |')
    p('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        m = med_tab.get((r, c))
        if not m:
            continue

        def d(k):
            return '' if r == rows[0] else f_chg(change(m[k], base and base[k]))
        p(f"| {labels[r]} | {C.f_int(m['calls_per_sec'])} | {d('calls_per_sec')} | "
          f"{C.f_int(m['p50_us'])} | {d('p50_us')} | {C.f_int(m['p99_us'])} | {d('p99_us')} | "
          f"{f_us(m['server_us_per_call'])} | {f_us(m['client_us_per_call'])} | "
          f"{f_us(m['broker_us_per_call'])} | {C.f_pct(m['steal_pct'])} | {m['errors']} |")
    p('')


def cost_table(p, title, costs, med_tab, concs):
    p(title)
    p('')
    p('| feature | conc | calls/s | p50 | p99 | server CPU/call | client CPU/call | '
      'broker CPU/call |')
    p('|---|---:|---:|---:|---:|---:|---:|---:|')
    for name, without, with_ in costs:
        for c in concs:
            a, b = med_tab.get((without, c)), med_tab.get((with_, c))
            if not (a and b):
                continue
            p(f'| {name} | {c} | ' + ' | '.join(
                f_chg(change(b[k], a[k])) for k in
                ('calls_per_sec', 'p50_us', 'p99_us', 'server_us_per_call',
                 'client_us_per_call', 'broker_us_per_call')) + ' |')
    p('')


def report(results, a, ladders, discarded=()):
    out = []
    p = out.append
    med_tab = {k: medians(v) for k, v in results.items()}
    head = (f'median of {a.runs} run{"s" if a.runs != 1 else ""}, {C.fmt_dur(a.duration)} '
            f'measured after {C.fmt_dur(a.warmup)} warm-up, body "{a.arg}", classic queue')
    p(f'## Cost of each safety feature ({head})')
    p('')
    p('Latencies in µs. Δ is the change of the median against the first row of the table. '
      'CPU per call is in µs: the process\'s CPU over the whole bench run (warm-up and '
      'connect included) ÷ the measured calls/s. "server" is the bare echo server or '
      'amqp-rpcd, "client" the bench process, "broker" the RabbitMQ node. '
      f'The machine has {os.cpu_count()} cores, shared by the broker, the server and the '
      'load generator. errors: calls that failed, plus error replies counted by amqp-rpcd '
      '(its /metrics, warm-up included), which the bare client would take for success. '
      'steal: the share of the machine\'s CPU time the hypervisor gave to other guests.')
    if a.max_steal is not None:
        p('')
        p(f'Runs repeated because they saw more than {a.max_steal:g}% steal: '
          f'{len(discarded)}.')
    p('')
    for c in a.concurrency:
        if 'client' in ladders:
            ladder_table(p, f'### Client features, {c} in flight (server: plain bare echo)',
                         CLIENT_LADDER, CLIENT_LABEL, med_tab, c)
            p('The bare client with `--confirms` awaits each publish confirm before the reply, '
              'as a simple client would. amqp-rpc\'s client awaits the reply first and looks '
              'at the confirm only when the reply is late (`src/client/mod.rs`).')
            p('')
        if 'server' in ladders:
            ladder_table(p, f'### Server features, {c} in flight (client: plain bare echo '
                            'bench; amqp-rpcd runs fib on the body)',
                         SERVER_LADDER, SERVER_LABEL, med_tab, c)
    p('### Cost of each feature (change between two rows, medians)')
    p('')
    p('Each line compares the configuration with the feature against the one without it; '
      'a negative calls/s change and positive latency and CPU changes are the cost.')
    p('')
    if 'client' in ladders:
        cost_table(p, '#### Client side', CLIENT_COSTS, med_tab, a.concurrency)
    if 'server' in ladders:
        cost_table(p, '#### Server side', SERVER_COSTS, med_tab, a.concurrency)
    return '\n'.join(out)


# --- main ---------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n\n', 1)[1])
    ap.add_argument('--url', default=os.environ.get('AMQP_URL', C.DEFAULT_URL))
    ap.add_argument('--concurrency', type=int, nargs='+', default=[1, 64],
                    help='calls in flight (default: 1 64)')
    ap.add_argument('--ladders', nargs='+', choices=['client', 'server'],
                    default=['client', 'server'])
    ap.add_argument('--runs', type=int, default=3, help='rounds per concurrency (default 3)')
    ap.add_argument('--duration', type=C.parse_duration, default=10.0,
                    help='measured, e.g. 10s (default)')
    ap.add_argument('--warmup', type=C.parse_duration, default=2.0,
                    help='unrecorded, e.g. 2s (default)')
    ap.add_argument('--arg', default='10', help='request body (default 10: fib(10) for '
                                                'amqp-rpcd, echoed by the bare server)')
    ap.add_argument('--max-steal', type=float, default=None, metavar='PCT',
                    help='repeat a run that saw more than PCT%% CPU steal, up to '
                         '--steal-retries times (default: keep all)')
    ap.add_argument('--steal-retries', type=int, default=3,
                    help='repeats of one run at most, with --max-steal (default: 3)')
    a = ap.parse_args()

    missing = [x for x in (C.RPCD, C.RPC, C.BARE) if not os.access(x, os.X_OK)]
    if missing:
        C.log('missing binaries:\n  ' + '\n  '.join(missing) +
              '\nbuild them first:  cargo build --release --bins --examples')
        return 2
    if not shutil.which('rabbitmqctl'):
        C.log('note: rabbitmqctl not found; queues will not be deleted at the end')
    ladders = set(a.ladders)
    configs = [c for c in CONFIGS
               if ('client' in ladders and c[0] in CLIENT_LADDER)
               or ('server' in ladders and c[0] in SERVER_LADDER)]
    needed = {c[2] for c in configs}
    tag = f'{os.getpid()}_{int(time.time())}'
    queues = {s: f'bench_feat_{s}_{tag}' for s in needed}
    broker = C.broker_pid(a.url)
    if broker is None:
        C.log('note: broker pid not found; broker CPU will not be reported')

    servers = {}
    results = {}
    discarded = []
    t_begin = time.monotonic()
    try:
        for s in sorted(needed):
            q = queues[s]
            if s == 'bare':
                servers[s] = start_bare(q, a.url, [])
            elif s == 'bare_pipe':
                servers[s] = start_bare(q, a.url, ['--pipelined'])
            elif s == 'bare_conf':
                servers[s] = start_bare(q, a.url, ['--confirms'])
            elif s == 'rpcd_noconf':
                servers[s] = start_rpcd(q, a.url, {'AMQP_RPC__SERVICE__CONFIRM_REPLIES': 'false'})
            elif s == 'rpcd_warn':
                servers[s] = start_rpcd(q, a.url, {'AMQP_RPC__LOG__LEVEL': 'warn'})
            elif s == 'rpcd_thread':
                servers[s] = start_rpcd(q, a.url, {'AMQP_RPC__AMQP__IO_THREAD': 'true'})
            elif s == 'bare_task':
                servers[s] = start_bare(q, a.url, ['--io-task'])
            else:
                servers[s] = start_rpcd(q, a.url, {})
            C.log(f'{SERVER_NAMES[s]} serving on {q} (pid {servers[s].pid})')

        for c in a.concurrency:
            for i in range(a.runs):
                for cid, label, sid, kind, flags in configs:
                    argv = client_argv(kind, flags, queues[sid], c, a)
                    for attempt in range(a.steal_retries + 1):
                        rep = measure(argv, a.url, a, servers[sid], broker)
                        C.log(f'c={c:<4} run {i + 1}/{a.runs} {label:<36} '
                              f"{rep['calls_per_sec']:>8.0f} calls/s  p50 {rep['p50_us']:>6}us  "
                              f"p99 {rep['p99_us']:>6}us  err {rep['errors']}  "
                              f"srv {C.f_pct(rep['server_cpu_pct'])} "
                              f"broker {C.f_pct(rep['broker_cpu_pct'])} "
                              f"client {C.f_pct(rep['client_cpu_pct'])} "
                              f"machine {C.f_pct(rep['machine_busy_pct'])} "
                              f"steal {C.f_pct(rep['steal_pct'])}")
                        if rep['errors']:
                            C.log(f"  error kinds: {rep.get('error_kinds')}")
                        if (a.max_steal is None or (rep['steal_pct'] or 0) <= a.max_steal
                                or attempt == a.steal_retries):
                            break
                        discarded.append((cid, c))
                        C.log(f"  run repeated: steal {rep['steal_pct']:.0f}% > {a.max_steal:g}%")
                    results.setdefault((cid, c), []).append(rep)
    finally:
        for srv in servers.values():
            srv.stop()
        C.delete_queues(queues.values())
    took = time.monotonic() - t_begin
    print(report(results, a, ladders, discarded))
    print(f'_Run took {took / 60:.1f} min._')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
