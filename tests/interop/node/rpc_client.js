#!/usr/bin/env node
// RPC client from the RabbitMQ tutorial 6, Node.js port: javascript-nodejs/src/rpc_client.js
// of the rabbitmq-tutorials repository (commit 6afdacbd), Copyright the RabbitMQ tutorials'
// authors, Apache License 2.0. Library: amqplib (callback API), as the tutorial's
// package.json pins it (0.10.9). Its logic and queue declaration are kept as is.
//
// Differences from the tutorial, nothing else:
//   * host, port and queue come from the environment (AMQP_HOST default 'localhost',
//     AMQP_PORT default 5672, RPC_QUEUE default 'rpc_queue');
//   * the answer is also printed as a line `fib(N) = VALUE`.

var amqp = require('amqplib/callback_api');

var url = 'amqp://' + (process.env.AMQP_HOST || 'localhost') + ':' + (process.env.AMQP_PORT || '5672');
var rpcQueue = process.env.RPC_QUEUE || 'rpc_queue';

var args = process.argv.slice(2);

if (args.length === 0) {
    console.log("Usage: rpc_client.js num");
    process.exit(1);
}

amqp.connect(url, function(error0, connection) {
    if (error0) {
        throw error0;
    }
    connection.createChannel(function(error1, channel) {
        if (error1) {
            throw error1;
        }
        channel.assertQueue('', {
            exclusive: true
        }, function(error2, q) {
            if (error2) {
                throw error2;
            }
            var correlationId = generateUuid();
            var num = parseInt(args[0]);

            console.log(' [x] Requesting fib(%d)', num);

            channel.consume(q.queue, function(msg) {
                if (msg.properties.correlationId === correlationId) {
                    console.log(' [.] Got %s', msg.content.toString());
                    console.log('fib(%d) = %s', num, msg.content.toString());
                    setTimeout(function() {
                        connection.close();
                        process.exit(0);
                    }, 500);
                }
            }, {
                noAck: true
            });

            channel.sendToQueue(rpcQueue,
                Buffer.from(num.toString()), {
                    correlationId: correlationId,
                    replyTo: q.queue
                });
        });
    });
});

function generateUuid() {
    return Math.random().toString() +
        Math.random().toString() +
        Math.random().toString();
}
