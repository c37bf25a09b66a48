//! Floods (issue 16): a backlog queued while no daemon runs, a thousand callers on one client
//! connection, and hundreds of client connections at once. Every call is accounted for, and
//! the memory it takes is measured. Built as `target/release/examples/flood`:
//!
//! ```sh
//! cargo build --release --bins --examples
//! target/release/examples/flood backlog --requests 200000 --live-every 20
//! target/release/examples/flood callers --callers 1000 --duration 10s
//! target/release/examples/flood connections --connections 200 --duration 10s
//! target/release/examples/flood pending --calls 100000
//! ```
//!
//! - `backlog`: publishes `--requests` requests to a fresh queue with no consumer, most with
//!   a deadline a minute past and no `expiration` (a caller that sends deadlines but no TTL,
//!   so the broker keeps them), every `--live-every`th with a deadline two minutes ahead.
//!   Then starts `amqp-rpcd` (shipped defaults) on the queue, samples its RSS every 50 ms, and
//!   reports how fast it dropped the expired ones (`amqp_rpc_expired_total`), its peak RSS,
//!   and whether every live request was answered before its deadline and no expired one was.
//! - `callers`: one `Client`, `--callers` tasks each calling fib(10) in a closed loop through
//!   it, against a daemon it starts.
//! - `connections`: `--connections` clients, each with its own connection and 2 callers.
//! - `pending`: the client's memory per pending call: `--calls` calls left waiting on a queue
//!   whose consumer never answers, RSS before and while they wait.

#[path = "../src/bin/amqp-rpc/bench.rs"]
#[allow(dead_code)]
mod bench;

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqp_rpc::protocol::{now_epoch_ms, DEADLINE_HEADER, DIRECT_REPLY_TO};
use amqp_rpc::{CallOptions, Client};
use bench::{Amount, BenchReport, BenchSpec};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

#[derive(Parser)]
struct Cli {
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    url: String,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    Backlog {
        #[arg(long, default_value_t = 200_000)]
        requests: u64,
        #[arg(long, default_value_t = 20)]
        live_every: u64,
    },
    Callers {
        #[arg(long, default_value_t = 1000)]
        callers: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    Connections {
        #[arg(long, default_value_t = 200)]
        connections: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    Pending {
        #[arg(long, default_value_t = 100_000)]
        calls: usize,
    },
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `amqp-rpcd` with the shipped defaults on `queue`; its HTTP port.
struct Daemon {
    child: std::process::Child,
    http: String,
}

impl Daemon {
    fn start(url: &str, queue: &str) -> Daemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let http = format!("127.0.0.1:{port}");
        let rpcd = std::env::current_exe()
            .expect("own path")
            .parent()
            .and_then(|p| p.parent())
            .expect("target/release")
            .join("amqp-rpcd");
        let child = std::process::Command::new(rpcd)
            .env("AMQP_RPC__AMQP__URL", url)
            .env("AMQP_RPC__SERVICE__QUEUE", queue)
            .env("AMQP_RPC__HTTP__LISTEN", &http)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("amqp-rpcd starts (cargo build --release --bins)");
        Daemon { child, http }
    }

    async fn metric(&self, name: &str) -> f64 {
        let out = tokio::process::Command::new("curl")
            .args(["-s", &format!("http://{}/metrics", self.http)])
            .output()
            .await;
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        text.unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn ready(&self) {
        for _ in 0..200 {
            let out = tokio::process::Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("http://{}/readyz", self.http))
                .output()
                .await;
            if out.is_ok_and(|o| o.stdout == b"200") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("amqp-rpcd not ready in 10 s");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn queue_name(what: &str) -> String {
    format!("flood_{what}_{}", std::process::id())
}

async fn backlog(url: &str, requests: u64, live_every: u64) {
    let queue = queue_name("backlog");
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut replies = ch
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let now = now_epoch_ms();
    let (past, ahead) = (now - 60_000, now + 120_000);
    let t0 = Instant::now();
    let mut live = 0u64;
    for i in 0..requests {
        let is_live = i % live_every == live_every - 1;
        live += u64::from(is_live);
        let mut headers = FieldTable::default();
        let deadline = if is_live { ahead } else { past };
        headers.insert(
            DEADLINE_HEADER.into(),
            AMQPValue::LongString(deadline.to_string().into()),
        );
        let id = format!("{}-{i}", if is_live { "live" } else { "dead" });
        let props = BasicProperties::default()
            .with_reply_to(DIRECT_REPLY_TO.into())
            .with_correlation_id(id.into())
            .with_type("fib".into())
            .with_headers(headers);
        let publish = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                b"10",
                props,
            )
            .await
            .unwrap();
        drop(publish);
    }
    println!(
        "backlog: published {requests} requests ({live} live) in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let daemon = Daemon::start(url, &queue);
    let started = Instant::now();
    let pid = daemon.child.id();
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let mut answered = HashSet::new();
    let mut late_or_dead = 0u64;
    let mut errors = 0u64;
    let deadline = Instant::now() + Duration::from_secs(110);
    while (answered.len() as u64) < live && Instant::now() < deadline {
        let Ok(Some(Ok(reply))) =
            tokio::time::timeout(Duration::from_secs(5), replies.next()).await
        else {
            continue;
        };
        let id = reply
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        if reply
            .properties
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key("x-error-code"))
        {
            errors += 1;
        }
        if !id.starts_with("live-") || now_epoch_ms() > ahead {
            late_or_dead += 1;
        }
        answered.insert(id);
    }
    let all_live = started.elapsed();
    // The expired ones are dropped as they come, in queue order with the live ones.
    let expired = loop {
        let expired = daemon.metric("amqp_rpc_expired_total").await as u64;
        if expired + live >= requests || started.elapsed() > Duration::from_secs(120) {
            break expired;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let drained = started.elapsed();
    sampler.abort();
    println!(
        "backlog: amqp-rpcd answered {} of {live} live requests in {:.2} s ({errors} error \
         replies, {late_or_dead} replies late or to expired requests) and dropped {expired} \
         expired ones without work: all {requests} handled {:.2} s after it started, {:.0} \
         requests/s; peak RSS {:.1} MiB",
        answered.len(),
        all_live.as_secs_f64(),
        drained.as_secs_f64(),
        (expired + answered.len() as u64) as f64 / drained.as_secs_f64(),
        peak.load(Ordering::Relaxed) as f64 / 1024.0,
    );
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
}

fn spec(concurrency: usize, duration: Duration) -> BenchSpec {
    BenchSpec {
        concurrency,
        amount: Amount::Duration(duration),
        warmup: Duration::ZERO,
        method: "fib".into(),
        arg: "10".into(),
        options: CallOptions {
            timeout: Duration::from_secs(10),
            idempotent: false,
        },
        progress: false,
    }
}

fn accounted(what: &str, r: &BenchReport) {
    println!(
        "{what}: {} calls, {} ok, {} errors {:?}, {:.0} calls/s, p50 {} us, p99 {} us, max {} us; accounted: {}",
        r.calls,
        r.ok,
        r.errors,
        r.error_kinds,
        r.calls_per_sec,
        r.p50_us,
        r.p99_us,
        r.max_us,
        r.calls == r.ok + r.errors
    );
}

async fn client(url: &str, queue: &str) -> Client {
    Client::builder(url)
        .queue(queue)
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("client connects")
}

async fn callers(url: &str, callers: usize, duration: Duration) {
    let queue = queue_name("callers");
    let daemon = Daemon::start(url, &queue);
    daemon.ready().await;
    let c = client(url, &queue).await;
    let before = rss_kib(std::process::id());
    let report = bench::run(c.clone(), spec(callers, duration)).await;
    accounted(&format!("callers: {callers} on one connection"), &report);
    println!(
        "callers: client RSS {:.1} -> {:.1} MiB, pending after: {}",
        before as f64 / 1024.0,
        rss_kib(std::process::id()) as f64 / 1024.0,
        c.pending_calls()
    );
    drop(daemon);
}

async fn connections(url: &str, n: usize, duration: Duration) {
    let queue = queue_name("connections");
    let daemon = Daemon::start(url, &queue);
    daemon.ready().await;
    let before = rss_kib(std::process::id());
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(client(url, &queue).await);
    }
    let connected = rss_kib(std::process::id());
    let runs: Vec<_> = clients
        .iter()
        .map(|c| tokio::spawn(bench::run(c.clone(), spec(2, duration))))
        .collect();
    let (mut calls, mut ok, mut errors, mut all) = (0, 0, 0, true);
    for run in runs {
        let r = run.await.expect("bench task");
        (calls, ok, errors) = (calls + r.calls, ok + r.ok, errors + r.errors);
        all &= r.calls == r.ok + r.errors;
    }
    println!(
        "connections: {n} clients x 2 callers: {calls} calls, {ok} ok, {errors} errors; accounted: {all}; RSS {:.1} MiB before, {:.1} MiB with {n} connections ({:.0} KiB each)",
        before as f64 / 1024.0,
        connected as f64 / 1024.0,
        (connected.saturating_sub(before)) as f64 / n as f64
    );
    drop(daemon);
}

async fn pending(url: &str, calls: usize) {
    let queue = queue_name("pending");
    // A consumer that takes nothing (prefetch 1, never acks), so the probe finds the queue
    // served and every call waits.
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_qos(1, Default::default()).await.unwrap();
    let _stalled = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let c = client(url, &queue).await;
    let future_bytes = std::mem::size_of_val(&c.call_timeout("fib", b"10", Duration::from_secs(1)));
    let before = rss_kib(std::process::id());
    let tasks: Vec<_> = (0..calls)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.call_timeout("fib", b"10", Duration::from_secs(60)).await })
        })
        .collect();
    while c.pending_calls() < calls {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waiting = rss_kib(std::process::id());
    println!(
        "pending: {calls} calls waiting: client RSS {:.1} -> {:.1} MiB, {:.0} bytes per pending call (its task, a call future of {future_bytes} bytes, its pending entry and request)",
        before as f64 / 1024.0,
        waiting as f64 / 1024.0,
        (waiting.saturating_sub(before)) as f64 * 1024.0 / calls as f64
    );
    for t in tasks {
        t.abort();
    }
    let _ = ch
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match cli.what {
        What::Backlog {
            requests,
            live_every,
        } => backlog(&cli.url, requests, live_every).await,
        What::Callers {
            callers: n,
            duration,
        } => callers(&cli.url, n, duration).await,
        What::Connections {
            connections: n,
            duration,
        } => connections(&cli.url, n, duration).await,
        What::Pending { calls } => pending(&cli.url, calls).await,
    }
}
