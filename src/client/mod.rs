//! The RPC client: many calls in flight on one connection, each with a deadline, each ending in
//! exactly one outcome (DESIGN.md section 3). One client calls any number of service queues:
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
//! let fib30 = client.fib(30).await?;
//! assert_eq!(fib30.to_string(), "832040");
//! # Ok(()) }
//! ```

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};
use num_bigint::BigUint;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::{jittered, Connector};
use crate::config::AmqpConfig;
use crate::protocol::{
    deadline_header_value, expiration_ms, now_epoch_ms, ErrorCode, DEADLINE_HEADER,
    DIRECT_REPLY_TO, JSON_CONTENT_TYPE,
};

mod error;
mod ids;
mod service;
mod session;

use crate::publish::Publish;
pub use error::CallError;
use ids::Ids;
pub use service::Service;
pub use session::MAX_QUEUES;
use session::{QueueState, ReplyResult, Session, Shared};

/// Default per-call timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an idempotent call keeps retrying `NoServer`, unless the queue was served lately.
pub const NO_SERVER_RETRY_WINDOW: Duration = Duration::from_secs(1);
/// A client that saw the queue served this recently keeps retrying `NoServer` until the
/// deadline: the servers are most likely reconnecting (a broker node failed over, a rolling
/// restart), and a call that waits for them beats an error.
pub const SERVED_RECENTLY: Duration = Duration::from_secs(30);
const RETRY_INITIAL_BACKOFF: Duration = Duration::from_millis(25);
const RETRY_MAX_BACKOFF: Duration = Duration::from_millis(500);
/// The content type of raw requests (the tutorial's, and what `fib` takes).
const TEXT_CONTENT_TYPE: &str = "text/plain";

/// How long a call waits for its reply before it looks at its publish confirm: a request the
/// broker returned (no queue) or refused is reported this soon.
const CONFIRM_GRACE: Duration = Duration::from_millis(25);

/// `start + timeout`, saturating: a `Duration::MAX` timeout means "about never", not a panic.
fn far(start: Instant, timeout: Duration) -> Instant {
    start
        .checked_add(timeout)
        .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// A reply, or `ConnectionLost` when its sender went away: the router drops senders only
/// after failing every pending call with an explicit `ConnectionLost`, so a bare drop means the
/// same.
fn reply_result(
    received: Result<ReplyResult, tokio::sync::oneshot::error::RecvError>,
) -> ReplyResult {
    received.unwrap_or(Err(CallError::ConnectionLost))
}

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
        let shared = Arc::new(Shared::default());
        let (tx, sessions) = watch::channel(None);
        let cancel = CancellationToken::new();
        tokio::spawn(session::supervise(
            connector,
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

    /// The typed helper for the demo method: fib(n), exact. `fib` is idempotent, so this
    /// retries within the deadline (see [`call_with`](Self::call_with)).
    pub async fn fib(&self, n: u64) -> Result<BigUint, CallError> {
        let body = self
            .call_idempotent("fib", n.to_string().as_bytes())
            .await?;
        std::str::from_utf8(&body)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| CallError::Remote {
                code: ErrorCode::Internal,
                message: "the server's reply is not a decimal number".into(),
            })
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

/// The JSON body of a request.
fn encode_json<Req: Serialize + ?Sized>(request: &Req) -> Result<Vec<u8>, CallError> {
    serde_json::to_vec(request).map_err(|e| CallError::Remote {
        code: ErrorCode::InvalidArgument,
        message: format!("the request does not serialize as JSON: {e}"),
    })
}

/// A reply body as `Resp`: one that is not is a reply that breaks the method's promise, the
/// server's fault (`internal`), as [`Client::fib`] treats a reply that is not a number.
fn decode_json<Resp: DeserializeOwned>(body: &[u8]) -> Result<Resp, CallError> {
    serde_json::from_slice(body).map_err(|e| CallError::Remote {
        code: ErrorCode::Internal,
        message: format!(
            "the server's reply does not deserialize as {}: {e}",
            std::any::type_name::<Resp>()
        ),
    })
}

impl Inner {
    /// A call of `method` on `target`'s queue; see [`Client::call_with`] for the retries.
    async fn call(
        &self,
        target: &Target,
        method: &str,
        body: &[u8],
        content_type: &'static str,
        options: CallOptions,
    ) -> Result<Vec<u8>, CallError> {
        if method.is_empty() || method.len() > 255 {
            return Err(CallError::Remote {
                code: ErrorCode::InvalidArgument,
                message: "method names are 1 to 255 bytes".into(),
            });
        }
        if target.queue.len() > 255 {
            // AMQP cannot even carry it; the request would never leave.
            return Err(CallError::Remote {
                code: ErrorCode::InvalidArgument,
                message: "queue names are at most 255 bytes".into(),
            });
        }
        let started = Instant::now();
        let deadline = far(started, options.timeout);
        let timeout_ms = u64::try_from(options.timeout.as_millis()).unwrap_or(u64::MAX);
        let deadline_ms = now_epoch_ms()
            .saturating_add(timeout_ms)
            .min(i64::MAX as u64);
        // Only a call that may be sent again needs a name for its copies: without one, the
        // server still answers a broker redelivery from its cache (its key then is
        // reply_to + correlation_id + method + body), and the broker has a field less to decode
        // and re-encode per message (RabbitMQ 4.x re-encodes every delivered message's
        // properties; BENCHMARKS.md prices the request metadata there).
        let message_id = options.idempotent.then(|| self.ids.next());
        let mut backoff = RETRY_INITIAL_BACKOFF;
        loop {
            let request = Request {
                method,
                body,
                content_type,
                deadline,
                deadline_ms,
                message_id: message_id.as_deref(),
            };
            let attempt = self.attempt(target, request);
            let result = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Err(CallError::Timeout(_))) | Err(_) => Err(CallError::Timeout(options.timeout)),
                Ok(result) => result,
            };
            let pause = jittered(backoff);
            let retry = match &result {
                // A queue nobody served lately is reported within about a second (the next
                // attempt must still start inside the window); one served a moment ago is
                // waited for, up to the deadline.
                Err(CallError::NoServer { .. }) => {
                    started.elapsed() + pause < NO_SERVER_RETRY_WINDOW
                        || target.state.served_within(&self.shared, SERVED_RECENTLY)
                }
                Err(e) => e.is_connection_lost() || e.is_unavailable(),
                Ok(_) => false,
            };
            if !options.idempotent || !retry || Instant::now() + pause >= deadline {
                return result;
            }
            tracing::debug!(
                queue = &*target.queue,
                error = ?result.as_ref().err(),
                ?pause,
                "retrying an idempotent call"
            );
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(RETRY_MAX_BACKOFF);
        }
    }

    /// A JSON call on `target`'s queue.
    async fn call_json<Req, Resp>(
        &self,
        target: &Target,
        method: &str,
        request: &Req,
        options: CallOptions,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let body = encode_json(request)?;
        let reply = self
            .call(target, method, &body, JSON_CONTENT_TYPE, options)
            .await?;
        decode_json(&reply)
    }

    /// One request/reply exchange, bounded by the caller's deadline.
    async fn attempt(&self, target: &Target, request: Request<'_>) -> Result<Vec<u8>, CallError> {
        let Request {
            method,
            body,
            content_type,
            deadline,
            deadline_ms,
            message_id,
        } = request;
        let session = self.session(deadline).await?;
        session
            .check_server(&target.queue, &target.state, &self.shared)
            .await?;
        let id = self.ids.next();
        let (_guard, mut reply) = self.shared.register(id.clone());
        let mut headers = FieldTable::default();
        headers.insert(DEADLINE_HEADER.into(), deadline_header_value(deadline_ms));
        let mut props = BasicProperties::default()
            .with_reply_to(DIRECT_REPLY_TO.into())
            .with_correlation_id(id.into());
        if let Some(message_id) = message_id {
            props = props.with_message_id(message_id.into());
        }
        let props = props
            .with_type(method.into())
            .with_content_type(content_type.into())
            .with_expiration(expiration_ms(deadline - Instant::now()).into())
            .with_headers(headers);
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        // The reply alone proves the request was routed, so neither the write nor the confirm
        // is awaited on the way to it: each would cost the call a thread wake-up (profiled:
        // one futex and one socket read more per call than a bare client). They are looked at
        // when the reply is late, which is when they matter: a request returned as
        // unroutable (`NoServer`), nacked, or never written.
        let queue = target.queue.as_ref().into();
        let mut publish = Publish::start(&session.channel, queue, options, body.to_vec(), props)
            .map_err(|_| CallError::ConnectionLost)?;
        let grace = tokio::time::sleep_until(deadline.min(Instant::now() + CONFIRM_GRACE));
        tokio::select! {
            biased;
            result = &mut reply => return reply_result(result),
            _ = grace => {}
        }
        match publish
            .confirmation()
            .await
            .map_err(|_| CallError::ConnectionLost)?
        {
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                return Err(CallError::NoServer {
                    queue: target.queue.to_string(),
                    reason: format!("request returned: {}", returned.reply_text),
                });
            }
            Confirmation::Nack(None) => {
                return Err(CallError::Unavailable(
                    "the broker refused the request".into(),
                ));
            }
            Confirmation::Ack(None) | Confirmation::NotRequested => {}
        }
        reply_result(reply.await)
    }

    async fn session(&self, deadline: Instant) -> Result<Arc<Session>, CallError> {
        // The common case, connected: no receiver clone and no timer.
        if let Some(session) = self.sessions.borrow().as_ref() {
            return Ok(session.clone());
        }
        let mut sessions = self.sessions.clone();
        let wait = async {
            sessions
                .wait_for(|s| s.is_some())
                .await
                .map(|s| s.clone().expect("wait_for checked Some"))
        };
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(Ok(session)) => Ok(session),
            Ok(Err(_)) => Err(CallError::Unavailable("client is shutting down".into())),
            Err(_) => {
                let last = self.shared.last_error.lock().expect("lock").clone();
                Err(CallError::Unavailable(if last.is_empty() {
                    "not connected to the broker yet".into()
                } else {
                    last
                }))
            }
        }
    }
}

/// What one attempt sends.
#[derive(Clone, Copy)]
struct Request<'a> {
    method: &'a str,
    body: &'a [u8],
    content_type: &'static str,
    deadline: Instant,
    deadline_ms: u64,
    /// Idempotent calls only: every attempt carries the same one.
    message_id: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Pong {
        seq: u64,
    }

    #[test]
    fn json_bodies_and_their_errors() {
        assert_eq!(
            encode_json(&serde_json::json!({"seq": 1})).unwrap(),
            br#"{"seq":1}"#
        );
        assert_eq!(
            decode_json::<Pong>(br#"{"seq":7}"#).unwrap(),
            Pong { seq: 7 }
        );
        for bad in [
            &b"not json"[..],
            b"",
            br#"{"sequence":7}"#,
            b"7",
            br#"{"seq":-1}"#,
        ] {
            let err = decode_json::<Pong>(bad).unwrap_err();
            assert_eq!(err.remote_code(), Some(ErrorCode::Internal), "{err:?}");
            assert!(!err.is_retryable() && !err.is_timeout() && !err.is_no_server());
            assert!(err.to_string().contains("does not deserialize as"), "{err}");
        }
        // A map with non-string keys has no JSON form.
        let map: std::collections::HashMap<(u8, u8), u8> = [((1, 2), 3)].into();
        let err = encode_json(&map).unwrap_err();
        assert_eq!(
            err.remote_code(),
            Some(ErrorCode::InvalidArgument),
            "{err:?}"
        );
    }
}
