#!/usr/bin/env python3
"""RPC server from the RabbitMQ tutorial 6 (Python, pika 1.x), kept as is.

Differences from the tutorial, nothing else:
  * host, port and queue come from the environment
    (AMQP_HOST default 'localhost', AMQP_PORT default 5672,
    RPC_QUEUE default 'rpc_queue');
  * prints are flushed, so " [x] Awaiting RPC requests" is a reliable
    ready line for whoever spawned the script;
  * SIGTERM stops it cleanly (exit status 0), like Ctrl-C.
"""
import os
import signal
import sys

import pika

AMQP_HOST = os.environ.get('AMQP_HOST', 'localhost')
AMQP_PORT = int(os.environ.get('AMQP_PORT', '5672'))
RPC_QUEUE = os.environ.get('RPC_QUEUE', 'rpc_queue')


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


signal.signal(signal.SIGTERM, _on_sigterm)

connection = pika.BlockingConnection(
    pika.ConnectionParameters(host=AMQP_HOST, port=AMQP_PORT))

channel = connection.channel()

channel.queue_declare(queue=RPC_QUEUE)


def fib(n):
    if n == 0:
        return 0
    elif n == 1:
        return 1
    else:
        return fib(n - 1) + fib(n - 2)


def on_request(ch, method, props, body):
    n = int(body)

    print(f" [.] fib({n})", flush=True)
    response = fib(n)

    ch.basic_publish(exchange='',
                     routing_key=props.reply_to,
                     properties=pika.BasicProperties(correlation_id=props.correlation_id),
                     body=str(response))
    ch.basic_ack(delivery_tag=method.delivery_tag)


channel.basic_qos(prefetch_count=1)
channel.basic_consume(queue=RPC_QUEUE, on_message_callback=on_request)

print(" [x] Awaiting RPC requests", flush=True)
try:
    channel.start_consuming()
except KeyboardInterrupt:
    print(" [x] Stopping", flush=True)
    try:
        connection.close()
    except Exception:
        pass
    sys.exit(0)
