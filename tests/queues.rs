//! The service queue: a missing one declared in a shape RabbitMQ 4.x takes without warnings,
//! any existing one served as it is (tutorials' and operators' declarations), `strict` refusing
//! a clash with a fix, and `never` waiting for the operator's queue.

mod common;

use std::time::Duration;

use amqp_rpc::config::{Declare, QueueType};
use common::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};

fn quorum_args(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    for (k, v) in extra {
        args.insert((*k).into(), v.clone());
    }
    args
}

/// Declare `queue` as someone else would; returns whether the broker took it.
async fn declare(
    queue: &str,
    options: QueueDeclareOptions,
    args: FieldTable,
) -> Result<(), String> {
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    let result = ch
        .queue_declare(queue.into(), options, args)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let _ = conn.close(200, "done".into()).await;
    result
}

async fn serves_fib(queue: &str) {
    let client = client(queue, Duration::from_secs(10)).await;
    assert_eq!(fib(&client, 30).await.unwrap().to_string(), "832040");
}

#[tokio::test]
async fn a_missing_classic_queue_is_declared_durable_without_arguments() {
    let queue = unique_queue("classic");
    let daemon = TestDaemon::start(test_config(&queue)).await;
    serves_fib(&queue).await;
    // The same shape redeclared is accepted; a non-durable one (deprecated on 4.3) is not it.
    declare(
        &queue,
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .expect("durable, no arguments");
    let err = declare(
        &queue,
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap_err();
    assert!(err.contains("durable"), "{err}");
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn a_missing_quorum_queue_is_declared_as_the_tutorials_declare_it() {
    let queue = unique_queue("quorum");
    let mut config = test_config(&queue);
    config.service.queue_type = QueueType::Quorum;
    let daemon = TestDaemon::start(config).await;
    serves_fib(&queue).await;
    // Today's tutorial servers declare durable + x-queue-type quorum; started after us, they
    // must not crash.
    declare(&queue, QueueDeclareOptions::durable(), quorum_args(&[]))
        .await
        .expect("the tutorial's quorum declaration is ours");
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

/// Queues declared first by a tutorial server or an operator, in every shape: each is served
/// as it is, with the default `declare = "auto"` and either `queue_type`.
#[tokio::test]
async fn any_existing_queue_is_served_as_it_is() {
    let shapes: Vec<(&str, QueueDeclareOptions, FieldTable)> = vec![
        // The seed documents' pika server and the older tutorials: classic, non-durable.
        (
            "seed",
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
        // Today's tutorials: durable quorum.
        ("tutorial", QueueDeclareOptions::durable(), quorum_args(&[])),
        // An operator's: quorum with a delivery limit and a length bound.
        (
            "operator",
            QueueDeclareOptions::durable(),
            quorum_args(&[
                ("x-delivery-limit", AMQPValue::LongInt(3)),
                ("x-max-length", AMQPValue::LongInt(10_000)),
            ]),
        ),
        // Our own earlier releases' quorum queues carried x-delivery-limit = max + 1.
        (
            "old-ours",
            QueueDeclareOptions::durable(),
            quorum_args(&[("x-delivery-limit", AMQPValue::LongLongInt(6))]),
        ),
    ];
    for (name, options, args) in shapes {
        for queue_type in [QueueType::Classic, QueueType::Quorum] {
            let queue = unique_queue(&format!("existing-{name}"));
            declare(&queue, options, args.clone()).await.unwrap();
            let mut config = test_config(&queue);
            config.service.queue_type = queue_type;
            let daemon = TestDaemon::start(config).await;
            serves_fib(&queue).await;
            // The queue is still what its owner declared: their declaration still holds.
            declare(&queue, options, args.clone())
                .await
                .unwrap_or_else(|e| panic!("{name} ({queue_type:?}) changed: {e}"));
            daemon.stop().await.unwrap();
            delete_queue(&queue).await;
        }
    }
}

#[tokio::test]
async fn strict_refuses_a_clashing_queue_with_a_fix() {
    let queue = unique_queue("clash");
    declare(
        &queue,
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut config = test_config(&queue);
    config.service.declare = Declare::Strict;
    let daemon = amqp_rpc::Daemon::start(config, prometheus::Registry::new())
        .await
        .unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        daemon.run(tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("a clash is fatal, not retried forever");
    let err = result.unwrap_err();
    let message = err.to_string();
    assert_eq!(err.exit_code(), 78, "{message}");
    assert!(message.contains("durable"), "says what differs: {message}");
    assert!(
        message.contains("service.declare = \"auto\"")
            && message.contains("rabbitmqctl delete_queue"),
        "says how to fix it: {message}"
    );
    delete_queue(&queue).await;
}

#[tokio::test]
async fn never_waits_for_the_operators_queue_and_never_declares() {
    let queue = unique_queue("never");
    let mut config = test_config(&queue);
    config.service.declare = Declare::Never;
    let (daemon, mut ready) = TestDaemon::spawn(config, None).await;
    // Not ready while the queue is missing, and nothing declared it meanwhile.
    let became_ready = tokio::time::timeout(Duration::from_millis(1500), ready.wait_for(|r| *r))
        .await
        .is_ok();
    assert!(!became_ready, "ready without a queue");
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    let passive = ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await;
    assert!(passive.is_err(), "the daemon declared the queue");
    // The operator declares it: the daemon finds it and serves.
    declare(&queue, QueueDeclareOptions::durable(), quorum_args(&[]))
        .await
        .unwrap();
    readiness_becomes(
        &mut ready,
        true,
        Duration::from_secs(20),
        "serving the operator's queue",
    )
    .await;
    serves_fib(&queue).await;
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}
