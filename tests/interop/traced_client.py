#!/usr/bin/env python3
"""The tutorial's RPC client (pika 1.x), carrying a W3C `traceparent` header.

  traced_client.py TRACEPARENT N [TRACEPARENT N ...]

Each pair is one call of fib(N) (`type` "fib", body N) on RPC_QUEUE, with the
header `traceparent: TRACEPARENT`, or without any header when TRACEPARENT is
`-`. N written `=N` sends no `type` at all, as the tutorial's own client does (the
daemon's default method answers). Replies come to an exclusive reply queue, as in the tutorial. Prints one
JSON object per call:

  {"correlation_id": ..., "body": ..., "error_code": ... or null,
   "traceparent": the reply's traceparent header or null}

AMQP_HOST, AMQP_PORT, RPC_QUEUE and RPC_TIMEOUT_S (default 20: a
signal.alarm guard, so a missing reply fails the script) as for the other
interop scripts.
"""
import json
import os
import signal
import sys
import uuid

import pika

host = os.environ.get('AMQP_HOST', 'localhost')
port = int(os.environ.get('AMQP_PORT', '5672'))
queue = os.environ['RPC_QUEUE']
signal.alarm(int(os.environ.get('RPC_TIMEOUT_S', '20')))


def text(value):
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


conn = pika.BlockingConnection(pika.ConnectionParameters(host=host, port=port))
ch = conn.channel()
reply_queue = ch.queue_declare(queue='', exclusive=True).method.queue
args = sys.argv[1:]
for traceparent, n in zip(args[::2], args[1::2]):
    corr_id = str(uuid.uuid4())
    headers = None if traceparent == '-' else {'traceparent': traceparent}
    untyped = n.startswith('=')
    ch.basic_publish(
        exchange='', routing_key=queue, body=n.lstrip('='),
        properties=pika.BasicProperties(
            reply_to=reply_queue, correlation_id=corr_id,
            type=None if untyped else 'fib', headers=headers))
    for _method, props, reply in ch.consume(reply_queue, auto_ack=True):
        if props.correlation_id == corr_id:
            break
    ch.cancel()
    reply_headers = props.headers or {}
    print(json.dumps({
        'correlation_id': corr_id,
        'body': reply.decode(errors='replace'),
        'error_code': text(reply_headers.get('x-error-code')),
        'traceparent': text(reply_headers.get('traceparent')),
    }), flush=True)
conn.close()
