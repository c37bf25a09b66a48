//! Every error code of the contract, hostile requests, panics, deadlines and draining, against a
//! real broker. Each answerable request must get exactly one reply with the right code, and the
//! daemon must keep serving.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use amqp_rpc::protocol::DEADLINE_HEADER;
use amqp_rpc::service::Methods;
use amqp_rpc::{CallError, ErrorCode};
use common::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

/// (correlation id, body, `type`, expected: Ok(success body) or Err(error code)).
type Case = (
    &'static str,
    Vec<u8>,
    Option<&'static str>,
    Result<&'static str, ErrorCode>,
);

fn with_deadline(props: BasicProperties, deadline_ms: i64) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(DEADLINE_HEADER.into(), AMQPValue::LongLongInt(deadline_ms));
    props.with_headers(headers)
}

#[tokio::test]
async fn hostile_requests_each_get_exactly_one_right_reply() {
    let queue = unique_queue("hostile");
    let daemon = TestDaemon::start(test_config(&queue)).await;
    let mut raw = RawRequester::new().await;
    let now = amqp_rpc::protocol::now_epoch_ms() as i64;

    let mut random = vec![0xffu8];
    random.extend((0..200).map(|_| fastrand::u8(..)));
    let cases: Vec<Case> = vec![
        ("random", random, None, Err(ErrorCode::InvalidArgument)),
        (
            "megabyte",
            vec![b'7'; 1 << 20],
            None,
            Err(ErrorCode::ResourceExhausted),
        ),
        (
            "non-utf8",
            vec![0xff, 0xfe, 0x31],
            None,
            Err(ErrorCode::InvalidArgument),
        ),
        (
            "plus",
            b"+5".to_vec(),
            None,
            Err(ErrorCode::InvalidArgument),
        ),
        (
            "minus",
            b"-5".to_vec(),
            None,
            Err(ErrorCode::InvalidArgument),
        ),
        (
            "inner-space",
            b"1 2".to_vec(),
            None,
            Err(ErrorCode::InvalidArgument),
        ),
        (
            "float",
            b"1.5".to_vec(),
            None,
            Err(ErrorCode::InvalidArgument),
        ),
        (
            "exp",
            b"1e3".to_vec(),
            None,
            Err(ErrorCode::InvalidArgument),
        ),
        ("empty", b"".to_vec(), None, Err(ErrorCode::InvalidArgument)),
        ("padded", b" \t10\r\n".to_vec(), None, Ok("55")),
        (
            "over-max",
            b"100001".to_vec(),
            None,
            Err(ErrorCode::OutOfRange),
        ),
        (
            "over-u64",
            b"18446744073709551616".to_vec(),
            None,
            Err(ErrorCode::OutOfRange),
        ),
        ("huge", vec![b'9'; 900], None, Err(ErrorCode::OutOfRange)),
        (
            "unknown",
            b"1".to_vec(),
            Some("launch_missiles"),
            Err(ErrorCode::UnknownMethod),
        ),
        ("empty-type", b"12".to_vec(), Some(""), Ok("144")),
    ];
    for (id, body, kind, _) in &cases {
        let mut props = with_deadline(raw.props(id), now + 60_000);
        if let Some(kind) = kind {
            props = props.with_type((*kind).into());
        }
        raw.publish(&queue, body, props).await;
    }
    // No correlation_id: still answered, so a tutorial-style client is not left guessing.
    let no_corr = BasicProperties::default().with_reply_to(raw.reply_queue.as_str().into());
    raw.publish(&queue, b"5", no_corr).await;
    // No reply_to: nobody to answer; counted and acked.
    raw.publish(
        &queue,
        b"5",
        BasicProperties::default().with_correlation_id("no-reply-to".into()),
    )
    .await;
    // A deadline in microseconds (a client bug): far in the future, so the reply's expiration
    // is capped instead of making the broker close the reply channel.
    raw.publish(
        &queue,
        b"11",
        with_deadline(raw.props("far-deadline"), 1_793_665_501_623_410),
    )
    .await;
    // Deadline already passed: dropped without work or reply.
    raw.publish(&queue, b"5", with_deadline(raw.props("past"), now - 1_000))
        .await;

    let answerable = cases.len() + 2;
    let mut replies: HashMap<String, _> = HashMap::new();
    let mut uncorrelated = Vec::new();
    for _ in 0..answerable {
        let reply = raw.next_reply(Duration::from_secs(10)).await;
        match reply.correlation_id.clone() {
            Some(id) => assert!(
                replies.insert(id.clone(), reply).is_none(),
                "two replies for {id}"
            ),
            None => uncorrelated.push(reply),
        }
    }
    for (id, _, _, expected) in &cases {
        let reply = replies
            .get(*id)
            .unwrap_or_else(|| panic!("no reply for {id}"));
        match expected {
            Ok(body) => {
                assert_eq!(reply.error_code, None, "{id}");
                assert_eq!(reply.body, body.as_bytes(), "{id}");
            }
            Err(code) => {
                assert_eq!(
                    reply.error_code,
                    Some(*code),
                    "{id}: {}",
                    String::from_utf8_lossy(&reply.body)
                );
                let message = String::from_utf8(reply.body.clone()).expect("UTF-8 message");
                assert!(
                    !message.is_empty() && !message.contains('\n'),
                    "{id}: {message:?}"
                );
            }
        }
    }
    assert_eq!(replies["far-deadline"].body, b"89");
    assert_eq!(uncorrelated.len(), 1);
    assert_eq!(uncorrelated[0].error_code, Some(ErrorCode::InvalidArgument));
    assert!(String::from_utf8_lossy(&uncorrelated[0].body).contains("correlation_id"));
    let out_of_range = String::from_utf8_lossy(&replies["over-max"].body).into_owned();
    assert!(
        out_of_range.contains("100000"),
        "names the bound: {out_of_range}"
    );

    wait_until(
        Duration::from_secs(10),
        "the dropped requests are counted",
        || {
            daemon.metrics.expired.get() == 1
                && daemon
                    .metrics
                    .rejected
                    .with_label_values(&["no_reply_to"])
                    .get()
                    == 1
                && daemon.requests_sum() == answerable as u64
        },
    )
    .await;
    // Every reply above was confirmed before it was counted, so a duplicate would already be
    // queued ahead of this one: the next reply must be the sentinel's.
    raw.publish(&queue, b"7", raw.props("sentinel")).await;
    let next = raw.next_reply(Duration::from_secs(10)).await;
    assert_eq!(
        next.correlation_id.as_deref(),
        Some("sentinel"),
        "an extra reply arrived: {next:?}"
    );
    assert_eq!(next.body, b"13");
    daemon.expect_requests("unknown", "unknown_method", 1).await;
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn handler_failures_become_error_replies_and_serving_continues() {
    let queue = unique_queue("panic");
    let methods = Methods::default().with(Panic).with(Sleep);
    let daemon = TestDaemon::start_with(test_config(&queue), Some(methods)).await;
    let client = client(&queue, Duration::from_secs(10)).await;
    for body in [&b"prepare"[..], b"handler", b"prepare"] {
        let err = client.call("panic", body).await.unwrap_err();
        assert_eq!(err.remote_code(), Some(ErrorCode::Internal), "{err:?}");
        assert!(!err.is_retryable());
    }
    // Work that cannot finish before the deadline: answered deadline_exceeded while the caller
    // still waits.
    let err = client
        .call_timeout("sleep", b"3000", Duration::from_millis(600))
        .await
        .unwrap_err();
    assert_eq!(
        err.remote_code(),
        Some(ErrorCode::DeadlineExceeded),
        "{err:?}"
    );
    assert!(err.is_timeout() && err.is_retryable());
    assert_eq!(fib(&client, 20).await.unwrap().to_string(), "6765");
    daemon.expect_requests("panic", "internal", 3).await;
    daemon
        .expect_requests("sleep", "deadline_exceeded", 1)
        .await;
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn abandoned_request_expires_in_the_queue_and_is_never_computed() {
    let queue = unique_queue("abandon");
    let mut config = test_config(&queue);
    config.service.concurrency = 1;
    config.service.prefetch = 1;
    let (block, gate) = Block::new();
    let daemon = TestDaemon::start_with(config, Some(Methods::default().with(block))).await;
    let client = client(&queue, Duration::from_secs(30)).await;
    let blocked = tokio::spawn({
        let client = client.clone();
        async move { client.call("block", b"").await }
    });
    wait_until(
        Duration::from_secs(10),
        "the block request is in flight",
        || daemon.metrics.in_flight.get() == 1,
    )
    .await;

    let err = client
        .call_timeout("fib", b"10", Duration::from_millis(700))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout(_)), "{err:?}");
    wait_until_async(
        Duration::from_secs(10),
        "the expired request leaves the queue",
        || async { queue_message_count(&queue).await == 0 },
    )
    .await;
    open_gate(&gate);
    assert_eq!(blocked.await.unwrap().unwrap(), b"unblocked");
    assert_eq!(fib(&client, 10).await.unwrap().to_string(), "55");
    daemon.expect_requests("fib", "ok", 1).await;
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn draining_answers_unstarted_short_deadline_work_unavailable_and_finishes_in_flight() {
    let queue = unique_queue("drain");
    let mut config = test_config(&queue);
    config.service.concurrency = 1;
    let (block, gate) = Block::new();
    let daemon = TestDaemon::start_with(config, Some(Methods::default().with(block))).await;
    let client = client(&queue, Duration::from_secs(30)).await;
    let blocked = tokio::spawn({
        let client = client.clone();
        async move { client.call("block", b"").await }
    });
    wait_until(Duration::from_secs(10), "block in flight", || {
        daemon.metrics.in_flight.get() == 1
    })
    .await;
    // Heavy fib waits for the only CPU slot, with less than a second left.
    let waiting = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call_timeout("fib", b"5000", Duration::from_millis(900))
                .await
        }
    });
    wait_until(Duration::from_secs(10), "fib waiting for a slot", || {
        daemon.metrics.in_flight.get() == 2
    })
    .await;
    daemon.shutdown.cancel();
    let err = waiting.await.unwrap().unwrap_err();
    assert_eq!(err.remote_code(), Some(ErrorCode::Unavailable), "{err:?}");
    assert!(err.is_retryable());
    open_gate(&gate);
    assert_eq!(
        blocked.await.unwrap().unwrap(),
        b"unblocked",
        "in-flight work is finished and answered"
    );
    daemon
        .stop()
        .await
        .expect("drained within the grace period");
    delete_queue(&queue).await;
}
