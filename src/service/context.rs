//! What a handler knows about the request it serves: the body and the method, the deadline
//! and a cancellation that fires at it, the caller's ids and identity, and the trace context.
//!
//! Built once per delivery that runs an async or blocking handler (the inline fast path of
//! [`super::Method::prepare`] never pays for it), and owned by the handler's future, so it
//! can be moved into tasks of the handler's own.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::types::FieldTable;
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;

use crate::protocol::{now_epoch_ms, RequestMeta};

/// One request, as its handler sees it.
#[derive(Clone, Debug)]
pub struct Request {
    body: Vec<u8>,
    meta: RequestMeta,
    attempt: u32,
    redelivered: bool,
    headers: Option<FieldTable>,
    user_id: Option<String>,
    app_id: Option<String>,
    content_type: Option<String>,
    cancel: CancellationToken,
}

impl Request {
    /// A request as the daemon builds it from a delivery.
    pub(crate) fn new(
        body: Vec<u8>,
        meta: RequestMeta,
        props: &BasicProperties,
        attempt: u32,
        redelivered: bool,
        cancel: CancellationToken,
    ) -> Self {
        let text = |s: &Option<lapin::types::ShortString>| {
            s.as_ref()
                .map(|v| v.as_str().to_owned())
                .filter(|v| !v.is_empty())
        };
        Request {
            body,
            meta,
            attempt,
            redelivered,
            headers: props.headers().clone(),
            user_id: text(props.user_id()),
            app_id: text(props.app_id()),
            content_type: text(props.content_type()),
            cancel,
        }
    }

    /// A request built by hand, for unit tests of handlers (no broker): `body` for `method`,
    /// first attempt, no deadline, no headers.
    pub fn for_test(method: &str, body: impl Into<Vec<u8>>) -> Self {
        let meta = RequestMeta {
            method: method.to_owned(),
            ..RequestMeta::default()
        };
        Request::new(
            body.into(),
            meta,
            &BasicProperties::default(),
            1,
            false,
            CancellationToken::new(),
        )
    }

    /// The request body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body, owned.
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    /// The method (`type`), or the daemon's default method for requests without one.
    pub fn method(&self) -> &str {
        &self.meta.method
    }

    /// The caller's absolute deadline (`x-deadline-ms`), when it sent one.
    pub fn deadline(&self) -> Option<SystemTime> {
        self.meta
            .deadline_ms
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// Time left until the deadline (zero once it passed); `None` without a deadline.
    pub fn time_left(&self) -> Option<Duration> {
        self.meta.remaining(now_epoch_ms())
    }

    /// Fires when the caller's deadline is about to pass (the daemon then answers
    /// `deadline_exceeded` itself) or when a drain gives up on the request: work still going
    /// then is wasted, so stop it: `_ = req.cancelled() => ...` in a `select!`. Whatever
    /// the handler returns after a drain gave up on it is not sent.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// Whether [`cancelled`](Self::cancelled) has fired (for a loop of CPU work to look at).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The cancellation as a token, for tasks the handler spawns (it fires with the request's).
    pub fn cancellation(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// `message_id`: the call's own name, the same on every copy of it.
    pub fn message_id(&self) -> Option<&str> {
        self.meta.message_id.as_deref()
    }

    /// `correlation_id`, as the reply will carry it.
    pub fn correlation_id(&self) -> Option<&str> {
        self.meta.correlation_id.as_deref()
    }

    /// Which delivery attempt this is: 1 for the first (see `max_deliveries`).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether the broker delivered this request before (to us or another worker).
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// The request's headers, as sent.
    pub fn headers(&self) -> Option<&FieldTable> {
        self.headers.as_ref()
    }

    /// `user_id`: when present, RabbitMQ has checked that it is the user the caller's
    /// connection logged in as (it refuses a publish with another one).
    pub fn user_id(&self) -> Option<&str> {
        self.user_id.as_deref()
    }

    /// `app_id`: what the caller says it is. Not checked by the broker.
    pub fn app_id(&self) -> Option<&str> {
        self.app_id.as_deref()
    }

    /// `content_type`, as sent.
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    /// The W3C `traceparent` the caller sent, if any.
    pub fn traceparent(&self) -> Option<&str> {
        self.meta.traceparent.as_deref()
    }
}
