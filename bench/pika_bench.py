#!/usr/bin/env python3
"""Closed-loop load with N RabbitMQ-tutorial RPC clients (pika), one per process.

Each process runs the tutorial 6 `FibonacciRpcClient` unchanged (its own connection, an
exclusive server-named reply queue, one blocking call at a time) in a loop: warm-up first (not
recorded), then the measured phase. A call that starts before the end of the measured phase is
recorded, like `amqp-rpc bench`. The per-call latencies of all processes are merged and printed
as one JSON object on the last line, with the fields of `amqp-rpc bench --json`:
calls, ok, errors, calls_per_sec, p50_us, p90_us, p99_us, p999_us, max_us, elapsed_secs,
concurrency, error_kinds.

    python3 bench/pika_bench.py --queue rpc_queue --concurrency 8 --duration 5s --warmup 1s --json

Host and port come from AMQP_HOST / AMQP_PORT (defaults localhost / 5672), as in
tests/interop/tutorial_client.py; guest/guest is pika's default, as in the tutorial.

The tutorial client has no timeout. The only addition here is outside the client class: the
parent waits at most duration + warmup + --grace for the workers; a worker that has not reported
by then is killed and its unfinished call counted as error kind `timeout`.
"""
import argparse
import json
import math
import multiprocessing as mp
import os
import re
import sys
import time
import traceback

import pika
import uuid

AMQP_HOST = os.environ.get('AMQP_HOST', 'localhost')
AMQP_PORT = int(os.environ.get('AMQP_PORT', '5672'))
RPC_QUEUE = os.environ.get('RPC_QUEUE', 'rpc_queue')


# --- The tutorial's client, copied as is (tests/interop/tutorial_client.py). ---------------
class FibonacciRpcClient(object):

    def __init__(self):
        self.connection = pika.BlockingConnection(
            pika.ConnectionParameters(host=AMQP_HOST, port=AMQP_PORT))

        self.channel = self.connection.channel()

        result = self.channel.queue_declare(queue='', exclusive=True)
        self.callback_queue = result.method.queue

        self.channel.basic_consume(
            queue=self.callback_queue,
            on_message_callback=self.on_response,
            auto_ack=True)

        self.response = None
        self.corr_id = None

    def on_response(self, ch, method, props, body):
        if self.corr_id == props.correlation_id:
            self.response = body

    def call(self, n):
        self.response = None
        self.corr_id = str(uuid.uuid4())
        self.channel.basic_publish(
            exchange='',
            routing_key=RPC_QUEUE,
            properties=pika.BasicProperties(
                reply_to=self.callback_queue,
                correlation_id=self.corr_id,
            ),
            body=str(n))
        while self.response is None:
            self.connection.process_data_events(time_limit=None)
        return int(self.response)
# --- end of the tutorial's client. ---------------------------------------------------------


def parse_duration(s):
    """'5s', '500ms', '1m', '2.5s' or a bare number of seconds."""
    m = re.fullmatch(r'\s*([0-9.]+)\s*(ms|s|m|)\s*', s)
    if not m:
        raise argparse.ArgumentTypeError(f'bad duration {s!r}')
    v = float(m.group(1))
    return v * {'ms': 0.001, 's': 1.0, 'm': 60.0, '': 1.0}[m.group(2)]


def worker(idx, arg, ready, go, out):
    """One tutorial client in a closed loop. Reports (latencies_us, errors, last_end)."""
    errors = {}
    lat = []
    last_end = None
    try:
        client = FibonacciRpcClient()
    except Exception as e:  # cannot even connect: report and stop
        ready.put(idx)
        out.put((idx, [], {f'connect:{type(e).__name__}': 1}, None))
        return
    ready.put(idx)
    t_start, t_measure, t_stop = go.get()
    while time.monotonic() < t_start:
        time.sleep(0.0005)
    # Warm-up: not recorded.
    try:
        while time.monotonic() < t_measure:
            client.call(arg)
    except Exception as e:
        out.put((idx, [], {f'warmup:{type(e).__name__}': 1}, None))
        return
    # Measured phase.
    while True:
        t0 = time.monotonic()
        if t0 >= t_stop:
            break
        try:
            client.call(arg)
            ok = True
        except Exception as e:
            ok = False
            kind = type(e).__name__
            errors[kind] = errors.get(kind, 0) + 1
        t1 = time.monotonic()
        if ok:
            lat.append(max(1, int((t1 - t0) * 1e6)))
        last_end = t1
        if not ok:
            break  # the tutorial client is unusable after an error
    out.put((idx, lat, errors, last_end))
    try:
        client.connection.close()
    except Exception:
        pass


def quantile(sorted_vals, q):
    """Nearest-rank quantile (what an HDR histogram reports, up to its precision)."""
    if not sorted_vals:
        return 0
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q * len(sorted_vals)) - 1))
    return sorted_vals[k]


def main():
    global RPC_QUEUE
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--queue', default=RPC_QUEUE)
    ap.add_argument('--concurrency', type=int, default=8, help='client processes')
    ap.add_argument('--duration', type=parse_duration, default=10.0)
    ap.add_argument('--warmup', type=parse_duration, default=0.0)
    ap.add_argument('--arg', default='10', help='n of each fib(n) call')
    ap.add_argument('--grace', type=parse_duration, default=30.0,
                    help='extra wait for workers before they are killed')
    ap.add_argument('--json', action='store_true', help='print the JSON line last')
    a = ap.parse_args()
    RPC_QUEUE = a.queue  # read by the tutorial class; inherited by the forked workers

    ctx = mp.get_context('fork')
    ready, go, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(i, a.arg, ready, go, out), daemon=True)
             for i in range(a.concurrency)]
    for p in procs:
        p.start()
    for _ in procs:  # every client connected and declared its reply queue
        ready.get(timeout=60)
    t_start = time.monotonic() + 0.05
    t_measure = t_start + a.warmup
    t_stop = t_measure + a.duration
    for _ in procs:
        go.put((t_start, t_measure, t_stop))

    lat, errors, ends, reported = [], {}, [], set()
    deadline = t_stop + a.grace
    while len(reported) < len(procs):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            idx, l, e, end = out.get(timeout=left)
        except Exception:
            break
        reported.add(idx)
        lat.extend(l)
        for k, v in e.items():
            errors[k] = errors.get(k, 0) + v
        if end is not None:
            ends.append(end)
    for i, p in enumerate(procs):
        if i not in reported:
            errors['timeout'] = errors.get('timeout', 0) + 1
            p.kill()
        p.join(timeout=5)

    end = max(ends) if ends else time.monotonic()
    elapsed = max(1e-9, min(end, deadline) - t_measure)
    lat.sort()
    n_err = sum(errors.values())
    report = {
        'calls': len(lat) + n_err,
        'ok': len(lat),
        'errors': n_err,
        'calls_per_sec': (len(lat) + n_err) / elapsed,
        'p50_us': quantile(lat, 0.5),
        'p90_us': quantile(lat, 0.9),
        'p99_us': quantile(lat, 0.99),
        'p999_us': quantile(lat, 0.999),
        'max_us': lat[-1] if lat else 0,
        'elapsed_secs': elapsed,
        'concurrency': a.concurrency,
        'error_kinds': errors,
    }
    print(f"calls: {report['calls']}  ok: {report['ok']}  errors: {n_err}  "
          f"concurrency: {a.concurrency}  elapsed: {elapsed:.2f}s")
    print(f"throughput: {report['calls_per_sec']:.1f} calls/s")
    print(f"latency (us): p50 {report['p50_us']}  p90 {report['p90_us']}  "
          f"p99 {report['p99_us']}  p99.9 {report['p999_us']}  max {report['max_us']}")
    if a.json:
        print(json.dumps(report))
    return 0 if n_err == 0 else 1


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
