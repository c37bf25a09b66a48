#!/usr/bin/env node
// RPC server from the RabbitMQ tutorial 6, Node.js port: javascript-nodejs/src/rpc_server.js
// of the rabbitmq-tutorials repository (commit 0b32ef60), Copyright the RabbitMQ tutorials'
// authors, Apache License 2.0. Library: amqplib (callback API), as the tutorial's
// package.json pins it (0.10.9). Its logic and queue declaration are kept as is: the
// tutorial declares a durable quorum queue.
//
// Differences from the tutorial, nothing else:
//   * host, port and queue come from the environment (AMQP_HOST default 'localhost',
//     AMQP_PORT default 5672, RPC_QUEUE default 'rpc_queue').

var amqp = require('amqplib/callback_api');

var url = 'amqp://' + (process.env.AMQP_HOST || 'localhost') + ':' + (process.env.AMQP_PORT || '5672');

amqp.connect(url, function(error0, connection) {
    if (error0) {
        throw error0;
    }
    connection.createChannel(function(error1, channel) {
        if (error1) {
            throw error1;
        }
        var queue = process.env.RPC_QUEUE || 'rpc_queue';

        channel.assertQueue(queue, {
            durable: true,
            arguments: { 'x-queue-type': 'quorum' }
        });
        channel.prefetch(1);
        console.log(' [x] Awaiting RPC requests');
        channel.consume(queue, function reply(msg) {
            var n = parseInt(msg.content.toString());

            console.log(" [.] fib(%d)", n);

            var r = fibonacci(n);

            channel.sendToQueue(msg.properties.replyTo,
                Buffer.from(r.toString()), {
                    correlationId: msg.properties.correlationId
                });

            channel.ack(msg);
        });
    });
});

function fibonacci(n) {
    if (n === 0 || n === 1)
        return n;
    else
        return fibonacci(n - 1) + fibonacci(n - 2);
}
