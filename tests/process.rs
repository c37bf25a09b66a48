//! The real `amqp-rpcd` binary under signals and crashes, with load running: SIGTERM and
//! SIGKILL of one of two daemons lose no call; a second signal cuts the drain short; systemd
//! hears READY, WATCHDOG and STOPPING.

mod common;

use std::time::{Duration, Instant};

use common::bench::{self, Amount, BenchReport, BenchSpec};
use common::child::*;
use common::*;
use tokio::process::Child;

fn load(queue: &str, duration: Duration) -> tokio::task::JoinHandle<BenchReport> {
    let spec = BenchSpec {
        concurrency: 32,
        amount: Amount::Duration(duration),
        warmup: Duration::ZERO,
        method: "fib".into(),
        arg: "10".into(),
        options: amqp_rpc::CallOptions {
            timeout: Duration::from_secs(5),
            idempotent: false,
        },
        progress: false,
    };
    let queue = queue.to_owned();
    tokio::spawn(
        async move { bench::run(client(&queue, Duration::from_secs(5)).await, spec).await },
    )
}

async fn two_daemons(queue: &str) -> [(Child, u16); 2] {
    let mut out = Vec::new();
    for _ in 0..2 {
        let port = free_port();
        let child = spawn_daemon(queue, port, &[]).await;
        wait_ready(port).await;
        out.push((child, port));
    }
    out.try_into().map_err(|_| ()).unwrap()
}

/// Wait until the daemon on `port` has answered `n` requests (so it really is under load).
async fn answered_at_least(port: u16, n: f64) {
    let name = "amqp_rpc_requests_total{method=\"fib\",outcome=\"ok\"}";
    wait_until_async(
        Duration::from_secs(20),
        "daemon under load",
        || async move { metric(port, name).await >= n },
    )
    .await;
}

fn assert_nothing_lost(report: &BenchReport) {
    assert!(report.calls > 500, "load ran: {report:?}");
    assert_eq!(
        report.ok + report.errors,
        report.calls,
        "every call accounted for"
    );
    assert_eq!(report.errors, 0, "no call failed: {:?}", report.error_kinds);
}

#[tokio::test]
async fn sigterm_of_one_of_two_daemons_under_load_loses_nothing() {
    let queue = unique_queue("sigterm");
    let [(mut first, port), (mut second, _)] = two_daemons(&queue).await;
    let load = load(&queue, Duration::from_secs(4));
    answered_at_least(port, 200.0).await;
    signal(&first, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(25), first.wait())
        .await
        .expect("exits in its grace");
    assert_eq!(status.unwrap().code(), Some(0));
    let report = load.await.unwrap();
    assert_nothing_lost(&report);
    second.kill().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn sigkill_of_one_of_two_daemons_under_load_loses_nothing() {
    let queue = unique_queue("sigkill");
    let [(mut first, port), (mut second, _)] = two_daemons(&queue).await;
    let load = load(&queue, Duration::from_secs(4));
    answered_at_least(port, 200.0).await;
    first.kill().await.unwrap(); // SIGKILL: no drain, unacked work goes back to the queue
    let report = load.await.unwrap();
    assert_nothing_lost(&report);
    second.kill().await.unwrap();
    delete_queue(&queue).await;
}

#[tokio::test]
async fn a_second_signal_exits_at_once_with_a_non_zero_code() {
    let queue = unique_queue("twice");
    let port = free_port();
    let mut daemon = spawn_daemon(&queue, port, &[("AMQP_RPC__FIB__MAX_N", "10000000")]).await;
    wait_ready(port).await;
    // fib(3,000,000) keeps a handler busy for seconds: the drain would wait for it.
    let client = client(&queue, Duration::from_secs(60)).await;
    let _slow = tokio::spawn(async move { client.call("fib", b"3000000").await });
    wait_until_async(
        Duration::from_secs(10),
        "slow call in flight",
        || async move { metric(port, "amqp_rpc_in_flight").await == 1.0 },
    )
    .await;
    signal(&daemon, "-TERM");
    wait_until_async(
        Duration::from_secs(10),
        "draining (not ready)",
        || async move { matches!(http_get(port, "/readyz").await, Some((503, _))) },
    )
    .await;
    let t0 = Instant::now();
    signal(&daemon, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(5), daemon.wait())
        .await
        .expect("exits at once")
        .unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(t0.elapsed() < Duration::from_secs(2));
    delete_queue(&queue).await;
}

#[tokio::test]
async fn systemd_hears_ready_watchdog_and_stopping() {
    let queue = unique_queue("notify");
    let dir =
        std::env::temp_dir().join(format!("amqp-rpc-notify-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket_path = dir.join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let port = free_port();
    let path = socket_path.to_str().unwrap();
    let mut daemon = spawn_daemon(
        &queue,
        port,
        &[("NOTIFY_SOCKET", path), ("WATCHDOG_USEC", "400000")],
    )
    .await;

    let mut seen = String::new();
    let mut buf = vec![0u8; 4096];
    let mut recv_until = async |needle: &str, seen: &mut String| {
        tokio::time::timeout(Duration::from_secs(20), async {
            while seen.matches(needle).count() == 0 {
                let n = socket.recv(&mut buf).await.unwrap();
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                seen.push('\n');
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {needle} in {seen:?}"));
    };
    recv_until("READY=1", &mut seen).await;
    seen.clear();
    // Pinged every 200 ms while alive: two pings in well under the 400 ms timeout each.
    recv_until("WATCHDOG=1", &mut seen).await;
    seen.clear();
    recv_until("WATCHDOG=1", &mut seen).await;
    signal(&daemon, "-TERM");
    recv_until("STOPPING=1", &mut seen).await;
    let status = tokio::time::timeout(Duration::from_secs(20), daemon.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
    delete_queue(&queue).await;
}

#[tokio::test]
async fn a_closed_stderr_does_not_stop_serving_or_shutting_down() {
    let queue = unique_queue("epipe");
    let port = free_port();
    let env = [("AMQP_RPC__LOG__LEVEL", "debug")];
    let mut daemon = spawn_daemon_with(&queue, port, &env, std::process::Stdio::piped()).await;
    drop(daemon.stderr.take()); // like `amqp-rpcd 2>&1 | head -3` after head exits
    wait_ready(port).await;
    let client = client(&queue, Duration::from_secs(10)).await;
    for n in [10u64, 20, 30] {
        // Each request logs at debug level into the closed pipe.
        assert_eq!(
            fib(&client, n).await.unwrap(),
            common::fib::fib_decimal(n).parse().unwrap()
        );
    }
    assert!(client.call("fib", b"x").await.unwrap_err().is_remote());
    signal(&daemon, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), daemon.wait())
        .await
        .expect("SIGTERM still drains and exits")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    delete_queue(&queue).await;
}
