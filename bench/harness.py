"""What the bench scripts share: paths, the servers' process handling, /proc CPU accounting
(with steal), running one bench client, and table formatting.

Python 3 stdlib only. `compare.py` re-exports these names, so `features.py` and `scaling.py`
reach them as `compare.X` too.
"""
import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RPCD = os.path.join(ROOT, 'target/release/amqp-rpcd')
RPC = os.path.join(ROOT, 'target/release/amqp-rpc')
BARE = os.path.join(ROOT, 'target/release/examples/bare_echo')
CONFIG = os.path.join(ROOT, 'config.toml')
DEFAULT_URL = 'amqp://guest:guest@127.0.0.1:5672/%2f'
CLK_TCK = os.sysconf('SC_CLK_TCK')


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def parse_duration(s):
    m = re.fullmatch(r'\s*([0-9.]+)\s*(ms|s|m|)\s*', s)
    if not m:
        raise argparse.ArgumentTypeError(f'bad duration {s!r}')
    return float(m.group(1)) * {'ms': 0.001, 's': 1.0, 'm': 60.0, '': 1.0}[m.group(2)]


def fmt_dur(secs):
    return f'{int(secs * 1000)}ms' if secs < 1 or secs != int(secs) else f'{int(secs)}s'


def proc_cpu_ticks(pid):
    """utime + stime of a process, in clock ticks (None if it is gone)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rindex(')') + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)


def proc_rss_kib(pid):
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def machine_ticks():
    """(busy, total, steal) jiffies of all CPUs, from /proc/stat. Steal is time the hypervisor
    gave our virtual CPUs to someone else: on a shared host it is the main source of noise
    between runs, so it is reported next to every figure and not counted as busy."""
    with open('/proc/stat') as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    steal = v[7] if len(v) > 7 else 0
    total = sum(v[:8])
    return total - idle - steal, total, steal


def broker_pid(url=None):
    """The pid of the broker process listening on `url`'s port (default 5672).

    By the listening socket, so a node chrooted in a folder (deploy/local/rabbitmq4.sh) is
    found as well as the host's own; `rabbitmqctl status` only ever names the host's node.
    """
    port = 5672
    if url:
        port = urllib.parse.urlparse(url.split(',')[0]).port or 5672
    try:
        out = subprocess.run(['ss', '-Hltnp', f'sport = :{port}'], capture_output=True,
                             text=True, timeout=10).stdout
        m = re.search(r'pid=(\d+)', out)
        if m:
            return int(m.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    if port != 5672:
        return None
    out = subprocess.run(['pgrep', '-f', 'beam.smp.*rabbit'], capture_output=True,
                         text=True).stdout.split()
    return int(out[0]) if out else None


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Server:
    """A server process whose stderr goes to a temp file, ready when `ready()` says so."""

    def __init__(self, name, argv, env, ready, stdout=subprocess.DEVNULL, timeout=30):
        self.name = name
        self.errfile = tempfile.NamedTemporaryFile(prefix=f'bench-{name}-', suffix='.log',
                                                   delete=False)
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=stdout,
                                     stderr=self.errfile, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not ready(self):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f'{name} did not become ready; its log:\n{self.log()}')
            time.sleep(0.1)

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        with open(self.errfile.name, errors='replace') as f:
            return f.read()[-4000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.errfile.close()
        try:
            os.unlink(self.errfile.name)
        except OSError:
            pass


def delete_queues(queues):
    """Delete the bench's queues (best effort: needs rabbitmqctl on this machine)."""
    if shutil.which('rabbitmqctl'):
        for q in queues:
            subprocess.run(['rabbitmqctl', 'delete_queue', q, '-q'], capture_output=True,
                           timeout=60)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f_int(x):
    return '–' if x is None else f'{x:,.0f}'


def f_pct(x):
    return '–' if x is None else f'{x:.0f}%'


def f_mib(kib):
    return '–' if kib is None else f'{kib / 1024:.1f} MiB'


def f_ratio(x):
    return '–' if x is None else f'{x:.2f}×'


def ratio(a, b):
    return None if a is None or not b else a / b


class CpuWindow:
    """CPU used over one bench run, in % of one core: by `pids` (summed), the broker, this
    script's children (the bench client), the whole machine (busy, steal left out), and the
    share of the machine's time stolen by the hypervisor."""

    def __init__(self, pids, broker):
        self.pids = list(pids)
        self.broker = broker
        self.p0 = [proc_cpu_ticks(p) for p in self.pids]
        self.b0 = proc_cpu_ticks(broker) if broker else None
        self.ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.m0 = machine_ticks()
        self.t0 = time.monotonic()

    def close(self):
        """The figures since the window opened: a dict of `procs_cpu_pct`, `broker_cpu_pct`,
        `client_cpu_pct`, `machine_busy_pct`, `steal_pct` and `wall_secs`."""
        wall = time.monotonic() - self.t0
        m1 = machine_ticks()
        p1 = [proc_cpu_ticks(p) for p in self.pids]
        b1 = proc_cpu_ticks(self.broker) if self.broker else None
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)

        def pct(ticks):
            return None if ticks is None else 100.0 * ticks / CLK_TCK / wall
        deltas = [None if x is None or y is None else y - x for x, y in zip(self.p0, p1)]
        busy, total, steal = (m1[i] - self.m0[i] for i in range(3))
        return {
            'procs_cpu_pct': None if not deltas or None in deltas else pct(sum(deltas)),
            'broker_cpu_pct': None if self.b0 is None or b1 is None else pct(b1 - self.b0),
            'client_cpu_pct': 100.0 * ((ru1.ru_utime + ru1.ru_stime) -
                                       (self.ru0.ru_utime + self.ru0.ru_stime)) / wall,
            'machine_busy_pct': 100.0 * os.cpu_count() * busy / total if total else None,
            'steal_pct': 100.0 * steal / total if total else None,
            'wall_secs': wall,
        }


def run_json(argv, env, timeout):
    """Run one bench client and return the JSON report on its last line of output."""
    r = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f'bench failed (exit {r.returncode}): {" ".join(argv)}\n'
                           f'{r.stdout[-2000:]}\n{r.stderr[-2000:]}')
