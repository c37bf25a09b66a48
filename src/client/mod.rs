//! The RPC client: many calls in flight on one connection, each with a deadline, each ending in
//! exactly one outcome. One client calls any number of service queues:
//! [`Client::service`] hands out a cheap [`Service`] handle per queue, all of them sharing the
//! client's connection and its one direct reply-to consumer.
//!
//! ```no_run
//! # async fn demo() -> Result<(), amqp_rpc::CallError> {
//! let client = amqp_rpc::Client::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
//!     .queue("rpc_queue")
//!     .timeout(std::time::Duration::from_secs(5))
//!     .connect()
//!     .await?;
//! // A raw call of the queue's `fib` method, retried within the deadline if the connection
//! // is lost (it is idempotent)...
//! let fib30 = client.call_idempotent("fib", b"30").await?;
//! assert_eq!(fib30, b"832040");
//! // ...and a typed JSON call of another service on the same connection.
//! #[derive(serde::Serialize)]
//! struct Lookup { sku: String }
//! #[derive(serde::Deserialize)]
//! struct Item { stock: u32 }
//! let item: Item = client
//!     .service("inventory")
//!     .call_json("lookup", &Lookup { sku: "A-1".into() })
//!     .await?;
//! # let _ = item.stock;
//! # Ok(()) }
//! ```

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::Connector;
use crate::config::AmqpConfig;

mod alarm;
mod call;
mod error;
mod ids;
mod service;
mod session;
mod shared;

use call::far;
pub use error::CallError;
use ids::Ids;
pub use service::Service;
use session::Session;
pub use shared::MAX_QUEUES;
use shared::{QueueState, Shared};

/// Default per-call timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an idempotent call keeps retrying `NoServer`, unless the queue was served lately.
pub const NO_SERVER_RETRY_WINDOW: Duration = Duration::from_secs(1);
/// A client that saw the queue served this recently keeps retrying `NoServer` until the
/// deadline: the servers are most likely reconnecting (a broker node failed over, a rolling
/// restart), and a call that waits for them beats an error.
pub const SERVED_RECENTLY: Duration = Duration::from_secs(30);

/// Options of one call.
#[derive(Clone, Copy, Debug)]
pub struct CallOptions {
    /// Give up after this long; the deadline travels with the request.
    pub timeout: Duration,
    /// The method is idempotent: retry on connection loss and unavailability within the
    /// deadline.
    pub idempotent: bool,
}

/// Configures a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    amqp: AmqpConfig,
    queue: String,
    timeout: Duration,
    publisher_confirms: bool,
    identify: bool,
}

impl ClientBuilder {
    /// The default service queue (default `rpc_queue`): the one [`Client::call`] and the other
    /// methods of [`Client`] call. Others are called through [`Client::service`].
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Default timeout of [`Client::call`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Publish requests in confirm mode (default off). Requests are always `mandatory`, so a
    /// request the broker cannot route (its queue deleted since the client last looked) is
    /// reported as [`CallError::NoServer`] either way. Confirms add one thing: a request the
    /// broker routes but refuses, as a queue with `x-overflow = reject-publish` at its
    /// `x-max-length` does, fails at once with [`CallError::Unavailable`] instead of at its
    /// deadline. Turn them on for such queues; they cost the broker work on every call
    /// (BENCHMARKS.md prices them).
    pub fn publisher_confirms(mut self, on: bool) -> Self {
        self.publisher_confirms = on;
        self
    }

    /// Send the user this client connects as in every request's `user_id` (default off). The
    /// broker checks it against the connection's user, so a server can trust it: methods a
    /// daemon serves only to some callers (`service.callers`) need it. Every URL given must
    /// use the same user. One property more per call for the broker to carry.
    pub fn identify(mut self, on: bool) -> Self {
        self.identify = on;
        self
    }

    /// Connection settings beyond the URL (heartbeat, connect timeout, backoff cap).
    pub fn amqp(mut self, amqp: AmqpConfig) -> Self {
        let url = std::mem::take(&mut self.amqp.url);
        self.amqp = AmqpConfig { url, ..amqp };
        self
    }

    /// Start the client; it connects in the background and calls wait for the connection up
    /// to their deadline. Must run inside a tokio runtime.
    pub fn build(self) -> Result<Client, CallError> {
        let connector = Connector::new(&self.amqp, "amqp-rpc client")
            .map_err(|e| CallError::Unavailable(e.to_string()))?;
        let user_id = match self.identify {
            false => None,
            true => crate::config::split_urls(&self.amqp.url)
                .next()
                .and_then(|url| url.parse::<lapin::uri::AMQPUri>().ok())
                .map(|uri| uri.authority.userinfo.username),
        };
        let shared = Arc::new(Shared::default());
        let (tx, sessions) = watch::channel(None);
        let cancel = CancellationToken::new();
        tokio::spawn(session::supervise(
            connector,
            self.publisher_confirms,
            shared.clone(),
            tx,
            cancel.clone(),
        ));
        let default = Target {
            state: shared.queue(&self.queue),
            queue: self.queue.into(),
        };
        Ok(Client {
            inner: Arc::new(Inner {
                default,
                timeout: self.timeout,
                user_id,
                ids: Ids::new(),
                shared,
                sessions,
                cancel,
            }),
        })
    }

    /// [`build`](Self::build), then wait for the first connection (up to the default timeout).
    pub async fn connect(self) -> Result<Client, CallError> {
        let client = self.build()?;
        let deadline = far(Instant::now(), client.inner.timeout);
        client.inner.session(deadline).await?;
        Ok(client)
    }
}

/// A cheap-to-clone handle; the connection closes when the last clone (and the last
/// [`Service`] made from one) is dropped.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The builder's queue, which [`Client`]'s own call methods call.
    default: Target,
    timeout: Duration,
    /// Sent as `user_id` (see [`ClientBuilder::identify`]).
    user_id: Option<String>,
    ids: Ids,
    shared: Arc<Shared>,
    sessions: watch::Receiver<Option<Arc<Session>>>,
    cancel: CancellationToken,
}

/// A service queue and what the client knows about it.
#[derive(Clone, Debug)]
struct Target {
    queue: Arc<str>,
    state: Arc<QueueState>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Client {
    /// Start configuring a client for one broker URL, or several comma-separated.
    pub fn builder(urls: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            amqp: AmqpConfig {
                url: urls.into(),
                ..AmqpConfig::default()
            },
            queue: "rpc_queue".into(),
            timeout: DEFAULT_TIMEOUT,
            publisher_confirms: false,
            identify: false,
        }
    }

    /// A handle on another service queue, sharing this client's connection, its reply
    /// consumer and its call ids; with the same call methods as [`Client`] and the client's
    /// default timeout. Cheap: make one per call if that reads better, or keep it. What the
    /// client knows about the queue (whether it is served; whether it was lately, which
    /// decides how long an idempotent call retries `NoServer`) is the queue's own, shared by
    /// every handle on it. The client remembers up to [`MAX_QUEUES`] queues.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), amqp_rpc::CallError> {
    /// let client = amqp_rpc::Client::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
    ///     .connect()
    ///     .await?;
    /// let billing = client.service("billing");
    /// let invoice = billing.call("invoice", b"42").await?;
    /// let stock = client.service("inventory").call("count", b"sku-7").await?;
    /// # let _ = (invoice, stock);
    /// # Ok(()) }
    /// ```
    pub fn service(&self, queue: &str) -> Service {
        Service::new(self.inner.clone(), queue)
    }

    /// The handle on the builder's queue, which this client's own call methods use: one
    /// implementation of the calls for every queue.
    fn default_service(&self) -> Service {
        Service::on(self.inner.clone(), self.inner.default.clone())
    }

    /// Call `method` with the default timeout.
    pub async fn call(&self, method: &str, body: &[u8]) -> Result<Vec<u8>, CallError> {
        self.default_service().call(method, body).await
    }

    /// Call `method`, giving up after `timeout`. The request carries the deadline
    /// (`x-deadline-ms`) and expires in the queue when nobody takes it in time. No retry.
    pub async fn call_timeout(
        &self,
        method: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        self.default_service()
            .call_timeout(method, body, timeout)
            .await
    }

    /// Call an idempotent method with the default timeout, retrying within the deadline.
    pub async fn call_idempotent(&self, method: &str, body: &[u8]) -> Result<Vec<u8>, CallError> {
        self.default_service().call_idempotent(method, body).await
    }

    /// Call with explicit options. With `idempotent`, a call that failed on `ConnectionLost`,
    /// `Unavailable` or a remote `unavailable` is sent again (same `message_id`, so a server
    /// that already ran it replays its cached reply) until it succeeds or the deadline comes;
    /// `NoServer` is retried during the call's first [`NO_SERVER_RETRY_WINDOW`], so "nobody
    /// serves this" stays fast; and up to the deadline when this client saw the queue served
    /// within [`SERVED_RECENTLY`], so a cluster failover or a rolling restart of the servers
    /// costs waiting, not errors. Which queues were served is remembered per queue.
    pub async fn call_with(
        &self,
        method: &str,
        body: &[u8],
        options: CallOptions,
    ) -> Result<Vec<u8>, CallError> {
        self.default_service()
            .call_with(method, body, options)
            .await
    }

    /// Call `method` with `request` as JSON (`content_type: application/json`) and the default
    /// timeout, and deserialize the reply's body as `Resp`. No retry (see
    /// [`call_json_with`](Self::call_json_with)).
    ///
    /// Errors: what [`call`](Self::call) returns; a request that does not serialize is
    /// `Remote { code: InvalidArgument, .. }` (nothing is sent); a reply body that does not
    /// deserialize as `Resp` is `Remote { code: Internal, .. }`, like any reply that breaks
    /// the method's promise (the server answered, but not with what the method returns).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), amqp_rpc::CallError> {
    /// #[derive(serde::Serialize)]
    /// struct Quote { sku: String, qty: u32 }
    /// #[derive(serde::Deserialize)]
    /// struct Price { cents: u64 }
    ///
    /// let client = amqp_rpc::Client::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
    ///     .queue("pricing")
    ///     .connect()
    ///     .await?;
    /// let price: Price = client
    ///     .call_json("quote", &Quote { sku: "sku-7".into(), qty: 3 })
    ///     .await?;
    /// println!("{} cents", price.cents);
    /// # Ok(()) }
    /// ```
    pub async fn call_json<Req, Resp>(&self, method: &str, request: &Req) -> Result<Resp, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.default_service().call_json(method, request).await
    }

    /// [`call_json`](Self::call_json) with explicit options (retries as in
    /// [`call_with`](Self::call_with)).
    pub async fn call_json_with<Req, Resp>(
        &self,
        method: &str,
        request: &Req,
        options: CallOptions,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.default_service()
            .call_json_with(method, request, options)
            .await
    }

    /// Replies that arrived for no waiting call (late after a timeout, or duplicates).
    pub fn late_replies(&self) -> u64 {
        self.inner.shared.late_replies.load(Ordering::Relaxed)
    }

    /// Calls waiting for a reply right now (0 when idle: entries never leak).
    pub fn pending_calls(&self) -> usize {
        self.inner.shared.pending_len()
    }

    /// Connections re-established after a loss.
    pub fn reconnects(&self) -> u64 {
        self.inner.shared.reconnects.load(Ordering::Relaxed)
    }

    /// The default service queue: the one [`Client`]'s own call methods call.
    pub fn queue(&self) -> &str {
        &self.inner.default.queue
    }
}

/// The fuzz target's view of reply handling (see `crate::fuzzing`): a call waits for id `1`,
/// and the same reply arrives twice.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn fuzz_reply(props: lapin::BasicProperties, body: Vec<u8>) {
    let shared = Arc::new(Shared::default());
    let (_guard, mut waiting) = shared.register("1".into());
    session::dispatch(&shared, &props, body.clone());
    session::dispatch(&shared, &props, body);
    let for_us = props.correlation_id().as_ref().map(|s| s.as_str()) == Some("1");
    let late = shared.late_replies.load(Ordering::Relaxed);
    match waiting.try_recv() {
        Ok(result) => {
            assert!(for_us, "another request's reply reached the call");
            assert_eq!(late, 1, "the copy is counted late");
            if let Err(e) = result {
                assert!(e.is_remote(), "{e:?}");
            }
        }
        Err(_) => assert!(!for_us && late == 2, "a reply for the call was lost"),
    }
}

impl CallOptions {
    /// One attempt, giving up after `timeout`.
    pub(crate) fn once(timeout: Duration) -> Self {
        CallOptions {
            timeout,
            idempotent: false,
        }
    }

    /// Retried within `timeout` (see [`Client::call_with`]).
    pub(crate) fn retrying(timeout: Duration) -> Self {
        CallOptions {
            timeout,
            idempotent: true,
        }
    }
}
