#!/usr/bin/perl
# RPC server from the RabbitMQ tutorial 6, Perl port: perl/rpc_server.pl of the
# rabbitmq-tutorials repository (commit 89858b3a), Copyright the RabbitMQ tutorials'
# authors, Apache License 2.0. Its logic and queue declaration are kept as is.
#
# Differences from the tutorial, nothing else:
#   * The tutorial uses Net::RabbitFoot, which Debian does not ship. Net::RabbitFoot is a
#     blocking (Coro) front of AnyEvent::RabbitMQ; here the same calls go to
#     AnyEvent::RabbitMQ (Debian's libanyevent-rabbitmq-perl) directly, and each call the
#     tutorial makes blocking waits on a condvar (`blocking` below), as Net::RabbitFoot does.
#     Arguments, defaults and the order of calls are the tutorial's.
#   * host, port and queue come from the environment (AMQP_HOST default 'localhost',
#     AMQP_PORT default 5672, RPC_QUEUE default 'rpc_queue').

use strict;
use warnings;

$|++;
use AnyEvent;
use AnyEvent::RabbitMQ;

my $host  = $ENV{AMQP_HOST} || 'localhost';
my $port  = $ENV{AMQP_PORT} || 5672;
my $queue = $ENV{RPC_QUEUE} || 'rpc_queue';

# Net::RabbitFoot's blocking call: run $method with on_success/on_failure, wait for either.
sub blocking {
    my ($obj, $method, %args) = @_;
    my $cv = AnyEvent->condvar;
    $obj->$method(
        %args,
        on_success => sub { $cv->send($_[0]) },
        on_failure => sub { $cv->croak(join(' ', map { defined $_ ? $_ : '' } @_)) },
    );
    return $cv->recv;
}

my $conn = blocking(AnyEvent::RabbitMQ->new()->load_xml_spec(), 'connect',
    host => $host,
    port => $port,
    user => 'guest',
    pass => 'guest',
    vhost => '/',
);

my $channel = blocking($conn, 'open_channel');

blocking($channel, 'declare_queue', queue => $queue);

sub fib {
    my $n = shift;
    my ($a, $b) = (0, 1);
    for (1..$n) {
        ($a, $b) = ($b, $a + $b);
    }
    return $a;
}

sub on_request {
    my $var = shift;
    my $body = $var->{body}->{payload};
    my $props = $var->{header};

    my $n = $body;
    print " [.] fib($n)\n";
    my $response = fib($n);

    $channel->publish(
        exchange => '',
        routing_key => $props->{reply_to},
        header => {
            correlation_id => $props->{correlation_id},
        },
        body => $response,
    );

    $channel->ack();
}

blocking($channel, 'qos', prefetch_count => 1);
blocking($channel, 'consume',
    on_consume => \&on_request,
);

print " [x] Awaiting RPC requests\n";

# Wait forever
AnyEvent->condvar->recv;
