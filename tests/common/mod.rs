//! Test support: a real broker at `AMQP_URL`, an in-process daemon per test on its own queue,
//! raw lapin peers for hand-crafted requests, and condition waits (never fixed sleeps).
#![allow(dead_code)] // each test binary uses a different subset

pub mod broker;
pub mod child;
pub mod cluster;
pub mod otlp;
pub mod proxy;
pub mod user_methods;

// What the binaries own, compiled from their own sources: the demo `fib` method (amqp-rpcd's)
// and the load generator (amqp-rpc's). Both use only the library's public API.
#[path = "../../src/bin/amqp-rpc/bench.rs"]
pub mod bench;
#[path = "../../src/bin/amqp-rpcd/fib.rs"]
pub mod fib;

use std::future::Future;
use std::time::Duration;

use amqp_rpc::config::Config;
use amqp_rpc::server::Metrics;
use amqp_rpc::service::{Method, Methods, Work};
use amqp_rpc::{Client, Daemon, ErrorCode};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use prometheus::core::Collector;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The broker under test.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A queue name no other test uses.
pub fn unique_queue(prefix: &str) -> String {
    format!(
        "test-{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Wait until `cond` holds, checking every 10 ms; panics after `limit` with `what`.
pub async fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let give_up = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < give_up,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait until the daemon's readiness is `want`; panics after `limit` with `what`.
pub async fn readiness_becomes(
    ready: &mut watch::Receiver<bool>,
    want: bool,
    limit: Duration,
    what: &str,
) {
    tokio::time::timeout(limit, ready.wait_for(|r| *r == want))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
        .expect("daemon alive");
}

/// Like [`wait_until`] with an async condition.
pub async fn wait_until_async<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let give_up = tokio::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < give_up,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A config for one test: its own queue, metrics on a free port, quick shutdown.
pub fn test_config(queue: &str) -> Config {
    let mut config = Config::default();
    config.amqp.url = amqp_url();
    config.service.queue = queue.to_owned();
    config.http.listen = "127.0.0.1:0".into();
    config.shutdown.grace_secs = 5;
    config
}

/// A daemon running in-process through the library's `Daemon::run`.
pub struct TestDaemon {
    pub queue: String,
    pub metrics: Metrics,
    pub http: std::net::SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), amqp_rpc::Error>>,
}

impl TestDaemon {
    /// Start with the standard methods on `config`, waiting until it consumes.
    pub async fn start(config: Config) -> Self {
        Self::start_with(config, None).await
    }

    /// Start with extra methods; the demo `fib` (`max_n` 100000) is always included, and is
    /// the default method unless `methods` names one, as in `amqp-rpcd`.
    pub async fn start_with(config: Config, methods: Option<Methods>) -> Self {
        let (daemon, mut ready) = Self::spawn(config, methods).await;
        readiness_becomes(&mut ready, true, Duration::from_secs(20), "daemon ready").await;
        daemon
    }

    /// Start without waiting for readiness; the receiver follows it.
    pub async fn spawn(config: Config, methods: Option<Methods>) -> (Self, watch::Receiver<bool>) {
        let queue = config.service.queue.clone();
        let mut methods = methods
            .unwrap_or_default()
            .with(fib::Fib::new(fib::DEFAULT_MAX_N));
        if methods.default_name().is_none() {
            methods = methods.default_method("fib");
        }
        let daemon = Daemon::start(config, prometheus::Registry::new())
            .await
            .expect("daemon starts")
            .with_methods(methods)
            .expect("methods fit the config");
        let metrics = daemon.metrics().clone();
        let http = daemon.http_addr().expect("http enabled");
        let ready = daemon.readiness();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(daemon.run(shutdown.clone()));
        (
            TestDaemon {
                queue,
                metrics,
                http,
                shutdown,
                task,
            },
            ready,
        )
    }

    /// Shut down and return run()'s result.
    pub async fn stop(self) -> Result<(), amqp_rpc::Error> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("daemon stops within 30s")
            .expect("daemon task not panicked")
    }

    /// Count of `amqp_rpc_requests_total{method,outcome}`.
    pub fn requests(&self, method: &str, outcome: &str) -> u64 {
        self.metrics.request(method, outcome).get()
    }

    /// Wait until `amqp_rpc_requests_total{method,outcome}` reaches `n` (the daemon counts a
    /// request after its reply is confirmed, so the caller may see the reply first), then
    /// check it is exactly `n`.
    pub async fn expect_requests(&self, method: &str, outcome: &str, n: u64) {
        let what = format!("{method}/{outcome} reaches {n}");
        wait_until(Duration::from_secs(10), &what, || {
            self.requests(method, outcome) >= n
        })
        .await;
        assert_eq!(self.requests(method, outcome), n, "{method}/{outcome}");
    }

    /// Sum of `amqp_rpc_requests_total` over every method and outcome.
    pub fn requests_sum(&self) -> u64 {
        self.metrics
            .requests
            .collect()
            .iter()
            .flat_map(|mf| mf.get_metric())
            .map(|m| m.get_counter().value() as u64)
            .sum()
    }
}

/// `fib(n)` through `client`, as a number: what `Client::fib` was before the demo left the
/// library (an idempotent call, retried within the deadline).
pub async fn fib(client: &Client, n: u64) -> Result<num_bigint::BigUint, amqp_rpc::CallError> {
    let body = client
        .call_idempotent("fib", n.to_string().as_bytes())
        .await?;
    std::str::from_utf8(&body)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| amqp_rpc::CallError::Remote {
            code: ErrorCode::Internal,
            message: format!("not a number: {:?}", String::from_utf8_lossy(&body)),
        })
}

/// `n` calls of `fib` in flight at once on `client` (arguments cycling below 90, so all are
/// answered inline); how many succeeded.
pub async fn fib_burst(client: &Client, n: u64) -> usize {
    let calls = (0..n).map(|i| {
        let client = client.clone();
        async move { client.call("fib", (i % 90).to_string().as_bytes()).await }
    });
    let results = futures_util::future::join_all(calls).await;
    results.iter().filter(|r| r.is_ok()).count()
}

/// A client of `queue` on the test broker.
pub async fn client(queue: &str, timeout: Duration) -> Client {
    Client::builder(amqp_url())
        .queue(queue)
        .timeout(timeout)
        .connect()
        .await
        .expect("client connects")
}

/// A plain lapin connection for raw peers.
pub async fn raw_connection() -> Connection {
    Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("raw connection")
}

/// Declare `queue` (classic, durable, no arguments) on a fresh connection.
pub async fn declare_queue(queue: &str) -> (Connection, Channel) {
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    // Durable: RabbitMQ 4.3 deprecates non-durable, non-exclusive queues (and upstream's
    // default configuration refuses them).
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    (conn, ch)
}

/// A server that takes requests and never answers (`prefetch` bounds how many it holds);
/// returns its connection and the consumer of what it took.
pub async fn stalled_server(queue: &str, prefetch: Option<u16>) -> (Connection, Channel, Consumer) {
    let (conn, ch) = declare_queue(queue).await;
    if let Some(n) = prefetch {
        ch.basic_qos(n, Default::default()).await.unwrap();
    }
    let consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (conn, ch, consumer)
}

/// Ready messages in `queue` (passive declare on a fresh connection).
pub async fn queue_message_count(queue: &str) -> u32 {
    let conn = raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
        .expect("queue exists");
    let _ = conn.close(200, "bye".into()).await;
    q.message_count()
}

/// Delete a queue (cleanup; ignores errors).
pub async fn delete_queue(name: &str) {
    let conn = raw_connection().await;
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// A raw requester: publishes hand-made requests and reads replies from its own exclusive queue.
pub struct RawRequester {
    pub conn: Connection,
    pub channel: Channel,
    pub reply_queue: String,
    pub replies: Consumer,
}

/// One reply as seen on the wire.
#[derive(Debug)]
pub struct RawReply {
    pub correlation_id: Option<String>,
    pub error_code: Option<ErrorCode>,
    /// The `x-error-retryable` header of an error reply.
    pub retryable: Option<bool>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl RawRequester {
    pub async fn new() -> Self {
        let conn = raw_connection().await;
        let channel = conn.create_channel().await.unwrap();
        let q = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions::exclusive(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let reply_queue = q.name().to_string();
        let replies = channel
            .basic_consume(
                reply_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        RawRequester {
            conn,
            channel,
            reply_queue,
            replies,
        }
    }

    /// Properties naming our reply queue.
    pub fn props(&self, correlation_id: &str) -> BasicProperties {
        BasicProperties::default()
            .with_reply_to(self.reply_queue.as_str().into())
            .with_correlation_id(correlation_id.into())
    }

    pub async fn publish(&self, queue: &str, body: &[u8], props: BasicProperties) {
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap();
    }

    /// The next reply, or panic after `limit`.
    pub async fn next_reply(&mut self, limit: Duration) -> RawReply {
        let d = tokio::time::timeout(limit, self.replies.next())
            .await
            .expect("a reply in time")
            .expect("consumer open")
            .expect("delivery ok");
        let headers = d.properties.headers().as_ref();
        RawReply {
            correlation_id: d
                .properties
                .correlation_id()
                .as_ref()
                .map(|s| s.to_string()),
            error_code: amqp_rpc::protocol::header_str(
                headers,
                amqp_rpc::protocol::ERROR_CODE_HEADER,
            )
            .map(|c| c.parse().expect("a contract error code")),
            retryable: headers
                .and_then(|h| h.inner().get(amqp_rpc::protocol::ERROR_RETRYABLE_HEADER))
                .map(|v| matches!(v, lapin::types::AMQPValue::Boolean(true))),
            content_type: d.properties.content_type().as_ref().map(|s| s.to_string()),
            body: d.data,
        }
    }
}

/// Test method: counts its runs, takes 300 ms, answers the run number's body.
pub struct Counted(pub std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Method for Counted {
    fn name(&self) -> &str {
        "counted"
    }
    fn prepare(&self, body: &[u8]) -> Result<Work, amqp_rpc::protocol::RequestError> {
        let (runs, body) = (self.0.clone(), body.to_vec());
        Ok(Work::Heavy(Box::new(move || {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(300));
            Ok(body)
        })))
    }
}

/// Test method: sleeps on the blocking pool for the number of milliseconds in the body.
pub struct Sleep;

impl Method for Sleep {
    fn name(&self) -> &str {
        "sleep"
    }
    fn prepare(&self, body: &[u8]) -> Result<Work, amqp_rpc::protocol::RequestError> {
        let ms: u64 = std::str::from_utf8(body)
            .unwrap_or("0")
            .trim()
            .parse()
            .unwrap_or(0);
        Ok(Work::Heavy(Box::new(move || {
            std::thread::sleep(Duration::from_millis(ms));
            Ok(b"slept".to_vec())
        })))
    }
}

/// Test method: panics, either while preparing (body "prepare") or on the blocking pool.
pub struct Panic;

impl Method for Panic {
    fn name(&self) -> &str {
        "panic"
    }
    fn prepare(&self, body: &[u8]) -> Result<Work, amqp_rpc::protocol::RequestError> {
        if body == b"prepare" {
            panic!("test panic while preparing");
        }
        Ok(Work::Heavy(Box::new(|| {
            panic!("test panic in the handler")
        })))
    }
}

/// Test method: blocks a handler thread until the test opens the gate.
pub struct Block(pub std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

impl Block {
    pub fn new() -> (
        Self,
        std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    ) {
        let gate = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        (Block(gate.clone()), gate)
    }
}

/// Open a [`Block`] gate.
pub fn open_gate(gate: &std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>) {
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
}

impl Method for Block {
    fn name(&self) -> &str {
        "block"
    }
    fn prepare(&self, _body: &[u8]) -> Result<Work, amqp_rpc::protocol::RequestError> {
        let gate = self.0.clone();
        Ok(Work::Heavy(Box::new(move || {
            let mut open = gate.0.lock().unwrap();
            while !*open {
                open = gate.1.wait(open).unwrap();
            }
            Ok(b"unblocked".to_vec())
        })))
    }
}
