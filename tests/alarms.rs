//! Broker resource alarms on a private node (never the shared one): with a memory or disk
//! alarm on, the broker blocks every publishing connection (`connection.blocked`). Under load,
//! the daemon says so (log, `amqp_rpc_connection_blocked`, `/readyz`) and keeps its liveness,
//! a call made while blocked fails at once with the broker's reason, every call of the load
//! ends in one outcome by its deadline, and service comes back when the alarm clears.

mod common;

use std::time::{Duration, Instant};

use amqp_rpc::config::AmqpConfig;
use amqp_rpc::{CallError, CallOptions, Client};
use common::bench::{self, Amount, BenchSpec};
use common::broker::PrivateBroker;
use common::*;

const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// How a call of the load may end while the alarm is on: blocked before it was sent, or sent
/// and then waiting at the broker until its deadline.
const ALARM_OUTCOMES: [&str; 2] = ["blocked", "timeout"];

enum Alarm {
    Memory,
    Disk,
}

impl Alarm {
    async fn raise(&self, broker: &PrivateBroker) {
        match self {
            Alarm::Memory => {
                broker
                    .ctl(&["set_vm_memory_high_watermark", "absolute", "1"])
                    .await
            }
            // More free disk than any machine has: the disk alarm goes off.
            Alarm::Disk => broker.ctl(&["set_disk_free_limit", "100000GB"]).await,
        }
    }

    async fn clear(&self, broker: &PrivateBroker) {
        match self {
            Alarm::Memory => broker.ctl(&["set_vm_memory_high_watermark", "0.4"]).await,
            Alarm::Disk => broker.ctl(&["set_disk_free_limit", "50MB"]).await,
        }
    }
}

async fn readyz(daemon: &TestDaemon) -> (u16, String) {
    let url = format!("http://{}/readyz", daemon.http);
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", &url])
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("a status line");
    (code.trim().parse().expect("a status code"), body.to_owned())
}

/// `hold`: how long the alarm stays on at least.
async fn under_load(alarm: Alarm, hold: Duration) {
    let broker = PrivateBroker::start().await;
    let queue = unique_queue("alarm");
    let mut config = test_config(&queue);
    config.amqp = AmqpConfig {
        url: broker.url(),
        ..AmqpConfig::default()
    };
    let daemon = TestDaemon::start(config).await;
    let client = Client::builder(broker.url())
        .queue(queue.as_str())
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .expect("client connects");
    let spec = BenchSpec {
        concurrency: 16,
        amount: Amount::Duration(Duration::from_secs(8)),
        warmup: Duration::ZERO,
        method: "fib".into(),
        arg: "10".into(),
        options: CallOptions {
            timeout: CALL_TIMEOUT,
            idempotent: false,
        },
        progress: false,
    };
    let load = tokio::spawn(bench::run(client.clone(), spec));
    wait_until(Duration::from_secs(10), "load under way", || {
        daemon.requests("fib", "ok") >= 200
    })
    .await;

    alarm.raise(&broker).await;
    let raised = Instant::now();
    // The disk monitor may take its next periodic look (a few seconds) to see the new limit.
    wait_until(Duration::from_secs(15), "the daemon sees the block", || {
        daemon.metrics.connection_blocked.get() == 1
    })
    .await;
    eprintln!(
        "BLOCKED: daemon told {:?} after the alarm",
        raised.elapsed()
    );
    let raised = Instant::now();
    let (code, body) = readyz(&daemon).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("blocked by the broker"), "{body}");
    // A one-shot call, on a connection of its own, made while the alarm is on (the broker
    // tells a connection it is blocked only once it publishes: the client asks at connect).
    let t0 = Instant::now();
    let one_shot = Client::builder(broker.url())
        .queue(queue.as_str())
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .expect("connects while the alarm is on");
    let first = one_shot.call("fib", b"10").await;
    let took = t0.elapsed();
    eprintln!(
        "ONE-SHOT: connect and call {:?} in {took:?}",
        first.as_ref().err()
    );
    assert!(took < Duration::from_millis(900), "took {took:?}");
    let t1 = Instant::now();
    let again = one_shot.call("fib", b"10").await;
    match (&first, &again) {
        (Err(CallError::Blocked(a)), Err(CallError::Blocked(b))) => {
            assert!(!a.is_empty() && a == b, "{a:?} {b:?}");
        }
        other => panic!("calls while blocked: {other:?}"),
    }
    assert!(
        t1.elapsed() < Duration::from_millis(200),
        "took {:?}",
        t1.elapsed()
    );
    // The CLI, as an operator runs it: exit 6 with the broker's reason, well within its timeout.
    let t2 = Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_amqp-rpc"))
        .args(["call", "fib", "10", "--timeout", "3s", "--queue", &queue])
        .env("AMQP_URL", broker.url())
        .output()
        .await
        .expect("amqp-rpc runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "CLI: exit {:?} in {:?}: {}",
        out.status.code(),
        t2.elapsed(),
        stderr.trim()
    );
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.contains("blocked") && stderr.contains("low on"),
        "{stderr}"
    );
    assert!(
        t2.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t2.elapsed()
    );
    // The load's client has heard it too (it publishes as soon as a call of the load ends):
    // from then on its callers fail at once, in a tight loop, until the alarm clears.
    wait_until_async(
        Duration::from_secs(10),
        "the load's client is blocked",
        || {
            let c = client.clone();
            async move { matches!(c.call("fib", b"10").await, Err(CallError::Blocked(_))) }
        },
    )
    .await;
    // Blocked, not wedged: the consume loop still beats, so a liveness probe keeps passing,
    // however long the alarm lasts. Held past /healthz's window (10 s of silence), time is
    // what is under test here.
    if let Some(rest) = hold.checked_sub(raised.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let healthz = tokio::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{}/healthz", daemon.http))
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&healthz.stdout), "200");

    alarm.clear(&broker).await;
    // The disk monitor sees the new limit at its next look, a few seconds at most.
    wait_until(Duration::from_secs(30), "the daemon is unblocked", || {
        daemon.metrics.connection_blocked.get() == 0
    })
    .await;
    eprintln!("CLEARED: alarm on for {:?}", raised.elapsed());
    assert_eq!(readyz(&daemon).await.0, 200);
    for (who, c) in [
        ("the load's client", &client),
        ("the one-shot client", &one_shot),
    ] {
        wait_until_async(
            Duration::from_secs(30),
            &format!("{who} is answered again"),
            || {
                let c = c.clone();
                async move { c.call("fib", b"10").await.is_ok() }
            },
        )
        .await;
    }

    let report = load.await.expect("bench task");
    eprintln!(
        "LOAD: calls {} ok {} errors {} max {} us, error kinds {:?}",
        report.calls, report.ok, report.errors, report.max_us, report.error_kinds
    );
    assert_eq!(
        report.calls,
        report.ok + report.errors,
        "every call accounted for"
    );
    for kind in report.error_kinds.keys() {
        assert!(
            ALARM_OUTCOMES.contains(&kind.as_str()),
            "{kind}: {report:?}"
        );
    }
    assert!(
        report.max_us <= (CALL_TIMEOUT + Duration::from_millis(500)).as_micros() as u64,
        "no call outlived its deadline: {report:?}"
    );
    assert_eq!(client.pending_calls(), 0);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn memory_alarm_under_load() {
    // Longer than /healthz's 10 s window: an alarm must not get the daemon restarted.
    under_load(Alarm::Memory, Duration::from_secs(11)).await;
}

#[tokio::test]
async fn disk_alarm_under_load() {
    under_load(Alarm::Disk, Duration::ZERO).await;
}
