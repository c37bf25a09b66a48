//! Redelivery semantics: duplicates computed once and answered each time, poison requests
//! ended after `max_deliveries` (counted locally on classic queues, by the broker on quorum
//! queues), a deleted queue redeclared, and work slower than the grace period redelivered.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amqp_rpc::config::QueueType;
use amqp_rpc::service::Methods;
use amqp_rpc::ErrorCode;
use common::proxy::{broker_addr, Proxy};
use common::*;

#[tokio::test]
async fn duplicates_are_computed_once_and_answered_each_time() {
    let queue = unique_queue("dup");
    let runs = Arc::new(AtomicUsize::new(0));
    let methods = Methods::default().with(Counted(runs.clone()));
    let daemon = TestDaemon::start_with(test_config(&queue), Some(methods)).await;
    let mut raw = RawRequester::new().await;
    // Same message_id twice at once (the second joins the running computation)...
    for corr in ["a", "b"] {
        let props = raw
            .props(corr)
            .with_type("counted".into())
            .with_message_id("job-1".into());
        raw.publish(&queue, b"result-1", props).await;
    }
    // ...and, without a message_id, the same ids, method and body published twice: two calls
    // (a client that reuses its ids is asking again), each computed; only a redelivery of
    // such a request may replay.
    for _ in 0..2 {
        raw.publish(
            &queue,
            b"result-2",
            raw.props("c").with_type("counted".into()),
        )
        .await;
    }
    let mut bodies = Vec::new();
    for _ in 0..4 {
        let reply = raw.next_reply(Duration::from_secs(10)).await;
        assert_eq!(reply.error_code, None);
        bodies.push((
            reply.correlation_id.unwrap(),
            String::from_utf8(reply.body).unwrap(),
        ));
    }
    bodies.sort();
    assert_eq!(
        bodies,
        [
            ("a", "result-1"),
            ("b", "result-1"),
            ("c", "result-2"),
            ("c", "result-2")
        ]
        .map(|(c, b)| (c.to_owned(), b.to_owned()))
    );
    // A later duplicate is served from the cache.
    let props = raw
        .props("d")
        .with_type("counted".into())
        .with_message_id("job-1".into());
    raw.publish(&queue, b"result-1", props).await;
    let reply = raw.next_reply(Duration::from_secs(10)).await;
    assert_eq!(
        (reply.correlation_id.as_deref(), reply.body.as_slice()),
        (Some("d"), &b"result-1"[..])
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "one computation per message_id, one per publish without"
    );
    // The same message_id on another body is another request, never a stale reply.
    let props = raw
        .props("e")
        .with_type("counted".into())
        .with_message_id("job-1".into());
    raw.publish(&queue, b"result-3", props).await;
    let reply = raw.next_reply(Duration::from_secs(10)).await;
    assert_eq!(reply.body, b"result-3");
    assert_eq!(runs.load(Ordering::SeqCst), 4);
    daemon.expect_requests("counted", "ok", 6).await;
    assert_eq!(daemon.metrics.replays.get(), 2);
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

async fn poison_ends_after_max_deliveries(queue_type: QueueType) {
    let queue = unique_queue("poison");
    let dlq = format!("{queue}-dlq");
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), broker_addr(&amqp_url())).await;
    let mut config = test_config(&queue);
    config.amqp.url = proxy.url(&amqp_url());
    config.service.queue_type = queue_type;
    config.service.max_deliveries = 3;
    config.service.concurrency = 8;
    config.service.dead_letter_queue = dlq.clone();
    let (block, gate) = Block::new();
    let (daemon, mut ready) = TestDaemon::spawn(config, Some(Methods::default().with(block))).await;
    readiness_becomes(&mut ready, true, Duration::from_secs(20), "daemon ready").await;

    let mut raw = RawRequester::new().await;
    let props = raw
        .props("p")
        .with_type("block".into())
        .with_message_id("poison-1".into());
    raw.publish(&queue, b"", props).await;
    // Each attempt takes the worker's connection down before it can answer (as a crash would).
    for attempt in 1..=3 {
        let what = format!("attempt {attempt} in flight");
        wait_until(Duration::from_secs(10), &what, || {
            daemon.metrics.in_flight.get() == attempt
        })
        .await;
        proxy.cut_all();
        readiness_becomes(
            &mut ready,
            false,
            Duration::from_secs(10),
            "readiness drops",
        )
        .await;
        readiness_becomes(&mut ready, true, Duration::from_secs(10), "ready again").await;
    }
    let reply = raw.next_reply(Duration::from_secs(10)).await;
    assert_eq!(reply.correlation_id.as_deref(), Some("p"));
    assert_eq!(reply.error_code, Some(ErrorCode::Internal));
    assert!(
        String::from_utf8_lossy(&reply.body).contains("4 delivery attempts"),
        "{reply:?}"
    );
    assert_eq!(daemon.metrics.poison.get(), 1);
    wait_until_async(
        Duration::from_secs(10),
        "a copy in the dead-letter queue",
        || async { queue_message_count(&dlq).await == 1 },
    )
    .await;
    assert_eq!(
        queue_message_count(&queue).await,
        0,
        "acked: it does not loop"
    );
    open_gate(&gate);
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
    delete_queue(&dlq).await;
}

#[tokio::test]
async fn poison_request_ends_after_max_deliveries_on_a_classic_queue() {
    poison_ends_after_max_deliveries(QueueType::Classic).await;
}

#[tokio::test]
async fn poison_request_ends_after_max_deliveries_on_a_quorum_queue() {
    poison_ends_after_max_deliveries(QueueType::Quorum).await;
}

#[tokio::test]
async fn queue_deleted_under_the_daemon_is_redeclared() {
    let queue = unique_queue("deleted");
    let (daemon, mut ready) = TestDaemon::spawn(test_config(&queue), None).await;
    readiness_becomes(&mut ready, true, Duration::from_secs(20), "daemon ready").await;
    delete_queue(&queue).await;
    readiness_becomes(
        &mut ready,
        false,
        Duration::from_secs(10),
        "the cancelled consumer is noticed",
    )
    .await;
    readiness_becomes(
        &mut ready,
        true,
        Duration::from_secs(10),
        "redeclared and consuming again",
    )
    .await;
    let client = client(&queue, Duration::from_secs(10)).await;
    assert_eq!(fib(&client, 16).await.unwrap().to_string(), "987");
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn work_slower_than_the_grace_period_is_redelivered_and_answered_once() {
    let queue = unique_queue("grace");
    let mut config = test_config(&queue);
    config.shutdown.grace_secs = 1;
    let a = TestDaemon::start_with(config.clone(), Some(Methods::default().with(Sleep))).await;
    let client = client(&queue, Duration::from_secs(20)).await;
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call("sleep", b"2500").await }
    });
    wait_until(Duration::from_secs(10), "A works on it", || {
        a.metrics.in_flight.get() == 1
    })
    .await;
    let b = TestDaemon::start_with(config, Some(Methods::default().with(Sleep))).await;
    let a_metrics = a.metrics.clone();
    let err = a.stop().await.unwrap_err();
    assert!(matches!(err, amqp_rpc::Error::DrainTimeout(1)), "{err}");
    assert_eq!(err.exit_code(), 75);

    assert_eq!(
        call.await.unwrap().unwrap(),
        b"slept",
        "B answered the redelivery"
    );
    b.expect_requests("sleep", "ok", 1).await;
    assert_eq!(b.metrics.redeliveries.get(), 1);
    // A's abandoned computation finishes later, and what it returns is not even tried.
    wait_until(Duration::from_secs(10), "A's abandoned run ends", || {
        a_metrics.in_flight.get() == 0
    })
    .await;
    assert_eq!(
        a_metrics.reply_publish_failures.get(),
        0,
        "nothing sent for it"
    );
    assert_eq!(client.late_replies(), 0, "answered once");
    b.stop().await.unwrap();
    delete_queue(&queue).await;
}
