//! Broker restarts under load, on a private RabbitMQ node (never the shared one): `stop_app` then
//! `start_app`, and SIGKILL of the node's VM then a restart on the same ports and data. The
//! daemon's readiness drops and comes back within 10 s, the closed-loop load rides through, and
//! every call's outcome is counted: each one ends in a value or in one of the contract's errors,
//! and none outlives its deadline.

mod common;

use std::time::{Duration, Instant};

use amqp_rpc::config::AmqpConfig;
use amqp_rpc::{CallOptions, Client};
use common::bench::{self, Amount, BenchReport, BenchSpec};
use common::broker::PrivateBroker;
use common::*;

const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How a call may end while the broker is away: in flight when it went (`connection_lost`),
/// made while it was unreachable (`unavailable`, or `timeout` waiting for it), or made after it
/// came back but before the daemon redeclared its non-durable queue (`no_server`).
const FAULT_OUTCOMES: [&str; 4] = ["timeout", "connection_lost", "unavailable", "no_server"];

/// Readiness must be back this soon after the broker is.
const RECOVERY_LIMIT: Duration = Duration::from_secs(10);

enum Fault {
    StopApp,
    Kill9,
}

/// Reconnect backoff capped at 1 s (default 30 s), so "back within 10 s" measures recovery,
/// not where the jittered backoff happened to be when the broker returned.
fn amqp(broker: &PrivateBroker) -> AmqpConfig {
    AmqpConfig {
        url: broker.url(),
        reconnect_max_backoff_secs: 1,
        ..AmqpConfig::default()
    }
}

async fn ride_out(fault: Fault, load_for: Duration) {
    let mut broker = PrivateBroker::start().await;
    eprintln!("{} booted in {:?}", broker.node(), broker.boot_time);
    let queue = unique_queue("broker");
    let mut config = test_config(&queue);
    config.amqp = amqp(&broker);
    let (daemon, mut ready) = TestDaemon::spawn(config, None).await;
    readiness_becomes(
        &mut ready,
        true,
        Duration::from_secs(20),
        "daemon ready on the private broker",
    )
    .await;
    let client = Client::builder(broker.url())
        .queue(queue.as_str())
        .timeout(CALL_TIMEOUT)
        .amqp(amqp(&broker))
        .connect()
        .await
        .expect("client connects");
    let spec = BenchSpec {
        concurrency: 16,
        amount: Amount::Duration(load_for),
        warmup: Duration::ZERO,
        method: "fib".into(),
        arg: "10".into(),
        options: CallOptions {
            timeout: CALL_TIMEOUT,
            idempotent: false,
        },
        progress: false,
    };
    let load_started = Instant::now();
    let load = tokio::spawn(bench::run(client.clone(), spec));
    let answered = || daemon.requests("fib", "ok");
    wait_until(Duration::from_secs(10), "load under way", || {
        answered() >= 200
    })
    .await;

    let t0 = Instant::now();
    match fault {
        Fault::StopApp => broker.stop_app().await,
        Fault::Kill9 => broker.kill9(),
    }
    readiness_becomes(
        &mut ready,
        false,
        Duration::from_secs(10),
        "readiness drops with the broker",
    )
    .await;
    eprintln!("readiness dropped {:?} after the fault", t0.elapsed());
    match fault {
        Fault::StopApp => broker.start_app().await,
        Fault::Kill9 => broker.restart().await,
    }
    eprintln!("broker back after {:?}", broker.boot_time);
    let back = Instant::now();
    readiness_becomes(
        &mut ready,
        true,
        RECOVERY_LIMIT,
        "ready again within 10 s of the broker's return",
    )
    .await;
    let recovery = back.elapsed();
    eprintln!("RECOVERY: daemon ready {recovery:?} after the broker returned");

    // The load continues: the daemon answers more of it after recovery.
    let at_recovery = answered();
    let what = "the load continues after recovery";
    wait_until(load_for, what, || answered() >= at_recovery + 200).await;
    let report = load.await.expect("bench task");
    let load_took = load_started.elapsed();
    eprintln!(
        "LOAD: {load_took:?}, calls {} ok {} errors {} max {} us, error kinds {:?}",
        report.calls, report.ok, report.errors, report.max_us, report.error_kinds
    );
    assert_outcomes(&report);
    // No call outlives its deadline: the run ends within its duration plus one call timeout
    // (slack for scheduling), and the slowest call within the timeout (same slack).
    assert!(
        load_took < load_for + CALL_TIMEOUT + Duration::from_secs(3),
        "bench took {load_took:?}"
    );
    assert!(
        Duration::from_micros(report.max_us) < CALL_TIMEOUT + Duration::from_secs(1),
        "slowest call {} us",
        report.max_us
    );

    // A plain (non-retried) call after recovery gets the right value.
    let options = CallOptions {
        timeout: CALL_TIMEOUT,
        idempotent: false,
    };
    let reply = client.call_with("fib", b"20", options).await;
    assert_eq!(reply.expect("call after recovery"), b"6765");
    daemon.stop().await.unwrap();
}

fn assert_outcomes(report: &BenchReport) {
    assert_eq!(
        report.ok + report.errors,
        report.calls,
        "every call accounted for: {report:?}"
    );
    assert!(report.ok > 0, "the load made progress: {report:?}");
    for kind in report.error_kinds.keys() {
        assert!(
            FAULT_OUTCOMES.contains(&kind.as_str()),
            "{kind} is not an outcome of a broker restart: {:?}",
            report.error_kinds
        );
    }
}

#[tokio::test]
async fn daemon_and_client_ride_out_stop_app_start_app() {
    ride_out(Fault::StopApp, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn daemon_and_client_ride_out_kill9_and_restart() {
    // Longer load: the node's reboot alone takes about 5 s of it.
    ride_out(Fault::Kill9, Duration::from_secs(15)).await;
}
