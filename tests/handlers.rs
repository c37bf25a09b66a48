//! Users' own methods, written as functions (`amqp_rpc::service::{handler, json, blocking}`),
//! driven through the guarantees the fib tests check: the request context, typed JSON in and
//! out, application error codes (our client and the wire header), the deadline and its
//! cancellation, panics, a per-method limit, single-flight for copies of one call, the CPU
//! adapter off the reactor, and metrics by method.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amqp_rpc::protocol::{deadline_header_value, now_epoch_ms, RequestError, DEADLINE_HEADER};
use amqp_rpc::service::{blocking, handler, json, Methods, Request, JSON_CONTENT_TYPE};
use amqp_rpc::{CallError, ErrorCode};
use common::*;
use lapin::types::{AMQPValue, FieldTable};

#[derive(serde::Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Sum {
    sum: i64,
}

/// The typed JSON method of these tests: `not_found` for a negative first operand.
fn add() -> impl amqp_rpc::service::Method {
    json("add", |_req: Request, q: Add| async move {
        if q.a < 0 {
            return Err(RequestError::new(
                ErrorCode::NotFound,
                format!("no account {}", q.a),
            ));
        }
        // An await, as a database call would have.
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(Sum { sum: q.a + q.b })
    })
}

/// Answers with what the handler saw of its request, as JSON.
async fn whoami(req: Request) -> Result<Vec<u8>, RequestError> {
    let header = amqp_rpc::protocol::header_str(req.headers(), "x-tenant");
    let seen = serde_json::json!({
        "method": req.method(),
        "body": String::from_utf8_lossy(req.body()),
        "message_id": req.message_id(),
        "attempt": req.attempt(),
        "redelivered": req.redelivered(),
        "user_id": req.user_id(),
        "app_id": req.app_id(),
        "traceparent": req.traceparent(),
        "has_deadline": req.deadline().is_some(),
        "time_left_ms": req.time_left().map(|d| d.as_millis() as u64),
        "tenant": header,
    });
    Ok(seen.to_string().into_bytes())
}

#[tokio::test]
async fn a_handler_sees_its_request_and_typed_json_round_trips() {
    let queue = unique_queue("handlers");
    let methods = Methods::default()
        .with(handler("whoami", whoami))
        .with(add());
    let daemon = TestDaemon::start_with(test_config(&queue), Some(methods)).await;
    let mut raw = RawRequester::new().await;

    let mut headers = FieldTable::default();
    headers.insert(
        DEADLINE_HEADER.into(),
        deadline_header_value(now_epoch_ms() + 10_000),
    );
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
    );
    headers.insert("x-tenant".into(), AMQPValue::LongString("acme".into()));
    let props = raw
        .props("who")
        .with_type("whoami".into())
        .with_message_id("call-7".into())
        .with_user_id("guest".into()) // the broker checks it against the connection's user
        .with_app_id("billing".into())
        .with_headers(headers);
    raw.publish(&queue, b"hello", props).await;
    let reply = raw.next_reply(Duration::from_secs(10)).await;
    assert_eq!(
        reply.error_code,
        None,
        "{:?}",
        String::from_utf8_lossy(&reply.body)
    );
    let seen: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(seen["method"], "whoami");
    assert_eq!(seen["body"], "hello");
    assert_eq!(seen["message_id"], "call-7");
    assert_eq!(seen["attempt"], 1);
    assert_eq!(seen["redelivered"], false);
    assert_eq!(seen["user_id"], "guest");
    assert_eq!(seen["app_id"], "billing");
    assert_eq!(
        seen["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(seen["has_deadline"], true);
    let left = seen["time_left_ms"].as_u64().unwrap();
    assert!(left > 5_000 && left <= 10_000, "{left}");
    assert_eq!(seen["tenant"], "acme");

    // Typed JSON: the reply is JSON and says so; a body that does not deserialize is
    // invalid_argument with serde's one-line reason, before any work.
    raw.publish(
        &queue,
        br#"{"a": 2, "b": 40}"#,
        raw.props("ok").with_type("add".into()),
    )
    .await;
    let reply = raw.next_reply(Duration::from_secs(10)).await;
    assert_eq!(reply.content_type.as_deref(), Some(JSON_CONTENT_TYPE));
    assert_eq!(reply.body, br#"{"sum":42}"#);
    raw.publish(
        &queue,
        br#"{"a": 2}"#,
        raw.props("bad").with_type("add".into()),
    )
    .await;
    let reply = raw.next_reply(Duration::from_secs(10)).await;
    assert_eq!(reply.error_code, Some(ErrorCode::InvalidArgument));
    let message = String::from_utf8(reply.body).unwrap();
    assert!(
        message.contains("missing field `b`") && !message.contains('\n'),
        "{message}"
    );

    // An application error: its code and whether a retry may help, on the wire (for a pika
    // user) and through our client.
    raw.publish(
        &queue,
        br#"{"a": -1, "b": 0}"#,
        raw.props("missing").with_type("add".into()),
    )
    .await;
    let reply = raw.next_reply(Duration::from_secs(10)).await;
    assert_eq!(reply.error_code, Some(ErrorCode::NotFound));
    assert_eq!(reply.retryable, Some(false));
    assert_eq!(reply.content_type.as_deref(), Some("text/plain"));
    let client = client(&queue, Duration::from_secs(5)).await;
    match client.call("add", br#"{"a": -5, "b": 1}"#).await {
        Err(CallError::Remote { code, message }) => {
            assert_eq!(code, ErrorCode::NotFound);
            assert_eq!(message, "no account -5");
        }
        other => panic!("{other:?}"),
    }
    daemon.expect_requests("add", "ok", 1).await;
    daemon.expect_requests("add", "not_found", 2).await;
    daemon.expect_requests("add", "invalid_argument", 1).await;
    daemon.expect_requests("whoami", "ok", 1).await;
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn the_deadline_cancels_a_handler_and_panics_become_internal() {
    let queue = unique_queue("handlers-deadline");
    let saw_cancel = Arc::new(AtomicBool::new(false));
    let seen = saw_cancel.clone();
    let methods = Methods::default()
        .with(handler("slow", move |req: Request| {
            // At the deadline the handler's future is dropped; work it handed to a task of
            // its own learns through the request's cancellation.
            let seen = seen.clone();
            let cancelled = req.cancellation();
            tokio::spawn(async move {
                cancelled.cancelled().await;
                seen.store(true, Ordering::SeqCst);
            });
            async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(b"late".to_vec())
            }
        }))
        .with(handler("boom", |_req: Request| async move {
            tokio::task::yield_now().await;
            panic!("a bug in a handler");
        }))
        .with(handler(
            "boom-early",
            |_req: Request| -> std::future::Ready<_> {
                panic!("a bug before the handler's future exists")
            },
        ));
    let daemon = TestDaemon::start_with(test_config(&queue), Some(methods)).await;
    let client = client(&queue, Duration::from_secs(5)).await;
    let t0 = std::time::Instant::now();
    let err = client
        .call_timeout("slow", b"", Duration::from_millis(600))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CallError::Remote {
                code: ErrorCode::DeadlineExceeded,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_millis(600),
        "{:?}",
        t0.elapsed()
    );
    wait_until(
        Duration::from_secs(5),
        "the handler saw its cancellation",
        || saw_cancel.load(Ordering::SeqCst),
    )
    .await;
    for method in ["boom", "boom-early", "boom"] {
        match client.call(method, b"").await {
            Err(CallError::Remote { code, .. }) => assert_eq!(code, ErrorCode::Internal),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        fib(&client, 10).await.unwrap().to_string(),
        "55",
        "still serving"
    );
    daemon.expect_requests("boom", "internal", 2).await;
    daemon.expect_requests("boom-early", "internal", 1).await;
    daemon.expect_requests("slow", "deadline_exceeded", 1).await;
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn a_method_limit_holds_and_copies_of_one_call_run_once() {
    let queue = unique_queue("handlers-limit");
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let (r, m, n) = (running.clone(), most.clone(), runs.clone());
    let methods = Methods::default().with(
        handler("io", move |req: Request| {
            let (r, m, n) = (r.clone(), m.clone(), n.clone());
            async move {
                n.fetch_add(1, Ordering::SeqCst);
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                r.fetch_sub(1, Ordering::SeqCst);
                Ok(req.into_body())
            }
        })
        .limit(2),
    );
    let daemon = TestDaemon::start_with(test_config(&queue), Some(methods)).await;
    let client = client(&queue, Duration::from_secs(10)).await;
    let calls = (0..6).map(|i| {
        let client = client.clone();
        async move { client.call("io", format!("{i}").as_bytes()).await }
    });
    let replies = futures_util::future::join_all(calls).await;
    for (i, reply) in replies.into_iter().enumerate() {
        assert_eq!(reply.unwrap(), format!("{i}").into_bytes());
    }
    assert_eq!(most.load(Ordering::SeqCst), 2, "never more than the limit");

    // Two copies of one call (one message_id) at once: run once, answered twice.
    runs.store(0, Ordering::SeqCst);
    let mut raw = RawRequester::new().await;
    for corr in ["a", "b"] {
        let props = raw
            .props(corr)
            .with_type("io".into())
            .with_message_id("once".into());
        raw.publish(&queue, b"same", props).await;
    }
    for _ in 0..2 {
        assert_eq!(raw.next_reply(Duration::from_secs(10)).await.body, b"same");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "single-flight");
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn a_blocking_method_runs_off_the_reactor() {
    let queue = unique_queue("handlers-blocking");
    let reactor = std::thread::current().id();
    let methods = Methods::default().with(blocking("hash", move |req: Request| {
        // The test's runtime is current-thread: the reactor is this test's own thread.
        let off_reactor = std::thread::current().id() != reactor;
        let sum: u64 = req.body().iter().map(|&b| u64::from(b)).sum();
        Ok(format!("{sum} {off_reactor}").into_bytes())
    }));
    let daemon = TestDaemon::start_with(test_config(&queue), Some(methods)).await;
    let client = client(&queue, Duration::from_secs(5)).await;
    assert_eq!(client.call("hash", b"abc").await.unwrap(), b"294 true");
    daemon.expect_requests("hash", "ok", 1).await;
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}
