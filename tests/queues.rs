//! Declaring the service queue: classic as the tutorial declares it, quorum with its arguments,
//! and a clash with an existing queue reported with what differs and how to fix it.

mod common;

use std::time::Duration;

use amqp_rpc::config::QueueType;
use common::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};

#[tokio::test]
async fn classic_queue_is_declared_exactly_like_the_tutorial_does() {
    let queue = unique_queue("classic");
    let daemon = TestDaemon::start(test_config(&queue)).await;
    // The tutorial server's `queue_declare(queue=...)`: non-durable, no arguments. Must not clash.
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("the tutorial's declaration is equivalent to ours");
    assert_eq!(q.consumer_count(), 1);
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn quorum_queue_serves_and_carries_its_arguments() {
    let queue = unique_queue("quorum");
    let mut config = test_config(&queue);
    config.service.queue_type = QueueType::Quorum;
    config.service.max_deliveries = 3;
    let daemon = TestDaemon::start(config).await;
    let client = client(&queue, Duration::from_secs(10)).await;
    assert_eq!(
        client.fib(90).await.unwrap().to_string(),
        "2880067194370816120"
    );

    // Redeclaring with the same arguments succeeds; with other arguments it would clash.
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(4));
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
        .await
        .expect("quorum queue with x-delivery-limit = max_deliveries + 1");
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn a_clashing_queue_stops_the_daemon_with_a_fix() {
    let queue = unique_queue("clash");
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let daemon = amqp_rpc::Daemon::start(test_config(&queue), prometheus::Registry::new())
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
        message.contains("rabbitmqctl delete_queue"),
        "says how to fix it: {message}"
    );
    delete_queue(&queue).await;
}
