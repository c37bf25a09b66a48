<?php
// RPC client from the RabbitMQ tutorial 6, PHP port: php/rpc_client.php of the
// rabbitmq-tutorials repository (commit 816cf60f), Copyright the RabbitMQ tutorials'
// authors, Apache License 2.0. Library: php-amqplib. Its logic and queue declaration are
// kept as is.
//
// Differences from the tutorial, nothing else:
//   * php-amqplib is Debian's php-amqplib, loaded from /usr/share/php instead of the
//     tutorial's composer vendor/ directory (PHP_AMQPLIB_AUTOLOAD overrides the path);
//   * host, port and queue come from the environment (AMQP_HOST default 'localhost',
//     AMQP_PORT default 5672, RPC_QUEUE default 'rpc_queue');
//   * n comes from argv (default 30, the tutorial's), and the answer is also printed as a
//     line `fib(N) = VALUE`.
//
// Kept from the tutorial, and so a known limit of it: call() waits `while (!$this->response)`,
// and PHP takes the string "0" as false, so a reply "0" (fib(0)) is never seen and the client
// waits forever.

require_once getenv('PHP_AMQPLIB_AUTOLOAD') ?: '/usr/share/php/PhpAmqpLib/autoload.php';
use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;

class FibonacciRpcClient
{
    private $connection;
    private $channel;
    private $callback_queue;
    private $response;
    private $corr_id;

    public function __construct()
    {
        $this->connection = new AMQPStreamConnection(
            getenv('AMQP_HOST') ?: 'localhost',
            (int) (getenv('AMQP_PORT') ?: 5672),
            'guest',
            'guest'
        );
        $this->channel = $this->connection->channel();
        list($this->callback_queue, ,) = $this->channel->queue_declare(
            "",
            false,
            false,
            true,
            false
        );
        $this->channel->basic_consume(
            $this->callback_queue,
            '',
            false,
            false,
            false,
            false,
            array(
                $this,
                'onResponse'
            )
        );
    }

    public function onResponse($rep)
    {
        if ($rep->get('correlation_id') == $this->corr_id) {
            $this->response = $rep->body;
        }
    }

    public function call($n)
    {
        $this->response = null;
        $this->corr_id = uniqid();

        $msg = new AMQPMessage(
            (string) $n,
            array(
                'correlation_id' => $this->corr_id,
                'reply_to' => $this->callback_queue
            )
        );
        $this->channel->basic_publish($msg, '', getenv('RPC_QUEUE') ?: 'rpc_queue');
        while (!$this->response) {
            $this->channel->wait();
        }
        return intval($this->response);
    }
}

$n = isset($argv[1]) ? $argv[1] : 30;
$fibonacci_rpc = new FibonacciRpcClient();
$response = $fibonacci_rpc->call($n);
echo ' [.] Got ', $response, "\n";
echo 'fib(', $n, ') = ', $response, "\n";
?>
