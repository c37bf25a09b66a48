//! What a request gets, decided apart from carrying it out: from its metadata, its body, the
//! delivery's redelivered flag, the clock and what the reply cache remembers, one
//! [`Decision`]. Nothing here publishes, acks or awaits, so every branch of the contract's
//! order is unit-tested without a broker; `request.rs` carries the decision out, `run.rs` runs
//! the work, `reply.rs` sends.
//!
//! The order is the contract's: no `reply_to` (nobody to answer), a `reply_to` the policy
//! refuses (never published to), then the deadline, the caller's identity where the method
//! requires one (before the cache, so a refused caller never gets a cached reply), then the
//! reply cache (a copy answered before), then the attempt count (poison), then the checks
//! (`correlation_id`, the body's size, the method) and the method's own `prepare`.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::protocol::{ErrorCode, RequestError, RequestMeta};
use crate::reply_to::{Refusal, ReplyToPolicy};
use crate::server::idempotency::{cacheable, CachedReply, Idempotency};
use crate::server::metrics::UNKNOWN_METHOD_LABEL;
use crate::service::{Methods, Work};

#[cfg(test)]
mod tests;

/// During a drain, a request not yet started is requeued for another worker only when it has at
/// least this long left; with less, it would most likely expire in the queue, so it is answered
/// `unavailable` at once and the caller can retry elsewhere now.
pub const REQUEUE_MIN_REMAINING: Duration = Duration::from_secs(1);

/// A handler's answer, or the error reply a request gets instead.
pub type Reply = Result<Vec<u8>, RequestError>;

/// A delivery, as far as the decision looks at it.
#[derive(Clone, Copy, Debug)]
pub struct Delivered<'a> {
    pub meta: &'a RequestMeta,
    pub body: &'a [u8],
    /// The broker's `redelivered` flag.
    pub redelivered: bool,
    /// Now, in Unix epoch milliseconds (the deadline's clock).
    pub now_ms: u64,
}

/// The daemon's rules, the same for every request of a session.
#[derive(Clone, Copy, Debug)]
pub struct Rules<'a> {
    pub methods: &'a Methods,
    pub max_body_bytes: usize,
    pub max_deliveries: u32,
    /// Where replies may go (`service.reply_to`).
    pub reply_to: &'a ReplyToPolicy,
    /// The callers each listed method answers, by validated `user_id` (`service.callers`).
    pub callers: &'a HashMap<String, Vec<String>>,
}

/// What the daemon remembers of earlier copies of a request. Asked only when the decision gets
/// that far: a copy the cache answers is not counted as an attempt, and neither is one that
/// has no idempotency key or has already expired.
pub trait Memory {
    /// The reply already computed for `key`, if it is still fresh.
    fn cached(&self, key: &str) -> Option<CachedReply>;
    /// This delivery's attempt number (1 for the first); may record it.
    fn attempt(&self, key: &str, meta: &RequestMeta, redelivered: bool) -> u32;
}

impl Memory for Idempotency {
    fn cached(&self, key: &str) -> Option<CachedReply> {
        Idempotency::cached(self, key)
    }

    fn attempt(&self, key: &str, meta: &RequestMeta, redelivered: bool) -> u32 {
        Idempotency::attempt(self, key, meta, redelivered)
    }
}

/// What a delivery gets.
#[derive(Debug)]
pub enum Decision {
    /// No `reply_to`: nobody can be answered. Acked, counted as rejected, no reply.
    NoReplyTo,
    /// A `reply_to` the policy refuses: acked, counted as rejected, never published to.
    ReplyToRefused(Refusal),
    /// The deadline passed before work started: acked and dropped without a reply.
    Expired,
    /// A copy of a call answered before: the cached reply is sent again (a replay).
    Replay(CachedReply),
    /// Delivered more than `max_deliveries` times: given up without running it (an
    /// `internal` reply, a copy to the dead-letter queue, the ack).
    Poison { attempt: u32 },
    /// Answered without running anything: a failed check, or work the method did inline.
    /// `remember` is the key to cache the reply under once it is sent, when it may be cached.
    Answer {
        reply: CachedReply,
        remember: Option<String>,
    },
    /// Run the method's work, as delivery attempt `attempt`.
    Run {
        job: Job,
        attempt: u32,
        caching: Caching,
    },
}

/// How the result of work that runs is shared with other copies of the request.
#[derive(Debug, PartialEq, Eq)]
pub enum Caching {
    /// No idempotency key: computed, sent, forgotten.
    None,
    /// A new call that reuses another's ids: it must not wait for that one's result, so it is
    /// computed alone, and its reply is kept for its own redeliveries.
    Remember(String),
    /// Single-flight under this key: join a copy already running, else compute, and let copies
    /// arriving meanwhile join this computation.
    SingleFlight(String),
}

/// A method's work with the limit it runs under.
#[derive(Debug)]
pub struct Job {
    /// Never [`Work::Done`]: that is answered inline.
    pub work: Work,
    /// The method's own limit on requests running at once.
    pub limit: Option<Arc<Semaphore>>,
    /// The handler's span, which `prepare` ran in and the work goes on in.
    pub span: tracing::Span,
}

/// What a delivery gets, in the contract's order (see the module doc).
pub fn decide(delivery: &Delivered<'_>, rules: &Rules<'_>, memory: &impl Memory) -> Decision {
    let meta = delivery.meta;
    let Some(reply_to) = meta.reply_to.as_deref() else {
        return Decision::NoReplyTo;
    };
    if let Err(refusal) = rules.reply_to.check(reply_to) {
        return Decision::ReplyToRefused(refusal);
    }
    if meta.expired(delivery.now_ms) {
        return Decision::Expired;
    }
    if let Err(denied) = caller_allowed(rules, meta) {
        return Decision::Answer {
            reply: Arc::new(Err(denied)),
            remember: None,
        };
    }
    let Some(key) = Idempotency::key(meta, delivery.body) else {
        return match check(rules, meta, delivery.body) {
            Checked::Answer(reply) => Decision::Answer {
                reply: Arc::new(reply),
                remember: None,
            },
            Checked::Run(job) => Decision::Run {
                job,
                attempt: 1,
                caching: Caching::None,
            },
        };
    };
    let may_replay = Idempotency::may_replay(meta, delivered_before(meta, delivery.redelivered));
    if let Some(reply) = may_replay.then(|| memory.cached(&key)).flatten() {
        return Decision::Replay(reply);
    }
    let attempt = memory.attempt(&key, meta, delivery.redelivered);
    if attempt > rules.max_deliveries {
        return Decision::Poison { attempt };
    }
    match check(rules, meta, delivery.body) {
        Checked::Run(job) => Decision::Run {
            job,
            attempt,
            caching: match may_replay {
                true => Caching::SingleFlight(key),
                false => Caching::Remember(key),
            },
        },
        Checked::Answer(reply) => {
            // Answered in microseconds without an await, so no duplicate can start meanwhile:
            // single-flight has nothing to join, and the reply is cached after it is sent.
            let reply = Arc::new(reply);
            let remember = cacheable(&reply).then_some(key);
            Decision::Answer { reply, remember }
        }
    }
}

/// What the contract's checks and the method's `prepare` led to.
enum Checked {
    /// Answered already: an error from the checks, or work cheap enough to do inline.
    Answer(Reply),
    /// Work to run: on the blocking pool, or a future to await.
    Run(Job),
}

/// The contract's checks in order, then the method's own `prepare`.
fn check(rules: &Rules<'_>, meta: &RequestMeta, body: &[u8]) -> Checked {
    let failed = |e| Checked::Answer(Err(e));
    if meta.correlation_id.is_none() {
        return failed(RequestError::new(
            ErrorCode::InvalidArgument,
            "missing correlation_id: set it so the reply can be matched to the request",
        ));
    }
    if body.len() > rules.max_body_bytes {
        return failed(RequestError::new(
            ErrorCode::ResourceExhausted,
            format!(
                "request body is {} bytes, over the limit of {} bytes",
                body.len(),
                rules.max_body_bytes
            ),
        ));
    }
    // An empty name is the daemon's default method, when it has one.
    let Some(method) = rules.methods.get(&meta.method) else {
        return failed(unknown_method(rules.methods, &meta.method));
    };
    let span = crate::trace::handler_span(method.name());
    let prepared =
        span.in_scope(|| std::panic::catch_unwind(AssertUnwindSafe(|| method.prepare(body))));
    match prepared {
        Err(_) => failed(panicked()),
        Ok(Err(e)) => failed(e),
        Ok(Ok(Work::Done(answer))) => Checked::Answer(Ok(answer)),
        Ok(Ok(work)) => Checked::Run(Job {
            work,
            limit: method.limit().cloned(),
            span,
        }),
    }
}

/// Whether the request's caller may call its method: only methods listed in `service.callers`
/// check, against the `user_id` the broker validated (it refuses a publish whose `user_id`
/// is not the connection's user, unless that user is tagged `impersonator`).
fn caller_allowed(rules: &Rules<'_>, meta: &RequestMeta) -> Result<(), RequestError> {
    let Some(allowed) = rules.callers.get(&meta.method) else {
        return Ok(());
    };
    match meta.user_id.as_deref() {
        Some(user) if allowed.iter().any(|a| a == user) => Ok(()),
        Some(user) => Err(RequestError::new(
            ErrorCode::PermissionDenied,
            format!(
                "user {:?} may not call {:?}",
                truncate(user, 64),
                meta.method
            ),
        )),
        None => Err(RequestError::new(
            ErrorCode::PermissionDenied,
            format!(
                "{:?} answers only known callers: set user_id to the user you connect as",
                meta.method
            ),
        )),
    }
}

/// The `unknown_method` reply. A request without a `type` names nothing that could be wrong,
/// so its message says what is missing instead of quoting an empty name.
fn unknown_method(methods: &Methods, name: &str) -> RequestError {
    let served = methods.names().join(", ");
    let message = match name {
        "" if served.is_empty() => {
            "the request names no method (`type`) and this server has no default method".into()
        }
        "" => format!(
            "the request names no method (`type`) and this server has no default method; \
             name one of: {served}"
        ),
        name => format!(
            "unknown method {:?}; this server has: {served}",
            truncate(name, 64)
        ),
    };
    RequestError::new(ErrorCode::UnknownMethod, message)
}

/// Whether the broker delivered this request before (to us or another worker): classic
/// queues set `redelivered`, quorum queues also count in `x-delivery-count`.
pub fn delivered_before(meta: &RequestMeta, redelivered: bool) -> bool {
    redelivered || meta.delivery_count.unwrap_or(0) > 0
}

/// The `method` label of a request's metrics: bounded to the served names, so a caller
/// cannot grow the label set.
pub fn method_label<'a>(methods: &'a Methods, name: &str) -> &'a str {
    methods.get(name).map_or(UNKNOWN_METHOD_LABEL, |m| m.name())
}

/// Whether a finished request is past its deadline, `remaining` being the time left: its
/// caller has given up, so a reply could only arrive late.
pub fn too_late_to_reply(remaining: Option<Duration>) -> bool {
    remaining == Some(Duration::ZERO)
}

/// The reply of a request given up as poison after `attempt` deliveries.
pub fn given_up(attempt: u32, max_deliveries: u32) -> Reply {
    Err(RequestError::new(
        ErrorCode::Internal,
        format!(
            "request given up after {attempt} delivery attempts \
             (max_deliveries = {max_deliveries})"
        ),
    ))
}

/// What a request not yet started gets when the daemon drains.
#[derive(Debug)]
pub enum Drained<'m> {
    /// Back to the queue, for another worker.
    Requeue,
    /// Too little time left for another worker to help: answer `unavailable` now, so the
    /// caller can retry elsewhere (requeued anyway when the reply cannot be sent).
    Refuse { reply_to: &'m str, error: Reply },
}

/// What a request not yet started gets when the daemon drains, `remaining` being its time
/// left.
pub fn drained(meta: &RequestMeta, remaining: Option<Duration>) -> Drained<'_> {
    let worth_requeueing = remaining.is_none_or(|left| left >= REQUEUE_MIN_REMAINING);
    match (worth_requeueing, meta.reply_to.as_deref()) {
        (false, Some(reply_to)) => Drained::Refuse {
            reply_to,
            error: Err(RequestError::new(
                ErrorCode::Unavailable,
                "this server is shutting down; retry",
            )),
        },
        _ => Drained::Requeue,
    }
}

/// The reply of a handler that panicked.
pub fn panicked() -> RequestError {
    tracing::error!("handler panicked");
    RequestError::new(ErrorCode::Internal, "the handler failed unexpectedly")
}

/// At most `max` characters of `s`: for caller-chosen text in messages and logs.
pub fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
