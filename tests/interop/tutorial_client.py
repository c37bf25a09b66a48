#!/usr/bin/env python3
"""RPC client from the RabbitMQ tutorial 6 (Python, pika 1.x), kept as is.

Differences from the tutorial, nothing else:
  * host, port and queue come from the environment
    (AMQP_HOST default 'localhost', AMQP_PORT default 5672,
    RPC_QUEUE default 'rpc_queue');
  * the values of n come from argv (default: 30), each answer is also
    printed as a line `fib(N) = VALUE`;
  * RPC_TIMEOUT_S (default 30): a signal.alarm guard, so a broken server
    makes the script fail (exit 1) instead of hanging forever. This is the
    only addition besides the env/argv handling.
"""
import os
import signal
import sys

import pika
import uuid

AMQP_HOST = os.environ.get('AMQP_HOST', 'localhost')
AMQP_PORT = int(os.environ.get('AMQP_PORT', '5672'))
RPC_QUEUE = os.environ.get('RPC_QUEUE', 'rpc_queue')
RPC_TIMEOUT_S = int(os.environ.get('RPC_TIMEOUT_S', '30'))


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


# Addition: timeout guard (see module docstring).
def _on_timeout(signum, frame):
    print(f"tutorial_client: no reply within {RPC_TIMEOUT_S}s "
          f"(queue {RPC_QUEUE!r} on {AMQP_HOST}:{AMQP_PORT})",
          file=sys.stderr, flush=True)
    os._exit(1)


signal.signal(signal.SIGALRM, _on_timeout)
signal.alarm(RPC_TIMEOUT_S)

fibonacci_rpc = FibonacciRpcClient()

for n in sys.argv[1:] or ['30']:
    signal.alarm(RPC_TIMEOUT_S)
    print(f" [x] Requesting fib({n})", flush=True)
    response = fibonacci_rpc.call(n)
    print(f" [.] Got {response}", flush=True)
    print(f"fib({n}) = {response}", flush=True)

signal.alarm(0)
fibonacci_rpc.connection.close()
