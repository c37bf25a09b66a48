#!/usr/bin/perl
# RPC client from the RabbitMQ tutorial 6, Perl port: perl/rpc_client.pl of the
# rabbitmq-tutorials repository (commit 2565829d), Copyright the RabbitMQ tutorials'
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
#   * the values of n come from argv (the tutorial asks for 30 and 32, which stay the
#     default); each answer is also printed as a line `fib(N) = VALUE`.

use strict;
use warnings;

$|++;
use AnyEvent;
use AnyEvent::RabbitMQ;
use UUID::Tiny;

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

sub fibonacci_rpc($) {
    my $n = shift;
    my $cv = AnyEvent->condvar;
    my $corr_id = UUID::Tiny::create_UUID_as_string(UUID::Tiny::UUID_V4);

    my $conn = blocking(AnyEvent::RabbitMQ->new()->load_xml_spec(), 'connect',
        host => $host,
        port => $port,
        user => 'guest',
        pass => 'guest',
        vhost => '/',
    );

    my $channel = blocking($conn, 'open_channel');

    my $result = blocking($channel, 'declare_queue', exclusive => 1);
    my $callback_queue = $result->{method_frame}->{queue};

    sub on_response_cb {
        my %a   = (
            condvar         => undef,
            correlation_id  => undef,
            @_
        );
        return  sub {
            my $var = shift;
            my $body = $var->{body}->{payload};
            if ($a{correlation_id} eq $var->{header}->{correlation_id}) {
                $a{condvar}->send($body);
            }
        };
    }

    blocking($channel, 'consume',
        no_ack => 1,
        on_consume => on_response_cb(
            condvar         => $cv,
            correlation_id  => $corr_id,
        ),
    );

    $channel->publish(
        exchange => '',
        routing_key => $queue,
        header => {
            reply_to => $callback_queue,
            correlation_id => $corr_id,
        },
        body => $n,
    );
    return $cv->recv;
}

for my $n (@ARGV ? @ARGV : (30, 32)) {
    print " [x] Requesting fib($n)\n";
    my $response = fibonacci_rpc($n);
    print " [.] Got $response\n";
    print "fib($n) = $response\n";
}
