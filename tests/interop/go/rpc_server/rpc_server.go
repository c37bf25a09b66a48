// RPC server from the RabbitMQ tutorial 6, Go port: go/rpc_server.go of the
// rabbitmq-tutorials repository (commit 0b32ef60), Copyright the RabbitMQ tutorials'
// authors, Apache License 2.0. Library: amqp091-go. Its logic and queue declaration are
// kept as is: the tutorial declares a durable quorum queue.
//
// Differences from the tutorial, nothing else:
//   - host, port and queue come from the environment (AMQP_HOST default "localhost",
//     AMQP_PORT default 5672, RPC_QUEUE default "rpc_queue");
//   - amqp091-go 1.5 (Debian's) has no amqp.QueueTypeArg / amqp.QueueTypeQuorum constants
//     (later versions do); their values, "x-queue-type" and "quorum", are written out.
//
// The tutorial logs through package log, so its lines (" [*] Awaiting RPC requests") go to
// stderr.
package main

import (
	"context"
	"log"
	"os"
	"strconv"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

func failOnError(err error, msg string) {
	if err != nil {
		log.Panicf("%s: %s", msg, err)
	}
}

func getenv(key, fallback string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return fallback
}

func fib(n int) int {
	if n == 0 {
		return 0
	} else if n == 1 {
		return 1
	} else {
		return fib(n-1) + fib(n-2)
	}
}

func main() {
	conn, err := amqp.Dial("amqp://guest:guest@" + getenv("AMQP_HOST", "localhost") + ":" + getenv("AMQP_PORT", "5672") + "/")
	failOnError(err, "Failed to connect to RabbitMQ")
	defer conn.Close()

	ch, err := conn.Channel()
	failOnError(err, "Failed to open a channel")
	defer ch.Close()

	q, err := ch.QueueDeclare(
		getenv("RPC_QUEUE", "rpc_queue"), // name
		true,                             // durability
		false,                            // delete when unused
		false,                            // exclusive
		false,                            // no-wait
		amqp.Table{
			"x-queue-type": "quorum",
		},
	)
	failOnError(err, "Failed to declare a queue")

	err = ch.Qos(
		1,     // prefetch count
		0,     // prefetch size
		false, // global
	)
	failOnError(err, "Failed to set QoS")

	msgs, err := ch.Consume(
		q.Name, // queue
		"",     // consumer
		false,  // auto-ack
		false,  // exclusive
		false,  // no-local
		false,  // no-wait
		nil,    // args
	)
	failOnError(err, "Failed to register a consumer")

	var forever chan struct{}

	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for d := range msgs {
			n, err := strconv.Atoi(string(d.Body))
			failOnError(err, "Failed to convert body to integer")

			log.Printf(" [.] fib(%d)", n)
			response := fib(n)

			err = ch.PublishWithContext(ctx,
				"",        // exchange
				d.ReplyTo, // routing key
				false,     // mandatory
				false,     // immediate
				amqp.Publishing{
					ContentType:   "text/plain",
					CorrelationId: d.CorrelationId,
					Body:          []byte(strconv.Itoa(response)),
				})
			failOnError(err, "Failed to publish a message")

			d.Ack(false)
		}
	}()

	log.Printf(" [*] Awaiting RPC requests")
	<-forever
}
