#!/usr/bin/env python3
"""A client that reuses correlation ids on a named reply queue, as some do.

Each run is a new process that, like a client restarted with a counter
starting at 1 again, sends every request with correlation_id "1" and
waits on the shared, named reply queue REPLY_QUEUE (declared here,
non-exclusive, so the next process uses the same one).

  reused_ids_client.py METHOD BODY [METHOD BODY ...]

prints one line per call: `<body>` or `error <x-error-code>: <body>`.
"""
import os
import signal
import sys

import pika

host = os.environ.get('AMQP_HOST', 'localhost')
port = int(os.environ.get('AMQP_PORT', '5672'))
queue = os.environ['RPC_QUEUE']
reply_queue = os.environ['REPLY_QUEUE']
signal.alarm(int(os.environ.get('RPC_TIMEOUT_S', '20')))

conn = pika.BlockingConnection(pika.ConnectionParameters(host=host, port=port))
ch = conn.channel()
ch.queue_declare(queue=reply_queue, durable=True)
args = sys.argv[1:]
for method, body in zip(args[::2], args[1::2]):
    ch.basic_publish(
        exchange='', routing_key=queue, body=body,
        properties=pika.BasicProperties(
            reply_to=reply_queue, correlation_id='1', type=method))
    for _method, props, reply in ch.consume(reply_queue, auto_ack=True):
        if props.correlation_id == '1':
            break
    ch.cancel()
    code = (props.headers or {}).get('x-error-code')
    text = reply.decode()
    print(f'error {code}: {text}' if code else text, flush=True)
conn.close()
