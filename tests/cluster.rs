//! Failover on a private three-node RabbitMQ cluster (never the shared broker), with the service
//! queue a quorum queue replicated on all three nodes, under a closed-loop load of idempotent
//! calls (16 in flight, 8 s timeouts) from a client given every node's URL:
//!
//! - kill -9 of the node leading the queue: no call fails and the daemons stay up;
//! - a node stopped and started again: the load goes on and the node rejoins the cluster;
//! - daemons spread over the nodes, one stopped and one added: no call fails, all got work.
//!
//! Each test prints what the README reports (recovery time, slowest call, calls/s around the
//! fault, the daemons' reconnects and redeliveries) on lines starting with `FAILOVER:`,
//! `REJOIN:`, `DAEMONS:` and `LOAD:` (`--no-capture` shows them; `RUST_LOG` adds the logs).

mod common;

use std::time::{Duration, Instant};

use amqp_rpc::config::QueueType;
use amqp_rpc::Client;
use common::broker::CTL;
use common::cluster::*;
use common::*;

/// With `RUST_LOG` set, the daemons' and clients' logs go to stderr (with timestamps, to line
/// them up with the figures printed here).
fn logs_if_asked() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// A daemon serving `queue` as a quorum queue through `urls`, with every readiness change it
/// goes through timestamped.
async fn daemon(queue: &str, urls: String) -> (TestDaemon, ReadinessLog) {
    let mut config = test_config(queue);
    config.amqp = amqp_config(urls);
    config.service.queue_type = QueueType::Quorum;
    let (daemon, mut ready) = TestDaemon::spawn(config, None).await;
    let what = "daemon ready on the cluster";
    readiness_becomes(&mut ready, true, Duration::from_secs(30), what).await;
    (daemon, ReadinessLog::follow(ready))
}

/// Calls answered `ok` by these daemons so far.
fn answered(daemons: &[&TestDaemon]) -> u64 {
    daemons.iter().map(|d| d.requests("fib", "ok")).sum()
}

/// Wait until the daemons have answered `n` more calls than `from`.
async fn more_answers(daemons: &[&TestDaemon], from: u64, n: u64, what: &str) -> (Instant, u64) {
    wait_until(Duration::from_secs(20), what, || {
        answered(daemons) >= from + n
    })
    .await;
    (Instant::now(), answered(daemons))
}

fn rate(from: (Instant, u64), to: (Instant, u64)) -> f64 {
    (to.1 - from.1) as f64 / to.0.duration_since(from.0).as_secs_f64()
}

/// The daemons' view of the fault: reconnects, requests the queue gave them again (their
/// consumer or connection died before the ack), retried calls answered from the reply cache,
/// and replies that could not be published.
fn redone(daemons: &[&TestDaemon]) -> String {
    let sum = |f: fn(&TestDaemon) -> u64| daemons.iter().map(|d| f(d)).sum::<u64>();
    format!(
        "daemon reconnects {}, redeliveries {}, replays of retried calls {}, reply publish \
         failures {}",
        sum(|d| d.metrics.reconnects.get()),
        sum(|d| d.metrics.redeliveries.get()),
        sum(|d| d.metrics.replays.get()),
        sum(|d| d.metrics.reply_publish_failures.get()),
    )
}

fn sorted(names: &[String]) -> Vec<String> {
    let mut names = names.to_vec();
    names.sort();
    names
}

/// Leaves the daemon running (its task has not ended), ready, and stops it cleanly.
async fn still_up_then_stop(daemon: TestDaemon, log: &ReadinessLog) {
    assert!(!daemon.task.is_finished(), "the daemon is still running");
    assert!(log.is_ready(), "the daemon is consuming");
    daemon.stop().await.expect("the daemon stops cleanly");
}

/// The acceptance scenario: two daemons and a client, all given the three URLs (so all start on
/// node 0, which therefore declares the queue and leads it), under load; the leader is
/// SIGKILLed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_quorum_leader_under_load_fails_no_call() {
    logs_if_asked();
    let mut cluster = PrivateCluster::start().await;
    let all = cluster.names();
    let queue = unique_queue("cluster-leader");
    let (d1, log1) = daemon(&queue, cluster.urls()).await;
    let (d2, log2) = daemon(&queue, cluster.urls()).await;
    let daemons = [&d1, &d2];
    let q = cluster
        .wait_queue(1, &queue, &all, Duration::from_secs(20))
        .await;
    assert_eq!(q.kind, "quorum");
    assert_eq!(q.members, sorted(&all), "one replica on every node");
    let leader = cluster.index_of(&q.leader).expect("a node of ours leads");
    assert_eq!(
        leader, 0,
        "declared through node 0, so led from there: {q:?}"
    );
    let load = Load::start(cluster.urls(), &queue).await;
    let (t_a, a) = more_answers(&daemons, 0, 300, "load under way").await;
    let connections = cluster
        .node(leader)
        .cli(CTL, &["list_connections", "name", "--formatter", "json"])
        .await
        .expect("list_connections");
    let connections = serde_json::from_str::<serde_json::Value>(&connections).unwrap();
    let connections = connections.as_array().map_or(0, Vec::len);
    assert_eq!(
        connections, 3,
        "both daemons and the client are on the leader"
    );
    let before = more_answers(&daemons, a, 1500, "load before the fault").await;

    cluster.node_mut(leader).kill9();
    let killed = Instant::now();
    let recovery = all_back_after(&[log1.clone(), log2.clone()], killed).await;
    let back = (Instant::now(), answered(&daemons));
    let survivor = (leader + 1) % 3;
    let left: Vec<_> = all.iter().filter(|n| **n != all[leader]).cloned().collect();
    let q = cluster
        .wait_queue(survivor, &queue, &left, Duration::from_secs(10))
        .await;
    eprintln!(
        "FAILOVER: leader {} killed; daemons consuming again {recovery:?} later; new leader {}",
        all[leader], q.leader
    );
    let per_daemon_at_back = [d1.requests_sum(), d2.requests_sum()];
    let after = more_answers(&daemons, back.1, 1500, "the load continues").await;
    let report = load.finish().await;
    eprintln!(
        "FAILOVER: calls/s {:.0} before the kill, {:.0} after recovery; slowest call {} ms; {}",
        rate((t_a, a), before),
        rate(back, after),
        report.max_us / 1000,
        redone(&daemons),
    );
    eprintln!(
        "FAILOVER: {}",
        settling(&[log1.clone(), log2.clone()], killed)
    );
    // One reconnect each (both were on the killed node), not a storm: replies to the dead
    // node's clients go through the wary link (src/server/reply_link.rs), which RabbitMQ 3.10
    // closes instead of the consumer's connection.
    let reconnects: u64 = daemons.iter().map(|d| d.metrics.reconnects.get()).sum();
    assert!(
        reconnects <= 2,
        "{reconnects} daemon reconnects for one failed node"
    );
    assert!(
        d1.requests_sum() > per_daemon_at_back[0],
        "daemon 1 serves after failover"
    );
    assert!(
        d2.requests_sum() > per_daemon_at_back[1],
        "daemon 2 serves after failover"
    );
    cluster
        .wait_running(survivor, &left, Duration::from_secs(10))
        .await;
    still_up_then_stop(d1, &log1).await;
    still_up_then_stop(d2, &log2).await;
}

/// A node stopped (`stop_app` closes every connection on it; all of them are on node 0) and
/// started again under load: daemons and client move to the other nodes, no call fails, and
/// the node rejoins the cluster with its replica of the queue back online, serving again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_and_started_rejoins_under_load() {
    logs_if_asked();
    let mut cluster = PrivateCluster::start().await;
    let all = cluster.names();
    let queue = unique_queue("cluster-rejoin");
    let (d1, log1) = daemon(&queue, cluster.urls()).await;
    let (d2, log2) = daemon(&queue, cluster.urls()).await;
    let daemons = [&d1, &d2];
    cluster
        .wait_queue(1, &queue, &all, Duration::from_secs(20))
        .await;
    let load = Load::start(cluster.urls(), &queue).await;
    more_answers(&daemons, 0, 500, "load under way").await;

    let stopped = Instant::now();
    let step = |what: &str| eprintln!("REJOIN: +{:?} {what}", stopped.elapsed());
    cluster.node(0).stop_app().await;
    step("stop_app done");
    let left = all[1..].to_vec();
    cluster
        .wait_running(1, &left, Duration::from_secs(20))
        .await;
    step("node 0 left the running nodes");
    let recovery = all_back_after(&[log1.clone(), log2.clone()], stopped).await;
    step("daemons consuming");
    cluster.node_mut(0).start_app().await;
    step("start_app done");
    let limit = Duration::from_secs(30);
    let views = (0..all.len()).map(|via| cluster.wait_running(via, &all, limit));
    futures_util::future::join_all(views).await;
    step("all running, seen from each node");
    // The rejoined node's replica catches up and is a member again.
    cluster
        .wait_queue(1, &queue, &all, Duration::from_secs(30))
        .await;
    step("replica online");
    eprintln!(
        "REJOIN: node 0 stopped; daemons consuming again {recovery:?} later; app started in \
         {:?}; rejoined (running, replica online) {:?} after the stop",
        cluster.node(0).boot_time,
        stopped.elapsed()
    );
    let now = answered(&daemons);
    more_answers(&daemons, now, 500, "the load continues after the rejoin").await;

    // The rejoined node serves the queue again: a call through it alone.
    let via_rejoined = Client::builder(cluster.node(0).url())
        .queue(queue.as_str())
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .expect("client connects to the rejoined node");
    let reply = via_rejoined.call_with("fib", b"20", IDEMPOTENT).await;
    assert_eq!(reply.expect("a call through the rejoined node"), b"6765");
    let report = load.finish().await;
    eprintln!(
        "REJOIN: slowest call {} ms; {}; {}",
        report.max_us / 1000,
        settling(&[log1.clone(), log2.clone()], stopped),
        redone(&daemons)
    );
    still_up_then_stop(d1, &log1).await;
    still_up_then_stop(d2, &log2).await;
}

/// Three daemons spread over the nodes (each given the three URLs starting at its own node)
/// under load; one is stopped (its drain gives back what it had not started) and one added:
/// no call fails, and every daemon got work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_stopped_and_added_under_load_fail_no_call() {
    logs_if_asked();
    let cluster = PrivateCluster::start().await;
    let all = cluster.names();
    let queue = unique_queue("cluster-daemons");
    let (a, log_a) = daemon(&queue, cluster.urls_from(0)).await;
    let (b, log_b) = daemon(&queue, cluster.urls_from(1)).await;
    let (c, log_c) = daemon(&queue, cluster.urls_from(2)).await;
    cluster
        .wait_queue(1, &queue, &all, Duration::from_secs(20))
        .await;
    let load = Load::start(cluster.urls_from(1), &queue).await;
    let serve = |d: &TestDaemon| d.requests("fib", "ok");
    wait_until(Duration::from_secs(20), "all three daemons serve", || {
        [&a, &b, &c].iter().all(|d| serve(d) >= 100)
    })
    .await;

    let by_a = serve(&a);
    still_up_then_stop(a, &log_a).await;
    let now = answered(&[&b, &c]);
    more_answers(&[&b, &c], now, 500, "the other two carry the load").await;
    let (d, log_d) = daemon(&queue, cluster.urls_from(0)).await;
    wait_until(Duration::from_secs(20), "the added daemon serves", || {
        serve(&d) >= 100
    })
    .await;
    let report = load.finish().await;
    eprintln!(
        "DAEMONS: answered by the stopped one {by_a}, the two staying {} and {}, the added one \
         {}; slowest call {} ms; {}",
        serve(&b),
        serve(&c),
        serve(&d),
        report.max_us / 1000,
        redone(&[&b, &c, &d])
    );
    for (daemon, log) in [(b, log_b), (c, log_c), (d, log_d)] {
        still_up_then_stop(daemon, &log).await;
    }
}
