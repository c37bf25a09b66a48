//! Operability: `/metrics` counts after known traffic, readiness following a private broker out
//! and back while health stays up, JSON logs at debug level that all parse and never contain the
//! broker password.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amqp_rpc::protocol::ErrorCode;
use common::broker::PrivateBroker;
use common::child::*;
use common::*;
use tokio::io::AsyncReadExt;

/// The value of one sample line of a scrape (`name{labels} value`).
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn every_labelled_series_is_scraped_at_zero_before_any_traffic() {
    let queue = unique_queue("metrics-zero");
    let daemon = TestDaemon::start(test_config(&queue)).await;
    let (status, scrape) = http_get(daemon.http.port(), "/metrics")
        .await
        .expect("scrape");
    assert_eq!(status, 200);
    let mut expect = vec![
        "amqp_rpc_rejected_total{reason=\"no_reply_to\"}".to_owned(),
        "amqp_rpc_rejected_total{reason=\"reply_to_unreachable\"}".to_owned(),
        "amqp_rpc_request_duration_seconds_count{method=\"fib\"}".to_owned(),
        "amqp_rpc_request_duration_seconds_count{method=\"unknown\"}".to_owned(),
    ];
    for method in ["fib", "unknown"] {
        for outcome in std::iter::once("ok").chain(ErrorCode::ALL.iter().map(|c| c.as_str())) {
            expect.push(format!(
                "amqp_rpc_requests_total{{method=\"{method}\",outcome=\"{outcome}\"}}"
            ));
        }
    }
    for series in &expect {
        assert_eq!(sample(&scrape, series), Some(0.0), "{series} in:\n{scrape}");
    }
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn metrics_count_known_traffic() {
    let queue = unique_queue("metrics");
    // A redelivery: a raw consumer takes a request and goes away without acking it.
    let (conn, _ch, mut taker) = stalled_server(&queue, None).await;
    let mut raw = RawRequester::new().await;
    raw.publish(&queue, b"9", raw.props("redelivered")).await;
    use futures_util::StreamExt;
    taker.next().await.unwrap().unwrap();
    conn.close(200, "give it back".into()).await.unwrap();

    let daemon = TestDaemon::start(test_config(&queue)).await;
    let reply = raw.next_reply(Duration::from_secs(10)).await;
    assert_eq!(reply.body, b"34");
    for n in 0..5 {
        raw.publish(
            &queue,
            n.to_string().as_bytes(),
            raw.props(&format!("ok{n}")),
        )
        .await;
    }
    // The same request twice, one after the other: the second is a replay.
    for _ in 0..2 {
        raw.publish(
            &queue,
            b"20",
            raw.props("twice").with_message_id("twice".into()),
        )
        .await;
        raw.next_reply(Duration::from_secs(10)).await;
    }
    raw.publish(&queue, b"x", raw.props("bad")).await;
    raw.publish(&queue, b"100001", raw.props("big")).await;
    raw.publish(&queue, b"1", raw.props("nope").with_type("nope".into()))
        .await;
    raw.publish(&queue, &[b'1'; 2000], raw.props("huge")).await;
    for _ in 0..(5 + 4) {
        raw.next_reply(Duration::from_secs(10)).await;
    }
    // A request is counted when its reply is confirmed, and timed once it is acked: wait for
    // both.
    wait_until(Duration::from_secs(10), "all counted and timed", || {
        let timed = daemon.metrics.duration_for("fib").get_sample_count()
            + daemon.metrics.duration_for("unknown").get_sample_count();
        daemon.requests_sum() == 1 + 5 + 2 + 4 && timed == 12
    })
    .await;

    let (status, scrape) = http_get(daemon.http.port(), "/metrics")
        .await
        .expect("scrape");
    assert_eq!(status, 200);
    let expect = [
        (
            "amqp_rpc_requests_total{method=\"fib\",outcome=\"ok\"}",
            8.0,
        ),
        (
            "amqp_rpc_requests_total{method=\"fib\",outcome=\"invalid_argument\"}",
            1.0,
        ),
        (
            "amqp_rpc_requests_total{method=\"fib\",outcome=\"out_of_range\"}",
            1.0,
        ),
        (
            "amqp_rpc_requests_total{method=\"unknown\",outcome=\"unknown_method\"}",
            1.0,
        ),
        (
            "amqp_rpc_requests_total{method=\"fib\",outcome=\"resource_exhausted\"}",
            1.0,
        ),
        ("amqp_rpc_replays_total", 1.0),
        ("amqp_rpc_redeliveries_total", 1.0),
        (
            "amqp_rpc_request_duration_seconds_count{method=\"fib\"}",
            11.0,
        ),
        ("amqp_rpc_in_flight", 0.0),
        ("amqp_rpc_connection_up", 1.0),
        ("amqp_rpc_reconnects_total", 0.0),
        ("amqp_rpc_poison_total", 0.0),
        ("amqp_rpc_expired_total", 0.0),
        ("amqp_rpc_reply_publish_failures_total", 0.0),
    ];
    for (series, value) in expect {
        assert_eq!(
            sample(&scrape, series),
            Some(value),
            "{series} in:\n{scrape}"
        );
    }
    assert!(scrape.contains("amqp_rpc_build_info{version=\""));
    assert!(scrape.contains("# TYPE amqp_rpc_request_duration_seconds histogram"));
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn readiness_follows_the_broker_health_stays_up_logs_are_json_without_the_password() {
    let mut broker = PrivateBroker::start().await;
    let password = format!("Pw-{}", uuid::Uuid::new_v4().simple());
    broker.ctl(&["add_user", "rpc-ops", &password]).await;
    broker
        .ctl(&["set_permissions", "-p", "/", "rpc-ops", ".*", ".*", ".*"])
        .await;
    let url = format!("amqp://rpc-ops:{password}@127.0.0.1:{}/%2f", broker.port());

    let queue = unique_queue("ops");
    let port = free_port();
    let env = [
        ("AMQP_RPC__AMQP__URL", url.as_str()),
        ("AMQP_RPC__AMQP__RECONNECT_MAX_BACKOFF_SECS", "1"),
        ("AMQP_RPC__LOG__FORMAT", "json"),
        ("AMQP_RPC__LOG__LEVEL", "debug"),
    ];
    let mut daemon = spawn_daemon_with(&queue, port, &env, std::process::Stdio::piped()).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let reader = tokio::spawn({
        let (log, mut stderr) = (log.clone(), daemon.stderr.take().unwrap());
        async move {
            let mut chunk = [0u8; 8192];
            while let Ok(n @ 1..) = stderr.read(&mut chunk).await {
                log.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        }
    });
    wait_ready(port).await;
    let client = amqp_rpc::Client::builder(url.as_str())
        .queue(queue.as_str())
        .connect()
        .await
        .unwrap();
    assert_eq!(fib(&client, 30).await.unwrap().to_string(), "832040");
    assert!(client.call("fib", b"-1").await.is_err());

    broker.stop_app().await;
    let t0 = Instant::now();
    wait_until_async(
        Duration::from_secs(10),
        "/readyz 503 while the broker is away",
        || async move { matches!(http_get(port, "/readyz").await, Some((503, _))) },
    )
    .await;
    eprintln!(
        "readiness dropped {:?} after stop_app returned",
        t0.elapsed()
    );
    assert_eq!(
        http_get(port, "/healthz").await.map(|r| r.0),
        Some(200),
        "health stays up"
    );
    assert_eq!(metric(port, "amqp_rpc_connection_up").await, 0.0);

    broker.start_app().await;
    let t0 = Instant::now();
    wait_ready(port).await;
    let back = t0.elapsed();
    eprintln!("ready again {back:?} after start_app returned");
    assert!(back < Duration::from_secs(10), "{back:?}");
    assert_eq!(http_get(port, "/healthz").await.map(|r| r.0), Some(200));
    let (_, scrape) = http_get(port, "/metrics").await.unwrap();
    assert_eq!(sample(&scrape, "amqp_rpc_reconnects_total"), Some(1.0));
    assert!(
        scrape.contains("process_resident_memory_bytes"),
        "process collector present"
    );
    assert_eq!(
        sample(
            &scrape,
            "amqp_rpc_requests_total{method=\"fib\",outcome=\"ok\"}"
        ),
        Some(1.0)
    );

    signal(&daemon, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), daemon.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    reader.await.unwrap();
    let log = String::from_utf8(log.lock().unwrap().clone()).expect("UTF-8 log");
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() > 10, "debug logging produced lines: {log}");
    for line in &lines {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            parsed.get("level").is_some() && parsed.get("timestamp").is_some(),
            "{line}"
        );
    }
    assert!(!log.contains(&password), "the password leaked into the log");
    assert!(
        log.contains("rpc-ops"),
        "the user name is not a secret and shows where the URL is logged"
    );
}
