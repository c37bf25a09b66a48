//! Client and daemon over a real broker: results, concurrency, no-server detection, timeouts,
//! late replies. Every call's outcome is counted.

mod common;

use std::time::{Duration, Instant};

use amqp_rpc::client::NO_SERVER_RETRY_WINDOW;
use amqp_rpc::{CallError, Client};
use common::fib::fib_decimal;
use common::*;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

#[tokio::test]
async fn success_path_exact_results() {
    let queue = unique_queue("ok");
    let daemon = TestDaemon::start(test_config(&queue)).await;
    let client = client(&queue, Duration::from_secs(10)).await;
    for n in [0u64, 1, 2, 10, 20, 30, 93, 94, 100, 1000, 1501, 100_000] {
        let got = client
            .call("fib", n.to_string().as_bytes())
            .await
            .expect("fib ok");
        assert_eq!(String::from_utf8(got).unwrap(), fib_decimal(n), "fib({n})");
    }
    assert_eq!(fib(&client, 30).await.unwrap().to_string(), "832040");
    assert_eq!(
        fib(&client, 100_000).await.unwrap().to_string().len(),
        20899
    );
    daemon.expect_requests("fib", "ok", 14).await;
    assert_eq!(client.pending_calls(), 0);
    daemon.stop().await.expect("clean stop");
    delete_queue(&queue).await;
}

#[tokio::test]
async fn many_concurrent_calls_on_one_connection_all_correct() {
    let queue = unique_queue("many");
    let daemon = TestDaemon::start(test_config(&queue)).await;
    let client = client(&queue, Duration::from_secs(20)).await;
    let calls = (0..500u64).map(|i| {
        let client = client.clone();
        let n = (i * 7) % 2500; // inline and heavy paths both
        async move { (n, client.call("fib", n.to_string().as_bytes()).await) }
    });
    let results = futures_util::future::join_all(calls).await;
    let mut ok = 0;
    for (n, result) in &results {
        let body = result
            .as_ref()
            .unwrap_or_else(|e| panic!("fib({n}) failed: {e}"));
        assert_eq!(
            std::str::from_utf8(body).unwrap(),
            fib_decimal(*n),
            "fib({n}) got another call's reply?"
        );
        ok += 1;
    }
    assert_eq!(ok, 500);
    assert_eq!(
        client.pending_calls(),
        0,
        "pending map must be empty after every call ended"
    );
    assert_eq!(client.late_replies(), 0);
    daemon.expect_requests("fib", "ok", 500).await;
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn no_server_when_queue_missing_is_fast() {
    let queue = unique_queue("missing");
    let client = client(&queue, Duration::from_secs(10)).await;
    let t0 = Instant::now();
    let err = client.call("fib", b"10").await.unwrap_err();
    assert!(err.is_no_server(), "{err:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(client.pending_calls(), 0);
}

#[tokio::test]
async fn no_server_when_queue_has_no_consumer_is_fast() {
    let queue = unique_queue("noconsumer");
    let _declared = declare_queue(&queue).await;
    let client = client(&queue, Duration::from_secs(10)).await;
    let t0 = Instant::now();
    let err = client.call("fib", b"10").await.unwrap_err();
    assert!(
        matches!(&err, CallError::NoServer { reason, .. } if reason.contains("no consumer")),
        "{err:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2));
    delete_queue(&queue).await;
}

#[tokio::test]
async fn no_server_when_queue_vanishes_after_a_good_probe() {
    // The probe's "has consumers" answer is cached; the mandatory flag still catches a queue
    // deleted meanwhile (the broker returns the request: NO_ROUTE).
    let queue = unique_queue("vanish");
    let daemon = TestDaemon::start(test_config(&queue)).await;
    let client = client(&queue, Duration::from_secs(10)).await;
    assert_eq!(fib(&client, 10).await.unwrap().to_string(), "55");
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
    let t0 = Instant::now();
    let err = client.call("fib", b"10").await.unwrap_err();
    assert!(err.is_no_server(), "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_returned_request_is_no_server_with_publisher_confirms_too() {
    // Confirm mode carries the returned message on the confirm instead of leaving it with
    // the channel: the same outcome, as fast.
    let queue = unique_queue("vanish-confirm");
    let daemon = TestDaemon::start(test_config(&queue)).await;
    let client = Client::builder(amqp_url())
        .queue(&queue)
        .timeout(Duration::from_secs(10))
        .publisher_confirms(true)
        .connect()
        .await
        .unwrap();
    assert_eq!(fib(&client, 10).await.unwrap().to_string(), "55");
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
    let t0 = Instant::now();
    let err = client.call("fib", b"10").await.unwrap_err();
    assert!(
        matches!(&err, CallError::NoServer { reason, .. } if reason.contains("returned")),
        "{err:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(client.pending_calls(), 0);
}

#[tokio::test]
async fn a_request_the_queue_refuses_fails_at_once_with_confirms_and_at_its_deadline_without() {
    // A full queue with `x-overflow = reject-publish` routes a request and refuses it. Only a
    // publisher confirm says so; without one the call ends by its deadline, as any call whose
    // request is lost does.
    let queue = unique_queue("refuse");
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
        .await
        .unwrap();
    // A consumer, so the client's probe finds the queue served.
    let _consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let timeout = Duration::from_millis(1500);
    for confirms in [true, false] {
        let client = Client::builder(amqp_url())
            .queue(&queue)
            .timeout(timeout)
            .publisher_confirms(confirms)
            .connect()
            .await
            .unwrap();
        let t0 = Instant::now();
        let err = client.call("fib", b"10").await.unwrap_err();
        let took = t0.elapsed();
        if confirms {
            assert!(
                matches!(&err, CallError::Unavailable(m) if m.contains("refused")),
                "{err:?}"
            );
            assert!(took < Duration::from_millis(500), "took {took:?}");
        } else {
            assert!(
                matches!(err, CallError::Timeout(t) if t == timeout),
                "{err:?}"
            );
            assert!(took >= timeout && took < timeout * 2, "took {took:?}");
        }
        assert_eq!(client.pending_calls(), 0);
    }
    delete_queue(&queue).await;
}

#[tokio::test]
async fn idempotent_call_waits_for_a_server_seen_lately_to_come_back() {
    // A rolling restart, or daemons reconnecting after a broker node failed: the only daemon
    // stops and another starts later. A client that saw the queue served keeps retrying
    // `NoServer` up to its deadline instead of failing after the usual one-second window.
    let queue = unique_queue("comeback");
    let daemon = TestDaemon::start(test_config(&queue)).await;
    let client = client(&queue, Duration::from_secs(10)).await;
    assert_eq!(fib(&client, 10).await.unwrap().to_string(), "55");
    daemon.stop().await.unwrap();
    let t0 = Instant::now();
    let call = tokio::spawn({
        let client = client.clone();
        async move { fib(&client, 20).await }
    });
    // The window is what is under test, so here time itself is the event.
    tokio::time::sleep(NO_SERVER_RETRY_WINDOW * 2).await;
    assert!(!call.is_finished(), "still retrying after the window");
    let _back = TestDaemon::start(test_config(&queue)).await;
    let answer = tokio::time::timeout(Duration::from_secs(8), call)
        .await
        .expect("the call ends by its deadline")
        .unwrap();
    assert_eq!(
        answer.unwrap().to_string(),
        "6765",
        "answered by the new daemon"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(client.pending_calls(), 0);
}

#[tokio::test]
async fn timeout_against_a_stalled_server() {
    let queue = unique_queue("stalled");
    let (_conn, _ch, mut requests) = stalled_server(&queue, None).await;
    let client = client(&queue, Duration::from_secs(10)).await;
    let t0 = Instant::now();
    let err = client
        .call_timeout("fib", b"10", Duration::from_millis(700))
        .await
        .unwrap_err();
    let took = t0.elapsed();
    assert!(matches!(err, CallError::Timeout(_)), "{err:?}");
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_millis(1300),
        "took {took:?}"
    );
    assert_eq!(client.pending_calls(), 0);
    // The request carried its deadline and an expiration matching it.
    let d = requests.next().await.unwrap().unwrap();
    let expiration: u64 = d
        .properties
        .expiration()
        .as_ref()
        .unwrap()
        .as_str()
        .parse()
        .unwrap();
    assert!((1..=700).contains(&expiration), "expiration {expiration}");
    let deadline = amqp_rpc::protocol::header_u64(d.properties.headers().as_ref(), "x-deadline-ms");
    assert!(deadline.is_some());
    delete_queue(&queue).await;
}

#[tokio::test]
async fn late_and_duplicate_replies_are_dropped_and_counted() {
    let queue = unique_queue("late");
    let (conn, _ch, mut requests) = stalled_server(&queue, None).await;
    let replier = conn.create_channel().await.unwrap();
    let client = client(&queue, Duration::from_secs(10)).await;

    let err = client
        .call_timeout("fib", b"10", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.is_timeout());
    let late = requests.next().await.unwrap().unwrap();
    let reply_to = late.properties.reply_to().clone().unwrap();
    let props = BasicProperties::default()
        .with_correlation_id(late.properties.correlation_id().clone().unwrap());
    for _ in 0..2 {
        replier
            .basic_publish(
                "".into(),
                reply_to.clone(),
                BasicPublishOptions::default(),
                b"55",
                props.clone(),
            )
            .await
            .unwrap();
    }
    late.acker.ack(BasicAckOptions::default()).await.unwrap();
    wait_until(Duration::from_secs(5), "two late replies counted", || {
        client.late_replies() == 2
    })
    .await;

    // A call made now gets its own answer, not the stale ones.
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call("fib", b"11").await }
    });
    let fresh = requests.next().await.unwrap().unwrap();
    assert_eq!(fresh.data, b"11");
    let props = BasicProperties::default()
        .with_correlation_id(fresh.properties.correlation_id().clone().unwrap());
    replier
        .basic_publish(
            "".into(),
            fresh.properties.reply_to().clone().unwrap(),
            BasicPublishOptions::default(),
            b"89",
            props,
        )
        .await
        .unwrap();
    assert_eq!(call.await.unwrap().unwrap(), b"89");
    assert_eq!(client.late_replies(), 2);
    assert_eq!(client.pending_calls(), 0);
    delete_queue(&queue).await;
}

#[tokio::test]
async fn unreachable_broker_is_unavailable_by_the_deadline() {
    // Port 9 (discard) on loopback: nothing listens, the connect is refused at once.
    let client = amqp_rpc::Client::builder("amqp://guest:guest@127.0.0.1:9/%2f")
        .queue("rpc_queue")
        .build()
        .unwrap();
    let t0 = Instant::now();
    let err = client
        .call_timeout("fib", b"1", Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Unavailable(_)), "{err:?}");
    assert!(t0.elapsed() < Duration::from_millis(1500));
}

/// Acks trail their replies (the settler acks once a reply is confirmed, looking at the next
/// hand-over or after a short pause), so a stop right after a burst is where an ack could be
/// lost. The drain must send every one before it closes: a lost ack would put its request
/// back in the queue when the connection closes.
#[tokio::test]
async fn a_stop_right_after_a_burst_leaves_no_request_unacked() {
    burst_then_stop(true).await;
}

/// Without reply confirms, replies and acks share the consume channel; each ack is queued right
/// behind its reply, and all of them must reach the broker before the connection closes.
#[tokio::test]
async fn without_reply_confirms_a_burst_is_answered_and_acked() {
    burst_then_stop(false).await;
}

async fn burst_then_stop(confirm_replies: bool) {
    let queue = unique_queue("acked");
    let mut config = test_config(&queue);
    config.service.confirm_replies = confirm_replies;
    let daemon = TestDaemon::start(config).await;
    let client = client(&queue, Duration::from_secs(10)).await;
    assert_eq!(fib_burst(&client, 200).await, 200);
    daemon.expect_requests("fib", "ok", 200).await;
    let ack_frames = daemon.metrics.ack_frames.clone();
    daemon.stop().await.expect("clean stop");
    assert_eq!(
        queue_message_count(&queue).await,
        0,
        "every answered request was acked before the connection closed"
    );
    // Requests whose replies are in together (confirmed, or written without confirms) are
    // acked by one `multiple` frame (ledger.rs).
    assert!(
        ack_frames.get() < 200,
        "200 requests in flight at once settle in batches, got {} ack frames",
        ack_frames.get()
    );
    delete_queue(&queue).await;
}
