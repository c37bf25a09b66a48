#!/usr/bin/env ruby
# RPC server from the RabbitMQ tutorial 6, Ruby port: ruby/rpc_server.rb of the
# rabbitmq-tutorials repository (commit 0b32ef60), Copyright the RabbitMQ tutorials'
# authors, Apache License 2.0. Library: bunny. Its logic and queue declaration are kept as
# is: the tutorial declares a (durable) quorum queue, and subscribes with automatic acks.
#
# Differences from the tutorial, nothing else:
#   * host, port and queue come from the environment (AMQP_HOST default 'localhost',
#     AMQP_PORT default 5672, RPC_QUEUE default 'rpc_queue');
#   * stdout is flushed on every write, so " [x] Awaiting RPC requests" reaches whoever
#     spawned the script;
#   * Bunny 2.19 (Debian's) has no Channel#quorum_queue, which later Bunny versions add as
#     `queue(name, durable: true, arguments: { 'x-queue-type' => 'quorum' })`; that call is
#     made here instead.
require 'bunny'

$stdout.sync = true

class FibonacciServer
  def initialize
    @connection = Bunny.new(host: ENV.fetch('AMQP_HOST', 'localhost'),
                            port: Integer(ENV.fetch('AMQP_PORT', '5672')))
    @connection.start
    @channel = @connection.create_channel
  end

  def start(queue_name)
    @queue = channel.queue(queue_name, durable: true, arguments: { 'x-queue-type' => 'quorum' })
    @exchange = channel.default_exchange
    subscribe_to_queue
  end

  def stop
    channel.close
    connection.close
  end

  def loop_forever
    # This loop only exists to keep the main thread
    # alive. Many real world apps won't need this.
    loop { sleep 5 }
  end

  private

  attr_reader :channel, :exchange, :queue, :connection

  def subscribe_to_queue
    queue.subscribe do |_delivery_info, properties, payload|
      result = fibonacci(payload.to_i)

      exchange.publish(
        result.to_s,
        routing_key: properties.reply_to,
        correlation_id: properties.correlation_id
      )
    end
  end

  def fibonacci(value)
    return value if value.zero? || value == 1

    fibonacci(value - 1) + fibonacci(value - 2)
  end
end

begin
  server = FibonacciServer.new

  puts ' [x] Awaiting RPC requests'
  server.start(ENV.fetch('RPC_QUEUE', 'rpc_queue'))
  server.loop_forever
rescue Interrupt => _
  server.stop
end
