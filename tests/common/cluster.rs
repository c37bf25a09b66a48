//! A private three-node RabbitMQ cluster on this machine, for failover tests: quorum queue
//! leaders killed, nodes stopped and rejoining. Never the shared node on 5672.
//!
//! The nodes are [`PrivateBroker`]s (own ports and data dirs, the shared cookie), booted at once
//! and then joined to the first one with `rabbitmqctl join_cluster`, which is how an operator
//! builds a cluster by hand. With `AMQP_RPC_TEST_RABBITMQ_ROOT` set they all boot in that
//! folder's RabbitMQ (4.3) and the CLI is the folder's: see [`super::broker`]. What the cluster thinks of itself (running nodes, a queue's leader
//! and online members) is read through the CLI's JSON output, from a node the test names, so a
//! test can ask a survivor while another node is down.
//!
//! Below the cluster: what a failover test watches. [`Load`] is the acceptance's bench (16
//! idempotent calls in flight, 8 s timeouts) run until the test has seen what it waits for, and
//! [`ReadinessLog`] timestamps every readiness change of a daemon, so recovery is measured
//! from the fault to the moment the daemons consume again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::bench::{self, Amount, BenchReport, BenchSpec};
use amqp_rpc::config::AmqpConfig;
use amqp_rpc::{CallOptions, Client};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::broker::{PrivateBroker, CTL};
use super::{wait_until, wait_until_async};

/// What `list_queues` says about one queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueInfo {
    /// `quorum` or `classic`.
    pub kind: String,
    /// The quorum queue's Raft leader (empty while none is elected).
    pub leader: String,
    /// Nodes holding a replica.
    pub members: Vec<String>,
    /// Members whose replica runs now.
    pub online: Vec<String>,
}

/// One cluster at a time per test process. nextest runs each test in its own process (and the
/// `cluster` test group one at a time), but `cargo test` runs a binary's tests as threads: three
/// clusters booting at once would starve a small machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Three clustered nodes; dropped, every node's VM is killed and its directory removed.
pub struct PrivateCluster {
    nodes: Vec<PrivateBroker>,
    _turn: tokio::sync::MutexGuard<'static, ()>,
    /// From the first boot until every node runs in one cluster.
    pub form_time: Duration,
}

impl PrivateCluster {
    /// Boot three nodes and cluster them; returns once each one sees all three running.
    pub async fn start() -> PrivateCluster {
        let turn = ONE_AT_A_TIME.lock().await;
        let t0 = Instant::now();
        let mut nodes = PrivateBroker::start_many(3).await;
        let booted = t0.elapsed();
        let (seed, rest) = nodes.split_first_mut().expect("three nodes");
        let seed = seed.node().to_owned();
        // One join at a time: two at once sometimes fail (mnesia does not start on one of them).
        for node in rest {
            node.join(&seed).await;
        }
        let mut cluster = PrivateCluster {
            nodes,
            _turn: turn,
            form_time: Duration::ZERO,
        };
        let all = cluster.names();
        for via in 0..cluster.nodes.len() {
            cluster
                .wait_running(via, &all, Duration::from_secs(30))
                .await;
        }
        cluster.form_time = t0.elapsed();
        eprintln!(
            "CLUSTER: {all:?} booted in {booted:?}, clustered in {:?}",
            cluster.form_time
        );
        cluster
    }

    /// Every node's AMQP URL, comma-separated in node order: the `amqp.url` of a client or
    /// daemon that may use any of them (the connector tries them in this order, first to last).
    pub fn urls(&self) -> String {
        self.urls_from(0)
    }

    /// Like [`urls`](Self::urls), rotated to start at node `first`: spreads connections over
    /// the cluster while keeping every node as a fallback.
    pub fn urls_from(&self, first: usize) -> String {
        let n = self.nodes.len();
        (0..n)
            .map(|i| self.nodes[(first + i) % n].url())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node(&self, i: usize) -> &PrivateBroker {
        &self.nodes[i]
    }

    pub fn node_mut(&mut self, i: usize) -> &mut PrivateBroker {
        &mut self.nodes[i]
    }

    /// The nodes' Erlang names, in node order.
    pub fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.node().to_owned()).collect()
    }

    /// Index of the node called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.node() == name)
    }

    /// `running_nodes` of `cluster_status` as node `via` sees it, sorted; empty if `via` does
    /// not answer.
    pub async fn running_nodes(&self, via: usize) -> Vec<String> {
        let Ok(out) = self.nodes[via]
            .cli(CTL, &["cluster_status", "--formatter", "json"])
            .await
        else {
            return Vec::new();
        };
        let status: Value = serde_json::from_str(&out).unwrap_or_default();
        let mut running = strings(&status["running_nodes"]);
        running.sort();
        running
    }

    /// Wait until node `via` sees exactly `want` running.
    pub async fn wait_running(&self, via: usize, want: &[String], limit: Duration) {
        let mut want = want.to_vec();
        want.sort();
        let what = format!("{} sees {want:?} running", self.nodes[via].node());
        wait_until_async(limit, &what, || async {
            self.running_nodes(via).await == want
        })
        .await;
    }

    /// What node `via` knows of `queue`; `None` if it does not answer or has no such queue.
    pub async fn queue_info(&self, via: usize, queue: &str) -> Option<QueueInfo> {
        let args = [
            "list_queues",
            "name",
            "type",
            "leader",
            "members",
            "online",
            "--formatter",
            "json",
        ];
        let out = self.nodes[via].cli(CTL, &args).await.ok()?;
        let queues: Value = serde_json::from_str(&out).ok()?;
        let q = queues.as_array()?.iter().find(|q| q["name"] == queue)?;
        let mut info = QueueInfo {
            kind: q["type"].as_str().unwrap_or_default().to_owned(),
            leader: q["leader"].as_str().unwrap_or_default().to_owned(),
            members: strings(&q["members"]),
            online: strings(&q["online"]),
        };
        info.members.sort();
        info.online.sort();
        Some(info)
    }

    /// Wait until node `via` reports `queue` with a leader and all of `online` up; returns
    /// what it said then.
    pub async fn wait_queue(
        &self,
        via: usize,
        queue: &str,
        online: &[String],
        limit: Duration,
    ) -> QueueInfo {
        let mut online = online.to_vec();
        online.sort();
        let give_up = Instant::now() + limit;
        loop {
            let seen = self.queue_info(via, queue).await;
            if let Some(q) = seen
                .as_ref()
                .filter(|q| !q.leader.is_empty() && q.online == online)
            {
                return q.clone();
            }
            assert!(
                Instant::now() < give_up,
                "timed out waiting for {queue} led, with {online:?} online; last seen {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A JSON array of strings (the CLI's node lists); anything else reads as empty.
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

// ---- Watching a failover: the load the acceptance runs, and the daemons' readiness ----

/// Calls in flight, as in the acceptance's bench.
pub const CONCURRENCY: usize = 16;
/// Each call's timeout, as in the acceptance's bench.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(8);
/// The bench's calls are idempotent (fib is): retried on connection loss within the deadline.
pub const IDEMPOTENT: CallOptions = CallOptions {
    timeout: CALL_TIMEOUT,
    idempotent: true,
};
/// Daemons must be consuming again this soon after a fault (measured: well under it).
pub const RECOVERY_LIMIT: Duration = Duration::from_secs(30);

/// Reconnect backoff capped at 1 s (default 30 s), so recovery times measure the failover,
/// not where a jittered backoff happened to be.
pub fn amqp_config(urls: String) -> AmqpConfig {
    AmqpConfig {
        url: urls,
        reconnect_max_backoff_secs: 1,
        ..AmqpConfig::default()
    }
}

/// Every readiness change of one daemon after it first became ready.
#[derive(Clone)]
pub struct ReadinessLog {
    ready: watch::Receiver<bool>,
    changes: Arc<Mutex<Vec<(Instant, bool)>>>,
}

impl ReadinessLog {
    pub fn follow(ready: watch::Receiver<bool>) -> Self {
        let changes = Arc::new(Mutex::new(Vec::new()));
        let (mut rx, log) = (ready.clone(), changes.clone());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let now = *rx.borrow_and_update();
                log.lock().unwrap().push((Instant::now(), now));
            }
        });
        ReadinessLog { ready, changes }
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// When readiness was true again after a change following `t`. Readiness was true before,
    /// so any change means it dropped; the watch may fold a quick drop and return into one
    /// notification, which still reads true.
    pub fn back_after(&self, t: Instant) -> Option<Instant> {
        let changes = self.changes.lock().unwrap();
        let first = changes.iter().position(|(at, _)| *at > t)?;
        changes[first..]
            .iter()
            .find(|(_, up)| *up)
            .map(|(at, _)| *at)
    }

    /// Readiness changes after `t`, and when the last one made it true: it may flap while the
    /// cluster settles.
    pub fn settled_after(&self, t: Instant) -> (usize, Option<Instant>) {
        let changes = self.changes.lock().unwrap();
        let after: Vec<_> = changes.iter().filter(|(at, _)| *at > t).collect();
        let last_up = after.iter().rev().find(|(_, up)| *up).map(|(at, _)| *at);
        (after.len(), last_up)
    }
}

/// Wait until every daemon, having lost its connection after `t`, consumes again; returns
/// how long after `t` the last one did.
pub async fn all_back_after(logs: &[ReadinessLog], t: Instant) -> Duration {
    let what = "every daemon reconnected and consuming";
    wait_until(RECOVERY_LIMIT, what, || {
        logs.iter()
            .all(|l| l.is_ready() && l.back_after(t).is_some())
    })
    .await;
    logs.iter()
        .filter_map(|l| l.back_after(t))
        .max()
        .expect("some daemon")
        .duration_since(t)
}

/// How the daemons' readiness went after `t`, for the record: how often it changed, and when
/// the last daemon was consuming for good.
pub fn settling(logs: &[ReadinessLog], t: Instant) -> String {
    let all: Vec<_> = logs.iter().map(|l| l.settled_after(t)).collect();
    let changes: usize = all.iter().map(|(n, _)| n).sum();
    let last = all.iter().filter_map(|(_, at)| *at).max();
    format!(
        "{changes} readiness changes, consuming for good {:?} after the fault",
        last.map(|at| at.duration_since(t))
    )
}

/// The bench as the acceptance runs it: `CONCURRENCY` idempotent calls of fib(10) in flight,
/// from a client given every node's URL, until [`Load::finish`]. It runs as back-to-back bench
/// rounds of `ROUND`, so a test can end it right after its last check however long the
/// cluster took to get there (a round drains its calls before the next starts: a few ms).
pub struct Load {
    client: Client,
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<BenchReport>>,
}

pub const ROUND: Duration = Duration::from_secs(2);

impl Load {
    pub async fn start(urls: String, queue: &str) -> Load {
        let client = Client::builder(urls.clone())
            .queue(queue)
            .timeout(CALL_TIMEOUT)
            .amqp(amqp_config(urls))
            .connect()
            .await
            .expect("client connects");
        let spec = BenchSpec {
            concurrency: CONCURRENCY,
            amount: Amount::Duration(ROUND),
            warmup: Duration::ZERO,
            method: "fib".into(),
            arg: "10".into(),
            options: IDEMPOTENT,
            progress: false,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (client, stop) = (client.clone(), stop.clone());
            async move {
                let mut rounds = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    rounds.push(bench::run(client.clone(), spec.clone()).await);
                }
                rounds
            }
        });
        Load { client, stop, task }
    }

    /// End the load (the current round finishes: every call ends by its deadline) and check
    /// that every call succeeded, within its timeout.
    pub async fn finish(self) -> BenchReport {
        self.stop.store(true, Ordering::Relaxed);
        let limit = ROUND + CALL_TIMEOUT + Duration::from_secs(5);
        let rounds = tokio::time::timeout(limit, self.task)
            .await
            .expect("the last round ends within its length and one call timeout")
            .expect("bench task");
        let mut report = rounds[0].clone();
        for r in &rounds[1..] {
            report.calls += r.calls;
            report.ok += r.ok;
            report.errors += r.errors;
            report.elapsed_secs += r.elapsed_secs;
            report.max_us = report.max_us.max(r.max_us);
            // Percentiles do not add up: keep the worst round's.
            report.p50_us = report.p50_us.max(r.p50_us);
            report.p99_us = report.p99_us.max(r.p99_us);
            for (kind, n) in &r.error_kinds {
                *report.error_kinds.entry(kind.clone()).or_default() += n;
            }
        }
        report.calls_per_sec = report.calls as f64 / report.elapsed_secs;
        eprintln!(
            "LOAD: calls {} ok {} errors {} {:?}, {:.0} calls/s overall over {:.1} s, worst \
             round's p50 {} us p99 {} us, max {} us, client reconnects {}, late replies {}",
            report.calls,
            report.ok,
            report.errors,
            report.error_kinds,
            report.calls_per_sec,
            report.elapsed_secs,
            report.p50_us,
            report.p99_us,
            report.max_us,
            self.client.reconnects(),
            self.client.late_replies(),
        );
        assert!(report.calls > 0, "the load ran: {report:?}");
        assert_eq!(report.errors, 0, "no call failed: {report:?}");
        assert_eq!(report.ok, report.calls, "every call ended in a value");
        assert!(
            Duration::from_micros(report.max_us) < CALL_TIMEOUT,
            "every call ended within its timeout: {report:?}"
        );
        report
    }
}
