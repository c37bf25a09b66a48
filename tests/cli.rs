//! The binaries as a user runs them: `amqp-rpc call` exit codes, a stalled `amqp-rpcd` child
//! (SIGSTOP), `--check-config`, and the password never reaching the logs.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::child::*;
use common::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

async fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_amqp-rpc"))
        .args(args)
        .env("AMQP_URL", amqp_url())
        .output()
        .await
        .expect("amqp-rpc runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn call_exit_codes() {
    let queue = unique_queue("cli");
    let daemon = TestDaemon::start(test_config(&queue)).await;

    let out = cli(&["call", "fib", "20", "--queue", &queue]).await;
    assert_eq!(
        (out.status.code(), text(&out.stdout).trim()),
        (Some(0), "6765")
    );

    // Arguments fib never takes are refused before anything is sent (exit 2, like a usage
    // error): a foreign server could crash on them.
    for arg in ["abc", "-1", "", "1.5"] {
        let out = cli(&["call", "fib", arg, "--queue", &queue]).await;
        assert_eq!(out.status.code(), Some(2), "{arg}");
        assert!(
            text(&out.stderr).contains("fib takes a decimal integer n >= 0"),
            "{arg}: {}",
            text(&out.stderr)
        );
    }
    for (arg, code) in [("100001", "out_of_range")] {
        let out = cli(&["call", "fib", arg, "--queue", &queue]).await;
        assert_eq!(out.status.code(), Some(5), "{arg}");
        assert!(
            text(&out.stderr).contains(code),
            "{arg}: {}",
            text(&out.stderr)
        );
    }
    assert_eq!(
        daemon.requests("fib", "invalid_argument"),
        0,
        "nothing was sent"
    );
    let out = cli(&["call", "nosuch", "1", "--queue", &queue]).await;
    assert_eq!(out.status.code(), Some(5));
    assert!(text(&out.stderr).contains("unknown_method"));

    // No server: queue missing, then queue present without a consumer; both in under 2 s.
    let missing = unique_queue("cli-missing");
    let t0 = Instant::now();
    let out = cli(&["call", "fib", "1", "--queue", &missing, "--timeout", "10s"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(t0.elapsed() < Duration::from_secs(2));
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        missing.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let t0 = Instant::now();
    let out = cli(&["call", "fib", "1", "--queue", &missing, "--timeout", "10s"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(t0.elapsed() < Duration::from_secs(2));

    let out = cli(&[
        "call",
        "fib",
        "1",
        "--url",
        "amqp://guest:guest@127.0.0.1:9/%2f",
        "--timeout",
        "1s",
    ])
    .await;
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    let out = cli(&["call", "fib"]).await;
    assert_eq!(out.status.code(), Some(2));

    let out = cli(&[
        "bench",
        "--queue",
        &queue,
        "--requests",
        "300",
        "--concurrency",
        "8",
        "--json",
    ])
    .await;
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    let report: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap()).expect("JSON last line");
    assert_eq!(report["calls"], 300);
    assert_eq!(report["ok"], 300);
    assert_eq!(report["errors"], 0);
    assert!(report["calls_per_sec"].as_f64().unwrap() > 0.0);
    assert!(report["p99_us"].as_u64().unwrap() >= report["p50_us"].as_u64().unwrap());
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
    delete_queue(&missing).await;
}

#[tokio::test]
async fn stalled_daemon_call_times_out_and_the_request_is_never_computed() {
    let queue = unique_queue("sigstop");
    let port = free_port();
    let mut daemon = spawn_daemon(&queue, port, &[]).await;
    wait_until_async(Duration::from_secs(20), "daemon ready", || async {
        matches!(http_get(port, "/readyz").await, Some((200, _)))
    })
    .await;

    signal(&daemon, "-STOP");
    let t0 = Instant::now();
    let out = cli(&["call", "fib", "30", "--queue", &queue, "--timeout", "700ms"]).await;
    let took = t0.elapsed();
    signal(&daemon, "-CONT");
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_millis(1500),
        "took {took:?}"
    );

    // Resumed, the daemon finds the request past its deadline: acked and dropped, not computed.
    wait_until_async(
        Duration::from_secs(10),
        "expired request counted",
        || async {
            http_get(port, "/metrics")
                .await
                .is_some_and(|(_, m)| m.contains("amqp_rpc_expired_total 1"))
        },
    )
    .await;
    let (_, metrics) = http_get(port, "/metrics").await.unwrap();
    // Every series is exposed at zero from the start: none of fib's may have moved.
    let fib_counts: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("amqp_rpc_requests_total{method=\"fib\""))
        .collect();
    assert!(
        !fib_counts.is_empty(),
        "fib's series are exposed:\n{metrics}"
    );
    assert!(
        fib_counts.iter().all(|l| l.ends_with(" 0")),
        "fib ran:\n{metrics}"
    );
    assert_eq!(queue_message_count(&queue).await, 0);

    signal(&daemon, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), daemon.wait())
        .await
        .expect("exits")
        .unwrap();
    assert_eq!(status.code(), Some(0), "graceful exit");
    delete_queue(&queue).await;
}

#[tokio::test]
async fn check_config_lists_every_problem_without_the_password() {
    let config = format!("{}/config.toml", env!("CARGO_MANIFEST_DIR"));
    let ok = Command::new(env!("CARGO_BIN_EXE_amqp-rpcd"))
        .args(["--config", &config, "--check-config"])
        .output()
        .await
        .unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));

    let bad = Command::new(env!("CARGO_BIN_EXE_amqp-rpcd"))
        .args(["--config", &config, "--check-config"])
        .env(
            "AMQP_RPC__AMQP__URL",
            "amqp://user:s3cr3t-pw@host:notaport/%2f",
        )
        .env("AMQP_RPC__SERVICE__PREFETCH", "0")
        .env("AMQP_RPC__LOG__FORMAT", "xml")
        .env("AMQP_RPC__FIB__MAX_N", "many")
        .output()
        .await
        .unwrap();
    let stderr = text(&bad.stderr);
    assert_eq!(bad.status.code(), Some(64), "{stderr}");
    for key in ["log.format", "fib:"] {
        assert!(stderr.contains(key), "{key} not reported: {stderr}");
    }
    assert!(!stderr.contains("s3cr3t-pw"), "{stderr}");
}

#[tokio::test]
async fn password_never_reaches_the_log_even_at_trace_level() {
    let queue = unique_queue("secret");
    let port = free_port();
    let url = amqp_url().replacen("guest:guest@", "guest:Wr0ng-Passw0rd@", 1);
    let mut daemon = spawn_daemon_with(
        &queue,
        port,
        &[("AMQP_RPC__AMQP__URL", &url), ("RUST_LOG", "trace")],
        std::process::Stdio::piped(),
    )
    .await;
    let mut stderr = daemon.stderr.take().unwrap();
    let mut log = Vec::new();
    // Read until two failed connection attempts have been logged.
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(20), async {
        while text(&log).matches("connection attempt failed").count() < 2 {
            let n = stderr.read(&mut chunk).await.unwrap();
            assert!(n > 0, "daemon exited: {}", text(&log));
            log.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("two failed attempts logged");
    daemon.kill().await.unwrap();
    let log = text(&log);
    assert!(
        log.contains("ACCESS_REFUSED") || log.contains("refused"),
        "{log}"
    );
    assert!(!log.contains("Wr0ng-Passw0rd"), "password leaked");
}

/// A server that is not ours answers fib with something that is not a number (an empty body,
/// `NaN`): the CLI says so and exits 7, never printing it as a result with exit 0.
#[tokio::test]
async fn a_reply_that_is_not_what_the_method_promises_is_an_error() {
    use futures_util::StreamExt;
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions};
    let queue = unique_queue("cli-nonsense");
    let (_conn, ch) = declare_queue(&queue).await;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "nonsense".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let server = tokio::spawn(async move {
        for body in [&b"NaN"[..], b""] {
            let delivery = consumer.next().await.unwrap().unwrap();
            let props = lapin::BasicProperties::default()
                .with_correlation_id(delivery.properties.correlation_id().clone().unwrap());
            let to = delivery.properties.reply_to().clone().unwrap();
            ch.basic_publish(
                "".into(),
                to.as_str().into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap();
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
    });
    for shown in ["\"NaN\"", "\"\""] {
        let out = cli(&["call", "fib", "10", "--queue", &queue, "--no-retry"]).await;
        assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("is not the decimal digits of fib(n)") && stderr.contains(shown),
            "{stderr}"
        );
        assert_eq!(text(&out.stdout), "", "nothing printed as a result");
    }
    server.await.unwrap();
    delete_queue(&queue).await;
}

/// A method the CLI does not know is retried only when the caller says it is idempotent.
#[tokio::test]
async fn idempotent_flag_retries_an_unavailable_answer() {
    use amqp_rpc::protocol::RequestError;
    use amqp_rpc::service::{handler, Methods, Request};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let queue = unique_queue("cli-idem");
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    // Every odd-numbered call is answered `unavailable`, every even one succeeds.
    let methods = Methods::default().with(handler("flaky", move |_req: Request| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            match n % 2 {
                0 => Err(RequestError::new(
                    amqp_rpc::ErrorCode::Unavailable,
                    "try again",
                )),
                _ => Ok(b"done".to_vec()),
            }
        }
    }));
    let daemon = TestDaemon::start_with(test_config(&queue), Some(methods)).await;
    let out = cli(&["call", "flaky", "x", "--queue", &queue, "--idempotent"]).await;
    assert_eq!(
        (out.status.code(), text(&out.stdout).trim()),
        (Some(0), "done"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2, "retried once");
    let out = cli(&["call", "flaky", "x", "--queue", &queue]).await;
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("unavailable"));
    assert_eq!(calls.load(Ordering::SeqCst), 3, "not retried");
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn identify_sends_the_user_a_guarded_method_requires() {
    let queue = unique_queue("cli-identify");
    let mut config = test_config(&queue);
    config
        .service
        .callers
        .insert("fib".into(), vec!["guest".into()]);
    let daemon = TestDaemon::start(config).await;
    let out = cli(&["call", "fib", "10", "--queue", &queue]).await;
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("permission_denied"),
        "{}",
        text(&out.stderr)
    );
    let out = cli(&["call", "fib", "10", "--queue", &queue, "--identify"]).await;
    assert_eq!(
        (out.status.code(), text(&out.stdout).trim()),
        (Some(0), "55"),
        "{}",
        text(&out.stderr)
    );
    daemon.stop().await.unwrap();
    delete_queue(&queue).await;
}
