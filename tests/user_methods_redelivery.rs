//! Users' own methods and the redelivery guarantees: copies of a call to an async JSON handler
//! with side effects run once (single-flight) and later copies replay the cached reply; poison
//! requests to an async handler that never settles (its worker's connection dies under it) or
//! panics only on a retry end after `max_deliveries`, on a classic and a quorum queue, and
//! across crashed workers on a quorum queue; a run abandoned with its connection is run again
//! on redelivery (its answer is not cached), and a copy that joins another's run still gets
//! its own deadline.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp_rpc::config::QueueType;
use amqp_rpc::protocol::{deadline_header_value, now_epoch_ms, RequestError, DEADLINE_HEADER};
use amqp_rpc::service::{handler, json, Methods, Request, JSON_CONTENT_TYPE};
use amqp_rpc::ErrorCode;
use common::proxy::{broker_addr, Proxy};
use common::user_methods::{deposit_body, nothing_more, replies, Deposit};
use common::*;
use lapin::options::BasicGetOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Receipt {
    balance: u64,
    run: usize,
}

/// A copy of the call named `message_id`, answered to `id`.
fn copy(raw: &RawRequester, id: &str, method: &str, message_id: &str) -> BasicProperties {
    let props = raw.props(id).with_type(method.into());
    props.with_message_id(message_id.into())
}

fn with_deadline(props: BasicProperties, in_ms: u64) -> BasicProperties {
    let mut headers = FieldTable::default();
    let deadline = deadline_header_value(now_epoch_ms() + in_ms);
    headers.insert(DEADLINE_HEADER.into(), deadline);
    props.with_headers(headers)
}

#[tokio::test]
async fn copies_of_a_call_with_side_effects_run_once_and_later_copies_replay() {
    let queue = unique_queue("um-once");
    let balance = Arc::new(AtomicU64::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let (b, r) = (balance.clone(), runs.clone());
    let methods = Methods::default()
        .with(handler("ping", |_req: Request| async {
            Ok(b"pong".to_vec())
        }))
        .with(json("deposit", move |_req: Request, d: Deposit| {
            let (balance, runs) = (b.clone(), r.clone());
            async move {
                let run = runs.fetch_add(1, SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(d.ms)).await;
                if d.cents == 0 {
                    let e = RequestError::new(ErrorCode::FailedPrecondition, "nothing to deposit");
                    return Err(e);
                }
                let balance = balance.fetch_add(d.cents, SeqCst) + d.cents;
                Ok(Receipt { balance, run })
            }
        }));
    let daemon = TestDaemon::start_with(test_config(&queue), Some(methods)).await;
    let mut raw = RawRequester::new().await;
    let copy =
        |raw: &RawRequester, id: &str, message_id: &str| copy(raw, id, "deposit", message_id);
    let receipt = |r: &RawReply| serde_json::from_slice::<Receipt>(&r.body).unwrap();

    // Two copies at once: one run, one side effect, the same reply twice.
    for id in ["a", "b"] {
        raw.publish(&queue, &deposit_body(5, 200), copy(&raw, id, "dep-1"))
            .await;
    }
    let got = replies(&mut raw, 2).await;
    assert_eq!(got["a"].body, got["b"].body);
    assert_eq!(got["a"].content_type.as_deref(), Some(JSON_CONTENT_TYPE));
    assert_eq!(receipt(&got["a"]), Receipt { balance: 5, run: 1 });
    // A later copy is answered from the cache.
    raw.publish(&queue, &deposit_body(5, 200), copy(&raw, "c", "dep-1"))
        .await;
    let reply = raw.next_reply(Duration::from_secs(10)).await;
    assert_eq!(reply.body, got["a"].body);
    assert_eq!((runs.load(SeqCst), balance.load(SeqCst)), (1, 5));
    assert_eq!(daemon.metrics.replays.get(), 2);
    // The same message_id with another body is another request.
    raw.publish(&queue, &deposit_body(7, 0), copy(&raw, "d", "dep-1"))
        .await;
    let other = receipt(&raw.next_reply(Duration::from_secs(10)).await);
    assert_eq!(
        other,
        Receipt {
            balance: 12,
            run: 2
        }
    );
    // An application error is a fact about the request: replayed too.
    for id in ["e", "f"] {
        raw.publish(&queue, &deposit_body(0, 0), copy(&raw, id, "dep-0"))
            .await;
        let reply = raw.next_reply(Duration::from_secs(10)).await;
        assert_eq!(
            reply.error_code,
            Some(ErrorCode::FailedPrecondition),
            "{id}"
        );
    }
    assert_eq!((runs.load(SeqCst), daemon.metrics.replays.get()), (3, 3));
    // deadline_exceeded is about its moment: a copy that waited for it runs for itself.
    let short = with_deadline(copy(&raw, "short", "dep-2"), 300);
    raw.publish(&queue, &deposit_body(1, 600), short).await;
    let long = with_deadline(copy(&raw, "long", "dep-2"), 5_000);
    raw.publish(&queue, &deposit_body(1, 600), long).await;
    let got = replies(&mut raw, 2).await;
    assert_eq!(got["short"].error_code, Some(ErrorCode::DeadlineExceeded));
    assert_eq!(
        receipt(&got["long"]),
        Receipt {
            balance: 13,
            run: 5
        }
    );
    assert_eq!((runs.load(SeqCst), daemon.metrics.replays.get()), (5, 3));
    nothing_more(&mut raw, &queue, "ping").await;
    daemon.expect_requests("deposit", "ok", 5).await;
    daemon
        .expect_requests("deposit", "failed_precondition", 2)
        .await;
    daemon
        .expect_requests("deposit", "deadline_exceeded", 1)
        .await;
    daemon.expect_requests("ping", "ok", 1).await;
    assert_eq!(daemon.requests_sum(), 9, "one outcome per request");
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

/// Known bug: a copy that joins a running computation waits for it past its own deadline.
#[tokio::test]
async fn a_copy_that_joins_a_running_call_still_gets_its_deadline() {
    let queue = unique_queue("um-join");
    let methods = Methods::default().with(handler("slow", |_req: Request| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok(b"done".to_vec())
    }));
    let daemon = TestDaemon::start_with(test_config(&queue), Some(methods)).await;
    let mut raw = RawRequester::new().await;
    let long = with_deadline(copy(&raw, "long", "slow", "join-1"), 5_000);
    raw.publish(&queue, b"", long).await;
    let short = with_deadline(copy(&raw, "short", "slow", "join-1"), 400);
    raw.publish(&queue, b"", short).await;
    // Today "short" gets no reply at all: it waits for "long"'s 1.5 s run, then the daemon
    // drops the late reply. The contract answers deadline_exceeded while the caller waits.
    let first = raw.next_reply(Duration::from_millis(400)).await;
    assert_eq!(first.correlation_id.as_deref(), Some("short"));
    assert_eq!(first.error_code, Some(ErrorCode::DeadlineExceeded));
    assert_eq!(raw.next_reply(Duration::from_secs(5)).await.body, b"done");
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

/// What each run of `flaky` saw: (body, attempt, redelivered).
type Seen = Arc<Mutex<Vec<(String, u32, bool)>>>;

/// `flaky` never settles, not even once told its work is wasted (it counts that), except that
/// body `panics` panics on any attempt after the first.
fn flaky(seen: Seen, cancelled: Arc<AtomicUsize>) -> Methods {
    Methods::default().with(handler("flaky", move |req: Request| {
        let (seen, cancelled) = (seen.clone(), cancelled.clone());
        async move {
            let body = String::from_utf8_lossy(req.body()).into_owned();
            let attempt = req.attempt();
            seen.lock()
                .unwrap()
                .push((body.clone(), attempt, req.redelivered()));
            if body == "panics" && attempt > 1 {
                panic!("a bug only a retry meets");
            }
            req.cancelled().await;
            cancelled.fetch_add(1, SeqCst);
            std::future::pending().await
        }
    }))
}

/// A config through `proxy` with a poison limit of 3 and a dead-letter queue.
fn poison_config(queue: &str, proxy: &Proxy, queue_type: QueueType) -> amqp_rpc::config::Config {
    let mut config = test_config(queue);
    config.amqp.url = proxy.url(&amqp_url());
    config.service.queue_type = queue_type;
    config.service.max_deliveries = 3;
    config.service.dead_letter_queue = format!("{queue}-dlq");
    config
}

async fn proxy() -> Proxy {
    Proxy::start("127.0.0.1:0".parse().unwrap(), broker_addr(&amqp_url())).await
}

/// `reply` gives the poison request up after 4 attempts, and its dead-letter copy (with its
/// attempts) is the only one; then the daemon stops, and nothing is left unacked to loop.
async fn given_up(reply: &RawReply, daemon: TestDaemon) {
    assert_eq!(reply.error_code, Some(ErrorCode::Internal));
    let message = String::from_utf8_lossy(&reply.body);
    assert!(message.contains("4 delivery attempts"), "{message}");
    assert_eq!(daemon.metrics.poison.get(), 1);
    let (queue, dlq) = (daemon.queue.clone(), format!("{}-dlq", daemon.queue));
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    let get = BasicGetOptions { no_ack: true };
    let dead = ch.basic_get(dlq.as_str().into(), get).await.unwrap();
    let dead = dead.expect("a dead letter").delivery;
    let headers = dead.properties.headers().clone().unwrap_or_default();
    let attempts = headers.inner().get("x-poison-attempts");
    assert_eq!(
        (&dead.data[..], attempts),
        (&b"hangs"[..], Some(&AMQPValue::LongInt(4)))
    );
    let again = ch.basic_get(dlq.as_str().into(), get).await.unwrap();
    assert!(again.is_none(), "one copy");
    daemon.stop().await.unwrap();
    assert_eq!(queue_message_count(&queue).await, 0, "acked: nothing loops");
    delete_queue(&queue).await;
    delete_queue(&dlq).await;
}

/// A user method that never settles, its worker's connection lost under it each attempt.
async fn poison_ends_for_a_user_method(queue_type: QueueType) {
    let queue = unique_queue("um-poison");
    let proxy = proxy().await;
    let (seen, cancelled) = (Seen::default(), Arc::new(AtomicUsize::new(0)));
    let methods = flaky(seen.clone(), cancelled.clone());
    let config = poison_config(&queue, &proxy, queue_type);
    let (daemon, mut ready) = TestDaemon::spawn(config, Some(methods)).await;
    readiness_becomes(&mut ready, true, Duration::from_secs(20), "daemon ready").await;
    let mut raw = RawRequester::new().await;
    raw.publish(&queue, b"hangs", copy(&raw, "h", "flaky", "poison-h"))
        .await;
    for attempt in 1..=3 {
        // An abandoned run never settles, so each attempt stays in flight.
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
            "connection lost",
        )
        .await;
        readiness_becomes(&mut ready, true, Duration::from_secs(10), "ready again").await;
    }
    let reply = raw.next_reply(Duration::from_secs(10)).await;
    assert_eq!(reply.correlation_id.as_deref(), Some("h"));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.first(), Some(&("hangs".into(), 1, false)), "{seen:?}");
    assert!(
        seen.iter().all(|s| s.1 <= 3),
        "never run past the limit: {seen:?}"
    );
    assert_eq!(cancelled.load(SeqCst), seen.len(), "each lost run was told");
    daemon.expect_requests("flaky", "internal", 1).await;
    assert_eq!(daemon.requests_sum(), 1, "one reply");
    given_up(&reply, daemon).await;
}

#[tokio::test]
async fn poison_user_method_ends_after_max_deliveries_on_a_classic_queue() {
    poison_ends_for_a_user_method(QueueType::Classic).await;
}

#[tokio::test]
async fn poison_user_method_ends_after_max_deliveries_on_a_quorum_queue() {
    poison_ends_for_a_user_method(QueueType::Quorum).await;
}

/// Each attempt kills its worker (a fresh daemon takes the next, as after a crash): the quorum
/// queue's count ends the request after `max_deliveries` across workers. A request that
/// panics on its retry is answered `internal` and never run again. (On a classic queue each
/// process counts afresh, as the README says.)
#[tokio::test]
async fn a_user_method_that_kills_its_workers_ends_after_max_deliveries_on_a_quorum_queue() {
    let queue = unique_queue("um-crash");
    let (seen, cancelled) = (Seen::default(), Arc::new(AtomicUsize::new(0)));
    let mut raw = RawRequester::new().await;
    let runs = |body: &str| seen.lock().unwrap().iter().filter(|s| s.0 == body).count();
    for attempt in 1..=3 {
        let proxy = proxy().await;
        let config = poison_config(&queue, &proxy, QueueType::Quorum);
        let daemon =
            TestDaemon::start_with(config, Some(flaky(seen.clone(), cancelled.clone()))).await;
        let mut back = 1;
        if attempt == 1 {
            raw.publish(&queue, b"hangs", copy(&raw, "h", "flaky", "crash-h"))
                .await;
        }
        if attempt == 3 {
            // Its first run hangs too; the retry will panic.
            raw.publish(&queue, b"panics", copy(&raw, "p", "flaky", "crash-p"))
                .await;
            wait_until(Duration::from_secs(10), "p runs", || runs("panics") == 1).await;
            back = 2;
        }
        let what = format!("attempt {attempt} runs");
        wait_until(Duration::from_secs(10), &what, || runs("hangs") == attempt).await;
        // The worker dies: no drain, its connections cut, its requests back in the queue.
        daemon.task.abort();
        proxy.cut_all();
        let what = "requests back in the queue";
        wait_until_async(Duration::from_secs(10), what, || async {
            queue_message_count(&queue).await == back
        })
        .await;
    }
    let proxy = proxy().await;
    let config = poison_config(&queue, &proxy, QueueType::Quorum);
    let daemon = TestDaemon::start_with(config, Some(flaky(seen.clone(), cancelled.clone()))).await;
    let got = replies(&mut raw, 2).await;
    assert_eq!(got["p"].error_code, Some(ErrorCode::Internal), "the panic");
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    let run = |body: &str, attempt, again| (body.to_owned(), attempt, again);
    let expect = [
        run("hangs", 1, false),
        run("hangs", 2, true),
        run("hangs", 3, true),
        run("panics", 1, false),
        run("panics", 2, true),
    ];
    assert_eq!(seen, expect, "one run per attempt, none past the limit");
    daemon.expect_requests("flaky", "internal", 2).await;
    assert_eq!(daemon.requests_sum(), 2, "one reply each");
    given_up(&got["h"], daemon).await;
}

/// Known bug: what a handler answers once told its work is wasted (the connection was lost)
/// goes into the reply cache, and the redelivery is answered with it instead of being run.
#[tokio::test]
async fn a_run_abandoned_with_its_connection_is_run_again_on_redelivery() {
    let queue = unique_queue("um-abandon");
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), broker_addr(&amqp_url())).await;
    let mut config = test_config(&queue);
    config.amqp.url = proxy.url(&amqp_url());
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let methods = Methods::default().with(handler("stoppable", move |req: Request| {
        let run = r.fetch_add(1, SeqCst) + 1;
        async move {
            if run == 1 {
                // As the README advises: stop once the work is wasted.
                req.cancelled().await;
                return Err(RequestError::new(ErrorCode::Cancelled, "stopped"));
            }
            Ok(b"done".to_vec())
        }
    }));
    let (daemon, mut ready) = TestDaemon::spawn(config, Some(methods)).await;
    readiness_becomes(&mut ready, true, Duration::from_secs(20), "daemon ready").await;
    let mut raw = RawRequester::new().await;
    raw.publish(&queue, b"", copy(&raw, "s", "stoppable", "abandon-1"))
        .await;
    wait_until(Duration::from_secs(10), "the first run", || {
        runs.load(SeqCst) == 1
    })
    .await;
    proxy.cut_all();
    readiness_becomes(
        &mut ready,
        false,
        Duration::from_secs(10),
        "connection lost",
    )
    .await;
    readiness_becomes(&mut ready, true, Duration::from_secs(10), "ready again").await;
    // Today: `cancelled` from the cache, and one run.
    let reply = raw.next_reply(Duration::from_secs(10)).await;
    assert_eq!(
        (reply.error_code, reply.body.as_slice()),
        (None, &b"done"[..])
    );
    assert_eq!(runs.load(SeqCst), 2);
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}
