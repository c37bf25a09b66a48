//! The RPC client: many calls in flight on one connection, each with a deadline, each ending in
//! exactly one outcome (DESIGN.md section 3).
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
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::{jittered, Connector};
use crate::config::AmqpConfig;
use crate::protocol::{
    deadline_header_value, expiration_ms, now_epoch_ms, ErrorCode, DEADLINE_HEADER, DIRECT_REPLY_TO,
};

mod error;
mod ids;
mod session;

use crate::publish::Publish;
pub use error::CallError;
use ids::Ids;
use session::{ReplyResult, Session, Shared};

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
    /// The service queue (default `rpc_queue`).
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
        Ok(Client {
            inner: Arc::new(Inner {
                queue: self.queue,
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
        client.session(deadline).await?;
        Ok(client)
    }
}

/// A cheap-to-clone handle; the connection closes when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    queue: String,
    timeout: Duration,
    ids: Ids,
    shared: Arc<Shared>,
    sessions: watch::Receiver<Option<Arc<Session>>>,
    cancel: CancellationToken,
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

    /// Call `method` with the default timeout.
    pub async fn call(&self, method: &str, body: &[u8]) -> Result<Vec<u8>, CallError> {
        self.call_timeout(method, body, self.inner.timeout).await
    }

    /// Call `method`, giving up after `timeout`. The request carries the deadline
    /// (`x-deadline-ms`) and expires in the queue when nobody takes it in time. No retry.
    pub async fn call_timeout(
        &self,
        method: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let options = CallOptions {
            timeout,
            idempotent: false,
        };
        self.call_with(method, body, options).await
    }

    /// Call an idempotent method with the default timeout, retrying within the deadline.
    pub async fn call_idempotent(&self, method: &str, body: &[u8]) -> Result<Vec<u8>, CallError> {
        let options = CallOptions {
            timeout: self.inner.timeout,
            idempotent: true,
        };
        self.call_with(method, body, options).await
    }

    /// Call with explicit options. With `idempotent`, a call that failed on `ConnectionLost`,
    /// `Unavailable` or a remote `unavailable` is sent again (same `message_id`, so a server
    /// that already ran it replays its cached reply) until it succeeds or the deadline comes;
    /// `NoServer` is retried during the call's first [`NO_SERVER_RETRY_WINDOW`], so "nobody
    /// serves this" stays fast; and up to the deadline when this client saw the queue served
    /// within [`SERVED_RECENTLY`], so a cluster failover or a rolling restart of the servers
    /// costs waiting, not errors.
    pub async fn call_with(
        &self,
        method: &str,
        body: &[u8],
        options: CallOptions,
    ) -> Result<Vec<u8>, CallError> {
        if method.is_empty() || method.len() > 255 {
            return Err(CallError::Remote {
                code: ErrorCode::InvalidArgument,
                message: "method names are 1 to 255 bytes".into(),
            });
        }
        let started = Instant::now();
        let deadline = far(started, options.timeout);
        let timeout_ms = u64::try_from(options.timeout.as_millis()).unwrap_or(u64::MAX);
        let deadline_ms = now_epoch_ms()
            .saturating_add(timeout_ms)
            .min(i64::MAX as u64);
        let message_id = self.inner.ids.next();
        let mut backoff = RETRY_INITIAL_BACKOFF;
        loop {
            let attempt = self.attempt(method, body, deadline, deadline_ms, &message_id);
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
                        || self.inner.shared.served_within(SERVED_RECENTLY)
                }
                Err(e) => e.is_connection_lost() || e.is_unavailable(),
                Ok(_) => false,
            };
            if !options.idempotent || !retry || Instant::now() + pause >= deadline {
                return result;
            }
            tracing::debug!(error = ?result.as_ref().err(), ?pause, "retrying an idempotent call");
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(RETRY_MAX_BACKOFF);
        }
    }

    /// One request/reply exchange, bounded by the caller's deadline.
    async fn attempt(
        &self,
        method: &str,
        body: &[u8],
        deadline: Instant,
        deadline_ms: u64,
        message_id: &str,
    ) -> Result<Vec<u8>, CallError> {
        let inner = &self.inner;
        let session = self.session(deadline).await?;
        session.check_server(&inner.queue, &inner.shared).await?;
        let id = inner.ids.next();
        let (_guard, mut reply) = inner.shared.register(id.clone());
        let mut headers = FieldTable::default();
        headers.insert(DEADLINE_HEADER.into(), deadline_header_value(deadline_ms));
        let props = BasicProperties::default()
            .with_reply_to(DIRECT_REPLY_TO.into())
            .with_correlation_id(id.into())
            .with_message_id(message_id.into())
            .with_type(method.into())
            .with_content_type("text/plain".into())
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
        let queue = inner.queue.as_str().into();
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
                    queue: inner.queue.clone(),
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

    /// The service queue this client calls.
    pub fn queue(&self) -> &str {
        &self.inner.queue
    }

    async fn session(&self, deadline: Instant) -> Result<Arc<Session>, CallError> {
        // The common case, connected: no receiver clone and no timer.
        if let Some(session) = self.inner.sessions.borrow().as_ref() {
            return Ok(session.clone());
        }
        let mut sessions = self.inner.sessions.clone();
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
                let last = self.inner.shared.last_error.lock().expect("lock").clone();
                Err(CallError::Unavailable(if last.is_empty() {
                    "not connected to the broker yet".into()
                } else {
                    last
                }))
            }
        }
    }
}
