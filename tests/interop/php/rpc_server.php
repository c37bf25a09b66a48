<?php
// RPC server from the RabbitMQ tutorial 6, PHP port: php/rpc_server.php of the
// rabbitmq-tutorials repository (commit 0b32ef60), Copyright the RabbitMQ tutorials'
// authors, Apache License 2.0. Library: php-amqplib. Its logic and queue declaration are
// kept as is: the tutorial declares a durable quorum queue.
//
// Differences from the tutorial, nothing else:
//   * php-amqplib is Debian's php-amqplib, loaded from /usr/share/php instead of the
//     tutorial's composer vendor/ directory (PHP_AMQPLIB_AUTOLOAD overrides the path);
//   * host, port and queue come from the environment (AMQP_HOST default 'localhost',
//     AMQP_PORT default 5672, RPC_QUEUE default 'rpc_queue').

require_once getenv('PHP_AMQPLIB_AUTOLOAD') ?: '/usr/share/php/PhpAmqpLib/autoload.php';
use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;
use PhpAmqpLib\Wire\AMQPTable;

$host = getenv('AMQP_HOST') ?: 'localhost';
$port = (int) (getenv('AMQP_PORT') ?: 5672);
$queue = getenv('RPC_QUEUE') ?: 'rpc_queue';

$connection = new AMQPStreamConnection($host, $port, 'guest', 'guest');
$channel = $connection->channel();

$channel->queue_declare($queue, false, true, false, false, false, new AMQPTable(['x-queue-type' => 'quorum']));

function fib($n)
{
    if ($n == 0) {
        return 0;
    }
    if ($n == 1) {
        return 1;
    }
    return fib($n-1) + fib($n-2);
}

echo " [x] Awaiting RPC requests\n";
$callback = function ($req) {
    $n = intval($req->getBody());
    echo ' [.] fib(', $n, ")\n";

    $msg = new AMQPMessage(
        (string) fib($n),
        array('correlation_id' => $req->get('correlation_id'))
    );

    $req->getChannel()->basic_publish(
        $msg,
        '',
        $req->get('reply_to')
    );
    $req->ack();
};

$channel->basic_qos(null, 1, false);
$channel->basic_consume($queue, '', false, false, false, false, $callback);

try {
    $channel->consume();
} catch (\Throwable $exception) {
    echo $exception->getMessage();
}

$channel->close();
$connection->close();
