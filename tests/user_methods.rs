//! Users' own methods (`handler`, `json`, `blocking`: async closures over shared state, typed
//! JSON, CPU work) driven through guarantees tests/handlers.rs does not check for them:
//! bounds before any user code runs, the deadline stopping each kind of handler and a request
//! waiting for a `.limit(n)`, and metrics by method for every outcome, scraped from
//! `/metrics`. Single-flight, the reply cache and poison limits are in
//! tests/user_methods_redelivery.rs; drain in tests/user_methods_drain.rs.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp_rpc::protocol::RequestError;
use amqp_rpc::service::{blocking, handler, json, Methods, Request, JSON_CONTENT_TYPE};
use amqp_rpc::{CallError, ErrorCode};
use common::child::http_get;
use common::user_methods::{deposit_body, nothing_more, replies, spawn_call, Deposit};
use common::*;
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;

/// Counts its runs and echoes its body.
fn raw_echo(runs: Arc<AtomicUsize>) -> impl amqp_rpc::service::Method {
    handler("raw", move |req: Request| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, SeqCst);
            Ok(req.into_body())
        }
    })
}

#[tokio::test]
async fn bounds_are_checked_before_any_user_code_runs() {
    let queue = unique_queue("um-bounds");
    let mut config = test_config(&queue);
    config.service.max_body_bytes = 64;
    let runs = Arc::new(AtomicUsize::new(0));
    let (json_runs, cpu_runs) = (runs.clone(), runs.clone());
    let methods = Methods::default()
        .with(raw_echo(runs.clone()))
        .with(json("deposit", move |_req: Request, d: Deposit| {
            let runs = json_runs.clone();
            async move {
                runs.fetch_add(1, SeqCst);
                Ok(d.cents)
            }
        }))
        .with(blocking("cpu", move |req: Request| {
            cpu_runs.fetch_add(1, SeqCst);
            Ok(req.into_body())
        }));
    let daemon = TestDaemon::start_with(config, Some(methods)).await;
    let mut raw = RawRequester::new().await;
    // Valid JSON of exactly `n` bytes (trailing whitespace is allowed).
    let sized = |n: usize| {
        let mut body = deposit_body(1, 0);
        body.resize(n, b' ');
        body
    };
    // Too big for each kind of method (even valid JSON), then JSON that does not fit.
    let too_big = [
        ("raw", vec![b'x'; 65]),
        ("deposit", sized(65)),
        ("cpu", vec![b'x'; 65]),
    ];
    let not_json: [&[u8]; 5] = [
        b"not json",
        br#"{"account":"a"}"#,
        br#"{"account":"a","cents":-1}"#,
        b"",
        &[0xff, 0xfe],
    ];
    let refused = too_big
        .into_iter()
        .map(|(m, b)| (m, b, ErrorCode::ResourceExhausted));
    let refused: Vec<_> = refused
        .chain(not_json.map(|b| ("deposit", b.to_vec(), ErrorCode::InvalidArgument)))
        .collect();
    for (i, (method, body, _)) in refused.iter().enumerate() {
        raw.publish(
            &queue,
            body,
            raw.props(&i.to_string()).with_type((*method).into()),
        )
        .await;
    }
    let got = replies(&mut raw, refused.len()).await;
    for (i, (_, _, code)) in refused.iter().enumerate() {
        let reply = &got[&i.to_string()];
        assert_eq!(reply.error_code, Some(*code), "{i}: {reply:?}");
        assert_eq!(
            (reply.retryable, reply.content_type.as_deref()),
            (Some(false), Some("text/plain"))
        );
        assert!(
            !reply.body.is_empty() && !reply.body.contains(&b'\n'),
            "{i}"
        );
    }
    assert_eq!(runs.load(SeqCst), 0, "no handler ran for a refused request");
    // Without a correlation_id: still answered, invalid_argument, the handler not run.
    let props = BasicProperties::default()
        .with_reply_to(raw.reply_queue.as_str().into())
        .with_type("raw".into());
    raw.publish(&queue, b"hi", props).await;
    let reply = raw.next_reply(Duration::from_secs(10)).await;
    assert_eq!(
        (reply.correlation_id, reply.error_code),
        (None, Some(ErrorCode::InvalidArgument))
    );
    assert_eq!(runs.load(SeqCst), 0);

    // At the limit, each method runs (so the counter above could have moved).
    for (id, method, body) in [
        ("a", "raw", vec![b'x'; 64]),
        ("b", "deposit", sized(64)),
        ("c", "cpu", vec![b'y'; 64]),
    ] {
        raw.publish(&queue, &body, raw.props(id).with_type(method.into()))
            .await;
    }
    let got = replies(&mut raw, 3).await;
    assert_eq!(got["a"].body, vec![b'x'; 64]);
    assert_eq!(got["a"].content_type, None, "a raw success reply is bytes");
    assert_eq!(
        (got["b"].body.as_slice(), got["b"].content_type.as_deref()),
        (&b"1"[..], Some(JSON_CONTENT_TYPE))
    );
    assert_eq!(got["c"].body, vec![b'y'; 64]);
    assert_eq!(runs.load(SeqCst), 3);
    nothing_more(&mut raw, &queue, "raw").await;
    for (method, outcome, n) in [
        ("raw", "resource_exhausted", 1),
        ("deposit", "resource_exhausted", 1),
        ("cpu", "resource_exhausted", 1),
        ("deposit", "invalid_argument", 5),
        ("raw", "invalid_argument", 1),
        ("raw", "ok", 2),
        ("deposit", "ok", 1),
        ("cpu", "ok", 1),
    ] {
        daemon.expect_requests(method, outcome, n).await;
    }
    assert_eq!(daemon.requests_sum(), 13, "one outcome per request");
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

/// Sets its flag when dropped: shows that a handler's future was dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

/// The call ended by its deadline as `deadline_exceeded`: the daemon's reply, sent 20 ms
/// before the deadline, arrived first (`strict`), or else (a loaded machine can take longer than
/// that margin) the client's own timer ended it and the reply is counted late. 1 if so.
#[track_caller]
fn timed_out(
    result: Result<Vec<u8>, CallError>,
    t0: Instant,
    limit: Duration,
    strict: bool,
) -> u64 {
    let remote = result.as_ref().err().and_then(CallError::remote_code);
    if remote == Some(ErrorCode::DeadlineExceeded) {
        assert!(
            t0.elapsed() < limit,
            "the reply came after {:?}",
            t0.elapsed()
        );
        return 0;
    }
    assert!(
        !strict && matches!(result, Err(CallError::Timeout(_))),
        "{result:?}"
    );
    1
}

#[tokio::test]
async fn the_deadline_stops_async_json_and_blocking_handlers() {
    let queue = unique_queue("um-deadline");
    let mut config = test_config(&queue);
    config.service.concurrency = 1; // one blocking handler at a time
    let [dropped, finished, stopped] = <[Arc<AtomicBool>; 3]>::default();
    let one_runs = Arc::new(AtomicUsize::new(0));
    let gate = CancellationToken::new();
    let (d, f, s, r, g) = (
        dropped.clone(),
        finished.clone(),
        stopped.clone(),
        one_runs.clone(),
        gate.clone(),
    );
    let methods = Methods::default()
        .with(json("reserve", move |_req: Request, q: Deposit| {
            let (guard, finished) = (SetOnDrop(d.clone()), f.clone());
            async move {
                let _guard = guard;
                tokio::time::sleep(Duration::from_millis(q.ms)).await;
                finished.store(true, SeqCst);
                Ok(q.cents)
            }
        }))
        .with(blocking("crunch", move |req: Request| {
            if req.body() == b"quick" {
                return Ok(b"quick".to_vec());
            }
            // CPU work that looks at its cancellation between steps.
            while !req.is_cancelled() {
                std::thread::sleep(Duration::from_millis(1));
            }
            s.store(true, SeqCst);
            Ok(b"too late".to_vec())
        }))
        .with(
            handler("one", move |_req: Request| {
                let (runs, gate) = (r.clone(), g.clone());
                async move {
                    runs.fetch_add(1, SeqCst);
                    gate.cancelled().await;
                    Ok(b"one".to_vec())
                }
            })
            .limit(1),
        );
    let daemon = TestDaemon::start_with(config, Some(methods)).await;
    let client = client(&queue, Duration::from_secs(5)).await;
    let short = Duration::from_millis(500);

    // Async JSON: answered deadline_exceeded in time, and its future dropped before it ended.
    let t0 = Instant::now();
    let body = deposit_body(1, 30_000);
    let reserve = client.call_timeout("reserve", &body, short).await;
    let mut late = timed_out(reserve, t0, short, true);
    wait_until(Duration::from_secs(5), "the future is dropped", || {
        dropped.load(SeqCst)
    })
    .await;
    assert!(!finished.load(SeqCst), "dropped, not finished");

    // Blocking: it sees its cancellation and stops, which frees the only CPU slot.
    let t0 = Instant::now();
    let crunch = client.call_timeout("crunch", b"spin", short).await;
    late += timed_out(crunch, t0, short, false);
    wait_until(Duration::from_secs(5), "the blocking handler stops", || {
        stopped.load(SeqCst)
    })
    .await;
    assert_eq!(
        client.call("crunch", b"quick").await.unwrap(),
        b"quick",
        "the CPU slot is free"
    );

    // Waiting for a method's limit counts against the deadline; the handler never starts.
    let first = spawn_call(&client, "one");
    wait_until(Duration::from_secs(5), "the first holds the limit", || {
        one_runs.load(SeqCst) == 1
    })
    .await;
    let t0 = Instant::now();
    late += timed_out(
        client.call_timeout("one", b"", short).await,
        t0,
        short,
        false,
    );
    assert_eq!(one_runs.load(SeqCst), 1, "the waiting request never ran");
    gate.cancel();
    assert_eq!(first.await.unwrap().unwrap(), b"one");

    // Five calls, five outcomes; no reply beyond them but those that came too late.
    for (method, outcome) in [
        ("reserve", "deadline_exceeded"),
        ("crunch", "deadline_exceeded"),
        ("crunch", "ok"),
        ("one", "deadline_exceeded"),
        ("one", "ok"),
    ] {
        daemon.expect_requests(method, outcome, 1).await;
    }
    assert_eq!(daemon.requests_sum(), 5);
    wait_until(Duration::from_secs(5), "late replies counted", || {
        client.late_replies() >= late
    })
    .await;
    assert_eq!((client.late_replies(), client.pending_calls()), (late, 0));
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

/// The value of one sample of a scrape (`name{labels} value`).
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

async fn scrape(daemon: &TestDaemon) -> String {
    let (status, body) = http_get(daemon.http.port(), "/metrics")
        .await
        .expect("scrape");
    assert_eq!(status, 200);
    body
}

#[tokio::test]
async fn metrics_are_labelled_by_user_method_for_every_outcome() {
    let queue = unique_queue("um-metrics");
    let outcomes: Vec<&str> = std::iter::once("ok")
        .chain(ErrorCode::ALL.iter().map(|c| c.as_str()))
        .collect();
    // Answers the outcome its body names: ok, or that error code.
    let methods = Methods::default()
        .with(handler("answer", |req: Request| async move {
            let asked = String::from_utf8_lossy(req.body()).into_owned();
            match asked.parse::<ErrorCode>() {
                Ok(code) => Err(RequestError::new(code, format!("asked for {asked}"))),
                Err(_) => Ok(asked.into_bytes()),
            }
        }))
        .with(blocking("idle", |_req: Request| Ok(Vec::new())));
    let daemon = TestDaemon::start_with(test_config(&queue), Some(methods)).await;
    let series = |method: &str, outcome: &str| {
        format!("amqp_rpc_requests_total{{method=\"{method}\",outcome=\"{outcome}\"}}")
    };
    let before = scrape(&daemon).await;
    for method in ["answer", "idle", "unknown"] {
        for outcome in &outcomes {
            assert_eq!(
                sample(&before, &series(method, outcome)),
                Some(0.0),
                "{method}/{outcome} at zero"
            );
        }
        let timed = format!("amqp_rpc_request_duration_seconds_count{{method=\"{method}\"}}");
        assert_eq!(sample(&before, &timed), Some(0.0));
    }

    let client = client(&queue, Duration::from_secs(5)).await;
    for outcome in &outcomes {
        let result = client.call("answer", outcome.as_bytes()).await;
        let kind = result.as_ref().map_or_else(|e| e.kind(), |_| "ok");
        assert_eq!(kind, *outcome, "{result:?}");
    }
    // A method nobody serves is counted under `unknown`, not under the name it was sent with.
    let err = client.call("answer2", b"ok").await.unwrap_err();
    assert_eq!(err.remote_code(), Some(ErrorCode::UnknownMethod));
    let calls = outcomes.len() as u64 + 1;
    wait_until(
        Duration::from_secs(10),
        "every call counted and timed",
        || {
            daemon.requests_sum() == calls
                && daemon.metrics.duration_for("answer").get_sample_count() == calls - 1
        },
    )
    .await;
    let after = scrape(&daemon).await;
    for outcome in &outcomes {
        let unknown = if *outcome == "unknown_method" {
            1.0
        } else {
            0.0
        };
        assert_eq!(
            sample(&after, &series("answer", outcome)),
            Some(1.0),
            "answer/{outcome}"
        );
        assert_eq!(
            sample(&after, &series("idle", outcome)),
            Some(0.0),
            "idle/{outcome}"
        );
        assert_eq!(
            sample(&after, &series("unknown", outcome)),
            Some(unknown),
            "unknown/{outcome}"
        );
    }
    assert!(
        !after.contains("answer2"),
        "no series for a name callers sent"
    );
    let timed = "amqp_rpc_request_duration_seconds_count{method=\"answer\"}";
    assert_eq!(sample(&after, timed), Some((calls - 1) as f64));
    assert_eq!(sample(&after, "amqp_rpc_in_flight"), Some(0.0));
    assert_eq!((client.late_replies(), client.pending_calls()), (0, 0));
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}
